// Bad stack configurations fail before any resource is declared, with one message that names every bad key,
// its value and what is allowed; the GPU catalog sizes pods that fit their nodes.
import { strict as assert } from "assert";
import * as fs from "fs";
import * as path from "path";
import * as pulumi from "@pulumi/pulumi";
import * as YAML from "yaml";
import {
    gpuInstanceTypes,
    gpuMemoryHeadroomGiB,
    podResourcesPerGpu,
    requiredGpuMemoryGiB,
    whisperModels,
} from "../infra/catalog";
import { ConfigOverrides, projectDefaults, repoRoot, stackConfig, tryEvaluateStack } from "../scripts/offline-stack";

const digest = "a".repeat(64);

interface BadConfig {
    what: string;
    stack?: string;
    /** The stack's name, when it is what is wrong. */
    stackName?: string;
    overrides: ConfigOverrides;
    /** Substrings the error message must contain: the key, the value, what is allowed. */
    expected: string[];
}

const badConfigs: BadConfig[] = [
    {
        what: "a non-GPU instance type for GPU nodes",
        overrides: { gpuInstanceTypes: ["m5.large"] },
        expected: ['whisper-eks:gpuInstanceTypes[0] = "m5.large"', "not a GPU instance type", "g5.xlarge"],
    },
    {
        what: "an unsupported GPU instance type",
        overrides: { gpuInstanceTypes: ["p3.2xlarge"] },
        expected: ['whisper-eks:gpuInstanceTypes[0] = "p3.2xlarge"', "not a supported GPU instance type", "g6e.xlarge"],
    },
    {
        what: "something that is no instance type",
        overrides: { gpuInstanceTypes: ["big-gpu"] },
        expected: ['whisper-eks:gpuInstanceTypes[0] = "big-gpu"', "not an EC2 instance type"],
    },
    {
        what: "a repeated admin role",
        overrides: { clusterAdminRoleArns: ["arn:aws:iam::123456789012:role/admin", "arn:aws:iam::123456789012:role/admin"] },
        expected: ['whisper-eks:clusterAdminRoleArns[1] = "arn:aws:iam::123456789012:role/admin"', "must not repeat an earlier item"],
    },
    {
        what: "a viewer role that is not a role ARN",
        overrides: { clusterViewerRoleArns: ["arn:aws:iam::123456789012:user/ci"] },
        expected: ['whisper-eks:clusterViewerRoleArns[0] = "arn:aws:iam::123456789012:user/ci"', "must be an IAM role ARN"],
    },
    {
        what: "a role that is both admin and viewer",
        overrides: {
            clusterAdminRoleArns: ["arn:aws:iam::123456789012:role/whisper-eks-dev-preview"],
            clusterViewerRoleArns: ["arn:aws:iam::123456789012:role/whisper-eks-dev-preview"],
        },
        expected: [
            'whisper-eks:clusterViewerRoleArns[0] = "arn:aws:iam::123456789012:role/whisper-eks-dev-preview"',
            "also in clusterAdminRoleArns",
            "read-only",
        ],
    },
    {
        what: "GPU types with different GPU counts in one NodePool",
        overrides: { gpuInstanceTypes: ["g5.xlarge", "g5.12xlarge"] },
        expected: ["whisper-eks:gpuInstanceTypes = ", "same GPU count"],
    },
    {
        what: "an AMI alias that follows @latest",
        overrides: { gpuAmiAlias: "al2023@latest" },
        expected: ['whisper-eks:gpuAmiAlias = "al2023@latest"', "pinned to a release", "@latest would replace every GPU node"],
    },
    {
        what: "an empty GPU node removed before a pod could drain",
        stack: "prod",
        overrides: { gpuConsolidateAfterMinutes: 5 },
        expected: ["whisper-eks:gpuConsolidateAfterMinutes = 5", "shorter than a server pod's drain", "set it to 11 or more"],
    },
    {
        what: "a GPU NodePool with no capacity type",
        overrides: { gpuCapacityTypes: [] },
        expected: ["whisper-eks:gpuCapacityTypes = []", "at least 1 item"],
    },
    {
        what: "a system node group with min > max",
        overrides: { systemNodeMinSize: 3, systemNodeDesiredSize: 3, systemNodeMaxSize: 2 },
        expected: ["whisper-eks:systemNodeMinSize = 3", "must not exceed systemNodeMaxSize (2)"],
    },
    {
        what: "a GPU too small for the model",
        stack: "prod",
        overrides: { gpuInstanceTypes: ["g4dn.xlarge"], modelDtype: "float32", maxBatchSize: 32 },
        expected: ['whisper-eks:gpuInstanceTypes[0] = "g4dn.xlarge"', "has 16 GiB", "openai/whisper-large-v3 at float32", "maxBatchSize 32", "GiB"],
    },
    {
        // 16 slots fit a T4 greedy (12.9 GiB); five beams add four self-attention caches to each slot (20.2 GiB).
        what: "beams that no longer fit the GPU",
        stack: "prod",
        overrides: { gpuInstanceTypes: ["g4dn.xlarge"], modelDtype: "float16", maxBatchSize: 16, beamSize: 5 },
        expected: ['whisper-eks:gpuInstanceTypes[0] = "g4dn.xlarge"', "has 16 GiB", "maxBatchSize 16 and beamSize 5", "20.2 GiB"],
    },
    {
        what: "a beam size out of range",
        overrides: { beamSize: 0 },
        expected: ["whisper-eks:beamSize = 0"],
    },
    {
        what: "an unknown capacity type",
        overrides: { gpuCapacityTypes: ["ON_DEMAND"] },
        expected: ['whisper-eks:gpuCapacityTypes[0] = "ON_DEMAND"', '"spot", "on-demand"'],
    },
    {
        what: "a malformed admin role ARN",
        overrides: { clusterAdminRoleArns: ["arn:aws:iam::123456789012:user/alice"] },
        expected: ['whisper-eks:clusterAdminRoleArns[0] = "arn:aws:iam::123456789012:user/alice"', "must be an IAM role ARN"],
    },
    {
        what: "bfloat16 on a T4",
        overrides: { gpuInstanceTypes: ["g4dn.xlarge"], modelDtype: "bfloat16" },
        expected: ['whisper-eks:modelDtype = "bfloat16"', "compute capability 7.5", "use float16"],
    },
    {
        what: "a root disk under 100 GiB",
        overrides: { gpuDiskSizeGiB: 50 },
        expected: ["whisper-eks:gpuDiskSizeGiB = 50", "integer from 100 to"],
    },
    {
        what: "a prebuilt image without a digest",
        overrides: { imageReference: "123456789012.dkr.ecr.us-east-1.amazonaws.com/whisper:latest" },
        expected: ['whisper-eks:imageReference = "123456789012.dkr.ecr.us-east-1.amazonaws.com/whisper:latest"', "pinned by digest"],
    },
    {
        what: "an unknown model",
        overrides: { modelId: "openai/whisper-huge" },
        expected: ['whisper-eks:modelId = "openai/whisper-huge"', '"openai/whisper-large-v3"'],
    },
    {
        what: "an unknown dtype",
        overrides: { modelDtype: "int8" },
        expected: ['whisper-eks:modelDtype = "int8"', '"float16", "bfloat16", "float32"'],
    },
    {
        what: "a malformed Kubernetes version",
        overrides: { kubernetesVersion: "1.28" },
        expected: ['whisper-eks:kubernetesVersion = "1.28"', '"1.33", "1.34", "1.35"'],
    },
    {
        what: "a Kubernetes version past those the stack supports",
        overrides: { kubernetesVersion: "1.36" },
        expected: ['whisper-eks:kubernetesVersion = "1.36"', 'allowed values are "1.33"'],
    },
    {
        what: "a single availability zone",
        overrides: { availabilityZoneCount: 1 },
        expected: ["whisper-eks:availabilityZoneCount = 1", "from 2 to 4"],
    },
    {
        what: "an unknown NAT gateway strategy",
        overrides: { natGatewayStrategy: "None" },
        expected: ['whisper-eks:natGatewayStrategy = "None"', '"Single", "OnePerAz"'],
    },
    {
        what: "a VPC CIDR too small for the subnets",
        overrides: { vpcCidr: "10.0.0.0/24" },
        expected: ['whisper-eks:vpcCidr = "10.0.0.0/24"', "from /16 to /20", "AWS allows /16 to /28"],
    },
    {
        what: "a VPC CIDR larger than AWS allows",
        overrides: { vpcCidr: "10.0.0.0/12" },
        expected: ['whisper-eks:vpcCidr = "10.0.0.0/12"', "from /16 to /20"],
    },
    {
        what: "a VPC CIDR with host bits set",
        overrides: { vpcCidr: "10.0.0.1/16" },
        expected: ['whisper-eks:vpcCidr = "10.0.0.1/16"', "host bits set", "10.0.0.0/16"],
    },
    {
        what: "an API access CIDR with host bits set",
        overrides: { clusterPublicAccessCidrs: ["203.0.113.7/24"] },
        expected: ['whisper-eks:clusterPublicAccessCidrs[0] = "203.0.113.7/24"', "host bits set", "203.0.113.0/24"],
    },
    {
        what: "a load balancer source range with host bits set",
        overrides: { loadBalancerSourceRanges: ["192.168.1.10/16"] },
        expected: ['whisper-eks:loadBalancerSourceRanges[0] = "192.168.1.10/16"', "host bits set", "192.168.0.0/16"],
    },
    {
        what: "a load balancer source range with a prefix past /32",
        overrides: { loadBalancerSourceRanges: ["192.168.1.10/33"] },
        expected: ['whisper-eks:loadBalancerSourceRanges[0] = "192.168.1.10/33"', "IPv4 CIDR block"],
    },
    {
        what: "a Graviton type for the x86_64 system nodes",
        overrides: { systemNodeInstanceTypes: ["m7i.xlarge", "m7g.xlarge"] },
        expected: ['whisper-eks:systemNodeInstanceTypes[1] = "m7g.xlarge"', "Graviton (arm64)", "AL2023_x86_64_STANDARD", "m7i.xlarge"],
    },
    {
        what: "a burstable Graviton type for the system nodes",
        overrides: { systemNodeInstanceTypes: ["t4g.large"] },
        expected: ['whisper-eks:systemNodeInstanceTypes[0] = "t4g.large"', "Graviton (arm64)"],
    },
    {
        what: "a malformed API access CIDR",
        overrides: { clusterPublicAccessCidrs: ["203.0.113.300/32"] },
        expected: ['whisper-eks:clusterPublicAccessCidrs[0] = "203.0.113.300/32"', "IPv4 CIDR block"],
    },
    {
        what: "a GPU type for system nodes",
        overrides: { systemNodeInstanceTypes: ["g5.xlarge"] },
        expected: ['whisper-eks:systemNodeInstanceTypes[0] = "g5.xlarge"', "must not be a GPU instance type"],
    },
    {
        what: "a list where a list is due, given as text",
        overrides: { gpuInstanceTypes: "g5.xlarge" },
        expected: ['whisper-eks:gpuInstanceTypes = "g5.xlarge"', "must be a list of strings"],
    },
    {
        what: "a malformed region",
        overrides: { "aws:region": "Virginia" },
        expected: ['aws:region = "Virginia"', "must be an AWS region"],
    },
    {
        what: "a stack name too long for the AWS names it goes into",
        stackName: "production-eu-west-1a",
        overrides: {},
        expected: ['stack name "production-eu-west-1a" (21 characters)', "at most 20 characters", "at most 64 characters"],
    },
    {
        what: "a stack name AWS names cannot carry",
        stackName: "Prod_EU",
        overrides: {},
        expected: ['stack name "Prod_EU"', "lowercase letters, digits and hyphens"],
    },
    {
        what: "a missing key",
        overrides: { gpuMaxSize: undefined },
        expected: ["whisper-eks:gpuMaxSize is not set"],
    },
];

