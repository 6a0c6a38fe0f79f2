// `npm run render -- <stack> <dir>`: evaluates the program offline for a stack and writes, under <dir>/<stack>/, what `pulumi up` would
// apply to the cluster, for review: every Kubernetes object as YAML (secrets redacted), each Helm release's chart,
// repository, version and values; then validates every object strictly at the stack's Kubernetes version
// (kubernetes-validate; custom resources with their @kubernetes-models packages). Exits non-zero when one is invalid.
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import * as YAML from "yaml";
import { ConfigOverrides, evaluateStack, RecordedResource, repoRoot } from "./offline-stack";
import { setUpTools, toolPath } from "./tools";

export const redacted = "<redacted>";

export interface RenderedFile {
    path: string;
    content: Record<string, any>;
}

const isKubernetesObject = (resource: RecordedResource) =>
    resource.type.startsWith("kubernetes:") && resource.type !== "kubernetes:helm.sh/v3:Release";

/** How Pulumi marks a secret value on the wire (the mock sees inputs in this form). */
const secretSignatureKey = "4dabf18193072939515e22adb298388d";
const secretSignature = "1b47061264138c4ac30d75fd1eb44270";

/** Every leaf value hidden, keys kept: the reader sees which secrets exist, not what they are. */
function hideLeaves(value: unknown): unknown {
    if (Array.isArray(value)) return value.map(hideLeaves);
    if (value !== null && typeof value === "object") return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, hideLeaves(item)]));
    return redacted;
}

/** The inputs with Pulumi secrets replaced by their redacted shape. */
export function redactSecrets(value: unknown): any {
    if (Array.isArray(value)) return value.map(redactSecrets);
    if (value !== null && typeof value === "object") {
        const record = value as Record<string, unknown>;
        if (record[secretSignatureKey] === secretSignature) return hideLeaves(record.value);
        return Object.fromEntries(Object.entries(record).map(([key, item]) => [key, redactSecrets(item)]));
    }
    return value;
}

/** A Kubernetes object as the provider would send it: the resource's inputs, secrets and Secret values hidden. */
export function kubernetesObject(resource: RecordedResource): Record<string, any> {
    const { apiVersion, kind, metadata, ...rest } = redactSecrets(resource.inputs);
    const object: Record<string, any> = { apiVersion, kind, metadata, ...rest };
    if (kind === "Secret") {
        for (const field of ["data", "stringData"]) {
            if (object[field]) object[field] = Object.fromEntries(Object.keys(object[field]).map((key) => [key, redacted]));
        }
    }
    return object;
}

/** The Helm release as a reviewer needs it: what is installed from where, and with which values. */
export function helmRelease(resource: RecordedResource): Record<string, any> {
    const { name, namespace, chart, version, repositoryOpts, values, atomic, timeout, skipCrds } = redactSecrets(resource.inputs);
    // An OCI chart is named by its reference: its registry path stands as the repository.
    const [repository, chartName] = repositoryOpts?.repo ? [repositoryOpts.repo, chart] : [chart.slice(0, chart.lastIndexOf("/")), chart.slice(chart.lastIndexOf("/") + 1)];
    return { release: name, namespace, chart: chartName, repository, version, atomic, timeout, skipCrds, values: values ?? {} };
}

/** Every file the render writes, by path relative to the output directory. */
export function renderFiles(resources: readonly RecordedResource[]): RenderedFile[] {
    const files: RenderedFile[] = [];
    for (const resource of resources) {
        if (resource.type === "kubernetes:helm.sh/v3:Release") {
            files.push({ path: path.join("helm", `${resource.inputs.name}.yaml`), content: helmRelease(resource) });
        } else if (isKubernetesObject(resource)) {
            const object = kubernetesObject(resource);
            const scope = object.metadata?.namespace ?? "cluster";
            files.push({ path: path.join("kubernetes", scope, `${object.kind}-${object.metadata?.name}.yaml`.toLowerCase()), content: object });
        }
    }
    return files;
}

// kubernetes-models is ESM-only ("exports" with only an "import" condition): load it with a real dynamic import,
// which TypeScript's CommonJS output would otherwise turn into require().
const importModule = new Function("specifier", "return import(specifier)") as (specifier: string) => Promise<Record<string, any>>;

/** API groups of custom resources (CRDs kubernetes-validate does not know) and the kubernetes-models package of each. */
const customResourceModels: Record<string, string> = {
    "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
    "keda.sh": "@kubernetes-models/keda",
    "karpenter.sh": "@kubernetes-models/karpenter",
    "karpenter.k8s.aws": "@kubernetes-models/karpenter",
};

