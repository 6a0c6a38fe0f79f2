// What each real stack (Pulumi.dev.yaml, Pulumi.prod.yaml) declares for the foundation: network, cluster,
// the system node group, add-ons, device plugin, storage, image and outputs, evaluated offline under mocks.
import { strict as assert } from "assert";
import { gpuInstanceTypes } from "../infra/catalog";
import { pinnedImagePattern } from "../infra/load-config";
import {
    evaluateStack,
    findResource,
    findResources,
    RecordedResource,
    StackEvaluation,
    stackConfig,
} from "../scripts/offline-stack";

interface Taint {
    key: string;
    value?: string;
    effect: string;
}
interface Toleration {
    key?: string;
    operator?: string;
    value?: string;
    effect?: string;
}
interface NodeSelectorTerm {
    matchExpressions: { key: string; operator: string; values?: string[] }[];
}

/** Kubernetes' toleration rule: does the toleration tolerate the taint? */
function tolerates(toleration: Toleration, taint: Taint): boolean {
    if (toleration.effect && toleration.effect !== taint.effect) return false;
    if (toleration.operator === "Exists") return toleration.key === undefined || toleration.key === taint.key;
    return toleration.key === taint.key && (toleration.value ?? "") === (taint.value ?? "");
}

/** Kubernetes' required node affinity: do the node's labels satisfy one of the terms? */
function affinityAdmits(terms: NodeSelectorTerm[], labels: Record<string, string>): boolean {
    return terms.some((term) =>
        term.matchExpressions.every((expression) => {
            const value = labels[expression.key];
            switch (expression.operator) {
                case "In":
                    return value !== undefined && (expression.values ?? []).includes(value);
                case "Exists":
                    return value !== undefined;
                default:
                    throw new Error(`operator ${expression.operator} not handled by this spec`);
            }
        }),
    );
}

/** The launch template a managed node group names. */
let launchTemplate: (group: RecordedResource) => RecordedResource;

