// Reads and validates the stack's configuration, once, into the typed StackConfig (config.ts): each key with
// its type, range or allowed values. The only code that reads pulumi.Config (through ConfigReader); every
// problem is collected and reported together, before any resource is declared.
import * as pulumi from "@pulumi/pulumi";
import { dtypes, gpuInstanceTypes, whisperModels } from "./catalog";
import {
    ActiveHours,
    AutoscalingConfig,
    CapacityType,
    capacityTypes,
    ClusterConfig,
    GpuConfig,
    ImageConfig,
    kubernetesVersions,
    loadBalancerSchemes,
    modelCacheStorages,
    MonitoringConfig,
    natGatewayStrategies,
    NetworkConfig,
    projectName,
    ScalingMetric,
    scalingMetrics,
    ServiceConfig,
    StackConfig,
    stackNameRule,
    systemNodeAmiType,
    TrafficConfig,
    WorkloadConfig,
} from "./config";
import { cidrProblem, ConfigReader } from "./config-reader";
import { checkStackRules } from "./config-rules";
import { idleMarginSeconds, nlbTcpIdleTimeoutSeconds } from "./traffic";

const instanceTypePattern = /^[a-z][a-z0-9-]*\.[a-z0-9]+$/;
const gpuFamilyPattern = /^(p\d|g\d)[a-z0-9-]*\./;
const supportedGpuTypes = Object.keys(gpuInstanceTypes).join(", ");
const roleArnPattern = /^arn:aws(-cn|-us-gov)?:iam::\d{12}:role\/[\w+=,.@/-]{1,512}$/;
const certificateArnPattern = /^arn:aws(-cn|-us-gov)?:acm:[a-z0-9-]+:\d{12}:certificate\/[0-9a-f-]{36}$/;
/** `registry/repository[:tag]@sha256:<digest>`: a digest makes the deployment reproducible. */
export const pinnedImagePattern =
    /^[a-z0-9]+([.-][a-z0-9]+)*(:\d+)?(\/[a-z0-9]+([._-][a-z0-9]+)*)+(:[\w][\w.-]{0,127})?@sha256:[a-f0-9]{64}$/;

/** The longest request: the load balancer's idle timeout (requestTimeoutSeconds + 60) is at most 6000 s (an NLB's). */
export const requestTimeoutSecondsRange = { min: 30, max: nlbTcpIdleTimeoutSeconds.max - idleMarginSeconds };
/** A live session's idle timeout: the load balancers keep a silent WebSocket open longer (the ALB up to 4000 s). */
export const realtimeIdleSecondsRange = { min: 5, max: 3600 };
/** The live turn latency alert's threshold, ms: below the turn-latency histogram's largest finite bucket (30 s). */
export const alertRealtimeTurnLatencyP95MsRange = { min: 100, max: 20000 };
/** The p95 latency alert's threshold: no request outlasts the longest request timeout. */
export const alertP95LatencySecondsRange = { min: 1, max: requestTimeoutSecondsRange.max };

/**
 * The VPC's prefix: AWS allows /16 (65,536 addresses) to /28; the subnets the program cuts per AZ (a public and a
 * private one in each of up to 4 AZs) need /20 or more, and pod IPs (the VPC CNI gives each pod a VPC address) more still.
 */
export const vpcPrefix = { min: 16, max: 20, why: "AWS allows /16 to /28; the public and private subnets of up to 4 AZs need /20 or more" };

/**
 * Graviton (arm64) instance families: `a1`, and a generation digit followed by `g` (t4g, m7g, c7gn, r8g, x2gd, im4gn,
 * is4gen...). The system node group runs an x86_64 AMI.
 */
const armFamilyPattern = /^(a1|[a-z]+\d+g[a-z]*)\./;

function gpuInstanceTypeProblem(name: string): string | undefined {
    if (gpuInstanceTypes[name]) return undefined;
    if (!instanceTypePattern.test(name)) return `not an EC2 instance type; supported GPU instance types: ${supportedGpuTypes}`;
    if (!gpuFamilyPattern.test(name)) return `not a GPU instance type; supported GPU instance types: ${supportedGpuTypes}`;
    return `not a supported GPU instance type; supported: ${supportedGpuTypes}`;
}

