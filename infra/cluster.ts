// The EKS cluster: API authentication with access entries, control-plane logs, a system node group for
// add-ons and monitoring, GPU node groups (AL2023 NVIDIA AMI, tainted and labelled), the EKS add-ons
// that nodes need, and the Kubernetes provider everything in the cluster is declared through.
import * as aws from "@pulumi/aws";
import * as eks from "@pulumi/eks";
import * as k8s from "@pulumi/kubernetes";
import * as pulumi from "@pulumi/pulumi";
import { gpuInstanceTypes } from "./catalog";
import { ClusterConfig, GpuConfig, GpuNodeGroupConfig } from "./config";
import { Network } from "./network";

/** Label every GPU node carries; the NVIDIA device plugin's chart schedules on it. */
export const gpuNodeLabel = { key: "nvidia.com/gpu.present", value: "true" } as const;
/** Taint that keeps everything but GPU workloads off GPU nodes. */
export const gpuTaint = { key: "nvidia.com/gpu", value: "true", effect: "NoSchedule" } as const;
/** Toleration for pods that belong on GPU nodes (the server, GPU DaemonSets). */
export const gpuToleration = { key: gpuTaint.key, operator: "Exists", effect: gpuTaint.effect } as const;
/** Label of the node pool a node belongs to: `system` or `gpu`. */
export const nodePoolLabelKey = "whisper-eks/node-pool";
/** nodeSelector for cluster add-ons, controllers and monitoring. */
export const systemNodeSelector = { [nodePoolLabelKey]: "system" } as const;

/** Control-plane log types sent to CloudWatch. */
export const controlPlaneLogTypes = ["api", "audit", "authenticator", "controllerManager", "scheduler"];
/** Days CloudWatch keeps control-plane logs (EKS would create their log group with no expiry). */
export const controlPlaneLogRetentionDays = 30;
const systemNodeDiskSizeGiB = 50;
const clusterAdminPolicyArn = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy";
/** Policies of the node IAM role: join the cluster, run the VPC CNI, pull from ECR, be reachable by SSM. */
export const nodeRolePolicyArns = [
    "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
    "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
    "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly",
    "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore",
];

export interface GpuNodeGroup {
    config: GpuNodeGroupConfig;
    nodeGroup: eks.ManagedNodeGroup;
    /** Name of the Auto Scaling group EKS made for the node group (Cluster Autoscaler scales it). */
    autoScalingGroupName: pulumi.Output<string>;
}

export interface Cluster {
    name: pulumi.Output<string>;
    eks: eks.Cluster;
    kubeconfig: pulumi.Output<any>;
    provider: k8s.Provider;
    kubernetesVersion: string;
    systemNodeGroup: eks.ManagedNodeGroup;
    gpuNodeGroups: GpuNodeGroup[];
    /** Resources that must exist before workloads are scheduled: node groups and the add-ons on them. */
    ready: pulumi.Resource[];
}

export interface EksAddonArgs {
    clusterName: pulumi.Input<string>;
    kubernetesVersion: string;
    /** The add-on's name in EKS, e.g. `coredns`. */
    addonName: string;
    /** A Pod Identity association for the add-on's service account. */
    podIdentity?: { serviceAccount: string; roleArn: pulumi.Input<string> };
    configurationValues?: Record<string, unknown>;
}

/**
 * An EKS-managed add-on, at the default version EKS publishes for the cluster's pinned Kubernetes version:
 * the version moves only when the Kubernetes version does (or AWS changes its default), never silently to latest.
 */
export function eksAddon(name: string, args: EksAddonArgs, opts?: pulumi.CustomResourceOptions): aws.eks.Addon {
    const version = aws.eks.getAddonVersionOutput({
        addonName: args.addonName,
        kubernetesVersion: args.kubernetesVersion,
        mostRecent: false,
    });
    return new aws.eks.Addon(
        name,
        {
            clusterName: args.clusterName,
            addonName: args.addonName,
            addonVersion: version.version,
            resolveConflictsOnCreate: "OVERWRITE",
            resolveConflictsOnUpdate: "OVERWRITE",
            podIdentityAssociations: args.podIdentity ? [args.podIdentity] : undefined,
            configurationValues: args.configurationValues ? JSON.stringify(args.configurationValues) : undefined,
        },
        opts,
    );
}

