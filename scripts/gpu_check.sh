#!/usr/bin/env bash
# Everything a lent GPU should run, as one command (a device session has ~15 minutes in all): the GPU tests
# (tests/kernels/test_qmatmul_gpu.py: the Pallas kernel's values, tilings and variants, the K-major layout's kernel,
# fused LoRA, gradients, a QLoRA step), then benchmarks/int4_matmul.py: the K-major kernel's device time over
# pipeline depth, step size, programs and tiles (--kmajor-grid), where the one-row time goes (--floor: wall and
# device time per op from a profiler trace), the policy sweep (wall time), the main table with the grid's and the
# sweep's winners (every row also times the K-major kernel; M <= 16 Pallas rows profiled too: --profile), fused
# vs split LoRA, and (DECODE_BUDGET_S > 0) end-to-end decoding of a random Llama with Llama-3-8B's layer shapes.
# Uses the machine's own python3 and packages (no install); writes gpu_check.log, gpu_tests.xml and
# int4_matmul_gpu.json under $OUT (default benchmarks/results).
# Each part has a budget in seconds (it stops starting new work when spent), set by the environment:
#   TESTS=1 (0 skips the GPU tests; run 6's 104 took over 200 s, so they now have 300), GRID_BUDGET_S=120,
#   FLOOR_BUDGET_S=0, SWEEP_BUDGET_S=0 (off since run 5: the grid answers the K-major questions in device time; the
#   floor's rows and the wall-time sweep stay available, ~60 s each), BUDGET_S=90 (main table: the four shapes of
#   runs 1-6 first, then the other five pairs of K, N in 4096, 8192, 14336 as the budget allows), LORA_BUDGET_S=10,
#   DECODE_BUDGET_S=0 (the decode: 5 variants, each compiled for two cache sizes; give it ~180 s in a second run);
#   a budget of 0 skips its part.
# The defaults keep the command near 8 minutes, inside the device's 10-minute limit per command (H200 run 6, with
# the grid at 130 s and the tests cut at 200 s: 6.4 minutes). A session has 15 minutes of device time: one such run
# and a short second one, e.g. the decode alone:
#   TESTS=0 GRID_BUDGET_S=0 BUDGET_S=0 LORA_BUDGET_S=0 DECODE_BUDGET_S=180 bash scripts/gpu_check.sh
# Usage (device tool): bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" 2>&1 | tee "$log"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv 2>&1 | tee -a "$log" || true
tests_rc=0
if [ "${TESTS:-1}" != 0 ]; then
  timeout 300 python3 -m pytest -v -m gpu -p no:cacheprovider --junitxml "$out/gpu_tests.xml" \
    tests/kernels/test_qmatmul_gpu.py 2>&1 | tee -a "$log"
  tests_rc=${PIPESTATUS[0]}
fi
part() {  # part FLAG BUDGET_FLAG SECONDS: the flags when SECONDS > 0
  if [ "$(python3 -c "print(float('$3') > 0)")" = True ]; then echo "$1 $2 $3"; fi
}
python3 benchmarks/int4_matmul.py --mode gpu --profile --shapes cross \
  $(part --kmajor-grid --grid-budget-s "${GRID_BUDGET_S:-120}") \
  $(part --floor --floor-budget-s "${FLOOR_BUDGET_S:-0}") \
  $(part --policy-sweep --sweep-budget-s "${SWEEP_BUDGET_S:-0}") \
  --budget-s "${BUDGET_S:-90}" --lora-budget-s "${LORA_BUDGET_S:-10}" --decode-budget-s "${DECODE_BUDGET_S:-0}" \
  --out "$out/int4_matmul_gpu.json" 2>&1 | tee -a "$log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc, benchmark rc=$bench_rc" | tee -a "$log"
exit $(( tests_rc || bench_rc ))
