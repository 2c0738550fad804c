#!/usr/bin/env bash
# Sets everything up from scratch (venv, lora_jax with the parity stack) and runs the default test-suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `bash scripts/test.sh tests/models`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh parity,test
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
