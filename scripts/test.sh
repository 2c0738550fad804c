#!/usr/bin/env bash
# Sets everything up from scratch (venv, lora_jax with the parity stack) and runs the default test-suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `bash scripts/test.sh tests/models`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh parity,test
export TOKENIZERS_PARALLELISM=false
# Two worker processes (pytest-xdist; LORA_JAX_TEST_WORKERS=0 runs in this process): most tests are compile-bound and
# single-threaded, so on a 2-core machine the suite takes ~24 minutes (one process: ~36 before the
# suite shared its compiles through tests/conftest.py's persistent compilation cache).
exec .venv/bin/python -m pytest -n "${LORA_JAX_TEST_WORKERS:-2}" --dist worksteal "$@"
