#!/usr/bin/env bash
# Set up .venv if needed, then run the tests (default: the fast CPU suite; pass pytest arguments,
# e.g. `-m slow`, to choose others).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup.sh")"
cd "$root"
exec "$py" -m pytest "$@"
