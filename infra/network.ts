// The VPC: public subnets for internet-facing load balancers, private subnets for nodes and internal
// load balancers, across several availability zones.
import * as awsx from "@pulumi/awsx";
import * as pulumi from "@pulumi/pulumi";
import { NetworkConfig } from "./config";

export interface Network {
    vpcId: pulumi.Output<string>;
    privateSubnetIds: pulumi.Output<string[]>;
    publicSubnetIds: pulumi.Output<string[]>;
}

export function createNetwork(name: string, config: NetworkConfig, tags: Record<string, string>): Network {
    const vpc = new awsx.ec2.Vpc(name, {
        cidrBlock: config.vpcCidr,
        numberOfAvailabilityZones: config.availabilityZoneCount,
        natGateways: { strategy: config.natGatewayStrategy },
        enableDnsHostnames: true,
        enableDnsSupport: true,
        subnetStrategy: "Auto",
        subnetSpecs: [
            // The AWS Load Balancer Controller finds its subnets by these role tags.
            { type: awsx.ec2.SubnetType.Public, tags: { ...tags, "kubernetes.io/role/elb": "1" } },
            { type: awsx.ec2.SubnetType.Private, tags: { ...tags, "kubernetes.io/role/internal-elb": "1" } },
        ],
        tags: { ...tags, Name: name },
    });
    return { vpcId: vpc.vpcId, privateSubnetIds: vpc.privateSubnetIds, publicSubnetIds: vpc.publicSubnetIds };
}
