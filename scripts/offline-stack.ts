// Evaluates the Pulumi program offline for one stack, under pulumi.runtime.setMocks: the real
// Pulumi.<stack>.yaml merged with Pulumi.yaml's defaults, plus overrides. Returns every resource the
// program declared (type, name, inputs, parent) and the stack outputs. Used by the mocha specs and the
// render script; evaluations can run one after another in one process.
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import * as pulumi from "@pulumi/pulumi";
import * as YAML from "yaml";

export const repoRoot = path.resolve(__dirname, "..");
export const projectName = "whisper-eks";
export const mockAccountId = "123456789012";

export interface RecordedResource {
    type: string;
    name: string;
    inputs: Record<string, any>;
    /** The URN of the parent resource, when the program gave one. */
    parent?: string;
    urn?: string;
    /**
     * The URNs the engine records this resource as depending on: explicit dependsOn plus every resource behind its
     * inputs' values (a remote component such as eks.Cluster counts as itself), as the monitor receives them.
     */
    dependencies: string[];
    custom: boolean;
    /** The state the mock returned: what the program sees as the resource's outputs. */
    state: Record<string, any>;
}

export interface StackEvaluation {
    stack: string;
    /** The config the program saw, fully qualified keys (`whisper-eks:gpuMaxSize`), typed YAML values. */
    config: Record<string, unknown>;
    resources: RecordedResource[];
    outputs: Record<string, unknown>;
    /** Names of the stack outputs that are secret. */
    secretOutputs: string[];
}

/** Marks an override as a secret config value (as `pulumi config set --secret` would). */
export class SecretValue {
    constructor(readonly value: unknown) {}
}

/** An override value of `undefined` removes the key; keys without a namespace belong to the project. */
export type ConfigOverrides = Record<string, unknown>;

function qualify(key: string): string {
    return key.includes(":") ? key : `${projectName}:${key}`;
}

/** The project's defaults from Pulumi.yaml, as the Pulumi CLI applies them. */
export function projectDefaults(): Record<string, unknown> {
    const project = YAML.parse(fs.readFileSync(path.join(repoRoot, "Pulumi.yaml"), "utf8"));
    const defaults: Record<string, unknown> = {};
    for (const [key, declaration] of Object.entries<any>(project.config ?? {})) {
        const isDeclaration = declaration !== null && typeof declaration === "object" && !Array.isArray(declaration);
        const value = isDeclaration ? declaration.value ?? declaration.default : declaration;
        if (value !== undefined) defaults[qualify(key)] = value;
    }
    return defaults;
}

/** The config a stack's program sees: Pulumi.yaml defaults, then Pulumi.<stack>.yaml, then the overrides. */
export function stackConfig(stack: string, overrides: ConfigOverrides = {}): { values: Record<string, unknown>; secretKeys: string[] } {
    const file = path.join(repoRoot, `Pulumi.${stack}.yaml`);
    if (!fs.existsSync(file)) throw new Error(`no stack file ${file}`);
    const stackFile = YAML.parse(fs.readFileSync(file, "utf8")) ?? {};
    const values: Record<string, unknown> = { ...projectDefaults() };
    const secretKeys: string[] = [];
    for (const [key, value] of Object.entries<any>(stackFile.config ?? {})) {
        if (value !== null && typeof value === "object" && "secure" in value) {
            // Encrypted values cannot be read offline: the program sees a placeholder, still marked secret.
            values[qualify(key)] = "offline-secret-placeholder";
            secretKeys.push(qualify(key));
        } else {
            values[qualify(key)] = value;
        }
    }
    for (const [key, value] of Object.entries(overrides)) {
        if (value === undefined) {
            delete values[qualify(key)];
        } else if (value instanceof SecretValue) {
            values[qualify(key)] = value.value;
            secretKeys.push(qualify(key));
        } else {
            values[qualify(key)] = value;
        }
    }
    return { values, secretKeys };
}

const hash = (text: string, length: number): string => crypto.createHash("sha256").update(text).digest("hex").slice(0, length);

