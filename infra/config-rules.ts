// Rules that span several config keys: what would break a deployment or expose it, refused before anything
// is declared. Each names the keys involved, their values and the ways out.
import {
    bfloat16MinComputeCapability,
    dtypes,
    gpuInstanceTypes,
    gpusPerNode,
    maxGpuPods,
    podResourcesPerGpu,
    requiredGpuMemoryGiB,
    serverHostMemoryGiB,
    whisperModels,
} from "./catalog";
import { ClusterConfig, GpuConfig, ServiceConfig, StackConfig } from "./config";
import { ConfigReader } from "./config-reader";
import {
    decodedAudioKiBPerSecond,
    heldAudioCopies,
    heldMessageCopies,
    longestAudioSecondsThatFits,
    realtimeSessionsMemoryMiB,
    serverLimits,
    tmpReserveMiB,
} from "./server-limits";
import { albIdleTimeoutSeconds, idleMarginSeconds, nlbTcpIdleTimeoutSeconds } from "./traffic";
import { terminationGracePeriodSeconds } from "./whisper";

/** Checks every rule across keys; problems are recorded on the reader. */
export function checkStackRules(reader: ConfigReader, config: StackConfig): void {
    checkClusterAccess(reader, config.cluster);
    checkGpuFitsService(reader, config.gpu, config.service);
    checkWorstCaseFitsPod(reader, config);
    checkWorkload(reader, config);
}

/** A viewer role is the one pull-request code runs with: it must never also be an administrator. */
function checkClusterAccess(reader: ConfigReader, cluster: ClusterConfig): void {
    cluster.viewerRoleArns.forEach((arn, index) => {
        if (cluster.adminRoleArns.includes(arn)) {
            reader.problem(
                `clusterViewerRoleArns[${index}]`,
                arn,
                "is also in clusterAdminRoleArns: a viewer (a CI preview role, which pull-request code runs with) must stay read-only; list it in one of the two",
            );
        }
    });
}

/** The GPUs must support the dtype and hold the model at the configured batch size. */
function checkGpuFitsService(reader: ConfigReader, gpu: GpuConfig, service: ServiceConfig): void {
    if (!whisperModels[service.modelId] || !dtypes.includes(service.dtype) || Number.isNaN(service.maxBatchSize) || Number.isNaN(service.beamSize)) return;
    const needGiB = requiredGpuMemoryGiB(service.modelId, service.dtype, service.maxBatchSize, service.beamSize);
    gpu.instanceTypes.forEach((name, index) => {
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
                    `with maxBatchSize ${service.maxBatchSize} and beamSize ${service.beamSize} needs about ${needGiB.toFixed(1)} GiB; ` +
                    `choose a larger GPU, a smaller maxBatchSize or beamSize, or a 16-bit modelDtype`,
            );
        }
    });
}

/** Node disk a GPU node keeps beside the pods' /tmp volumes: the server image unpacked (6-7 GB, twice while it is
 *  pulled), the OS, container logs. */
export const gpuNodeDiskReserveGiB = 40;

/**
 * The worst case must fit the pod: one request with the longest audio in its memory (beside the server, the model
 * and live sessions at their limit), one upload of the largest size in its /tmp volume, and the /tmp volumes of all pods on a node on its disk.
 */
