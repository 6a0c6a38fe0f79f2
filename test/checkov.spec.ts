// checkov (PyPI, pinned with its closure in checkov/requirements.txt, in the tools virtualenv .venv-tools) over what
// the program deploys: every stack's rendered Kubernetes objects, the server's Dockerfile and the GitHub workflows.
// A finding passes only when checkov/allowlist.yaml lists it with its reason; an entry that matches no finding fails
// too, so a fixed finding leaves no stale exception behind.
import { strict as assert } from "assert";
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import * as YAML from "yaml";
import { repoRoot } from "../scripts/offline-stack";
import { render } from "../scripts/render";
import { setUpTools, toolPath } from "../scripts/tools";

const allowListPath = path.join(repoRoot, "checkov", "allowlist.yaml");
const stacks = ["dev", "prod"];

interface Finding {
    check: string;
    /** From the repository root; rendered objects as rendered/<stack>/... */
    file: string;
    resource: string;
}

interface AllowEntry extends Finding {
    why: string;
}

interface Scan {
    findings: Finding[];
    /** Checks run (passed and failed), resources checked, files checkov could not parse. */
    checks: number;
    resources: number;
    parsingErrors: number;
}

/** Runs checkov with one framework over the targets; paths in findings are made relative by `relative`. */
function scan(framework: string, targets: string[], relative: (absolutePath: string) => string): Scan {
    const result = spawnSync(
        toolPath("checkov"),
        // --skip-download: no call home to Prisma Cloud (guideline links only); the checks themselves are local.
        ["--skip-download", "--quiet", "--compact", "--output", "json", "--framework", framework, ...targets],
        { cwd: repoRoot, encoding: "utf8", maxBuffer: 256 * 1024 * 1024 },
    );
    // 0: every check passed, 1: some failed; anything else is checkov itself failing.
    if (result.status !== 0 && result.status !== 1) throw new Error(`checkov --framework ${framework} failed (${result.status}):\n${result.stderr}`);
    const parsed = JSON.parse(result.stdout);
    const reports: any[] = Array.isArray(parsed) ? parsed : [parsed];
    const scanned: Scan = { findings: [], checks: 0, resources: 0, parsingErrors: 0 };
    for (const report of reports) {
        scanned.checks += (report.summary?.passed ?? 0) + (report.summary?.failed ?? 0);
        scanned.resources += report.summary?.resource_count ?? 0;
        scanned.parsingErrors += report.summary?.parsing_errors ?? 0;
        for (const failed of report.results?.failed_checks ?? []) {
            scanned.findings.push({
                check: failed.check_id,
                file: relative(failed.file_abs_path),
                resource: String(failed.resource).split(`${repoRoot}${path.sep}`).join(""),
            });
        }
    }
    return scanned;
}

/** `*` matches within one path segment; everything else literally. */
function globMatches(pattern: string, value: string): boolean {
    const regex = pattern.split("*").map((part) => part.replace(/[.+?^${}()|[\]\\]/g, "\\$&")).join("[^/]*");
    return new RegExp(`^${regex}$`).test(value);
}

const allows = (entry: AllowEntry, finding: Finding) =>
    entry.check === finding.check && globMatches(entry.file, finding.file) && entry.resource === finding.resource;

const show = (finding: Finding) => `${finding.check} ${finding.file} ${finding.resource}`;

describe("checkov over the rendered stacks, the server's Dockerfile and the workflows", function () {
    // The first run installs checkov (about a minute); later runs reuse the virtualenv.
    this.timeout(20 * 60 * 1000);
    const allowList: AllowEntry[] = YAML.parse(fs.readFileSync(allowListPath, "utf8"));
    const scans: Record<string, Scan> = {};
    let renderDir: string;
    const fromRender = (absolutePath: string) => path.posix.join("rendered", path.relative(renderDir, absolutePath).split(path.sep).join("/"));
    const fromRepo = (absolutePath: string) => path.relative(repoRoot, absolutePath).split(path.sep).join("/");
    const findings = () => Object.values(scans).flatMap((result) => result.findings);

    before(async function () {
        setUpTools();
        renderDir = fs.mkdtempSync(path.join(os.tmpdir(), "checkov-render-"));
        for (const stack of stacks) {
            const { problems } = await render(stack, renderDir);
            assert.deepEqual(problems, [], `${stack} renders valid objects`);
        }
        scans.kubernetes = scan("kubernetes", ["--directory", renderDir], fromRender);
        scans.dockerfile = scan("dockerfile", ["--file", path.join(repoRoot, "service", "Dockerfile")], fromRepo);
        scans.workflows = scan("github_actions", ["--directory", path.join(repoRoot, ".github", "workflows")], fromRepo);
    });

    after(() => renderDir && fs.rmSync(renderDir, { recursive: true, force: true }));

    it("gives a reason for every allow-list entry", () => {
        assert.ok(Array.isArray(allowList) && allowList.length > 0);
        for (const entry of allowList) {
            assert.match(entry.check, /^CKV2?_[A-Z0-9]+_\d+$/, JSON.stringify(entry));
            assert.ok(entry.file && entry.resource, `${entry.check} names the file and the resource`);
            assert.ok(typeof entry.why === "string" && entry.why.length > 60, `${entry.check} says why it is accepted`);
        }
    });

    it("checked every stack's objects, the Dockerfile and the workflows, and parsed every file", () => {
        for (const [name, result] of Object.entries(scans)) {
            assert.ok(result.checks > 0, `${name}: checkov ran checks`);
            assert.equal(result.parsingErrors, 0, `${name}: every file parsed`);
        }
        const objects = stacks.flatMap((stack) => fs.readdirSync(path.join(renderDir, stack, "kubernetes"), { recursive: true, withFileTypes: true }))
            .filter((entry) => entry.isFile()).length;
        // checkov counts a Deployment's pod template as a resource of its own.
        assert.ok(scans.kubernetes.resources >= objects, `every rendered object of every stack was checked (${scans.kubernetes.resources} of ${objects})`);
    });

    it("finds nothing the allow-list does not explain", () => {
        const unexplained = findings().filter((finding) => !allowList.some((entry) => allows(entry, finding)));
        assert.deepEqual(unexplained.map(show), [], `checkov findings not in checkov/allowlist.yaml:\n  ${unexplained.map(show).join("\n  ")}`);
    });

    it("keeps no allow-list entry that matches no finding", () => {
        const stale = allowList.filter((entry) => !findings().some((finding) => allows(entry, finding)));
        assert.deepEqual(stale.map(show), [], "allow-list entries whose finding is gone: remove them");
    });

    it("would catch a server pod that mounts its service account token or lacks a NetworkPolicy (its silence means something)", () => {
        const deployment = YAML.parse(fs.readFileSync(path.join(renderDir, "dev", "kubernetes", "whisper", "deployment-whisper.yaml"), "utf8"));
        delete deployment.spec.template.spec.automountServiceAccountToken;
        const dir = fs.mkdtempSync(path.join(os.tmpdir(), "checkov-broken-"));
        try {
            fs.writeFileSync(path.join(dir, "deployment.yaml"), YAML.stringify(deployment));
            const checks = scan("kubernetes", ["--directory", dir], (file) => file).findings.map((finding) => finding.check);
            assert.ok(checks.includes("CKV_K8S_38"), `token mounted: ${checks}`);
            assert.ok(checks.includes("CKV2_K8S_6"), `no NetworkPolicy beside it: ${checks}`);
        } finally {
            fs.rmSync(dir, { recursive: true, force: true });
        }
    });
});
