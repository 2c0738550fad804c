"""The Pallas 4-bit kernel compiled for an H100/H200 (sm_90) on this machine, no GPU needed: resources and machine
instructions per policy.

Each jitted `qmatmul_pallas` is lowered for CUDA, its Triton IR compiled by the ``triton`` package for sm_90 and the
cubin read (`lora_jax.kernels.qmatmul.triton_compile`): shared memory, registers per thread, spill bytes, and the K
loop's machine instructions (SASS) per weight, by opcode ("i/w": thread-instructions per weight), with the issue
bound that implies on an H200 (132 SMs x 128 thread-instructions per clock x 1.98 GHz; no stalls counted).
  * defaults: `default_blocks(M, fmt)` for the shapes and formats of benchmarks/int4_matmul.py's GPU mode (bf16
    activations; M in {1, 16, 64}; (K, N) in {(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)}; nf4
    double-quantized and int4_sym, group 64; and both in the K-major layout, "nf4/kmajor", "int4_sym/kmajor");
  * variants: the default and its `convert` / `rescale` / `lookup` / `dot="words"` variants at M = 1 and 16 (words:
    M = 1 only), and both formats in the K-major layout (`kernels.pack_kmajor`; fmt "<fmt>/kmajor") under
    `KMAJOR` and at bn 256, and GGUF's q4_1 (blocks of 32) under `KMAJOR`, at (4096, 14336): how many
    instructions each weight costs (`BlockSizes` says what the variants do);
  * swept: every policy the GPU policy sweep timed (benchmarks/results/int4_matmul_gpu.json), at its shape, M and
    format, next to its measured time: which fast policies spill or crowd the register file, and how well the
    issue bound tracks the measured times, over all and per (format, M, dot) class ("swept_issue_fit").
This says which policies fit the hardware and what they cost in instructions (as this triton version compiles them;
XLA's own Triton may differ), not how fast they are (that needs the GPU run of int4_matmul.py).

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import save_json  # noqa: E402
from int4_matmul import GPU_SHAPES, KMAJOR_SUFFIX, default_for, err_text, layout_of  # noqa: E402

from lora_jax.kernels import KMAJOR, BlockSizes, default_blocks, pack_kmajor  # noqa: E402
from lora_jax.kernels.qmatmul import triton_compile as tc  # noqa: E402
from lora_jax.testing import random_qtensor  # noqa: E402

MS, FORMATS = (1, 16, 64), ("nf4", "int4_sym")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
H200_SMS, H200_CLOCK_HZ = 132, 1.98e9  # SMs, and the SM clock nvidia-smi reported in the H200 runs (gpu_check.log)
ISSUE_PER_SM_CLOCK = 4 * 32  # four warp schedulers, one warp instruction each per clock: 128 thread-instructions
VARIANTS = (("default", {}), ("magic", {"convert": "magic"}), ("partial", {"rescale": "partial"}),
            ("magic + partial", {"convert": "magic", "rescale": "partial"}),
            ("magic16 + partial", {"convert": "magic16", "rescale": "partial"}),
            ("gather + partial", {"lookup": "gather", "rescale": "partial"}),
            ("prmt + partial", {"lookup": "prmt", "rescale": "partial"}),
            ("words, bn 256", {"dot": "words", "bn": 256}), ("words, bn 128", {"dot": "words", "bn": 128}),
            ("K-major (KMAJOR)", {"kmajor": True}), ("K-major, bn 256", {"kmajor": True, "bn": 256}))


def abstract_weight(fmt, k, n, block=64):
  """The QTensor's shapes and dtypes (lowering needs no values); NF4 double-quantized, as `--quantize nf4` makes it;
  "<fmt>/kmajor": the K-major weight's."""
  base, kmajor = layout_of(fmt)
  w = jax.eval_shape(lambda: random_qtensor(base, k, n, block, double_quant=base == "nf4"))
  return jax.eval_shape(pack_kmajor, w) if kmajor else w


