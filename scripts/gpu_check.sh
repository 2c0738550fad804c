#!/usr/bin/env bash
# Everything a lent GPU should run, as one command (a device session has ~15 minutes in all): the GPU tests
# (tests/kernels/test_qmatmul_gpu.py: the Pallas kernel's values, tilings and variants, the K-major layout's kernel,
# fused LoRA, gradients, a QLoRA step), then benchmarks/int4_matmul.py: where the one-row time goes (--floor: wall
# and device time per op from a profiler trace, the K-major kernel's among them), the policy sweep (its last class:
# the K-major kernel), the main table with the sweep's winners (int4 rows also time the K-major kernel; M <= 16
# Pallas rows profiled too: --profile), and fused vs split LoRA. Uses the machine's own python3 and packages (no
# install); writes gpu_check.log, gpu_tests.xml and int4_matmul_gpu.json under $OUT (default benchmarks/results).
# Budgets (tests 200 s: 106 tests, run 4's 104 took 181 s; floor 80 s, sweep 90 s, main table 90 s, fused LoRA
# 10 s; each stops starting new work when spent) keep the command within about 9 minutes, inside the device's
# 10-minute limit per command (H200 run 4 took 6.6 minutes with a main-table budget of 80 s; a session has 15
# minutes of device time, so one such run and a short second one). The floor comes first: what the next run most
# needs (after run 4: which K-major variants close the gap from 64% to the streaming kernel's 89% of copy).
# Usage (device tool): bash scripts/gpu_check.sh        [BUDGET_S=90: seconds for the main table]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" 2>&1 | tee "$log"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv 2>&1 | tee -a "$log" || true
timeout 200 python3 -m pytest -v -m gpu -p no:cacheprovider --junitxml "$out/gpu_tests.xml" \
  tests/kernels/test_qmatmul_gpu.py 2>&1 | tee -a "$log"
tests_rc=${PIPESTATUS[0]}
python3 benchmarks/int4_matmul.py --mode gpu --floor --floor-budget-s 80 --profile --policy-sweep --sweep-budget-s 90 \
  --budget-s "${BUDGET_S:-90}" --lora-budget-s 10 --out "$out/int4_matmul_gpu.json" 2>&1 | tee -a "$log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc, benchmark rc=$bench_rc" | tee -a "$log"
exit $(( tests_rc || bench_rc ))
