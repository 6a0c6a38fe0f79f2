// The Whisper service on the cluster: namespace, model cache volume, API key Secret, the GPU Deployment,
// the Service (an NLB, or an ALB Ingress with TLS), its NetworkPolicy and PodDisruptionBudget, the PodMonitor
// Prometheus scrapes and the KEDA ScaledObject that scales it.
import * as k8s from "@pulumi/kubernetes";
import * as pulumi from "@pulumi/pulumi";
import * as random from "@pulumi/random";
import { Dtype, PodResources } from "./catalog";
import { realtimeSessionsQuery, scalingQuery } from "./autoscaling";
import { ActiveHours, RealtimeLimits, ScalingMetric } from "./config";
import { gpuNodeSelector, gpuToleration } from "./conventions";
import { VolumeAccessMode } from "./model-cache";
import { serverLimits } from "./server-limits";
import { albAnnotations, albIdleTimeoutSeconds as albIdleTimeoutRange, albIngressClass, idleTimeoutSeconds, nlbAnnotations, TrafficSettings } from "./traffic";

export const whisperNamespace = "whisper";
export const deploymentName = "whisper";
export const serviceName = "whisper";
export const containerPort = 8000;
export const httpPortName = "http";
/** /metrics is served on a port of its own, which the load balancer does not expose: Prometheus scrapes the pods. */
export const metricsPort = 9090;
export const metricsPortName = "metrics";
/** The server image's user and group (service/Dockerfile): the EFS access points and fsGroup use them. */
export const serverUser = { uid: 10001, gid: 10001 };
/** Where the cache volume is mounted; HF_HOME lives inside it. */
export const modelCacheMountPath = "/models";
/** Long enough for the NLB to stop sending new connections to a terminating pod (its deregistration takes 10-30 s). */
export const preStopSleepSeconds = 30;
/**
 * How long a new pod may take until it serves, part by part: one table for the startup probe and for every wait of
 * `pulumi up`, so that they cannot drift apart. A GPU node booting for it and the image pull (5 to 10 minutes); the
 * model download and warm-up (large-v3, 3 GB: the startup probe's budget); then the load balancer's health checks
 * until its target is healthy (the readiness gate keeps the pod unready until then: 1 to 3 minutes).
 */
export const podStartSeconds = { nodeAndImage: 10 * 60, startup: 20 * 60, targetHealthy: 3 * 60 };
/** The kubelet gives the first start the startup budget before it restarts the container. */
export const startupProbe = { periodSeconds: 10, failureThreshold: podStartSeconds.startup / 10 };
/**
 * How long the AWS Load Balancer Controller may take to create the load balancer, its target group and
 * TargetGroupBinding and write the hostname (a minute or two); past it something is wrong (subnet tags, quotas, IAM)
 * and the Service's or Ingress's events say what.
 */
export const loadBalancerReadySeconds = 10 * 60;
/** Pulumi's customTimeouts for a wait of that many seconds, in whole minutes. */
const timeoutsOf = (seconds: number) => {
    const minutes = `${Math.ceil(seconds / 60)}m`;
    return { create: minutes, update: minutes };
};
/** The Deployment's rollout waits for a new pod to serve: the whole of its start. */
export const rolloutTimeouts = timeoutsOf(podStartSeconds.nodeAndImage + podStartSeconds.startup + podStartSeconds.targetHealthy);
/** The Service and the Ingress wait for their load balancer only (never for the pods, which come after them). */
export const loadBalancerTimeouts = timeoutsOf(loadBalancerReadySeconds);
/**
 * What `pulumi up` waits for on the Service and the Ingress: the controller's hostname in their status, which it
 * writes only after it has created the load balancer's TargetGroupBinding (aws-load-balancer-controller
 * controllers/service/service_controller.go and ingress/group_controller.go: the stack is deployed, then the status
 * updated). Not pulumi-kubernetes' default: its Service await (provider/pkg/await/service.go) also waits for
 * Endpoints that target a pod, for DefaultServiceTimeoutMins = 10 on every create and update (awaitServiceUpdate
 * runs the same await), and the pods are created only after the Service (the readiness gate below), so it would
 * wait for pods that wait for it. Its default Ingress await (provider/pkg/await/ingress.go, DefaultIngressTimeoutMins
 * = 10, on create and update) waits for the status and for Endpoints of each rule's Service, none here (a
 * defaultBackend only). A `pulumi.com/waitFor` annotation replaces the default await (provider/pkg/metadata/
 * annotations.go, ReadyCondition; it takes precedence since v4.18.4); customTimeouts bound it.
 */
