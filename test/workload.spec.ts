// The workload as `pulumi up` would declare it, evaluated offline for the real dev and prod stacks: the invariants
// that break real deployments (selectors, probe paths, metric names, access modes, pod sizing, drain timing),
// the NLB, monitoring, autoscaling and Helm hygiene, and the configs that must be refused.
import { strict as assert } from "assert";
import * as fs from "fs";
import * as path from "path";
import * as pulumi from "@pulumi/pulumi";
import * as YAML from "yaml";
import { Dtype, gpuInstanceTypes, gpuNodeDaemonSetReserve, serverHostMemoryGiB } from "../infra/catalog";
import { alertP95LatencySecondsRange, requestTimeoutSecondsRange } from "../infra/load-config";
import { interruptionReactionSeconds, loadBalancerReadySeconds, podStartSeconds, spotInterruptionNoticeSeconds } from "../infra/whisper";
import { ConfigOverrides, evaluateStack, findResource, findResources, RecordedResource, repoRoot, SecretValue, StackEvaluation, tryEvaluateStack } from "../scripts/offline-stack";

// The mock does not report a resource's dependencies nor its customTimeouts: note them where the request passes the mock monitor.
const dependencies = new Map<string, string[]>();
const customTimeouts = new Map<string, { create: string; update: string }>();
// eslint-disable-next-line @typescript-eslint/no-var-requires
const { MockMonitor } = require("@pulumi/pulumi/runtime/mocks");
const registerResource = MockMonitor.prototype.registerResource;
MockMonitor.prototype.registerResource = function (request: any, callback: unknown) {
    const key = `${pulumi.getStack()}::${request.getType()}::${request.getName()}`;
    dependencies.set(key, request.getDependenciesList());
    const timeouts = request.getCustomtimeouts();
    if (timeouts) customTimeouts.set(key, { create: timeouts.getCreate(), update: timeouts.getUpdate() });
    return registerResource.call(this, request, callback);
};

const kinds = {
    deployment: "kubernetes:apps/v1:Deployment",
    service: "kubernetes:core/v1:Service",
    pvc: "kubernetes:core/v1:PersistentVolumeClaim",
    secret: "kubernetes:core/v1:Secret",
    pdb: "kubernetes:policy/v1:PodDisruptionBudget",
    hpa: "kubernetes:autoscaling/v2:HorizontalPodAutoscaler",
    scaledObject: "kubernetes:keda.sh/v1alpha1:ScaledObject",
    podMonitor: "kubernetes:monitoring.coreos.com/v1:PodMonitor",
    networkPolicy: "kubernetes:networking.k8s.io/v1:NetworkPolicy",
    prometheusRule: "kubernetes:monitoring.coreos.com/v1:PrometheusRule",
    storageClass: "kubernetes:storage.k8s.io/v1:StorageClass",
    configMap: "kubernetes:core/v1:ConfigMap",
    release: "kubernetes:helm.sh/v3:Release",
    ingress: "kubernetes:networking.k8s.io/v1:Ingress",
};

const release = (evaluation: StackEvaluation, releaseName: string) =>
    findResources(evaluation.resources, kinds.release).find((resource) => resource.inputs.name === releaseName) ??
    assert.fail(`no Helm release named ${releaseName}`);
const byKind = (evaluation: StackEvaluation, type: string) => findResource(evaluation.resources, type);
const podSpec = (evaluation: StackEvaluation) => byKind(evaluation, kinds.deployment).inputs.spec.template.spec;
const container = (evaluation: StackEvaluation) => podSpec(evaluation).containers[0];
const env = (evaluation: StackEvaluation): Record<string, any> =>
    Object.fromEntries(container(evaluation).env.map((variable: any) => [variable.name, variable.value ?? variable.valueFrom]));
const config = (evaluation: StackEvaluation, key: string) => evaluation.config[`whisper-eks:${key}`];
const dependsOn = (evaluation: StackEvaluation, dependent: RecordedResource, dependency: RecordedResource) =>
    (dependencies.get(`${evaluation.stack}::${dependent.type}::${dependent.name}`) ?? []).includes(dependency.urn ?? "none");
/** The number of the server container's port of that name. */
const containerPortNumber = (evaluation: StackEvaluation, name: string): number =>
    (container(evaluation).ports.find((port: any) => port.name === name) ?? assert.fail(`the container has no port ${name}`)).containerPort;
/** The NetworkPolicy rule that admits the server container's port of that name. */
const policyRuleFor = (evaluation: StackEvaluation, name: string) =>
    byKind(evaluation, kinds.networkPolicy).inputs.spec.ingress.filter((rule: any) =>
        rule.ports.some((port: any) => port.port === containerPortNumber(evaluation, name)),
    );
/** The create and update timeouts the program gave a resource, in seconds (Pulumi's default where none). */
const timeoutSeconds = (evaluation: StackEvaluation, resource: RecordedResource) => {
    const timeouts = customTimeouts.get(`${evaluation.stack}::${resource.type}::${resource.name}`) ?? assert.fail(`${resource.name} has customTimeouts`);
    const seconds = (duration: string) => Number((/^(\d+)m$/.exec(duration) ?? assert.fail(`minutes: ${duration}`))[1]) * 60;
    return { create: seconds(timeouts.create), update: seconds(timeouts.update) };
};
/** A Deployment strategy's maxSurge or maxUnavailable at a replica count: percentages round up for surge, down for unavailable. */
const resolvePods = (value: number | string, replicas: number, round: (x: number) => number) =>
    typeof value === "number" ? value : round((replicas * Number(value.replace("%", ""))) / 100);
const matches = (selector: Record<string, string>, labels: Record<string, string>) =>
    Object.entries(selector).every(([key, value]) => labels[key] === value);

/** The routes the server really serves, read from its Starlette route table. */
function serverRoutes(): Map<string, string[]> {
    const source = fs.readFileSync(path.join(repoRoot, "service", "whisper_server", "app.py"), "utf8");
    const routes = new Map<string, string[]>();
    for (const match of source.matchAll(/Route\("([^"]+)",\s*\w+,\s*methods=\[([^\]]*)\]/g)) {
        routes.set(match[1], [...match[2].matchAll(/"(\w+)"/g)].map((method) => method[1]));
    }
    return routes;
}

/** The settings the server reads from WHISPER_<NAME>: the fields of its Settings dataclass. */
function serverEnvironmentNames(): Set<string> {
    const source = fs.readFileSync(path.join(repoRoot, "service", "whisper_server", "settings.py"), "utf8");
    const body = source.slice(source.indexOf("class Settings:"), source.indexOf("\n\n\n", source.indexOf("class Settings:")));
    return new Set([...body.matchAll(/^\s{4}(\w+):/gm)].map((field) => `WHISPER_${field[1].toUpperCase()}`));
}

/** The series the server exports, from its prometheus_client declarations (counters get _total, histograms their parts). */
function serverMetricNames(): Set<string> {
    const source = fs.readFileSync(path.join(repoRoot, "service", "whisper_server", "metrics.py"), "utf8");
    const names = new Set<string>();
    for (const [, kind, name] of source.matchAll(/\b(Counter|Gauge|Histogram)\(\s*"(\w+)"/g)) {
        const series = { Counter: [`${name}_total`], Gauge: [name], Histogram: [`${name}_bucket`, `${name}_sum`, `${name}_count`] }[kind as "Counter" | "Gauge" | "Histogram"];
        series.forEach((item) => names.add(item));
    }
    return names;
}

/**
 * How long the load balancer in front of the service keeps a silent connection: an ALB's idle timeout, an NLB TCP
 * listener's, or the 350 s AWS fixes for an NLB TLS listener (Elastic Load Balancing guide, "Update the TCP idle timeout").
 */
function effectiveIdleTimeoutSeconds(evaluation: StackEvaluation): number {
    const ingress = findResources(evaluation.resources, kinds.ingress)[0];
    if (ingress) return Number(/idle_timeout\.timeout_seconds=(\d+)/.exec(ingress.inputs.metadata.annotations["alb.ingress.kubernetes.io/load-balancer-attributes"])![1]);
    const annotations = byKind(evaluation, kinds.service).inputs.metadata.annotations ?? {};
    if (annotations["service.beta.kubernetes.io/aws-load-balancer-ssl-cert"]) return 350;
    return Number(/tcp\.idle_timeout\.seconds=(\d+)/.exec(annotations["service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-80"])![1]);
}

/** The finite bucket bounds of a histogram the server declares, read from its prometheus_client declaration. */
function serverHistogramBuckets(name: string): number[] {
    const source = fs.readFileSync(path.join(repoRoot, "service", "whisper_server", "metrics.py"), "utf8");
    const tuple = /buckets=\(([^)]*)\)/.exec(source.slice(source.indexOf(`"${name}"`)))?.[1] ?? assert.fail(`${name} declares its buckets`);
    return tuple.split(",").map((bound) => Number(bound.trim()));
}

