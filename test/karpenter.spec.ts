// Karpenter as a real cluster needs it, in both stacks: pinned charts of a release that supports every Kubernetes version
// config accepts, CRDs before the controller and before the NodePool and EC2NodeClass, the controller on the system nodes
// with its IAM role through Pod Identity and the upstream policy, nodes that join through an EC2_LINUX access entry and
// find their subnets and security group by tag, the interruption queue and its rules, and a GPU NodePool whose
// disruption never cuts a request. Every cross-reference is checked against what it names.
import { strict as assert } from "assert";
import { gpuInstanceTypes } from "../infra/catalog";
import { interruptionEvents, karpenterRelease } from "../infra/karpenter";
import { evaluateStack, findResource, findResources, RecordedResource, StackEvaluation } from "../scripts/offline-stack";

const nodePoolType = "kubernetes:karpenter.sh/v1:NodePool";
const nodeClassType = "kubernetes:karpenter.k8s.aws/v1:EC2NodeClass";
/** `705s`, `15m`, `1h30m` as seconds. */
const seconds = (duration: string) =>
    [...duration.matchAll(/(\d+)([smh])/g)].reduce((sum, [, value, unit]) => sum + Number(value) * { s: 1, m: 60, h: 3600 }[unit as "s" | "m" | "h"], 0);

/** The Sids of the six controller policies of Karpenter 1.15.0's CloudFormation template (reference/cloudformation.md). */
const upstreamSids = [
    "AllowScopedEC2InstanceAccessActions",
    "AllowScopedEC2LaunchTemplateAccessActions",
    "AllowScopedEC2InstanceActionsWithTags",
    "AllowScopedResourceCreationTagging",
    "AllowScopedResourceTagging",
    "AllowScopedDeletion",
    "AllowPassingInstanceRole",
    "AllowScopedInstanceProfileCreationActions",
    "AllowScopedInstanceProfileTagActions",
    "AllowScopedInstanceProfileActions",
    "AllowAPIServerEndpointDiscovery",
    "AllowInterruptionQueueActions",
    "AllowZonalShiftStatusReadOnly",
    "AllowRegionalReadActions",
    "AllowSSMReadActions",
    "AllowPricingReadActions",
    "AllowUnscopedInstanceProfileListAction",
    "AllowInstanceProfileReadActions",
];