describe("config: bad stack configurations", () => {
    for (const bad of badConfigs) {
        it(`refuses ${bad.what}, naming key, value and what is allowed, and declares nothing`, async () => {
            const { error, resources } = await tryEvaluateStack(bad.stack ?? "dev", bad.overrides, bad.stackName);
            assert.ok(error, "the program must fail");
            assert.equal(error.name, "ConfigError");
            // Pulumi prints a RunError's message alone: no stack trace for the user.
            assert.ok(pulumi.RunError.isInstance(error), "a RunError");
            for (const expected of bad.expected) assert.ok(error.message.includes(expected), `"${expected}" in:\n${error.message}`);
            assert.ok(!/\n\s+at /.test(error.message), "no stack trace in the message");
            assert.deepEqual(resources, [], "no resource declared");
        });
    }

    it("reports every problem at once", async () => {
        const { error } = await tryEvaluateStack("dev", { gpuAmiAlias: "al2023@latest", gpuCapacityTypes: ["cheap"], gpuDiskSizeGiB: 20 });
        assert.ok(error);
        assert.match(error.message, /\(3 problems\)/);
        for (const key of ["gpuAmiAlias", "gpuCapacityTypes[0]", "gpuDiskSizeGiB"]) assert.ok(error.message.includes(`whisper-eks:${key} = `), key);
    });

    it("accepts what AWS accepts: network addresses of any prefix where allowed, a /20 VPC, x86_64 system node types", async () => {
        const { error } = await tryEvaluateStack("dev", {
            vpcCidr: "172.16.32.0/20",
            clusterPublicAccessCidrs: ["0.0.0.0/0", "203.0.113.7/32"],
            loadBalancerSourceRanges: ["10.0.0.0/8", "198.51.100.128/25"],
            systemNodeInstanceTypes: ["m7i.xlarge", "m7a.xlarge", "c7i.2xlarge", "m5zn.large", "r7iz.large"],
        });
        assert.equal(error, undefined, error?.message);
    });

    it("accepts a prebuilt image pinned by digest, building nothing and keeping the repository", async () => {
        const reference = `registry.example.com:5000/speech/whisper:2026.11@sha256:${digest}`;
        const { error, resources, outputs } = await tryEvaluateStack("prod", { imageReference: reference });
        assert.equal(error, undefined);
        assert.equal(outputs.imageReference, reference);
        assert.equal(resources.filter((r) => r.type === "docker-build:index:Image").length, 0);
        // Switching a stack to a prebuilt image must not delete the repository that holds its earlier builds.
        assert.equal(resources.filter((r) => r.type === "aws:ecr/repository:Repository").length, 1);
    });

    it("gives admin roles cluster-admin access entries", async () => {
        const roles = ["arn:aws:iam::123456789012:role/platform-admin", "arn:aws:iam::123456789012:role/sso/ml-oncall"];
        const { error, resources } = await tryEvaluateStack("dev", { clusterAdminRoleArns: roles });
        assert.equal(error, undefined);
        const cluster = resources.find((r) => r.type === "eks:index:Cluster");
        const entries = Object.values<any>(cluster?.inputs.accessEntries);
        assert.deepEqual(entries.map((entry) => entry.principalArn).sort(), [...roles].sort());
        for (const entry of entries) {
            assert.equal(entry.accessPolicies.clusterAdmin.policyArn, "arn:aws:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy");
            assert.equal(entry.accessPolicies.clusterAdmin.accessScope.type, "cluster");
        }
    });

    it("gives viewer roles (CI previews) read-only access entries: the EKS view policy and nothing else", async () => {
        const admin = "arn:aws:iam::123456789012:role/whisper-eks-prod-deploy";
        const viewer = "arn:aws:iam::123456789012:role/whisper-eks-prod-preview";
        const { error, resources } = await tryEvaluateStack("prod", { clusterAdminRoleArns: [admin], clusterViewerRoleArns: [viewer] });
        assert.equal(error, undefined, error?.message);
        const cluster = resources.find((r) => r.type === "eks:index:Cluster");
        const entries = Object.values<any>(cluster?.inputs.accessEntries);
        const viewerEntry = entries.find((entry) => entry.principalArn === viewer);
        assert.ok(viewerEntry, "the viewer role has an access entry");
        assert.equal(viewerEntry.type, "STANDARD");
        assert.deepEqual(viewerEntry.kubernetesGroups ?? [], [], "no Kubernetes groups that RBAC could bind to more");
        assert.deepEqual(
            Object.values<any>(viewerEntry.accessPolicies).map((policy) => [policy.policyArn, policy.accessScope.type]),
            [["arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy", "cluster"]],
        );
        const adminPolicies = entries.filter((entry) => entry.principalArn !== admin).flatMap((entry) => Object.values<any>(entry.accessPolicies));
        assert.ok(!adminPolicies.some((policy) => /Admin/.test(policy.policyArn)), "only the admin role is an administrator");
    });
});

