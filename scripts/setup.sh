#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs lora_jax with the given extras. Idempotent: re-running is cheap.
# Usage: bash scripts/setup.sh [extras]      e.g. bash scripts/setup.sh parity,test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
# torch is pinned to 2.13.0 in the [parity] extra: the CPU build (an unpinned torch pulls a multi-GB CUDA build).
.venv/bin/python -m pip install -q -e "$spec"