function readNetwork(reader: ConfigReader): NetworkConfig {
    return {
        vpcCidr: reader.cidr("vpcCidr", vpcPrefix),
        availabilityZoneCount: reader.integer("availabilityZoneCount", { min: 2, max: 4 }),
        natGatewayStrategy: reader.oneOf("natGatewayStrategy", natGatewayStrategies),
    };
}

function readCluster(reader: ConfigReader, stack: string): ClusterConfig {
    const systemInstanceTypes = reader.stringList("systemNodeInstanceTypes", 1, (name) => {
        if (!instanceTypePattern.test(name)) return "must be an EC2 instance type, e.g. m7i.xlarge";
        if (gpuInstanceTypes[name] || gpuFamilyPattern.test(name)) return "must not be a GPU instance type: GPU nodes belong in gpuInstanceTypes";
        if (armFamilyPattern.test(name)) {
            return `is a Graviton (arm64) type, but the system node group runs the x86_64 AMI (${systemNodeAmiType}): choose an x86_64 type, e.g. m7i.xlarge or m7a.xlarge`;
        }
        return undefined;
    });
    const roleArn = (arn: string) =>
        roleArnPattern.test(arn) ? undefined : "must be an IAM role ARN, e.g. arn:aws:iam::123456789012:role/platform-admin";
    return {
        name: `${projectName}-${stack}`,
        kubernetesVersion: reader.oneOf("kubernetesVersion", kubernetesVersions),
        adminRoleArns: reader.stringList("clusterAdminRoleArns", 0, roleArn),
        viewerRoleArns: reader.stringList("clusterViewerRoleArns", 0, roleArn),
        publicAccessCidrs: reader.stringList("clusterPublicAccessCidrs", 1, (cidr) => cidrProblem(cidr)),
        systemNodes: { instanceTypes: systemInstanceTypes, ...reader.scaling("systemNode", 20) },
    };
}

/** `al2023@v20260903`: an AMI release of the accelerated AL2023 family (Karpenter picks its NVIDIA variant for GPU types). */
export const pinnedAmiAliasPattern = /^al2023@v\d{8}$/;

function readGpu(reader: ConfigReader): GpuConfig {
    const instanceTypes = reader.stringList("gpuInstanceTypes", 1, gpuInstanceTypeProblem);
    const known = instanceTypes.filter((name) => gpuInstanceTypes[name]);
    // The NodePool's nodes carry one accelerator label and its GPU limit counts nodes by one GPU count: every type
    // in it must offer the same GPUs.
    const gpuCounts = new Set(known.map((name) => gpuInstanceTypes[name].gpuCount));
    if (gpuCounts.size > 1) {
        reader.problem("gpuInstanceTypes", instanceTypes, "all types in the GPU NodePool must have the same GPU count");
    }
    const gpuModels = new Set(known.map((name) => gpuInstanceTypes[name].gpuModel));
    if (gpuModels.size > 1) {
        reader.problem(
            "gpuInstanceTypes",
            instanceTypes,
            `all types in the GPU NodePool must have the same GPU model (its nodes carry one k8s.amazonaws.com/accelerator label), ` +
                `got ${[...gpuModels].join(", ")}: for spot capacity list sizes of one family, e.g. g6.xlarge and g6.2xlarge`,
        );
    }
    return {
        instanceTypes,
        capacityTypes: reader.stringList("gpuCapacityTypes", 1, (item) =>
            (capacityTypes as readonly string[]).includes(item) ? undefined : `allowed values are ${capacityTypes.map((type) => `"${type}"`).join(", ")}`,
        ) as CapacityType[],
        maxNodes: reader.integer("gpuMaxSize", { min: 1, max: 100 }),
        diskSizeGiB: reader.integer("gpuDiskSizeGiB", { min: 100, max: 16384 }),
        amiAlias: reader.string("gpuAmiAlias", {
            pattern: pinnedAmiAliasPattern,
            describe:
                "must be an AL2023 AMI alias pinned to a release, e.g. al2023@v20260903 (awslabs/amazon-eks-ami releases); " +
                "@latest would replace every GPU node whenever AWS publishes an AMI",
        }),
        consolidateAfterMinutes: reader.integer("gpuConsolidateAfterMinutes", { min: 1, max: 1440 }),
    };
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
        dtype: reader.oneOf("modelDtype", dtypes),
        maxBatchSize: reader.integer("maxBatchSize", { min: 1, max: 256 }),
        beamSize: reader.integer("beamSize", { min: 1, max: 8 }),
        conditionOnPreviousText: reader.boolean("conditionOnPreviousText"),
    };
}