/** The Pulumi CLI's check of a config value against a declared type (string, integer, boolean, array of items). */
function matchesDeclaredType(value: unknown, declaration: { type: string; items?: { type: string } }): boolean {
    switch (declaration.type) {
        case "string":
            return typeof value === "string";
        case "integer":
            return Number.isInteger(value);
        case "boolean":
            return typeof value === "boolean";
        case "array":
            return Array.isArray(value) && value.every((item) => matchesDeclaredType(item, declaration.items!));
        default:
            return false;
    }
}

describe("config: Pulumi.yaml", () => {
    const project = YAML.parse(fs.readFileSync(path.join(repoRoot, "Pulumi.yaml"), "utf8"));

    it("declares every project key with a type and a description, and a default unless it is a secret", () => {
        for (const [key, declaration] of Object.entries<any>(project.config)) {
            assert.ok(["string", "integer", "boolean", "array"].includes(declaration.type), `${key} has a type the CLI accepts`);
            assert.ok(typeof declaration.description === "string" && declaration.description.length > 10, `${key} has a description`);
            if (declaration.type === "array") assert.ok(declaration.items?.type, `${key} declares its items' type`);
            if (!declaration.secret) assert.notEqual(declaration.default, undefined, `${key} has a default`);
            if (declaration.default !== undefined) assert.ok(matchesDeclaredType(declaration.default, declaration), `${key}'s default is a ${declaration.type}`);
        }
    });

    it("alone (plus a region) makes a valid stack: every key the program reads has its default there", async () => {
        const onlyDefaults: ConfigOverrides = Object.fromEntries(
            Object.keys(stackConfig("dev").values)
                .filter((key) => key !== "aws:region")
                .map((key) => [key, projectDefaults()[key]]),
        );
        const { error } = await tryEvaluateStack("dev", onlyDefaults);
        assert.equal(error, undefined, error?.message);
    });

    it("has stack files that set only declared keys (or provider keys), with values of the declared types", () => {
        for (const stack of ["dev", "prod"]) {
            const file = YAML.parse(fs.readFileSync(path.join(repoRoot, `Pulumi.${stack}.yaml`), "utf8"));
            for (const key of Object.keys(file.config)) {
                const [namespace, name] = key.split(":");
                if (namespace !== "whisper-eks") {
                    assert.equal(namespace, "aws", `${stack}: ${key}`);
                    continue;
                }
                const declaration = project.config[name];
                assert.ok(declaration, `${stack}: ${key} is declared in Pulumi.yaml`);
                const value = file.config[key];
                const isSecret = value !== null && typeof value === "object" && "secure" in value;
                assert.ok(isSecret || matchesDeclaredType(value, declaration), `${stack}: ${key} is a ${declaration.type}`);
            }
        }
    });
});