const cpuMillicores = (quantity: string) => (quantity.endsWith("m") ? Number(quantity.slice(0, -1)) : Number(quantity) * 1000);
const memoryMiB = (quantity: string) => (quantity.endsWith("Gi") ? Number(quantity.slice(0, -2)) * 1024 : Number(quantity.replace("Mi", "")));

describe("workload", function () {
    const stacks: Record<string, StackEvaluation> = {};
    before(async function () {
        for (const stack of ["dev", "prod"]) stacks[stack] = await evaluateStack(stack);
    });

    for (const stack of ["dev", "prod"]) {
        describe(`${stack} stack`, function () {
            const evaluation = () => stacks[stack];

            it("labels the pods with the contract labels, and the Deployment, Service and PDB select exactly them", function () {
                const deployment = byKind(evaluation(), kinds.deployment);
                const labels = deployment.inputs.spec.template.metadata.labels;
                assert.deepEqual(labels, { "app.kubernetes.io/name": "whisper", "app.kubernetes.io/instance": stack, "app.kubernetes.io/component": "server" });
                assert.deepEqual(deployment.inputs.spec.selector.matchLabels, labels);
                assert.ok(matches(byKind(evaluation(), kinds.service).inputs.spec.selector, labels), "the Service selects the pods");
                assert.ok(matches(byKind(evaluation(), kinds.pdb).inputs.spec.selector.matchLabels, labels), "the PDB selects the pods");
            });

            it("runs the image built for this stack, by digest", function () {
                const image = container(evaluation()).image;
                assert.match(image, /@sha256:[a-f0-9]{64}$/);
                assert.equal(image, evaluation().outputs.imageReference);
            });

            it("asks for one whole GPU, on GPU nodes, with the GPU NodePool's own label and taint", function () {
                const { requests, limits } = container(evaluation()).resources;
                assert.equal(requests["nvidia.com/gpu"], "1");
                assert.equal(limits["nvidia.com/gpu"], "1");
                const template = byKind(evaluation(), "kubernetes:karpenter.sh/v1:NodePool").inputs.spec.template;
                assert.ok(matches(podSpec(evaluation()).nodeSelector, template.metadata.labels), "the nodeSelector names labels the GPU nodes carry");
                for (const taint of template.spec.taints) {
                    assert.ok(
                        podSpec(evaluation()).tolerations.some((toleration: any) => toleration.key === taint.key && toleration.effect === taint.effect),
                        `the pod tolerates the GPU taint ${taint.key}`,
                    );
                }
            });

            it("requests CPU and memory that fit the smallest GPU node beside its DaemonSets", function () {
                const { requests, limits } = container(evaluation()).resources;
                const types = (config(evaluation(), "gpuInstanceTypes") as string[]).map((name) => gpuInstanceTypes[name]);
                const smallestCpu = Math.min(...types.map((type) => type.vcpu * 1000));
                const smallestMemory = Math.min(...types.map((type) => type.memoryGiB * 1024));
                assert.ok(cpuMillicores(requests.cpu) <= smallestCpu - gpuNodeDaemonSetReserve.cpuMillicores - 60, `cpu ${requests.cpu} fits ${smallestCpu}m`);
                assert.ok(memoryMiB(requests.memory) <= smallestMemory - gpuNodeDaemonSetReserve.memoryMiB - 1000, `memory ${requests.memory} fits ${smallestMemory}Mi`);
                // A useful share, not a token request: the server decodes audio on the CPU.
                assert.ok(cpuMillicores(requests.cpu) >= smallestCpu / 2);
                assert.equal(limits.memory, requests.memory, "memory limit = request: the pod is never the first to be OOM-killed");
            });

            it("probes the server's real endpoints on its metrics port and allows at least 5 minutes for the first model download", function () {
                // The metrics port's thread answers the probes while the API port is saturated (service/whisper_server/probes.py).
                const metricsPortPaths = fs.readFileSync(path.join(repoRoot, "service", "whisper_server", "probes.py"), "utf8");
                const probes = container(evaluation());
                for (const probe of [probes.startupProbe, probes.readinessProbe, probes.livenessProbe]) {
                    assert.ok(metricsPortPaths.includes(`path == "${probe.httpGet.path}"`), `${probe.httpGet.path} is served on the metrics port`);
                    assert.equal(probe.httpGet.port, "metrics");
                }
                assert.ok(probes.ports.some((port: any) => port.name === "metrics" && port.containerPort === 9090));
                assert.equal(probes.readinessProbe.httpGet.path, "/readyz");
                assert.equal(probes.livenessProbe.httpGet.path, "/healthz");
                assert.ok(probes.startupProbe.failureThreshold * probes.startupProbe.periodSeconds >= 300);
                assert.ok(probes.ports.some((port: any) => port.name === "http" && port.containerPort === 8000));
            });

            it("drains before it dies: preStop pause, then the longest request, within the grace period", function () {
                const spec = podSpec(evaluation());
                const preStop = container(evaluation()).lifecycle.preStop.exec.command;
                assert.equal(preStop[0], "sleep");
                const requestTimeout = config(evaluation(), "requestTimeoutSeconds") as number;
                assert.equal(Number(env(evaluation()).WHISPER_REQUEST_TIMEOUT_SECONDS), requestTimeout);
                const drain = Number(env(evaluation()).WHISPER_DRAIN_SECONDS);
                const grace = spec.terminationGracePeriodSeconds;
                assert.ok(grace > Number(preStop[1]) + drain);
                if ((config(evaluation(), "gpuCapacityTypes") as string[]).includes("spot")) {
                    // A reclaim gives 120 s: the pause, the drain and the 503s to what is unfinished all end before the instance.
                    assert.ok(grace + interruptionReactionSeconds <= spotInterruptionNoticeSeconds, `grace ${grace} s fits a spot reclaim's notice`);
                    assert.ok(drain > 0 && drain <= requestTimeout);
                } else {
                    assert.ok(drain >= requestTimeout, "in-flight requests may finish");
                }
            });

            it("leaves the replica count to the autoscaler: the Deployment declares none, so no apply fights the HPA over it", function () {
                const spec = byKind(evaluation(), kinds.deployment).inputs.spec;
                assert.ok(!("replicas" in spec), `spec.replicas is ${spec.replicas}`);
                assert.equal(byKind(evaluation(), kinds.scaledObject).inputs.spec.scaleTargetRef.name, byKind(evaluation(), kinds.deployment).inputs.metadata.name);
            });

            it("waits on the first up as long as a pod may take to serve, in the Deployment; the Service, for its load balancer only", function () {
                const deployment = byKind(evaluation(), kinds.deployment);
                const service = byKind(evaluation(), kinds.service);
                const probe = container(evaluation()).startupProbe;
                // The startup probe and the rollout's wait come from one table: node and image, the probe, the target's health checks.
                assert.equal(probe.periodSeconds * probe.failureThreshold, podStartSeconds.startup);
                const podStart = podStartSeconds.nodeAndImage + probe.periodSeconds * probe.failureThreshold + podStartSeconds.targetHealthy;
                for (const [phase, seconds] of Object.entries(timeoutSeconds(evaluation(), deployment))) {
                    assert.ok(seconds >= podStart, `the Deployment's ${phase} waits ${seconds} s, a pod may take ${podStart} s`);
                }
                // pulumi-kubernetes' default Service await also waits for Endpoints with a pod (10 minutes); the pods come
                // after the Service here, so the Service waits for the controller's hostname instead, within its own budget.
                assert.equal(service.inputs.metadata.annotations["pulumi.com/waitFor"], "jsonpath={.status.loadBalancer.ingress[0].hostname}");
                assert.deepEqual(timeoutSeconds(evaluation(), service), { create: loadBalancerReadySeconds, update: loadBalancerReadySeconds });
                assert.ok(dependsOn(evaluation(), deployment, service), "the pods come after the Service");
                assert.ok(!dependsOn(evaluation(), service, deployment), "and the Service waits for no pod");
            });

            it("keeps a healthy target through a rollout at every replica count: readiness gate, surge or one pod down, within the PDB", function () {
                const deployment = byKind(evaluation(), kinds.deployment);
                const service = byKind(evaluation(), kinds.service);
                // The gate: the LB controller injects it into pods of a labelled namespace, created once a TargetGroupBinding
                // (made before the Service's hostname) targets a Service that selects them with IP targets.
                const namespace = findResources(evaluation().resources, "kubernetes:core/v1:Namespace").find(
                    (candidate) => candidate.inputs.metadata.name === deployment.inputs.metadata.namespace,
                )?.inputs.metadata ?? assert.fail("the workload's namespace is declared");
                assert.equal(namespace.labels["elbv2.k8s.aws/pod-readiness-gate-inject"], "enabled");
                assert.ok(dependsOn(evaluation(), deployment, service), "the pods are created after the Service and its TargetGroupBinding");
                assert.ok(matches(service.inputs.spec.selector, deployment.inputs.spec.template.metadata.labels));
                assert.equal(service.inputs.metadata.annotations["service.beta.kubernetes.io/aws-load-balancer-nlb-target-type"], "ip");
                const controller = release(evaluation(), "aws-load-balancer-controller").inputs.values;
                assert.equal(controller.podMutatorWebhookConfig.failurePolicy, "Fail", "no pod is created without its gate");
                // With the gate a pod is Ready only once its target is healthy: the pods the Deployment keeps available
                // (replicas - maxUnavailable) are healthy targets, as are those a drain leaves (the PDB counts Ready pods).
                const { type, rollingUpdate } = deployment.inputs.spec.strategy;
                assert.equal(type, "RollingUpdate");
                const pdb = byKind(evaluation(), kinds.pdb).inputs.spec;
                const scaled = byKind(evaluation(), kinds.scaledObject).inputs.spec;
                const types = config(evaluation(), "gpuInstanceTypes") as string[];
                // Every pod takes a whole GPU: the fleet holds gpuMaxSize nodes of the group's GPU count.
                const gpuPods = (config(evaluation(), "gpuMaxSize") as number) * gpuInstanceTypes[types[0]].gpuCount;
                // At zero pods there is nothing to roll out; a stack that scales to zero runs one pod when it runs.
                for (let replicas = Math.max(1, scaled.minReplicaCount); replicas <= scaled.maxReplicaCount; replicas++) {
                    const surge = resolvePods(rollingUpdate.maxSurge, replicas, Math.ceil);
                    const down = resolvePods(rollingUpdate.maxUnavailable, replicas, Math.floor);
                    assert.ok(replicas + surge <= gpuPods || down >= 1, `at ${replicas} of ${gpuPods} GPUs a rollout can place a pod or free a GPU`);
                    assert.ok(replicas - down >= 1, `at ${replicas} pods a rollout keeps ${replicas - down} healthy target(s)`);
                    if (replicas + surge <= gpuPods) assert.equal(down, 0, `at ${replicas} of ${gpuPods} GPUs a rollout surges and loses no capacity`);
                    // The Deployment controller deletes old pods without asking the PDB: the strategy keeps to it itself.
                    assert.ok(down <= pdb.maxUnavailable, `the rollout takes down at most the ${pdb.maxUnavailable} pod the PDB allows`);
                }
            });

            it("bounds what a pod holds by what it has: decoded audio by its memory beside live sessions at their limit, uploads by its /tmp volume, worst case included", function () {
                const variables = env(evaluation());
                const limitMiB = memoryMiB(container(evaluation()).resources.limits.memory);
                const queuedAudio = Number(variables.WHISPER_MAX_QUEUED_AUDIO_SECONDS);
                const maxAudio = config(evaluation(), "maxAudioSeconds") as number;
                // 64 KiB a second in each of the server's two processes, one more copy of a file as it finishes decoding,
                // and the server's processes and model (the catalog's estimate).
                const hostMiB = serverHostMemoryGiB(config(evaluation(), "modelId") as string, config(evaluation(), "modelDtype") as Dtype) * 1024;
                // Live sessions at the limit, each with its most audio ahead of the decoder (in both processes) and a
                // message of the largest size being read (its text, the parsed audio string, the decoded bytes).
                const sessions = Number(variables.WHISPER_MAX_REALTIME_SESSIONS);
                const liveMiB = sessions * ((Number(variables.WHISPER_REALTIME_MAX_BUFFERED_SECONDS) * 2 * 64) / 1024 + 3 * Number(variables.WHISPER_REALTIME_MAX_MESSAGE_MB));
                assert.ok(sessions >= 1 && liveMiB > 0);
                const worstMiB = hostMiB + liveMiB + ((2 * queuedAudio + maxAudio) * 64) / 1024;
                assert.ok(worstMiB <= limitMiB, `worst case ${Math.round(worstMiB)} MiB within the ${limitMiB} MiB limit`);
                assert.ok(queuedAudio >= maxAudio, "one request with the longest audio is admitted");
                // The old bound, requests × longest audio, would not fit: the audio bound is what keeps the pod alive.
                assert.ok(((config(evaluation(), "queueSize") as number) * maxAudio * 128) / 1024 > limitMiB);
                const tmp = podSpec(evaluation()).volumes.find((volume: any) => volume.name === "tmp").emptyDir.sizeLimit;
                assert.equal(tmp, `${config(evaluation(), "uploadSpoolGiB")}Gi`);
                assert.equal(container(evaluation()).resources.requests["ephemeral-storage"], tmp, "the scheduler counts the /tmp volume");
                const spoolMb = Number(variables.WHISPER_MAX_SPOOL_MB);
                const maxUpload = config(evaluation(), "maxUploadMb") as number;
                assert.ok(spoolMb <= (config(evaluation(), "uploadSpoolGiB") as number) * 1024 && spoolMb >= maxUpload);
                assert.ok(Number(variables.WHISPER_MAX_CONCURRENT_UPLOADS) * maxUpload <= spoolMb, "every upload at once, each at the largest size, fits /tmp");
                assert.ok(Number(variables.WHISPER_MAX_CONCURRENT_UPLOADS) >= 1);
            });

            it("runs locked down: non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp, read-only root with a writable /tmp", function () {
                const spec = podSpec(evaluation());
                const security = container(evaluation()).securityContext;
                assert.equal(spec.securityContext.runAsNonRoot, true);
                assert.equal(spec.securityContext.seccompProfile.type, "RuntimeDefault");
                assert.equal(security.allowPrivilegeEscalation, false);
                assert.deepEqual(security.capabilities.drop, ["ALL"]);
                assert.equal(security.readOnlyRootFilesystem, true);
                const tmp = container(evaluation()).volumeMounts.find((mount: any) => mount.mountPath === "/tmp");
                assert.ok(spec.volumes.find((volume: any) => volume.name === tmp.name).emptyDir, "/tmp is an emptyDir");
            });

            it("mounts no service account token: the server never calls the Kubernetes API", function () {
                assert.equal(podSpec(evaluation()).automountServiceAccountToken, false);
            });

            it("admits traffic to the API port only from the VPC, where the NLB's addresses are, and nothing else", function () {
                const policy = byKind(evaluation(), kinds.networkPolicy).inputs;
                const deployment = byKind(evaluation(), kinds.deployment).inputs;
                assert.equal(policy.metadata.namespace, deployment.metadata.namespace);
                assert.ok(matches(policy.spec.podSelector.matchLabels, deployment.spec.template.metadata.labels), "it selects the server's pods");
                assert.deepEqual(policy.spec.policyTypes, ["Ingress"]);
                // IP targets without client IP preservation: the pods see the NLB's private addresses, inside the VPC.
                const annotations = byKind(evaluation(), kinds.service).inputs.metadata.annotations;
                assert.ok(!JSON.stringify(annotations).includes("preserve_client_ip.enabled=true"), "client IPs are not preserved");
                assert.deepEqual(policyRuleFor(evaluation(), "http"), [
                    { from: [{ ipBlock: { cidr: config(evaluation(), "vpcCidr") } }], ports: [{ port: 8000, protocol: "TCP" }] },
                ]);
                const openPorts = policy.spec.ingress.flatMap((rule: any) => rule.ports.map((port: any) => port.port));
                const containerPorts = container(evaluation()).ports.map((port: any) => port.containerPort);
                assert.deepEqual([...openPorts].sort(), [...containerPorts].sort(), "a rule for each port the pod serves, none for others");
                // The VPC CNI's policy agent skipped named ports in rules with a CIDR peer before v1.0.8: numbers only.
                assert.ok(openPorts.every(Number.isInteger), `numeric ports: ${JSON.stringify(openPorts)}`);
            });

            it("runs as the image's own user, which owns the model cache", function () {
                const dockerfile = fs.readFileSync(path.join(repoRoot, "service", "Dockerfile"), "utf8");
                const [uid, gid] = (/^USER (\d+):(\d+)$/m.exec(dockerfile) ?? assert.fail("the Dockerfile sets a numeric USER")).slice(1).map(Number);
                const security = podSpec(evaluation()).securityContext;
                assert.deepEqual([security.runAsUser, security.runAsGroup, security.fsGroup], [uid, gid, gid]);
            });

            it("spreads the pods across zones and hosts", function () {
                const keys = podSpec(evaluation()).topologySpreadConstraints.map((constraint: any) => constraint.topologyKey);
                assert.deepEqual(keys, ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]);
            });

            it("configures the server only through settings it has, from the stack config", function () {
                const names = serverEnvironmentNames();
                const variables = env(evaluation());
                for (const name of Object.keys(variables).filter((variable) => variable.startsWith("WHISPER_"))) {
                    assert.ok(names.has(name), `${name} is a setting of whisper-server`);
                }
                assert.equal(variables.WHISPER_MODEL, config(evaluation(), "modelId"));
                assert.equal(variables.WHISPER_DTYPE, config(evaluation(), "modelDtype"));
                assert.equal(Number(variables.WHISPER_MAX_BATCH_SIZE), config(evaluation(), "maxBatchSize"));
                assert.equal(Number(variables.WHISPER_BEAM_SIZE), config(evaluation(), "beamSize"));
                assert.equal(variables.WHISPER_CONDITION_ON_PREVIOUS_TEXT, String(config(evaluation(), "conditionOnPreviousText")));
                assert.equal(Number(variables.WHISPER_QUEUE_SIZE), config(evaluation(), "queueSize"));
                assert.equal(variables.HF_HOME, "/models/hf");
                const cache = container(evaluation()).volumeMounts.find((mount: any) => mount.mountPath === "/models");
                const volume = podSpec(evaluation()).volumes.find((candidate: any) => candidate.name === cache.name);
                assert.equal(volume.persistentVolumeClaim.claimName, byKind(evaluation(), kinds.pvc).inputs.metadata.name);
            });

            it("shares a ReadWriteMany EFS model cache: encrypted, mounted in every node subnet, NFS open to the nodes only", function () {
                const pvc = byKind(evaluation(), kinds.pvc).inputs.spec;
                assert.deepEqual(pvc.accessModes, ["ReadWriteMany"]);
                const storageClass = findResources(evaluation().resources, kinds.storageClass).find((candidate) => candidate.inputs.metadata.name === pvc.storageClassName);
                assert.ok(storageClass, "the PVC's StorageClass is declared");
                assert.equal(storageClass.inputs.provisioner, "efs.csi.aws.com");
                assert.equal(storageClass.inputs.parameters.provisioningMode, "efs-ap");
                assert.equal(Number(storageClass.inputs.parameters.uid), podSpec(evaluation()).securityContext.runAsUser, "access points belong to the server's user");
                const fileSystem = byKind(evaluation(), "aws:efs/fileSystem:FileSystem");
                assert.equal(fileSystem.inputs.encrypted, true);
                assert.equal(storageClass.inputs.parameters.fileSystemId, fileSystem.state.id);
                const mountTargets = findResources(evaluation().resources, "aws:efs/mountTarget:MountTarget");
                assert.equal(mountTargets.length, config(evaluation(), "availabilityZoneCount"));
                assert.equal(new Set(mountTargets.map((target) => target.inputs.subnetId)).size, mountTargets.length, "one per subnet");
                const vpc = byKind(evaluation(), "awsx:ec2:Vpc");
                assert.deepEqual(mountTargets.map((target) => target.inputs.subnetId).sort(), [...vpc.state.privateSubnetIds].sort());
                const nfs = findResources(evaluation().resources, "aws:ec2/securityGroup:SecurityGroup").find((group) => group.state.id === mountTargets[0].inputs.securityGroups[0]);
                assert.ok(nfs, "the mount targets' security group");
                const cluster = byKind(evaluation(), "eks:index:Cluster");
                assert.deepEqual(nfs.inputs.ingress.map((rule: any) => [rule.fromPort, rule.toPort, rule.securityGroups]), [[2049, 2049, [cluster.state.eksCluster.vpcConfig.clusterSecurityGroupId]]]);
                const driver = findResources(evaluation().resources, "aws:eks/addon:Addon").find((addon) => addon.inputs.addonName === "aws-efs-csi-driver");
                assert.ok(driver?.inputs.podIdentityAssociations?.[0]?.roleArn, "the EFS CSI driver add-on has its IAM role");
            });

            it("serves through an NLB with IP targets, a readiness health check and an idle timeout longer than any request", function () {
                const service = byKind(evaluation(), kinds.service).inputs;
                const annotations: Record<string, string> = service.metadata.annotations;
                const prefix = "service.beta.kubernetes.io/aws-load-balancer";
                assert.equal(service.spec.type, "LoadBalancer");
                assert.equal(service.spec.loadBalancerClass, "service.k8s.aws/nlb");
                assert.equal(annotations[`${prefix}-nlb-target-type`], "ip");
                assert.equal(annotations[`${prefix}-scheme`], config(evaluation(), "loadBalancerScheme"));
                assert.equal(annotations[`${prefix}-healthcheck-path`], "/readyz");
                const idle = Number(/tcp\.idle_timeout\.seconds=(\d+)/.exec(annotations[`${prefix}-listener-attributes.TCP-80`])?.[1]);
                assert.ok(idle > (config(evaluation(), "requestTimeoutSeconds") as number) && idle <= 6000, `idle timeout ${idle}`);
                assert.deepEqual(service.spec.loadBalancerSourceRanges, config(evaluation(), "loadBalancerSourceRanges"));
                assert.deepEqual(service.spec.ports.map((port: any) => [port.name, port.port, port.targetPort]), [["http", 80, "http"]]);
                const controller = release(evaluation(), "aws-load-balancer-controller");
                assert.ok(dependsOn(evaluation(), byKind(evaluation(), kinds.service), controller), "the Service waits for the controller's webhook");
            });

            it("installs the load balancer controller without its Service webhook, which would refuse other charts' Services until it is ready", function () {
                const values = release(evaluation(), "aws-load-balancer-controller").inputs.values;
                assert.equal(values.enableServiceMutatorWebhook, false);
                // The webhook would have set the class; the Service names it itself.
                assert.equal(byKind(evaluation(), kinds.service).inputs.spec.loadBalancerClass, "service.k8s.aws/nlb");
            });

            it("requires an API key, kept in a Kubernetes Secret and exported only as a secret", function () {
                const reference = env(evaluation()).WHISPER_API_KEY.secretKeyRef;
                const secret = findResources(evaluation().resources, kinds.secret).find((candidate) => candidate.inputs.metadata.name === reference.name);
                assert.ok(secret, `the Secret ${reference.name} is declared`);
                assert.equal(secret.inputs.metadata.namespace, byKind(evaluation(), kinds.deployment).inputs.metadata.namespace);
                assert.ok(evaluation().secretOutputs.includes("apiKey"), "the generated key is a secret output");
                assert.ok(findResources(evaluation().resources, "random:index/randomPassword:RandomPassword").length >= 2, "key and Grafana password are generated");
            });

            it("serves /metrics on a port of its own, which Prometheus scrapes from the pods and the load balancer never exposes", function () {
                const ports = container(evaluation()).ports;
                assert.deepEqual(ports.map((port: any) => [port.name, port.containerPort, port.protocol]), [["http", 8000, "TCP"], ["metrics", 9090, "TCP"]]);
                assert.equal(env(evaluation()).WHISPER_PORT, "8000");
                assert.equal(env(evaluation()).WHISPER_METRICS_PORT, "9090");
                // The load balancer's port map: the API port only, by name and by number.
                const service = byKind(evaluation(), kinds.service).inputs;
                for (const port of service.spec.ports) {
                    assert.notEqual(port.targetPort, "metrics");
                    assert.notEqual(port.targetPort, 9090);
                    assert.notEqual(port.port, 9090);
                    assert.notEqual(port.name, "metrics");
                }
                assert.deepEqual(service.spec.ports.map((port: any) => port.targetPort), ["http"]);
                // Prometheus scrapes the pods directly: a PodMonitor on the metrics port, no Service in between.
                const monitor = byKind(evaluation(), kinds.podMonitor).inputs;
                const deployment = byKind(evaluation(), kinds.deployment).inputs;
                assert.equal(monitor.metadata.namespace, deployment.metadata.namespace);
                assert.ok(matches(monitor.spec.selector.matchLabels, deployment.spec.template.metadata.labels), "the PodMonitor selects the server's pods");
                assert.deepEqual(monitor.spec.podMetricsEndpoints.map((endpoint: any) => [endpoint.port, endpoint.path]), [["metrics", "/metrics"]]);
                assert.equal(findResources(evaluation().resources, "kubernetes:monitoring.coreos.com/v1:ServiceMonitor").length, 0);
                assert.ok(dependsOn(evaluation(), byKind(evaluation(), kinds.podMonitor), release(evaluation(), "kube-prometheus-stack")), "the PodMonitor waits for the CRDs");
                assert.ok(dependsOn(evaluation(), byKind(evaluation(), kinds.prometheusRule), release(evaluation(), "kube-prometheus-stack")));
            });

            it("admits the metrics port from the monitoring namespace only", function () {
                assert.deepEqual(policyRuleFor(evaluation(), "metrics"), [
                    { from: [{ namespaceSelector: { matchLabels: { "kubernetes.io/metadata.name": "monitoring" } } }], ports: [{ port: 9090, protocol: "TCP" }] },
                ]);
                const prometheus = release(evaluation(), "kube-prometheus-stack");
                assert.equal(prometheus.inputs.namespace, "monitoring", "Prometheus runs in the namespace the rule admits");
            });

            it("scales with KEDA on the configured metric in the Prometheus that scrapes the pods, per pod, with min, max and a slow scale-down", function () {
                const scaled = byKind(evaluation(), kinds.scaledObject).inputs;
                const deployment = byKind(evaluation(), kinds.deployment).inputs;
                assert.deepEqual([scaled.spec.scaleTargetRef.kind, scaled.spec.scaleTargetRef.name], ["Deployment", deployment.metadata.name]);
                assert.equal(scaled.metadata.namespace, deployment.metadata.namespace);
                const prometheusTrigger = scaled.spec.triggers.find((trigger: any) => trigger.type === "prometheus");
                const stack = release(evaluation(), "kube-prometheus-stack").inputs;
                assert.equal(prometheusTrigger.metadata.serverAddress, `http://${stack.values.fullnameOverride}-prometheus.${stack.namespace}.svc:9090`);
                // The whole service's value, which KEDA's HPA divides by the pods: an AverageValue target is per pod.
                assert.equal(prometheusTrigger.metricType, "AverageValue");
                assert.match(prometheusTrigger.metadata.query, new RegExp(`^sum\\(.*${config(evaluation(), "scalingMetric")}\\{namespace="${deployment.metadata.namespace}"\\}`));
                assert.equal(Number(prometheusTrigger.metadata.threshold), config(evaluation(), "targetQueuedAudioSeconds"));
                assert.equal(scaled.spec.minReplicaCount, config(evaluation(), "minReplicas"));
                assert.equal(scaled.spec.maxReplicaCount, config(evaluation(), "maxReplicas"));
                const requestTimeout = config(evaluation(), "requestTimeoutSeconds") as number;
                assert.ok(scaled.spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.stabilizationWindowSeconds >= requestTimeout);
                assert.ok(scaled.spec.cooldownPeriod >= Math.min(3600, requestTimeout), "the last pod goes only after the longest request could finish");
                assert.ok(dependsOn(evaluation(), byKind(evaluation(), kinds.scaledObject), release(evaluation(), "keda")), "the ScaledObject waits for KEDA's CRDs");
                assert.equal(findResources(evaluation().resources, kinds.hpa).length, 0, "no second HPA on the Deployment: KEDA makes its own");
            });

            it("keeps KEDA scaling through the loss of a pod: standby operator and metrics server, PDBs, on different nodes", function () {
                // One of each is active at a time (leader election; one metrics server serves the external metrics API):
                // the second replica is a standby, worth something only if a drain or a node loss cannot take both.
                const values = release(evaluation(), "keda").inputs.values;
                for (const [component, app, budget] of [
                    ["operator", "keda-operator", "operator"],
                    ["metricsServer", "keda-operator-metrics-apiserver", "metricServer"],
                ]) {
                    assert.equal(values[component].replicaCount, 2, `${component}: a standby`);
                    assert.deepEqual(values.podDisruptionBudget[budget], { minAvailable: 1 }, `${component}: a drain keeps one`);
                    const [term] = values[component].affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution;
                    assert.deepEqual(term.podAffinityTerm, { labelSelector: { matchLabels: { app } }, topologyKey: "kubernetes.io/hostname" });
                }
                // Preferred, not required: dev runs one system node, where a required rule would leave a replica Pending.
                assert.ok(!JSON.stringify(values).includes("requiredDuringScheduling"));
            });

            it("pins every Helm chart to an exact version under an explicit release name", function () {
                const releases = findResources(evaluation().resources, kinds.release);
                const names = releases.map((candidate) => candidate.inputs.name);
                for (const expected of ["aws-load-balancer-controller", "kube-prometheus-stack", "dcgm-exporter", "keda", "karpenter-crd", "karpenter"]) {
                    assert.ok(names.includes(expected), `release ${expected}`);
                }
                for (const candidate of releases) {
                    assert.match(candidate.inputs.version, /^\d+\.\d+\.\d+$/, `${candidate.inputs.name} version`);
                    // A repository chart beside its repository, or an OCI chart by its full reference.
                    assert.ok(/^https:\/\//.test(candidate.inputs.repositoryOpts?.repo) || /^oci:\/\/[^/]+\/.+\/[^/]+$/.test(candidate.inputs.chart), candidate.inputs.name);
                    assert.ok(candidate.inputs.namespace, `${candidate.inputs.name} namespace`);
                }
            });

            it("runs kube-prometheus-stack on system nodes, selecting every monitor and rule, without EKS control-plane scrapes", function () {
                const values = release(evaluation(), "kube-prometheus-stack").inputs.values;
                const spec = values.prometheus.prometheusSpec;
                for (const key of ["serviceMonitorSelectorNilUsesHelmValues", "podMonitorSelectorNilUsesHelmValues", "ruleSelectorNilUsesHelmValues"]) {
                    assert.equal(spec[key], false, key);
                }
                for (const scrape of ["kubeScheduler", "kubeControllerManager", "kubeEtcd"]) assert.equal(values[scrape].enabled, false, scrape);
                assert.equal(spec.retention, `${config(evaluation(), "prometheusRetentionDays")}d`);
                assert.equal(spec.storageSpec.volumeClaimTemplate.spec.storageClassName, "gp3");
                const systemGroup = findResources(evaluation().resources, "eks:index:ManagedNodeGroup").find((group) => group.inputs.amiType === "AL2023_x86_64_STANDARD");
                for (const selector of [spec.nodeSelector, values.grafana.nodeSelector, values.prometheusOperator.nodeSelector]) {
                    assert.ok(matches(selector, systemGroup!.inputs.labels), "on system nodes");
                }
                assert.equal(values.grafana.sidecar.dashboards.enabled, true);
                assert.equal(values.grafana.adminPassword, undefined, "the password stays out of the Helm values");
                assert.ok(evaluation().secretOutputs.includes("grafanaAdminPassword"));
            });

            it("runs the DCGM exporter on the GPU nodes only, tolerating their taint, with a ServiceMonitor", function () {
                const values = release(evaluation(), "dcgm-exporter").inputs.values;
                assert.ok(matches(values.nodeSelector, podSpec(evaluation()).nodeSelector));
                assert.deepEqual(values.tolerations, podSpec(evaluation()).tolerations);
                assert.equal(values.serviceMonitor.enabled, true);
            });

            it("alerts on GPU memory (with a companion signal), errors, latency, queue saturation and unready pods", function () {
                const rules = byKind(evaluation(), kinds.prometheusRule).inputs.spec.groups.flatMap((group: any) => group.rules);
                const named = (name: string) => rules.find((rule: any) => rule.alert === name) ?? assert.fail(`alert ${name}`);
                const gpuMemory = named("WhisperGpuMemoryHigh");
                assert.match(gpuMemory.expr, /DCGM_FI_DEV_FB_USED/);
                assert.match(gpuMemory.expr, /> 0\.9$/);
                assert.equal(gpuMemory.for, "5m");
                // The gauge holds the last XID for ever: the alert must look for a change within a window, not at the value.
                const xid = named("WhisperGpuXidError");
                assert.match(xid.expr, /changes\(DCGM_FI_DEV_XID_ERRORS\[\d+m\]\) > 0/);
                assert.doesNotMatch(xid.expr.replace(/changes\(DCGM_FI_DEV_XID_ERRORS\[\d+m\]\) > 0/, ""), /^[^a]*DCGM_FI_DEV_XID_ERRORS\) > 0$/);
                assert.match(xid.expr, /DCGM_FI_DEV_XID_ERRORS > 0 and /, "an exporter restart (back to 0) is no error");
                assert.match(named("WhisperHighErrorRatio").expr, /status=~"5\.\."/);
                assert.match(named("WhisperHighLatencyP95").expr, /histogram_quantile\(0\.95, .*http_request_duration_seconds_bucket/);
                assert.match(named("WhisperQueueSaturated").expr, new RegExp(`whisper_requests_in_flight.*/ ${config(evaluation(), "queueSize")} `));
                assert.match(named("WhisperPodsNotReady").expr, /kube_deployment_status_replicas_ready/);
            });

            it("can fire the p95 latency alert: its threshold lies inside the latency histogram's buckets", function () {
                const buckets = serverHistogramBuckets("http_request_duration_seconds");
                const threshold = config(evaluation(), "alertP95LatencySeconds") as number;
                const rule = byKind(evaluation(), kinds.prometheusRule).inputs.spec.groups.flatMap((group: any) => group.rules).find((candidate: any) => candidate.alert === "WhisperHighLatencyP95");
                assert.match(rule.expr, new RegExp(`> ${threshold}$`));
                // histogram_quantile never answers above the largest finite bucket: a threshold at or past it never fires.
                assert.ok(threshold < Math.max(...buckets), `threshold ${threshold} below the largest bucket ${Math.max(...buckets)}`);
            });

            it("queries only metrics the server exports, in alerts, dashboard and scaling triggers", function () {
                const exported = serverMetricNames();
                const dashboard = JSON.parse(byKind(evaluation(), kinds.configMap).inputs.data["whisper.json"]);
                const queries = [
                    ...byKind(evaluation(), kinds.prometheusRule).inputs.spec.groups.flatMap((group: any) => group.rules.map((rule: any) => rule.expr)),
                    ...dashboard.panels.flatMap((panel: any) => panel.targets.map((target: any) => target.expr)),
                    ...byKind(evaluation(), kinds.scaledObject).inputs.spec.triggers.flatMap((trigger: any) => trigger.metadata.query ?? []),
                ];
                const used = new Set(queries.flatMap((query: string) => query.match(/\b(whisper|http)_[a-z_]+\b/g) ?? []));
                assert.ok(used.size >= 8);
                for (const metric of used) assert.ok(exported.has(metric), `${metric} is exported by the server (${[...exported].join(", ")})`);
            });

            it("ships a Grafana dashboard the sidecar loads, with the service's and the GPUs' panels", function () {
                const dashboard = byKind(evaluation(), kinds.configMap).inputs;
                assert.equal(dashboard.metadata.labels.grafana_dashboard, "1");
                const model = JSON.parse(dashboard.data["whisper.json"]);
                const expressions = model.panels.flatMap((panel: any) => panel.targets.map((target: any) => target.expr)).join("\n");
                for (const metric of ["http_requests_total", "http_request_duration_seconds_bucket", "whisper_audio_seconds_total", "whisper_queue_depth", "whisper_batch_size", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"]) {
                    assert.ok(expressions.includes(metric), `a panel shows ${metric}`);
                }
            });
        });
    }

    it("gives the latency histogram buckets past every p95 threshold and request timeout config accepts", function () {
        const largest = Math.max(...serverHistogramBuckets("http_request_duration_seconds"));
        assert.ok(alertP95LatencySecondsRange.max < largest, `alertP95LatencySeconds up to ${alertP95LatencySecondsRange.max} < ${largest}`);
        assert.ok(requestTimeoutSecondsRange.max < largest, `the longest request (${requestTimeoutSecondsRange.max} s) is measured below ${largest}`);
    });

    it("sizes dev and prod as their stack files say", function () {
        const scaled = (stack: string) => byKind(stacks[stack], kinds.scaledObject).inputs.spec;
        assert.deepEqual([scaled("dev").minReplicaCount, scaled("dev").maxReplicaCount], [0, 2]);
        assert.deepEqual([scaled("prod").minReplicaCount, scaled("prod").maxReplicaCount], [2, 10]);
        const retention = (stack: string) => release(stacks[stack], "kube-prometheus-stack").inputs.values.prometheus.prometheusSpec.retention;
        assert.notEqual(retention("dev"), retention("prod"));
        assert.notEqual(container(stacks.dev).resources.requests.memory, container(stacks.prod).resources.requests.memory, "pods sized from each stack's GPU types");
    });

    it("takes dev to zero pods, and so zero GPU nodes, outside its active hours, and brings one pod back on schedule", function () {
        const scaled = byKind(stacks.dev, kinds.scaledObject).inputs.spec;
        assert.equal(scaled.minReplicaCount, 0);
        // With no pod there is no load metric: only the schedule can start the first pod.
        const cron = scaled.triggers.find((trigger: any) => trigger.type === "cron");
        assert.deepEqual(cron?.metadata, {
            timezone: config(stacks.dev, "activeHoursTimezone"),
            start: config(stacks.dev, "activeHoursStart"),
            end: config(stacks.dev, "activeHoursEnd"),
            desiredReplicas: "1",
        });
        assert.ok(Intl.supportedValuesOf("timeZone").includes(cron.metadata.timezone));
        // With no pod, Karpenter removes the empty GPU node: nothing keeps one (no node group with a minimum).
        const pool = byKind(stacks.dev, "kubernetes:karpenter.sh/v1:NodePool").inputs.spec;
        assert.equal(pool.disruption.consolidationPolicy, "WhenEmpty");
        assert.equal(pool.replicas, undefined, "not a static pool");
        assert.equal(findResources(stacks.dev.resources, "eks:index:ManagedNodeGroup").filter((group) => group.inputs.amiType !== "AL2023_x86_64_STANDARD").length, 0);
        // prod never goes below its minimum and needs no schedule.
        const prod = byKind(stacks.prod, kinds.scaledObject).inputs.spec;
        assert.equal(prod.minReplicaCount, 2);
        assert.equal(prod.triggers.filter((trigger: any) => trigger.type === "cron").length, 0);
    });

    describe("variants", function () {
        it("scales prod on requests per second at 10 per pod when asked (the original design)", async function () {
            const evaluation = await evaluateStack("prod", { scalingMetric: "http_requests_per_second" });
            const trigger = byKind(evaluation, kinds.scaledObject).inputs.spec.triggers.find((candidate: any) => candidate.type === "prometheus");
            assert.equal(trigger.metadata.threshold, "10");
            // API calls only: probes and scrapes are not traffic.
            assert.equal(trigger.metadata.query, 'sum(rate(http_requests_total{namespace="whisper",route=~"/v1/audio/.*"}[2m]))');
        });

        it("uses a single-replica gp3 cache with Recreate rollouts when asked for EBS", async function () {
            const evaluation = await evaluateStack("dev", { modelCacheStorage: "ebs", maxReplicas: 1 });
            const pvc = byKind(evaluation, kinds.pvc).inputs.spec;
            assert.deepEqual([pvc.accessModes, pvc.storageClassName], [["ReadWriteOnce"], "gp3"]);
            assert.equal(byKind(evaluation, kinds.deployment).inputs.spec.strategy.type, "Recreate");
            assert.equal(findResources(evaluation.resources, "aws:efs/fileSystem:FileSystem").length, 0);
        });

        it("surges without losing capacity when the HPA's maximum leaves a GPU to spare", async function () {
            const evaluation = await evaluateStack("prod", { maxReplicas: 8 });
            assert.deepEqual(byKind(evaluation, kinds.deployment).inputs.spec.strategy.rollingUpdate, { maxSurge: 1, maxUnavailable: 0 });
            // A fleet that may fill every GPU frees one at full scale only: 10 GPUs, 10% rounds down to 0 below 10 pods.
            const full = await evaluateStack("prod");
            assert.deepEqual(byKind(full, kinds.deployment).inputs.spec.strategy.rollingUpdate, { maxSurge: 1, maxUnavailable: "10%" });
        });

        it("serves TLS through an ALB whose HTTPS listener outlasts the longest request, to the pods' IPs, from the allowed sources only", async function () {
            const certificateArn = "arn:aws:acm:us-east-1:123456789012:certificate/0a1b2c3d-0a1b-0a1b-0a1b-0a1b2c3d4e5f";
            const evaluation = await evaluateStack("prod", { tlsCertificateArn: certificateArn, loadBalancerScheme: "internal", loadBalancerSourceRanges: ["10.0.0.0/8"] });
            const requestTimeout = config(evaluation, "requestTimeoutSeconds") as number;
            const idle = effectiveIdleTimeoutSeconds(evaluation);
            assert.ok(idle > requestTimeout, `the load balancer keeps a silent connection ${idle} s, the longest request takes ${requestTimeout} s`);
            const service = byKind(evaluation, kinds.service).inputs;
            assert.equal(service.spec.type, "ClusterIP", "no second load balancer: the Service only names the pods");
            assert.deepEqual(service.metadata.annotations, { "pulumi.com/waitFor": "jsonpath={.spec.clusterIP}" }, "no pod awaited, no NLB annotations");
            const ingress = byKind(evaluation, kinds.ingress).inputs;
            const annotations: Record<string, string> = ingress.metadata.annotations;
            const alb = (key: string) => annotations[`alb.ingress.kubernetes.io/${key}`];
            assert.equal(ingress.spec.ingressClassName, "alb");
            assert.deepEqual(ingress.spec.defaultBackend.service, { name: service.metadata.name, port: { name: "http" } });
            assert.deepEqual(JSON.parse(alb("listen-ports")), [{ HTTPS: 443 }]);
            assert.equal(alb("certificate-arn"), certificateArn);
            assert.match(alb("ssl-policy"), /^ELBSecurityPolicy-TLS13-/);
            assert.equal(alb("scheme"), "internal");
            assert.equal(alb("target-type"), "ip");
            assert.equal(alb("inbound-cidrs"), "10.0.0.0/8");
            assert.equal(alb("healthcheck-path"), "/readyz");
            assert.ok(serverRoutes().get(alb("healthcheck-path"))?.includes("GET"));
            const delay = Number(/deregistration_delay\.timeout_seconds=(\d+)/.exec(alb("target-group-attributes"))?.[1]);
            assert.ok(delay >= Math.min(3600, requestTimeout) && delay <= 3600, `deregistration delay ${delay}`);
            assert.ok(dependsOn(evaluation, byKind(evaluation, kinds.ingress), release(evaluation, "aws-load-balancer-controller")), "the Ingress waits for the controller's webhook");
            // The ALB's TargetGroupBinding comes from the Ingress: the pods wait for its hostname, so they get the readiness gate.
            assert.equal(ingress.metadata.annotations["pulumi.com/waitFor"], "jsonpath={.status.loadBalancer.ingress[0].hostname}");
            assert.ok(dependsOn(evaluation, byKind(evaluation, kinds.deployment), byKind(evaluation, kinds.ingress)), "the pods come after the Ingress");
            for (const resource of [byKind(evaluation, kinds.ingress), byKind(evaluation, kinds.service)]) {
                assert.deepEqual(timeoutSeconds(evaluation, resource), { create: loadBalancerReadySeconds, update: loadBalancerReadySeconds }, resource.name);
            }
            // The ALB's nodes are in the VPC: the NetworkPolicy's API rule admits them to the port the Ingress targets.
            const [api] = policyRuleFor(evaluation, "http");
            assert.deepEqual(api.from, [{ ipBlock: { cidr: config(evaluation, "vpcCidr") } }]);
            assert.match(String(evaluation.outputs.serviceUrl), /^https:\/\//);
            // The ALB names the client in X-Forwarded-For: trusted from the VPC, so each client gets its own share.
            const variables = env(evaluation);
            assert.equal(variables.WHISPER_FORWARDED_ALLOW_IPS, config(evaluation, "vpcCidr"));
            assert.equal(variables.WHISPER_MAX_UPLOADS_PER_CLIENT, undefined, "the server's default share per client");
            assert.equal(variables.WHISPER_MAX_CONNECTIONS_PER_CLIENT, undefined, "the ALB's connections pass the per-client cap by");
            // The ALB reuses its idle connections to the pod: the pod must not close one first.
            assert.ok(Number(variables.WHISPER_KEEP_ALIVE_SECONDS) > effectiveIdleTimeoutSeconds(evaluation));
        });

        it("gives the server its upload deadlines from config; behind the NLB, where no client is named, no per-client share", async function () {
            const evaluation = await evaluateStack("prod", {
                uploadTimeoutSeconds: 1200, uploadIdleSeconds: 20, uploadMinBytesPerSecond: 8192, headTimeoutSeconds: 5, keepAliveSeconds: 30, maxConnections: 2048,
            });
            const variables = env(evaluation);
            assert.equal(variables.WHISPER_HEAD_TIMEOUT_SECONDS, "5");
            assert.equal(variables.WHISPER_MAX_CONNECTIONS, "2048");
            // Behind the NLB the client's own connection reaches the pod: closed idle before the NLB forgets it.
            assert.equal(variables.WHISPER_KEEP_ALIVE_SECONDS, "30");
            assert.ok(Number(variables.WHISPER_KEEP_ALIVE_SECONDS) < effectiveIdleTimeoutSeconds(evaluation));
            assert.equal(variables.WHISPER_MAX_CONNECTIONS_PER_CLIENT, variables.WHISPER_MAX_CONNECTIONS);
            assert.equal(variables.WHISPER_UPLOAD_TIMEOUT_SECONDS, "1200");
            assert.equal(variables.WHISPER_UPLOAD_IDLE_SECONDS, "20");
            assert.equal(variables.WHISPER_UPLOAD_MIN_BYTES_PER_SECOND, "8192");
            assert.ok(Number(variables.WHISPER_UPLOAD_IDLE_SECONDS) < effectiveIdleTimeoutSeconds(evaluation), "the server cuts a stalled upload before the load balancer does");
            // Every client arrives from the NLB's own addresses: a per-client share would be everyone's.
            assert.equal(variables.WHISPER_FORWARDED_ALLOW_IPS, undefined);
            assert.equal(variables.WHISPER_MAX_UPLOADS_PER_CLIENT, variables.WHISPER_MAX_CONCURRENT_UPLOADS);
        });

        it("keeps plain HTTP on an NLB TCP listener, whose idle timeout outlasts the longest request", async function () {
            const evaluation = await evaluateStack("prod");
            assert.ok(effectiveIdleTimeoutSeconds(evaluation) > (config(evaluation, "requestTimeoutSeconds") as number));
            assert.equal(findResources(evaluation.resources, kinds.ingress).length, 0);
        });

        it("keeps the NLB deregistration delay and HPA window within their one-hour limits for the longest requests", async function () {
            const evaluation = await evaluateStack("prod", { requestTimeoutSeconds: 5940, gpuConsolidateAfterMinutes: 100 });
            const annotations = byKind(evaluation, kinds.service).inputs.metadata.annotations;
            assert.equal(annotations["service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"], "deregistration_delay.timeout_seconds=3600");
            assert.equal(annotations["service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-80"], "tcp.idle_timeout.seconds=6000");
            assert.equal(byKind(evaluation, kinds.scaledObject).inputs.spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.stabilizationWindowSeconds, 3600);
            assert.ok(podSpec(evaluation).terminationGracePeriodSeconds > 5940, "the pod still gets to finish its longest request");
        });

        it("serves plain HTTP to the internet only with the explicit opt-in, which dev shows and prod does not use", async function () {
            const stackFile = (stack: string) => YAML.parse(fs.readFileSync(path.join(repoRoot, `Pulumi.${stack}.yaml`), "utf8")).config;
            assert.equal(stackFile("dev")["whisper-eks:allowPlaintextPublicAccess"], true, "Pulumi.dev.yaml shows the opt-in");
            assert.equal(stackFile("prod")["whisper-eks:allowPlaintextPublicAccess"], undefined, "prod never opts in");
            const dev = await evaluateStack("dev");
            assert.ok(byKind(dev, kinds.service).inputs.metadata.annotations["service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-80"]);
            // With a certificate, or on an internal load balancer, no opt-in is needed.
            const certificateArn = "arn:aws:acm:us-east-1:123456789012:certificate/0a1b2c3d-0a1b-0a1b-0a1b-0a1b2c3d4e5f";
            assert.equal((await tryEvaluateStack("dev", { allowPlaintextPublicAccess: false, tlsCertificateArn: certificateArn })).error, undefined);
            assert.equal((await tryEvaluateStack("dev", { allowPlaintextPublicAccess: false, loadBalancerScheme: "internal" })).error, undefined);
        });

        it("uses the API key and Grafana password from secret config instead of generating them", async function () {
            const evaluation = await evaluateStack("dev", { apiKey: new SecretValue("key-from-config"), grafanaAdminPassword: new SecretValue("grafana-from-config") });
            assert.equal(findResources(evaluation.resources, "random:index/randomPassword:RandomPassword").length, 0);
            assert.ok(evaluation.secretOutputs.includes("apiKey"));
        });

        it("serves without a key only on an internal or restricted endpoint, or with the explicit opt-in", async function () {
            const evaluation = await evaluateStack("dev", { requireApiKey: false, loadBalancerScheme: "internal" });
            assert.equal(env(evaluation).WHISPER_API_KEY, undefined);
            assert.equal(evaluation.outputs.apiKey, undefined);
            const optedIn = await evaluateStack("dev", { requireApiKey: false, allowUnauthenticatedPublicAccess: true });
            assert.equal(env(optedIn).WHISPER_API_KEY, undefined);
        });
    });

    describe("existing-cluster mode", function () {
        const kubeconfig = new SecretValue("apiVersion: v1\nkind: Config\nclusters: []\n");

        it("deploys the workload, monitoring and KEDA into the given cluster and says what it skipped", async function () {
            const evaluation = await evaluateStack("dev", { existingClusterKubeconfig: kubeconfig, modelCacheStorageClass: "shared-nfs" });
            for (const type of [
                "awsx:ec2:Vpc",
                "eks:index:Cluster",
                "eks:index:ManagedNodeGroup",
                "aws:efs/fileSystem:FileSystem",
                "aws:eks/podIdentityAssociation:PodIdentityAssociation",
                // Nothing of Karpenter: the cluster brings its own GPU nodes.
                "kubernetes:karpenter.sh/v1:NodePool",
                "kubernetes:karpenter.k8s.aws/v1:EC2NodeClass",
                "aws:sqs/queue:Queue",
                "aws:cloudwatch/eventRule:EventRule",
                "aws:eks/accessEntry:AccessEntry",
            ]) {
                assert.equal(findResources(evaluation.resources, type).length, 0, `no ${type}`);
            }
            const releases = findResources(evaluation.resources, kinds.release).map((candidate) => candidate.inputs.name).sort();
            assert.deepEqual(releases, ["dcgm-exporter", "keda", "kube-prometheus-stack"]);
            const provider = findResource(evaluation.resources, "pulumi:providers:kubernetes");
            assert.match(JSON.stringify(provider.inputs.kubeconfig), /kind: Config/);
            const pvc = byKind(evaluation, kinds.pvc).inputs.spec;
            assert.deepEqual([pvc.storageClassName, pvc.accessModes], ["shared-nfs", ["ReadWriteMany"]]);
            assert.ok(byKind(evaluation, kinds.deployment) && byKind(evaluation, kinds.scaledObject) && byKind(evaluation, kinds.podMonitor));
            // The VPC's range is unknown here: the API port is open to any source, as the cluster's load balancer sends it.
            const [api] = policyRuleFor(evaluation, "http");
            assert.equal(api.from, undefined);
            const skipped = evaluation.outputs.notDeployedInExistingCluster as string[];
            assert.ok(skipped.some((part) => part.includes("Karpenter")) && skipped.some((part) => part.includes("AWS Load Balancer Controller")));
            assert.equal(evaluation.outputs.kubeconfig, undefined);
            assert.equal(release(evaluation, "kube-prometheus-stack").inputs.values.prometheus.prometheusSpec.storageSpec.volumeClaimTemplate.spec.storageClassName, undefined);
        });

        it("refuses an existing cluster without a StorageClass for the model cache", async function () {
            const evaluation = await tryEvaluateStack("dev", { existingClusterKubeconfig: kubeconfig });
            assert.ok(evaluation.error?.message.includes("whisper-eks:modelCacheStorageClass"), evaluation.error?.message);
            assert.ok(evaluation.error?.message.includes("existingClusterKubeconfig is set"));
            assert.equal(evaluation.resources.length, 0);
        });

        /** Every nodeSelector in the monitoring stack's and KEDA's values. */
        const addonSelectors = (evaluation: StackEvaluation) => {
            const stack = release(evaluation, "kube-prometheus-stack").inputs.values;
            return [
                stack.prometheus.prometheusSpec.nodeSelector,
                stack.prometheusOperator.nodeSelector,
                stack.prometheusOperator.admissionWebhooks.patch.nodeSelector,
                stack.alertmanager.alertmanagerSpec.nodeSelector,
                stack["kube-state-metrics"].nodeSelector,
                stack.grafana.nodeSelector,
                release(evaluation, "keda").inputs.values.nodeSelector,
            ];
        };

        it("schedules monitoring and KEDA anywhere by default: no existing cluster's nodes carry this stack's pool label", async function () {
            const evaluation = await evaluateStack("dev", { existingClusterKubeconfig: kubeconfig, modelCacheStorageClass: "shared-nfs" });
            for (const selector of addonSelectors(evaluation)) assert.deepEqual(selector, {});
        });

        it("schedules them on the nodes existingClusterNodeSelector names", async function () {
            const evaluation = await evaluateStack("dev", {
                existingClusterKubeconfig: kubeconfig,
                modelCacheStorageClass: "shared-nfs",
                existingClusterNodeSelector: ["node-role.example.com/infra=true", "topology.kubernetes.io/zone=us-east-1a"],
            });
            for (const selector of addonSelectors(evaluation)) {
                assert.deepEqual(selector, { "node-role.example.com/infra": "true", "topology.kubernetes.io/zone": "us-east-1a" });
            }
        });
    });

    describe("refused configs", function () {
        const refused: { what: string; stack?: string; overrides: ConfigOverrides; expected: string[] }[] = [
            {
                what: "an EBS cache with more than one replica",
                overrides: { modelCacheStorage: "ebs", maxReplicas: 2 },
                expected: ['whisper-eks:modelCacheStorage = "ebs"', "ReadWriteOnce", "maxReplicas is 2", 'modelCacheStorage "efs"'],
            },
            {
                what: "an internet-facing endpoint open to everyone without an API key",
                overrides: { requireApiKey: false },
                expected: ["whisper-eks:requireApiKey = false", "0.0.0.0/0", "loadBalancerSourceRanges", "allowUnauthenticatedPublicAccess"],
            },
            {
                what: "more replicas than GPU nodes",
                overrides: { maxReplicas: 3 },
                expected: ["whisper-eks:maxReplicas = 3", "at most 2 pods", "gpuMaxSize"],
            },
            {
                what: "an internet-facing endpoint without TLS (the API key would cross the internet in the clear)",
                overrides: { allowPlaintextPublicAccess: false },
                expected: [
                    'whisper-eks:tlsCertificateArn = ""',
                    'loadBalancerScheme "internet-facing"',
                    "plain HTTP on port 80",
                    "in the clear",
                    "ACM certificate ARN",
                    'loadBalancerScheme "internal"',
                    "allowPlaintextPublicAccess to true",
                ],
            },
            {
                what: "plain HTTP on the internet for the prod stack, which does not opt in",
                stack: "prod",
                overrides: { loadBalancerScheme: "internet-facing" },
                expected: ['whisper-eks:tlsCertificateArn = ""', "allowPlaintextPublicAccess"],
            },
            { what: "minReplicas above maxReplicas", overrides: { minReplicas: 3 }, expected: ["whisper-eks:minReplicas = 3", "must not exceed maxReplicas (2)"] },
            {
                what: "audio so long that not even one request fits the pod's memory",
                overrides: { maxAudioSeconds: 36000 },
                expected: ["whisper-eks:maxAudioSeconds = 36000", "g6.xlarge", "MiB", "128 KiB a second", "not even one request", "or less"],
            },
            {
                what: "a /tmp volume smaller than one upload",
                overrides: { uploadSpoolGiB: 1, maxUploadMb: 1000 },
                expected: ["whisper-eks:uploadSpoolGiB = 1", "less than one upload of maxUploadMb (1000)", "uploadSpoolGiB to 2 or more"],
            },
            {
                what: "/tmp volumes that overflow the GPU node's disk",
                overrides: { uploadSpoolGiB: 61 },
                expected: ["whisper-eks:uploadSpoolGiB = 61", "gpuDiskSizeGiB (100)", "60 or less"],
            },
            {
                what: "zero replicas with nothing to start the first pod again",
                stack: "prod",
                overrides: { minReplicas: 0 },
                expected: ["whisper-eks:minReplicas = 0", "no load metric", "activeHoursStart, activeHoursEnd and activeHoursTimezone", "minReplicas to 1 or more"],
            },
            {
                what: "active hours for a stack that never scales to zero",
                overrides: { minReplicas: 1 },
                expected: ['whisper-eks:activeHoursStart = "0 8 * * 1-5"', "only matter when the service may scale to zero", "minReplicas to 0"],
            },
            {
                what: "active hours without their end and time zone",
                stack: "prod",
                overrides: { minReplicas: 0, activeHoursStart: "0 8 * * 1-5" },
                expected: ['whisper-eks:activeHoursStart = "0 8 * * 1-5"', "go together: set all three or none"],
            },
            {
                what: "active hours that are not cron expressions or a time zone",
                overrides: { activeHoursStart: "8am", activeHoursTimezone: "Mars/Olympus" },
                expected: ['whisper-eks:activeHoursStart = "8am"', "cron expression of 5 fields", 'whisper-eks:activeHoursTimezone = "Mars/Olympus"', "IANA time zone"],
            },
            {
                what: "TLS with requests longer than an ALB's idle timeout allows",
                stack: "prod",
                overrides: { tlsCertificateArn: "arn:aws:acm:us-east-1:123456789012:certificate/0a1b2c3d-0a1b-0a1b-0a1b-0a1b2c3d4e5f", requestTimeoutSeconds: 3941 },
                expected: ["whisper-eks:requestTimeoutSeconds = 3941", "tlsCertificateArn", "Application Load Balancer", "at most 4000 s", "3940 or less"],
            },
            {
                what: "an add-on nodeSelector for the cluster this stack creates (its add-ons belong on its system nodes)",
                overrides: { existingClusterNodeSelector: ["pool=infra"] },
                expected: ['whisper-eks:existingClusterNodeSelector = ["pool=infra"]', "only with existingClusterKubeconfig"],
            },
            {
                what: "an add-on nodeSelector item that is no label",
                overrides: { existingClusterNodeSelector: ["pool"] },
                expected: ['whisper-eks:existingClusterNodeSelector[0] = "pool"', "key=value"],
            },
            {
                what: "an unknown scaling metric",
                overrides: { scalingMetric: "cpu" },
                expected: ['whisper-eks:scalingMetric = "cpu"', "whisper_queued_audio_seconds", "http_requests_per_second"],
            },
            { what: "a bad load balancer scheme", overrides: { loadBalancerScheme: "public" }, expected: ['whisper-eks:loadBalancerScheme = "public"', '"internet-facing", "internal"'] },
            { what: "a certificate that is not an ACM ARN", overrides: { tlsCertificateArn: "my-cert" }, expected: ['whisper-eks:tlsCertificateArn = "my-cert"', "ACM certificate ARN"] },
            { what: "a request timeout the NLB cannot hold", overrides: { requestTimeoutSeconds: 7000 }, expected: ["whisper-eks:requestTimeoutSeconds = 7000", "from 30 to 5940"] },
            { what: "a bad source range", overrides: { loadBalancerSourceRanges: ["everyone"] }, expected: ['whisper-eks:loadBalancerSourceRanges[0] = "everyone"', "CIDR"] },
        ];
        for (const { what, stack, overrides, expected } of refused) {
            it(`refuses ${what}, before declaring anything`, async function () {
                const evaluation = await tryEvaluateStack(stack ?? "dev", overrides);
                assert.ok(evaluation.error, "the evaluation fails");
                for (const text of expected) assert.ok(evaluation.error.message.includes(text), `message names ${text}:\n${evaluation.error.message}`);
                assert.equal(evaluation.resources.length, 0, "no resource was declared");
            });
        }
    });
});
