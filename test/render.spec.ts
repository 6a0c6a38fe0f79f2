// `npm run render` for both stacks into a temporary directory: every file is read back as YAML, every Kubernetes
// object validates against the Kubernetes schema (and the Prometheus Operator CRDs), Helm releases are complete,
// and no secret value reaches the files.
import { strict as assert } from "assert";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import * as YAML from "yaml";
import { redacted, render, validateObject } from "../scripts/render";
import { SecretValue } from "../scripts/offline-stack";

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
    const trees: Record<string, { directory: string; files: Map<string, any>; problems: string[] }> = {};

    before(async function () {
        for (const stack of ["dev", "prod"]) {
            const directory = fs.mkdtempSync(path.join(os.tmpdir(), `render-${stack}-`));
            const { problems } = await render(stack, directory, { apiKey: new SecretValue(apiKey), grafanaAdminPassword: new SecretValue(grafanaPassword) });
            trees[stack] = { directory: path.join(directory, stack), files: readTree(path.join(directory, stack)), problems };
        }
    });
    after(function () {
        for (const { directory } of Object.values(trees)) fs.rmSync(path.dirname(directory), { recursive: true, force: true });
    });

    for (const stack of ["dev", "prod"]) {
        describe(`${stack} stack`, function () {
            it("writes every object of the workload, monitoring and storage as YAML", function () {
                const kinds = [...trees[stack].files.values()].map((object) => object.kind).filter(Boolean);
                for (const kind of ["Namespace", "PersistentVolumeClaim", "Secret", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "PodMonitor", "HorizontalPodAutoscaler", "PrometheusRule", "ConfigMap", "StorageClass"]) {
                    assert.ok(kinds.includes(kind), `a ${kind} is rendered`);
                }
            });

            it("validates every rendered object against the Kubernetes 1.34 schema and the Prometheus Operator CRDs", async function () {
                assert.deepEqual(trees[stack].problems, []);
                const objects = [...trees[stack].files.entries()].filter(([file]) => file.startsWith("kubernetes"));
                assert.ok(objects.length >= 14);
                for (const [file, object] of objects) assert.deepEqual(await validateObject(object), [], file);
            });

            it("writes each Helm release with its chart, repository, exact version and values", function () {
                const releases = [...trees[stack].files.entries()].filter(([file]) => file.startsWith("helm"));
                assert.ok(releases.length >= 5);
                for (const [file, release] of releases) {
                    assert.ok(release.release && release.namespace && release.chart, file);
                    assert.match(release.repository, /^https:\/\//, file);
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

    it("reports objects that break the schema", async function () {
        const broken = { apiVersion: "apps/v1", kind: "Deployment", metadata: { name: "broken" }, spec: { replicas: "two", selector: {}, template: {} } };
        const problems = await validateObject(broken);
        assert.equal(problems.length, 1);
        assert.match(problems[0], /Deployment broken: .*replicas/);
        const rule = { apiVersion: "monitoring.coreos.com/v1", kind: "PrometheusRule", metadata: { name: "rule" }, spec: { groups: [{ rules: [] }] } };
        assert.match((await validateObject(rule))[0], /PrometheusRule rule: .*name/);
        assert.match((await validateObject({ apiVersion: "example.com/v1", kind: "Thing", metadata: { name: "x" } }))[0], /no schema/);
    });
});
