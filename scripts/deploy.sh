#!/usr/bin/env bash
# Deploys a whisper-eks stack from a fresh clone: checks the prerequisites, installs the npm dependencies,
# logs in to a Pulumi state backend (a local directory unless PULUMI_BACKEND_URL says otherwise), selects or
# creates the stack and runs `pulumi up`. Usage: scripts/deploy.sh <stack> [pulumi up options, e.g. --yes]
set -euo pipefail

repo_root="$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)"
cd "$repo_root"

stacks=()
for file in Pulumi.*.yaml; do
    [[ -e "$file" ]] || continue
    name="${file#Pulumi.}"
    stacks+=("${name%.yaml}")
done

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: scripts/deploy.sh <stack> [pulumi up options]; stacks: ${stacks[*]}" >&2
    exit 2
fi
stack="$1"
shift
stack_file="Pulumi.${stack}.yaml"
if [[ ! -f "$stack_file" ]]; then
    echo "deploy: no stack \"${stack}\": ${stack_file} does not exist; stacks: ${stacks[*]}" >&2
    exit 2
fi

# A stack that names a prebuilt image (whisper-eks:imageReference) builds nothing and needs no Docker. A stack whose
# GPU nodes may be spot (spot in whisper-eks:gpuCapacityTypes, as a block or a flow list) needs the Spot role.
needs_docker=true
uses_spot=false
in_capacity_types=false
while IFS= read -r line; do
    if [[ "$line" =~ ^[[:space:]]*whisper-eks:imageReference:[[:space:]]*[\"\']?([^\"\'[:space:]#]+) ]]; then
        needs_docker=false
    fi
    if [[ "$line" =~ ^[[:space:]]*whisper-eks:gpuCapacityTypes:(.*)$ ]]; then
        in_capacity_types=true
        [[ "${BASH_REMATCH[1]}" =~ [\[,[:space:]\"\']spot[\],[:space:]\"\'] ]] && uses_spot=true
    elif [[ "$in_capacity_types" == true && "$line" =~ ^[[:space:]]+-[[:space:]]*[\"\']?spot[\"\']?[[:space:]]*(#.*)?$ ]]; then
        uses_spot=true
    elif [[ ! "$line" =~ ^[[:space:]]+- ]]; then
        in_capacity_types=false
    fi
done <"$stack_file"

problems=()
if ! command -v pulumi >/dev/null 2>&1; then
    problems+=("the Pulumi CLI is not installed: curl -fsSL https://get.pulumi.com | sh (https://www.pulumi.com/docs/install/)")
fi
if ! command -v npm >/dev/null 2>&1; then
    problems+=("Node.js 22+ with npm is not installed: https://nodejs.org/en/download")
fi
aws_install="https://docs.aws.amazon.com/cli/latest/userguide/getting-started-install.html"
if ! command -v aws >/dev/null 2>&1; then
    problems+=("the aws CLI v2 is not installed; the cluster's kubeconfig runs 'aws eks get-token', so every machine that runs pulumi up needs it: ${aws_install}")
else
    # v1 prints its version on stderr, v2 on stdout: "aws-cli/2.27.50 Python/3.13.4 ...".
    aws_version="$(aws --version 2>&1 || true)"
    if [[ "$aws_version" =~ aws-cli/([0-9]+)\.[0-9.]+ ]]; then
        if ((BASH_REMATCH[1] < 2)); then
            problems+=("the aws CLI is version ${BASH_REMATCH[1]} (${BASH_REMATCH[0]}); the cluster's kubeconfig needs v2 ('aws eks get-token'): install v2 and put it first on PATH: ${aws_install}")
        fi
    else
        problems+=("could not tell the aws CLI's version ('aws --version' said: ${aws_version//$'\n'/ }); install the aws CLI v2: ${aws_install}")
    fi
    if ! identity_error="$(aws sts get-caller-identity --output text 2>&1 >/dev/null)"; then
        problems+=("no valid AWS credentials ('aws sts get-caller-identity' failed: ${identity_error//$'\n'/ }); run 'aws configure', 'aws sso login' or set AWS_PROFILE")
    elif [[ "$uses_spot" == true ]]; then
        # An account that never used Spot lacks this role: Karpenter then finds spot unavailable, and the stack runs on-demand.
        if ! role_error="$(aws iam get-role --role-name AWSServiceRoleForEC2Spot --output text 2>&1 >/dev/null)"; then
            if [[ "$role_error" == *NoSuchEntity* ]]; then
                problems+=("stack \"${stack}\" may run GPU nodes on spot (whisper-eks:gpuCapacityTypes), but this account has no EC2 Spot service-linked role: Karpenter would find spot unavailable and run every node on-demand; create it once per account: aws iam create-service-linked-role --aws-service-name spot.amazonaws.com")
            else
                echo "deploy: could not check for the EC2 Spot service-linked role ('aws iam get-role --role-name AWSServiceRoleForEC2Spot' failed: ${role_error//$'\n'/ }); without it spot nodes cannot launch" >&2
            fi
        fi
    fi
fi
if [[ "$needs_docker" == true ]]; then
    if ! command -v docker >/dev/null 2>&1; then
        problems+=("Docker is not installed; it builds the server image from ./service (or set whisper-eks:imageReference to a prebuilt image): https://docs.docker.com/engine/install/")
    elif ! docker info >/dev/null 2>&1; then
        problems+=("the Docker engine is not running ('docker info' failed); start Docker Desktop or 'sudo systemctl start docker'")
    fi
fi
# A local state backend encrypts the stack's secrets with a passphrase: without one, and no terminal to ask on,
# pulumi would fail after npm ci; say so now, with the rest.
backend="${PULUMI_BACKEND_URL:-file://${HOME}/.pulumi-local}"
ask_passphrase=false
if [[ "$backend" == file://* && -z "${PULUMI_CONFIG_PASSPHRASE+set}" && -z "${PULUMI_CONFIG_PASSPHRASE_FILE:-}" ]]; then
    if [[ -t 0 ]]; then
        ask_passphrase=true
    else
        problems+=("a local state backend encrypts secrets with a passphrase: set PULUMI_CONFIG_PASSPHRASE (or PULUMI_CONFIG_PASSPHRASE_FILE), and keep it: the stack cannot be updated or destroyed without it")
    fi
fi
if [[ ${#problems[@]} -gt 0 ]]; then
    echo "deploy: cannot deploy stack \"${stack}\" yet:" >&2
    for problem in "${problems[@]}"; do
        echo "  - ${problem}" >&2
    done
    exit 1
fi

echo "deploy: installing npm dependencies (npm ci)"
npm ci --no-audit --no-fund

if [[ "$backend" == file://* ]]; then
    mkdir -p "${backend#file://}"
fi
if [[ "$ask_passphrase" == true ]]; then
    echo "deploy: Pulumi will ask for a passphrase that encrypts this stack's secrets; keep it (or set PULUMI_CONFIG_PASSPHRASE next time)"
fi
echo "deploy: state backend ${backend}"
pulumi login "$backend"
pulumi stack select --create "$stack"
pulumi up --stack "$stack" "$@"

echo "deploy: done. Kubeconfig: pulumi stack output kubeconfig --show-secrets --stack ${stack} > kubeconfig.json"
