#!/usr/bin/env bash
# Set up .venv if needed, then run the main job: the OpenAI-compatible server on the embedded default
# model (arguments pass through to scripts/serve.py, e.g. --port 8001 or --model DIR).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup.sh")"
cd "$root"
exec "$py" scripts/serve.py "$@"