/** Realistic outputs for what the program reads: remote components, AWS resources, invokes. */
/** A resource passed as an input (e.g. a node group's `cluster` or `nodeRole`), as recorded. */
export interface ResourceReference {
    $resource: { type: string; name: string };
}

/** Inputs with resource objects replaced by plain references, so that specs can compare them. */
function plainInputs(value: any): any {
    if (pulumi.Resource.isInstance(value)) {
        return { $resource: { type: (value as any).__pulumiType, name: (value as any).__name } } satisfies ResourceReference;
    }
    if (Array.isArray(value)) return value.map(plainInputs);
    if (value !== null && typeof value === "object") {
        return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, plainInputs(item)]));
    }
    return value;
}

export class OfflineMocks implements pulumi.runtime.Mocks {
    readonly recorded: RecordedResource[] = [];

    constructor(
        private readonly region: string,
        private readonly stack: string,
    ) {}

    newResource(args: pulumi.runtime.MockResourceArgs): { id: string; state: Record<string, any> } {
        const state = this.stateFor(args);
        this.recorded.push({ type: args.type, name: args.name, inputs: plainInputs(args.inputs), dependencies: [], custom: args.custom ?? true, state });
        return { id: state.id ?? `${args.name}-id`, state };
    }

    private stateFor({ type, name, inputs }: pulumi.runtime.MockResourceArgs): Record<string, any> {
        // Generated ids and names do not depend on the stack, so that two stacks' resources can be compared.
        const shortHash = (text: string, length = 7) => hash(text.split(`-${this.stack}`).join(""), length);
        const physicalName: string = inputs.name ?? `${name}-${shortHash(name)}`;
        const arn = (service: string, resource: string) => `arn:aws:${service}:${this.region}:${mockAccountId}:${resource}`;
        switch (type) {
            case "awsx:ec2:Vpc": {
                const azCount: number = inputs.numberOfAvailabilityZones ?? 2;
                const subnetIds = (kind: string) => Array.from({ length: azCount }, (_, i) => `subnet-${kind}${i}${shortHash(name, 8)}`);
                const privateSubnetIds = subnetIds("priv");
                const publicSubnetIds = subnetIds("pub");
                return {
                    vpcId: `vpc-${shortHash(name, 12)}`,
                    vpc: { id: `vpc-${shortHash(name, 12)}`, cidrBlock: inputs.cidrBlock ?? "10.0.0.0/16" },
                    privateSubnetIds,
                    publicSubnetIds,
                    isolatedSubnetIds: [],
                    subnets: [...privateSubnetIds, ...publicSubnetIds].map((id) => ({ id })),
                };
            }
            case "eks:index:Cluster": {
                const clusterName: string = inputs.name ?? `${name}-eksCluster-${shortHash(name)}`;
                const endpoint = `https://${shortHash(name, 32).toUpperCase()}.gr7.${this.region}.eks.amazonaws.com`;
                const issuer = `https://oidc.eks.${this.region}.amazonaws.com/id/${shortHash(name, 32).toUpperCase()}`;
                const kubeconfig = {
                    apiVersion: "v1",
                    kind: "Config",
                    clusters: [{ name: "kubernetes", cluster: { server: endpoint, "certificate-authority-data": "bW9jaw==" } }],
                    contexts: [{ name: "aws", context: { cluster: "kubernetes", user: "aws" } }],
                    "current-context": "aws",
                    users: [
                        {
                            name: "aws",
                            user: {
                                exec: {
                                    apiVersion: "client.authentication.k8s.io/v1beta1",
                                    command: "aws",
                                    args: ["eks", "get-token", "--cluster-name", clusterName, "--output", "json"],
                                },
                            },
                        },
                    ],
                };
                const eksCluster = {
                    id: clusterName,
                    name: clusterName,
                    arn: arn("eks", `cluster/${clusterName}`),
                    endpoint,
                    version: inputs.version,
                    certificateAuthority: { data: "bW9jaw==" },
                    identities: [{ oidcs: [{ issuer }] }],
                    vpcConfig: { clusterSecurityGroupId: `sg-cluster${shortHash(name, 8)}`, vpcId: inputs.vpcId },
                };
                const oidcProviderArn = `arn:aws:iam::${mockAccountId}:oidc-provider/${issuer.replace("https://", "")}`;
                return {
                    kubeconfig,
                    kubeconfigJson: JSON.stringify(kubeconfig),
                    eksCluster,
                    clusterSecurityGroupId: eksCluster.vpcConfig.clusterSecurityGroupId,
                    nodeSecurityGroupId: `sg-node${shortHash(name, 8)}`,
                    oidcProviderArn,
                    oidcProviderUrl: issuer.replace("https://", ""),
                    oidcIssuer: issuer.replace("https://", ""),
                    core: {
                        cluster: eksCluster,
                        endpoint,
                        vpcId: inputs.vpcId,
                        subnetIds: inputs.privateSubnetIds ?? inputs.subnetIds,
                        clusterSecurityGroupId: eksCluster.vpcConfig.clusterSecurityGroupId,
                        oidcProvider: { arn: oidcProviderArn, url: issuer.replace("https://", "") },
                        accessEntries: inputs.accessEntries,
                    },
                };
            }
            case "eks:index:ManagedNodeGroup": {
                const nodeGroupName: string = inputs.nodeGroupName ?? `${name}-${shortHash(name)}`;
                return {
                    nodeGroup: {
                        ...inputs,
                        id: nodeGroupName,
                        nodeGroupName,
                        arn: arn("eks", `nodegroup/${nodeGroupName}`),
                        resources: [{ autoscalingGroups: [{ name: `eks-${nodeGroupName}-${shortHash(name, 36)}` }] }],
                    },
                };
            }
            case "aws:ecr/repository:Repository":
                return {
                    ...inputs,
                    id: physicalName,
                    name: physicalName,
                    arn: arn("ecr", `repository/${physicalName}`),
                    registryId: mockAccountId,
                    repositoryUrl: `${mockAccountId}.dkr.ecr.${this.region}.amazonaws.com/${physicalName}`,
                };
            case "docker-build:index:Image": {
                const digest = `sha256:${shortHash(`${name}${JSON.stringify(inputs.tags ?? [])}`, 64)}`;
                const tag: string | undefined = inputs.tags?.[0];
                return { ...inputs, id: digest, digest, ref: tag ? `${tag.split(":")[0]}@${digest}` : digest };
            }
            case "random:index/randomPassword:RandomPassword": {
                // A generated secret (API key, Grafana password) that the program feeds into Kubernetes Secrets.
                const result = shortHash(name, inputs.length ?? 16);
                return { ...inputs, id: name, result, bcryptHash: `$2a$10$${shortHash(result, 53)}` };
            }
            case "aws:iam/role:Role":
                return { ...inputs, id: physicalName, name: physicalName, arn: `arn:aws:iam::${mockAccountId}:role/${physicalName}` };
            case "aws:ec2/launchTemplate:LaunchTemplate":
                return { ...inputs, id: `lt-${shortHash(name, 17)}`, name: physicalName, latestVersion: 1, defaultVersion: 1 };
            case "aws:sqs/queue:Queue":
                return {
                    ...inputs,
                    id: `https://sqs.${this.region}.amazonaws.com/${mockAccountId}/${physicalName}`,
                    name: physicalName,
                    arn: arn("sqs", physicalName),
                    url: `https://sqs.${this.region}.amazonaws.com/${mockAccountId}/${physicalName}`,
                };
            case "aws:iam/policy:Policy":
                return { ...inputs, id: physicalName, name: physicalName, arn: `arn:aws:iam::${mockAccountId}:policy/${physicalName}` };
            default: {
                const [pkg] = type.split(":");
                if (pkg === "aws") {
                    return { ...inputs, id: `${physicalName}`, name: physicalName, arn: arn(type.split(":")[1].split("/")[0], physicalName) };
                }
                // Kubernetes objects keep their metadata; a Helm release reports itself deployed.
                if (type === "kubernetes:helm.sh/v3:Release") {
                    const releaseName: string = inputs.name ?? `${name}-${shortHash(name)}`;
                    return {
                        ...inputs,
                        id: `${inputs.namespace ?? "default"}/${releaseName}`,
                        name: releaseName,
                        status: { name: releaseName, namespace: inputs.namespace ?? "default", version: inputs.version, status: "deployed" },
                    };
                }
                return { ...inputs, id: `${name}-id` };
            }
        }
    }

