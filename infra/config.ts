// The stack's configuration, read and validated once: the only code that reads pulumi.Config.
// Every problem is collected and reported together, before any resource is declared.
import * as pulumi from "@pulumi/pulumi";
import {
    bfloat16MinComputeCapability,
    Dtype,
    dtypes,
    gpuInstanceTypes,
    requiredGpuMemoryGiB,
    whisperModels,
} from "./catalog";
import { ScalingMetric, scalingMetrics } from "./autoscaling";
import { ModelCacheStorage, modelCacheStorages } from "./model-cache";
import { LoadBalancerScheme, loadBalancerSchemes } from "./whisper";

export const projectName = "whisper-eks";

export type CapacityType = "ON_DEMAND" | "SPOT";
export const capacityTypes: readonly CapacityType[] = ["ON_DEMAND", "SPOT"];
export type NatGatewayStrategy = "Single" | "OnePerAz";
export const natGatewayStrategies: readonly NatGatewayStrategy[] = ["Single", "OnePerAz"];

export interface NodeGroupScaling {
    minSize: number;
    desiredSize: number;
    maxSize: number;
}

export interface NetworkConfig {
    vpcCidr: string;
    availabilityZoneCount: number;
    natGatewayStrategy: NatGatewayStrategy;
}

export interface ClusterConfig {
    /** Cluster name: `<project>-<stack>`. */
    name: string;
    kubernetesVersion: string;
    adminRoleArns: string[];
    publicAccessCidrs: string[];
    systemNodes: NodeGroupScaling & { instanceTypes: string[] };
}

export interface GpuNodeGroupConfig extends NodeGroupScaling {
    /** Node group name inside the stack, e.g. `gpu`. */
    name: string;
    instanceTypes: string[];
    capacityType: CapacityType;
    diskSizeGiB: number;
}

export interface GpuConfig {
    nodeGroups: GpuNodeGroupConfig[];
}

export interface ImageConfig {
    /** A prebuilt image pinned by digest; when set, nothing is built and no repository is made. */
    prebuiltReference?: string;
    repositoryForceDelete: boolean;
}

export interface ServiceConfig {
    modelId: string;
    dtype: Dtype;
    maxBatchSize: number;
}

/** The server's settings beyond the model (WHISPER_* environment), its API key and its model cache. */
export interface WorkloadConfig {
    batchWaitMs: number;
    maxUploadMb: number;
    maxAudioSeconds: number;
    queueSize: number;
    requestTimeoutSeconds: number;
    /** Set as secret config; when absent and required, the program generates one. */
    apiKey?: pulumi.Output<string>;
    requireApiKey: boolean;
    modelCacheStorage: ModelCacheStorage;
    modelCacheSizeGiB: number;
    /** An existing StorageClass for the cache (existing-cluster mode): nothing is created for it. */
    modelCacheStorageClass?: string;
}

export interface TrafficConfig {
    scheme: LoadBalancerScheme;
    sourceRanges: string[];
    certificateArn?: string;
    allowUnauthenticatedPublicAccess: boolean;
}

export interface MonitoringConfig {
    prometheusRetentionDays: number;
    prometheusStorageGiB: number;
    grafanaAdminPassword?: pulumi.Output<string>;
    alertP95LatencySeconds: number;
    alertErrorRatio: number;
}

export interface AutoscalingConfig {
    minReplicas: number;
    maxReplicas: number;
    metric: ScalingMetric;
    /** The per-pod target of the chosen metric (from the key for that metric). */
    targetAverageValue: number;
    clusterAutoscalerScaleDownMinutes: number;
}

export interface StackConfig {
    project: string;
    stack: string;
    region: string;
    /** Tags on every AWS resource that takes them. */
    tags: Record<string, string>;
    network: NetworkConfig;
    cluster: ClusterConfig;
    gpu: GpuConfig;
    image: ImageConfig;
    service: ServiceConfig;
    workload: WorkloadConfig;
    traffic: TrafficConfig;
    monitoring: MonitoringConfig;
    autoscaling: AutoscalingConfig;
    /** A kubeconfig (secret) of a cluster to deploy into instead of creating VPC and EKS. */
    existingClusterKubeconfig?: pulumi.Output<string>;
}

