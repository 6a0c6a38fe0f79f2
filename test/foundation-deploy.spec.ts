// scripts/deploy.sh, run as a real process: it stops with a clear message for each missing prerequisite,
// and otherwise installs dependencies, logs in to the state backend, selects the stack and runs pulumi up.
import { strict as assert } from "assert";
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { repoRoot } from "../scripts/offline-stack";

const script = path.join(repoRoot, "scripts", "deploy.sh");
const bash = "/bin/bash";
const temporaryDirs: string[] = [];

function temporaryDir(prefix: string): string {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
    temporaryDirs.push(dir);
    return dir;
}

/** A directory for PATH holding only `mkdir` and the given fake tools (each a bash script). */
function binDir(tools: Record<string, string>): string {
    const dir = temporaryDir("deploy-bin-");
    fs.symlinkSync(spawnSync("/bin/sh", ["-c", "command -v mkdir"]).stdout.toString().trim(), path.join(dir, "mkdir"));
    for (const [name, body] of Object.entries(tools)) {
        fs.writeFileSync(path.join(dir, name), `#!${bash}\n${body}\n`, { mode: 0o755 });
    }
    return dir;
}

/** A fake tool that appends its arguments to the log and succeeds. */
const recording = (log: string, name: string) => `echo "${name} $*" >> "${log}"`;

/** A fake aws CLI: `aws --version` answers as that version does, any other call runs `otherwise`. */
const awsCli = (version: string, otherwise = "exit 0") =>
    `if [[ "$1" == --version ]]; then echo "aws-cli/${version} Python/3.11.9 Linux/6.1.0 exe/x86_64.debian.12" >&2; exit 0; fi\n${otherwise}`;

function deploy(args: string[], pathDir: string, env: Record<string, string> = {}) {
    const home = temporaryDir("deploy-home-");
    const result = spawnSync(bash, [script, ...args], {
        env: { PATH: pathDir, HOME: home, ...env },
        input: "",
        encoding: "utf8",
    });
    return { status: result.status, stdout: result.stdout, stderr: result.stderr, home };
}

