// The VPC: public subnets for internet-facing load balancers, private subnets for nodes and internal
// load balancers, across several availability zones.
import * as awsx from "@pulumi/awsx";
import * as pulumi from "@pulumi/pulumi";
import { NetworkConfig } from "./config";
import { karpenterDiscoveryTagKey } from "./conventions";

export interface Network {
    vpcId: pulumi.Output<string>;
    privateSubnetIds: pulumi.Output<string[]>;
    publicSubnetIds: pulumi.Output<string[]>;
}

/** `name` is the cluster's: Karpenter launches nodes in the private subnets tagged with it. */
export function createNetwork(name: string, config: NetworkConfig, tags: Record<string, string>): Network {
    const vpc = new awsx.ec2.Vpc(name, {
        cidrBlock: config.vpcCidr,
        numberOfAvailabilityZones: config.availabilityZoneCount,
        natGateways: { strategy: config.natGatewayStrategy },
        enableDnsHostnames: true,
        enableDnsSupport: true,
        subnetStrategy: "Auto",
        subnetSpecs: [
            // The AWS Load Balancer Controller finds its subnets by these role tags, Karpenter by the discovery tag.
            { type: awsx.ec2.SubnetType.Public, tags: { ...tags, "kubernetes.io/role/elb": "1" } },
            { type: awsx.ec2.SubnetType.Private, tags: { ...tags, "kubernetes.io/role/internal-elb": "1", [karpenterDiscoveryTagKey]: name } },
        ],
        tags: { ...tags, Name: name },
    });
    return { vpcId: vpc.vpcId, privateSubnetIds: vpc.privateSubnetIds, publicSubnetIds: vpc.publicSubnetIds };
}
