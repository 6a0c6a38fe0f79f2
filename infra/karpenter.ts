// GPU nodes from Karpenter: its CRDs and controller (on the system node group, AWS access through Pod Identity), the
// IAM role its nodes join with (an EC2_LINUX access entry), the interruption queue that EventBridge feeds spot and
// health events into, and the GPU NodePool and EC2NodeClass built from stack config.
import type { IEC2NodeClassSpec } from "@kubernetes-models/karpenter/karpenter.k8s.aws/v1/EC2NodeClassSpec";
import type { INodePoolSpec } from "@kubernetes-models/karpenter/karpenter.sh/v1/NodePoolSpec";
import * as aws from "@pulumi/aws";
import * as k8s from "@pulumi/kubernetes";
import * as pulumi from "@pulumi/pulumi";
import { gpuInstanceTypes, gpusPerNode } from "./catalog";
import { createNodeRole } from "./cluster";
import { GpuConfig } from "./config";
import { acceleratorLabelKey, gpuNodeSelector, gpuTaint, karpenterDiscoveryTagKey, nodePoolLabelKey } from "./conventions";
import { AddonContext, HelmChart, installChart } from "./helm";
import { podIdentityForServiceAccount } from "./pod-identity";

/**
 * The Karpenter release: controller and CRD charts of one version. 1.15.0 supports Kubernetes 1.31 to 1.37 (the
 * compatibility matrix of its docs, website/content/en/v1.15/upgrading/compatibility.md in aws/karpenter-provider-aws),
 * which holds every version config accepts.
 */
export const karpenterRelease = { version: "1.15.0", kubernetes: { min: "1.31", max: "1.37" } } as const;
const chartRepository = "oci://public.ecr.aws/karpenter";
export const karpenterNamespace = "kube-system";
export const karpenterServiceAccount = "karpenter";
/** The one GPU NodePool and the EC2NodeClass it launches from. */
export const gpuNodePoolName = "gpu";
export const gpuNodeClassName = "gpu";
/** The AL2023 root device, which the EC2NodeClass sizes and encrypts. */
const rootDeviceName = "/dev/xvda";
/** Beyond the server pod's own grace, how long a draining node waits before Karpenter terminates it regardless. */
export const nodeDrainMarginSeconds = 60;

/**
 * The EventBridge rules of Karpenter's interruption handling (its getting-started CloudFormation template, v1.15). The
 * rule ids are short because a rule's name (`<cluster>-karpenter-<rule>` plus Pulumi's 8-character suffix) may have
 * at most 64 characters.
 */
export const interruptionEvents: readonly { rule: string; source: string; detailType: string }[] = [
    { rule: "health", source: "aws.health", detailType: "AWS Health Event" },
    { rule: "spot", source: "aws.ec2", detailType: "EC2 Spot Instance Interruption Warning" },
    { rule: "rebalance", source: "aws.ec2", detailType: "EC2 Instance Rebalance Recommendation" },
    { rule: "state-change", source: "aws.ec2", detailType: "EC2 Instance State-change Notification" },
    { rule: "reservation", source: "aws.ec2", detailType: "EC2 Capacity Reservation Instance Interruption Warning" },
];

export interface KarpenterPolicyScope {
    partition: string;
    region: string;
    accountId: string;
    clusterName: string;
    nodeRoleArn: string;
    queueArn: string;
}

/**
 * The controller's permissions: the statements of the six controller policies (node lifecycle, IAM integration, EKS
 * integration, interruption, zonal shift, resource discovery) of Karpenter 1.15.0's getting-started CloudFormation
 * template, as aws/karpenter-provider-aws's website/content/en/v1.15/reference/cloudformation.md lists them, in one
 * document (one inline policy; IAM allows 10,240 characters of them per role).
 */
