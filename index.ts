// whisper-eks: a production Whisper speech-to-text service on EKS GPU nodes.
// This file is the architecture's table of contents: config in, components wired, outputs out.
import * as pulumi from "@pulumi/pulumi";
import { installKeda } from "./infra/autoscaling";
import { maxGpuPods, podResourcesPerGpu } from "./infra/catalog";
import { createCluster, existingClusterProvider } from "./infra/cluster";
import { systemNodeSelector } from "./infra/conventions";
import { loadConfig } from "./infra/load-config";
import { installNvidiaDevicePlugin } from "./infra/gpu";
import { AddonContext } from "./infra/helm";
import { createServiceImage } from "./infra/image";
import { installKarpenter } from "./infra/karpenter";
import { installLoadBalancerController } from "./infra/load-balancer";
import { createEfsModelCache, ModelCacheClass } from "./infra/model-cache";
import { grafanaService, installMonitoring, monitoringNamespace, prometheusPort, prometheusUrl } from "./infra/monitoring";
import { createNetwork } from "./infra/network";
import { createBlockStorage } from "./infra/storage";
import { apiKeyFor, deploymentName, serverUser, terminationGracePeriodSeconds, whisperNamespace, WhisperService } from "./infra/whisper";

// 1. Config, validated before anything is declared.
const config = loadConfig();
const name = config.cluster.name;
const serverSettings = { ...config.service, ...config.workload, mayRunOnSpot: config.gpu.capacityTypes.includes("spot") };

// 2-5. The cluster, created here unless the stack deploys into an existing one (existingClusterKubeconfig).
function createEksCluster() {
    // 2. Network: VPC over several AZs, private subnets for nodes, tagged public/private subnets for load balancers.
    const network = createNetwork(name, config.network, config.tags);

    // 3. Cluster: EKS, access entries, the system node group, EKS add-ons, the Kubernetes provider.
    const cluster = createCluster(name, { config: config.cluster, network, tags: config.tags });
    const addons: AddonContext = { provider: cluster.provider, dependsOn: cluster.ready, nodeSelector: systemNodeSelector };

    // 4. GPU nodes: Karpenter launches them for the server's pods (GPU NodePool, interruption queue); the NVIDIA
    //    device plugin advertises nvidia.com/gpu on them.
    const karpenter = installKarpenter(
        name,
        {
            clusterName: cluster.name,
            region: config.region,
            gpu: config.gpu,
            podTerminationGracePeriodSeconds: terminationGracePeriodSeconds(serverSettings),
            controllerReplicas: config.cluster.systemNodes.minSize >= 2 ? 2 : 1,
            tags: config.tags,
        },
        addons,
    );
    installNvidiaDevicePlugin(addons);

    // 5. Storage: EBS CSI driver and the default encrypted gp3 StorageClass.
    const blockStorage = createBlockStorage(name, cluster, config.tags);
    return { network, cluster, addons, blockStorage, karpenter };
}
const eks = config.existingClusterKubeconfig === undefined ? createEksCluster() : undefined;

/** What an existing cluster is assumed to run already, and so is not installed or created. */
const skippedInExistingCluster = eks
    ? []
    : [
          "VPC, EKS cluster, system node group, node IAM roles and EKS add-ons",
          "Karpenter (CRDs, controller and its IAM role, interruption queue, GPU NodePool and EC2NodeClass): the cluster must provide GPU nodes itself",
          "NVIDIA device plugin (the cluster must advertise nvidia.com/gpu)",
          "EBS CSI driver and the gp3 StorageClass (Prometheus uses the cluster's default StorageClass)",
          "AWS Load Balancer Controller and its IAM role (the cluster must run it for the NLB Service)",
          "EFS file system and the efs-sc StorageClass (the model cache uses modelCacheStorageClass)",
      ];
for (const part of skippedInExistingCluster) pulumi.log.info(`existing cluster: not deployed: ${part}`);
const provider = eks?.cluster.provider ?? existingClusterProvider(name, config.existingClusterKubeconfig!);
const addons: AddonContext = eks?.addons ?? { provider, dependsOn: [], nodeSelector: config.existingClusterNodeSelector };

// 6. Image: the server built from ./service and pushed to ECR (or a prebuilt image), pinned by digest.
const image = createServiceImage(name, config.image, config.tags);

// 7. Traffic: the AWS Load Balancer Controller, which makes the service's load balancer (an NLB, or an ALB for TLS).
const loadBalancerController =
    eks && installLoadBalancerController(name, { clusterName: eks.cluster.name, region: config.region, vpcId: eks.network.vpcId, tags: config.tags }, addons);

