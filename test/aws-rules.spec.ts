// The rules AWS and Karpenter apply that the mocks do not know (DESIGN.md): every AWS name fits its service's limit
// for every stack name config accepts; everything that lives in the cluster waits for the cluster; every catalog GPU
// type fits the server pod and its DaemonSets in Karpenter's own estimate of the node; and no NodePool setting lets
// every GPU node leave at once. Each test finds the next defect of its kind, not just the one it was written for.
import { strict as assert } from "assert";
import { kedaChart } from "../infra/autoscaling";
import { eniLimitedMaxPods, gpuInstanceTypes, gpuNodeDaemonSetReserve, podResourcesPerGpu } from "../infra/catalog";
import { GpuConfig, kubernetesVersions, stackNameRule } from "../infra/config";
import { nvidiaDevicePluginChart } from "../infra/gpu";
import { gpuNodePoolSpec, karpenterRelease } from "../infra/karpenter";
import { loadBalancerControllerChart } from "../infra/load-balancer";
import { dcgmExporterChart, kubePrometheusStackChart } from "../infra/monitoring";
import { evaluateStack, RecordedResource, StackEvaluation, stackConfig } from "../scripts/offline-stack";

const stacks = ["dev", "prod"];

/**
 * How each AWS resource type the program declares is named, and the longest name its service takes. Pulumi names a
 * resource without an explicit name `<logical name>-<7 random characters>`. Limits are pulumi-aws's AutoName table
 * (provider/resource_overrides.go in v7, provider/resources.go before) where it has one, and the service's API limit
 * where that is smaller or the table has none.
 */
const nameRules: Record<string, { property: string; maxLength: number; why: string } | "unnamed"> = {
    "aws:iam/role:Role": { property: "name", maxLength: 64, why: 'pulumi-aws AutoName("name", 64)' },
    "aws:cloudwatch/eventRule:EventRule": { property: "name", maxLength: 64, why: 'pulumi-aws AutoName("name", 64)' },
    "aws:cloudwatch/eventTarget:EventTarget": { property: "targetId", maxLength: 64, why: "EventBridge PutTargets: Id of 1 to 64 characters" },
    "aws:iam/rolePolicy:RolePolicy": { property: "name", maxLength: 128, why: "IAM PutRolePolicy: PolicyName of 1 to 128 characters" },
    "aws:sqs/queue:Queue": { property: "name", maxLength: 80, why: "SQS CreateQueue: QueueName of up to 80 characters" },
    "aws:ecr/repository:Repository": { property: "name", maxLength: 256, why: "ECR CreateRepository: repositoryName of 2 to 256 characters" },
    "aws:cloudwatch/logGroup:LogGroup": { property: "name", maxLength: 512, why: "CloudWatch Logs CreateLogGroup: 1 to 512 characters" },
    "aws:efs/fileSystem:FileSystem": { property: "creationToken", maxLength: 64, why: "EFS CreateFileSystem: CreationToken of 1 to 64 characters" },
    "aws:ec2/launchTemplate:LaunchTemplate": { property: "name", maxLength: 128, why: "EC2 CreateLaunchTemplate: 3 to 128 characters" },
    "aws:ec2/securityGroup:SecurityGroup": { property: "name", maxLength: 255, why: "EC2 CreateSecurityGroup: GroupName of up to 255 characters" },
    "aws:eks/cluster:Cluster": { property: "name", maxLength: 100, why: "EKS CreateCluster: name of 1 to 100 characters" },
    "aws:eks/nodeGroup:NodeGroup": { property: "nodeGroupName", maxLength: 63, why: "EKS CreateNodegroup: nodegroupName of 1 to 63 characters" },
    "aws:eks/accessEntry:AccessEntry": "unnamed",
    "aws:eks/podIdentityAssociation:PodIdentityAssociation": "unnamed",
    "aws:eks/addon:Addon": "unnamed",
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": "unnamed",
    "aws:ec2/tag:Tag": "unnamed",
    "aws:efs/mountTarget:MountTarget": "unnamed",
    "aws:ecr/lifecyclePolicy:LifecyclePolicy": "unnamed",
    "aws:sqs/queuePolicy:QueuePolicy": "unnamed",
};

/**
 * The named AWS resources that @pulumi/eks 4.3.0's components create inside their provider, where mocks never see
 * them (pulumi/pulumi-eks v4.3.0: nodejs/eks/cluster/cluster.ts, servicerole.ts, nodes/nodegroup.ts).
 */
