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

export function installKeda(context: AddonContext): k8s.helm.v3.Release {
    return installChart(
        "keda",
        {
            releaseName: "keda",
            ...kedaChart,
            namespace: kedaNamespace,
            values: {
                nodeSelector: context.nodeSelector,
                // The HPA reads through its metrics server: one replica down must not freeze scaling.
                metricsServer: { replicaCount: 2 },
            },
        },
        context,
    );
}
