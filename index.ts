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
import { installClusterAutoscaler, installPrometheusAdapter } from "./infra/autoscaling";
import { installLoadBalancerController } from "./infra/load-balancer";
import { createEfsModelCache, ModelCacheClass } from "./infra/model-cache";
import { grafanaService, installMonitoring, monitoringNamespace, prometheusPort, prometheusUrl } from "./infra/monitoring";
import { apiKeyFor, deploymentName, serverUser, whisperNamespace, WhisperService } from "./infra/whisper";
import { podResourcesPerGpu } from "./infra/catalog";

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

// 7. Traffic: the AWS Load Balancer Controller, which makes the service's NLB.
const loadBalancerController = installLoadBalancerController(
    name,
    { clusterName: cluster.name, region: config.region, vpcId: network.vpcId, tags: config.tags },
    addons,
);

// 8. Model cache: a shared EFS volume (any replica count), or the gp3 class for a single replica.
const modelCache: ModelCacheClass =
    config.workload.modelCacheStorage === "efs"
        ? createEfsModelCache(
              name,
              {
                  clusterName: cluster.name,
                  kubernetesVersion: cluster.kubernetesVersion,
                  vpcId: network.vpcId,
                  subnetIds: network.privateSubnetIds,
                  subnetCount: config.network.availabilityZoneCount,
                  nodeSecurityGroupId: cluster.eks.eksCluster.vpcConfig.clusterSecurityGroupId,
                  ...serverUser,
                  tags: config.tags,
              },
              addons,
          )
        : { storageClassName: blockStorage.storageClass.metadata.name, accessMode: "ReadWriteOnce", dependsOn: [blockStorage.storageClass] };

// 9. Monitoring: kube-prometheus-stack, the DCGM exporter, the service's alerts and dashboard.
const monitoring = installMonitoring(
    name,
    {
        prometheusStorageClassName: blockStorage.storageClass.metadata.name,
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
        },
    },
    { provider: cluster.provider, dependsOn: [...cluster.ready, blockStorage.storageClass] },
);

// 10. Autoscaling: the service's metrics for the HPA, and GPU nodes for the HPA's pods.
const metricsAdapter = installPrometheusAdapter(
    { namespace: monitoringNamespace, prometheusUrl, prometheusPort },
    { provider: cluster.provider, dependsOn: [monitoring.release] },
);
installClusterAutoscaler(
    name,
    {
        clusterName: cluster.name,
        kubernetesVersion: cluster.kubernetesVersion,
        region: config.region,
        scaleDownUnneededMinutes: config.autoscaling.clusterAutoscalerScaleDownMinutes,
        tags: config.tags,
    },
    addons,
);

// 11. The Whisper service: model cache volume, GPU Deployment, NLB Service, PDB, ServiceMonitor, HPA.
const serviceApiKey = apiKeyFor(name, config.workload);
const whisper = new WhisperService(
    "whisper",
    {
        stack: config.stack,
        image: image.reference,
        resources: podResourcesPerGpu(config.gpu.nodeGroups.flatMap((group) => group.instanceTypes)),
        server: { ...config.service, ...config.workload },
        apiKey: serviceApiKey,
        modelCache: { ...modelCache, sizeGiB: config.workload.modelCacheSizeGiB },
        traffic: config.traffic,
        scaling: config.autoscaling,
        serviceMonitor: true,
        after: { loadBalancerController, monitoring: monitoring.release, metricsAdapter },
        provider: cluster.provider,
    },
    { dependsOn: cluster.ready },
);

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
export const serviceEndpoint = whisper.endpoint;
export const serviceUrl = pulumi.interpolate`${config.traffic.certificateArn ? "https" : "http"}://${whisper.endpoint}`;
export const apiKey = serviceApiKey;
export const grafana = { namespace: monitoringNamespace, service: grafanaService, adminUser: "admin" };
export const grafanaAdminPassword = pulumi.secret(monitoring.grafanaAdminPassword);