// 8. Model cache: a shared EFS volume (any replica count), the gp3 class for a single replica, or the existing cluster's class.
const modelCacheAccessMode = config.workload.modelCacheStorage === "efs" ? "ReadWriteMany" : "ReadWriteOnce";
const modelCache: ModelCacheClass = !eks
    ? { storageClassName: config.workload.modelCacheStorageClass ?? "", accessMode: modelCacheAccessMode, dependsOn: [] }
    : config.workload.modelCacheStorage === "efs"
      ? createEfsModelCache(
            name,
            {
                clusterName: eks.cluster.name,
                kubernetesVersion: eks.cluster.kubernetesVersion,
                vpcId: eks.network.vpcId,
                subnetIds: eks.network.privateSubnetIds,
                subnetCount: config.network.availabilityZoneCount,
                nodeSecurityGroupId: eks.cluster.eks.eksCluster.vpcConfig.clusterSecurityGroupId,
                ...serverUser,
                tags: config.tags,
            },
            addons,
        )
      : { storageClassName: eks.blockStorage.storageClass.metadata.name, accessMode: "ReadWriteOnce", dependsOn: [eks.blockStorage.storageClass] };

// 9. Monitoring: kube-prometheus-stack, the DCGM exporter, the service's alerts and dashboard.
const monitoring = installMonitoring(
    name,
    {
        prometheusStorageClassName: eks?.blockStorage.storageClass.metadata.name,
        prometheusStorageGiB: config.monitoring.prometheusStorageGiB,
        prometheusRetentionDays: config.monitoring.prometheusRetentionDays,
        grafanaAdminPassword: config.monitoring.grafanaAdminPassword,
        installDcgmExporter: true,
        alerts: {
            namespace: whisperNamespace,
            deployment: deploymentName,
            queueSize: config.workload.queueSize,
            p95LatencySeconds: config.monitoring.alertP95LatencySeconds,
            errorRatio: config.monitoring.alertErrorRatio,
            realtimeTurnLatencyP95Seconds: config.monitoring.alertRealtimeTurnLatencyP95Seconds,
        },
    },
    { ...addons, dependsOn: [...addons.dependsOn, ...(eks ? [eks.blockStorage.storageClass] : [])] },
);

// 10. Autoscaling: KEDA scales the service's pods on its metrics (to zero outside active hours); Karpenter follows with GPU nodes.
const keda = installKeda(addons);

// 11. The Whisper service: model cache volume, GPU Deployment, load balancer, NetworkPolicy, PDB, PodMonitor, ScaledObject.
const serviceApiKey = apiKeyFor(name, config.workload);
const whisper = new WhisperService(
    "whisper",
    {
        stack: config.stack,
        image: image.reference,
        resources: podResourcesPerGpu(config.gpu.instanceTypes),
        server: serverSettings,
        apiKey: serviceApiKey,
        modelCache: { ...modelCache, sizeGiB: config.workload.modelCacheSizeGiB },
        traffic: config.traffic,
        loadBalancerSourceCidrs: eks && [config.network.vpcCidr],
        scaling: { ...config.autoscaling, maxGpuPods: eks && maxGpuPods(config.gpu), prometheusAddress: `${prometheusUrl}:${prometheusPort}` },
        scrapedFrom: { namespace: monitoringNamespace },
        after: { loadBalancerController, monitoring: monitoring.release, keda },
        provider,
    },
    // Karpenter's GPU NodePool first: the server's pods wait for a GPU node it launches.
    { dependsOn: [...addons.dependsOn, ...(eks ? [eks.karpenter.nodePool, eks.karpenter.nodeClass] : [])] },
);

// Outputs.
export const region = config.region;
export const clusterName = eks?.cluster.name;
export const kubeconfig = eks && pulumi.secret(eks.cluster.kubeconfig);
export const imageReference = image.reference;
export const imageRepositoryUrl = image.repository.repositoryUrl;
export const defaultStorageClass = eks?.blockStorage.storageClass.metadata.name;
export const gpuNodePool = eks && {
    nodePool: eks.karpenter.nodePool.metadata.name,
    nodeClass: eks.karpenter.nodeClass.metadata.name,
    instanceTypes: config.gpu.instanceTypes,
    capacityTypes: config.gpu.capacityTypes,
    amiAlias: config.gpu.amiAlias,
    interruptionQueue: eks.karpenter.interruptionQueue.name,
};
export const notDeployedInExistingCluster = eks ? undefined : skippedInExistingCluster;
export const serviceEndpoint = whisper.endpoint;
export const serviceUrl = pulumi.interpolate`${config.traffic.certificateArn ? "https" : "http"}://${whisper.endpoint}`;
export const apiKey = serviceApiKey;
export const grafana = { namespace: monitoringNamespace, service: grafanaService, adminUser: "admin" };
export const grafanaAdminPassword = pulumi.secret(monitoring.grafanaAdminPassword);