export function karpenterControllerPolicy(scope: KarpenterPolicyScope): string {
    const { partition, region, accountId, clusterName } = scope;
    const ec2 = (resource: string) => `arn:${partition}:ec2:${region}:*:${resource}/*`;
    const created = ["fleet", "instance", "volume", "network-interface", "launch-template", "spot-instances-request"].map(ec2);
    const owned = { [`aws:ResourceTag/kubernetes.io/cluster/${clusterName}`]: "owned" };
    const ownedRequest = { [`aws:RequestTag/kubernetes.io/cluster/${clusterName}`]: "owned", "aws:RequestTag/eks:eks-cluster-name": clusterName };
    const instanceProfiles = `arn:${partition}:iam::${accountId}:instance-profile/*`;
    const clusterArn = `arn:${partition}:eks:${region}:${accountId}:cluster/${clusterName}`;
    const statement = (Sid: string, Action: string | string[], Resource: string | string[], Condition?: Record<string, unknown>) => ({
        Sid,
        Effect: "Allow",
        Resource,
        Action,
        ...(Condition ? { Condition } : {}),
    });
    return JSON.stringify({
        Version: "2012-10-17",
        Statement: [
            // NodeLifecyclePolicy
            statement(
                "AllowScopedEC2InstanceAccessActions",
                ["ec2:RunInstances", "ec2:CreateFleet"],
                [
                    `arn:${partition}:ec2:${region}::image/*`,
                    `arn:${partition}:ec2:${region}::snapshot/*`,
                    ...["security-group", "subnet", "capacity-reservation", "placement-group"].map(ec2),
                ],
            ),
            statement("AllowScopedEC2LaunchTemplateAccessActions", ["ec2:RunInstances", "ec2:CreateFleet"], ec2("launch-template"), {
                StringEquals: owned,
                StringLike: { "aws:ResourceTag/karpenter.sh/nodepool": "*" },
            }),
            statement("AllowScopedEC2InstanceActionsWithTags", ["ec2:RunInstances", "ec2:CreateFleet", "ec2:CreateLaunchTemplate"], created, {
                StringEquals: ownedRequest,
                StringLike: { "aws:RequestTag/karpenter.sh/nodepool": "*" },
            }),
            statement("AllowScopedResourceCreationTagging", "ec2:CreateTags", created, {
                StringEquals: { ...ownedRequest, "ec2:CreateAction": ["RunInstances", "CreateFleet", "CreateLaunchTemplate"] },
                StringLike: { "aws:RequestTag/karpenter.sh/nodepool": "*" },
            }),
            statement("AllowScopedResourceTagging", "ec2:CreateTags", ec2("instance"), {
                StringEquals: owned,
                StringLike: { "aws:ResourceTag/karpenter.sh/nodepool": "*" },
                StringEqualsIfExists: { "aws:RequestTag/eks:eks-cluster-name": clusterName },
                "ForAllValues:StringEquals": { "aws:TagKeys": ["eks:eks-cluster-name", "karpenter.sh/nodeclaim", "Name"] },
            }),
            statement("AllowScopedDeletion", ["ec2:TerminateInstances", "ec2:RebootInstances", "ec2:DeleteLaunchTemplate"], [ec2("instance"), ec2("launch-template")], {
                StringEquals: owned,
                StringLike: { "aws:ResourceTag/karpenter.sh/nodepool": "*" },
            }),
            // IAMIntegrationPolicy
            statement("AllowPassingInstanceRole", "iam:PassRole", scope.nodeRoleArn, {
                StringEquals: { "iam:PassedToService": ["ec2.amazonaws.com", "ec2.amazonaws.com.cn"] },
            }),
            statement("AllowScopedInstanceProfileCreationActions", ["iam:CreateInstanceProfile"], instanceProfiles, {
                StringEquals: { ...ownedRequest, "aws:RequestTag/topology.kubernetes.io/region": region },
                StringLike: { "aws:RequestTag/karpenter.k8s.aws/ec2nodeclass": "*" },
            }),
            statement("AllowScopedInstanceProfileTagActions", ["iam:TagInstanceProfile"], instanceProfiles, {
                StringEquals: {
                    ...owned,
                    "aws:ResourceTag/topology.kubernetes.io/region": region,
                    ...ownedRequest,
                    "aws:RequestTag/topology.kubernetes.io/region": region,
                },
                StringLike: { "aws:ResourceTag/karpenter.k8s.aws/ec2nodeclass": "*", "aws:RequestTag/karpenter.k8s.aws/ec2nodeclass": "*" },
            }),
            statement(
                "AllowScopedInstanceProfileActions",
                ["iam:AddRoleToInstanceProfile", "iam:RemoveRoleFromInstanceProfile", "iam:DeleteInstanceProfile"],
                instanceProfiles,
                { StringEquals: { ...owned, "aws:ResourceTag/topology.kubernetes.io/region": region }, StringLike: { "aws:ResourceTag/karpenter.k8s.aws/ec2nodeclass": "*" } },
            ),
            // EKSIntegrationPolicy
            statement("AllowAPIServerEndpointDiscovery", "eks:DescribeCluster", clusterArn),
            // InterruptionPolicy
            statement("AllowInterruptionQueueActions", ["sqs:DeleteMessage", "sqs:GetQueueUrl", "sqs:ReceiveMessage"], scope.queueArn),
            // ZonalShiftPolicy
            statement("AllowZonalShiftStatusReadOnly", ["arc-zonal-shift:GetManagedResource"], "*", {
                StringEquals: { "arc-zonal-shift:ResourceIdentifier": clusterArn },
            }),
            // ResourceDiscoveryPolicy
            statement(
                "AllowRegionalReadActions",
                [
                    "ec2:DescribeCapacityReservations",
                    "ec2:DescribeImages",
                    "ec2:DescribeInstances",
                    "ec2:DescribeInstanceStatus",
                    "ec2:DescribeInstanceTypeOfferings",
                    "ec2:DescribeInstanceTypes",
                    "ec2:DescribeLaunchTemplates",
                    "ec2:DescribePlacementGroups",
                    "ec2:DescribeSecurityGroups",
                    "ec2:DescribeSpotPriceHistory",
                    "ec2:DescribeSubnets",
                ],
                "*",
                { StringEquals: { "aws:RequestedRegion": region } },
            ),
            statement("AllowSSMReadActions", "ssm:GetParameter", `arn:${partition}:ssm:${region}::parameter/aws/service/*`),
            statement("AllowPricingReadActions", "pricing:GetProducts", "*"),
            statement("AllowUnscopedInstanceProfileListAction", "iam:ListInstanceProfiles", "*"),
            statement("AllowInstanceProfileReadActions", "iam:GetInstanceProfile", instanceProfiles),
        ],
    });
}

