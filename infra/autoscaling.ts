// Autoscaling: KEDA scales the service's pods on its load metrics in Prometheus (and to zero outside a stack's active
// hours), and Cluster Autoscaler adds GPU nodes (from zero) when new pods cannot be scheduled.
import * as k8s from "@pulumi/kubernetes";
import * as pulumi from "@pulumi/pulumi";
import { KubernetesVersion, ScalingMetric } from "./config";
import { AddonContext, installChart } from "./helm";
import { podIdentityForServiceAccount } from "./pod-identity";


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

/**
 * KEDA scales the service: its ScaledObject (infra/whisper.ts) drives an HPA from a Prometheus query, and unlike an
 * HPA it can take the Deployment to zero pods and back (a cron trigger brings it back on a schedule). Chart 2.20.2
 * (kedacore/charts release v2.20.2, app v2.20.2), tested by KEDA against Kubernetes 1.33 to 1.35.
 */
export const kedaChart = { chart: "keda", version: "2.20.2", repository: "https://kedacore.github.io/charts" };
export const kedaNamespace = "keda";

/**
 * Each scaling metric as one PromQL query over the whole service. KEDA's HPA divides it by the pod count (an
 * AverageValue target), so the target stays per pod. Gauges are averaged over a minute so that the HPA does not chase
 * single batches; only API calls count as requests (probes and scrapes are not traffic).
 */
export function scalingQuery(metric: ScalingMetric, namespace: string): string {
    const inNamespace = `namespace="${namespace}"`;
    switch (metric) {
        case "http_requests_per_second":
            return `sum(rate(http_requests_total{${inNamespace},route=~"/v1/audio/.*"}[2m]))`;
        case "whisper_requests_in_flight":
        case "whisper_queued_audio_seconds":
            return `sum(avg_over_time(${metric}{${inNamespace}}[1m]))`;
    }
}

/** A preferred (not required: dev has one system node) anti-affinity that keeps a KEDA component's replicas on different nodes. */
const onDifferentNodes = (app: string) => ({
    podAntiAffinity: {
        preferredDuringSchedulingIgnoredDuringExecution: [
            { weight: 100, podAffinityTerm: { labelSelector: { matchLabels: { app } }, topologyKey: "kubernetes.io/hostname" } },
        ],
    },
});

/**
 * KEDA runs two replicas of its operator and of its metrics server, and neither is active twice: the operator's
 * replicas elect a leader, and one metrics server serves external.metrics.k8s.io at a time (KEDA's "High
 * availability" docs, the chart's metricsServer.replicaCount). With the active one gone, the HPA cannot read the
 * metric and keeps the current pod count (no scaling on load, the ScaledObject's activation from zero stops with
 * the operator) until a standby takes over; the standbys, the PDBs (minAvailable 1) and the spread over nodes make
 * that a failover of seconds, not an outage of the autoscaler.
 */
export function installKeda(context: AddonContext): k8s.helm.v3.Release {
    return installChart(
        "keda",
        {
            releaseName: "keda",
            ...kedaChart,
            namespace: kedaNamespace,
            values: {
                nodeSelector: context.nodeSelector,
                operator: { replicaCount: 2, affinity: onDifferentNodes("keda-operator") },
                metricsServer: { replicaCount: 2, affinity: onDifferentNodes("keda-operator-metrics-apiserver") },
                podDisruptionBudget: { operator: { minAvailable: 1 }, metricServer: { minAvailable: 1 } },
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