export const awaitLoadBalancerHostname = { "pulumi.com/waitFor": "jsonpath={.status.loadBalancer.ingress[0].hostname}" };
/** The ALB's Service is a ClusterIP Service that only names the pods: it is ready once it has its cluster IP. */
export const awaitClusterIp = { "pulumi.com/waitFor": "jsonpath={.spec.clusterIP}" };
/**
 * The AWS Load Balancer Controller injects a pod readiness gate into the pods of a namespace with this label (docs
 * "Pod readiness gate", v2.x): a pod is Ready only once its target is healthy in the load balancer's target group,
 * so a rollout never takes an old pod away while the new one is still "initial" there. It injects the gate only
 * into pods created when a TargetGroupBinding for a Service selecting them exists (IP targets): the Deployment
 * waits for the Service (NLB) or the Ingress (ALB), whose wait ends after the controller made that binding.
 */
export const podReadinessGateLabel = { "elbv2.k8s.aws/pod-readiness-gate-inject": "enabled" };
export const apiKeySecretName = "whisper-api-key";

export const probePaths = { startup: "/readyz", readiness: "/readyz", liveness: "/healthz", metrics: "/metrics" } as const;

export interface ServerSettings {
    modelId: string;
    dtype: Dtype;
    maxBatchSize: number;
    beamSize: number;
    conditionOnPreviousText: boolean;
    batchWaitMs: number;
    maxUploadMb: number;
    maxAudioSeconds: number;
    queueSize: number;
    /** The /tmp volume uploads are spooled to, GiB. */
    uploadSpoolGiB: number;
    /** A request body's deadlines: in all, between parts, and the slowest average rate. */
    uploadTimeoutSeconds: number;
    uploadIdleSeconds: number;
    uploadMinBytesPerSecond: number;
    /** Connection deadlines and cap: a request head's, an idle keep-alive connection's (behind the NLB), the most held at once. */
    headTimeoutSeconds: number;
    keepAliveSeconds: number;
    maxConnections: number;
    /** The longest a request may run: the server's deadline, and the base of every timeout around it. */
    requestTimeoutSeconds: number;
    realtime: RealtimeLimits;
    /** The GPU nodes may be spot instances (gpuCapacityTypes has spot): every drain must end within a reclaim's notice. */
    mayRunOnSpot: boolean;
}

export interface ScalingSettings {
    /** 0: no pod (and no GPU node) outside activeHours. */
    minReplicas: number;
    maxReplicas: number;
    /** The most server pods the GPU NodePool can hold; unknown in an existing cluster. */
    maxGpuPods?: number;
    metric: ScalingMetric;
    /** The per-pod average of the metric the autoscaler keeps. */
    targetAverageValue: number;
    /** Live sessions per pod: a second trigger, so a pod full of live sessions scales out whatever the metric. */
    targetRealtimeSessions: number;
    /** When at least one pod runs although the load metric is zero (or absent, with no pod to report it). */
    activeHours?: ActiveHours;
    /** Where KEDA reads the metric: the Prometheus that scrapes the server, `http://host:port`. */
    prometheusAddress: string;
}

