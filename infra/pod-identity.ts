// AWS credentials for pods through EKS Pod Identity: an IAM role that the Pod Identity agent hands to a
// service account's pods. Controllers and CSI drivers get their AWS permissions this way, never from the node.
import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";

/** An IAM role that pods assume through EKS Pod Identity, with the given managed and inline policies. */
export function podIdentityRole(
    name: string,
    policies: { managedPolicyArns?: string[]; inlinePolicy?: pulumi.Input<string> },
    tags: Record<string, string>,
): aws.iam.Role {
    const role = new aws.iam.Role(name, {
        assumeRolePolicy: JSON.stringify({
            Version: "2012-10-17",
            Statement: [
                {
                    Effect: "Allow",
                    Principal: { Service: "pods.eks.amazonaws.com" },
                    Action: ["sts:AssumeRole", "sts:TagSession"],
                },
            ],
        }),
        tags,
    });
    (policies.managedPolicyArns ?? []).forEach(
        (policyArn, index) => new aws.iam.RolePolicyAttachment(`${name}-${index}`, { role: role.name, policyArn }, { parent: role }),
    );
    if (policies.inlinePolicy !== undefined) {
        new aws.iam.RolePolicy(`${name}-inline`, { role: role.id, policy: policies.inlinePolicy }, { parent: role });
    }
    return role;
}

/**
 * Binds a Kubernetes service account to a new IAM role through EKS Pod Identity (for controllers installed by
 * Helm: the Pod Identity agent add-on hands the role's credentials to the service account's pods).
 */
export function podIdentityForServiceAccount(
    name: string,
    args: {
        clusterName: pulumi.Input<string>;
        namespace: string;
        serviceAccount: string;
        managedPolicyArns?: string[];
        inlinePolicy?: pulumi.Input<string>;
        tags: Record<string, string>;
    },
    opts?: pulumi.CustomResourceOptions,
): { role: aws.iam.Role; association: aws.eks.PodIdentityAssociation } {
    const role = podIdentityRole(name, args, args.tags);
    const association = new aws.eks.PodIdentityAssociation(
        name,
        { clusterName: args.clusterName, namespace: args.namespace, serviceAccount: args.serviceAccount, roleArn: role.arn, tags: args.tags },
        opts,
    );
    return { role, association };
}
