// Metrics and alerts: kube-prometheus-stack on the system nodes, the DCGM exporter on the GPU nodes, the
// service's alert rules and its Grafana dashboard. The Prometheus URL is fixed so KEDA can find it.
import * as k8s from "@pulumi/kubernetes";
import * as pulumi from "@pulumi/pulumi";
import * as random from "@pulumi/random";
import { gpuNodeSelector, gpuToleration } from "./conventions";
import { gpuMemoryRatio, whisperDashboard } from "./dashboards/whisper";
import { AddonContext, installChart } from "./helm";

export const monitoringNamespace = "monitoring";
export const kubePrometheusStackChart = {
    chart: "kube-prometheus-stack",
    // Prometheus Operator v0.93; its Chart.yaml's kubeVersion is ">=1.25.0-0".
    version: "88.5.3",
    repository: "https://prometheus-community.github.io/helm-charts",
    kubernetes: { min: "1.25" },
};
/** Chart version = the exporter's own version (image 4.5.3-4.8.2: DCGM 4.5.3, exporter 4.8.2); kubeVersion ">= 1.19.0-0". */
export const dcgmExporterChart = {
    chart: "dcgm-exporter",
    version: "4.8.2",
    repository: "https://nvidia.github.io/dcgm-exporter/helm-charts",
    kubernetes: { min: "1.19" },
};

/** Release name and fullnameOverride: every object the chart makes, the Prometheus Service included, is named from it. */
export const kubePrometheusStackRelease = "kube-prometheus-stack";
export const prometheusUrl = `http://${kubePrometheusStackRelease}-prometheus.${monitoringNamespace}.svc`;
export const prometheusPort = 9090;
export const grafanaService = `${kubePrometheusStackRelease}-grafana`;
const grafanaAdminSecret = "grafana-admin";

export interface MonitoringArgs {
    /** The StorageClass of Prometheus' volume (gp3); the cluster's default class when absent. */
    prometheusStorageClassName?: pulumi.Input<string>;
    prometheusStorageGiB: number;
    prometheusRetentionDays: number;
    /** The Grafana admin password (a secret); generated when not given. */
    grafanaAdminPassword?: pulumi.Input<string>;
    /** Whether the cluster has GPU nodes whose DCGM metrics we collect (an existing cluster may bring its own exporter). */
    installDcgmExporter: boolean;
    alerts: ServiceAlertThresholds;
}

export interface ServiceAlertThresholds {
    /** The workload's namespace and Deployment. */
    namespace: string;
    deployment: string;
    /** The most unfinished requests a pod admits (WHISPER_QUEUE_SIZE): saturation is measured against it. */
    queueSize: number;
    p95LatencySeconds: number;
    errorRatio: number;
    /** p95 of a live turn's latency (speech stopped or commit to completed transcript), seconds. */
    realtimeTurnLatencyP95Seconds: number;
}

export interface Monitoring {
    release: k8s.helm.v3.Release;
    grafanaAdminPassword: pulumi.Output<string>;
    dcgmExporter?: k8s.helm.v3.Release;
    rules: k8s.apiextensions.CustomResource;
    dashboard: k8s.core.v1.ConfigMap;
}