/** A bad stack configuration. Pulumi prints a RunError's message alone, without a stack trace. */
export class ConfigError extends pulumi.RunError {
    constructor(readonly problems: readonly string[]) {
        super(
            `The stack configuration is invalid (${problems.length} problem${problems.length === 1 ? "" : "s"}); ` +
                `no resource was declared:\n` +
                problems.map((problem) => `  - ${problem}`).join("\n"),
        );
        this.name = "ConfigError";
    }
}

const show = (value: unknown): string => (typeof value === "string" ? `"${value}"` : JSON.stringify(value));

/** Reads typed values from one config namespace and collects what is wrong with them. */
export class ConfigReader {
    readonly problems: string[] = [];
    private readonly config: pulumi.Config;

    constructor(readonly namespace: string = projectName) {
        this.config = new pulumi.Config(namespace);
    }

    /** Records a problem: the full key, the bad value and what is allowed. */
    problem(key: string, value: unknown, allowed: string): void {
        this.problems.push(`${this.namespace}:${key} = ${show(value)}: ${allowed}`);
    }

    throwIfProblems(): void {
        if (this.problems.length > 0) throw new ConfigError(this.problems);
    }

    private raw(key: string): string | undefined {
        const value = this.config.get(key);
        if (value === undefined) {
            this.problems.push(`${this.namespace}:${key} is not set: it is required (Pulumi.yaml declares its default)`);
        }
        return value;
    }

    string(key: string, check: { allowed?: readonly string[]; pattern?: RegExp; describe?: string } = {}): string {
        const value = this.raw(key) ?? "";
        if (check.allowed && !check.allowed.includes(value)) {
            this.problem(key, value, `allowed values are ${check.allowed.map(show).join(", ")}`);
        } else if (check.pattern && !check.pattern.test(value)) {
            this.problem(key, value, check.describe ?? `must match ${check.pattern}`);
        }
        return value;
    }

    /** A secret value that may be absent: secrets have no default in Pulumi.yaml. */
    optionalSecret(key: string): pulumi.Output<string> | undefined {
        return this.config.getSecret(key);
    }

    /** A string that may be empty (meaning "not set"); non-empty values must match the pattern. */
    optionalString(key: string, check: { pattern: RegExp; describe: string }): string | undefined {
        const value = this.raw(key) ?? "";
        if (value === "") return undefined;
        if (!check.pattern.test(value)) this.problem(key, value, check.describe);
        return value;
    }

    integer(key: string, range: { min: number; max: number }): number {
        const text = this.raw(key);
        if (text === undefined) return NaN;
        const value = Number(text);
        if (!Number.isInteger(value) || value < range.min || value > range.max) {
            this.problem(key, Number.isNaN(value) ? text : value, `must be an integer from ${range.min} to ${range.max}`);
            return NaN;
        }
        return value;
    }

    boolean(key: string): boolean {
        const text = this.raw(key);
        if (text === undefined) return false;
        if (text !== "true" && text !== "false") this.problem(key, text, "must be true or false");
        return text === "true";
    }

    /** A list of strings; `checkItem` returns what is allowed when an item is bad. */
    stringList(key: string, minItems: number, checkItem: (item: string) => string | undefined): string[] {
        const text = this.raw(key);
        if (text === undefined) return [];
        let value: unknown;
        try {
            value = JSON.parse(text);
        } catch {
            value = text;
        }
        if (!Array.isArray(value) || value.some((item) => typeof item !== "string")) {
            this.problem(key, value, "must be a list of strings");
            return [];
        }
        if (value.length < minItems) this.problem(key, value, `must list at least ${minItems} item(s)`);
        value.forEach((item: string, index: number) => {
            const allowed = checkItem(item);
            if (allowed !== undefined) this.problem(`${key}[${index}]`, item, allowed);
            else if (value.indexOf(item) !== index) this.problem(`${key}[${index}]`, item, "must not repeat an earlier item");
        });
        return value as string[];
    }