const componentChildren: Record<string, (component: RecordedResource) => { type: string; name: string; inputs: Record<string, unknown> }[]> = {
    "eks:index:Cluster": (cluster) => [
        { type: "aws:eks/cluster:Cluster", name: `${cluster.name}-eksCluster`, inputs: { name: cluster.inputs.name } },
        { type: "aws:iam/role:Role", name: `${cluster.name}-eksRole-role`, inputs: {} },
        { type: "aws:ec2/securityGroup:SecurityGroup", name: `${cluster.name}-eksClusterSecurityGroup`, inputs: {} },
    ],
    "eks:index:ManagedNodeGroup": (group) => [{ type: "aws:eks/nodeGroup:NodeGroup", name: group.name, inputs: { nodeGroupName: group.inputs.nodeGroupName } }],
};

/** Every AWS name a stack's evaluation would send to AWS: [type, logical name, name, limit]. */
function awsNames(evaluation: StackEvaluation): { type: string; logicalName: string; name: string; maxLength: number; why: string }[] {
    const declared = evaluation.resources.flatMap((resource) => [resource, ...(componentChildren[resource.type]?.(resource) ?? [])]);
    return declared
        .filter((resource) => resource.type.startsWith("aws:"))
        .flatMap((resource) => {
            const rule = nameRules[resource.type];
            assert.ok(rule, `${resource.type} (${resource.name}) has no entry in nameRules: add its name property and its service's limit`);
            if (rule === "unnamed") return [];
            const explicit = resource.inputs[rule.property];
            // Auto-named: the logical name, "-" and 7 random characters.
            const name = typeof explicit === "string" ? explicit : `${resource.name}-${"x".repeat(7)}`;
            return [{ type: resource.type, logicalName: resource.name, name, maxLength: rule.maxLength, why: rule.why }];
        });
}