/** The queue policy of the template: EventBridge (and SQS itself) may send to it, and only over TLS. */
export function interruptionQueuePolicy(queueArn: string): string {
    return JSON.stringify({
        Id: "EC2InterruptionPolicy",
        Version: "2012-10-17",
        Statement: [
            { Effect: "Allow", Principal: { Service: ["events.amazonaws.com", "sqs.amazonaws.com"] }, Action: "sqs:SendMessage", Resource: queueArn },
            { Sid: "DenyHTTP", Effect: "Deny", Action: "sqs:*", Resource: queueArn, Condition: { Bool: { "aws:SecureTransport": false } }, Principal: "*" },
        ],
    });
}

/** The interruption queue (named after the cluster, as Karpenter's template names it) and the rules that feed it. */
function createInterruptionQueue(name: string, clusterName: pulumi.Input<string>, tags: Record<string, string>): aws.sqs.Queue {
    // Karpenter acts on an interruption within seconds; an event older than five minutes is about a node long gone.
    const queue = new aws.sqs.Queue(`${name}-karpenter-interruption`, { name: clusterName, messageRetentionSeconds: 300, sqsManagedSseEnabled: true, tags });
    new aws.sqs.QueuePolicy(`${name}-karpenter-interruption`, { queueUrl: queue.url, policy: queue.arn.apply(interruptionQueuePolicy) });
    for (const event of interruptionEvents) {
        const rule = new aws.cloudwatch.EventRule(`${name}-karpenter-${event.rule}`, {
            description: `Karpenter interruption handling: ${event.detailType}`,
            eventPattern: JSON.stringify({ source: [event.source], "detail-type": [event.detailType] }),
            tags,
        });
        new aws.cloudwatch.EventTarget(`${name}-karpenter-${event.rule}`, { rule: rule.name, arn: queue.arn, targetId: "KarpenterInterruptionQueueTarget" });
    }
    return queue;
}