    /** min <= desired <= max, read from `<prefix>MinSize`, `<prefix>DesiredSize`, `<prefix>MaxSize`. */
    scaling(prefix: string, limit: number): NodeGroupScaling {
        const minSize = this.integer(`${prefix}MinSize`, { min: 0, max: limit });
        const desiredSize = this.integer(`${prefix}DesiredSize`, { min: 0, max: limit });
        const maxSize = this.integer(`${prefix}MaxSize`, { min: 1, max: limit });
        if (minSize > maxSize) {
            this.problem(`${prefix}MinSize`, minSize, `must not exceed ${prefix}MaxSize (${maxSize})`);
        } else if (desiredSize < minSize || desiredSize > maxSize) {
            this.problem(`${prefix}DesiredSize`, desiredSize, `must be between ${prefix}MinSize (${minSize}) and ${prefix}MaxSize (${maxSize})`);
        }
        return { minSize, desiredSize, maxSize };
    }
}

const instanceTypePattern = /^[a-z][a-z0-9-]*\.[a-z0-9]+$/;
const gpuFamilyPattern = /^(p\d|g\d)[a-z0-9-]*\./;
const supportedGpuTypes = Object.keys(gpuInstanceTypes).join(", ");
const roleArnPattern = /^arn:aws(-cn|-us-gov)?:iam::\d{12}:role\/[\w+=,.@/-]{1,512}$/;
const cidrPattern = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/;
/** `registry/repository[:tag]@sha256:<digest>`: a digest makes the deployment reproducible. */
export const pinnedImagePattern =
    /^[a-z0-9]+([.-][a-z0-9]+)*(:\d+)?(\/[a-z0-9]+([._-][a-z0-9]+)*)+(:[\w][\w.-]{0,127})?@sha256:[a-f0-9]{64}$/;

function cidrProblem(cidr: string, maxPrefix: number): string | undefined {
    const match = cidrPattern.exec(cidr);
    const valid = match !== null && match.slice(1, 5).every((octet) => Number(octet) <= 255) && Number(match[5]) <= maxPrefix;
    return valid ? undefined : `must be an IPv4 CIDR block with a prefix of /${maxPrefix} or shorter, e.g. 10.0.0.0/16`;
}

function gpuInstanceTypeProblem(name: string): string | undefined {
    if (gpuInstanceTypes[name]) return undefined;
    if (!instanceTypePattern.test(name)) return `not an EC2 instance type; supported GPU instance types: ${supportedGpuTypes}`;
    if (!gpuFamilyPattern.test(name)) return `not a GPU instance type; supported GPU instance types: ${supportedGpuTypes}`;
    return `not a supported GPU instance type; supported: ${supportedGpuTypes}`;
}

function readNetwork(reader: ConfigReader): NetworkConfig {
    return {
        vpcCidr: checkedCidr(reader, "vpcCidr", 20),
        availabilityZoneCount: reader.integer("availabilityZoneCount", { min: 2, max: 4 }),
        natGatewayStrategy: reader.string("natGatewayStrategy", { allowed: natGatewayStrategies }) as NatGatewayStrategy,
    };
}

function checkedCidr(reader: ConfigReader, key: string, maxPrefix: number): string {
    const value = reader.string(key);
    const problem = cidrProblem(value, maxPrefix);
    if (problem) reader.problem(key, value, problem);
    return value;
}

