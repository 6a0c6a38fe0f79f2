// The AWS Load Balancer Controller: it turns the workload's `type: LoadBalancer` Service into an NLB with
// IP targets, a deliberate idle timeout and health check (a plain Service would get a Classic ELB, 60 s idle).
import * as fs from "fs";
import * as path from "path";
import * as k8s from "@pulumi/kubernetes";
import * as pulumi from "@pulumi/pulumi";
import { AddonContext, installChart } from "./helm";
import { podIdentityForServiceAccount } from "./pod-identity";

export const loadBalancerControllerChart = {
    chart: "aws-load-balancer-controller",
    // Controller v3.5.0 (NLB listener attributes, the TCP idle timeout, need v2.10 or later). Its IAM policy is the one
    // of v2.13 unchanged, and every value set below is still the chart's.
    version: "3.5.0",
    repository: "https://aws.github.io/eks-charts",
    // "v2.5.0+ requires Kubernetes 1.22+" (docs/deploy/installation.md, "Supported Kubernetes versions", at v3.5.0).
    kubernetes: { min: "1.22" },
};
const serviceAccount = "aws-load-balancer-controller";

/** The controller's IAM policy as published for v2.13 to v3.5 (docs/install/iam_policy.json), vendored: nothing is fetched at run time. */
export const loadBalancerControllerPolicy = fs.readFileSync(path.join(__dirname, "policies", "aws-load-balancer-controller.json"), "utf8");

export interface LoadBalancerControllerArgs {
    clusterName: pulumi.Input<string>;
    region: string;
    vpcId: pulumi.Input<string>;
    tags: Record<string, string>;
}

export function installLoadBalancerController(name: string, args: LoadBalancerControllerArgs, context: AddonContext): k8s.helm.v3.Release {
    const { association } = podIdentityForServiceAccount(`${name}-aws-lb-controller`, {
        clusterName: args.clusterName,
        namespace: "kube-system",
        serviceAccount,
        inlinePolicy: loadBalancerControllerPolicy,
        tags: args.tags,
    });
    return installChart(
        "aws-load-balancer-controller",
        {
            releaseName: "aws-load-balancer-controller",
            ...loadBalancerControllerChart,
            namespace: "kube-system",
            values: {
                clusterName: args.clusterName,
                region: args.region,
                vpcId: args.vpcId,
                serviceAccount: { create: true, name: serviceAccount },
                // Its webhooks admit every Service and pod: two replicas, kept apart by a PDB through node drains.
                replicaCount: 2,
                podDisruptionBudget: { maxUnavailable: 1 },
                nodeSelector: context.nodeSelector,
                // Its Service webhook (failurePolicy Fail) would be live before its pods are ready and reject the Services
                // of charts installed beside it; our Service names its load balancer class itself, so it needs no mutator.
                enableServiceMutatorWebhook: false,
                // Its pod webhook injects the readiness gate, only in namespaces labelled for it (the workload's). Fail, not
                // the chart's Ignore (v2.11+): a pod created while the controller is down would lack the gate, and a
                // rollout could take the old pods while it is not yet a healthy target; the controller could not have
                // registered it anyway.
                podMutatorWebhookConfig: { failurePolicy: "Fail" },
            },
        },
        { ...context, dependsOn: [...context.dependsOn, association] },
    );
}
