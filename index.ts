// whisper-eks: a production Whisper speech-to-text service on EKS GPU nodes.
// This file is the architecture's table of contents: config in, components wired, outputs out.
import { loadConfig } from "./infra/config";

// 1. Config, validated before anything is declared.
const config = loadConfig();

// Outputs.
export const region = config.region;
export const clusterName = config.cluster.name;
