"""The Pallas 4-bit kernel compiled for an H100/H200 (sm_90) on this machine, no GPU needed: resources per tile.

For the shapes and formats of benchmarks/int4_matmul.py's GPU mode (bf16 activations; M in {1, 64, 4096}, M = 1
standing for every M <= 16; (K, N) in {(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)}; nf4 and
int4_sym, group 64) and for each tiling (bm, bn, bk, split_k) of its block sweep, the jitted `qmatmul_pallas` is lowered for CUDA, its Triton IR compiled by the
``triton`` package for sm_90 and the cubin's report read (`lora_jax.kernels.qmatmul.triton_compile`): shared memory,
registers per thread, spill bytes. "*" / "default" marks the tiling `BlockSizes().for_shape` picks. This says which tiles
fit the hardware, not how fast they are (that needs the GPU run of int4_matmul.py).

Usage: python benchmarks/pallas_compile_sm90.py [--out PATH]   (needs the test extra's triton package)
Writes benchmarks/results/pallas_compile_sm90.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from int4_matmul import GPU_SHAPES, Tiles, err_text, save, sweep_configs  # noqa: E402

from lora_jax.kernels import BlockSizes, qmatmul_pallas  # noqa: E402
from lora_jax.kernels.qmatmul import triton_compile as tc  # noqa: E402
from lora_jax.quant import quantize  # noqa: E402

MS, FORMATS = (1, 64, 4096), ("nf4", "int4_sym")  # every M <= 16 pads to M = 16, like M = 1
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def abstract_weight(fmt, k, n, block=64):
  """The QTensor's shapes and dtypes (`quantize` under `jax.eval_shape`): lowering needs no values."""
  return jax.eval_shape(lambda w: quantize(w, fmt, block_size=block), jax.ShapeDtypeStruct((k, n), jnp.float32))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(RESULTS, "pallas_compile_sm90.json"))
  args = ap.parse_args()
  import triton
  result = {"benchmark": "pallas_compile_sm90", "jax": jax.__version__, "triton": triton.__version__,
            "target": "cuda sm_90 (H100 / H200)", "limits": {"shared_bytes": tc.SM90_SHARED_BYTES,
                                                             "registers": tc.SM90_REGISTERS}, "rows": []}
  print(f"{'M':>5} {'K':>5} {'N':>5} {'fmt':8s} {'bm x bn bk sk':>14} {'warps':>5} {'stages':>6} {'smem KiB':>8} {'regs':>4} "
        f"{'spill B':>7}")
  t0 = time.perf_counter()
  for k, n in GPU_SHAPES["all"]:
    for fmt in FORMATS:
      w = abstract_weight(fmt, k, n)
      for m in MS:
        d = BlockSizes().for_shape(m, n, k, 64)
        default = (d.bm, d.bn, d.bk, d.split_k)
        tiles = [default] + [t for t in sweep_configs(m, False)
                             if t != default and n % t[1] == 0 and (k // 64) % (t[2] * t[3]) == 0]
        for bm, bn, bk, sk in tiles:
          blocks = Tiles(bm, bn, bk, sk)
          row = {"M": m, "K": k, "N": n, "fmt": fmt, "bm": bm, "bn": bn, "bk": bk, "split_k": sk,
                 "default": (bm, bn, bk, sk) == default}
          try:
            (kernel,) = tc.triton_kernels(lambda x, w: qmatmul_pallas(x, w, blocks=blocks),
                                          jax.ShapeDtypeStruct((m, k), jnp.bfloat16), w)
            row.update(tc.compile_sm90(kernel))
            row["fits"] = (row["shared_bytes"] <= tc.SM90_SHARED_BYTES and row["spill_bytes"] == 0)
            print(f"{m:5d} {k:5d} {n:5d} {fmt:8s} {bm:3d}x{bn:<3d} {bk:2d} {sk:2d}{'*' if row['default'] else ' ':1s} "
                  f"{row['num_warps']:5d} {row['num_stages']:6d} {row['shared_bytes'] / 1024:8.1f} "
                  f"{row['registers']:4d} {row['spill_bytes']:7d}", flush=True)
          except Exception as e:
            row["error"] = err_text(e)
            print(f"{m:5d} {k:5d} {n:5d} {fmt:8s} {bm:3d}x{bn:<3d} {bk:2d} {sk:2d} ERROR {row['error'][:80]}", flush=True)
          result["rows"].append(row)
  rows = result["rows"]
  result["summary"] = {
      "kernels": len(rows), "errors": sum("error" in r for r in rows),
      "defaults_fit": all(r.get("fits") for r in rows if r["default"]),
      "tilings_that_spill": sorted({(r["bm"], r["bn"], r["bk"], r["split_k"]) for r in rows if r.get("spill_bytes")}),
      "max_registers": max((r["registers"] for r in rows if "registers" in r), default=None),
      "max_shared_kib": max((r["shared_bytes"] / 1024 for r in rows if "shared_bytes" in r), default=None),
      "seconds": round(time.perf_counter() - t0, 1)}
  print(f"\n{result['summary']}")
  save(result, args.out)


if __name__ == "__main__":
  main()
