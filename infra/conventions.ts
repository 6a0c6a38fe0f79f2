// The cluster's scheduling conventions, shared by the nodes that carry them and the workloads that rely
// on them: which label marks a GPU node, the taint that keeps other pods off it, and where add-ons run.

/** Label every GPU node carries; the NVIDIA device plugin's chart schedules on it. */
export const gpuNodeLabel = { key: "nvidia.com/gpu.present", value: "true" } as const;
/** Taint that keeps everything but GPU workloads off GPU nodes. */
export const gpuTaint = { key: "nvidia.com/gpu", value: "true", effect: "NoSchedule" } as const;
/** Toleration for pods that belong on GPU nodes (the server, GPU DaemonSets). */
export const gpuToleration = { key: gpuTaint.key, operator: "Exists", effect: gpuTaint.effect } as const;
/** nodeSelector for pods that belong on GPU nodes. */
export const gpuNodeSelector = { [gpuNodeLabel.key]: gpuNodeLabel.value } as const;
/** Label naming a GPU node's GPU model (catalog.ts `accelerator`), set by the GPU NodePool. */
export const acceleratorLabelKey = "k8s.amazonaws.com/accelerator";
/** Tag by which Karpenter finds the subnets and security group of its nodes; its value is the cluster name. */
export const karpenterDiscoveryTagKey = "karpenter.sh/discovery";
/** Label of the node pool a node belongs to: `system` or `gpu`. */
export const nodePoolLabelKey = "whisper-eks/node-pool";
export type NodePool = "system" | "gpu";
/** nodeSelector for cluster add-ons, controllers and monitoring. */
export const systemNodeSelector = { [nodePoolLabelKey]: "system" } as const;