/** The labels of GPU nodes: the GPU label the device plugin, DCGM exporter and server select, the pool, the GPU model. */
export function gpuNodeLabels(gpu: GpuConfig): Record<string, string> {
    return { ...gpuNodeSelector, [nodePoolLabelKey]: "gpu", [acceleratorLabelKey]: gpuInstanceTypes[gpu.instanceTypes[0]].accelerator };
}

/**
 * The GPU NodePool: the configured types (and their GPU, by Karpenter's instance-gpu-name label) and capacity types,
 * the GPU taint and labels, a GPU limit of gpuMaxSize nodes. Disruption never cuts a request: only empty nodes are
 * consolidated, once empty for consolidateAfter; drift (after a gpuAmiAlias change) replaces one node at a time, within
 * the PDB, and gives each pod its whole grace period before the node goes. Nodes never expire.
 */
export function gpuNodePoolSpec(gpu: GpuConfig, podTerminationGracePeriodSeconds: number): INodePoolSpec {
    const gpuNames = [...new Set(gpu.instanceTypes.map((type) => gpuInstanceTypes[type].karpenterGpuName))];
    return {
        template: {
            metadata: { labels: gpuNodeLabels(gpu) },
            spec: {
                nodeClassRef: { group: "karpenter.k8s.aws", kind: "EC2NodeClass", name: gpuNodeClassName },
                requirements: [
                    { key: "node.kubernetes.io/instance-type", operator: "In", values: gpu.instanceTypes },
                    { key: "karpenter.k8s.aws/instance-gpu-name", operator: "In", values: gpuNames },
                    { key: "karpenter.sh/capacity-type", operator: "In", values: gpu.capacityTypes },
                    { key: "kubernetes.io/arch", operator: "In", values: ["amd64"] },
                ],
                taints: [{ ...gpuTaint }],
                // Never expire (Karpenter's default is 720h): expiry is forced, ignores the budgets below and starts no
                // replacement first, so nodes launched together would all leave together. Nodes are renewed by drift
                // instead, when gpuAmiAlias moves, and drift replaces one node at a time within the budget.
                expireAfter: "Never",
                terminationGracePeriod: `${podTerminationGracePeriodSeconds + nodeDrainMarginSeconds}s`,
            },
        },
        disruption: {
            consolidationPolicy: "WhenEmpty",
            consolidateAfter: `${gpu.consolidateAfterMinutes}m`,
            budgets: [{ nodes: "1" }],
        },
        limits: { [gpuTaint.key]: String(gpu.maxNodes * gpusPerNode(gpu.instanceTypes)) },
    };
}

/** The EC2NodeClass: the pinned AL2023 alias, IMDSv2 with hop limit 1, an encrypted gp3 root volume, discovery by tag. */
export function gpuNodeClassSpec(args: { gpu: GpuConfig; clusterName: string; role: string; tags: Record<string, string> }): IEC2NodeClassSpec {
    const discovery = [{ tags: { [karpenterDiscoveryTagKey]: args.clusterName } }];
    return {
        role: args.role,
        amiSelectorTerms: [{ alias: args.gpu.amiAlias }],
        subnetSelectorTerms: discovery,
        securityGroupSelectorTerms: discovery,
        // Pods (one hop beyond the node) cannot take the node role's credentials; they get their own through Pod Identity.
        metadataOptions: { httpEndpoint: "enabled", httpProtocolIPv6: "disabled", httpPutResponseHopLimit: 1, httpTokens: "required" },
        blockDeviceMappings: [
            {
                deviceName: rootDeviceName,
                rootVolume: true,
                ebs: { volumeSize: `${args.gpu.diskSizeGiB}Gi`, volumeType: "gp3", encrypted: true, deleteOnTermination: true },
            },
        ],
        tags: args.tags,
    };
}

