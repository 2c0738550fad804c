#!/usr/bin/env bash
# The main job: sets everything up from scratch, fetches SmolLM2-135M-Instruct (cached after the first run)
# and fine-tunes it (see experiments/quickstart.yaml). Extra arguments go to `lora-jax train` (e.g. --overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lora-jax train experiments/quickstart.yaml --out runs/quickstart --show 5 "$@"