const apiGroup = (apiVersion: string): string => (apiVersion.includes("/") ? apiVersion.split("/")[0] : "");
const describe = (object: Record<string, any>): string =>
    `${object.kind} ${object.metadata?.namespace ? `${object.metadata.namespace}/` : ""}${object.metadata?.name}`;

/** Validates a custom resource against its model; returns the problems (none when valid). */
async function validateCustomResource(object: Record<string, any>): Promise<string[]> {
    const module = await importModule(`${customResourceModels[apiGroup(object.apiVersion)]}/${object.apiVersion}`).catch(() => undefined);
    const Model = module?.[object.kind];
    if (typeof Model !== "function") return [`${describe(object)}: no schema for kind ${object.kind} in ${object.apiVersion}`];
    try {
        new Model(object).validate();
        return [];
    } catch (error) {
        return [`${describe(object)}: ${(error as Error).message}`];
    }
}

/** Validates Kubernetes' own objects strictly (unknown fields rejected) at a Kubernetes version, in one kubernetes-validate run. */
function validateStrictly(objects: readonly Record<string, any>[], kubernetesVersion: string): string[] {
    if (objects.length === 0) return [];
    setUpTools();
    const result = spawnSync(toolPath("python"), [path.join(repoRoot, "scripts", "validate_kubernetes.py")], {
        input: JSON.stringify({ version: kubernetesVersion, objects }),
        encoding: "utf8",
        maxBuffer: 64 * 1024 * 1024,
    });
    if (result.status !== 0) throw new Error(`kubernetes-validate failed (${result.status}):\n${result.stderr}`);
    const problems: (string | null)[] = JSON.parse(result.stdout);
    return problems.flatMap((problem, index) => (problem === null ? [] : [`${describe(objects[index])}: ${problem}`]));
}

/**
 * Validates Kubernetes objects: Kubernetes' own APIs strictly at the cluster's version (kubernetes-validate), custom
 * resources against their models. Returns every problem, each naming its object.
 */
export async function validateObjects(objects: readonly Record<string, any>[], kubernetesVersion: string): Promise<string[]> {
    const custom = objects.filter((object) => apiGroup(object.apiVersion) in customResourceModels);
    const builtin = objects.filter((object) => !custom.includes(object));
    const customProblems = await Promise.all(custom.map(validateCustomResource));
    return [...validateStrictly(builtin, kubernetesVersion), ...customProblems.flat()];
}

/** Validates every rendered Kubernetes object at the cluster's version; returns all problems. */
export async function validateFiles(files: readonly RenderedFile[], kubernetesVersion: string): Promise<string[]> {
    return validateObjects(files.filter((file) => file.path.startsWith(`kubernetes${path.sep}`)).map((file) => file.content), kubernetesVersion);
}

export async function render(
    stack: string,
    directory: string,
    overrides: ConfigOverrides = {},
): Promise<{ files: RenderedFile[]; problems: string[]; kubernetesVersion: string }> {
    const evaluation = await evaluateStack(stack, overrides);
    const files = renderFiles(evaluation.resources);
    // One folder per stack, emptied first: dev and prod can share <dir>, and nothing stale survives a re-render.
    const root = path.join(directory, stack);
    fs.rmSync(root, { recursive: true, force: true });
    for (const file of files) {
        const target = path.join(root, file.path);
        fs.mkdirSync(path.dirname(target), { recursive: true });
        fs.writeFileSync(target, YAML.stringify(file.content, { lineWidth: 0 }));
    }
    return { files, problems: await validateFiles(files, String(evaluation.config["whisper-eks:kubernetesVersion"])), kubernetesVersion: String(evaluation.config["whisper-eks:kubernetesVersion"]) };
}

async function main(): Promise<void> {
    const [stack, directory] = process.argv.slice(2);
    if (!stack || !directory) {
        console.error("usage: npm run render -- <stack> <dir>");
        process.exit(2);
    }
    const { files, problems, kubernetesVersion } = await render(stack, directory);
    const releases = files.filter((file) => file.path.startsWith("helm")).length;
    console.log(`${stack}: wrote ${files.length - releases} Kubernetes objects and ${releases} Helm releases to ${path.join(directory, stack)}`);
    if (problems.length > 0) {
        console.error(`${problems.length} object(s) do not validate:\n${problems.map((problem) => `  - ${problem}`).join("\n")}`);
        process.exit(1);
    }
    console.log(`every object validates strictly against the Kubernetes ${kubernetesVersion} schema (kubernetes-validate) or its CRD's model (Prometheus Operator, KEDA, Karpenter)`);
}

if (require.main === module) {
    main().catch((error) => {
        console.error(error instanceof Error ? error.message : error);
        process.exit(1);
    });
}