describe("scripts/deploy.sh", () => {
    after(() => temporaryDirs.forEach((dir) => fs.rmSync(dir, { recursive: true, force: true })));

    it("names every missing tool and exits 1 before doing anything", () => {
        const result = deploy(["dev"], binDir({}));
        assert.equal(result.status, 1, result.stderr);
        assert.match(result.stderr, /cannot deploy stack "dev" yet/);
        assert.match(result.stderr, /the Pulumi CLI is not installed/);
        assert.match(result.stderr, /the aws CLI v2 is not installed; .*aws eks get-token/);
        assert.match(result.stderr, /Docker is not installed/);
        assert.match(result.stderr, /Node\.js 22\+ with npm is not installed/);
        assert.equal(result.stdout, "");
    });

    it("reports invalid AWS credentials and a stopped Docker engine", () => {
        const log = path.join(temporaryDir("deploy-log-"), "calls");
        const dir = binDir({
            pulumi: recording(log, "pulumi"),
            npm: recording(log, "npm"),
            aws: awsCli("2.27.50", 'echo "Unable to locate credentials. You can configure credentials by running \\"aws configure\\"." >&2; exit 253'),
            docker: 'echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2; exit 1',
        });
        const result = deploy(["prod"], dir);
        assert.equal(result.status, 1, result.stderr);
        assert.match(result.stderr, /no valid AWS credentials \('aws sts get-caller-identity' failed: Unable to locate credentials/);
        assert.match(result.stderr, /aws configure/);
        assert.match(result.stderr, /the Docker engine is not running \('docker info' failed\)/);
        assert.doesNotMatch(result.stderr, /Pulumi CLI|npm is not installed/);
        assert.equal(fs.existsSync(log), false, "nothing was run");
    });

    it("refuses an unknown stack and lists the stacks there are", () => {
        const result = deploy(["staging"], binDir({}));
        assert.equal(result.status, 2);
        assert.match(result.stderr, /no stack "staging": Pulumi\.staging\.yaml does not exist; stacks: dev prod/);
        assert.match(deploy([], binDir({})).stderr, /usage: scripts\/deploy\.sh <stack>/);
    });

    it("with everything in place installs, logs in to a local backend, selects the stack and runs pulumi up", () => {
        const log = path.join(temporaryDir("deploy-log-"), "calls");
        const tools = {
            pulumi: recording(log, "pulumi"),
            npm: recording(log, "npm"),
            aws: awsCli("2.27.50", recording(log, "aws")),
            docker: recording(log, "docker"),
        };
        const result = deploy(["dev", "--yes"], binDir(tools), { PULUMI_CONFIG_PASSPHRASE: "" });
        assert.equal(result.status, 0, result.stderr);
        const backend = `file://${result.home}/.pulumi-local`;
        assert.deepEqual(fs.readFileSync(log, "utf8").trim().split("\n"), [
            "aws sts get-caller-identity --output text",
            // dev's GPU nodes may be spot.
            "aws iam get-role --role-name AWSServiceRoleForEC2Spot --output text",
            "docker info",
            "npm ci --no-audit --no-fund",
            `pulumi login ${backend}`,
            "pulumi stack select --create dev",
            "pulumi up --stack dev --yes",
        ]);
        assert.ok(fs.statSync(`${result.home}/.pulumi-local`).isDirectory());
    });

    it("refuses a spot stack in an account without the EC2 Spot service-linked role, printing the command that creates it", () => {
        const log = path.join(temporaryDir("deploy-log-"), "calls");
        const noSpotRole =
            'if [[ "$1" == iam ]]; then echo "An error occurred (NoSuchEntity) when calling the GetRole operation: The role with name AWSServiceRoleForEC2Spot cannot be found." >&2; exit 254; fi';
        const dir = binDir({ pulumi: recording(log, "pulumi"), npm: recording(log, "npm"), aws: awsCli("2.27.50", noSpotRole), docker: "exit 0" });
        const result = deploy(["dev"], dir, { PULUMI_CONFIG_PASSPHRASE: "" });
        assert.equal(result.status, 1, result.stderr);
        assert.match(result.stderr, /stack "dev" may run GPU nodes on spot .*no EC2 Spot service-linked role/);
        assert.match(result.stderr, /aws iam create-service-linked-role --aws-service-name spot\.amazonaws\.com/);
        assert.equal(fs.existsSync(log), false, "neither npm ci nor pulumi ran");
        // prod's GPU nodes are on-demand only: the role is not asked for.
        assert.equal(deploy(["prod"], dir, { PULUMI_CONFIG_PASSPHRASE: "" }).status, 0);
    });

    it("honours PULUMI_BACKEND_URL", () => {
        const log = path.join(temporaryDir("deploy-log-"), "calls");
        const dir = binDir({ pulumi: recording(log, "pulumi"), npm: recording(log, "npm"), aws: awsCli("2.27.50"), docker: "exit 0" });
        const result = deploy(["prod"], dir, { PULUMI_BACKEND_URL: "s3://team-pulumi-state/whisper" });
        assert.equal(result.status, 0, result.stderr);
        assert.ok(fs.readFileSync(log, "utf8").includes("pulumi login s3://team-pulumi-state/whisper\n"));
    });

    it("does not ask for Docker when the stack names a prebuilt image", () => {
        // A copy of the script in a repository of its own, whose one stack sets imageReference.
        const repo = temporaryDir("deploy-repo-");
        fs.mkdirSync(path.join(repo, "scripts"));
        fs.copyFileSync(script, path.join(repo, "scripts", "deploy.sh"));
        const reference = `123456789012.dkr.ecr.us-east-1.amazonaws.com/whisper@sha256:${"b".repeat(64)}`;
        fs.writeFileSync(path.join(repo, "Pulumi.ci.yaml"), `config:\n  aws:region: us-east-1\n  whisper-eks:imageReference: "${reference}"\n`);
        const result = spawnSync(bash, [path.join(repo, "scripts", "deploy.sh"), "ci"], {
            env: { PATH: binDir({}), HOME: temporaryDir("deploy-home-") },
            encoding: "utf8",
        });
        assert.equal(result.status, 1);
        assert.match(result.stderr, /the Pulumi CLI is not installed/);
        assert.doesNotMatch(result.stderr, /Docker/);
    });

    it("asks for a passphrase for a local backend when it cannot prompt, before installing anything", () => {
        const log = path.join(temporaryDir("deploy-log-"), "calls");
        const dir = binDir({ pulumi: recording(log, "pulumi"), npm: recording(log, "npm"), aws: awsCli("2.27.50"), docker: "exit 0" });
        const result = deploy(["dev"], dir);
        assert.equal(result.status, 1);
        assert.match(result.stderr, /cannot deploy stack "dev" yet/);
        assert.match(result.stderr, /set PULUMI_CONFIG_PASSPHRASE/);
        assert.equal(fs.existsSync(log), false, "neither npm ci nor pulumi ran");
        assert.equal(fs.existsSync(path.join(result.home, ".pulumi-local")), false, "nothing was written");
    });

    it("refuses the aws CLI v1, naming the version found, before doing anything", () => {
        const log = path.join(temporaryDir("deploy-log-"), "calls");
        const dir = binDir({ pulumi: recording(log, "pulumi"), npm: recording(log, "npm"), aws: awsCli("1.33.40", recording(log, "aws")), docker: "exit 0" });
        const result = deploy(["dev"], dir, { PULUMI_CONFIG_PASSPHRASE: "" });
        assert.equal(result.status, 1, result.stderr);
        assert.match(result.stderr, /the aws CLI is version 1 \(aws-cli\/1\.33\.40\); .*needs v2/);
        assert.match(result.stderr, /getting-started-install/);
        assert.ok(!fs.existsSync(log) || !/^(npm|pulumi) /m.test(fs.readFileSync(log, "utf8")), "neither npm ci nor pulumi ran");
    });

    it("says so when it cannot tell the aws CLI's version", () => {
        const dir = binDir({ pulumi: "exit 0", npm: "exit 0", aws: 'if [[ "$1" == --version ]]; then echo "command not found: python" >&2; exit 1; fi', docker: "exit 0" });
        const result = deploy(["dev"], dir, { PULUMI_CONFIG_PASSPHRASE: "" });
        assert.equal(result.status, 1);
        assert.match(result.stderr, /could not tell the aws CLI's version \('aws --version' said: command not found: python\)/);
    });
});
