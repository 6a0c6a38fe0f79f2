#!/usr/bin/env bash
# Creates or reuses a project-local virtualenv with pinned requirements; see scripts/python_env.py.
# Usage: scripts/python-env.sh VENV_DIR REQUIREMENTS_FILE... [-- MORE_PIP_INSTALL_ARGS...]
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/python_env.py" "$@"
