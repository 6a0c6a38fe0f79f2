// Autoscaling: prometheus-adapter serves the service's load metrics through the custom metrics API for the HPA,
// and Cluster Autoscaler adds GPU nodes (from zero) when the HPA's new pods cannot be scheduled.
import * as k8s from "@pulumi/kubernetes";
import * as pulumi from "@pulumi/pulumi";
import { systemNodeSelector } from "./conventions";
import { AddonContext, installChart } from "./helm";
import { podIdentityForServiceAccount } from "./pod-identity";

export const prometheusAdapterChart = {
    chart: "prometheus-adapter",
    version: "4.11.0",
    repository: "https://prometheus-community.github.io/helm-charts",
};
export const clusterAutoscalerChart = { chart: "cluster-autoscaler", version: "9.46.6", repository: "https://kubernetes.github.io/autoscaler" };

/** One prometheus-adapter rule (its chart's `rules.custom` items). */
export interface AdapterRule {
    seriesQuery: string;
    resources: { overrides: Record<string, { resource: string }> };
    name: { matches: string; as: string };
    metricsQuery: string;
}

const perPod = { overrides: { namespace: { resource: "namespace" }, pod: { resource: "pod" } } };

/**
 * The adapter's rules: the default rules would serve `http_requests` (they strip `_total`), so we write our own.
 * Only API calls count as requests: probes and metric scrapes would otherwise look like traffic.
 */
export const adapterRules: readonly AdapterRule[] = [
    {
        seriesQuery: 'http_requests_total{namespace!="",pod!=""}',
        resources: perPod,
        name: { matches: "^http_requests_total$", as: "http_requests_per_second" },
        metricsQuery: 'sum(rate(<<.Series>>{<<.LabelMatchers>>,route=~"/v1/audio/.*"}[2m])) by (<<.GroupBy>>)',
    },
    ...(["whisper_requests_in_flight", "whisper_queued_audio_seconds"] as const).map((gauge) => ({
        seriesQuery: `${gauge}{namespace!="",pod!=""}`,
        resources: perPod,
        name: { matches: `^${gauge}$`, as: gauge },
        // A one-minute average: a gauge sampled every scrape would make the HPA chase single batches.
        metricsQuery: "sum(avg_over_time(<<.Series>>{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)",
    })),
];

export interface PrometheusAdapterArgs {
    namespace: string;
    prometheusUrl: string;
    prometheusPort: number;
}

export function installPrometheusAdapter(args: PrometheusAdapterArgs, context: AddonContext): k8s.helm.v3.Release {
    return installChart(
        "prometheus-adapter",
        {
            releaseName: "prometheus-adapter",
            ...prometheusAdapterChart,
            namespace: args.namespace,
            values: {
                prometheus: { url: args.prometheusUrl, port: args.prometheusPort },
                nodeSelector: systemNodeSelector,
                // The HPA reads through it: one replica down must not freeze scaling.
                replicas: 2,
                rules: { default: false, custom: adapterRules },
            },
        },
        context,
    );
}

/** Cluster Autoscaler's image follows the Kubernetes minor version (its compatibility rule). */
export function clusterAutoscalerImageTag(kubernetesVersion: string): string {
    return `v${kubernetesVersion}.0`;
}

/** The Cluster Autoscaler permissions from its AWS guide, mutating calls limited to this cluster's groups. */
export function clusterAutoscalerPolicy(clusterName: string): string {
    return JSON.stringify({
        Version: "2012-10-17",
        Statement: [
            {
                Effect: "Allow",
                Action: [
                    "autoscaling:DescribeAutoScalingGroups",
                    "autoscaling:DescribeAutoScalingInstances",
                    "autoscaling:DescribeLaunchConfigurations",
                    "autoscaling:DescribeScalingActivities",
                    "autoscaling:DescribeTags",
                    "ec2:DescribeImages",
                    "ec2:DescribeInstanceTypes",
                    "ec2:DescribeLaunchTemplateVersions",
                    "ec2:GetInstanceTypesFromInstanceRequirements",
                    "eks:DescribeNodegroup",
                ],
                Resource: "*",
            },
            {
                Effect: "Allow",
                Action: ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"],
                Resource: "*",
                Condition: { StringEquals: { [`aws:ResourceTag/k8s.io/cluster-autoscaler/${clusterName}`]: "owned" } },
            },
        ],
    });
}

export interface ClusterAutoscalerArgs {
    clusterName: pulumi.Input<string>;
    kubernetesVersion: string;
    region: string;
    /** How long a GPU node stays unneeded before it is removed (minutes). */
    scaleDownUnneededMinutes: number;
    tags: Record<string, string>;
}

const autoscalerServiceAccount = "cluster-autoscaler";

/**
 * Cluster Autoscaler with auto-discovery of the cluster's managed node groups (EKS tags their ASGs with
 * k8s.io/cluster-autoscaler/<cluster>; cluster.ts adds the node-template tags for scaling GPU groups from zero).
 */
export function installClusterAutoscaler(name: string, args: ClusterAutoscalerArgs, context: AddonContext): k8s.helm.v3.Release {
    const { association } = podIdentityForServiceAccount(`${name}-cluster-autoscaler`, {
        clusterName: args.clusterName,
        namespace: "kube-system",
        serviceAccount: autoscalerServiceAccount,
        inlinePolicy: pulumi.output(args.clusterName).apply(clusterAutoscalerPolicy),
        tags: args.tags,
    });
    const scaleDown = `${args.scaleDownUnneededMinutes}m`;
    return installChart(
        "cluster-autoscaler",
        {
            releaseName: "cluster-autoscaler",
            ...clusterAutoscalerChart,
            namespace: "kube-system",
            values: {
                cloudProvider: "aws",
                awsRegion: args.region,
                autoDiscovery: { clusterName: args.clusterName },
                image: { tag: clusterAutoscalerImageTag(args.kubernetesVersion) },
                rbac: { serviceAccount: { create: true, name: autoscalerServiceAccount } },
                nodeSelector: systemNodeSelector,
                extraArgs: {
                    // least-waste picks the group that leaves the fewest idle CPUs and GPUs behind.
                    expander: "least-waste",
                    "balance-similar-node-groups": true,
                    // GPU nodes are slow to become useful (driver, 10 GB image, model load): do not flap.
                    "scale-down-unneeded-time": scaleDown,
                    "scale-down-delay-after-add": scaleDown,
                    "scale-down-utilization-threshold": 0.5,
                    // The DaemonSets on every node (CSI, DCGM, node exporter) must not pin an empty GPU node.
                    "skip-nodes-with-system-pods": false,
                    "skip-nodes-with-local-storage": false,
                },
            },
        },
        { provider: context.provider, dependsOn: [...context.dependsOn, association] },
    );
}