function readWorkload(reader: ConfigReader): WorkloadConfig {
    return {
        batchWaitMs: reader.integer("batchWaitMs", { min: 0, max: 1000 }),
        maxUploadMb: reader.integer("maxUploadMb", { min: 1, max: 2048 }),
        // A day of audio at most; what a pod's memory holds is checked in config-rules.ts.
        maxAudioSeconds: reader.integer("maxAudioSeconds", { min: 30, max: 24 * 3600 }),
        queueSize: reader.integer("queueSize", { min: 1, max: 10000 }),
        uploadSpoolGiB: reader.integer("uploadSpoolGiB", { min: 1, max: 1024 }),
        uploadTimeoutSeconds: reader.integer("uploadTimeoutSeconds", { min: 10, max: 24 * 3600 }),
        // Below any load balancer idle timeout (requestTimeoutSeconds + 60, at least 90 s).
        uploadIdleSeconds: reader.integer("uploadIdleSeconds", { min: 1, max: 60 }),
        uploadMinBytesPerSecond: reader.integer("uploadMinBytesPerSecond", { min: 1, max: 100 * 2 ** 20 }),
        headTimeoutSeconds: reader.integer("headTimeoutSeconds", { min: 1, max: 60 }),
        // Below the NLB's idle timeout (at least 90 s): else the NLB forgets a connection the client still reuses.
        keepAliveSeconds: reader.integer("keepAliveSeconds", { min: 1, max: 60 }),
        maxConnections: reader.integer("maxConnections", { min: 64, max: 65536 }),
        requestTimeoutSeconds: reader.integer("requestTimeoutSeconds", requestTimeoutSecondsRange),
        realtime: {
            maxSessions: reader.integer("maxRealtimeSessions", { min: 1, max: 10000 }),
            idleSeconds: reader.integer("realtimeIdleSeconds", realtimeIdleSecondsRange),
            maxSessionSeconds: reader.integer("realtimeMaxSessionSeconds", { min: 60, max: 24 * 3600 }),
            maxMessageMb: reader.integer("realtimeMaxMessageMb", { min: 1, max: 64 }),
            // More than one 30 s window: whisper-server refuses to start with less (a long turn must fit).
            maxBufferedSeconds: reader.integer("realtimeMaxBufferedSeconds", { min: 31, max: 3600 }),
            maxPendingEvents: reader.integer("realtimeMaxPendingEvents", { min: 16, max: 100000 }),
        },
        apiKey: reader.optionalSecret("apiKey"),
        requireApiKey: reader.boolean("requireApiKey"),
        modelCacheStorage: reader.oneOf("modelCacheStorage", modelCacheStorages),
        modelCacheSizeGiB: reader.integer("modelCacheSizeGiB", { min: 10, max: 16384 }),
        modelCacheStorageClass: reader.optionalString("modelCacheStorageClass", {
            pattern: /^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$/,
            describe: "must be empty or the name of a StorageClass (a DNS subdomain), e.g. efs-sc",
        }),
    };
}

function readTraffic(reader: ConfigReader): TrafficConfig {
    return {
        scheme: reader.oneOf("loadBalancerScheme", loadBalancerSchemes),
        sourceRanges: reader.stringList("loadBalancerSourceRanges", 1, (cidr) => cidrProblem(cidr)),
        certificateArn: reader.optionalString("tlsCertificateArn", {
            pattern: certificateArnPattern,
            describe: "must be empty (plain HTTP on port 80) or an ACM certificate ARN, e.g. arn:aws:acm:us-east-1:123456789012:certificate/<uuid>",
        }),
        allowUnauthenticatedPublicAccess: reader.boolean("allowUnauthenticatedPublicAccess"),
        allowPlaintextPublicAccess: reader.boolean("allowPlaintextPublicAccess"),
    };
}

