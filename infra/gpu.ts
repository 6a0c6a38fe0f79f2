// The NVIDIA device plugin: advertises nvidia.com/gpu on GPU nodes. AL2023 NVIDIA AMIs carry the driver and
// container toolkit but not the plugin; without it every GPU pod stays Pending.
import * as k8s from "@pulumi/kubernetes";
import { gpuNodeLabel, gpuToleration } from "./conventions";
import { AddonContext, installChart } from "./helm";

export const nvidiaDevicePluginChart = {
    chart: "nvidia-device-plugin",
    version: "0.18.0",
    repository: "https://nvidia.github.io/k8s-device-plugin",
    // Its Chart.yaml's kubeVersion: ">= 1.10.0-0".
    kubernetes: { min: "1.10" },
};

/** Node affinity for DaemonSets that belong on every GPU node, and only there. */
export const gpuNodeAffinity = {
    nodeAffinity: {
        requiredDuringSchedulingIgnoredDuringExecution: {
            nodeSelectorTerms: [{ matchExpressions: [{ key: gpuNodeLabel.key, operator: "In", values: [gpuNodeLabel.value] }] }],
        },
    },
};

export function installNvidiaDevicePlugin(context: AddonContext): k8s.helm.v3.Release {
    return installChart(
        "nvidia-device-plugin",
        {
            releaseName: "nvidia-device-plugin",
            ...nvidiaDevicePluginChart,
            namespace: "kube-system",
            values: {
                // Explicit rather than the chart's default (NFD labels or the same label), so a chart
                // upgrade cannot silently stop the plugin from landing on our nodes.
                affinity: gpuNodeAffinity,
                tolerations: [gpuToleration, { key: "CriticalAddonsOnly", operator: "Exists" }],
                priorityClassName: "system-node-critical",
                resources: { requests: { cpu: "50m", memory: "64Mi" }, limits: { memory: "256Mi" } },
                // Fail loudly when the driver is missing instead of advertising zero GPUs.
                failOnInitError: true,
            },
        },
        context,
    );
}
