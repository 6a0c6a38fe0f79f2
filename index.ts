// whisper-eks: a production Whisper speech-to-text service on EKS GPU nodes.
// This file is the architecture's table of contents: config in, components wired, outputs out.
import * as pulumi from "@pulumi/pulumi";
import { createCluster } from "./infra/cluster";
import { loadConfig } from "./infra/config";
import { installNvidiaDevicePlugin } from "./infra/gpu";
import { AddonContext } from "./infra/helm";
import { createServiceImage } from "./infra/image";
import { createNetwork } from "./infra/network";
import { createBlockStorage } from "./infra/storage";

// 1. Config, validated before anything is declared.
const config = loadConfig();
const name = config.cluster.name;

// 2. Network: VPC over several AZs, private subnets for nodes, tagged public/private subnets for load balancers.
const network = createNetwork(name, config.network, config.tags);

// 3. Cluster: EKS, access entries, system and GPU node groups, EKS add-ons, the Kubernetes provider.
const cluster = createCluster(name, { config: config.cluster, gpu: config.gpu, network, tags: config.tags });
const addons: AddonContext = { provider: cluster.provider, dependsOn: cluster.ready };

// 4. GPUs: the NVIDIA device plugin advertises nvidia.com/gpu on the GPU nodes.
installNvidiaDevicePlugin(addons);

// 5. Storage: EBS CSI driver and the default encrypted gp3 StorageClass.
const blockStorage = createBlockStorage(name, cluster, config.tags);

// 6. Image: the server built from ./service and pushed to ECR (or a prebuilt image), pinned by digest.
const image = createServiceImage(name, config.image, config.tags);

// Outputs.
export const region = config.region;
export const clusterName = cluster.name;
export const kubeconfig = pulumi.secret(cluster.kubeconfig);
export const imageReference = image.reference;
export const defaultStorageClass = blockStorage.storageClass.metadata.name;
export const gpuNodeGroups = cluster.gpuNodeGroups.map((group) => ({
    name: group.nodeGroup.nodeGroup.nodeGroupName,
    autoScalingGroupName: group.autoScalingGroupName,
    instanceTypes: group.config.instanceTypes,
    capacityType: group.config.capacityType,
}));
