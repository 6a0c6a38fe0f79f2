// Block storage: the EBS CSI driver (an EKS add-on, AWS credentials through Pod Identity) and an encrypted
// gp3 StorageClass as the cluster default. New clusters have neither, and every PVC would stay Pending.
import * as aws from "@pulumi/aws";
import * as k8s from "@pulumi/kubernetes";
import { Cluster } from "./cluster";
import { eksAddon } from "./eks-addon";
import { podIdentityRole } from "./pod-identity";

export const ebsCsiDriverPolicyArn = "arn:aws:iam::aws:policy/service-role/AmazonEBSCSIDriverPolicy";
export const defaultStorageClassName = "gp3";

export interface BlockStorage {
    driver: aws.eks.Addon;
    storageClass: k8s.storage.v1.StorageClass;
}

export function createBlockStorage(name: string, cluster: Cluster, tags: Record<string, string>): BlockStorage {
    const role = podIdentityRole(`${name}-ebs-csi`, { managedPolicyArns: [ebsCsiDriverPolicyArn] }, tags);
    const driver = eksAddon(
        `${name}-aws-ebs-csi-driver`,
        {
            clusterName: cluster.name,
            kubernetesVersion: cluster.kubernetesVersion,
            addonName: "aws-ebs-csi-driver",
            podIdentity: { serviceAccount: "ebs-csi-controller-sa", roleArn: role.arn },
        },
        { dependsOn: cluster.ready },
    );
    const storageClass = new k8s.storage.v1.StorageClass(
        defaultStorageClassName,
        {
            metadata: {
                name: defaultStorageClassName,
                annotations: { "storageclass.kubernetes.io/is-default-class": "true" },
            },
            provisioner: "ebs.csi.aws.com",
            parameters: { type: "gp3", encrypted: "true", "csi.storage.k8s.io/fstype": "ext4" },
            // Create the volume in the AZ of the node its first pod lands on.
            volumeBindingMode: "WaitForFirstConsumer",
            allowVolumeExpansion: true,
            reclaimPolicy: "Delete",
        },
        { provider: cluster.provider, dependsOn: [driver] },
    );
    return { driver, storageClass };
}
