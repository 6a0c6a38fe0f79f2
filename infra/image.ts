// The server image: built from ./service for linux/amd64, pushed to a private ECR repository, and handed
// to the workload by digest so that a rollout always runs exactly what was built. A prebuilt image pinned
// by digest (from CI, or an air-gapped registry) skips the build; the repository stays either way, so that
// switching a stack between the two never deletes the images a rollback needs.
import * as aws from "@pulumi/aws";
import * as dockerBuild from "@pulumi/docker-build";
import * as pulumi from "@pulumi/pulumi";
import { ImageConfig } from "./config";

export const imageBuildContext = "./service";
export const imagePlatform = dockerBuild.Platform.Linux_amd64;
/** Untagged images (earlier builds) kept for rollbacks; older ones expire. */
export const untaggedImagesKept = 10;

export interface ServiceImage {
    /** `registry/repository@sha256:...` */
    reference: pulumi.Output<string>;
    repository: aws.ecr.Repository;
}

export function createServiceImage(name: string, config: ImageConfig, tags: Record<string, string>): ServiceImage {
    const repository = new aws.ecr.Repository(name, {
        imageScanningConfiguration: { scanOnPush: true },
        imageTagMutability: "MUTABLE",
        encryptionConfigurations: [{ encryptionType: "AES256" }],
        forceDelete: config.repositoryForceDelete,
        tags,
    });
    new aws.ecr.LifecyclePolicy(
        name,
        {
            repository: repository.name,
            policy: JSON.stringify({
                rules: [
                    {
                        rulePriority: 1,
                        description: `keep the ${untaggedImagesKept} most recent untagged images`,
                        selection: { tagStatus: "untagged", countType: "imageCountMoreThan", countNumber: untaggedImagesKept },
                        action: { type: "expire" },
                    },
                ],
            }),
        },
        { parent: repository },
    );
    if (config.prebuiltReference !== undefined) {
        return { reference: pulumi.output(config.prebuiltReference), repository };
    }
    const registry = repository.repositoryUrl.apply((url) => url.split("/")[0]);
    const credentials = aws.ecr.getAuthorizationTokenOutput({ registryId: repository.registryId });
    const image = new dockerBuild.Image(
        name,
        {
            context: { location: imageBuildContext },
            dockerfile: { location: `${imageBuildContext}/Dockerfile` },
            platforms: [imagePlatform],
            push: true,
            // Previews (one per stack on every pull request) would each build the CUDA image; a changed build
            // context still shows as an image update, and the pull-request workflow builds the image once.
            buildOnPreview: false,
            tags: [pulumi.interpolate`${repository.repositoryUrl}:latest`],
            registries: [{ address: registry, username: credentials.userName, password: credentials.password }],
            // The CUDA layers are large: reuse them from the registry between builds and machines.
            cacheFrom: [{ registry: { ref: pulumi.interpolate`${repository.repositoryUrl}:buildcache` } }],
            cacheTo: [
                {
                    registry: {
                        ref: pulumi.interpolate`${repository.repositoryUrl}:buildcache`,
                        imageManifest: true,
                        ociMediaTypes: true,
                        mode: dockerBuild.CacheMode.Max,
                    },
                },
            ],
        },
        { parent: repository },
    );
    return { reference: pulumi.interpolate`${repository.repositoryUrl}@${image.digest}`, repository };
}
