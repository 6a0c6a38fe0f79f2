// The schema of a stack: every value the program takes from stack config, typed and grouped by the part of
// the system it configures, with the vocabularies (allowed values) config accepts. Components import their
// section from here; load-config.ts reads and validates the keys, config-rules.ts checks rules across them.
import * as pulumi from "@pulumi/pulumi";
import { Dtype } from "./catalog";

export const projectName = "whisper-eks";

/**
 * The stack names a stack may have. The stack name goes into every AWS name (`whisper-eks-<stack>-...`), and AWS caps
 * them: with Pulumi's 8-character auto-name suffix, the longest names the program makes (an EventBridge rule and IAM
 * roles, 64 characters each) fit stack names of up to 20 characters, which test/aws-rules.spec.ts checks. Lowercase,
 * because the ECR repository and the cluster's DNS-label uses allow nothing else.
 */
export const stackNameRule = { pattern: /^[a-z][a-z0-9-]*$/, maxLength: 20 } as const;

/**
 * The Kubernetes minor versions a stack may run: those every pinned component supports by its own compatibility
 * notes, each stated beside the component's version (`kubernetes: { min, max }`). KEDA 2.20 limits the range: it is
 * tested on 1.33 to 1.35 only (infra/autoscaling.ts). Karpenter 1.15 takes 1.31 to 1.37; the AWS Load Balancer
 * Controller, kube-prometheus-stack, the DCGM exporter and the NVIDIA device plugin state only a minimum, all below
 * 1.33. test/aws-rules.spec.ts checks that this list is exactly the versions inside every range.
 */
export const kubernetesVersions = ["1.33", "1.34", "1.35"] as const;
export type KubernetesVersion = (typeof kubernetesVersions)[number];
/** Karpenter's capacity types (the values of its `karpenter.sh/capacity-type` label). */
export type CapacityType = "spot" | "on-demand";
export const capacityTypes: readonly CapacityType[] = ["spot", "on-demand"];
export type NatGatewayStrategy = "Single" | "OnePerAz";
export const natGatewayStrategies: readonly NatGatewayStrategy[] = ["Single", "OnePerAz"];
/** Where the model cache lives: a shared EFS file system (any replica count) or one EBS volume (one replica). */
export type ModelCacheStorage = "efs" | "ebs";
export const modelCacheStorages: readonly ModelCacheStorage[] = ["efs", "ebs"];
export type LoadBalancerScheme = "internet-facing" | "internal";
export const loadBalancerSchemes: readonly LoadBalancerScheme[] = ["internet-facing", "internal"];
/** The per-pod metrics the service can scale on (KEDA queries them in Prometheus). */
export type ScalingMetric = "http_requests_per_second" | "whisper_requests_in_flight" | "whisper_queued_audio_seconds";
export const scalingMetrics: readonly ScalingMetric[] = ["http_requests_per_second", "whisper_requests_in_flight", "whisper_queued_audio_seconds"];

/** The system node group's AMI: x86_64, so its instance types must be x86_64 too (load-config.ts refuses Graviton). */
export const systemNodeAmiType = "AL2023_x86_64_STANDARD";

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
    kubernetesVersion: KubernetesVersion;
    /** Roles given cluster-admin (people, the CI deploy role). */
    adminRoleArns: string[];
    /** Roles given read-only access without Secrets (the CI preview role: pull-request code runs with it). */
    viewerRoleArns: string[];
    publicAccessCidrs: string[];
    systemNodes: NodeGroupScaling & { instanceTypes: string[] };
}

/** The GPU NodePool and its EC2NodeClass: what Karpenter may launch for the server's pods. */
export interface GpuConfig {
    /** EC2 instance types Karpenter chooses from, all of one GPU model and count (catalog.ts knows each). */
    instanceTypes: string[];
    /** In order of preference: Karpenter launches spot where it is allowed and has capacity, else on-demand. */
    capacityTypes: CapacityType[];
    /** Most GPU nodes at once: the NodePool's nvidia.com/gpu limit is this times the GPUs per node. */
    maxNodes: number;
    diskSizeGiB: number;
    /** The EC2NodeClass's AMI alias, pinned to a release (`al2023@v20260903`), never `@latest`. */
    amiAlias: string;
    /** How long a GPU node stays empty before Karpenter removes it, minutes. */
    consolidateAfterMinutes: number;
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
    /** Sequences per window: 1 greedy, more a beam search (and best-of sampling at the fallback temperatures). */
    beamSize: number;
    /** Each window of a file prompted with the text decoded before it (its windows then decode one after another). */
    conditionOnPreviousText: boolean;
}