describe("AWS and Karpenter rules the mocks do not know", function () {
    describe("names: every AWS name fits its service's limit, for the longest stack name config accepts", function () {
        const longestStackName = `s${"x".repeat(stackNameRule.maxLength - 1)}`;

        it("the longest accepted stack name is itself accepted", function () {
            assert.ok(stackNameRule.pattern.test(longestStackName) && longestStackName.length === stackNameRule.maxLength);
        });

        for (const stack of stacks) {
            it(`${stack}'s config under a ${stackNameRule.maxLength}-character stack name`, async function () {
                const evaluation = await evaluateStack(stack, {}, longestStackName);
                const names = awsNames(evaluation);
                assert.ok(names.some((entry) => entry.type === "aws:cloudwatch/eventRule:EventRule"), "the EventBridge rules are checked");
                assert.ok(names.some((entry) => entry.type === "aws:eks/nodeGroup:NodeGroup"), "the components' children are checked");
                const tooLong = names.filter((entry) => entry.name.length > entry.maxLength);
                assert.deepEqual(
                    tooLong.map((entry) => `${entry.type} ${entry.logicalName}: ${entry.name.length} > ${entry.maxLength} (${entry.why})`),
                    [],
                );
            });
        }
    });

    describe("dependencies: everything that lives in the cluster waits for the cluster resource itself", function () {
        /** Types that AWS creates inside a cluster: made before the cluster is ACTIVE, they fail. */
        const inClusterTypes = [
            "aws:eks/accessEntry:AccessEntry",
            "aws:eks/podIdentityAssociation:PodIdentityAssociation",
            "aws:eks/addon:Addon",
            "eks:index:ManagedNodeGroup",
            "pulumi:providers:kubernetes",
        ];
        for (const stack of stacks) {
            it(`${stack}: every access entry, Pod Identity association, add-on, node group and the Kubernetes provider`, async function () {
                const evaluation = await evaluateStack(stack);
                const cluster = evaluation.resources.find((resource) => resource.type === "eks:index:Cluster");
                assert.ok(cluster?.urn, "the cluster is registered");
                // Anything that names a cluster in its inputs lives in it, whatever its type.
                const inCluster = evaluation.resources.filter(
                    (resource) => inClusterTypes.includes(resource.type) || "clusterName" in resource.inputs || "cluster" in resource.inputs,
                );
                for (const type of inClusterTypes) assert.ok(inCluster.some((resource) => resource.type === type), `a ${type} is checked`);
                const racing = inCluster.filter((resource) => resource !== cluster && !resource.dependencies.includes(cluster.urn!));
                assert.deepEqual(
                    racing.map((resource) => `${resource.type} ${resource.name}`),
                    [],
                    "created while EKS still creates the cluster, these fail with ResourceNotFoundException",
                );
            });
        }
    });

    describe("Karpenter's arithmetic: the server pod and the GPU node's DaemonSets fit Karpenter's estimate of every catalog type", function () {
        /**
         * Karpenter's estimate of a node's allocatable resources before it launches one, as its Go code computes it
         * (aws/karpenter-provider-aws pkg/providers/instancetype/types.go: memory(), kubeReservedResources(),
         * evictionThreshold(), ENILimitedPods(); vmMemoryOverheadPercent 0.075 from pkg/operator/options), written here
         * independently of infra/catalog.ts so that the catalog cannot be edited back over the line.
         */
        function karpenterEstimate(typeName: string): { cpuMillicores: number; memoryMiB: number; maxPods: number } {
            const type = gpuInstanceTypes[typeName];
            const maxPods = type.networkInterfaces * (type.ipv4PerInterface - 1) + 2;
            const capacityMiB = type.memoryGiB * 1024;
            const memoryMiB = capacityMiB - Math.ceil(capacityMiB * 0.075) - (11 * maxPods + 255) - 100;
            const milli = type.vcpu * 1000;
            let reserved = 0;
            for (const [start, end, percentage] of [
                [0, 1000, 0.06],
                [1000, 2000, 0.01],
                [2000, 4000, 0.005],
                [4000, 2 ** 31, 0.0025],
            ]) {
                if (milli >= start) reserved += Math.trunc((Math.min(milli, end) - start) * percentage);
            }
            return { cpuMillicores: milli - reserved, memoryMiB, maxPods };
        }

        it("reproduces Karpenter's published figures: max pods from AWS's eni-max-pods and g6e.xlarge's 29,317 MiB", function () {
            // eni-max-pods.txt (awslabs/amazon-eks-ami): the VPC CNI's max pods per type.
            const published: Record<string, number> = { "g4dn.xlarge": 29, "g5.xlarge": 58, "g5.48xlarge": 345, "g6e.xlarge": 58, "g6e.12xlarge": 292, "p4d.24xlarge": 737, "p5.48xlarge": 100 };
            for (const [name, maxPods] of Object.entries(published)) {
                assert.equal(karpenterEstimate(name).maxPods, maxPods, name);
                assert.equal(eniLimitedMaxPods(gpuInstanceTypes[name]), maxPods, `catalog ${name}`);
            }
            assert.deepEqual(karpenterEstimate("g6e.xlarge"), { cpuMillicores: 3920, memoryMiB: 29317, maxPods: 58 });
        });

        it("the GPU DaemonSets the program configures fit the reserve the catalog sizes pods around", async function () {
            const evaluation = await evaluateStack("prod");
            const gpuDaemonSets = evaluation.resources.filter(
                (resource) =>
                    resource.type === "kubernetes:helm.sh/v3:Release" &&
                    (resource.inputs.values?.tolerations ?? []).some((toleration: any) => toleration.key === "nvidia.com/gpu"),
            );
            assert.ok(gpuDaemonSets.length >= 2, "the device plugin and the DCGM exporter");
            const requested = (quantity: string | undefined, unit: "m" | "Mi") =>
                quantity === undefined ? 0 : quantity.endsWith(unit) ? Number(quantity.slice(0, -unit.length)) : unit === "m" ? Number(quantity) * 1000 : Number(quantity.replace("Gi", "")) * 1024;
            const cpu = gpuDaemonSets.reduce((sum, release) => sum + requested(release.inputs.values.resources?.requests?.cpu, "m"), 0);
            const memory = gpuDaemonSets.reduce((sum, release) => sum + requested(release.inputs.values.resources?.requests?.memory, "Mi"), 0);
            assert.ok(cpu <= gpuNodeDaemonSetReserve.cpuMillicores && memory <= gpuNodeDaemonSetReserve.memoryMiB, `${cpu}m, ${memory}Mi`);
        });

        for (const [name, type] of Object.entries(gpuInstanceTypes)) {
            it(`${name}: ${type.gpuCount} server pod${type.gpuCount > 1 ? "s" : ""} and the DaemonSets fit, without wasting the node`, function () {
                const estimate = karpenterEstimate(name);
                const pod = podResourcesPerGpu([name]);
                const cpu = type.gpuCount * pod.cpuMillicores + gpuNodeDaemonSetReserve.cpuMillicores;
                const memory = type.gpuCount * pod.memoryMiB + gpuNodeDaemonSetReserve.memoryMiB;
                assert.ok(cpu <= estimate.cpuMillicores, `cpu: ${cpu}m requested > ${estimate.cpuMillicores}m Karpenter expects`);
                assert.ok(memory <= estimate.memoryMiB, `memory: ${memory}Mi requested > ${estimate.memoryMiB}Mi Karpenter expects`);
                assert.ok(type.gpuCount + 10 <= estimate.maxPods, "pod slots for the server and the DaemonSets");
                // Rounding costs at most one step per pod: the pod gets what the node has, not a token share.
                assert.ok(estimate.cpuMillicores - cpu < 100 * type.gpuCount, `cpu left unused: ${estimate.cpuMillicores - cpu}m`);
                assert.ok(estimate.memoryMiB - memory < 256 * type.gpuCount, `memory left unused: ${estimate.memoryMiB - memory}Mi`);
            });
        }

        for (const stack of stacks) {
            it(`${stack}: the Deployment's requests fit Karpenter's estimate of each of its GPU types`, async function () {
                const evaluation = await evaluateStack(stack);
                const deployment = evaluation.resources.find((resource) => resource.type === "kubernetes:apps/v1:Deployment")!;
                const pod = deployment.inputs.spec.template.spec;
                const sum = (unit: "cpu" | "memory") =>
                    [...pod.containers, ...(pod.initContainers ?? [])]
                        .filter((container: any) => container.resources?.requests?.[unit])
                        .reduce((total: number, container: any) => {
                            const quantity: string = container.resources.requests[unit];
                            return Math.max(total, unit === "cpu" ? (quantity.endsWith("m") ? Number(quantity.slice(0, -1)) : Number(quantity) * 1000) : Number(quantity.replace("Mi", "")));
                        }, 0);
                for (const name of stackConfig(stack).values["whisper-eks:gpuInstanceTypes"] as string[]) {
                    const estimate = karpenterEstimate(name);
                    const gpus = gpuInstanceTypes[name].gpuCount;
                    assert.ok(gpus * sum("memory") + gpuNodeDaemonSetReserve.memoryMiB <= estimate.memoryMiB, `${name}: ${sum("memory")}Mi per pod`);
                    assert.ok(gpus * sum("cpu") + gpuNodeDaemonSetReserve.cpuMillicores <= estimate.cpuMillicores, `${name}: ${sum("cpu")}m per pod`);
                }
            });
        }
    });

    describe("disruption: no NodePool setting lets every GPU node leave at once", function () {
        /** The most nodes a budget lets leave at once out of `nodes` (Karpenter rounds a percentage up). */
        const allowed = (budget: string, nodes: number) => (budget.endsWith("%") ? Math.ceil((nodes * Number(budget.slice(0, -1))) / 100) : Number(budget));

        for (const stack of stacks) {
            it(`${stack}, and its config at every gpuMaxSize from 2 to 100`, function () {
                const values = stackConfig(stack).values;
                const gpu: GpuConfig = {
                    instanceTypes: values["whisper-eks:gpuInstanceTypes"] as string[],
                    capacityTypes: values["whisper-eks:gpuCapacityTypes"] as GpuConfig["capacityTypes"],
                    maxNodes: values["whisper-eks:gpuMaxSize"] as number,
                    diskSizeGiB: values["whisper-eks:gpuDiskSizeGiB"] as number,
                    amiAlias: values["whisper-eks:gpuAmiAlias"] as string,
                    consolidateAfterMinutes: values["whisper-eks:gpuConsolidateAfterMinutes"] as number,
                };
                for (let maxNodes = 2; maxNodes <= 100; maxNodes++) {
                    const spec = gpuNodePoolSpec({ ...gpu, maxNodes }, 600);
                    // Expiry is forced: budgets do not hold it, and nodes launched together expire together. Karpenter's
                    // default, when unset, is 720h.
                    assert.equal(spec.template.spec.expireAfter, "Never", "expireAfter must be Never");
                    const budgets = spec.disruption?.budgets ?? [];
                    assert.ok(budgets.length > 0, "explicit budgets (Karpenter's default is 10%)");
                    for (const budget of budgets) {
                        assert.ok(allowed(String(budget.nodes), maxNodes) < maxNodes, `budget ${budget.nodes} of ${maxNodes} nodes`);
                    }
                }
            });
        }
    });

    describe("versions: config accepts exactly the Kubernetes versions every pinned component supports", function () {
        const components: Record<string, { version: string; kubernetes: { min: string; max?: string } }> = {
            karpenter: karpenterRelease,
            keda: kedaChart,
            "aws-load-balancer-controller": loadBalancerControllerChart,
            "kube-prometheus-stack": kubePrometheusStackChart,
            "dcgm-exporter": dcgmExporterChart,
            "nvidia-device-plugin": nvidiaDevicePluginChart,
        };
        const minor = (version: string) => Number(version.split(".")[1]);

        it("every accepted version is inside every component's range, and every version inside all of them is accepted", function () {
            const lowest = Math.max(...Object.values(components).map((component) => minor(component.kubernetes.min)));
            const highest = Math.min(...Object.values(components).map((component) => minor(component.kubernetes.max ?? "1.99")));
            const supported = Array.from({ length: highest - lowest + 1 }, (_, index) => `1.${lowest + index}`);
            assert.deepEqual([...kubernetesVersions], supported);
            for (const [name, component] of Object.entries(components)) {
                for (const version of kubernetesVersions) {
                    assert.ok(minor(version) >= minor(component.kubernetes.min), `${name} ${component.version} supports ${version}`);
                    assert.ok(minor(version) <= minor(component.kubernetes.max ?? "1.99"), `${name} ${component.version} supports ${version}`);
                }
            }
        });
    });
});