export interface WhisperServiceArgs {
    stack: string;
    image: pulumi.Input<string>;
    resources: PodResources;
    server: ServerSettings;
    /** The API key clients send as a bearer token; none leaves /v1/* open. */
    apiKey?: pulumi.Input<string>;
    modelCache: { storageClassName: pulumi.Input<string>; accessMode: VolumeAccessMode; sizeGiB: number; dependsOn: pulumi.Resource[] };
    traffic: TrafficSettings;
    /**
     * The source ranges the load balancer's traffic arrives from: the VPC's CIDR, since NLB IP targets without
     * client IP preservation see the NLB's own private addresses. Unknown (an existing cluster): any source.
     */
    loadBalancerSourceCidrs?: string[];
    scaling: ScalingSettings;
    /**
     * The namespace of the Prometheus that scrapes the server: it gets a PodMonitor (the Prometheus Operator's CRDs
     * exist) and, alone, the metrics port. None: no PodMonitor, and the metrics port admits no one.
     */
    scrapedFrom?: { namespace: string };
    /** What must run before the objects that need it: the LB controller's webhook, the CRDs (monitoring, KEDA). */
    after: { loadBalancerController?: pulumi.Resource; monitoring?: pulumi.Resource; keda?: pulumi.Resource };
    provider: k8s.Provider;
}

/** EC2's notice before it reclaims a spot instance. */
export const spotInterruptionNoticeSeconds = 120;
/** Of that notice, what EventBridge, the queue and Karpenter's eviction may take before the pod is told (an allowance). */
export const interruptionReactionSeconds = 20;
/** After the drain, how long the server takes to answer what is unfinished (503) and exit. */
const exitSeconds = 15;
/** The longest drain that still ends, and answers what is unfinished, before a reclaimed spot instance goes. */
export const spotDrainSeconds = spotInterruptionNoticeSeconds - interruptionReactionSeconds - preStopSleepSeconds - exitSeconds;
/**
 * How long the server keeps finishing in-flight requests after SIGTERM, after which it answers the rest 503 with
 * Retry-After: the longest request, or on nodes that may be spot what a reclaim's notice leaves (a pod cannot tell a
 * reclaim from a scale-in, so every drain there is that short).
 */
export const drainSeconds = (server: ServerSettings): number =>
    server.mayRunOnSpot ? Math.min(server.requestTimeoutSeconds, spotDrainSeconds) : server.requestTimeoutSeconds;
/** The preStop pause, the drain, and a margin for the process to answer and exit. */
export const terminationGracePeriodSeconds = (server: ServerSettings): number => preStopSleepSeconds + drainSeconds(server) + exitSeconds;
/** The longest an HPA stabilization window can be (a Kubernetes limit). */
const oneHourSeconds = 3600;

export function podLabels(stack: string): Record<string, string> {
    return { "app.kubernetes.io/name": "whisper", "app.kubernetes.io/instance": stack, "app.kubernetes.io/component": "server" };
}

/**
 * Where the server learns who a client is, for its per-client share of uploads and spool. Behind the ALB (TLS) each
 * request carries X-Forwarded-For, set by the ALB from inside the VPC: trusted from the VPC's addresses. Behind the
 * NLB (IP targets, no client IP preservation) every client arrives from the NLB's own few addresses and nothing names
 * the client, so a per-client share would be a share of everyone: a client may then take every upload slot, and the
 * receive deadlines alone bound what a slow one holds.
 */
export interface ClientIdentity {
    forwardedBy?: string[];
    /**
     * Behind the ALB: its idle timeout. The ALB keeps its connections to a pod open and reuses them; a pod that closed
     * an idle one first would race the ALB's next request on it (a 502), so the pod's keep-alive outlasts the ALB's.
     */
    albIdleTimeoutSeconds?: number;
}

/** Seconds the pod keeps an idle connection open beyond the ALB's idle timeout. */
export const albKeepAliveMarginSeconds = 5;