/** The server's settings beyond the model (WHISPER_* environment), its API key and its model cache. */
export interface WorkloadConfig {
    batchWaitMs: number;
    maxUploadMb: number;
    maxAudioSeconds: number;
    queueSize: number;
    /** The /tmp volume uploads are spooled to, GiB: it bounds the uploads a pod receives at once. */
    uploadSpoolGiB: number;
    /** A request body's deadlines: in all, between parts, and the slowest average rate. */
    uploadTimeoutSeconds: number;
    uploadIdleSeconds: number;
    uploadMinBytesPerSecond: number;
    /** Connection deadlines and cap: a request head's, an idle keep-alive connection's, and the most held at once. */
    headTimeoutSeconds: number;
    keepAliveSeconds: number;
    maxConnections: number;
    requestTimeoutSeconds: number;
    /** Live transcription sessions (/v1/realtime): the per-pod limits that hold under abuse. */
    realtime: RealtimeLimits;
    /** Set as secret config; when absent and required, the program generates one. */
    apiKey?: pulumi.Output<string>;
    requireApiKey: boolean;
    modelCacheStorage: ModelCacheStorage;
    modelCacheSizeGiB: number;
    /** An existing StorageClass for the cache (existing-cluster mode): nothing is created for it. */
    modelCacheStorageClass?: string;
}

/** The server's limits on live sessions (WHISPER_MAX_REALTIME_SESSIONS, WHISPER_REALTIME_*). */
export interface RealtimeLimits {
    /** Sessions one pod holds at once; past it a new one is refused. */
    maxSessions: number;
    /** A session that sends nothing this long is closed; the load balancers keep a silent WebSocket open longer. */
    idleSeconds: number;
    maxSessionSeconds: number;
    /** The largest client message (OpenAI allows 15 MiB per append), MiB. */
    maxMessageMb: number;
    /** Audio a session may hold ahead of the decoder, seconds. */
    maxBufferedSeconds: number;
    /** Server events queued for a client that does not read; past it the session is closed. */
    maxPendingEvents: number;
}

export interface TrafficConfig {
    scheme: LoadBalancerScheme;
    sourceRanges: string[];
    certificateArn?: string;
    allowUnauthenticatedPublicAccess: boolean;
    /** The explicit opt-in to plain HTTP on an internet-facing load balancer (no certificate). */
    allowPlaintextPublicAccess: boolean;
}

export interface MonitoringConfig {
    prometheusRetentionDays: number;
    prometheusStorageGiB: number;
    grafanaAdminPassword?: pulumi.Output<string>;
    alertP95LatencySeconds: number;
    alertErrorRatio: number;
    /** WhisperRealtimeTurnLatencyP95 fires above this p95 of live turn latency, seconds. */
    alertRealtimeTurnLatencyP95Seconds: number;
}

/**
 * When a stack that may scale to zero pods runs at least one: KEDA's cron trigger, from `start` to `end` (cron
 * expressions, minute hour day-of-month month day-of-week) in an IANA time zone.
 */
export interface ActiveHours {
    timezone: string;
    start: string;
    end: string;
}

export interface AutoscalingConfig {
    /** 0 lets the service (and its GPU nodes) go to zero outside activeHours. */
    minReplicas: number;
    maxReplicas: number;
    metric: ScalingMetric;
    /** The per-pod target of the chosen metric (from the key for that metric). */
    targetAverageValue: number;
    /** Live sessions per pod the autoscaler keeps, beside the chosen metric (whichever asks for more pods wins). */
    targetRealtimeSessions: number;
    activeHours?: ActiveHours;
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
    /** Existing-cluster mode: the nodeSelector of the add-ons deployed there (monitoring, metrics adapter); empty: anywhere. */
    existingClusterNodeSelector: Record<string, string>;
}
