#!/usr/bin/env bash
# Set up .venv if needed, then run the tests (default: the fast CPU suite; pass pytest arguments,
# e.g. `-m slow`, to choose others).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup.sh")"
cd "$root"
# Two worker processes (CI has 2 cores: 10 min instead of 13.5 on one), each test file wholly in
# one worker so a module's fixtures (the serving tests' server) start once. RTPJAX_TEST_WORKERS=0
# runs everything in this process (pdb, -s); a -n given on the command line wins.
exec "$py" -m pytest -n "${RTPJAX_TEST_WORKERS:-2}" --dist loadfile "$@"