function readMonitoring(reader: ConfigReader): MonitoringConfig {
    const errorPercent = reader.integer("alertErrorPercent", { min: 1, max: 100 });
    return {
        prometheusRetentionDays: reader.integer("prometheusRetentionDays", { min: 1, max: 365 }),
        prometheusStorageGiB: reader.integer("prometheusStorageGiB", { min: 10, max: 16384 }),
        grafanaAdminPassword: reader.optionalSecret("grafanaAdminPassword"),
        alertP95LatencySeconds: reader.integer("alertP95LatencySeconds", alertP95LatencySecondsRange),
        alertErrorRatio: errorPercent / 100,
        alertRealtimeTurnLatencyP95Seconds: reader.integer("alertRealtimeTurnLatencyP95Ms", alertRealtimeTurnLatencyP95MsRange) / 1000,
    };
}

const cronPattern = /^(\S+\s+){4}\S+$/;

/** activeHoursStart, activeHoursEnd and activeHoursTimezone: all empty (none), or all set. */
function readActiveHours(reader: ConfigReader): ActiveHours | undefined {
    const describe = "must be empty or a cron expression of 5 fields (minute hour day-of-month month day-of-week), e.g. 0 8 * * 1-5";
    const start = reader.optionalString("activeHoursStart", { pattern: cronPattern, describe });
    const end = reader.optionalString("activeHoursEnd", { pattern: cronPattern, describe });
    const describeZone = "must be empty or an IANA time zone, e.g. America/New_York, Europe/Berlin or UTC";
    const timezone = reader.optionalString("activeHoursTimezone", { pattern: /^[A-Za-z_]+(\/[A-Za-z0-9_+-]+)*$/, describe: describeZone });
    if (timezone !== undefined && timezone !== "UTC" && !Intl.supportedValuesOf("timeZone").includes(timezone)) {
        reader.problem("activeHoursTimezone", timezone, describeZone);
    }
    const set = [start, end, timezone].filter((value) => value !== undefined).length;
    if (set === 0) return undefined;
    if (set < 3) {
        reader.problem("activeHoursStart", start ?? "", "activeHoursStart, activeHoursEnd and activeHoursTimezone go together: set all three or none");
        return undefined;
    }
    return { timezone: timezone!, start: start!, end: end! };
}

/** The key holding the per-pod target of each scaling metric. */
const scalingTargetKeys: Record<ScalingMetric, string> = {
    http_requests_per_second: "targetRequestsPerSecond",
    whisper_requests_in_flight: "targetInFlightRequests",
    whisper_queued_audio_seconds: "targetQueuedAudioSeconds",
};

function readAutoscaling(reader: ConfigReader): AutoscalingConfig {
    const minReplicas = reader.integer("minReplicas", { min: 0, max: 1000 });
    const maxReplicas = reader.integer("maxReplicas", { min: 1, max: 1000 });
    if (minReplicas > maxReplicas) reader.problem("minReplicas", minReplicas, `must not exceed maxReplicas (${maxReplicas})`);
    const metric = reader.oneOf("scalingMetric", scalingMetrics);
    const targets = Object.fromEntries(
        Object.entries(scalingTargetKeys).map(([name, key]) => [name, reader.integer(key, { min: 1, max: 100000 })]),
    ) as Record<ScalingMetric, number>;
    return {
        minReplicas,
        maxReplicas,
        metric,
        targetAverageValue: targets[metric],
        targetRealtimeSessions: reader.integer("targetRealtimeSessions", { min: 1, max: 10000 }),
        activeHours: readActiveHours(reader),
    };
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
    const reader = new ConfigReader(projectName);
    const stack = pulumi.getStack();
    if (!stackNameRule.pattern.test(stack) || stack.length > stackNameRule.maxLength) {
        reader.problems.push(
            `stack name "${stack}" (${stack.length} characters): must be at most ${stackNameRule.maxLength} characters of lowercase ` +
                `letters, digits and hyphens, starting with a letter: it goes into AWS names (IAM roles, EventBridge rules) of at most 64 characters`,
        );
    }
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
        existingClusterNodeSelector: reader.labelMap("existingClusterNodeSelector"),
    };
    checkStackRules(reader, config);
    reader.throwIfProblems();
    return config;
}