    call({ token, inputs }: pulumi.runtime.MockCallArgs): Record<string, any> {
        switch (token) {
            case "aws:index/getCallerIdentity:getCallerIdentity":
                return { accountId: mockAccountId, arn: `arn:aws:iam::${mockAccountId}:user/offline`, userId: "AIDAOFFLINE", id: mockAccountId };
            case "aws:index/getRegion:getRegion":
                return { name: this.region, region: this.region, id: this.region };
            case "aws:index/getPartition:getPartition":
                return { partition: "aws", dnsSuffix: "amazonaws.com", id: "aws" };
            case "aws:index/getAvailabilityZones:getAvailabilityZones":
                return { names: ["a", "b", "c", "d"].map((zone) => `${this.region}${zone}`), zoneIds: [], id: this.region };
            case "aws:eks/getAddonVersion:getAddonVersion":
                return { ...inputs, id: inputs.addonName, version: "v1.0.0-eksbuild.1" };
            case "aws:ecr/getAuthorizationToken:getAuthorizationToken":
                return {
                    id: this.region,
                    userName: "AWS",
                    password: "offline-token",
                    authorizationToken: Buffer.from("AWS:offline-token").toString("base64"),
                    proxyEndpoint: `https://${mockAccountId}.dkr.ecr.${this.region}.amazonaws.com`,
                };
            case "aws:iam/getPolicyDocument:getPolicyDocument":
                return { ...inputs, id: "policy", json: JSON.stringify({ Version: "2012-10-17", Statement: inputs.statements ?? [] }) };
            default:
                return inputs;
        }
    }
}