function readCluster(reader: ConfigReader, stack: string): ClusterConfig {
    const systemInstanceTypes = reader.stringList("systemNodeInstanceTypes", 1, (name) => {
        if (!instanceTypePattern.test(name)) return "must be an EC2 instance type, e.g. m7i.xlarge";
        if (gpuInstanceTypes[name] || gpuFamilyPattern.test(name)) return "must not be a GPU instance type: GPU nodes belong in gpuInstanceTypes";
        return undefined;
    });
    return {
        name: `${projectName}-${stack}`,
        kubernetesVersion: reader.string("kubernetesVersion", {
            pattern: /^1\.(3\d)$/,
            describe: "must be an EKS Kubernetes version from 1.30 on, written major.minor, e.g. 1.35",
        }),
        adminRoleArns: reader.stringList("clusterAdminRoleArns", 0, (arn) =>
            roleArnPattern.test(arn) ? undefined : "must be an IAM role ARN, e.g. arn:aws:iam::123456789012:role/platform-admin",
        ),
        publicAccessCidrs: reader.stringList("clusterPublicAccessCidrs", 1, (cidr) => cidrProblem(cidr, 32)),
        systemNodes: { instanceTypes: systemInstanceTypes, ...reader.scaling("systemNode", 20) },
    };
}

function readGpu(reader: ConfigReader): GpuConfig {
    const instanceTypes = reader.stringList("gpuInstanceTypes", 1, gpuInstanceTypeProblem);
    const known = instanceTypes.filter((name) => gpuInstanceTypes[name]);
    const gpuCounts = new Set(known.map((name) => gpuInstanceTypes[name].gpuCount));
    if (gpuCounts.size > 1) {
        // Cluster Autoscaler builds one node template per group: every type in it must offer the same GPUs.
        reader.problem("gpuInstanceTypes", instanceTypes, "all types in the GPU node group must have the same GPU count");
    }
    const group: GpuNodeGroupConfig = {
        name: "gpu",
        instanceTypes,
        capacityType: reader.string("gpuCapacityType", { allowed: capacityTypes }) as CapacityType,
        diskSizeGiB: reader.integer("gpuDiskSizeGiB", { min: 100, max: 16384 }),
        ...reader.scaling("gpu", 100),
    };
    return { nodeGroups: [group] };
}

function readImage(reader: ConfigReader): ImageConfig {
    return {
        prebuiltReference: reader.optionalString("imageReference", {
            pattern: pinnedImagePattern,
            describe:
                "must be empty (build from ./service) or an image pinned by digest, " +
                "e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/whisper@sha256:<64 hex digits>",
        }),
        repositoryForceDelete: reader.boolean("imageRepositoryForceDelete"),
    };
}

function readService(reader: ConfigReader): ServiceConfig {
    return {
        modelId: reader.string("modelId", { allowed: Object.keys(whisperModels) }),
        dtype: reader.string("modelDtype", { allowed: dtypes }) as Dtype,
        maxBatchSize: reader.integer("maxBatchSize", { min: 1, max: 256 }),
    };
}

/** The GPUs must support the dtype and hold the model at the configured batch size. */
function checkGpuFitsService(reader: ConfigReader, gpu: GpuConfig, service: ServiceConfig): void {
    if (!whisperModels[service.modelId] || !dtypes.includes(service.dtype) || Number.isNaN(service.maxBatchSize)) return;
    const needGiB = requiredGpuMemoryGiB(service.modelId, service.dtype, service.maxBatchSize);
    for (const group of gpu.nodeGroups) {
        group.instanceTypes.forEach((name, index) => {
            const type = gpuInstanceTypes[name];
            if (!type) return;
            if (service.dtype === "bfloat16" && type.computeCapability < bfloat16MinComputeCapability) {
                reader.problem(
                    "modelDtype",
                    service.dtype,
                    `${name} (${type.gpuModel}, compute capability ${type.computeCapability.toFixed(1)}) has no bfloat16; ` +
                        `use float16, or GPUs with compute capability ${bfloat16MinComputeCapability.toFixed(1)} or more (g5, g6, g6e, p4d, p5)`,
                );
            }
            if (needGiB > type.gpuMemoryGiB) {
                reader.problem(
                    `gpuInstanceTypes[${index}]`,
                    name,
                    `its ${type.gpuModel} has ${type.gpuMemoryGiB} GiB but ${service.modelId} at ${service.dtype} ` +
                        `with maxBatchSize ${service.maxBatchSize} needs about ${needGiB.toFixed(1)} GiB; ` +
                        `choose a larger GPU, a smaller maxBatchSize or a 16-bit modelDtype`,
                );
            }
        });
    }
}

