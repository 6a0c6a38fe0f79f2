// Cluster Autoscaler as a real cluster needs it: for every Kubernetes version config accepts, the chart and the image
// of that autoscaler minor with the RBAC it reads through; scale-down evictions that leave the server its whole drain;
// GPU nodes (and the node templates it scales from zero with) labelled as GPU nodes for its AWS provider.
import { strict as assert } from "assert";
import {
    autoscalerWatches,
    clusterAutoscalerChartGrants,
    clusterAutoscalerReleases,
    versionAtLeast,
    WatchedResource,
} from "../infra/autoscaling";
import { gpuInstanceTypes } from "../infra/catalog";
import { kubernetesVersions } from "../infra/config";
import { evaluateStack, findResources, StackEvaluation } from "../scripts/offline-stack";

const releaseNamed = (evaluation: StackEvaluation, name: string) =>
    findResources(evaluation.resources, "kubernetes:helm.sh/v3:Release").find((release) => release.inputs.name === name) ??
    assert.fail(`no Helm release ${name}`);

/** Whether a ClusterRole rule list grants get, list and watch on a `group/resource`. */
function rulesGrantRead(rules: { apiGroups: string[]; resources: string[]; verbs: string[] }[], resource: WatchedResource): boolean {
    const [group, name] = resource.split("/");
    return rules.some(
        (rule) => rule.apiGroups.includes(group) && rule.resources.includes(name) && ["get", "list", "watch"].every((verb) => rule.verbs.includes(verb)),
    );
}

describe("Cluster Autoscaler", function () {
    describe("one table maps every Kubernetes version config accepts to its autoscaler", function () {
        const evaluations: Record<string, StackEvaluation> = {};
        before(async function () {
            for (const version of kubernetesVersions) evaluations[version] = await evaluateStack("dev", { kubernetesVersion: version });
        });

        for (const version of kubernetesVersions) {
            it(`Kubernetes ${version}: chart and image of autoscaler ${version}, and RBAC for everything it reads`, function () {
                const release = releaseNamed(evaluations[version], "cluster-autoscaler");
                const minor = Number(version.split(".")[1]);
                const row = clusterAutoscalerReleases[version];
                assert.ok(row, `a table row for ${version}`);
                assert.equal(release.inputs.version, row.chartVersion);
                assert.match(row.chartAppVersion, new RegExp(`^1\\.${minor}\\.\\d+$`), "the chart was written for this autoscaler minor");
                assert.match(release.inputs.values.image.tag, new RegExp(`^v1\\.${minor}\\.\\d+$`), "the image is of the cluster's minor");
                const additional = release.inputs.values.rbac.additionalRules ?? [];
                for (const watch of autoscalerWatches.filter((candidate) => candidate.sinceMinor <= minor)) {
                    const byChart = clusterAutoscalerChartGrants.some(
                        (grant) => grant.resource === watch.resource && versionAtLeast(release.inputs.version, grant.sinceChart),
                    );
                    assert.ok(byChart || rulesGrantRead(additional, watch.resource), `${watch.resource} (${watch.source}) is readable with chart ${release.inputs.version}`);
                }
            });
        }

        it("grants the dynamic resource allocation reads of 1.35 through the chart (9.54.0 or later), not by hand", function () {
            const release = releaseNamed(evaluations["1.35"], "cluster-autoscaler");
            assert.ok(versionAtLeast(release.inputs.version, "9.54.0"), release.inputs.version);
            const additional = release.inputs.values.rbac.additionalRules;
            assert.deepEqual(additional.flatMap((rule: any) => rule.apiGroups).sort(), ["", "apps"], "only what no chart grants is added");
            assert.equal(releaseNamed(evaluations["1.33"], "cluster-autoscaler").inputs.values.rbac.additionalRules.length, 0);
        });

        it("compares dotted versions numerically", function () {
            assert.ok(versionAtLeast("9.59.0", "9.54.0") && versionAtLeast("9.54.0", "9.54.0") && versionAtLeast("9.100.0", "9.54.1"));
            assert.ok(!versionAtLeast("9.46.6", "9.54.0") && !versionAtLeast("9.53.10", "9.54.0"));
        });
    });

    for (const stack of ["dev", "prod"]) {
        describe(`${stack} stack`, function () {
            let evaluation: StackEvaluation;
            before(async function () {
                evaluation = await evaluateStack(stack);
            });

            it("evicts a pod on scale-down with at least the pod's own grace period, so its drain finishes", function () {
                const args = releaseNamed(evaluation, "cluster-autoscaler").inputs.values.extraArgs;
                const deployment = findResources(evaluation.resources, "kubernetes:apps/v1:Deployment")[0];
                const grace = deployment.inputs.spec.template.spec.terminationGracePeriodSeconds;
                const requestTimeout = evaluation.config["whisper-eks:requestTimeoutSeconds"] as number;
                assert.ok(grace > requestTimeout, "the pod's grace covers the longest request");
                assert.ok(args["max-graceful-termination-sec"] >= grace, `max-graceful-termination-sec ${args["max-graceful-termination-sec"]} >= ${grace}`);
            });

            it("labels GPU nodes and their node template with k8s.amazonaws.com/accelerator, the GPU model of the group's types", function () {
                const group = findResources(evaluation.resources, "eks:index:ManagedNodeGroup").find((candidate) => candidate.inputs.amiType === "AL2023_x86_64_NVIDIA")!;
                const accelerators = new Set((group.inputs.instanceTypes as string[]).map((type) => gpuInstanceTypes[type].accelerator));
                assert.equal(accelerators.size, 1, "one GPU model per group");
                const [accelerator] = accelerators;
                assert.match(accelerator, /^nvidia-[a-z0-9-]+$/);
                assert.equal(group.inputs.labels["k8s.amazonaws.com/accelerator"], accelerator);
                const tags = findResources(evaluation.resources, "aws:autoscaling/tag:Tag").map((tag) => tag.inputs.tag);
                const tag = tags.find((candidate) => candidate.key === "k8s.io/cluster-autoscaler/node-template/label/k8s.amazonaws.com/accelerator");
                assert.equal(tag?.value, accelerator, "the ASG's node template carries the same label");
            });
        });
    }

    it("names each catalog GPU's accelerator once: every type of one GPU model has the same value", function () {
        const byModel = new Map<string, Set<string>>();
        for (const type of Object.values(gpuInstanceTypes)) byModel.set(type.gpuModel, new Set([...(byModel.get(type.gpuModel) ?? []), type.accelerator]));
        for (const [model, values] of byModel) assert.equal(values.size, 1, model);
        assert.equal(new Set([...byModel.values()].flatMap((values) => [...values])).size, byModel.size, "different GPUs, different values");
    });
});
