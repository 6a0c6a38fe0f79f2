// The rules AWS and Karpenter apply that the mocks do not know (DESIGN.md): every AWS name fits its service's limit
// for every stack name config accepts; everything that lives in the cluster waits for the cluster; every catalog GPU
// type fits the server pod and its DaemonSets in Karpenter's own estimate of the node; and no NodePool setting lets
// every GPU node leave at once. Each test finds the next defect of its kind, not just the one it was written for.
import { strict as assert } from "assert";
import { stackNameRule } from "../infra/config";
import { evaluateStack, RecordedResource, StackEvaluation } from "../scripts/offline-stack";

const stacks = ["dev", "prod"];

/**
 * How each AWS resource type the program declares is named, and the longest name its service takes. Pulumi names a
 * resource without an explicit name `<logical name>-<7 random characters>`. Limits are pulumi-aws's AutoName table
 * (provider/resources.go) where it has one, else the service's API limit, whichever is smaller.
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
});
