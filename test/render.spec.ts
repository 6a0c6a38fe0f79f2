// `npm run render` for both stacks into a temporary directory: every file is read back as YAML, every Kubernetes
// object validates strictly at the stack's Kubernetes version (kubernetes-validate: unknown fields are errors; the
// Prometheus Operator's custom resources against their models), Helm releases are complete, and no secret value
// reaches the files.
import { strict as assert } from "assert";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import * as YAML from "yaml";
import { redacted, render, validateObjects } from "../scripts/render";
import { conflictingPins } from "../scripts/tools";
import { SecretValue, stackConfig } from "../scripts/offline-stack";

function readTree(directory: string): Map<string, any> {
    const files = new Map<string, any>();
    for (const entry of fs.readdirSync(directory, { recursive: true, withFileTypes: true })) {
        if (entry.isFile()) {
            const file = path.join(entry.parentPath, entry.name);
            files.set(path.relative(directory, file), YAML.parse(fs.readFileSync(file, "utf8")));
        }
    }
    return files;
}

describe("render", function () {
    const apiKey = "sentinel-api-key-never-in-files";
    const grafanaPassword = "sentinel-grafana-password";
    const trees: Record<string, { directory: string; files: Map<string, any>; problems: string[]; kubernetesVersion: string }> = {};

    before(async function () {
        for (const stack of ["dev", "prod"]) {
            const directory = fs.mkdtempSync(path.join(os.tmpdir(), `render-${stack}-`));
            const { problems, kubernetesVersion } = await render(stack, directory, { apiKey: new SecretValue(apiKey), grafanaAdminPassword: new SecretValue(grafanaPassword) });
            trees[stack] = { directory: path.join(directory, stack), files: readTree(path.join(directory, stack)), problems, kubernetesVersion };
        }
    });
    after(function () {
        for (const { directory } of Object.values(trees)) fs.rmSync(path.dirname(directory), { recursive: true, force: true });
    });

    for (const stack of ["dev", "prod"]) {
        describe(`${stack} stack`, function () {
            it("writes every object of the workload, monitoring and storage as YAML", function () {
                const kinds = [...trees[stack].files.values()].map((object) => object.kind).filter(Boolean);
                for (const kind of ["Namespace", "PersistentVolumeClaim", "Secret", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "PodMonitor", "ScaledObject", "PrometheusRule", "ConfigMap", "StorageClass", "NodePool", "EC2NodeClass"]) {
                    assert.ok(kinds.includes(kind), `a ${kind} is rendered`);
                }
            });

            it("validates every rendered object strictly at the stack's own Kubernetes version, and the CRDs' objects against their models", async function () {
                assert.equal(trees[stack].kubernetesVersion, stackConfig(stack).values["whisper-eks:kubernetesVersion"]);
                assert.deepEqual(trees[stack].problems, []);
                const objects = [...trees[stack].files.entries()].filter(([file]) => file.startsWith("kubernetes")).map(([, object]) => object);
                assert.ok(objects.length >= 14);
                assert.deepEqual(await validateObjects(objects, trees[stack].kubernetesVersion), []);
            });

            it("writes each Helm release with its chart, repository, exact version and values", function () {
                const releases = [...trees[stack].files.entries()].filter(([file]) => file.startsWith("helm"));
                assert.ok(releases.length >= 5);
                for (const [file, release] of releases) {
                    assert.ok(release.release && release.namespace && release.chart, file);
                    assert.match(release.repository, /^(https|oci):\/\//, file);
                    assert.match(release.version, /^\d+\.\d+\.\d+$/, file);
                    assert.equal(typeof release.values, "object", file);
                }
            });

            it("redacts secrets: the API key and Grafana password appear nowhere", function () {
                for (const file of fs.readdirSync(trees[stack].directory, { recursive: true }) as string[]) {
                    const full = path.join(trees[stack].directory, file);
                    if (!fs.statSync(full).isFile()) continue;
                    const text = fs.readFileSync(full, "utf8");
                    assert.ok(!text.includes(apiKey) && !text.includes(grafanaPassword), `${file} holds no secret`);
                }
                const secret = trees[stack].files.get(path.join("kubernetes", "whisper", "secret-whisper-api-key.yaml"));
                assert.deepEqual(secret.stringData, { "api-key": redacted });
            });
        });
    }

    it("renders generated secrets (no apiKey or grafanaAdminPassword in config) with their keys, redacted", async function () {
        const directory = fs.mkdtempSync(path.join(os.tmpdir(), "render-generated-"));
        try {
            await render("dev", directory);
            const files = readTree(path.join(directory, "dev"));
            assert.deepEqual(files.get(path.join("kubernetes", "whisper", "secret-whisper-api-key.yaml")).stringData, { "api-key": redacted });
            assert.deepEqual(Object.keys(files.get(path.join("kubernetes", "monitoring", "secret-grafana-admin.yaml")).stringData).sort(), ["admin-password", "admin-user"]);
        } finally {
            fs.rmSync(directory, { recursive: true, force: true });
        }
    });

    it("reports objects that break the schema: wrong types, unknown fields (strict), unknown kinds, each naming its object", async function () {
        const deployment = (spec: Record<string, unknown>) => ({ apiVersion: "apps/v1", kind: "Deployment", metadata: { name: "broken", namespace: "whisper" }, spec });
        const template = { metadata: { labels: { app: "a" } }, spec: { containers: [{ name: "c", image: "i" }] } };
        const selector = { matchLabels: { app: "a" } };
        assert.deepEqual(await validateObjects([deployment({ selector, template })], "1.35"), []);
        const wrongType = await validateObjects([deployment({ replicas: "two", selector, template })], "1.35");
        assert.equal(wrongType.length, 1);
        assert.match(wrongType[0], /^Deployment whisper\/broken: \.spec\.replicas: /);
        // A misspelt field: non-strict schemas (and the API server, which drops it) would let it pass silently.
        const unknown = await validateObjects([deployment({ replicaz: 2, selector, template })], "1.35");
        assert.match(unknown[0], /Deployment whisper\/broken: \.spec: Additional properties are not allowed \('replicaz' was unexpected\)/);
        const rule = { apiVersion: "monitoring.coreos.com/v1", kind: "PrometheusRule", metadata: { name: "rule" }, spec: { groups: [{ rules: [] }] } };
        assert.match((await validateObjects([rule], "1.35"))[0], /PrometheusRule rule: .*name/);
        // Karpenter's: a consolidation policy it does not know, a NodePool without a template.
        const rendered = trees.dev.files.get(path.join("kubernetes", "cluster", "nodepool-gpu.yaml"));
        assert.deepEqual(await validateObjects([rendered], "1.35"), []);
        const wrongPolicy = { ...rendered, spec: { ...rendered.spec, disruption: { ...rendered.spec.disruption, consolidationPolicy: "Always" } } };
        assert.match((await validateObjects([wrongPolicy], "1.35"))[0], /NodePool gpu: .*consolidationPolicy/);
        assert.match((await validateObjects([{ ...rendered, spec: {} }], "1.35"))[0], /NodePool gpu: .*template/);
        assert.match((await validateObjects([{ apiVersion: "example.com/v1", kind: "Thing", metadata: { name: "x" } }], "1.35"))[0], /Thing x: .*schema/i);
    });

    it("validates at the version asked for: an API that Kubernetes 1.35 serves and 1.32 does not", async function () {
        // resource.k8s.io/v1 (dynamic resource allocation) is GA from Kubernetes 1.34.
        const deviceClass = { apiVersion: "resource.k8s.io/v1", kind: "DeviceClass", metadata: { name: "gpu" }, spec: {} };
        assert.deepEqual(await validateObjects([deviceClass], "1.35"), []);
        assert.match((await validateObjects([deviceClass], "1.32"))[0], /DeviceClass gpu: .*1\.32/);
    });

    it("shares one tools virtualenv between checkov and kubernetes-validate: their locks agree on every common package", function () {
        assert.deepEqual(conflictingPins(), []);
    });
});
