// The operations guide against the code it describes: the GPU table must match the instance-type catalog,
// every config key it names must exist, and every file it links must be there, so the guide cannot drift.
import { strict as assert } from "assert";
import * as fs from "fs";
import * as path from "path";
import * as YAML from "yaml";
import { gpuInstanceTypes, requiredGpuMemoryGiB } from "../infra/catalog";

const repoRoot = path.resolve(__dirname, "..");
const guidePath = path.join(repoRoot, "docs", "operations.md");
const guide = fs.readFileSync(guidePath, "utf8");
const projectConfig: Record<string, unknown> = YAML.parse(fs.readFileSync(path.join(repoRoot, "Pulumi.yaml"), "utf8")).config;
/** infra/load-config.ts, the one reader of stack config: secrets have no default, so Pulumi.yaml does not declare them. */
const configSource = fs.readFileSync(path.join(repoRoot, "infra", "load-config.ts"), "utf8");

/** The model and precision the table's batch-size column is computed for (the defaults). */
const tableModel = "openai/whisper-large-v3";
const tableDtype = "float16";
const maxBatchSizeLimit = 256;

/** Largest maxBatchSize the stack's GPU memory check accepts on a GPU with this much memory. */
function largestBatchThatFits(gpuMemoryGiB: number): number {
    let batch = 0;
    while (batch < maxBatchSizeLimit && requiredGpuMemoryGiB(tableModel, tableDtype, batch + 1) <= gpuMemoryGiB) batch++;
    return batch;
}

/** Rows of the GPU table: markdown rows whose first cell is a backquoted instance type. */
function gpuTableRows(): Map<string, string[]> {
    const rows = new Map<string, string[]>();
    for (const line of guide.split("\n")) {
        const match = /^\|\s*`([a-z0-9]+\.[a-z0-9]+)`\s*\|/.exec(line);
        if (!match) continue;
        const cells = line.split("|").slice(1, -1).map((cell) => cell.trim());
        assert.ok(!rows.has(match[1]), `${match[1]} appears twice in the GPU table`);
        rows.set(match[1], cells);
    }
    return rows;
}

