// The service's Grafana dashboard, loaded by the Grafana sidecar from a ConfigMap labelled grafana_dashboard=1.
// Written as code so the panels use the same metric names as the server and the alerts.
/** GPU memory used, as a fraction of the GPU's memory, per GPU (DCGM exporter metrics). */
export const gpuMemoryRatio = "DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE)";

interface Panel {
    title: string;
    unit: string;
    targets: { expr: string; legend: string }[];
}

/** The dashboard's panels, in reading order: traffic, speed, backlog, GPU. */
export function whisperPanels(namespace: string): Panel[] {
    const ns = `namespace="${namespace}"`;
    const api = `${ns},route=~"/v1/audio/.*"`;
    const quantile = (q: number) => `histogram_quantile(${q}, sum by (le) (rate(http_request_duration_seconds_bucket{${api}}[5m])))`;
    return [
        { title: "Requests per second by status", unit: "reqps", targets: [{ expr: `sum by (status) (rate(http_requests_total{${api}}[5m]))`, legend: "{{status}}" }] },
        {
            title: "Request latency",
            unit: "s",
            targets: [
                { expr: quantile(0.5), legend: "p50" },
                { expr: quantile(0.95), legend: "p95" },
                { expr: quantile(0.99), legend: "p99" },
            ],
        },
        {
            title: "RTFx (audio seconds transcribed per second of request time)",
            unit: "none",
            targets: [
                { expr: `sum(rate(whisper_audio_seconds_total{${ns}}[5m])) / sum(rate(http_request_duration_seconds_sum{${api}}[5m]))`, legend: "RTFx" },
                { expr: `sum by (pod) (rate(whisper_audio_seconds_total{${ns}}[5m]))`, legend: "audio s/s {{pod}}" },
            ],
        },
        {
            title: "In-flight requests and queued 30 s windows",
            unit: "none",
            targets: [
                { expr: `sum by (pod) (whisper_queue_depth{${ns}})`, legend: "queued windows {{pod}}" },
                { expr: `sum by (pod) (whisper_requests_in_flight{${ns}})`, legend: "in flight {{pod}}" },
            ],
        },
        { title: "Queued audio seconds", unit: "s", targets: [{ expr: `sum by (pod) (whisper_queued_audio_seconds{${ns}})`, legend: "{{pod}}" }] },
        {
            title: "Batch size",
            unit: "none",
            targets: [
                { expr: `sum(rate(whisper_batch_size_sum{${ns}}[5m])) / sum(rate(whisper_batch_size_count{${ns}}[5m]))`, legend: "mean" },
                { expr: `histogram_quantile(0.95, sum by (le) (rate(whisper_batch_size_bucket{${ns}}[5m])))`, legend: "p95" },
            ],
        },
        {
            title: "Live sessions and turn latency",
            unit: "none",
            targets: [
                { expr: `sum by (pod) (whisper_realtime_sessions{${ns}})`, legend: "sessions {{pod}}" },
                { expr: `histogram_quantile(0.95, sum by (le) (rate(whisper_realtime_turn_latency_seconds_bucket{${ns}}[5m])))`, legend: "turn latency p95 (s)" },
                { expr: `sum(rate(whisper_realtime_audio_seconds_total{${ns}}[5m]))`, legend: "live audio s/s" },
            ],
        },
        { title: "GPU utilisation", unit: "percent", targets: [{ expr: "DCGM_FI_DEV_GPU_UTIL", legend: "{{Hostname}} gpu {{gpu}}" }] },
        { title: "GPU memory used", unit: "percentunit", targets: [{ expr: gpuMemoryRatio, legend: "{{Hostname}} gpu {{gpu}}" }] },
        { title: "Ready replicas", unit: "none", targets: [{ expr: `kube_deployment_status_replicas_ready{${ns}}`, legend: "{{deployment}}" }] },
    ];
}

/** The Grafana dashboard model (schema 39), two panels per row. */
export function whisperDashboard(namespace: string): object {
    return {
        uid: "whisper-service",
        title: "Whisper service",
        tags: ["whisper"],
        schemaVersion: 39,
        refresh: "30s",
        time: { from: "now-6h", to: "now" },
        panels: whisperPanels(namespace).map((panel, index) => ({
            id: index + 1,
            type: "timeseries",
            title: panel.title,
            gridPos: { h: 8, w: 12, x: (index % 2) * 12, y: Math.floor(index / 2) * 8 },
            fieldConfig: { defaults: { unit: panel.unit }, overrides: [] },
            targets: panel.targets.map((target, targetIndex) => ({
                refId: String.fromCharCode(65 + targetIndex),
                expr: target.expr,
                legendFormat: target.legend,
            })),
        })),
    };
}
