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
    /**
     * Network interfaces of the default network card and IPv4 addresses per interface: the VPC CNI's pod limit, which
     * is the node's max pods on AL2023 and in Karpenter's estimate (aws/karpenter-provider-aws,
     * pkg/providers/instancetype/zz_generated.vpclimits.go; AWS's eni-max-pods.txt gives the same max pods).
     */
    networkInterfaces: number;
    ipv4PerInterface: number;
}

const t4 = { gpuModel: "NVIDIA T4", accelerator: "nvidia-tesla-t4", karpenterGpuName: "t4", gpuMemoryGiB: 16, computeCapability: 7.5 };
const a10g = { gpuModel: "NVIDIA A10G", accelerator: "nvidia-a10g", karpenterGpuName: "a10g", gpuMemoryGiB: 24, computeCapability: 8.6 };
const l4 = { gpuModel: "NVIDIA L4", accelerator: "nvidia-l4", karpenterGpuName: "l4", gpuMemoryGiB: 24, computeCapability: 8.9 };
const l40s = { gpuModel: "NVIDIA L40S", accelerator: "nvidia-l40s", karpenterGpuName: "l40s", gpuMemoryGiB: 48, computeCapability: 8.9 };
const a100 = { gpuModel: "NVIDIA A100", accelerator: "nvidia-tesla-a100", karpenterGpuName: "a100", gpuMemoryGiB: 40, computeCapability: 8.0 };
const h100 = { gpuModel: "NVIDIA H100", accelerator: "nvidia-h100", karpenterGpuName: "h100", gpuMemoryGiB: 80, computeCapability: 9.0 };