/**
 * Forgets the program's modules (index.ts and infra/), so that index.ts runs afresh. Classes from a fresh
 * evaluation are not those a spec imported: compare errors by `name`, not `instanceof`.
 */
function forgetProgramModules(): void {
    const infra = path.join(repoRoot, "infra") + path.sep;
    for (const file of Object.keys(require.cache)) {
        if (file === path.join(repoRoot, "index.ts") || file.startsWith(infra)) delete require.cache[file];
    }
}

/** Seconds to wait for the program's registrations; the mocks answer at once, so only a deadlock takes longer. */
export const settleTimeoutSeconds = 30;

async function settle(): Promise<void> {
    // waitForRPCs drains the runtime's queue of registrations and invokes; it is internal, hence the cast.
    const waitForRPCs: () => Promise<void> = (pulumi.runtime as any).waitForRPCs;
    let timer: NodeJS.Timeout | undefined;
    const deadlock = new Promise<never>((_, reject) => {
        timer = setTimeout(
            () =>
                reject(
                    new Error(
                        `registrations did not complete within ${settleTimeoutSeconds} s: a dependency cycle, e.g. a resource ` +
                            "parented to a component (eks.Cluster, eks.ManagedNodeGroup) whose outputs it depends on " +
                            "(depending on a component waits for all its children); PULUMI_DEBUG_PROMISE_LEAKS=1 shows where",
                    ),
                ),
            settleTimeoutSeconds * 1000,
        );
    });
    try {
        await Promise.race([waitForRPCs(), deadlock]);
    } finally {
        clearTimeout(timer);
    }
}

async function resolveOutputs(exported: Record<string, unknown>): Promise<{ outputs: Record<string, unknown>; secretOutputs: string[] }> {
    const outputs: Record<string, unknown> = {};
    const secretOutputs: string[] = [];
    for (const [name, value] of Object.entries(exported)) {
        const output = pulumi.output(value);
        outputs[name] = await (output as any).promise();
        if (await pulumi.isSecret(output)) secretOutputs.push(name);
    }
    return { outputs, secretOutputs };
}