def compile_row(row, blocks, m, k, n, fmt, block=64):
  """Compiles `blocks` at (m, k, n, fmt) for sm_90 into `row` (`triton_compile.qmatmul_sm90`): resources, the K
  loop's instructions per weight by opcode, and the issue bound."""
  try:
    row.update(tc.qmatmul_sm90(m, abstract_weight(fmt, k, n, block), blocks))
    row["fits"] = row["shared_bytes"] <= tc.SM90_SHARED_BYTES and row["spill_bytes"] == 0
    del row["loop_ops"]  # kept per weight
    row["per_weight_ops"] = {op: round(c, 3) for op, c in row["per_weight_ops"].items()}
    row["issue_bound_s"] = issue_bound_s(row["per_weight"], k, n)
  except Exception as e:
    row["error"] = err_text(e)
  return row


def issue_bound_s(per_weight, k, n):
  """Seconds an H200 needs just to issue the K loop's instructions for a (k x n) weight: a lower bound on the
  kernel's time that ignores every stall (memory, dependencies, occupancy), the loop's prologue and epilogue."""
  return per_weight * k * n / (H200_SMS * ISSUE_PER_SM_CLOCK * H200_CLOCK_HZ)


def issue_fit(timed):
  """How well the issue bound tracks the measured times of `timed` (swept rows with both): over all of them, and per
  class of (format, M, dot) with at least 4 rows: Pearson r, and measured / bound (median, min). Within a class the
  kernel's structure is one, so a high r there says its instructions are what its time scales with."""
  import numpy as np

  def fit(rows):
    bound = np.array([r["issue_bound_s"] for r in rows])
    took = np.array([r["gpu_time_s"] for r in rows])
    r = np.corrcoef(bound, took)[0, 1] if bound.std() > 0 and took.std() > 0 else None  # None: no spread
    return {"n": len(rows), "pearson_r": None if r is None else round(float(r), 3),
            "measured_over_bound_median": round(float(np.median(took / bound)), 2),
            "measured_over_bound_min": round(float(np.min(took / bound)), 2)}

  classes = {}
  for r in timed:
    classes.setdefault(f"{r['fmt']} M={r['M']} {r['policy']['dot']}", []).append(r)
  return {**fit(timed), "by_class": {c: fit(rows) for c, rows in sorted(classes.items()) if len(rows) >= 4}}


