// EKS-managed add-ons (VPC CNI, kube-proxy, CoreDNS, Pod Identity agent, CSI drivers), declared one way:
// at the version EKS publishes as default for the cluster's Kubernetes version.
import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";

export interface EksAddonArgs {
    clusterName: pulumi.Input<string>;
    kubernetesVersion: string;
    /** The add-on's name in EKS, e.g. `coredns`. */
    addonName: string;
    /** A Pod Identity association for the add-on's service account. */
    podIdentity?: { serviceAccount: string; roleArn: pulumi.Input<string> };
    configurationValues?: Record<string, unknown>;
}

/**
 * An EKS-managed add-on, at the default version EKS publishes for the cluster's pinned Kubernetes version:
 * the version moves only when the Kubernetes version does (or AWS changes its default), never silently to latest.
 */
export function eksAddon(name: string, args: EksAddonArgs, opts?: pulumi.CustomResourceOptions): aws.eks.Addon {
    const version = aws.eks.getAddonVersionOutput({
        addonName: args.addonName,
        kubernetesVersion: args.kubernetesVersion,
        mostRecent: false,
    });
    return new aws.eks.Addon(
        name,
        {
            clusterName: args.clusterName,
            addonName: args.addonName,
            addonVersion: version.version,
            resolveConflictsOnCreate: "OVERWRITE",
            resolveConflictsOnUpdate: "OVERWRITE",
            podIdentityAssociations: args.podIdentity ? [args.podIdentity] : undefined,
            configurationValues: args.configurationValues ? JSON.stringify(args.configurationValues) : undefined,
        },
        opts,
    );
}