export interface KarpenterArgs {
    /** The cluster's name as the cluster outputs it: the access entry and Pod Identity association wait for the cluster. */
    clusterName: pulumi.Output<string>;
    region: string;
    gpu: GpuConfig;
    /** The server pod's terminationGracePeriodSeconds: a draining GPU node waits at least that long. */
    podTerminationGracePeriodSeconds: number;
    /** Two controllers (one active, one on standby) where the system node group keeps two nodes. */
    controllerReplicas: number;
    tags: Record<string, string>;
}

export interface Karpenter {
    controller: k8s.helm.v3.Release;
    nodePool: k8s.apiextensions.CustomResource;
    nodeClass: k8s.apiextensions.CustomResource;
    interruptionQueue: aws.sqs.Queue;
    nodeRole: aws.iam.Role;
}

export function installKarpenter(name: string, args: KarpenterArgs, context: AddonContext): Karpenter {
    const { clusterName, tags } = args;
    const nodeRole = createNodeRole(`${name}-karpenter-node`, tags);
    const nodeAccess = new aws.eks.AccessEntry(`${name}-karpenter-node`, { clusterName, principalArn: nodeRole.arn, type: "EC2_LINUX", tags });
    const interruptionQueue = createInterruptionQueue(name, clusterName, tags);

    const partition = aws.getPartitionOutput().partition;
    const accountId = aws.getCallerIdentityOutput().accountId;
    const policy = pulumi
        .all([partition, accountId, clusterName, nodeRole.arn, interruptionQueue.arn])
        .apply(([partition, accountId, clusterName, nodeRoleArn, queueArn]) =>
            karpenterControllerPolicy({ partition, region: args.region, accountId, clusterName, nodeRoleArn, queueArn }),
        );
    const { association } = podIdentityForServiceAccount(`${name}-karpenter`, {
        clusterName,
        namespace: karpenterNamespace,
        serviceAccount: karpenterServiceAccount,
        inlinePolicy: policy,
        tags,
    });

    const chart = (chartName: string): Omit<HelmChart, "values"> => ({
        releaseName: chartName,
        chart: chartName,
        version: karpenterRelease.version,
        repository: chartRepository,
        namespace: karpenterNamespace,
    });
    // The CRDs first, from their own chart: Helm upgrades them with it, which it never does for a chart's crds/.
    const crds = installChart("karpenter-crd", { ...chart("karpenter-crd"), values: {} }, context);
    const controller = installChart(
        "karpenter",
        {
            ...chart("karpenter"),
            skipCrds: true,
            values: {
                settings: { clusterName, interruptionQueue: interruptionQueue.name },
                serviceAccount: { name: karpenterServiceAccount },
                replicas: args.controllerReplicas,
                // Never on a node it manages: the system node group is a managed node group.
                nodeSelector: context.nodeSelector,
                controller: { resources: { requests: { cpu: "500m", memory: "1Gi" }, limits: { memory: "1Gi" } } },
            },
        },
        { ...context, dependsOn: [...context.dependsOn, crds, association, nodeAccess] },
    );

    const customResource = (kind: string, apiVersion: string, resourceName: string, spec: pulumi.Input<object>) =>
        new k8s.apiextensions.CustomResource(
            `${name}-${kind.toLowerCase()}-${resourceName}`,
            { apiVersion, kind, metadata: { name: resourceName }, spec },
            { provider: context.provider, dependsOn: [crds, controller] },
        );
    const nodeClass = customResource(
        "EC2NodeClass",
        "karpenter.k8s.aws/v1",
        gpuNodeClassName,
        pulumi.all([nodeRole.name, clusterName]).apply(([role, clusterName]) => gpuNodeClassSpec({ gpu: args.gpu, clusterName, role, tags })),
    );
    const nodePool = customResource("NodePool", "karpenter.sh/v1", gpuNodePoolName, gpuNodePoolSpec(args.gpu, args.podTerminationGracePeriodSeconds));
    return { controller, nodePool, nodeClass, interruptionQueue, nodeRole };
}
