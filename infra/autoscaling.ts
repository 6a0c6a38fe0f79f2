// Autoscaling: prometheus-adapter serves the service's load metrics through the custom metrics API for the HPA,
// and Cluster Autoscaler adds GPU nodes (from zero) when the HPA's new pods cannot be scheduled.
import * as k8s from "@pulumi/kubernetes";
import * as pulumi from "@pulumi/pulumi";
import { KubernetesVersion } from "./config";
import { AddonContext, installChart } from "./helm";
import { podIdentityForServiceAccount } from "./pod-identity";

export const prometheusAdapterChart = {
    chart: "prometheus-adapter",
    version: "4.11.0",
    repository: "https://prometheus-community.github.io/helm-charts",
};

/** One Cluster Autoscaler release line: the chart built for it and the newest patch release of its image. */
export interface ClusterAutoscalerRelease {
    chartVersion: string;
    /** The chart's appVersion: the autoscaler minor its templates (RBAC, flags) were written for. */
    chartAppVersion: string;
    imageTag: string;
}

/**
 * The autoscaler for each Kubernetes minor (its compatibility rule: the same minor), from one table so that a cluster
 * upgrade moves chart and image together. Charts: the newest with that appVersion in the chart repository's index
 * (kubernetes/autoscaler gh-pages index.yaml; 9.59.0 from the release asset cluster-autoscaler-chart-9.59.0).
 * Images: the newest patch release of the line on kubernetes/autoscaler's releases page as of 2026-11.
 */
export const clusterAutoscalerReleases: Readonly<Record<KubernetesVersion, ClusterAutoscalerRelease>> = {
    "1.32": { chartVersion: "9.46.6", chartAppVersion: "1.32.0", imageTag: "v1.32.7" },
    "1.33": { chartVersion: "9.51.0", chartAppVersion: "1.33.0", imageTag: "v1.33.5" },
    "1.34": { chartVersion: "9.53.0", chartAppVersion: "1.34.2", imageTag: "v1.34.4" },
    "1.35": { chartVersion: "9.59.0", chartAppVersion: "1.35.0", imageTag: "v1.35.2" },
};
export const clusterAutoscalerRepository = "https://kubernetes.github.io/autoscaler";

/** A resource the autoscaler reads (get, list, watch), `group/resource` (`/resource` for the core group). */
export type WatchedResource = `${string}/${string}`;

/**
 * Resources whose informers an autoscaler minor starts and that not every chart of the table grants read access
 * to, by the first minor that needs them. The autoscaler waits for its informers: without the grant it loops on
 * "forbidden" and does not scale. Every chart grants the older core set (nodes, pods, PDBs, CSI nodes and drivers...).
 */
export const autoscalerWatches: readonly { resource: WatchedResource; sinceMinor: number; source: string }[] = [
    { resource: "storage.k8s.io/volumeattachments", sinceMinor: 32, source: "kubernetes/autoscaler#7663" },
    // 1.35 always enables dynamic resource allocation (--enable-dynamic-resource-allocation is locked on).
    { resource: "resource.k8s.io/resourceslices", sinceMinor: 35, source: "kubernetes/autoscaler#9244, #10278" },
    { resource: "resource.k8s.io/deviceclasses", sinceMinor: 35, source: "kubernetes/autoscaler#9244, #10278" },
    { resource: "resource.k8s.io/resourceclaims", sinceMinor: 35, source: "kubernetes/autoscaler#9244, #10278" },
    // 1.35 starts these informers whatever its flags; no chart version grants them.
    { resource: "apps/deployments", sinceMinor: 35, source: "devantler-tech/ksail#5405 (v1.35.0)" },
    { resource: "/resourcequotas", sinceMinor: 35, source: "devantler-tech/ksail#5405 (v1.35.0)" },
];

/** The chart version from which its ClusterRole grants read access to each of those resources (templates/clusterrole.yaml). */
export const clusterAutoscalerChartGrants: readonly { resource: WatchedResource; sinceChart: string; source: string }[] = [
    { resource: "storage.k8s.io/volumeattachments", sinceChart: "9.46.3", source: "kubernetes/autoscaler#7904" },
    ...(["resourceslices", "deviceclasses", "resourceclaims"] as const).map((resource) => ({
        resource: `resource.k8s.io/${resource}` as WatchedResource,
        sinceChart: "9.54.0",
        source: "kubernetes/autoscaler chart 9.54.0 clusterrole.yaml",
    })),
];

const versionParts = (version: string): number[] => version.split(".").map(Number);
/** a >= b for dotted versions. */
export const versionAtLeast = (a: string, b: string): boolean => {
    const [x, y] = [versionParts(a), versionParts(b)];
    const index = x.findIndex((part, i) => part !== y[i]);
    return index === -1 || x[index] > y[index];
};

/** What an autoscaler minor reads that its chart's ClusterRole does not grant: the rules to add to it. */
export function clusterAutoscalerMissingReads(kubernetesVersion: KubernetesVersion): WatchedResource[] {
    const minor = versionParts(kubernetesVersion)[1];
    const { chartVersion } = clusterAutoscalerReleases[kubernetesVersion];
    return autoscalerWatches
        .filter((watch) => minor >= watch.sinceMinor)
        .map((watch) => watch.resource)
        .filter((resource) => !clusterAutoscalerChartGrants.some((grant) => grant.resource === resource && versionAtLeast(chartVersion, grant.sinceChart)));
}

/** Read-only ClusterRole rules for resources, one rule per API group (the chart's `rbac.additionalRules`). */
export function readRules(resources: readonly WatchedResource[]): { apiGroups: string[]; resources: string[]; verbs: string[] }[] {
    const byGroup = new Map<string, string[]>();
    for (const resource of resources) {
        const [group, name] = resource.split("/");
        byGroup.set(group, [...(byGroup.get(group) ?? []), name]);
    }
    return [...byGroup].map(([group, names]) => ({ apiGroups: [group], resources: names, verbs: ["get", "list", "watch"] }));
}

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
                nodeSelector: context.nodeSelector,
                // The HPA reads through it: one replica down must not freeze scaling.
                replicas: 2,
                rules: { default: false, custom: adapterRules },
            },
        },
        context,
    );
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
    kubernetesVersion: KubernetesVersion;
    region: string;
    /** How long a GPU node stays unneeded before it is removed (minutes). */
    scaleDownUnneededMinutes: number;
    /** The server pod's terminationGracePeriodSeconds: scale-down evictions must leave it that long to drain. */
    podTerminationGracePeriodSeconds: number;
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
    const release = clusterAutoscalerReleases[args.kubernetesVersion];
    return installChart(
        "cluster-autoscaler",
        {
            releaseName: "cluster-autoscaler",
            chart: "cluster-autoscaler",
            version: release.chartVersion,
            repository: clusterAutoscalerRepository,
            namespace: "kube-system",
            values: {
                cloudProvider: "aws",
                awsRegion: args.region,
                autoDiscovery: { clusterName: args.clusterName },
                image: { tag: release.imageTag },
                rbac: {
                    serviceAccount: { create: true, name: autoscalerServiceAccount },
                    additionalRules: readRules(clusterAutoscalerMissingReads(args.kubernetesVersion)),
                },
                nodeSelector: context.nodeSelector,
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
                    // A scale-down eviction gives a pod at most this long: the server's whole drain must fit.
                    "max-graceful-termination-sec": args.podTerminationGracePeriodSeconds,
                },
            },
        },
        { ...context, dependsOn: [...context.dependsOn, association] },
    );
}