for (const stack of ["dev", "prod"]) {
    describe(`foundation: the ${stack} stack`, () => {
        let evaluation: StackEvaluation;
        let config: Record<string, any>;
        const key = (name: string) => config[`whisper-eks:${name}`];
        const resources = (type: string, name?: string | RegExp) => findResources(evaluation.resources, type, name);
        const resource = (type: string, name?: string | RegExp) => findResource(evaluation.resources, type, name);
        const clusterName = `whisper-eks-${stack}`;
        const gpuNodePool = () => resource("kubernetes:karpenter.sh/v1:NodePool");
        const systemNodeGroup = () => resource("eks:index:ManagedNodeGroup", `${clusterName}-system`);

        before(async () => {
            evaluation = await evaluateStack(stack);
            config = stackConfig(stack).values;
            launchTemplate = (group) => {
                const id = group.inputs.launchTemplate?.id;
                return resources("aws:ec2/launchTemplate:LaunchTemplate").find((template) => template.state.id === id) ??
                    assert.fail(`${group.name} names no launch template declared here (${JSON.stringify(group.inputs.launchTemplate)})`);
            };
        });

        it("spreads the VPC over the configured AZs with load balancer tags on its subnets", () => {
            const vpc = resource("awsx:ec2:Vpc");
            assert.equal(vpc.inputs.numberOfAvailabilityZones, key("availabilityZoneCount"));
            assert.ok(vpc.inputs.numberOfAvailabilityZones >= 2);
            assert.equal(vpc.inputs.cidrBlock, key("vpcCidr"));
            assert.equal(vpc.inputs.natGateways.strategy, key("natGatewayStrategy"));
            const specs = Object.fromEntries(vpc.inputs.subnetSpecs.map((spec: any) => [spec.type, spec.tags]));
            assert.equal(specs.Public["kubernetes.io/role/elb"], "1");
            assert.equal(specs.Private["kubernetes.io/role/internal-elb"], "1");
        });

        it("declares an EKS cluster with API authentication, logs, a pinned version and no default node group", () => {
            const cluster = resource("eks:index:Cluster");
            const vpc = resource("awsx:ec2:Vpc");
            assert.equal(cluster.inputs.name, clusterName);
            assert.equal(cluster.inputs.version, key("kubernetesVersion"));
            assert.match(cluster.inputs.version, /^1\.\d+$/);
            assert.equal(cluster.inputs.authenticationMode, "API");
            assert.equal(cluster.inputs.skipDefaultNodeGroup, true);
            for (const logType of ["api", "audit", "authenticator"]) assert.ok(cluster.inputs.enabledClusterLogTypes.includes(logType), logType);
            const logGroup = resource("aws:cloudwatch/logGroup:LogGroup", `${clusterName}-control-plane`);
            assert.equal(logGroup.inputs.name, `/aws/eks/${clusterName}/cluster`);
            assert.ok(logGroup.inputs.retentionInDays > 0);
            const order = evaluation.resources.map((r) => r.name);
            assert.ok(order.indexOf(logGroup.name) < order.indexOf(cluster.name), "the log group exists before EKS writes to it");
            assert.deepEqual(cluster.inputs.privateSubnetIds, vpc.state.privateSubnetIds);
            assert.deepEqual(cluster.inputs.publicSubnetIds, vpc.state.publicSubnetIds);
            assert.equal(cluster.inputs.nodeAssociatePublicIpAddress, false);
            assert.deepEqual(cluster.inputs.publicAccessCidrs, key("clusterPublicAccessCidrs"));
            // Each add-on is declared once, as an EKS add-on: none bootstrapped, none from the component.
            assert.equal(cluster.inputs.bootstrapSelfManagedAddons, false);
            assert.equal(cluster.inputs.useDefaultVpcCni, true);
            assert.equal(cluster.inputs.corednsAddonOptions.enabled, false);
            assert.equal(cluster.inputs.kubeProxyAddonOptions.enabled, false);
        });

        it("has no GPU node group: GPU nodes come from Karpenter's NodePool, the system node group is the only managed one", () => {
            assert.deepEqual(resources("eks:index:ManagedNodeGroup").map((group) => group.name), [`${clusterName}-system`]);
            assert.deepEqual(resources("aws:autoscaling/tag:Tag"), [], "no node-template tags for Cluster Autoscaler");
            assert.equal(gpuNodePool().inputs.spec.template.metadata.labels["nvidia.com/gpu.present"], "true");
        });

        it("requires IMDSv2 with a hop limit of 1 on the system node group, by a launch template that leaves the AMI to EKS", () => {
            const group = systemNodeGroup();
            const template = launchTemplate(group);
            // Pods (one hop further than the node) cannot reach the instance role; Pod Identity gives them theirs.
            assert.deepEqual(template.inputs.metadataOptions, { httpEndpoint: "enabled", httpTokens: "required", httpPutResponseHopLimit: 1 });
            // No image and no user data: the node group's amiType picks the EKS-managed AMI, and updates roll nodes
            // only when the template itself changes.
            assert.equal(template.inputs.imageId, undefined, group.name);
            assert.equal(template.inputs.userData, undefined, group.name);
            assert.match(group.inputs.amiType, /^AL2023_x86_64_/);
            assert.equal(group.inputs.launchTemplate.version, String(template.state.latestVersion));
            // EKS refuses diskSize beside a launch template: the root volume is the template's.
            assert.equal(group.inputs.diskSize, undefined, group.name);
            assert.deepEqual(template.inputs.blockDeviceMappings, [
                { deviceName: "/dev/xvda", ebs: { volumeSize: 50, volumeType: "gp3", encrypted: "true", deleteOnTermination: "true" } },
            ]);
            // What pods would otherwise read from the instance metadata service, they are given.
            const values = (release: string) => resource("kubernetes:helm.sh/v3:Release", release).inputs.values;
            assert.equal(values("aws-load-balancer-controller").region, config["aws:region"]);
            assert.equal(values("aws-load-balancer-controller").vpcId, resource("awsx:ec2:Vpc").state.vpcId);
        });

        it("enforces NetworkPolicies: the VPC CNI add-on runs with network policy support on", () => {
            const cni = resource("aws:eks/addon:Addon", `${clusterName}-vpc-cni`);
            assert.equal(JSON.parse(cni.inputs.configurationValues).enableNetworkPolicy, "true");
        });

        it("runs add-ons on an untainted system node group with the node role made here", () => {
            const system = systemNodeGroup();
            assert.equal(system.inputs.amiType, "AL2023_x86_64_STANDARD");
            assert.deepEqual(system.inputs.instanceTypes, key("systemNodeInstanceTypes"));
            for (const type of system.inputs.instanceTypes) assert.equal(gpuInstanceTypes[type], undefined, type);
            assert.equal(system.inputs.taints, undefined);
            assert.deepEqual(system.inputs.scalingConfig, {
                minSize: key("systemNodeMinSize"),
                desiredSize: key("systemNodeDesiredSize"),
                maxSize: key("systemNodeMaxSize"),
            });
            const nodeRole = resource("aws:iam/role:Role", `${clusterName}-node`);
            assert.deepEqual(system.inputs.nodeRole, { $resource: { type: "aws:iam/role:Role", name: nodeRole.name } });
            assert.equal(JSON.parse(nodeRole.inputs.assumeRolePolicy).Statement[0].Principal.Service, "ec2.amazonaws.com");
            const attached = resources("aws:iam/rolePolicyAttachment:RolePolicyAttachment", new RegExp(`^${nodeRole.name}-`)).map(
                (attachment) => attachment.inputs.policyArn.split("/").pop(),
            );
            assert.deepEqual(attached.sort(), [
                "AmazonEC2ContainerRegistryReadOnly",
                "AmazonEKSWorkerNodePolicy",
                "AmazonEKS_CNI_Policy",
                "AmazonSSMManagedInstanceCore",
            ]);
        });

        it("declares each EKS add-on once, at a resolved version, coredns only after a node group", () => {
            const addons = resources("aws:eks/addon:Addon");
            const names = addons.map((addon) => addon.inputs.addonName);
            assert.equal(new Set(names).size, names.length, `no add-on twice: ${names}`);
            for (const addonName of ["vpc-cni", "kube-proxy", "coredns", "eks-pod-identity-agent", "aws-ebs-csi-driver"]) {
                assert.ok(names.includes(addonName), addonName);
            }
            for (const addon of addons) {
                assert.equal(addon.inputs.clusterName, clusterName);
                assert.match(addon.inputs.addonVersion, /^v\d+\.\d+\.\d+-eksbuild\.\d+$/, addon.inputs.addonName);
            }
            // Recorded in registration order: coredns waits for the system node group, nodes wait for the CNI.
            const order = evaluation.resources.map((r) => r.name);
            assert.ok(order.indexOf(`${clusterName}-coredns`) > order.indexOf(`${clusterName}-system`));
            assert.ok(order.indexOf(`${clusterName}-system`) > order.indexOf(`${clusterName}-vpc-cni`));
        });

        it("gives the EBS CSI driver an IAM role through Pod Identity and makes encrypted gp3 the default class", () => {
            const driver = resource("aws:eks/addon:Addon", `${clusterName}-aws-ebs-csi-driver`);
            const [association] = driver.inputs.podIdentityAssociations;
            assert.equal(association.serviceAccount, "ebs-csi-controller-sa");
            const role = resources("aws:iam/role:Role").find((candidate) => candidate.state.arn === association.roleArn);
            assert.ok(role, "the association's role is declared here");
            const trust = JSON.parse(role.inputs.assumeRolePolicy).Statement[0];
            assert.equal(trust.Principal.Service, "pods.eks.amazonaws.com");
            assert.ok(trust.Action.includes("sts:TagSession"));
            const policies = resources("aws:iam/rolePolicyAttachment:RolePolicyAttachment")
                .filter((attachment) => attachment.inputs.role === role.state.name)
                .map((attachment) => attachment.inputs.policyArn);
            assert.deepEqual(policies, ["arn:aws:iam::aws:policy/service-role/AmazonEBSCSIDriverPolicy"]);

            const storageClass = resource("kubernetes:storage.k8s.io/v1:StorageClass", "gp3");
            assert.equal(storageClass.inputs.metadata.annotations["storageclass.kubernetes.io/is-default-class"], "true");
            assert.equal(storageClass.inputs.provisioner, "ebs.csi.aws.com");
            assert.equal(storageClass.inputs.parameters.type, "gp3");
            assert.equal(storageClass.inputs.parameters.encrypted, "true");
            assert.equal(storageClass.inputs.volumeBindingMode, "WaitForFirstConsumer");
            assert.equal(resources("kubernetes:storage.k8s.io/v1:StorageClass").filter(
                (candidate) => candidate.inputs.metadata?.annotations?.["storageclass.kubernetes.io/is-default-class"] === "true",
            ).length, 1);
        });

        it("installs the NVIDIA device plugin, pinned, on every GPU node and nowhere else", () => {
            const plugin = resource("kubernetes:helm.sh/v3:Release", "nvidia-device-plugin");
            assert.equal(plugin.inputs.chart, "nvidia-device-plugin");
            assert.equal(plugin.inputs.repositoryOpts.repo, "https://nvidia.github.io/k8s-device-plugin");
            assert.match(plugin.inputs.version, /^\d+\.\d+\.\d+$/);
            assert.equal(plugin.inputs.name, "nvidia-device-plugin");
            const { tolerations, affinity } = plugin.inputs.values;
            const gpu = gpuNodePool().inputs.spec.template;
            for (const taint of gpu.spec.taints as Taint[]) {
                assert.ok(tolerations.some((toleration: Toleration) => tolerates(toleration, taint)), `tolerates ${taint.key}`);
            }
            const terms = affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms;
            assert.ok(affinityAdmits(terms, gpu.metadata.labels), "admits the GPU nodes");
            assert.ok(!affinityAdmits(terms, systemNodeGroup().inputs.labels), "keeps off the system nodes");
        });

        it("builds the image from ./service for linux/amd64 and pushes it to a scanned ECR repository", () => {
            const repository = resource("aws:ecr/repository:Repository");
            assert.equal(repository.inputs.imageScanningConfiguration.scanOnPush, true);
            assert.equal(repository.inputs.forceDelete, key("imageRepositoryForceDelete"));
            const lifecycle = resource("aws:ecr/lifecyclePolicy:LifecyclePolicy");
            assert.equal(lifecycle.inputs.repository, repository.state.name);
            assert.ok(JSON.parse(lifecycle.inputs.policy).rules.every((rule: any) => rule.action.type === "expire"));

            const image = resource("docker-build:index:Image");
            assert.equal(image.inputs.context.location, "./service");
            assert.deepEqual(image.inputs.platforms, ["linux/amd64"]);
            assert.equal(image.inputs.push, true);
            assert.equal(image.inputs.buildOnPreview, false, "previews on pull requests must not build the CUDA image per stack");
            for (const tag of image.inputs.tags) assert.ok(tag.startsWith(`${repository.state.repositoryUrl}:`), tag);
            assert.equal(image.inputs.registries[0].address, repository.state.repositoryUrl.split("/")[0]);
            assert.equal(evaluation.outputs.imageReference, `${repository.state.repositoryUrl}@${image.state.digest}`);
            assert.match(evaluation.outputs.imageReference as string, pinnedImagePattern);
        });

        it("exports the kubeconfig as a secret, the cluster name and the region", () => {
            assert.equal(evaluation.outputs.clusterName, clusterName);
            assert.equal(evaluation.outputs.region, config["aws:region"]);
            assert.ok(evaluation.secretOutputs.includes("kubeconfig"));
            const kubeconfig = evaluation.outputs.kubeconfig as any;
            assert.equal(kubeconfig.users[0].user.exec.command, "aws");
            assert.ok(kubeconfig.users[0].user.exec.args.includes(clusterName));
            const provider = resource("pulumi:providers:kubernetes");
            assert.deepEqual(JSON.parse(provider.inputs.kubeconfig), kubeconfig);
        });
    });
}