function readWorkload(reader: ConfigReader): WorkloadConfig {
    return {
        batchWaitMs: reader.integer("batchWaitMs", { min: 0, max: 1000 }),
        maxUploadMb: reader.integer("maxUploadMb", { min: 1, max: 2048 }),
        maxAudioSeconds: reader.integer("maxAudioSeconds", { min: 30, max: 4 * 3600 }),
        queueSize: reader.integer("queueSize", { min: 1, max: 10000 }),
        // The NLB's idle timeout (requestTimeoutSeconds + 60) can be at most 6000 s.
        requestTimeoutSeconds: reader.integer("requestTimeoutSeconds", { min: 30, max: 5940 }),
        apiKey: reader.optionalSecret("apiKey"),
        requireApiKey: reader.boolean("requireApiKey"),
        modelCacheStorage: reader.string("modelCacheStorage", { allowed: modelCacheStorages }) as ModelCacheStorage,
        modelCacheSizeGiB: reader.integer("modelCacheSizeGiB", { min: 10, max: 16384 }),
        modelCacheStorageClass: reader.optionalString("modelCacheStorageClass", {
            pattern: /^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$/,
            describe: "must be empty or the name of a StorageClass (a DNS subdomain), e.g. efs-sc",
        }),
    };
}

const certificateArnPattern = /^arn:aws(-cn|-us-gov)?:acm:[a-z0-9-]+:\d{12}:certificate\/[0-9a-f-]{36}$/;

function readTraffic(reader: ConfigReader): TrafficConfig {
    return {
        scheme: reader.string("loadBalancerScheme", { allowed: loadBalancerSchemes }) as LoadBalancerScheme,
        sourceRanges: reader.stringList("loadBalancerSourceRanges", 1, (cidr) => cidrProblem(cidr, 32)),
        certificateArn: reader.optionalString("tlsCertificateArn", {
            pattern: certificateArnPattern,
            describe: "must be empty (plain HTTP on port 80) or an ACM certificate ARN, e.g. arn:aws:acm:us-east-1:123456789012:certificate/<uuid>",
        }),
        allowUnauthenticatedPublicAccess: reader.boolean("allowUnauthenticatedPublicAccess"),
    };
}

function readMonitoring(reader: ConfigReader): MonitoringConfig {
    const errorPercent = reader.integer("alertErrorPercent", { min: 1, max: 100 });
    return {
        prometheusRetentionDays: reader.integer("prometheusRetentionDays", { min: 1, max: 365 }),
        prometheusStorageGiB: reader.integer("prometheusStorageGiB", { min: 10, max: 16384 }),
        grafanaAdminPassword: reader.optionalSecret("grafanaAdminPassword"),
        alertP95LatencySeconds: reader.integer("alertP95LatencySeconds", { min: 1, max: 6000 }),
        alertErrorRatio: errorPercent / 100,
    };
}

/** The key holding the per-pod target of each scaling metric. */
export const scalingTargetKeys: Record<ScalingMetric, string> = {
    http_requests_per_second: "targetRequestsPerSecond",
    whisper_requests_in_flight: "targetInFlightRequests",
    whisper_queued_audio_seconds: "targetQueuedAudioSeconds",
};

function readAutoscaling(reader: ConfigReader): AutoscalingConfig {
    const minReplicas = reader.integer("minReplicas", { min: 1, max: 1000 });
    const maxReplicas = reader.integer("maxReplicas", { min: 1, max: 1000 });
    if (minReplicas > maxReplicas) reader.problem("minReplicas", minReplicas, `must not exceed maxReplicas (${maxReplicas})`);
    const metric = reader.string("scalingMetric", { allowed: scalingMetrics }) as ScalingMetric;
    const targets = Object.fromEntries(
        Object.entries(scalingTargetKeys).map(([name, key]) => [name, reader.integer(key, { min: 1, max: 100000 })]),
    ) as Record<ScalingMetric, number>;
    return {
        minReplicas,
        maxReplicas,
        metric,
        targetAverageValue: targets[metric],
        clusterAutoscalerScaleDownMinutes: reader.integer("clusterAutoscalerScaleDownMinutes", { min: 1, max: 1440 }),
    };
}

