// The EKS cluster: API authentication with access entries, control-plane logs, a system node group for
// add-ons, monitoring and Karpenter (which launches the GPU nodes, infra/karpenter.ts), the EKS add-ons that
// nodes need, the discovery tag on the cluster security group, and the Kubernetes provider everything in the
// cluster is declared through.
import * as aws from "@pulumi/aws";
import * as eks from "@pulumi/eks";
import * as k8s from "@pulumi/kubernetes";
import * as pulumi from "@pulumi/pulumi";
import { ClusterConfig, KubernetesVersion, systemNodeAmiType } from "./config";
import { karpenterDiscoveryTagKey, nodePoolLabelKey, systemNodeSelector } from "./conventions";
import { eksAddon } from "./eks-addon";
import { Network } from "./network";

/** Control-plane log types sent to CloudWatch. */
export const controlPlaneLogTypes = ["api", "audit", "authenticator", "controllerManager", "scheduler"];
/** Days CloudWatch keeps control-plane logs (EKS would create their log group with no expiry). */
export const controlPlaneLogRetentionDays = 30;
const systemNodeDiskSizeGiB = 50;
const clusterAdminPolicyArn = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy";
/** Read access to most objects, not Secrets: enough for previews, which fall back to client-side diffs. */
const clusterViewPolicyArn = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy";
/** Policies of the node IAM role: join the cluster, run the VPC CNI, pull from ECR, be reachable by SSM. */
export const nodeRolePolicyArns = [
    "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
    "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
    "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly",
    "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore",
];

export interface Cluster {
    name: pulumi.Output<string>;
    eks: eks.Cluster;
    kubeconfig: pulumi.Output<any>;
    provider: k8s.Provider;
    kubernetesVersion: KubernetesVersion;
    systemNodeGroup: eks.ManagedNodeGroup;
    /** The security group EKS made for the cluster, which its nodes (system and Karpenter's) share. */
    clusterSecurityGroupId: pulumi.Output<string>;
    /** Resources that must exist before workloads are scheduled: the system node group and the add-ons on it. */
    ready: pulumi.Resource[];
}

/** An IAM role for EC2 nodes with the node policies (nodeRolePolicyArns). */
export function createNodeRole(name: string, tags: Record<string, string>): aws.iam.Role {
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

/**
 * The system node group's launch template: IMDSv2 only, with a hop limit of 1, so that pods (one network hop beyond the
 * node) cannot take the node role's credentials; pods get their own through Pod Identity, and the controllers get
 * the region and VPC they would have read from it. Neither an image nor user data: the node group's amiType keeps
 * choosing the EKS-managed AMI, and EKS merges its bootstrap in. EKS refuses diskSize beside a launch template,
 * so the root volume (/dev/xvda on AL2023) is set here.
 */
function nodeLaunchTemplate(name: string, diskSizeGiB: number, tags: Record<string, string>): { id: pulumi.Output<string>; version: pulumi.Output<string> } {
    const template = new aws.ec2.LaunchTemplate(name, {
        description: "EKS managed node group: IMDSv2 only, hop limit 1, encrypted gp3 root volume; AMI chosen by EKS",
        metadataOptions: { httpEndpoint: "enabled", httpTokens: "required", httpPutResponseHopLimit: 1 },
        blockDeviceMappings: [
            { deviceName: "/dev/xvda", ebs: { volumeSize: diskSizeGiB, volumeType: "gp3", encrypted: "true", deleteOnTermination: "true" } },
        ],
        tags,
    });
    return { id: template.id, version: template.latestVersion.apply(String) };
}

/** `arn:aws:iam::123456789012:role/sso/admin` -> `sso-admin`: unique per role in the account. */
const roleNameOf = (arn: string): string => arn.slice(arn.indexOf(":role/") + ":role/".length).split("/").join("-");

/** An access entry giving an IAM role the named EKS access policies on the whole cluster. */
function accessEntry(kind: string, principalArn: string, policies: Record<string, string>): [string, eks.types.input.AccessEntryArgs] {
    const accessPolicies = Object.fromEntries(
        Object.entries(policies).map(([policyName, policyArn]) => [policyName, { policyArn, accessScope: { type: "cluster" } }]),
    );
    return [`${kind}-${roleNameOf(principalArn)}`, { principalArn, type: eks.AccessEntryType.Standard, accessPolicies }];
}

export function createCluster(
    name: string,
    args: { config: ClusterConfig; network: Network; tags: Record<string, string> },
): Cluster {
    const { config, network, tags } = args;
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
        accessEntries: Object.fromEntries([
            ...config.adminRoleArns.map((principalArn) => accessEntry("admin", principalArn, { clusterAdmin: clusterAdminPolicyArn })),
            ...config.viewerRoleArns.map((principalArn) => accessEntry("viewer", principalArn, { clusterView: clusterViewPolicyArn })),
        ]),
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
    const addon = (addonName: string, opts?: pulumi.CustomResourceOptions, configurationValues?: Record<string, unknown>) =>
        eksAddon(`${name}-${addonName}`, { clusterName, kubernetesVersion: config.kubernetesVersion, addonName, configurationValues }, opts);

    // Nodes need the network plugin, kube-proxy and the Pod Identity agent from their first minute. The CNI
    // enforces NetworkPolicies only with its network policy agent turned on.
    const nodeAddons = [
        addon("vpc-cni", undefined, { enableNetworkPolicy: "true" }),
        addon("kube-proxy"),
        addon("eks-pod-identity-agent"),
    ];

    const systemNodeGroup = new eks.ManagedNodeGroup(
        `${name}-system`,
        {
            cluster,
            nodeRole,
            subnetIds: network.privateSubnetIds,
            tags: { ...tags, [nodePoolLabelKey]: "system" },
            launchTemplate: nodeLaunchTemplate(`${name}-system-launch-template`, systemNodeDiskSizeGiB, tags),
            amiType: systemNodeAmiType,
            instanceTypes: config.systemNodes.instanceTypes,
            capacityType: "ON_DEMAND",
            scalingConfig: {
                minSize: config.systemNodes.minSize,
                desiredSize: config.systemNodes.desiredSize,
                maxSize: config.systemNodes.maxSize,
            },
            labels: systemNodeSelector,
        },
        // The cluster itself, explicitly: a component passed as an input is no dependency the engine records.
        { dependsOn: [cluster, ...nodeAddons] },
    );

    // Karpenter finds the security group for its nodes by this tag (subnets carry it too, network.ts): its nodes
    // share the system nodes' group, which the EFS mount targets and the control plane already admit.
    const clusterSecurityGroupId = cluster.eksCluster.vpcConfig.clusterSecurityGroupId;
    new aws.ec2.Tag(`${name}-security-group-discovery`, { resourceId: clusterSecurityGroupId, key: karpenterDiscoveryTagKey, value: config.name });

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
        clusterSecurityGroupId,
        ready: [systemNodeGroup, coredns],
    };
}

/** The Kubernetes provider for a cluster this stack does not create (existingClusterKubeconfig), applying as the
 *  stack's own cluster does: server-side. */
export function existingClusterProvider(name: string, kubeconfig: pulumi.Input<string>): k8s.Provider {
    return new k8s.Provider(`${name}-existing`, { kubeconfig, enableServerSideApply: true });
}