function checkWorstCaseFitsPod(reader: ConfigReader, config: StackConfig): void {
    const { service, workload, gpu } = config;
    const types = gpu.instanceTypes;
    if (!whisperModels[service.modelId] || types.some((type) => !gpuInstanceTypes[type]) || types.length === 0) return;
    const { maxSessions, maxBufferedSeconds, maxMessageMb } = workload.realtime;
    if ([workload.maxAudioSeconds, workload.maxUploadMb, workload.uploadSpoolGiB, maxSessions, maxBufferedSeconds, maxMessageMb].some(Number.isNaN)) return;
    const memoryLimitMiB = podResourcesPerGpu(types).memoryMiB;
    const input = { memoryLimitMiB, modelId: service.modelId, dtype: service.dtype, ...workload };
    const limits = serverLimits(input);
    const longest = longestAudioSecondsThatFits(input);
    const realtimeMiB = realtimeSessionsMemoryMiB(workload.realtime);
    const longestWithoutSessions = longestAudioSecondsThatFits({ ...input, realtime: { ...workload.realtime, maxSessions: 0 } });
    if (workload.maxAudioSeconds > longest && workload.maxAudioSeconds <= longestWithoutSessions) {
        // Live sessions at their limit take the room one longest request needs: the session limit is what to change.
        const perSessionMiB = realtimeMiB / maxSessions;
        const roomMiB = ((longestWithoutSessions - workload.maxAudioSeconds) * decodedAudioKiBPerSecond * (heldAudioCopies + 1)) / 1024;
        reader.problem(
            "maxRealtimeSessions",
            maxSessions,
            `a pod on ${types.join(", ")} has ${memoryLimitMiB} MiB; each live session may hold ${maxBufferedSeconds} s of audio ` +
                `(realtimeMaxBufferedSeconds, 128 KiB a second) and a ${maxMessageMb} MiB message (realtimeMaxMessageMb, held ` +
                `${heldMessageCopies} times while it is read), ${Math.ceil(perSessionMiB)} MiB, and ${maxSessions} of them leave no room ` +
                `for one request of maxAudioSeconds (${workload.maxAudioSeconds}): set maxRealtimeSessions to ` +
                `${Math.floor(roomMiB / perSessionMiB)} or less, or lower realtimeMaxBufferedSeconds, realtimeMaxMessageMb or maxAudioSeconds`,
        );
    } else if (workload.maxAudioSeconds > longest) {
        reader.problem(
            "maxAudioSeconds",
            workload.maxAudioSeconds,
            `a pod on ${types.join(", ")} has ${memoryLimitMiB} MiB; ${service.modelId} at ${service.dtype} needs about ` +
                `${serverHostMemoryGiB(service.modelId, service.dtype).toFixed(1)} GiB besides audio, and decoded audio takes 128 KiB a ` +
                `second (64 KiB in each of the server's two processes), beside ${Math.ceil(realtimeMiB)} MiB for live sessions at their limit, so not even one request that long fits: set maxAudioSeconds to ` +
                `${longest} or less, or choose GPU instance types with more memory or a smaller model`,
        );
    }
    if (limits.maxSpoolMb < workload.maxUploadMb) {
        reader.problem(
            "uploadSpoolGiB",
            workload.uploadSpoolGiB,
            `the /tmp volume holds ${limits.maxSpoolMb} MB of uploads (${tmpReserveMiB} MiB stay free), less than one upload of ` +
                `maxUploadMb (${workload.maxUploadMb}): set uploadSpoolGiB to ${Math.ceil((workload.maxUploadMb + tmpReserveMiB) / 1024)} or more, or lower maxUploadMb`,
        );
    }
    const podsPerNode = gpusPerNode(types);
    const room = Math.floor((gpu.diskSizeGiB - gpuNodeDiskReserveGiB) / podsPerNode);
    if (workload.uploadSpoolGiB > room) {
        reader.problem(
            "uploadSpoolGiB",
            workload.uploadSpoolGiB,
            `${podsPerNode} pod(s) per GPU node, each with a /tmp volume this size, and ${gpuNodeDiskReserveGiB} GiB for the image ` +
                `and the system do not fit gpuDiskSizeGiB (${gpu.diskSizeGiB}): set uploadSpoolGiB to ${room} or less, or raise gpuDiskSizeGiB`,
        );
    }
}

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
    if (traffic.scheme === "internet-facing" && traffic.certificateArn === undefined && !traffic.allowPlaintextPublicAccess) {
        reader.problem(
            "tlsCertificateArn",
            "",
            `an internet-facing load balancer (loadBalancerScheme "internet-facing") without a certificate serves plain HTTP on port 80, ` +
                `so the API key and the audio cross the internet in the clear: set tlsCertificateArn to an ACM certificate ARN, ` +
                `use loadBalancerScheme "internal", or set allowPlaintextPublicAccess to true to accept it`,
        );
    }
    if (autoscaling.minReplicas === 0 && autoscaling.activeHours === undefined) {
        reader.problem(
            "minReplicas",
            0,
            `with no pod there is no load metric and nothing would ever start one: set activeHoursStart, activeHoursEnd and ` +
                `activeHoursTimezone (the hours during which at least one pod runs), or set minReplicas to 1 or more`,
        );
    }
    if (autoscaling.minReplicas > 0 && autoscaling.activeHours !== undefined) {
        reader.problem(
            "activeHoursStart",
            autoscaling.activeHours.start,
            `active hours only matter when the service may scale to zero: set minReplicas to 0, or leave activeHoursStart, activeHoursEnd and activeHoursTimezone empty`,
        );
    }
    if (autoscaling.targetRealtimeSessions > workload.realtime.maxSessions) {
        reader.problem(
            "targetRealtimeSessions",
            autoscaling.targetRealtimeSessions,
            `is more live sessions per pod than a pod admits (maxRealtimeSessions ${workload.realtime.maxSessions}): the autoscaler ` +
                `would add pods only after sessions are refused; set it to ${workload.realtime.maxSessions} or less`,
        );
    }
    const albLongestRequest = albIdleTimeoutSeconds.max - idleMarginSeconds;
    if (traffic.certificateArn !== undefined && workload.requestTimeoutSeconds > albLongestRequest) {
        reader.problem(
            "requestTimeoutSeconds",
            workload.requestTimeoutSeconds,
            `with tlsCertificateArn set the service is behind an Application Load Balancer, whose idle timeout (requestTimeoutSeconds + ` +
                `${idleMarginSeconds} s) is at most ${albIdleTimeoutSeconds.max} s: set requestTimeoutSeconds to ${albLongestRequest} or less, ` +
                `or leave tlsCertificateArn empty (plain HTTP through an NLB allows up to ${nlbTcpIdleTimeoutSeconds.max - idleMarginSeconds})`,
        );
    }
    if (config.existingClusterKubeconfig === undefined && Object.keys(config.existingClusterNodeSelector).length > 0) {
        reader.problem(
            "existingClusterNodeSelector",
            Object.entries(config.existingClusterNodeSelector).map(([key, value]) => `${key}=${value}`),
            "applies only with existingClusterKubeconfig: the cluster this stack creates runs its add-ons on its system node group; leave it empty",
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
    const gpuSlots = maxGpuPods(gpu);
    if (autoscaling.maxReplicas > gpuSlots) {
        reader.problem("maxReplicas", autoscaling.maxReplicas, `the GPU NodePool holds at most ${gpuSlots} pods (gpuMaxSize × GPUs per node): raise gpuMaxSize or lower maxReplicas`);
    }
    checkGpuDisruption(reader, config);
}

/**
 * An empty GPU node waits at least as long as a server pod takes to drain before Karpenter removes it: a pod that KEDA
 * scales in is still finishing its requests for that long, and a node that goes at once is paid for again when the
 * next pod needs one (a GPU node takes minutes to be useful).
 */
function checkGpuDisruption(reader: ConfigReader, config: StackConfig): void {
    const { gpu, workload } = config;
    if (Number.isNaN(gpu.consolidateAfterMinutes) || Number.isNaN(workload.requestTimeoutSeconds)) return;
    const graceSeconds = terminationGracePeriodSeconds({ ...config.service, ...workload, mayRunOnSpot: gpu.capacityTypes.includes("spot") });
    if (gpu.consolidateAfterMinutes * 60 < graceSeconds) {
        reader.problem(
            "gpuConsolidateAfterMinutes",
            gpu.consolidateAfterMinutes,
            `is shorter than a server pod's drain (terminationGracePeriodSeconds ${graceSeconds} s, from requestTimeoutSeconds ` +
                `${workload.requestTimeoutSeconds}): set it to ${Math.ceil(graceSeconds / 60)} or more, or lower requestTimeoutSeconds`,
        );
    }
}
