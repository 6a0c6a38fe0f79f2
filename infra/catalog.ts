// What the program knows about GPU instance types and Whisper models: used to validate stack config
// and to size pods so that one pod per GPU always fits its node.

export interface GpuInstanceType {
    gpuModel: string;
    /**
     * The node label `k8s.amazonaws.com/accelerator`'s value for this GPU (names as in Kubernetes' autoscaler list of
     * GPU types): the GPU NodePool puts it on its nodes, so dashboards and selectors can tell GPU models apart.
     */
    accelerator: string;
    /** The GPU's name as Karpenter's `karpenter.k8s.aws/instance-gpu-name` label gives it (from EC2's DescribeInstanceTypes). */
    karpenterGpuName: string;
    gpuCount: number;
    /** Memory of one GPU, GiB. */
    gpuMemoryGiB: number;
    /** CUDA compute capability, e.g. 8.6. bfloat16 needs 8.0 or more (Ampere). */
    computeCapability: number;
    vcpu: number;
    /** Host memory, GiB. */
    memoryGiB: number;
}

const t4 = { gpuModel: "NVIDIA T4", accelerator: "nvidia-tesla-t4", karpenterGpuName: "t4", gpuMemoryGiB: 16, computeCapability: 7.5 };
const a10g = { gpuModel: "NVIDIA A10G", accelerator: "nvidia-a10g", karpenterGpuName: "a10g", gpuMemoryGiB: 24, computeCapability: 8.6 };
const l4 = { gpuModel: "NVIDIA L4", accelerator: "nvidia-l4", karpenterGpuName: "l4", gpuMemoryGiB: 24, computeCapability: 8.9 };
const l40s = { gpuModel: "NVIDIA L40S", accelerator: "nvidia-l40s", karpenterGpuName: "l40s", gpuMemoryGiB: 48, computeCapability: 8.9 };
const a100 = { gpuModel: "NVIDIA A100", accelerator: "nvidia-tesla-a100", karpenterGpuName: "a100", gpuMemoryGiB: 40, computeCapability: 8.0 };
const h100 = { gpuModel: "NVIDIA H100", accelerator: "nvidia-h100", karpenterGpuName: "h100", gpuMemoryGiB: 80, computeCapability: 9.0 };

/** Figures from the AWS EC2 accelerated-computing instance specifications. */
export const gpuInstanceTypes: Readonly<Record<string, GpuInstanceType>> = {
    "g4dn.xlarge": { ...t4, gpuCount: 1, vcpu: 4, memoryGiB: 16 },
    "g4dn.2xlarge": { ...t4, gpuCount: 1, vcpu: 8, memoryGiB: 32 },
    "g4dn.12xlarge": { ...t4, gpuCount: 4, vcpu: 48, memoryGiB: 192 },
    "g5.xlarge": { ...a10g, gpuCount: 1, vcpu: 4, memoryGiB: 16 },
    "g5.2xlarge": { ...a10g, gpuCount: 1, vcpu: 8, memoryGiB: 32 },
    "g5.4xlarge": { ...a10g, gpuCount: 1, vcpu: 16, memoryGiB: 64 },
    "g5.12xlarge": { ...a10g, gpuCount: 4, vcpu: 48, memoryGiB: 192 },
    "g5.48xlarge": { ...a10g, gpuCount: 8, vcpu: 192, memoryGiB: 768 },
    "g6.xlarge": { ...l4, gpuCount: 1, vcpu: 4, memoryGiB: 16 },
    "g6.2xlarge": { ...l4, gpuCount: 1, vcpu: 8, memoryGiB: 32 },
    "g6.4xlarge": { ...l4, gpuCount: 1, vcpu: 16, memoryGiB: 64 },
    "g6.12xlarge": { ...l4, gpuCount: 4, vcpu: 48, memoryGiB: 192 },
    "g6e.xlarge": { ...l40s, gpuCount: 1, vcpu: 4, memoryGiB: 32 },
    "g6e.2xlarge": { ...l40s, gpuCount: 1, vcpu: 8, memoryGiB: 64 },
    "g6e.12xlarge": { ...l40s, gpuCount: 4, vcpu: 48, memoryGiB: 384 },
    "p4d.24xlarge": { ...a100, gpuCount: 8, vcpu: 96, memoryGiB: 1152 },
    "p5.48xlarge": { ...h100, gpuCount: 8, vcpu: 192, memoryGiB: 2048 },
};

export type Dtype = "float16" | "bfloat16" | "float32";
export const dtypes: readonly Dtype[] = ["float16", "bfloat16", "float32"];
const bytesPerParameter: Record<Dtype, number> = { float16: 2, bfloat16: 2, float32: 4 };

export interface WhisperModel {
    /** Parameters, billions. */
    parametersBillions: number;
    /**
     * GPU memory one batch item needs at 16-bit precision, GiB: the encoder's activations for a 30 s window
     * plus the decoder's key/value cache for 448 tokens with beam size 1, rounded up. Doubles at float32.
     */
    perItemGiB16Bit: number;
}

export const whisperModels: Readonly<Record<string, WhisperModel>> = {
    "openai/whisper-large-v3": { parametersBillions: 1.55, perItemGiB16Bit: 0.5 },
    "openai/whisper-large-v3-turbo": { parametersBillions: 0.81, perItemGiB16Bit: 0.35 },
    "openai/whisper-medium": { parametersBillions: 0.77, perItemGiB16Bit: 0.3 },
    "openai/whisper-small": { parametersBillions: 0.24, perItemGiB16Bit: 0.15 },
    "openai/whisper-base": { parametersBillions: 0.074, perItemGiB16Bit: 0.08 },
    "openai/whisper-tiny": { parametersBillions: 0.039, perItemGiB16Bit: 0.05 },
};

/** CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation, GiB. */
export const gpuMemoryHeadroomGiB = 2;

/**
 * GPU memory the server needs, GiB: weights at the dtype, plus one activation/KV budget per batch item,
 * plus fixed headroom. Deliberately simple and on the safe side; a GPU with less is refused.
 */
export function requiredGpuMemoryGiB(modelId: string, dtype: Dtype, maxBatchSize: number): number {
    const perItemGiB = whisperModels[modelId].perItemGiB16Bit * (bytesPerParameter[dtype] / 2);
    return weightsGiB(modelId, dtype) + perItemGiB * maxBatchSize + gpuMemoryHeadroomGiB;
}

/** The model's weights at a dtype, GiB. */
const weightsGiB = (modelId: string, dtype: Dtype): number => (whisperModels[modelId].parametersBillions * 1e9 * bytesPerParameter[dtype]) / 2 ** 30;

/**
 * Host memory of the Python processes, GiB, before any audio: the HTTP process and the engine process with torch and
 * the CUDA libraries it maps (their runtime, cuBLAS and cuDNN host-side state).
 */
export const serverRuntimeHostMemoryGiB = 2.5;

/**
 * Host memory the server needs besides the audio it holds, GiB: its processes, and the model's weights, which
 * from_pretrained reads into host memory before moving them to the GPU (3 GB for large-v3 in float16). An estimate,
 * on the safe side: the load's peak counts as if it lasted.
 */
export const serverHostMemoryGiB = (modelId: string, dtype: Dtype): number => serverRuntimeHostMemoryGiB + weightsGiB(modelId, dtype);

/** GPUs on each node of the pool (all its types have the same count; load-config.ts checks). */
export const gpusPerNode = (instanceTypes: readonly string[]): number => gpuInstanceTypes[instanceTypes[0]]?.gpuCount ?? 1;

/** The most server pods (one per GPU) the GPU NodePool can hold at its limit. */
export const maxGpuPods = (pool: { instanceTypes: readonly string[]; maxNodes: number }): number => pool.maxNodes * gpusPerNode(pool.instanceTypes);

/** Smallest compute capability with native bfloat16 (Ampere). */
export const bfloat16MinComputeCapability = 8.0;

/**
 * What the DaemonSets on every GPU node request together (aws-node, kube-proxy, EBS and EFS CSI node plugins,
 * Pod Identity agent, NVIDIA device plugin, DCGM exporter, node exporter), with room to spare.
 */
export const gpuNodeDaemonSetReserve = { cpuMillicores: 600, memoryMiB: 1536 };

export interface PodResources {
    cpuMillicores: number;
    memoryMiB: number;
    /** Kubernetes quantities, ready for a container's `resources.requests`. */
    cpu: string;
    memory: string;
}

/**
 * CPU reserved for kubelet and the system on an EKS node, millicores: 6% of the first core, 1% of the second,
 * 0.5% of the third and fourth, 0.25% of every further core (the formula of the EKS AMIs).
 */
function kubeReservedCpuMillicores(vcpu: number): number {
    const shares = [60, 10, 5, 5];
    let reserved = 0;
    for (let core = 0; core < vcpu; core++) reserved += core < shares.length ? shares[core] : 2.5;
    return Math.ceil(reserved);
}

/**
 * Memory reserved for kubelet and the system, MiB: 255 MiB + 11 MiB per pod (the EKS AMIs' formula), counted for
 * 110 pods (250 on nodes with more than 30 vCPUs), plus the 100 MiB hard-eviction threshold.
 */
function kubeReservedMemoryMiB(vcpu: number): number {
    const maxPods = vcpu > 30 ? 250 : 110;
    return 255 + 11 * maxPods + 100;
}

/**
 * CPU and memory requests for one server pod per GPU that always fit the given instance types: allocatable
 * capacity after the kubelet/system reserve and the DaemonSets, divided by the GPU count, on the smallest type.
 * Rounded down to 100 millicores and 256 MiB.
 */
export function podResourcesPerGpu(instanceTypes: readonly string[]): PodResources {
    const perType = instanceTypes.map((name) => {
        const type = gpuInstanceTypes[name];
        if (!type) throw new Error(`unknown GPU instance type ${name}`);
        const cpu = type.vcpu * 1000 - kubeReservedCpuMillicores(type.vcpu) - gpuNodeDaemonSetReserve.cpuMillicores;
        const memory = type.memoryGiB * 1024 - kubeReservedMemoryMiB(type.vcpu) - gpuNodeDaemonSetReserve.memoryMiB;
        return {
            cpuMillicores: Math.floor(cpu / type.gpuCount / 100) * 100,
            memoryMiB: Math.floor(memory / type.gpuCount / 256) * 256,
        };
    });
    const cpuMillicores = Math.min(...perType.map((r) => r.cpuMillicores));
    const memoryMiB = Math.min(...perType.map((r) => r.memoryMiB));
    return { cpuMillicores, memoryMiB, cpu: `${cpuMillicores}m`, memory: `${memoryMiB}Mi` };
}