/** An IAM role that pods assume through EKS Pod Identity, with the given managed and inline policies. */
export function podIdentityRole(
    name: string,
    policies: { managedPolicyArns?: string[]; inlinePolicy?: pulumi.Input<string> },
    tags: Record<string, string>,
): aws.iam.Role {
    const role = new aws.iam.Role(name, {
        assumeRolePolicy: JSON.stringify({
            Version: "2012-10-17",
            Statement: [
                {
                    Effect: "Allow",
                    Principal: { Service: "pods.eks.amazonaws.com" },
                    Action: ["sts:AssumeRole", "sts:TagSession"],
                },
            ],
        }),
        tags,
    });
    (policies.managedPolicyArns ?? []).forEach(
        (policyArn, index) => new aws.iam.RolePolicyAttachment(`${name}-${index}`, { role: role.name, policyArn }, { parent: role }),
    );
    if (policies.inlinePolicy !== undefined) {
        new aws.iam.RolePolicy(`${name}-inline`, { role: role.id, policy: policies.inlinePolicy }, { parent: role });
    }
    return role;
}

/**
 * Binds a Kubernetes service account to a new IAM role through EKS Pod Identity (for controllers installed by
 * Helm: the Pod Identity agent add-on hands the role's credentials to the service account's pods).
 */
export function podIdentityForServiceAccount(
    name: string,
    args: {
        clusterName: pulumi.Input<string>;
        namespace: string;
        serviceAccount: string;
        managedPolicyArns?: string[];
        inlinePolicy?: pulumi.Input<string>;
        tags: Record<string, string>;
    },
    opts?: pulumi.CustomResourceOptions,
): { role: aws.iam.Role; association: aws.eks.PodIdentityAssociation } {
    const role = podIdentityRole(name, args, args.tags);
    const association = new aws.eks.PodIdentityAssociation(
        name,
        { clusterName: args.clusterName, namespace: args.namespace, serviceAccount: args.serviceAccount, roleArn: role.arn, tags: args.tags },
        opts,
    );
    return { role, association };
}

function createNodeRole(name: string, tags: Record<string, string>): aws.iam.Role {
    const role = new aws.iam.Role(name, {
        assumeRolePolicy: JSON.stringify({
            Version: "2012-10-17",
            Statement: [{ Effect: "Allow", Principal: { Service: "ec2.amazonaws.com" }, Action: "sts:AssumeRole" }],
        }),
        tags,
    });
    nodeRolePolicyArns.forEach(
        (policyArn) =>
            new aws.iam.RolePolicyAttachment(`${name}-${policyArn.split("/").pop()}`, { role: role.name, policyArn }, { parent: role }),
    );
    return role;
}

/** `arn:aws:iam::123456789012:role/sso/admin` -> `sso-admin`: unique per role in the account. */
const roleNameOf = (arn: string): string => arn.slice(arn.indexOf(":role/") + ":role/".length).split("/").join("-");

/**
 * Cluster Autoscaler can only scale a group up from zero if the group's ASG describes the nodes it would get:
 * their GPUs, labels and taints. EKS does not put these on managed node groups' ASGs, so they are added here.
 */
function tagForClusterAutoscaler(name: string, group: GpuNodeGroupConfig, asgName: pulumi.Output<string>): void {
    const gpuCount = gpuInstanceTypes[group.instanceTypes[0]].gpuCount;
    const template = "k8s.io/cluster-autoscaler/node-template";
    const tags: Record<string, string> = {
        [`${template}/resources/nvidia.com/gpu`]: String(gpuCount),
        [`${template}/resources/ephemeral-storage`]: `${group.diskSizeGiB}G`,
        [`${template}/label/${gpuNodeLabel.key}`]: gpuNodeLabel.value,
        [`${template}/label/${nodePoolLabelKey}`]: "gpu",
        [`${template}/taint/${gpuTaint.key}`]: `${gpuTaint.value}:${gpuTaint.effect}`,
    };
    Object.entries(tags).forEach(
        ([key, value], index) =>
            new aws.autoscaling.Tag(
                `${name}-ca-template-${index}`,
                { autoscalingGroupName: asgName, tag: { key, value, propagateAtLaunch: false } },
            ),
    );
}