describe("foundation: dev and prod", () => {
    it("meet the issue's sizes: dev small GPU nodes that scale to zero, prod larger and at least two", () => {
        const dev = stackConfig("dev").values;
        const prod = stackConfig("prod").values;
        // GPU nodes follow the pods: dev's pods go to zero, prod keeps two (one GPU each).
        assert.equal(dev["whisper-eks:minReplicas"], 0);
        assert.ok((prod["whisper-eks:minReplicas"] as number) >= 2);
        const largestGpuMemory = (types: string[]) => Math.max(...types.map((type) => gpuInstanceTypes[type].gpuMemoryGiB));
        assert.ok(
            largestGpuMemory(prod["whisper-eks:gpuInstanceTypes"] as string[]) > largestGpuMemory(dev["whisper-eks:gpuInstanceTypes"] as string[]),
        );
    });

    it("differ in what they declare exactly as their configs differ", async () => {
        // dev given prod's config must declare what prod declares, once the stack name is set aside.
        const prodFile = stackConfig("prod").values;
        const devWithProdConfig = await evaluateStack("dev", prodFile);
        const prod = await evaluateStack("prod");
        const normalise = (evaluation: StackEvaluation, stack: string) =>
            JSON.parse(
                JSON.stringify({ resources: evaluation.resources.map(({ urn, parent, dependencies, ...rest }) => rest), outputs: evaluation.outputs })
                    .split(`whisper-eks-${stack}`)
                    .join("whisper-eks-STACK")
                    .split(`"${stack}"`)
                    .join(`"STACK"`),
            );
        assert.deepEqual(normalise(devWithProdConfig, "dev"), normalise(prod, "prod"));

        // And the two stacks as they are do differ, in the GPU NodePools their configs shape differently.
        const dev = await evaluateStack("dev");
        const requirement = (evaluation: StackEvaluation, key: string) =>
            findResources(evaluation.resources, "kubernetes:karpenter.sh/v1:NodePool")[0].inputs.spec.template.spec.requirements.find(
                (candidate: { key: string }) => candidate.key === key,
            ).values;
        assert.notDeepEqual(requirement(dev, "node.kubernetes.io/instance-type"), requirement(prod, "node.kubernetes.io/instance-type"));
        assert.notDeepEqual(requirement(dev, "karpenter.sh/capacity-type"), requirement(prod, "karpenter.sh/capacity-type"));
    });
});