/** Rules that span sections: what would break a deployment or expose it, refused before anything is declared. */
function checkWorkload(reader: ConfigReader, config: StackConfig): void {
    const { workload, traffic, autoscaling, gpu } = config;
    if (workload.modelCacheStorage === "ebs" && autoscaling.maxReplicas > 1) {
        reader.problem(
            "modelCacheStorage",
            "ebs",
            `an EBS volume is ReadWriteOnce (one node, one AZ) but maxReplicas is ${autoscaling.maxReplicas}: ` +
                `use modelCacheStorage "efs", or set maxReplicas (and minReplicas) to 1`,
        );
    }
    const openToAll = traffic.sourceRanges.includes("0.0.0.0/0");
    if (traffic.scheme === "internet-facing" && openToAll && !workload.requireApiKey && !traffic.allowUnauthenticatedPublicAccess) {
        reader.problem(
            "requireApiKey",
            false,
            `an internet-facing load balancer open to 0.0.0.0/0 (loadBalancerScheme, loadBalancerSourceRanges) would expose the GPUs ` +
                `to anyone: set requireApiKey to true, narrow loadBalancerSourceRanges, use loadBalancerScheme "internal", ` +
                `or set allowUnauthenticatedPublicAccess to true to accept it`,
        );
    }
    if (config.existingClusterKubeconfig !== undefined) {
        if (workload.modelCacheStorageClass === undefined) {
            reader.problem(
                "modelCacheStorageClass",
                "",
                `must name a StorageClass of the existing cluster (existingClusterKubeconfig is set, so no EFS file system is created); ` +
                    `modelCacheStorage says its access mode ("efs": ReadWriteMany, "ebs": ReadWriteOnce)`,
            );
        }
        return;
    }
    const gpuSlots = gpu.nodeGroups.reduce((sum, group) => sum + group.maxSize * (gpuInstanceTypes[group.instanceTypes[0]]?.gpuCount ?? 1), 0);
    if (autoscaling.maxReplicas > gpuSlots) {
        reader.problem("maxReplicas", autoscaling.maxReplicas, `the GPU node groups hold at most ${gpuSlots} pods (gpuMaxSize × GPUs per node): raise gpuMaxSize or lower maxReplicas`);
    }
}

function readRegion(): { region: string; problems: string[] } {
    const aws = new ConfigReader("aws");
    const region = aws.string("region", {
        pattern: /^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d$/,
        describe: "must be an AWS region, e.g. us-east-1",
    });
    return { region, problems: aws.problems };
}

/** Reads and validates the whole stack configuration; throws one ConfigError listing every problem. */
export function loadConfig(): StackConfig {
    const reader = new ConfigReader();
    const stack = pulumi.getStack();
    const { region, problems: regionProblems } = readRegion();
    reader.problems.push(...regionProblems);
    const config: StackConfig = {
        project: projectName,
        stack,
        region,
        tags: { project: projectName, stack, "managed-by": "pulumi" },
        network: readNetwork(reader),
        cluster: readCluster(reader, stack),
        gpu: readGpu(reader),
        image: readImage(reader),
        service: readService(reader),
        workload: readWorkload(reader),
        traffic: readTraffic(reader),
        monitoring: readMonitoring(reader),
        autoscaling: readAutoscaling(reader),
        existingClusterKubeconfig: reader.optionalSecret("existingClusterKubeconfig"),
    };
    checkGpuFitsService(reader, config.gpu, config.service);
    checkWorkload(reader, config);
    reader.throwIfProblems();
    return config;
}