export function createCluster(
    name: string,
    args: { config: ClusterConfig; gpu: GpuConfig; network: Network; tags: Record<string, string> },
): Cluster {
    const { config, gpu, network, tags } = args;
    const nodeRole = createNodeRole(`${name}-node`, tags);
    // Made before the cluster, under the name EKS writes to, so that the logs expire.
    const controlPlaneLogs = new aws.cloudwatch.LogGroup(`${name}-control-plane`, {
        name: `/aws/eks/${config.name}/cluster`,
        retentionInDays: controlPlaneLogRetentionDays,
        tags,
    });

    const cluster = new eks.Cluster(name, {
        name: config.name,
        version: config.kubernetesVersion,
        vpcId: network.vpcId,
        publicSubnetIds: network.publicSubnetIds,
        privateSubnetIds: network.privateSubnetIds,
        nodeAssociatePublicIpAddress: false,
        endpointPublicAccess: true,
        endpointPrivateAccess: true,
        publicAccessCidrs: config.publicAccessCidrs,
        authenticationMode: eks.AuthenticationMode.Api,
        accessEntries: Object.fromEntries(
            config.adminRoleArns.map((principalArn) => [
                `admin-${roleNameOf(principalArn)}`,
                {
                    principalArn,
                    type: eks.AccessEntryType.Standard,
                    accessPolicies: {
                        clusterAdmin: { policyArn: clusterAdminPolicyArn, accessScope: { type: "cluster" } },
                    },
                },
            ]),
        ),
        enabledClusterLogTypes: controlPlaneLogTypes,
        skipDefaultNodeGroup: true,
        // Every add-on is an EKS add-on declared below, once: none bootstrapped, none from the component.
        bootstrapSelfManagedAddons: false,
        useDefaultVpcCni: true,
        corednsAddonOptions: { enabled: false },
        kubeProxyAddonOptions: { enabled: false },
        tags,
    }, { dependsOn: [controlPlaneLogs] });
    const clusterName = cluster.eksCluster.name;
    // Not parented to the cluster: depending on a component waits for all its children, and the node groups
    // depend on the cluster while coredns depends on a node group.
    const addon = (addonName: string, opts?: pulumi.CustomResourceOptions) =>
        eksAddon(`${name}-${addonName}`, { clusterName, kubernetesVersion: config.kubernetesVersion, addonName }, opts);

    // Nodes need the network plugin, kube-proxy and the Pod Identity agent from their first minute.
    const nodeAddons = [addon("vpc-cni"), addon("kube-proxy"), addon("eks-pod-identity-agent")];

    const nodeGroupArgs = (pool: string) => ({
        cluster,
        nodeRole,
        subnetIds: network.privateSubnetIds,
        tags: { ...tags, [nodePoolLabelKey]: pool },
    });

    const systemNodeGroup = new eks.ManagedNodeGroup(
        `${name}-system`,
        {
            ...nodeGroupArgs("system"),
            amiType: "AL2023_x86_64_STANDARD",
            instanceTypes: config.systemNodes.instanceTypes,
            capacityType: "ON_DEMAND",
            diskSize: systemNodeDiskSizeGiB,
            scalingConfig: {
                minSize: config.systemNodes.minSize,
                desiredSize: config.systemNodes.desiredSize,
                maxSize: config.systemNodes.maxSize,
            },
            labels: systemNodeSelector,
        },
        { dependsOn: nodeAddons },
    );

    const gpuNodeGroups = gpu.nodeGroups.map((group): GpuNodeGroup => {
        const nodeGroup = new eks.ManagedNodeGroup(
            `${name}-${group.name}`,
            {
                ...nodeGroupArgs("gpu"),
                // Set explicitly: `gpu: true` alone does not pick the NVIDIA AMI. No userData, kubeletExtraArgs
                // or amiId: they force a custom launch template whose AMI is looked up again on every run.
                amiType: "AL2023_x86_64_NVIDIA",
                instanceTypes: group.instanceTypes,
                capacityType: group.capacityType,
                diskSize: group.diskSizeGiB,
                scalingConfig: { minSize: group.minSize, desiredSize: group.desiredSize, maxSize: group.maxSize },
                // Cluster Autoscaler owns the desired size after creation.
                ignoreScalingChanges: true,
                labels: { [gpuNodeLabel.key]: gpuNodeLabel.value, [nodePoolLabelKey]: "gpu" },
                taints: [{ key: gpuTaint.key, value: gpuTaint.value, effect: "NO_SCHEDULE" }],
            },
            { dependsOn: nodeAddons },
        );
        const autoScalingGroupName = nodeGroup.nodeGroup.apply((group) => group.resources[0].autoscalingGroups[0].name);
        // Not parented to the node group: a child that depends on its parent's output would wait for itself.
        tagForClusterAutoscaler(`${name}-${group.name}`, group, autoScalingGroupName);
        return { config: group, nodeGroup, autoScalingGroupName };
    });

    // CoreDNS is a Deployment: it needs a node to become healthy.
    const coredns = addon("coredns", { dependsOn: [systemNodeGroup] });

    const provider = new k8s.Provider(name, { kubeconfig: cluster.kubeconfigJson, enableServerSideApply: true });

    return {
        name: clusterName,
        eks: cluster,
        kubeconfig: cluster.kubeconfig,
        provider,
        kubernetesVersion: config.kubernetesVersion,
        systemNodeGroup,
        gpuNodeGroups,
        ready: [systemNodeGroup, coredns, ...gpuNodeGroups.map((group) => group.nodeGroup)],
    };
}