/** The ALB's X-Forwarded-For, trusted from where the ALB sends (the VPC); none behind the NLB or from unknown sources. */
export function clientIdentity(args: Pick<WhisperServiceArgs, "traffic" | "loadBalancerSourceCidrs" | "server">): ClientIdentity {
    if (args.traffic.certificateArn === undefined) return {};
    const silence = { requestTimeoutSeconds: args.server.requestTimeoutSeconds, realtimeIdleSeconds: args.server.realtime.idleSeconds };
    const albIdleTimeoutSeconds = idleTimeoutSeconds(silence, albIdleTimeoutRange);
    return args.loadBalancerSourceCidrs ? { forwardedBy: args.loadBalancerSourceCidrs, albIdleTimeoutSeconds } : { albIdleTimeoutSeconds };
}

/** The server's settings as its WHISPER_<NAME> environment. */
export function serverEnvironment(server: ServerSettings, memoryLimitMiB: number, clients: ClientIdentity = {}): Record<string, string> {
    const limits = serverLimits({ ...server, memoryLimitMiB });
    return {
        WHISPER_MODEL: server.modelId,
        WHISPER_DEVICE: "cuda",
        WHISPER_DTYPE: server.dtype,
        WHISPER_HOST: "0.0.0.0",
        WHISPER_PORT: String(containerPort),
        WHISPER_METRICS_PORT: String(metricsPort),
        WHISPER_MAX_BATCH_SIZE: String(server.maxBatchSize),
        WHISPER_BEAM_SIZE: String(server.beamSize),
        WHISPER_CONDITION_ON_PREVIOUS_TEXT: String(server.conditionOnPreviousText),
        WHISPER_BATCH_WAIT_MS: String(server.batchWaitMs),
        WHISPER_MAX_UPLOAD_MB: String(server.maxUploadMb),
        WHISPER_MAX_AUDIO_SECONDS: String(server.maxAudioSeconds),
        WHISPER_QUEUE_SIZE: String(server.queueSize),
        // What the pod's memory and /tmp volume hold at worst: past these the server answers 503, not the OOM killer.
        WHISPER_MAX_QUEUED_AUDIO_SECONDS: String(limits.maxQueuedAudioSeconds),
        WHISPER_MAX_CONCURRENT_UPLOADS: String(limits.maxConcurrentUploads),
        WHISPER_MAX_SPOOL_MB: String(limits.maxSpoolMb),
        // Behind the ALB its connections (trusted proxies) pass the per-client connection cap by; behind the NLB every
        // connection comes from the NLB's own addresses, so a per-client cap would be everyone's.
        ...(clients.forwardedBy
            ? { WHISPER_FORWARDED_ALLOW_IPS: clients.forwardedBy.join(",") }
            : { WHISPER_MAX_UPLOADS_PER_CLIENT: String(limits.maxConcurrentUploads), WHISPER_MAX_CONNECTIONS_PER_CLIENT: String(server.maxConnections) }),
        WHISPER_UPLOAD_TIMEOUT_SECONDS: String(server.uploadTimeoutSeconds),
        WHISPER_UPLOAD_IDLE_SECONDS: String(server.uploadIdleSeconds),
        WHISPER_UPLOAD_MIN_BYTES_PER_SECOND: String(server.uploadMinBytesPerSecond),
        WHISPER_HEAD_TIMEOUT_SECONDS: String(server.headTimeoutSeconds),
        WHISPER_KEEP_ALIVE_SECONDS: String(
            clients.albIdleTimeoutSeconds === undefined ? server.keepAliveSeconds : clients.albIdleTimeoutSeconds + albKeepAliveMarginSeconds,
        ),
        WHISPER_MAX_CONNECTIONS: String(server.maxConnections),
        WHISPER_REQUEST_TIMEOUT_SECONDS: String(server.requestTimeoutSeconds),
        WHISPER_DRAIN_SECONDS: String(drainSeconds(server)),
        WHISPER_MAX_REALTIME_SESSIONS: String(server.realtime.maxSessions),
        WHISPER_REALTIME_IDLE_SECONDS: String(server.realtime.idleSeconds),
        WHISPER_REALTIME_MAX_SESSION_SECONDS: String(server.realtime.maxSessionSeconds),
        WHISPER_REALTIME_MAX_MESSAGE_MB: String(server.realtime.maxMessageMb),
        WHISPER_REALTIME_MAX_BUFFERED_SECONDS: String(server.realtime.maxBufferedSeconds),
        WHISPER_REALTIME_MAX_PENDING_EVENTS: String(server.realtime.maxPendingEvents),
        HF_HOME: `${modelCacheMountPath}/hf`,
    };
}