describe("config: GPU catalog", () => {
    it("refuses bfloat16 exactly where the GPU lacks it", () => {
        for (const [name, type] of Object.entries(gpuInstanceTypes)) {
            assert.equal(type.computeCapability < 8, type.gpuModel === "NVIDIA T4", name);
        }
    });

    it("estimates GPU memory from weights, batch and headroom", () => {
        const largeV3 = whisperModels["openai/whisper-large-v3"];
        const weightsGiB = (largeV3.parametersBillions * 1e9 * 2) / 2 ** 30;
        assert.ok(Math.abs(requiredGpuMemoryGiB("openai/whisper-large-v3", "float16", 1) - (weightsGiB + largeV3.perItemGiB16Bit + gpuMemoryHeadroomGiB)) < 1e-9);
        assert.ok(requiredGpuMemoryGiB("openai/whisper-large-v3", "float32", 16) > 2 * requiredGpuMemoryGiB("openai/whisper-large-v3", "float16", 16) - gpuMemoryHeadroomGiB - 1e-9);
        // The shipped stacks fit: large-v3 at float16 with their batch sizes.
        for (const stack of ["dev", "prod"]) {
            const values = stackConfig(stack).values;
            const need = requiredGpuMemoryGiB(values["whisper-eks:modelId"] as string, "float16", values["whisper-eks:maxBatchSize"] as number);
            for (const type of values["whisper-eks:gpuInstanceTypes"] as string[]) assert.ok(need <= gpuInstanceTypes[type].gpuMemoryGiB, `${stack} ${type}`);
        }
    });

    // That one pod per GPU and the DaemonSets fit Karpenter's estimate of each type: test/aws-rules.spec.ts.
    it("sizes pods on the smallest type of a mixed group", () => {
        const mixed = podResourcesPerGpu(["g6e.2xlarge", "g6e.xlarge"]);
        assert.deepEqual(mixed, podResourcesPerGpu(["g6e.xlarge"]));
        assert.ok(mixed.memoryMiB < podResourcesPerGpu(["g6e.2xlarge"]).memoryMiB);
    });
});
