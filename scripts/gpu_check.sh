#!/usr/bin/env bash
# Everything a lent GPU should run, as one command (a device session has ~15 minutes in all): the GPU tests
# (tests/kernels/test_qmatmul_gpu.py: the Pallas kernel's values, tilings, fused LoRA, gradients, a QLoRA step),
# then the kernel benchmark with its block sweep. Uses the machine's own python3 and packages (no install);
# writes gpu_check.log, gpu_tests.xml and int4_matmul_gpu.json under $OUT (default benchmarks/results). The budgets
# (tests 120 s, main table 180 s, fused LoRA and sweep 70 s each; each stops starting new work when spent) keep
# the command near 8 minutes, inside the device's 10-minute limit per command.
# Usage (device tool): bash scripts/gpu_check.sh        [BUDGET_S=180: seconds for the main table]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" 2>&1 | tee "$log"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml "$out/gpu_tests.xml" \
  tests/kernels/test_qmatmul_gpu.py 2>&1 | tee -a "$log"
tests_rc=${PIPESTATUS[0]}
python3 benchmarks/int4_matmul.py --mode gpu --block-sweep --budget-s "${BUDGET_S:-180}" --sweep-budget-s 70 --out "$out/int4_matmul_gpu.json" 2>&1 \
  | tee -a "$log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc, benchmark rc=$bench_rc" | tee -a "$log"
exit $(( tests_rc || bench_rc ))
