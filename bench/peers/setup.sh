#!/usr/bin/env bash
# Bench-only peer environment: llm-compressor, gguf and auto-round in their own venv, never in qtool's
# dependencies (they pin other transformers / compressed-tensors versions than qtool's dev extra).
#
#   bash bench/peers/setup.sh          # creates or completes bench/_work/peers-venv (idempotent)
#   bench/_work/peers-venv/bin/python -c "import llmcompressor, gguf, auto_round"
#
# torch stays the CPU build 2.13.0 (the repo's constraints.txt); a bare torch would pull GBs of CUDA wheels.
# Re-running is cheap: pip finds every pin satisfied and installs nothing; a missing or broken venv is rebuilt.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${PEERS_VENV:-$repo/bench/_work/peers-venv}"
python="${PYTHON:-python3}"

if ! "$venv/bin/python" -c "import sys" 2>/dev/null; then
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -c "$repo/constraints.txt" -r "$here/requirements.txt"
"$venv/bin/python" - <<'PY'
from importlib.metadata import version
import torch
assert torch.__version__.startswith("2.13.0") and not torch.version.cuda, f"expected CPU torch 2.13.0, got {torch.__version__}"
print("peers venv:", ", ".join(f"{p} {version(p)}" for p in
      ("torch", "transformers", "compressed-tensors", "llmcompressor", "auto-round", "gguf")))
PY