describe("operations guide (docs/operations.md)", () => {
    const rows = gpuTableRows();

    it("lists exactly the catalog's GPU instance types", () => {
        assert.deepEqual([...rows.keys()].sort(), Object.keys(gpuInstanceTypes).sort());
    });

    for (const [instanceType, spec] of Object.entries(gpuInstanceTypes)) {
        it(`${instanceType}: GPU, count, memory, vCPU, pods per node and largest batch match the catalog`, () => {
            const cells = rows.get(instanceType);
            assert.ok(cells, `${instanceType} is missing from the GPU table`);
            const [, gpu, gpuCount, gpuMemory, hostSize, podsPerNode, largestBatch] = cells;
            assert.equal(gpu, spec.gpuModel);
            assert.equal(gpuCount, String(spec.gpuCount));
            assert.equal(gpuMemory, `${spec.gpuMemoryGiB} GiB`);
            assert.equal(hostSize, `${spec.vcpu} / ${spec.memoryGiB} GiB`);
            // One server pod per GPU.
            assert.equal(podsPerNode, String(spec.gpuCount));
            assert.equal(largestBatch, String(largestBatchThatFits(spec.gpuMemoryGiB)));
        });
    }

    // Not `repo:acme/whisper-eks:environment:dev`, an OIDC subject in the CI/CD setup.
    it("names only config keys the program reads", () => {
        const named = new Set([...guide.matchAll(/(?<![\w/-])whisper-eks:([A-Za-z][A-Za-z0-9]*)/g)].map((match) => match[1]));
        const unknown = [...named].filter((key) => !(key in projectConfig) && !configSource.includes(`Secret("${key}")`));
        assert.deepEqual(unknown, [], `keys in the guide that neither Pulumi.yaml declares nor infra/load-config.ts reads as secrets: ${unknown.join(", ")}`);
        assert.ok(named.size >= 10, "the guide shows the stack's config keys with their namespace");
    });

    it("links only files that exist", () => {
        const links = [...guide.matchAll(/\]\(([^)#\s]+)(#[^)]*)?\)/g)].map((match) => match[1]).filter((target) => !/^[a-z]+:/.test(target));
        assert.ok(links.length > 0);
        for (const target of links) {
            assert.ok(fs.existsSync(path.resolve(path.dirname(guidePath), target)), `docs/operations.md links ${target}, which does not exist`);
        }
    });

    it("covers the troubleshooting cases the design asks for", () => {
        for (const symptom of ["ContainerCreating", "CUDA out of memory", "unreachable", "downloaded again", "Insufficient nvidia.com/gpu", "Multi-Attach"]) {
            assert.ok(guide.includes(symptom), `the troubleshooting table covers "${symptom}"`);
        }
    });

    it("explains every alert the monitoring stack defines", () => {
        const monitoring = fs.readFileSync(path.join(repoRoot, "infra", "monitoring.ts"), "utf8");
        const alerts = [...new Set([...monitoring.matchAll(/"(Whisper[A-Za-z0-9]+)"/g)].map((match) => match[1]))];
        assert.ok(alerts.length > 0, "infra/monitoring.ts defines Whisper* alerts");
        for (const alert of alerts) assert.match(guide, new RegExp(`^\\| \`${alert}\` \\|`, "m"), `the alerts table explains ${alert}`);
    });

    it("states the CI threat model: previews are cluster viewers, prod-preview needs a reviewer, secrets live in environments", () => {
        const section = guide.slice(guide.indexOf("### Who can reach what: the CI threat model"));
        assert.ok(section.length < guide.length, "the guide has the threat model section");
        for (const point of ["untrusted", "`prod-preview`", "required reviewer", "viewer", "environment secrets", "one passphrase per stack", "What remains"]) {
            assert.ok(section.includes(point), `the threat model covers "${point}"`);
        }
        assert.doesNotMatch(guide, /clusterAdminRoleArns\[\d\]' arn:aws:iam::\d+:role\/whisper-eks-\w+-preview/, "no example makes a preview role an admin");
    });

    it("is linked from the README", () => {
        assert.match(fs.readFileSync(path.join(repoRoot, "README.md"), "utf8"), /\]\(docs\/operations\.md\)/);
    });
});

describe("server reference (docs/server.md)", () => {
    const page = fs.readFileSync(path.join(repoRoot, "docs", "server.md"), "utf8");
    const settings = fs.readFileSync(path.join(repoRoot, "service", "whisper_server", "settings.py"), "utf8");
    const metrics = fs.readFileSync(path.join(repoRoot, "service", "whisper_server", "metrics.py"), "utf8");

    it("lists every server setting with its flag and WHISPER_ variable", () => {
        const fields = [...settings.matchAll(/^ {4}([a-z][a-z0-9_]*): [^=\n]+=/gm)].map((match) => match[1]);
        assert.ok(fields.length >= 20, "settings.py declares the server's settings as dataclass fields");
        const rows = page.split("\n").filter((line) => line.startsWith("| `--"));
        for (const field of fields) {
            const flag = `\`--${field.replace(/_/g, "-")}\``;
            const row = rows.find((line) => line.split("|")[1].includes(flag));
            assert.ok(row, `the settings table has a row for ${flag}`);
            assert.ok(row.includes(`WHISPER_${field.toUpperCase()}`), `${flag}'s row names WHISPER_${field.toUpperCase()}`);
        }
    });

    it("names every metric the server exports", () => {
        const names = [...metrics.matchAll(/(?:Counter|Gauge|Histogram)\(\s*"([a-z_]+)"/g)].map((match) => match[1]);
        assert.ok(names.length >= 10, "metrics.py declares the metrics");
        // prometheus_client adds _total to a counter's name.
        const counters = new Set([...metrics.matchAll(/Counter\(\s*"([a-z_]+)"/g)].map((match) => match[1]));
        assert.ok(counters.size > 0);
        for (const name of names) {
            const exported = counters.has(name) ? `${name}_total` : name;
            assert.ok(page.includes(`\`${exported}`), `docs/server.md names ${exported}`);
        }
    });
});

describe("chart versions in the docs", () => {
    // Required here, not imported at the top: these modules declare Pulumi resources only when called.
    const charts: { chart: string; version: string }[] = [
        require("../infra/load-balancer").loadBalancerControllerChart,
        require("../infra/monitoring").kubePrometheusStackChart,
        require("../infra/monitoring").dcgmExporterChart,
        require("../infra/gpu").nvidiaDevicePluginChart,
        require("../infra/autoscaling").kedaChart,
        { chart: "karpenter", version: require("../infra/karpenter").karpenterRelease.version },
    ];
    const pages = ["README.md", ...fs.readdirSync(path.join(repoRoot, "docs")).filter((file) => file.endsWith(".md")).map((file) => `docs/${file}`)];
    const text = Object.fromEntries(pages.map((page) => [page, fs.readFileSync(path.join(repoRoot, page), "utf8")]));

    for (const { chart, version } of charts) {
        it(`${chart}: docs/architecture.md names ${version}, and no page names another version`, () => {
            const mention = new RegExp(`\\b(?:chart \`${chart}\`|${chart === "karpenter" ? "Karpenter" : chart}) (\\d+\\.\\d+\\.\\d+)`, "g");
            assert.ok([...text["docs/architecture.md"].matchAll(mention)].some((match) => match[1] === version), `docs/architecture.md names ${chart} ${version}`);
            for (const [page, source] of Object.entries(text)) {
                for (const match of source.matchAll(mention)) assert.equal(match[1], version, `${page} names ${chart} ${match[1]}`);
            }
        });
    }
});
