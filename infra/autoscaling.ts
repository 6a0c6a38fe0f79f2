// Pod autoscaling: KEDA scales the service's pods on its load metrics in Prometheus (and to zero outside a stack's
// active hours). GPU nodes follow the pods: Karpenter (infra/karpenter.ts) launches one for a pod that cannot be scheduled.
import * as k8s from "@pulumi/kubernetes";
import { ScalingMetric } from "./config";
import { AddonContext, installChart } from "./helm";


/**
 * KEDA scales the service: its ScaledObject (infra/whisper.ts) drives an HPA from a Prometheus query, and unlike an
 * HPA it can take the Deployment to zero pods and back (a cron trigger brings it back on a schedule). Chart 2.20.2
 * (kedacore/charts release v2.20.2, app v2.20.2), tested by KEDA against Kubernetes 1.33 to 1.35.
 */
export const kedaChart = {
    chart: "keda",
    version: "2.20.2",
    repository: "https://kedacore.github.io/charts",
    // KEDA's Kubernetes compatibility table (kedacore/keda-docs, content/docs/2.20/operate/cluster.md).
    kubernetes: { min: "1.33", max: "1.35" },
};
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

/**
 * Live sessions open across the service (whisper_realtime_sessions, a gauge per pod), as a second trigger beside the
 * chosen metric: the HPA follows whichever asks for more pods. The minute's highest count, not its average, so a
 * burst of new sessions scales out before the pods refuse them (--max-realtime-sessions).
 */
export function realtimeSessionsQuery(namespace: string): string {
    return `sum(max_over_time(whisper_realtime_sessions{namespace="${namespace}"}[1m]))`;
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
