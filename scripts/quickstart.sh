#!/usr/bin/env bash
# The main job: sets everything up from scratch, fetches SmolLM2-135M-Instruct (cached after the first run)
# and runs it. Extra arguments go to `lora-jax generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lora-jax generate --model smollm2-135m --chat --max-new-tokens 64 \
  --prompt "In two sentences, what is low-rank adaptation (LoRA) of a language model?" "$@"