export function installMonitoring(name: string, args: MonitoringArgs, context: AddonContext): Monitoring {
    const k8sOpts = { provider: context.provider, dependsOn: context.dependsOn };
    const namespace = new k8s.core.v1.Namespace(`${name}-monitoring`, { metadata: { name: monitoringNamespace } }, k8sOpts);

    const grafanaAdminPassword = pulumi.secret(
        args.grafanaAdminPassword ?? new random.RandomPassword(`${name}-grafana-admin`, { length: 24, special: false }).result,
    );
    // The password reaches Grafana through a Secret, never through the Helm release's values.
    const adminSecret = new k8s.core.v1.Secret(
        `${name}-grafana-admin`,
        {
            metadata: { name: grafanaAdminSecret, namespace: namespace.metadata.name },
            stringData: { "admin-user": "admin", "admin-password": grafanaAdminPassword },
        },
        { provider: context.provider },
    );

    const onSystemNodes = { nodeSelector: context.nodeSelector };
    const release = installChart(
        "kube-prometheus-stack",
        {
            releaseName: kubePrometheusStackRelease,
            ...kubePrometheusStackChart,
            namespace: monitoringNamespace,
            timeoutSeconds: 900,
            values: {
                fullnameOverride: kubePrometheusStackRelease,
                // EKS runs the control plane: these targets cannot be scraped, and their alerts would fire forever.
                kubeScheduler: { enabled: false },
                kubeControllerManager: { enabled: false },
                kubeEtcd: { enabled: false },
                kubeProxy: { enabled: false },
                defaultRules: {
                    rules: { etcd: false, kubeSchedulerAlerting: false, kubeSchedulerRecording: false, kubeControllerManager: false, kubeProxy: false },
                },
                prometheusOperator: { ...onSystemNodes, admissionWebhooks: { patch: onSystemNodes } },
                prometheus: {
                    prometheusSpec: {
                        ...onSystemNodes,
                        // Select every ServiceMonitor, PodMonitor, Probe and rule, not only those labelled with this release.
                        serviceMonitorSelectorNilUsesHelmValues: false,
                        podMonitorSelectorNilUsesHelmValues: false,
                        probeSelectorNilUsesHelmValues: false,
                        ruleSelectorNilUsesHelmValues: false,
                        retention: `${args.prometheusRetentionDays}d`,
                        storageSpec: {
                            volumeClaimTemplate: {
                                spec: {
                                    storageClassName: args.prometheusStorageClassName,
                                    accessModes: ["ReadWriteOnce"],
                                    resources: { requests: { storage: `${args.prometheusStorageGiB}Gi` } },
                                },
                            },
                        },
                    },
                },
                alertmanager: { alertmanagerSpec: onSystemNodes },
                "kube-state-metrics": onSystemNodes,
                grafana: {
                    ...onSystemNodes,
                    admin: { existingSecret: grafanaAdminSecret, userKey: "admin-user", passwordKey: "admin-password" },
                    sidecar: { dashboards: { enabled: true, label: "grafana_dashboard", labelValue: "1", searchNamespace: "ALL" } },
                },
            },
        },
        { ...context, dependsOn: [...context.dependsOn, adminSecret] },
    );
    // Objects of the CRDs the chart installs wait for it.
    const afterCrds = { ...context, dependsOn: [release] };

    const dcgmExporter = args.installDcgmExporter
        ? installChart(
              "dcgm-exporter",
              {
                  releaseName: "dcgm-exporter",
                  ...dcgmExporterChart,
                  namespace: monitoringNamespace,
                  values: {
                      // The chart's defaults neither tolerate the GPU taint nor select GPU nodes.
                      nodeSelector: gpuNodeSelector,
                      tolerations: [gpuToleration],
                      // The chart's defaults, stated: the GPU node's DaemonSet reserve (infra/catalog.ts) counts them.
                      resources: { requests: { cpu: "100m", memory: "128Mi" }, limits: { cpu: "200m", memory: "512Mi" } },
                      serviceMonitor: { enabled: true, interval: "15s", honorLabels: false },
                  },
              },
              afterCrds,
          )
        : undefined;

    const rules = new k8s.apiextensions.CustomResource(
        `${name}-whisper-rules`,
        {
            apiVersion: "monitoring.coreos.com/v1",
            kind: "PrometheusRule",
            metadata: { name: "whisper", namespace: monitoringNamespace, labels: { "app.kubernetes.io/name": "whisper" } },
            spec: { groups: serviceAlertGroups(args.alerts) },
        },
        afterCrds,
    );
    const dashboard = new k8s.core.v1.ConfigMap(
        `${name}-whisper-dashboard`,
        {
            metadata: { name: "whisper-dashboard", namespace: namespace.metadata.name, labels: { grafana_dashboard: "1" } },
            data: { "whisper.json": JSON.stringify(whisperDashboard(args.alerts.namespace), null, 2) },
        },
        { provider: context.provider },
    );
    return { release, grafanaAdminPassword, dcgmExporter, rules, dashboard };
}

/** How long a new XID error keeps its alert firing. */
export const xidWindow = "15m";

