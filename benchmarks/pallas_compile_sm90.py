"""The Pallas 4-bit kernel compiled for an H100/H200 (sm_90) on this machine, no GPU needed: resources per policy.

Two sets, each jitted `qmatmul_pallas` lowered for CUDA, its Triton IR compiled by the ``triton`` package for sm_90
and the cubin's report read (`lora_jax.kernels.qmatmul.triton_compile`): shared memory, registers per thread, spill
bytes.
  * defaults: `default_blocks(M, fmt)` for the shapes and formats of benchmarks/int4_matmul.py's GPU mode (bf16
    activations; M in {1, 16, 64}; (K, N) in {(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)}; nf4
    double-quantized and int4_sym, group 64);
  * swept: every policy the GPU policy sweep timed (benchmarks/results/int4_matmul_gpu.json), at its shape, M and
    format, next to its measured time: which fast policies spill or crowd the register file.
This says which policies fit the hardware (as this triton version compiles them; XLA's own Triton may differ), not
how fast they are (that needs the GPU run of int4_matmul.py).

Usage: python benchmarks/pallas_compile_sm90.py [--sweep PATH] [--out PATH]   (needs the test extra's triton package)
Writes benchmarks/results/pallas_compile_sm90.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from int4_matmul import GPU_SHAPES, err_text, save  # noqa: E402

from lora_jax.kernels import BlockSizes, default_blocks, qmatmul_pallas  # noqa: E402
from lora_jax.kernels.qmatmul import triton_compile as tc  # noqa: E402
from lora_jax.quant import quantize  # noqa: E402

MS, FORMATS = (1, 16, 64), ("nf4", "int4_sym")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def abstract_weight(fmt, k, n, block=64):
  """The QTensor's shapes and dtypes (`quantize` under `jax.eval_shape`): lowering needs no values."""
  return jax.eval_shape(lambda w: quantize(w, fmt, block_size=block, double_quant=fmt == "nf4"),
                        jax.ShapeDtypeStruct((k, n), jnp.float32))


def compile_row(row, blocks, m, k, n, fmt):
  try:
    (kernel,) = tc.triton_kernels(lambda x, w: qmatmul_pallas(x, w, blocks=blocks),
                                  jax.ShapeDtypeStruct((m, k), jnp.bfloat16), abstract_weight(fmt, k, n))
    row.update(tc.compile_sm90(kernel))
    row["fits"] = row["shared_bytes"] <= tc.SM90_SHARED_BYTES and row["spill_bytes"] == 0
  except Exception as e:
    row["error"] = err_text(e)
  return row


def describe(row):
  if "error" in row:
    return f"ERROR {row['error'][:80]}"
  return (f"{row['shared_bytes'] / 1024:8.1f} {row['registers']:4d} {row['spill_bytes']:7d}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sweep", default=os.path.join(RESULTS, "int4_matmul_gpu.json"), help="GPU results with a sweep")
  ap.add_argument("--out", default=os.path.join(RESULTS, "pallas_compile_sm90.json"))
  args = ap.parse_args()
  import triton
  result = {"benchmark": "pallas_compile_sm90", "jax": jax.__version__, "triton": triton.__version__,
            "target": "cuda sm_90 (H100 / H200)", "limits": {"shared_bytes": tc.SM90_SHARED_BYTES,
                                                             "registers": tc.SM90_REGISTERS}, "rows": [], "swept": []}
  t0 = time.perf_counter()
  print(f"defaults\n{'M':>5} {'K':>5} {'N':>5} {'fmt':8s} {'policy':40s} {'smem KiB':>8} {'regs':>4} {'spill B':>7}")
  for k, n in GPU_SHAPES["all"]:
    for fmt in FORMATS:
      for m in MS:
        d = default_blocks(m, fmt).for_shape(m, n, k, 64)
        row = compile_row({"M": m, "K": k, "N": n, "fmt": fmt, "blocks": dataclasses.asdict(d)}, d, m, k, n, fmt)
        result["rows"].append(row)
        tag = f"{d.dot} {d.lookup} {d.bm}x{d.bn} bk={d.bk} sk={d.split_k} w={d.num_warps} s={d.num_stages}"
        print(f"{m:5d} {k:5d} {n:5d} {fmt:8s} {tag:40s} {describe(row)}", flush=True)
  if os.path.exists(args.sweep):
    with open(args.sweep) as f:
      sweep = json.load(f).get("sweep", [])
    print(f"\nswept policies ({args.sweep}), fastest first per class\n{'fmt':8s} {'M':>3} {'K':>5} {'N':>5} "
          f"{'us':>6} {'policy':52s} {'smem KiB':>8} {'regs':>4} {'spill B':>7}")
    for entry in sweep:
      for t in sorted((t for t in entry["timed"] if "time_s" in t), key=lambda t: (t["K"], t["time_s"])):
        # the sweep's runs recorded the default as dot=None, which then meant "fma" for one row, else "mma"
        policy = {**t["policy"], "dot": t["policy"]["dot"] or ("fma" if entry["M"] == 1 else "mma")}
        blocks = BlockSizes(**policy)
        row = compile_row({"fmt": entry["fmt"], "M": entry["M"], "K": t["K"], "N": t["N"], "policy": policy,
                           "gpu_time_s": t["time_s"]}, blocks, entry["M"], t["K"], t["N"], entry["fmt"])
        result["swept"].append(row)
        p = policy
        tag = (f"{p['dot']} {p['lookup']} bn={p['bn']} bk={p['bk']} w={p['num_warps']} s={p['num_stages']} "
               f"mp={p['min_programs']}")
        print(f"{entry['fmt']:8s} {entry['M']:3d} {t['K']:5d} {t['N']:5d} {t['time_s'] * 1e6:6.1f} {tag:52s} "
              f"{describe(row)}", flush=True)
  rows, swept = result["rows"], result["swept"]
  result["summary"] = {
      "defaults": len(rows), "default_errors": sum("error" in r for r in rows),
      "defaults_fit": all(r.get("fits") for r in rows),
      "default_max_registers": max((r["registers"] for r in rows if "registers" in r), default=None),
      "default_max_shared_kib": max((r["shared_bytes"] / 1024 for r in rows if "shared_bytes" in r), default=None),
      "swept": len(swept), "swept_errors": sum("error" in r for r in swept),
      "swept_that_spill": sum(bool(r.get("spill_bytes")) for r in swept),
      "seconds": round(time.perf_counter() - t0, 1)}
  print(f"\n{result['summary']}")
  save(result, args.out)


if __name__ == "__main__":
  main()