/** Figures from the AWS EC2 accelerated-computing instance specifications; network limits as networkInterfaces says. */
export const gpuInstanceTypes: Readonly<Record<string, GpuInstanceType>> = {
    "g4dn.xlarge": { ...t4, gpuCount: 1, vcpu: 4, memoryGiB: 16, networkInterfaces: 3, ipv4PerInterface: 10 },
    "g4dn.2xlarge": { ...t4, gpuCount: 1, vcpu: 8, memoryGiB: 32, networkInterfaces: 3, ipv4PerInterface: 10 },
    "g4dn.12xlarge": { ...t4, gpuCount: 4, vcpu: 48, memoryGiB: 192, networkInterfaces: 8, ipv4PerInterface: 30 },
    "g5.xlarge": { ...a10g, gpuCount: 1, vcpu: 4, memoryGiB: 16, networkInterfaces: 4, ipv4PerInterface: 15 },
    "g5.2xlarge": { ...a10g, gpuCount: 1, vcpu: 8, memoryGiB: 32, networkInterfaces: 4, ipv4PerInterface: 15 },
    "g5.4xlarge": { ...a10g, gpuCount: 1, vcpu: 16, memoryGiB: 64, networkInterfaces: 8, ipv4PerInterface: 30 },
    "g5.12xlarge": { ...a10g, gpuCount: 4, vcpu: 48, memoryGiB: 192, networkInterfaces: 15, ipv4PerInterface: 50 },
    "g5.48xlarge": { ...a10g, gpuCount: 8, vcpu: 192, memoryGiB: 768, networkInterfaces: 7, ipv4PerInterface: 50 },
    "g6.xlarge": { ...l4, gpuCount: 1, vcpu: 4, memoryGiB: 16, networkInterfaces: 4, ipv4PerInterface: 15 },
    "g6.2xlarge": { ...l4, gpuCount: 1, vcpu: 8, memoryGiB: 32, networkInterfaces: 4, ipv4PerInterface: 15 },
    "g6.4xlarge": { ...l4, gpuCount: 1, vcpu: 16, memoryGiB: 64, networkInterfaces: 8, ipv4PerInterface: 30 },
    "g6.12xlarge": { ...l4, gpuCount: 4, vcpu: 48, memoryGiB: 192, networkInterfaces: 8, ipv4PerInterface: 30 },
    "g6e.xlarge": { ...l40s, gpuCount: 1, vcpu: 4, memoryGiB: 32, networkInterfaces: 4, ipv4PerInterface: 15 },
    "g6e.2xlarge": { ...l40s, gpuCount: 1, vcpu: 8, memoryGiB: 64, networkInterfaces: 4, ipv4PerInterface: 15 },
    "g6e.12xlarge": { ...l40s, gpuCount: 4, vcpu: 48, memoryGiB: 384, networkInterfaces: 10, ipv4PerInterface: 30 },
    "p4d.24xlarge": { ...a100, gpuCount: 8, vcpu: 96, memoryGiB: 1152, networkInterfaces: 15, ipv4PerInterface: 50 },
    "p5.48xlarge": { ...h100, gpuCount: 8, vcpu: 192, memoryGiB: 2048, networkInterfaces: 2, ipv4PerInterface: 50 },
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
export function requiredGpuMemoryGiB(modelId: string, dtype: Dtype, maxBatchSize: number, beamSize = 1): number {
    const perItemGiB = whisperModels[modelId].perItemGiB16Bit * (bytesPerParameter[dtype] / 2) * beamCacheFactor(beamSize);
    return weightsGiB(modelId, dtype) + perItemGiB * maxBatchSize + gpuMemoryHeadroomGiB;
}

/**
 * A slot's KV cache with `beamSize` beams over its cache with one: every beam has its own self-attention cache over
 * the decoder's 448 positions, while the cross-attention K/V over the encoder's 1500 frames is the window's, shared.
 */
export const beamCacheFactor = (beamSize: number): number => (beamSize * 448 + 1500) / (448 + 1500);

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
 * Karpenter's share of a node's memory it assumes the hypervisor keeps (its `vmMemoryOverheadPercent` setting, whose
 * chart default we keep): it launches a node only for pods that fit what is left.
 */
export const karpenterVmMemoryOverheadPercent = 0.075;

/** Max pods of a node of the type: the VPC CNI's ENI limit, interfaces x (addresses per interface - 1) + 2. */
export const eniLimitedMaxPods = (type: GpuInstanceType): number => type.networkInterfaces * (type.ipv4PerInterface - 1) + 2;

/**
 * Karpenter's estimate of what a node of the type can give pods, before it launches one (aws/karpenter-provider-aws
 * pkg/providers/instancetype/types.go: memory(), kubeReservedResources(), evictionThreshold()): memory less the VM
 * overhead, less kube-reserved (11 MiB per max pod + 255 MiB) and the 100 MiB hard-eviction threshold; CPU less
 * kube-reserved (6% of the first core, 1% of the second, 0.5% of the next two, 0.25% of the rest). A pod that does not
 * fit this estimate never gets a node, however much the real node would have had.
 */
export function karpenterAllocatable(type: GpuInstanceType): { cpuMillicores: number; memoryMiB: number } {
    const memoryMiB = type.memoryGiB * 1024;
    const vmOverheadMiB = Math.ceil(memoryMiB * karpenterVmMemoryOverheadPercent);
    const kubeReservedMiB = 11 * eniLimitedMaxPods(type) + 255;
    const evictionMiB = 100;
    const cpuMillicores = type.vcpu * 1000;
    const cpuShares = [
        { from: 0, to: 1000, share: 0.06 },
        { from: 1000, to: 2000, share: 0.01 },
        { from: 2000, to: 4000, share: 0.005 },
        { from: 4000, to: Infinity, share: 0.0025 },
    ];
    const kubeReservedCpu = cpuShares
        .filter(({ from }) => cpuMillicores >= from)
        .reduce((sum, { from, to, share }) => sum + Math.floor((Math.min(cpuMillicores, to) - from) * share), 0);
    return { cpuMillicores: cpuMillicores - kubeReservedCpu, memoryMiB: memoryMiB - vmOverheadMiB - kubeReservedMiB - evictionMiB };
}

/**
 * CPU and memory requests for one server pod per GPU that always fit the given instance types: Karpenter's estimate
 * of allocatable capacity (karpenterAllocatable) less the DaemonSets, divided by the GPU count, on the smallest type.
 * Rounded down to 100 millicores and 256 MiB.
 */
export function podResourcesPerGpu(instanceTypes: readonly string[]): PodResources {
    const perType = instanceTypes.map((name) => {
        const type = gpuInstanceTypes[name];
        if (!type) throw new Error(`unknown GPU instance type ${name}`);
        const allocatable = karpenterAllocatable(type);
        const cpu = allocatable.cpuMillicores - gpuNodeDaemonSetReserve.cpuMillicores;
        const memory = allocatable.memoryMiB - gpuNodeDaemonSetReserve.memoryMiB;
        return {
            cpuMillicores: Math.floor(cpu / type.gpuCount / 100) * 100,
            memoryMiB: Math.floor(memory / type.gpuCount / 256) * 256,
        };
    });
    const cpuMillicores = Math.min(...perType.map((r) => r.cpuMillicores));
    const memoryMiB = Math.min(...perType.map((r) => r.memoryMiB));
    return { cpuMillicores, memoryMiB, cpu: `${cpuMillicores}m`, memory: `${memoryMiB}Mi` };
}