/**
 * How a rollout replaces pods, each of which needs a whole GPU. A surge pod needs a free GPU or a GPU node the
 * autoscaler can still add: when the HPA's maximum leaves one, surge without losing capacity; when it may fill every
 * GPU the GPU NodePool can hold, a rollout at full scale must free a GPU first, so one pod may be down (the PDB allows
 * one), and below full scale none; where the GPU count is unknown (an existing cluster), one. With the readiness
 * gate a pod counts as available only once its target is healthy, so the pods up stay healthy targets throughout.
 * One replica on a ReadWriteOnce volume must let go of it before the next starts.
 */
export function rolloutStrategy(accessMode: VolumeAccessMode, scaling: ScalingSettings): k8s.types.input.apps.v1.DeploymentStrategy {
    if (accessMode === "ReadWriteOnce") return { type: "Recreate" };
    if (scaling.maxGpuPods === undefined) return { type: "RollingUpdate", rollingUpdate: { maxSurge: 1, maxUnavailable: 1 } };
    if (scaling.maxReplicas < scaling.maxGpuPods) return { type: "RollingUpdate", rollingUpdate: { maxSurge: 1, maxUnavailable: 0 } };
    // A percentage rounds down: no pod down while a GPU is free (below maxGpuPods), one once the fleet is full, never
    // the only pod of a one-pod service (which then surges onto a free GPU).
    return { type: "RollingUpdate", rollingUpdate: { maxSurge: 1, maxUnavailable: `${Math.ceil(100 / scaling.maxGpuPods)}%` } };
}

export class WhisperService extends pulumi.ComponentResource {
    readonly namespace: k8s.core.v1.Namespace;
    readonly deployment: k8s.apps.v1.Deployment;
    readonly service: k8s.core.v1.Service;
    /** The ALB's Ingress, when the service is served over TLS. */
    readonly ingress?: k8s.networking.v1.Ingress;
    /** KEDA's ScaledObject: it drives the HPA KEDA makes, and takes the Deployment to zero pods and back. */
    readonly scaledObject: k8s.apiextensions.CustomResource;
    /** The load balancer's DNS name, once the controller has made it. */
    readonly endpoint: pulumi.Output<string>;

