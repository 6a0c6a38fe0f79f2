// The one way this program installs a Helm chart: pinned version, explicit release name, the cluster's
// provider, and a wait for the nodes and add-ons the chart's pods need.
import * as k8s from "@pulumi/kubernetes";
import * as pulumi from "@pulumi/pulumi";

/** What every in-cluster add-on gets: the cluster's provider, what must exist before it, and where its pods run. */
export interface AddonContext {
    provider: k8s.Provider;
    dependsOn: pulumi.Resource[];
    /** nodeSelector of add-on pods (controllers, monitoring): the system node pool, or an existing cluster's choice. */
    nodeSelector: Record<string, string>;
}

export interface HelmChart {
    /** Release name, fixed: without it Pulumi adds a random suffix and service names become unpredictable. */
    releaseName: string;
    chart: string;
    /** An exact chart version. */
    version: string;
    /** A chart repository (https://) or an OCI registry path (oci://), which holds the chart under its name. */
    repository: string;
    namespace: string;
    values: Record<string, unknown>;
    /** Seconds Helm waits for the release's resources to become ready. */
    timeoutSeconds?: number;
    /** Leave the chart's crds/ out: another release owns those CRDs (Helm never upgrades CRDs it installs that way). */
    skipCrds?: boolean;
}

/** An OCI chart is named by its full reference; a repository chart by its name beside the repository. */
export const chartSource = (chart: HelmChart): { chart: string; repositoryOpts?: { repo: string } } =>
    chart.repository.startsWith("oci://")
        ? { chart: `${chart.repository}/${chart.chart}` }
        : { chart: chart.chart, repositoryOpts: { repo: chart.repository } };

const exactVersion = /^v?\d+\.\d+\.\d+(-[\w.]+)?$/;

export function installChart(name: string, chart: HelmChart, context: AddonContext): k8s.helm.v3.Release {
    if (!exactVersion.test(chart.version)) {
        throw new Error(`Helm chart ${chart.chart} must be pinned to an exact version, got "${chart.version}"`);
    }
    return new k8s.helm.v3.Release(
        name,
        {
            name: chart.releaseName,
            ...chartSource(chart),
            version: chart.version,
            namespace: chart.namespace,
            createNamespace: true,
            values: chart.values,
            atomic: true,
            cleanupOnFail: true,
            timeout: chart.timeoutSeconds ?? 600,
            skipCrds: chart.skipCrds,
        },
        { provider: context.provider, dependsOn: context.dependsOn },
    );
}