describe("Karpenter", function () {
    // That its release supports every Kubernetes version config accepts: test/aws-rules.spec.ts ("versions").

    for (const stack of ["dev", "prod"]) {
        describe(`${stack} stack`, function () {
            let evaluation: StackEvaluation;
            const resources = (type: string, name?: string | RegExp) => findResources(evaluation.resources, type, name);
            const resource = (type: string, name?: string | RegExp) => findResource(evaluation.resources, type, name);
            const release = (name: string) => resources("kubernetes:helm.sh/v3:Release").find((candidate) => candidate.inputs.name === name) ?? assert.fail(name);
            const config = (key: string) => evaluation.config[`whisper-eks:${key}`] as any;
            const clusterName = `whisper-eks-${stack}`;
            const order = (candidate: RecordedResource) => evaluation.resources.indexOf(candidate);
            const nodePool = () => resource(nodePoolType).inputs.spec;
            const nodeClass = () => resource(nodeClassType).inputs.spec;
            const podGrace = () => resource("kubernetes:apps/v1:Deployment").inputs.spec.template.spec.terminationGracePeriodSeconds as number;

            before(async function () {
                evaluation = await evaluateStack(stack);
            });

            it("installs the CRD chart and the controller chart of the pinned release, CRDs first and once", function () {
                const crds = release("karpenter-crd");
                const controller = release("karpenter");
                for (const candidate of [crds, controller]) {
                    assert.equal(candidate.inputs.version, karpenterRelease.version);
                    assert.equal(candidate.inputs.chart, `oci://public.ecr.aws/karpenter/${candidate.inputs.name}`);
                    assert.equal(candidate.inputs.namespace, "kube-system");
                }
                assert.equal(controller.inputs.skipCrds, true, "the CRDs belong to karpenter-crd, which Helm upgrades");
                assert.ok(order(crds) < order(controller), "the controller waits for its CRDs");
                for (const type of [nodePoolType, nodeClassType]) {
                    assert.ok(order(resource(type)) > order(controller), `the ${type} comes after the CRDs and the controller`);
                }
            });

            it("runs the controller on the system node group, with its IAM role through Pod Identity", function () {
                const values = release("karpenter").inputs.values;
                const system = resource("eks:index:ManagedNodeGroup", `${clusterName}-system`);
                assert.deepEqual(values.nodeSelector, system.inputs.labels, "never on a node it manages");
                assert.equal(values.settings.clusterName, clusterName);
                const association = resources("aws:eks/podIdentityAssociation:PodIdentityAssociation").find(
                    (candidate) => candidate.inputs.serviceAccount === values.serviceAccount.name,
                );
                assert.ok(association, "the chart's service account has a Pod Identity association");
                assert.equal(association.inputs.namespace, release("karpenter").inputs.namespace);
                assert.equal(association.inputs.clusterName, clusterName);
                const role = resources("aws:iam/role:Role").find((candidate) => candidate.state.arn === association.inputs.roleArn)!;
                assert.equal(JSON.parse(role.inputs.assumeRolePolicy).Statement[0].Principal.Service, "pods.eks.amazonaws.com");
                const minSystemNodes = config("systemNodeMinSize") as number;
                assert.equal(values.replicas, minSystemNodes >= 2 ? 2 : 1, "a standby controller only where a second system node is sure");
            });

            it("grants the controller the upstream 1.15.0 policy, scoped to this cluster, its node role and its queue", function () {
                const role = resources("aws:iam/role:Role").find((candidate) => candidate.name === `${clusterName}-karpenter`)!;
                const inline = resource("aws:iam/rolePolicy:RolePolicy", `${clusterName}-karpenter-inline`);
                assert.equal(inline.inputs.role, role.state.id);
                assert.ok(inline.inputs.policy.length < 10240, `${inline.inputs.policy.length} characters fit IAM's inline limit per role`);
                const policy = JSON.parse(inline.inputs.policy);
                const statements = Object.fromEntries(policy.Statement.map((statement: any) => [statement.Sid, statement]));
                assert.deepEqual(Object.keys(statements), upstreamSids);
                const nodeClassRole = resources("aws:iam/role:Role").find((candidate) => candidate.state.name === nodeClass().role)!;
                assert.equal(statements.AllowPassingInstanceRole.Resource, nodeClassRole.state.arn, "it passes exactly the role its nodes use");
                const queue = resource("aws:sqs/queue:Queue");
                assert.equal(statements.AllowInterruptionQueueActions.Resource, queue.state.arn);
                assert.match(statements.AllowAPIServerEndpointDiscovery.Resource, new RegExp(`:cluster/${clusterName}$`));
                assert.equal(statements.AllowScopedDeletion.Condition.StringEquals[`aws:ResourceTag/kubernetes.io/cluster/${clusterName}`], "owned");
                assert.equal(statements.AllowRegionalReadActions.Condition.StringEquals["aws:RequestedRegion"], evaluation.config["aws:region"]);
            });

            it("lets its nodes join through an EC2_LINUX access entry for the EC2NodeClass's role", function () {
                const role = resources("aws:iam/role:Role").find((candidate) => candidate.state.name === nodeClass().role);
                assert.ok(role, "the EC2NodeClass names a role declared here");
                assert.equal(JSON.parse(role.inputs.assumeRolePolicy).Statement[0].Principal.Service, "ec2.amazonaws.com");
                const entry = resource("aws:eks/accessEntry:AccessEntry");
                assert.deepEqual([entry.inputs.principalArn, entry.inputs.type, entry.inputs.clusterName], [role.state.arn, "EC2_LINUX", clusterName]);
                const policies = resources("aws:iam/rolePolicyAttachment:RolePolicyAttachment", new RegExp(`^${role.name}-`)).map((attachment) =>
                    attachment.inputs.policyArn.split("/").pop(),
                );
                for (const policy of ["AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryReadOnly"]) assert.ok(policies.includes(policy), policy);
            });

            it("finds the nodes' subnets and security group by the discovery tags it puts there", function () {
                const selector = { "karpenter.sh/discovery": clusterName };
                assert.deepEqual(nodeClass().subnetSelectorTerms, [{ tags: selector }]);
                assert.deepEqual(nodeClass().securityGroupSelectorTerms, [{ tags: selector }]);
                const specs = Object.fromEntries(resource("awsx:ec2:Vpc").inputs.subnetSpecs.map((spec: any) => [spec.type, spec.tags]));
                assert.equal(specs.Private["karpenter.sh/discovery"], clusterName, "the private subnets carry it");
                assert.equal(specs.Public["karpenter.sh/discovery"], undefined, "no GPU node gets a public subnet");
                const tag = resource("aws:ec2/tag:Tag");
                const clusterSecurityGroup = resource("eks:index:Cluster").state.eksCluster.vpcConfig.clusterSecurityGroupId;
                assert.deepEqual([tag.inputs.resourceId, tag.inputs.key, tag.inputs.value], [clusterSecurityGroup, "karpenter.sh/discovery", clusterName]);
            });

            it("feeds spot, rebalance, state-change and health events into the queue the controller reads", function () {
                const queue = resource("aws:sqs/queue:Queue");
                assert.equal(release("karpenter").inputs.values.settings.interruptionQueue, queue.state.name);
                assert.equal(queue.inputs.messageRetentionSeconds, 300);
                assert.equal(queue.inputs.sqsManagedSseEnabled, true);
                const policy = JSON.parse(resource("aws:sqs/queuePolicy:QueuePolicy").inputs.policy);
                assert.equal(resource("aws:sqs/queuePolicy:QueuePolicy").inputs.queueUrl, queue.state.url);
                const allow = policy.Statement.find((statement: any) => statement.Effect === "Allow");
                assert.deepEqual([allow.Principal.Service.sort(), allow.Action, allow.Resource], [["events.amazonaws.com", "sqs.amazonaws.com"], "sqs:SendMessage", queue.state.arn]);
                assert.equal(policy.Statement.find((statement: any) => statement.Sid === "DenyHTTP").Condition.Bool["aws:SecureTransport"], false);
                const rules = resources("aws:cloudwatch/eventRule:EventRule");
                const targets = resources("aws:cloudwatch/eventTarget:EventTarget");
                const detailTypes = rules.map((rule) => JSON.parse(rule.inputs.eventPattern)["detail-type"][0]);
                for (const expected of ["EC2 Spot Instance Interruption Warning", "EC2 Instance Rebalance Recommendation", "EC2 Instance State-change Notification", "AWS Health Event"]) {
                    assert.ok(detailTypes.includes(expected), expected);
                }
                assert.equal(rules.length, interruptionEvents.length);
                for (const rule of rules) {
                    const target = targets.find((candidate) => candidate.inputs.rule === rule.state.name);
                    assert.equal(target?.inputs.arn, queue.state.arn, `${rule.name} sends to the queue`);
                }
            });

            it("launches only the configured GPU types and capacity types, tainted and labelled as the GPU pods and DaemonSets expect", function () {
                const { template, limits } = nodePool();
                assert.deepEqual(template.spec.nodeClassRef, { group: "karpenter.k8s.aws", kind: "EC2NodeClass", name: resource(nodeClassType).inputs.metadata.name });
                const requirement = (key: string) => template.spec.requirements.find((candidate: any) => candidate.key === key);
                assert.deepEqual(requirement("node.kubernetes.io/instance-type").values, config("gpuInstanceTypes"));
                assert.deepEqual(requirement("karpenter.sh/capacity-type").values, config("gpuCapacityTypes"));
                const types = (config("gpuInstanceTypes") as string[]).map((type) => gpuInstanceTypes[type]);
                assert.deepEqual(requirement("karpenter.k8s.aws/instance-gpu-name").values, [types[0].karpenterGpuName]);
                assert.deepEqual(template.spec.taints, [{ key: "nvidia.com/gpu", value: "true", effect: "NoSchedule" }]);
                assert.equal(template.metadata.labels["k8s.amazonaws.com/accelerator"], types[0].accelerator);
                const pod = resource("kubernetes:apps/v1:Deployment").inputs.spec.template.spec;
                for (const [key, value] of Object.entries(pod.nodeSelector)) assert.equal(template.metadata.labels[key], value, `the server's nodeSelector ${key}`);
                const dcgm = release("dcgm-exporter").inputs.values;
                for (const [key, value] of Object.entries(dcgm.nodeSelector)) assert.equal(template.metadata.labels[key], value, `the DCGM exporter's nodeSelector ${key}`);
                assert.ok(dcgm.tolerations.some((toleration: any) => toleration.key === "nvidia.com/gpu" && toleration.effect === "NoSchedule"));
                assert.equal(limits["nvidia.com/gpu"], String(config("gpuMaxSize") * types[0].gpuCount));
            });

            it("consolidates only empty GPU nodes, after a pod's drain, one at a time, and gives a draining node the pod's whole grace", function () {
                const { disruption, template } = nodePool();
                assert.equal(disruption.consolidationPolicy, "WhenEmpty", "a node with a transcription on it is never consolidated");
                assert.ok(seconds(disruption.consolidateAfter) >= podGrace(), `consolidateAfter ${disruption.consolidateAfter} >= ${podGrace()} s`);
                assert.equal(seconds(disruption.consolidateAfter), config("gpuConsolidateAfterMinutes") * 60);
                assert.deepEqual(disruption.budgets, [{ nodes: "1" }]);
                assert.ok(seconds(template.spec.terminationGracePeriod) >= podGrace(), `terminationGracePeriod ${template.spec.terminationGracePeriod} >= ${podGrace()} s`);
                const pdb = resource("kubernetes:policy/v1:PodDisruptionBudget").inputs.spec;
                assert.equal(pdb.maxUnavailable, 1, "Karpenter's drains evict through the PDB");
            });

            it("boots GPU nodes from a pinned AL2023 alias with IMDSv2, hop limit 1, an encrypted root volume and the stack's tags", function () {
                const spec = nodeClass();
                assert.deepEqual(spec.amiSelectorTerms, [{ alias: config("gpuAmiAlias") }]);
                assert.match(spec.amiSelectorTerms[0].alias, /^al2023@v\d{8}$/, "never @latest");
                assert.deepEqual(spec.metadataOptions, { httpEndpoint: "enabled", httpProtocolIPv6: "disabled", httpPutResponseHopLimit: 1, httpTokens: "required" });
                assert.deepEqual(spec.blockDeviceMappings, [
                    {
                        deviceName: "/dev/xvda",
                        rootVolume: true,
                        ebs: { volumeSize: `${config("gpuDiskSizeGiB")}Gi`, volumeType: "gp3", encrypted: true, deleteOnTermination: true },
                    },
                ]);
                assert.deepEqual(spec.tags, { project: "whisper-eks", stack, "managed-by": "pulumi" });
                assert.equal(resource(nodeClassType).inputs.metadata.name, nodePool().template.spec.nodeClassRef.name);
            });

            it("keeps one node autoscaler: no Cluster Autoscaler, no GPU node group", function () {
                assert.equal(resources("kubernetes:helm.sh/v3:Release").filter((candidate) => /autoscaler/.test(candidate.inputs.name)).length, 0);
                assert.equal(resources("eks:index:ManagedNodeGroup").length, 1);
                assert.equal(resources(nodePoolType).length, 1);
            });

            it("exports the NodePool, its node class and the interruption queue", function () {
                const exported = evaluation.outputs.gpuNodePool as Record<string, unknown>;
                assert.equal(exported.nodePool, resource(nodePoolType).inputs.metadata.name);
                assert.equal(exported.interruptionQueue, resource("aws:sqs/queue:Queue").state.name);
                assert.equal(exported.amiAlias, config("gpuAmiAlias"));
            });
        });
    }

    it("names each catalog GPU once: every type of one GPU model has the same accelerator and Karpenter GPU name", function () {
        const byModel = new Map<string, Set<string>>();
        for (const type of Object.values(gpuInstanceTypes)) {
            byModel.set(type.gpuModel, new Set([...(byModel.get(type.gpuModel) ?? []), `${type.accelerator}/${type.karpenterGpuName}`]));
        }
        for (const [model, values] of byModel) assert.equal(values.size, 1, model);
        for (const type of Object.values(gpuInstanceTypes)) assert.match(type.karpenterGpuName, /^[a-z0-9]+$/, "lower case, as EC2 names it");
    });
});
