// Where the server keeps its Hugging Face cache (/models): a ReadWriteMany EFS volume that every replica
// shares, so a new pod on a new node finds large-v3 already downloaded; or, for a single replica, EBS gp3.
import * as aws from "@pulumi/aws";
import * as k8s from "@pulumi/kubernetes";
import * as pulumi from "@pulumi/pulumi";
import { eksAddon } from "./eks-addon";
import { AddonContext } from "./helm";
import { podIdentityRole } from "./pod-identity";

export type VolumeAccessMode = "ReadWriteMany" | "ReadWriteOnce";

/** The EFS CSI driver's StorageClass: one access point (a directory owned by the server's user) per volume. */
export const efsStorageClassName = "efs-sc";
export const efsCsiDriverPolicyArn = "arn:aws:iam::aws:policy/service-role/AmazonEFSCSIDriverPolicy";

/** What the workload needs to know of the cache: a StorageClass and the access mode its volumes support. */
export interface ModelCacheClass {
    storageClassName: pulumi.Input<string>;
    accessMode: VolumeAccessMode;
    /** Created for the cache: the workload's PVC waits for it. */
    dependsOn: pulumi.Resource[];
}

export interface EfsModelCacheArgs {
    clusterName: pulumi.Input<string>;
    kubernetesVersion: string;
    vpcId: pulumi.Input<string>;
    /** The node subnets: one mount target each. */
    subnetIds: pulumi.Output<string[]>;
    subnetCount: number;
    /** Security group of the nodes that mount the file system (NFS is allowed from it). */
    nodeSecurityGroupId: pulumi.Input<string>;
    /** The server's user and group: the access points' directories belong to them. */
    uid: number;
    gid: number;
    tags: Record<string, string>;
}

/** The EFS CSI driver (EKS add-on, Pod Identity), an encrypted file system reachable from the nodes, and `efs-sc`. */
export function createEfsModelCache(name: string, args: EfsModelCacheArgs, context: AddonContext): ModelCacheClass & { fileSystem: aws.efs.FileSystem } {
    const driverRole = podIdentityRole(`${name}-efs-csi`, { managedPolicyArns: [efsCsiDriverPolicyArn] }, args.tags);
    const driver = eksAddon(
        `${name}-aws-efs-csi-driver`,
        {
            clusterName: args.clusterName,
            kubernetesVersion: args.kubernetesVersion,
            addonName: "aws-efs-csi-driver",
            podIdentity: { serviceAccount: "efs-csi-controller-sa", roleArn: driverRole.arn },
        },
        { dependsOn: context.dependsOn },
    );

    const nfs = new aws.ec2.SecurityGroup(`${name}-efs-nfs`, {
        vpcId: args.vpcId,
        description: "NFS from the cluster nodes to the model cache file system",
        ingress: [{ protocol: "tcp", fromPort: 2049, toPort: 2049, securityGroups: [args.nodeSecurityGroupId], description: "NFS from nodes" }],
        tags: { ...args.tags, Name: `${name}-efs-nfs` },
    });
    const fileSystem = new aws.efs.FileSystem(`${name}-efs`, {
        encrypted: true,
        performanceMode: "generalPurpose",
        // A pod start reads 3 GB at once after long idle periods: elastic throughput has no burst credits to run out of.
        throughputMode: "elastic",
        tags: { ...args.tags, Name: `${name}-model-cache` },
    });
    const mountTargets = Array.from(
        { length: args.subnetCount },
        (_, index) =>
            new aws.efs.MountTarget(
                `${name}-efs-${index}`,
                { fileSystemId: fileSystem.id, subnetId: args.subnetIds.apply((ids) => ids[index]), securityGroups: [nfs.id] },
                { parent: fileSystem },
            ),
    );

    const storageClass = new k8s.storage.v1.StorageClass(
        `${name}-efs-sc`,
        {
            metadata: { name: efsStorageClassName },
            provisioner: "efs.csi.aws.com",
            parameters: {
                provisioningMode: "efs-ap",
                fileSystemId: fileSystem.id,
                directoryPerms: "700",
                uid: String(args.uid),
                gid: String(args.gid),
                basePath: "/dynamic",
            },
            mountOptions: ["tls"],
            reclaimPolicy: "Delete",
            volumeBindingMode: "Immediate",
        },
        { provider: context.provider, dependsOn: [driver, ...mountTargets] },
    );
    return { storageClassName: storageClass.metadata.name, accessMode: "ReadWriteMany", dependsOn: [storageClass], fileSystem };
}
