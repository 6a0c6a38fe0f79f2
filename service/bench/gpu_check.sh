#!/bin/bash
# The GPU check in one command, for a fresh GPU machine that has torch and transformers but no registry (the device
# of ../shared/gpu/README.md): installs the wheels carried in .whl/, then runs service/bench/gpu_check.py, which
# writes the random-weight large-v3 checkpoint (/tmp/lv3, kept while the machine stays warm) and measures, within
# 8 minutes in all, each level bounded. Results (summary.json, summary.md, each level's log) go to $OUT, or to
# service/bench/gpu-check. Run from anywhere; extra arguments go to gpu_check.py (e.g. --device cpu for a dry run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
started=$(date +%s)
output=${OUT:-service/bench/gpu-check}
mkdir -p "$output"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    mkdir -p /tmp/site/bin
    printf '#!/bin/sh\nexec python3 -c "import sys; from whisper_server.cli import main; sys.exit(main())" "$@"\n' \
        > /tmp/site/bin/whisper-server
    chmod +x /tmp/site/bin/whisper-server
    export PYTHONPATH=/tmp/site:$PWD/service${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1
# The 8 minutes count from the start of this script, wheels included.
budget=$((480 - ($(date +%s) - started)))
exec python3 service/bench/gpu_check.py --output "$output" --budget-seconds "$budget" "$@"