def describe(row):
  if "error" in row:
    return f"ERROR {row['error'][:80]}"
  return (f"{row['shared_bytes'] / 1024:8.1f} {row['registers']:4d} {row['spill_bytes']:7d} "
          f"{row['per_weight']:6.2f} {row['issue_bound_s'] * 1e6:7.1f}")


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
  print(f"defaults\n{'M':>5} {'K':>5} {'N':>5} {'fmt':8s} {'policy':40s} {'smem KiB':>8} {'regs':>4} {'spill B':>7} {'i/w':>6} {'issue us':>7}")
  for k, n in GPU_SHAPES["all"]:
    for fmt in FORMATS + tuple(f + KMAJOR_SUFFIX for f in FORMATS):
      for m in MS:
        d = default_for(m, fmt).for_shape(m, n, k, 64)
        row = compile_row({"M": m, "K": k, "N": n, "fmt": fmt, "blocks": dataclasses.asdict(d)}, d, m, k, n, fmt)
        result["rows"].append(row)
        tag = f"{d.dot} {d.lookup} {d.bm}x{d.bn} bk={d.bk} sk={d.split_k} w={d.num_warps} s={d.num_stages}"
        print(f"{m:5d} {k:5d} {n:5d} {fmt:8s} {tag:40s} {describe(row)}", flush=True)
  print(f"\nvariants (M = 1 and 16, (K, N) = (4096, 14336)): instructions per weight in the K loop (i/w) and the "
        f"H200 issue bound\n{'M':>5} {'fmt':8s} {'variant':26s} {'smem KiB':>8} {'regs':>4} {'spill B':>7} {'i/w':>6} "
        f"{'issue us':>7}  top opcodes per weight")
  result["variants"] = []
  for fmt in FORMATS:
    for m in (1, 16):
      for name, change in VARIANTS:
        if fmt == "nf4" and ("convert" in change or "dot" in change):
          continue  # NF4 converts no integers (nor takes "words")
        if fmt != "nf4" and "lookup" in change:
          continue  # only NF4 has a table to gather from
        if change.get("dot") == "words" and m > 2:
          continue  # one multiply-add per weight and row: for one or two rows
        change = dict(change)
        wfmt = fmt + KMAJOR_SUFFIX if change.pop("kmajor", False) else fmt
        base = KMAJOR if wfmt != fmt else default_blocks(m, fmt)
        if base.dot == "fma" and change.get("rescale") == "partial":
          base = BlockSizes()  # partial scaling needs tensor-core dots: their default policy
        blocks = dataclasses.replace(base, **change)
        row = compile_row({"M": m, "K": 4096, "N": 14336, "fmt": wfmt, "variant": name,
                           "blocks": dataclasses.asdict(blocks)}, blocks, m, 4096, 14336, wfmt)
        result["variants"].append(row)
        top = " ".join(f"{op}:{c:.2f}" for op, c in list(row.get("per_weight_ops", {}).items())[:6])
        print(f"{m:5d} {fmt:8s} {name:26s} {describe(row)}  {top}", flush=True)
  for m in (1, 16):  # GGUF's Q4_1 as stored (blocks of 32, an offset: the kernel sums x per block itself)
    name = "K-major (KMAJOR), q4_1 block 32"
    row = compile_row({"M": m, "K": 4096, "N": 14336, "fmt": "q4_1" + KMAJOR_SUFFIX, "variant": name, "block": 32,
                       "blocks": dataclasses.asdict(KMAJOR)}, KMAJOR, m, 4096, 14336, "q4_1" + KMAJOR_SUFFIX, 32)
    result["variants"].append(row)
    top = " ".join(f"{op}:{c:.2f}" for op, c in list(row.get("per_weight_ops", {}).items())[:6])
    print(f"{m:5d} {'q4_1':8s} {name:26s} {describe(row)}  {top}", flush=True)
  if os.path.exists(args.sweep):
    with open(args.sweep) as f:
      sweep = json.load(f).get("sweep", [])
    print(f"\nswept policies ({args.sweep}), fastest first per class\n{'fmt':8s} {'M':>3} {'K':>5} {'N':>5} "
          f"{'us':>6} {'policy':52s} {'smem KiB':>8} {'regs':>4} {'spill B':>7} {'i/w':>6} {'issue us':>7}")
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
  timed = [r for r in swept if "issue_bound_s" in r]
  if len(timed) > 2:  # how much of the measured time instruction issue explains, over the policies the GPU timed
    result["swept_issue_fit"] = issue_fit(timed)
    print(f"\nmeasured time against the issue bound, over the swept policies: {result['swept_issue_fit']}")
  result["summary"] = {
      "defaults": len(rows), "default_errors": sum("error" in r for r in rows),
      "defaults_fit": all(r.get("fits") for r in rows),
      "default_max_registers": max((r["registers"] for r in rows if "registers" in r), default=None),
      "default_max_shared_kib": max((r["shared_bytes"] / 1024 for r in rows if "shared_bytes" in r), default=None),
      "swept": len(swept), "swept_errors": sum("error" in r for r in swept),
      "swept_that_spill": sum(bool(r.get("spill_bytes")) for r in swept),
      "seconds": round(time.perf_counter() - t0, 1)}
  print(f"\n{result['summary']}")
  save_json(result, args.out)


if __name__ == "__main__":
  main()