    constructor(name: string, args: WhisperServiceArgs, opts: pulumi.ComponentResourceOptions = {}) {
        super("whisper-eks:workload:WhisperService", name, {}, opts);
        const k8sOpts = { parent: this, provider: args.provider };
        const labels = podLabels(args.stack);
        const { server, traffic, scaling } = args;

        this.namespace = new k8s.core.v1.Namespace(
            `${name}-namespace`,
            { metadata: { name: whisperNamespace, labels: { ...labels, ...podReadinessGateLabel } } },
            k8sOpts,
        );
        const namespace = this.namespace.metadata.name;
        const metadata = (objectName: string) => ({ name: objectName, namespace, labels });

        const modelCache = new k8s.core.v1.PersistentVolumeClaim(
            `${name}-model-cache`,
            {
                metadata: metadata("whisper-model-cache"),
                spec: {
                    accessModes: [args.modelCache.accessMode],
                    storageClassName: args.modelCache.storageClassName,
                    resources: { requests: { storage: `${args.modelCache.sizeGiB}Gi` } },
                },
            },
            { ...k8sOpts, dependsOn: args.modelCache.dependsOn },
        );

        const apiKeySecret =
            args.apiKey === undefined
                ? undefined
                : new k8s.core.v1.Secret(
                      `${name}-api-key`,
                      { metadata: metadata(apiKeySecretName), type: "Opaque", stringData: { "api-key": pulumi.secret(args.apiKey) } },
                      k8sOpts,
                  );

        const env: k8s.types.input.core.v1.EnvVar[] = [
            ...Object.entries(serverEnvironment(server, args.resources.memoryMiB, clientIdentity(args))).map(([envName, value]) => ({ name: envName, value })),
            ...(apiKeySecret ? [{ name: "WHISPER_API_KEY", valueFrom: { secretKeyRef: { name: apiKeySecretName, key: "api-key" } } }] : []),
        ];
        // The kubelet probes the metrics port, which a thread of its own serves: a pod whose API port is saturated by
        // connections (refused at once past --max-connections) is neither restarted nor taken out for it. The VPC CNI's
        // policy agent always admits the node's own address, whatever the NetworkPolicy says.
        const probe = (path: string) => ({ httpGet: { path, port: metricsPortName } });
        const spread = (topologyKey: string) => ({ maxSkew: 1, topologyKey, whenUnsatisfiable: "ScheduleAnyway", labelSelector: { matchLabels: labels } });

        // Plain HTTP: the Service is an NLB. TLS: the Service only names the pods, an ALB Ingress sends to their IPs.
        const backend = {
            requestTimeoutSeconds: server.requestTimeoutSeconds,
            realtimeIdleSeconds: server.realtime.idleSeconds,
            drainSeconds: drainSeconds(server),
            readinessPath: probePaths.readiness,
        };
        const afterController = {
            ...k8sOpts,
            dependsOn: args.after.loadBalancerController ? [args.after.loadBalancerController] : [],
            customTimeouts: loadBalancerTimeouts,
        };
        const certificateArn = traffic.certificateArn;
        const port = { name: httpPortName, port: 80, targetPort: httpPortName, protocol: "TCP" };
        this.service = new k8s.core.v1.Service(
            `${name}-service`,
            certificateArn === undefined
                ? {
                      metadata: { ...metadata(serviceName), annotations: { ...nlbAnnotations(traffic, backend), ...awaitLoadBalancerHostname } },
                      spec: {
                          type: "LoadBalancer",
                          loadBalancerClass: "service.k8s.aws/nlb",
                          loadBalancerSourceRanges: traffic.sourceRanges,
                          selector: labels,
                          ports: [port],
                      },
                  }
                : { metadata: { ...metadata(serviceName), annotations: awaitClusterIp }, spec: { type: "ClusterIP", selector: labels, ports: [port] } },
            afterController,
        );
        this.ingress =
            certificateArn === undefined
                ? undefined
                : new k8s.networking.v1.Ingress(
                      `${name}-ingress`,
                      {
                          metadata: {
                              ...metadata(serviceName),
                              annotations: { ...albAnnotations({ ...traffic, certificateArn }, backend), ...awaitLoadBalancerHostname },
                          },
                          spec: {
                              ingressClassName: albIngressClass,
                              defaultBackend: { service: { name: this.service.metadata.name, port: { name: httpPortName } } },
                          },
                      },
                      afterController,
                  );

        this.deployment = new k8s.apps.v1.Deployment(
            `${name}-server`,
            {
                metadata: metadata(deploymentName),
                spec: {
                    // No replicas: KEDA's HPA owns the count. Declaring it would make every `pulumi up` a server-side
                    // apply conflict with the HPA's writes (or reset the count); a new Deployment starts at 1.
                    selector: { matchLabels: labels },
                    strategy: rolloutStrategy(args.modelCache.accessMode, scaling),
                    template: {
                        metadata: { labels },
                        spec: {
                            // The server never calls the Kubernetes API: no token to steal from it.
                            automountServiceAccountToken: false,
                            terminationGracePeriodSeconds: terminationGracePeriodSeconds(server),
                            nodeSelector: gpuNodeSelector,
                            tolerations: [gpuToleration],
                            // Zones first (an AZ outage), then hosts; ScheduleAnyway so a zone without GPU capacity does not block scaling.
                            topologySpreadConstraints: [spread("topology.kubernetes.io/zone"), spread("kubernetes.io/hostname")],
                            securityContext: {
                                runAsNonRoot: true,
                                runAsUser: serverUser.uid,
                                runAsGroup: serverUser.gid,
                                fsGroup: serverUser.gid,
                                seccompProfile: { type: "RuntimeDefault" },
                            },
                            containers: [
                                {
                                    name: "server",
                                    image: args.image,
                                    args: ["serve"],
                                    ports: [
                                        { name: httpPortName, containerPort, protocol: "TCP" },
                                        { name: metricsPortName, containerPort: metricsPort, protocol: "TCP" },
                                    ],
                                    env,
                                    resources: {
                                        // The /tmp volume is node disk: the scheduler counts it.
                                        requests: {
                                            cpu: args.resources.cpu,
                                            memory: args.resources.memory,
                                            "ephemeral-storage": `${server.uploadSpoolGiB}Gi`,
                                            "nvidia.com/gpu": "1",
                                        },
                                        limits: { memory: args.resources.memory, "nvidia.com/gpu": "1" },
                                    },
                                    startupProbe: { ...probe(probePaths.startup), ...startupProbe, timeoutSeconds: 5 },
                                    readinessProbe: { ...probe(probePaths.readiness), periodSeconds: 5, failureThreshold: 2, timeoutSeconds: 5 },
                                    livenessProbe: { ...probe(probePaths.liveness), periodSeconds: 15, failureThreshold: 4, timeoutSeconds: 5 },
                                    lifecycle: { preStop: { exec: { command: ["sleep", String(preStopSleepSeconds)] } } },
                                    securityContext: {
                                        allowPrivilegeEscalation: false,
                                        readOnlyRootFilesystem: true,
                                        runAsNonRoot: true,
                                        capabilities: { drop: ["ALL"] },
                                    },
                                    volumeMounts: [
                                        { name: "model-cache", mountPath: modelCacheMountPath },
                                        { name: "tmp", mountPath: "/tmp" },
                                    ],
                                },
                            ],
                            volumes: [
                                { name: "model-cache", persistentVolumeClaim: { claimName: modelCache.metadata.name } },
                                // Uploads are spooled here; memory-backed would count against the pod's memory limit.
                                { name: "tmp", emptyDir: { sizeLimit: `${server.uploadSpoolGiB}Gi` } },
                            ],
                        },
                    },
                },
            },
            // After the load balancer's TargetGroupBinding, so that every pod gets the readiness gate; a rollout waits
            // for a new pod's whole start.
            { ...k8sOpts, dependsOn: [this.ingress ?? this.service], customTimeouts: rolloutTimeouts },
        );

        // The API port from where the load balancer sends, the metrics port from Prometheus' namespace, nothing else;
        // enforced by the VPC CNI. Numeric ports: its policy agent skipped named ports in rules with a CIDR peer
        // before v1.0.8, which would have shut the load balancer out.
        new k8s.networking.v1.NetworkPolicy(
            `${name}-network-policy`,
            {
                metadata: metadata("whisper"),
                spec: {
                    podSelector: { matchLabels: labels },
                    policyTypes: ["Ingress"],
                    ingress: [
                        {
                            from: args.loadBalancerSourceCidrs?.map((cidr) => ({ ipBlock: { cidr } })),
                            ports: [{ port: containerPort, protocol: "TCP" }],
                        },
                        // No rule, not an empty `from` (which would admit every source), when nothing scrapes.
                        ...(args.scrapedFrom
                            ? [
                                  {
                                      from: [{ namespaceSelector: { matchLabels: { "kubernetes.io/metadata.name": args.scrapedFrom.namespace } } }],
                                      ports: [{ port: metricsPort, protocol: "TCP" }],
                                  },
                              ]
                            : []),
                    ],
                },
            },
            k8sOpts,
        );

        new k8s.policy.v1.PodDisruptionBudget(
            `${name}-pdb`,
            // maxUnavailable 1, not minAvailable: a drain can always make progress, even at one replica, one pod at a time.
            { metadata: metadata("whisper"), spec: { maxUnavailable: 1, selector: { matchLabels: labels } } },
            k8sOpts,
        );

        if (args.scrapedFrom) {
            new k8s.apiextensions.CustomResource(
                `${name}-pod-monitor`,
                {
                    apiVersion: "monitoring.coreos.com/v1",
                    kind: "PodMonitor",
                    metadata: metadata("whisper"),
                    spec: {
                        selector: { matchLabels: labels },
                        podMetricsEndpoints: [{ port: metricsPortName, path: probePaths.metrics, interval: "15s" }],
                    },
                },
                { ...k8sOpts, dependsOn: args.after.monitoring ? [args.after.monitoring] : [] },
            );
        }

        // Scale down slowly: a pod removed mid-request has to drain, and the longest request must fit in the window.
        // The same wait applies to the last pod: KEDA removes it that long after the load and the active hours end.
        const scaleDownWindow = Math.min(oneHourSeconds, Math.max(300, server.requestTimeoutSeconds));
        this.scaledObject = new k8s.apiextensions.CustomResource(
            `${name}-scaled-object`,
            {
                apiVersion: "keda.sh/v1alpha1",
                kind: "ScaledObject",
                metadata: metadata("whisper"),
                spec: {
                    scaleTargetRef: { apiVersion: "apps/v1", kind: "Deployment", name: this.deployment.metadata.name },
                    minReplicaCount: scaling.minReplicas,
                    maxReplicaCount: scaling.maxReplicas,
                    pollingInterval: 15,
                    cooldownPeriod: scaleDownWindow,
                    advanced: {
                        horizontalPodAutoscalerConfig: {
                            behavior: {
                                scaleUp: { stabilizationWindowSeconds: 0, policies: [{ type: "Pods", value: 2, periodSeconds: 60 }] },
                                scaleDown: { stabilizationWindowSeconds: scaleDownWindow, policies: [{ type: "Pods", value: 1, periodSeconds: 120 }] },
                            },
                        },
                    },
                    triggers: [
                        {
                            // The whole service's value, divided by the pods: the target stays per pod.
                            type: "prometheus",
                            metricType: "AverageValue",
                            metadata: {
                                serverAddress: scaling.prometheusAddress,
                                query: scalingQuery(scaling.metric, whisperNamespace),
                                threshold: String(scaling.targetAverageValue),
                            },
                        },
                        // Live sessions are load the file metrics do not see (a session between turns queues nothing).
                        {
                            type: "prometheus",
                            metricType: "AverageValue",
                            metadata: {
                                serverAddress: scaling.prometheusAddress,
                                query: realtimeSessionsQuery(whisperNamespace),
                                threshold: String(scaling.targetRealtimeSessions),
                            },
                        },
                        // With no pod there is no load metric: the schedule brings the first pod back.
                        ...(scaling.activeHours
                            ? [{ type: "cron", metadata: { ...scaling.activeHours, desiredReplicas: String(Math.max(1, scaling.minReplicas)) } }]
                            : []),
                    ],
                },
            },
            { ...k8sOpts, dependsOn: args.after.keda ? [args.after.keda] : [] },
        );

        const loadBalancerStatus = this.ingress ? this.ingress.status : this.service.status;
        this.endpoint = loadBalancerStatus.apply((status) => status?.loadBalancer?.ingress?.[0]?.hostname ?? "");
        this.registerOutputs({ endpoint: this.endpoint });
    }
}

/**
 * The API key the service requires: the secret config value `apiKey` when set; otherwise, when a key is required,
 * one generated once and kept in the stack state (exported as the secret output). None when keys are not required.
 */
export function apiKeyFor(name: string, settings: { apiKey?: pulumi.Output<string>; requireApiKey: boolean }): pulumi.Output<string> | undefined {
    if (settings.apiKey !== undefined) return pulumi.secret(settings.apiKey);
    if (!settings.requireApiKey) return undefined;
    return pulumi.secret(new random.RandomPassword(`${name}-api-key`, { length: 40, special: false }).result);
}