/** The alert rules: what an operator of the service is paged for. */
export function serviceAlertGroups(t: ServiceAlertThresholds): object[] {
    const inNamespace = `namespace="${t.namespace}"`;
    const api = `${inNamespace},route=~"/v1/audio/.*"`;
    const alert = (name: string, expr: string, forDuration: string, severity: string, summary: string) => ({
        alert: name,
        expr,
        for: forDuration,
        labels: { severity, service: "whisper" },
        annotations: { summary },
    });
    return [
        {
            name: "whisper.gpu",
            rules: [
                // PyTorch's caching allocator keeps memory high when idle: this alone is a warning, held for 5 minutes.
                alert("WhisperGpuMemoryHigh", `${gpuMemoryRatio} > 0.9`, "5m", "warning", "GPU {{ $labels.gpu }} on {{ $labels.Hostname }} has used more than 90% of its memory for 5 minutes."),
                // The companion signals that turn high memory into a real problem. DCGM_FI_DEV_XID_ERRORS holds the last
                // XID seen (a gauge, never reset): a new error is a change of it, and the alert ends a window after.
                alert(
                    "WhisperGpuXidError",
                    `max by (Hostname, gpu) (DCGM_FI_DEV_XID_ERRORS > 0 and changes(DCGM_FI_DEV_XID_ERRORS[${xidWindow}]) > 0)`,
                    "0m",
                    "critical",
                    `GPU {{ $labels.gpu }} on {{ $labels.Hostname }} reported XID error {{ $value }} in the last ${xidWindow}: the driver saw a GPU fault.`,
                ),
                alert(
                    "WhisperGpuMemoryExhausted",
                    `(max(${gpuMemoryRatio}) > 0.9) and on() (sum(rate(http_requests_total{${api},status=~"5.."}[5m])) > 0)`,
                    "5m",
                    "critical",
                    "GPU memory is above 90% while the service answers with server errors: likely out-of-memory failures; lower maxBatchSize or use a larger GPU.",
                ),
            ],
        },
        {
            name: "whisper.service",
            rules: [
                alert(
                    "WhisperHighErrorRatio",
                    `sum(rate(http_requests_total{${api},status=~"5.."}[5m])) / sum(rate(http_requests_total{${api}}[5m])) > ${t.errorRatio}`,
                    "10m",
                    "critical",
                    `More than ${t.errorRatio * 100}% of transcription requests fail with a 5xx status.`,
                ),
                alert(
                    "WhisperHighLatencyP95",
                    `histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket{${api}}[10m]))) > ${t.p95LatencySeconds}`,
                    "15m",
                    "warning",
                    `95th percentile transcription latency is above ${t.p95LatencySeconds} s.`,
                ),
                alert(
                    "WhisperRealtimeTurnLatencyP95",
                    // No live turn in the window: the division is empty and the alert stays quiet.
                    `histogram_quantile(0.95, sum by (le) (rate(whisper_realtime_turn_latency_seconds_bucket{${inNamespace}}[5m]))) > ${t.realtimeTurnLatencyP95Seconds}`,
                    "10m",
                    "warning",
                    `95th percentile live turn latency (speech stopped to completed transcript) is above ${t.realtimeTurnLatencyP95Seconds} s: captions lag behind speech. Check GPU load (whisper_batch_size) and that KEDA can add pods.`,
                ),
                alert(
                    "WhisperQueueSaturated",
                    // The server admits at most queueSize unfinished requests; beyond that it answers 503.
                    `max by (pod) (whisper_requests_in_flight{${inNamespace}}) / ${t.queueSize} > 0.8`,
                    "5m",
                    "warning",
                    "Pod {{ $labels.pod }} holds more than 80% of the requests it admits: new requests will soon be refused with 503. Check that KEDA and Karpenter can add capacity (kubectl get nodeclaims).",
                ),
                alert(
                    "WhisperPodsNotReady",
                    `kube_deployment_status_replicas_ready{${inNamespace},deployment="${t.deployment}"} < kube_deployment_spec_replicas{${inNamespace},deployment="${t.deployment}"}`,
                    "15m",
                    "warning",
                    "Some whisper pods have not been ready for 15 minutes (pending GPU capacity, image pull or model download).",
                ),
            ],
        },
    ];
}