/**
 * Evaluates the program for a stack. Never throws for the program's own failure: it returns the error
 * together with whatever was declared before it, so a spec can check that a bad config declared nothing.
 */
export async function tryEvaluateStack(
    stack: string,
    overrides: ConfigOverrides = {},
    /** The stack's name as the program sees it, when other than the stack whose Pulumi.<stack>.yaml is read. */
    stackName: string = stack,
): Promise<StackEvaluation & { error?: Error }> {
    const { values, secretKeys } = stackConfig(stack, overrides);
    const mocks = new OfflineMocks(String(values["aws:region"] ?? "us-east-1"), stackName);
    await pulumi.runtime.setMocks(mocks, projectName, stackName, false);
    const asConfigString = (value: unknown) => (typeof value === "string" ? value : JSON.stringify(value));
    pulumi.runtime.setAllConfig(
        Object.fromEntries(Object.entries(values).map(([key, value]) => [key, asConfigString(value)])),
        secretKeys,
    );

    // The mock is told neither a resource's parent nor its dependencies: note them where the request passes the monitor.
    const registrations = new Map<string, { parent?: string; urn?: string; dependencies: string[] }>();
    const monitor = pulumi.runtime.getMonitor() as any;
    const registerResource = monitor.registerResource.bind(monitor);
    monitor.registerResource = (request: any, callback: (err: unknown, response: any) => void) =>
        registerResource(request, (err: unknown, response: any) => {
            const propertyDependencies: string[] = [];
            request.getPropertydependenciesMap().forEach((urns: any) => propertyDependencies.push(...urns.getUrnsList()));
            registrations.set(`${request.getType()}::${request.getName()}`, {
                parent: request.getParent() || undefined,
                urn: response?.getUrn(),
                dependencies: [...new Set([...request.getDependenciesList(), ...propertyDependencies])],
            });
            callback(err, response);
        });

    forgetProgramModules();
    let error: Error | undefined;
    let outputs: Record<string, unknown> = {};
    let secretOutputs: string[] = [];
    try {
        const exported = require(path.join(repoRoot, "index.ts"));
        await settle();
        ({ outputs, secretOutputs } = await resolveOutputs(exported));
        await settle();
    } catch (caught) {
        error = caught instanceof Error ? caught : new Error(String(caught));
    }
    const resources = mocks.recorded.map((resource) => ({ ...resource, ...registrations.get(`${resource.type}::${resource.name}`) }));
    return { stack, config: values, resources, outputs, secretOutputs, error };
}

/** Evaluates the program for a stack; throws the program's error if it fails. */
export async function evaluateStack(stack: string, overrides: ConfigOverrides = {}, stackName: string = stack): Promise<StackEvaluation> {
    const { error, ...evaluation } = await tryEvaluateStack(stack, overrides, stackName);
    if (error) throw error;
    return evaluation;
}

/** The resources of a type, optionally only those whose name matches. */
export function findResources(resources: readonly RecordedResource[], type: string, name?: string | RegExp): RecordedResource[] {
    return resources.filter(
        (resource) =>
            resource.type === type &&
            (name === undefined || (typeof name === "string" ? resource.name === name : name.test(resource.name))),
    );
}

/** The one resource of a type (and name); throws when there is none or more than one. */
export function findResource(resources: readonly RecordedResource[], type: string, name?: string | RegExp): RecordedResource {
    const found = findResources(resources, type, name);
    if (found.length !== 1) {
        const names = findResources(resources, type).map((resource) => resource.name);
        throw new Error(`expected one ${type}${name ? ` named ${name}` : ""}, found ${found.length} (${type} names: ${names.join(", ") || "none"})`);
    }
    return found[0];
}

/** The resources whose parent is the given resource. */
export function childrenOf(resources: readonly RecordedResource[], parent: RecordedResource): RecordedResource[] {
    return resources.filter((resource) => parent.urn !== undefined && resource.parent === parent.urn);
}
