"""4-bit matmul benchmark: the Pallas kernel vs the reference (dequantize + dot) vs a plain float dot; 4-bit decode.

Mode by ``jax.default_backend()`` (or ``--mode gpu|cpu``); results go to benchmarks/results/int4_matmul_{mode}.json.

GPU (no network, no model): weights N(0, 0.02) quantized to nf4 (double-quantized, as `--quantize nf4` makes it)
and int4_sym (group 64), bf16 activations, for M in {1, 8, 16, 64, 128, 256, 4096} x (K, N) in {(4096, 4096),
(4096, 14336), (14336, 4096), (8192, 8192)} (--shapes cross: then the other five pairs of 4096, 8192, 14336, as
scripts/gpu_check.sh runs it).
  * --kmajor-grid (first, with --grid-budget-s seconds): the K-major kernel's device time (profiled) under every
    `grid_policies` entry (`GRID_FIELDS`: the shortest step K may be cut to for a further split with min_programs,
    the partial sums' bound, pipeline stages, tile and warps; the scales a step ahead), int4_sym at M = 1 and 16
    on (4096, 14336), then the six best on (4096, 4096) and on nf4;
    every output checked. The main table's K-major rows run its winners (int4's best over both shapes, NF4's best
    of its six), not the wall-time sweep's.
  * --floor (then): where the one-row time goes, at (4096, 4096) and (4096, 14336): the op (int4_sym and nf4;
    default policies, int4 and nf4 in the K-major layout (`kernels.pack_kmajor`) under its default, int4's with
    an activation per weight copy, int4's with split_k 2, the runs' split at
    4096 x 4096, SEED_POLICIES), XLA's dequantize + dot, a bf16 dot, a Pallas kernel on the op's grid and loop
    that only streams the codes (as stored, and again with each program's column slab contiguous: does the
    weights' layout cost bandwidth?), one that only writes its output (`stream_kernels`), and XLA's sum over the
    same codes; each also profiled once
    (`device_trace.device_profile`: kernels per op, their device time and span, so launch gaps and extra kernels
    show apart from the kernel's own time).
  * --profile: the main table's Pallas op at M <= 16 profiled the same way (row["pallas"]["device"]).
  * --decode-budget-s S (last; 0, the default, skips it): end-to-end batch-1 greedy decoding (`gpu_decode`) of a
    random Llama with Llama-3-8B's layer shapes (8 layers, vocabulary 32000), its linears in bf16, int4 and NF4,
    each 4-bit base in both layouts, dispatched by `qmatmul` as in use: ms per decoded token, tokens/s, the
    weight bytes a step reads over its time, and whether the K-major run's greedy ids equal the QTensor run's.
  * --policy-sweep (then, with --sweep-budget-s seconds): a search over the kernel's shape-independent choices
    (`BlockSizes`: dot mma|fma|words, NF4 lookup select|gather|prmt, bn, bk, num_warps, num_stages, min_programs,
    which sets split_k, prefetch 0|1, convert i2f|magic|magic16, rescale weight|partial) for nf4 at M = 1 and
    M = 16, int4_sym at M = 1 and int4_sym in the K-major layout at M = 16 ("int4_sym/kmajor": bn, bk, warps,
    stages, min_programs, prefetch; the one class for 1-16 rows, which its dot pads to 16): the default, the format's
    SEED_POLICIES entries, 31 random policies, two rounds of every one-field change of the best, on (K, N) =
    (4096, 14336); the best three and the default again on (14336, 4096); least total time wins. Policies are compiled 16 at a time on a thread pool, then timed.
  * the main table's Pallas column uses the sweep's winners (M = 1: its format's M = 1 class; M <= 16: its M = 16
    class; a class not swept, or M above 16: `default_blocks`); the row records the resolved BlockSizes. Every
    row also times the same weights in the K-major layout (packed once, outside the timing) under its format's
    K-major winner (the grid's, else the sweep's K-major class's), else `KMAJOR` ("pallas_kmajor", "kmajor_check", "kmajor_blocks", and its time over
    the QTensor kernel's).
  * check: max |pallas - reference| / max |reference| on every shape and policy (the outputs of the first, compiling,
    call), pass if < 2e-2 (bf16); failures and exceptions are recorded and the run goes on.
  * time: Pallas kernel, reference (dequantize + dot), and ``x @ w_bf16``. One timed call runs the op on C distinct
    copies of the weight inside one jit (C x weights >= 1 GiB of bf16, so nothing is served from L2 and the Python
    dispatch is amortised); time per op = wall / C, median of --reps calls after warm-up. All copies share one x,
    so work the op does on x alone by XLA ops (now only the multiply-reduce's padding of a few rows and the words
    kernel's preparation; the tensor-core kernels read x as it is) runs once per timed call, not per op: the
    floor's "an x per copy" row shows what it adds.
  * weight GB/s = QTensor.nbytes() (bf16: 2KN) / time, vs the measured copy bandwidth (jitted ``a + 1`` on a 1 GiB
    f32 array, read + write bytes / time); TFLOP/s = 2MKN / time vs a measured 8192^3 bf16 dot.
  * fused LoRA: `qmatmul_lora_pallas` (the LoRA term inside the Pallas kernel, r = 16) vs the kernel followed by
    the two small LoRA products, on the first shape and format, M <= 16; relative error between the two.
  * the JSON is rewritten after every step; main-table shapes that start after --budget-s seconds are skipped, and
    the grid, the floor, the sweep and the fused-LoRA timing stop starting new work after their own budgets, so a run cut short by a
    time limit still leaves its results.
CPU: the C++ kernel (`qmatmul_cpu`, for M <= CPU_M_MAX), the reference and, for M <= SMALL_M_MAX, the small_m
multiply-reduce (the Pallas kernel needs a GPU; interpret mode is not timed) on SmolLM2-135M shapes (K, N) in
{(576, 1536), (1536, 576), (576, 576)} and (4096, 4096), M in {1, 8, 64, 256}, f32, vs an f32 dot; a dot whose weight is stored as bf16 / int8 / int4 (and int8 x int8 -> int32) vs
the f32 dot (M = 1, 576 x 1536: whether XLA:CPU can use narrow weights at all); then greedy decode tok/s of SmolLM2-135M at batch 1 (32-token prompt, 64 new
tokens, eos=(), median of 3 after a warm-up; end to end, prefill included; per-layer layout) with the fp32 base and
``quantize_model_params(params, nf4 | int4 | native)`` (qmatmul's automatic choice: the C++ kernel), and again
with the kernel disabled (LORA_JAX_CPU_KERNEL=0: XLA paths, "-xla"), the bytes held, and the decode program's XLA
temporaries (a base dequantized all at once would show there); "same ids": greedy tokens equal to fp32's (or,
"= kernel", to the kernel variant's) before the first difference.

Usage: python benchmarks/int4_matmul.py [--quick] [--mode gpu|cpu] [--shapes all|small|cross] [--formats nf4,int4_sym]
                                       [--kmajor-grid] [--floor] [--profile] [--policy-sweep] [--budget-s S]
                                       [--grid-budget-s S] [--floor-budget-s S] [--sweep-budget-s S] [--lora-budget-s S]
                                       [--decode-budget-s S]
                                       [--reps N] [--out PATH]
       python benchmarks/int4_matmul.py --mode gpu --dry-run   # the GPU code path on CPU: tiny shape, interpret mode
  On a time-limited GPU: scripts/gpu_check.sh (the GPU tests, then the grid and the main table within budgets).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_trace import device_profile  # noqa: E402
from _common import machine_info, save_json  # noqa: E402
from generate import PARAGRAPH  # noqa: E402  (the generate benchmark's prompt text)

from lora_jax.kernels import (CPU_M_MAX, KMAJOR, SMALL_M_MAX, BlockSizes, call_blocks, default_blocks, pack_kmajor,  # noqa: E402
                              qmatmul_cpu, qmatmul_pallas, qmatmul_reference, qmatmul_small_m)
from lora_jax.kernels.qmatmul.kmajor import FORMATS as KMAJOR_FORMATS  # noqa: E402
from lora_jax.quant import DEFAULT_RULES, quantize, quantize_model_params  # noqa: E402
from lora_jax.quant._qtensor import is_quantized  # noqa: E402

GPU_MS, CPU_MS = (1, 8, 16, 64, 128, 256, 4096), (1, 8, 64, 256)
GPU_SHAPES = {"all": ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)), "small": ((4096, 4096), (4096, 14336))}
# The QLoRA issue's K, N in {4096, 8192, 14336}: every pair, "all"'s four first (a budget cut drops the rest)
GPU_SHAPES["cross"] = GPU_SHAPES["all"] + ((4096, 8192), (8192, 4096), (8192, 14336), (14336, 8192), (14336, 14336))
CPU_SHAPES = ((576, 1536), (1536, 576), (576, 576), (4096, 4096))
FORMATS, TOL = ("nf4", "int4_sym"), 2e-2
KMAJOR_SUFFIX = "/kmajor"  # a format name with this suffix: its weights in the K-major layout (`pack_kmajor`)


def layout_of(fmt):
  """("int4_sym", True) for "int4_sym/kmajor": the QTensor format and whether the weights are K-major."""
  return fmt.removesuffix(KMAJOR_SUFFIX), fmt.endswith(KMAJOR_SUFFIX)


def kmajor_copies(qs):
  """The QTensor copies `qs` in the K-major layout, packed here, once, outside any timing."""
  return [jax.block_until_ready(pack_kmajor(q)) for q in qs]


def default_for(m, fmt):
  """`default_blocks` for a (possibly K-major) benchmark format."""
  base, kmajor = layout_of(fmt)
  return default_blocks(m, base, kmajor=kmajor)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def err_text(e):
  return f"{type(e).__name__}: {e}"[:600]


def record_error(row, e, prefix):
  """A failed measurement: its error into `row`, and a table line that says so."""
  row["error"] = err_text(e)
  print(f"{prefix} ERROR {row['error'][:80]}", flush=True)


def rel_err(got, ref) -> float:
  """max |got - ref| / max |ref|: the check every GPU timing's output passes (< TOL)."""
  return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def identical_prefix(a, b) -> int:
  """How many leading token ids two generations share (their length if all)."""
  return next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))


def median_s(fn, *args, reps, warmup, record=None):
  """Median wall seconds of `reps` calls after `warmup` untimed ones; the single times are appended to `record`."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  if record is not None:
    record.extend(times)
  return statistics.median(times)


def copies_of(w, n):
  return [w] + [jax.tree.map(lambda a: jnp.array(a, copy=True), w) for _ in range(n - 1)]


def time_op(op, x, ws, args, first=None, profile=None):
  """Seconds per op(x, w): one jit applies op to each of the distinct weights `ws` (one dispatch, no cache reuse);
  median wall / len(ws). x is one activation for all (XLA then prepares it once: the op's own work on x, e.g.
  padding, is shared) or a list, one per weight (as each layer of a model has its own). The first (compiling)
  call counts as a warm-up; its op(x, ws[0]) goes to first[0]. With a dict `profile`, one more call runs under the
  profiler and `device_trace.device_profile`'s per-op figures (kernels launched, device time, span) fill it."""
  if isinstance(x, list):
    f = jax.jit(lambda xs, ws: [op(xi, w) for xi, w in zip(xs, ws, strict=True)])
  else:
    f = jax.jit(lambda x, ws: [op(x, w) for w in ws])
  out = jax.block_until_ready(f(x, ws))
  if first is not None:
    first.append(np.asarray(out[0]))
  del out
  t = median_s(f, x, ws, reps=args.reps, warmup=max(0, args.warmup - 1)) / len(ws)
  if profile is not None:
    profile.update(device_profile(f, x, ws, per=len(ws)))
  return t


def time_profiled(row, op, x, ws, args, nbytes, first=None):
  """`time_op` with one profiled call, into `row`: time_s (wall), device (`device_trace.device_profile`'s figures)
  and, when the trace has device time, device_gb_s (`nbytes` over it). Returns the profile."""
  prof = row["device"] = {}
  row["time_s"] = time_op(op, x, ws, args, first, prof)
  if prof.get("device_s"):
    row["device_gb_s"] = nbytes / prof["device_s"] / 1e9
  return prof


def device_peaks(args, copy_bytes, dot_n, dtype):
  """Copy bandwidth (jitted a + 1 on copy_bytes of f32: read + write bytes / time) and a dot_n^3 matmul's rate."""
  out = {"copy_bytes": copy_bytes, "matmul_n": dot_n, "matmul_dtype": jnp.dtype(dtype).name}
  try:
    a = jnp.ones((copy_bytes // 4,), jnp.float32)
    out["copy_gb_s"] = 2 * copy_bytes / median_s(jax.jit(lambda a: a + 1), a, reps=args.reps, warmup=args.warmup) / 1e9
    del a
    b = jax.random.normal(jax.random.key(1), (dot_n, dot_n), dtype)
    out["matmul_tflop_s"] = 2 * dot_n ** 3 / median_s(jax.jit(jnp.dot), b, b, reps=args.reps, warmup=args.warmup) / 1e12
  except Exception as e:
    out["error"] = err_text(e)
  return {"copy_gb_s": float("nan"), "matmul_tflop_s": float("nan"), **out}


def perf(t, m, k, n, nbytes, peaks):
  gb_s = nbytes / t / 1e9
  return {"time_s": t, "weight_gb_s": gb_s, "frac_copy_bw": gb_s / peaks["copy_gb_s"],
          "tflop_s": 2 * m * k * n / t / 1e12, "frac_matmul_peak": 2 * m * k * n / t / 1e12 / peaks["matmul_tflop_s"]}


def machine():
  try:
    info = machine_info()
  except Exception:  # torch / transformers need not be installed on the GPU machine
    info = {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__}
  d = jax.devices()[0]
  return {**info, "backend": jax.default_backend(), "device": str(d), "device_kind": d.device_kind}


def gpu_weights(args, k, n, fmt, gib):
  """C distinct copies of the bf16 weight and of its `fmt` QTensor (C x bf16 bytes >= gib, 2 <= C <= 32); NF4
  double-quantized, as `--quantize nf4` makes it; "<fmt>/kmajor": the QTensor copies in the K-major layout
  (packed here, once, outside any timing)."""
  c = 2 if args.dry_run else max(2, min(32, -(-gib // (2 * k * n))))
  w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32).astype(jnp.bfloat16) * 0.02
  base, kmajor = layout_of(fmt)
  qs = copies_of(quantize(w, base, block_size=64, double_quant=base == "nf4"), c)
  return copies_of(w, c), kmajor_copies(qs) if kmajor else qs


def run_gpu(args, result):
  interp = args.dry_run  # dry run: the same code on CPU, the Pallas kernel in interpret mode
  shapes = ((256, 128),) if args.dry_run else GPU_SHAPES[args.shapes]
  ms = (1, 16) if args.dry_run else GPU_MS
  gib = (8 << 20) if args.dry_run else (1 << 30)
  peaks = result["peaks"] = device_peaks(args, gib, 256 if args.dry_run else 8192, jnp.bfloat16)
  print(f"copy {peaks['copy_gb_s']:.0f} GB/s, bf16 matmul {peaks['matmul_tflop_s']:.1f} TFLOP/s", flush=True)
  pallas = lambda blocks: (lambda x, w: qmatmul_pallas(x, w, blocks=blocks, interpret=interp))
  tuned, grid = {}, {}
  if args.kmajor_grid:  # the main table's K-major rows then run its winners (device time), not the sweep's (wall)
    grid = kmajor_grid(args, result, interp, gib, time.perf_counter() + args.grid_budget_s)
  if args.floor:
    floor(args, result, ((256, 128),) if args.dry_run else ((4096, 4096), (4096, 14336)), interp, gib,
          time.perf_counter() + args.floor_budget_s)
  if args.policy_sweep:  # first, so that the main table times the policies it found
    sweep_shapes = ((256, 128), (512, 256)) if args.dry_run else ((4096, 14336), (14336, 4096))
    tuned = policy_sweep(args, result, sweep_shapes, pallas, gib, time.perf_counter() + args.sweep_budget_s)
  tuned.update(grid)
  print(GPU_HEADER, flush=True)
  bf16_dot = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
  t_end = time.perf_counter() + args.budget_s
  for k, n in shapes:
    for fmt in args.formats:
      if time.perf_counter() > t_end:
        result["rows"].append({"K": k, "N": n, "fmt": fmt, "skipped": "budget"})
        continue
      try:
        wb, qs = gpu_weights(args, k, n, fmt, gib)
        km = kmajor_copies(qs) if fmt in KMAJOR_FORMATS else None
      except Exception as e:
        result["rows"].append({"K": k, "N": n, "fmt": fmt, "error": err_text(e)})
        continue
      nbytes = qs[0].nbytes()
      for m in ms:
        blocks = tuned_for(tuned, fmt, m)
        row = {"M": m, "K": k, "N": n, "fmt": fmt, "copies": len(qs), "weight_bytes": nbytes,
               "blocks": dataclasses.asdict(call_blocks(m, qs[0], blocks))}
        result["rows"].append(row)
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        outs = {}  # the check compares the outputs of the first (compiling) timed call on weight copy 0
        ops = [("pallas", pallas(blocks), qs, nbytes), ("reference", qmatmul_reference, qs, nbytes),
               ("bf16_dot", bf16_dot, wb, 2 * k * n)]
        if km:  # the same weights in the K-major layout, its kernel under its own (swept or default) policy
          km_blocks = tuned_for(tuned, fmt + KMAJOR_SUFFIX, m)
          row["kmajor_blocks"] = dataclasses.asdict(call_blocks(m, km[0], km_blocks))
          ops.insert(1, ("pallas_kmajor", pallas(km_blocks), km, nbytes))
        for name, op, ws, nb in ops:
          prof = {} if args.profile and name != "reference" and m <= 16 else None
          try:
            row[name] = perf(time_op(op, x, ws, args, outs.setdefault(name, []), prof), m, k, n, nb, peaks)
            if prof is not None:
              row[name]["device"] = prof
              if prof.get("device_s"):  # the kernels' own bandwidth: bytes over device time (launch gaps left out)
                prof["device_frac_copy_bw"] = nb / prof["device_s"] / 1e9 / peaks["copy_gb_s"]
          except Exception as e:
            row[name] = {"error": err_text(e)}
        for name, check in (("pallas", "check"), ("pallas_kmajor", "kmajor_check")):
          if name not in outs:
            continue
          if outs[name] and outs["reference"]:
            rel = rel_err(outs[name][0], outs["reference"][0])
            row[check] = {"rel_err": rel, "pass": bool(rel < TOL)}
          else:
            row[check] = {"pass": False, "error": row[name].get("error") or row["reference"].get("error")}
        del outs
        for name, other in (("pallas", "reference"), ("pallas", "bf16_dot"), ("pallas_kmajor", "reference"),
                            ("pallas_kmajor", "bf16_dot"), ("pallas_kmajor", "pallas")):
          if "time_s" in row.get(name, {}) and "time_s" in row[other]:
            row[f"{name}_over_{other}_time"] = row[name]["time_s"] / row[other]["time_s"]
        print_gpu_row(row)
      save_json(result, args.out)
      del wb, qs, km
  fused_lora(args, result, shapes[0], args.formats[0], [m for m in ms if m <= 16], interp, gib, peaks,
             time.perf_counter() + args.lora_budget_s, tuned)
  if args.decode_budget_s > 0:
    gpu_decode(args, result, time.perf_counter() + args.decode_budget_s)


# The GPU decode model: Llama-3-8B's layer shapes (d 4096, MLP 14336, 32 query / 8 KV heads of 128), 8 of its 32
# layers and a 32000-token vocabulary, so that the linear weights are what a decode step mostly reads and the
# program compiles in seconds; random weights (no checkpoint on the GPU machine). The dry run's is tiny.
DECODE_MODEL = dict(architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=8,
                    num_heads=32, num_kv_heads=8, head_dim=128)
DECODE_MODEL_DRY = dict(DECODE_MODEL, vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=64)
GPU_DECODE_VARIANTS = ("bf16", "int4", "int4" + KMAJOR_SUFFIX, "nf4", "nf4" + KMAJOR_SUFFIX)


def gpu_decode(args, result, t_end, prompt=32, chunks=(1, 3)):
  """End-to-end batch-1 greedy decoding (`generate.generate_ids`, per-layer layout, bf16 activations) of a random
  Llama with `DECODE_MODEL`'s shapes, its block linears in bf16, int4 (group 64) and NF4 (double-quantized), each
  4-bit base in the QTensor and the K-major layout, every product dispatched by `qmatmul` as in use (Pallas up to
  `PALLAS_M_MAX` rows on a GPU). A decode step's time is the difference between generating chunks[1] and chunks[0]
  decode chunks (`DECODE_CHUNK` tokens each) over the tokens between, so the 32-token prefill and the first
  chunk's compilation drop out; the step's weight traffic (every weight but the embedding table, of which it reads
  one row) over that time is its bandwidth. Greedy ids are compared with the same format's QTensor run."""
  from lora_jax.generate import DECODE_CHUNK, generate_ids
  from lora_jax.kernels import to_kmajor
  from lora_jax.models import ModelConfig, init_params, unstack_layers
  cfg = ModelConfig(**(DECODE_MODEL_DRY if args.dry_run else DECODE_MODEL), max_position_embeddings=4096)
  base = init_params(cfg, key=jax.random.key(0), dtype=jnp.bfloat16)
  ids = [int(i) for i in np.random.default_rng(0).integers(0, cfg.vocab_size, prompt)]
  short, long = (c * DECODE_CHUNK for c in chunks)
  rows = result["gpu_decode"] = []
  result["gpu_decode_config"] = {"model": {k: v for k, v in dataclasses.asdict(cfg).items() if k in DECODE_MODEL},
                                 "batch": 1, "prompt_tokens": prompt, "new_tokens": [short, long],
                                 "reps": args.decode_reps, "statistic": "median"}
  print(f"\ndecode, random Llama ({cfg.num_layers} x d {cfg.hidden_size}, MLP {cfg.intermediate_size}): "
        f"{'weights':14s} {'MB/token':>8} {'ms/token':>8} {'tok/s':>7} {'GB/s':>7} {'vs bf16':>7} {'same ids':>8}")
  ids_of = {}
  for variant in GPU_DECODE_VARIANTS[1:3] if args.dry_run else GPU_DECODE_VARIANTS:  # dry run: both layouts' code
    row = {"variant": variant}
    rows.append(row)
    if time.perf_counter() > t_end:
      row["skipped"] = "budget"
      continue
    try:
      fmt = variant.removesuffix(KMAJOR_SUFFIX)
      params = base if fmt == "bf16" else quantize_model_params(base, fmt)
      params = unstack_layers(to_kmajor(params) if variant.endswith(KMAJOR_SUFFIX) else params)
      gen = lambda n: generate_ids(params, cfg, [ids], max_new_tokens=n, eos=())[0][0]
      out = gen(long)  # compiles the prefill and the decode chunk (each length: its own cache size)
      t_short, t_long = (median_s(lambda n=n: gen(n), reps=args.decode_reps, warmup=int(n == short))
                         for n in (short, long))
      step = (t_long - t_short) / (long - short)
      read = tree_bytes(params) - base["embed"]["embedding"].nbytes
      row.update({"weight_bytes_per_token": read, "linear_weight_bytes": tree_bytes(params, True),
                  "step_s": step, "tok_s": 1 / step, "generate_s": t_long, "weight_gb_s": read / step / 1e9})
      ref, ids_of[variant] = ids_of.get(fmt) if variant != fmt else None, out
      row["identical_prefix_vs_qtensor"] = None if ref is None else identical_prefix(out, ref)
      bf16 = next((r["tok_s"] for r in rows if r["variant"] == "bf16" and "tok_s" in r), None)
      row["tok_s_vs_bf16"] = row["tok_s"] / bf16 if bf16 else None
      same = row["identical_prefix_vs_qtensor"]
      print(f"{'':52s} {variant:14s} {read / 1e6:8.1f} {step * 1e3:8.3f} {row['tok_s']:7.1f} "
            f"{row['weight_gb_s']:7.0f} {row['tok_s_vs_bf16'] or float('nan'):7.2f} "
            f"{'-' if same is None else f'{same}/{len(out)}':>8}", flush=True)
      del params
    except Exception as e:
      record_error(row, e, f"decode: {variant}")
    save_json(result, args.out)


def fused_lora(args, result, shape, fmt, ms, interp, gib, peaks, t_end, tuned, rank=16):
  """QLoRA's linear with the LoRA term inside the Pallas kernel (`qmatmul_lora`) vs the kernel followed by the two
  small LoRA products, at decode sizes: what the fusion saves (a pass over the output, two launches)."""
  from lora_jax.kernels import qmatmul_lora_pallas
  k, n = shape
  if time.perf_counter() > t_end:
    result["fused_lora"] = [{"skipped": "budget"}]
    return
  _, qs = gpu_weights(args, k, n, fmt, gib)
  a = jax.random.normal(jax.random.key(1), (k, rank), jnp.bfloat16) * 0.02
  b = jax.random.normal(jax.random.key(2), (rank, n), jnp.bfloat16) * 0.02
  s = jnp.float32(2.0)
  fused = lambda blocks: lambda x, w: qmatmul_lora_pallas(
      x, w, s * jnp.dot(x, a, preferred_element_type=jnp.float32), b, blocks=blocks, interpret=interp)
  split = lambda blocks: lambda x, w: qmatmul_pallas(x, w, blocks=blocks, interpret=interp) + s * jnp.dot(
      jnp.dot(x, a, preferred_element_type=jnp.float32).astype(x.dtype), b, preferred_element_type=jnp.float32)
  rows = result["fused_lora"] = []
  print(f"\nfused LoRA (r={rank}, {fmt}, {k}x{n}): {'M':>4} {'fused us':>9} {'split us':>9} {'fused/split':>11} "
        f"{'rel err':>8}")
  for m in ms:
    if time.perf_counter() > t_end:
      rows.append({"M": m, "skipped": "budget"})
      continue
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    row, outs = {"M": m, "K": k, "N": n, "fmt": fmt, "rank": rank}, {}
    blocks = tuned_for(tuned, fmt, m)
    for name, op in (("fused", fused(blocks)), ("split", split(blocks))):
      try:
        row[name] = perf(time_op(op, x, qs, args, outs.setdefault(name, [])), m, k, n, qs[0].nbytes(), peaks)
      except Exception as e:
        row[name] = {"error": err_text(e)}
    if outs["fused"] and outs["split"]:
      got, ref = outs["fused"][0], outs["split"][0]
      row["rel_err"] = rel_err(got, ref)
      row["pass"] = bool(row["rel_err"] < TOL)
    if "time_s" in row["fused"] and "time_s" in row["split"]:
      row["fused_over_split_time"] = row["fused"]["time_s"] / row["split"]["time_s"]
    rows.append(row)
    t = lambda key: f"{row[key]['time_s'] * 1e6:9.1f}" if "time_s" in row[key] else f"{'err':>9}"
    print(f"{'':40s}{m:4d} {t('fused')} {t('split')} {row.get('fused_over_split_time', float('nan')):11.2f} "
          f"{row.get('rel_err', float('nan')):8.1e}", flush=True)
  save_json(result, args.out)
  del qs


def stream_kernels(k, n, bn, bk, split, warps, stages, interp, slabs=False):
  """Two Pallas kernels on the qmatmul kernel's grid (N / bn tiles x split_k) and loop (bk blocks of 32 packed rows
  per step, `pl.ds` loads): "stream" only reads the packed codes (adds them up, so the loads cannot be dropped:
  one integer add per byte into a (32 x bn) accumulator, reduced after the loop, so its arithmetic stays far below
  the bytes' time);
  "empty" only writes its output tile. With XLA's own sum over the same bytes, they separate what the Pallas
  kernel's time goes to: launch and grid, the load loop as written, or the dequantization and dots. Both return
  (split_k, 1, N) float32 partial column sums (zeros for "empty").

  The codes are (K/2, N) as a QTensor holds them, so each step reads bn-byte pieces of rows N bytes apart; with
  `slabs`, they come as `code_slabs(codes, bn)`, (N/bn, K/2, bn), where each program's column slab is one
  contiguous run of memory: if "stream" is faster on slabs, the weights' memory layout (not the kernel's
  arithmetic) is what costs bandwidth, and a pre-tiled layout is the remedy."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltriton
  half, nb = 32, k // 64
  steps = nb // (bk * split)

  def stream(codes_ref, o_ref):
    first = pl.program_id(1) * steps

    def body(t, acc):  # elementwise integer adds: no reduction across threads inside the loop
      for u in range(bk):
        g = (first + t) * bk + u
        acc += codes_ref[pl.ds(g * half, half), :].astype(jnp.int32)
      return acc
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((half, bn), jnp.int32))
    o_ref[...] = jnp.sum(acc, axis=0, keepdims=True).astype(jnp.float32).reshape(o_ref.shape)

  def empty(codes_ref, o_ref):
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

  codes_spec = (pl.BlockSpec((None, k // 2, bn), lambda j, s: (j, 0, 0)) if slabs
                else pl.BlockSpec((k // 2, bn), lambda j, s: (0, j)))

  def call(body):
    return lambda codes: pl.pallas_call(
        body, out_shape=jax.ShapeDtypeStruct((split, 1, n), jnp.float32), grid=(n // bn, split),
        in_specs=[codes_spec],
        out_specs=pl.BlockSpec((None, 1, bn), lambda j, s: (s, 0, j)),
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages), interpret=interp)(codes)
  return call(stream), call(empty)


def code_slabs(codes, bn):
  """(K/2, N) codes as (N/bn, K/2, bn): column slab j (columns j*bn ... j*bn + bn - 1) contiguous in memory."""
  kh, n = codes.shape
  return codes.reshape(kh, n // bn, bn).transpose(1, 0, 2)


FLOOR_FIRST = ("op, int4_sym (default policy)", "op, nf4 (default policy)", "op, int4_sym K-major (default policy)",
               "op, nf4 K-major (default policy)", "stream, default tiling",
               "stream, default tiling, contiguous slabs", "empty, default tiling", "XLA sum of the codes", "bf16 dot",
               "reference (XLA dequantize + dot), int4_sym")


def floor(args, result, shapes, interp, gib, t_end):
  """Where the one-row time goes: per (K, N), at M = 1, the whole op for int4_sym and nf4 (default policies, in
  both layouts; int4's default with a distinct activation per weight copy, so that any XLA op on x alone runs per
  call as in a model (none since the kernel reads x as it is: that row should match the shared-x one); int4's
  default with K split 2 ways, the H200 runs' split at 4096 x 4096 before a tile stored only the call's rows; and `SEED_POLICIES`, the variants with the fewest instructions per
  weight or none on the conversion pipe, in both layouts), XLA's dequantize + dot and a bf16 dot, the "stream"
  and "empty" Pallas kernels of `stream_kernels` on the default tiling and on a wide one (int4_sym codes), "stream"
  again on the default tiling with each program's codes contiguous (`code_slabs`), and XLA's sum over the same
  codes. Each is timed (wall / C, as the main table) and profiled once (`device_trace`): kernels per op, device
  time, device span; GB/s of the bytes the op must read, over each.
  Each shape gets an equal share of the time left until `t_end`, spent on `FLOOR_FIRST` first, then the op's other
  rows and the wide tiling, then the seeded variants; ops that would start after their shape's share are recorded
  as skipped."""
  rows = result["floor"] = []
  print(f"\nfloor (M = 1): per op, wall us, device us (sum of kernels), device span us, kernels per op, GB/s of "
        f"its bytes over wall and over device time\n{'K':>5} {'N':>5} {'what':42s} {'wall':>7} {'device':>7} "
        f"{'span':>7} {'kern':>5} {'GB/s':>6} {'dev GB/s':>8}")
  bf16_dot = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
  for k, n in shapes:
    wb, qs = gpu_weights(args, k, n, "int4_sym", gib)
    _, qn = gpu_weights(args, k, n, "nf4", gib)
    codes = [q.codes for q in qs]
    km, kmn = kmajor_copies(qs), kmajor_copies(qn)
    x = jax.random.normal(jax.random.key(1), (1, k), jnp.bfloat16)
    d = default_blocks(1, "int4_sym").for_shape(1, n, k, 64)
    op = lambda x, w: qmatmul_pallas(x, w, interpret=interp)
    seed_op = lambda p: lambda x, w: qmatmul_pallas(x, w, blocks=p, interpret=interp)
    ops = [("op, int4_sym (default policy)", op, qs, qs[0].nbytes(), dataclasses.asdict(d)),
           ("op, nf4 (default policy)", op, qn, qn[0].nbytes(),
            dataclasses.asdict(default_blocks(1, "nf4").for_shape(1, n, k, 64))),
           ("op, int4_sym K-major (default policy)", op, km, km[0].nbytes(), dataclasses.asdict(call_blocks(1, km[0]))),
           ("op, nf4 K-major (default policy)", op, kmn, kmn[0].nbytes(), dataclasses.asdict(call_blocks(1, kmn[0]))),
           ("op, int4_sym (default), an x per copy", op, qs, qs[0].nbytes(), dataclasses.asdict(d)),
           ("op, int4_sym (split_k 2, the runs' split)",
            lambda x, w: qmatmul_pallas(x, w, blocks=BlockSizes(split_k=2), interpret=interp), qs, qs[0].nbytes(),
            dataclasses.asdict(BlockSizes(split_k=2).for_shape(1, n, k, 64))),
           ("reference (XLA dequantize + dot), int4_sym", qmatmul_reference, qs, qs[0].nbytes(), None),
           ("bf16 dot", bf16_dot, wb, 2 * k * n, None)]
    for tag, (bn, bk, split, warps, stages) in (("default tiling", (d.bn, d.bk, d.split_k, d.num_warps,
                                                                      d.num_stages)),
                                                ("wide tiling", (min(128, n), min(4, k // 64), 1, 4, 3))):
      stream, empty = stream_kernels(k, n, bn, bk, split, warps, stages, interp)
      tiling = {"bn": bn, "bk": bk, "split_k": split, "num_warps": warps, "num_stages": stages}
      ops += [(f"stream, {tag}", lambda _, c, f=stream: f(c), codes, codes[0].size, tiling),
              (f"empty, {tag}", lambda _, c, f=empty: f(c), codes, codes[0].size, tiling)]
      if tag == "default tiling":
        slab_stream, _ = stream_kernels(k, n, bn, bk, split, warps, stages, interp, slabs=True)
        slabs = [jax.block_until_ready(code_slabs(c, bn)) for c in codes]  # laid out once, outside the timing
        ops.append((f"stream, {tag}, contiguous slabs", lambda _, c, f=slab_stream: f(c), slabs, codes[0].size,
                    {**tiling, "layout": "slabs"}))
    ops.append(("XLA sum of the codes", lambda _, c: jnp.sum(c, axis=0, dtype=jnp.int32), codes, codes[0].size,
                None))
    # what the budget runs first: the ops and the kernels that bound them, then the op's other rows (stable sort)
    ops.sort(key=lambda op: FLOOR_FIRST.index(op[0]) if op[0] in FLOOR_FIRST else len(FLOOR_FIRST))
    ops += [(f"op, {fmt} ({seed_name(p)})", seed_op(p), q, q[0].nbytes(), dataclasses.asdict(call_blocks(1, q[0], p)))
            for fmt, q in (("int4_sym" + KMAJOR_SUFFIX, km), ("nf4" + KMAJOR_SUFFIX, kmn), ("int4_sym", qs),
                           ("nf4", qn))
            for p in SEED_POLICIES[fmt]]  # last (K-major first): the sweep times most of them too
    shape_end = time.perf_counter() + (t_end - time.perf_counter()) / (len(shapes) - shapes.index((k, n)))
    xs = [jax.random.normal(jax.random.key(2 + i), (1, k), jnp.bfloat16) for i in range(len(qs))]
    for what, fn, ws, nbytes, tiling in ops:
      row = {"K": k, "N": n, "what": what, "tiling": tiling, "bytes": nbytes}
      rows.append(row)
      if time.perf_counter() > shape_end:
        row["skipped"] = "budget"
        continue
      try:
        prof = time_profiled(row, fn, xs if what.endswith("an x per copy") else x, ws, args, nbytes)
        t = row["time_s"]
        row["gb_s"] = nbytes / t / 1e9
        us = lambda key: f"{prof[key] * 1e6:7.1f}" if key in prof else f"{'-':>7}"
        print(f"{k:5d} {n:5d} {what:42s} {t * 1e6:7.1f} {us('device_s')} {us('span_s')} "
              f"{prof.get('kernels_per_op', float('nan')):5.1f} {row['gb_s']:6.0f} "
              f"{row.get('device_gb_s', float('nan')):8.0f}", flush=True)
      except Exception as e:
        record_error(row, e, f"{k:5d} {n:5d} {what:42s}")
    save_json(result, args.out)
    del wb, qs, qn, codes, slabs, km, kmn


POLICY_FIELDS = {"dot": ("fma", "mma", "words"), "lookup": ("select", "gather", "prmt"), "bn": (32, 64, 128), "bk": (1, 2, 4),
                 "num_warps": (2, 4, 8), "num_stages": (2, 3, 4), "min_programs": (132, 264, 528, 1056),
                 "prefetch": (0, 1), "convert": ("i2f", "magic", "magic16"), "rescale": ("weight", "partial")}
SWEEP_CLASSES = (("nf4", 1), ("nf4", 16), ("int4_sym", 1), ("int4_sym" + KMAJOR_SUFFIX, 16))  # (format, M): M = 1
# decode, M = 16 a few rows; the K-major kernel pads any row count up to 16 to one 16-column dot, so its one class
# Timed right after each class's default: the variants with the fewest machine instructions per weight in the
# K loop as compiled for sm_90 (benchmarks/pallas_compile_sm90.py's "variants"; not yet timed on a GPU), and for
# int4 the one with no conversion instruction at all (magic16 + partial), for NF4 the one with no load per weight
# (prmt + partial).
SEED_POLICIES = {"nf4": (BlockSizes(lookup="gather", rescale="partial"),
                         BlockSizes(lookup="prmt", rescale="partial")),
                 "int4_sym": (BlockSizes(convert="magic", rescale="partial"),
                              BlockSizes(convert="magic16", rescale="partial"),
                              BlockSizes(dot="words", bn=256), BlockSizes(dot="words", bn=128)),
                 "int4_sym" + KMAJOR_SUFFIX: (BlockSizes(bn=128, prefetch=1, min_programs=1056),
                                              BlockSizes(bn=64, k_rows=128, prefetch=1, min_programs=1056)),
                 "nf4" + KMAJOR_SUFFIX: (BlockSizes(bn=128, prefetch=1, min_programs=1056),
                                         BlockSizes(bn=64, k_rows=128, prefetch=1, min_programs=1056))}
# K-major, after H200 run 5 (default `KMAJOR`: bn 64, 4 blocks of 64 per step, scales a step ahead, K split up to
# 1056 programs; 16.4 us of device time at one row of 4096 x 14336): run 4's best one-row policy (bn 128, 2 blocks
# per step, prefetch: 15.9 us) and steps of 2 blocks at bn 64, both with 1056 programs. Answered and dropped: no K
# split (run 4: 27-32 us), 4-stage pipelines, 8 blocks per step, bn 256 (run 4-5: all slower).


# The K-major grid (`kmajor_grid`): why the kernel sits near 60% of the copy bandwidth. Compiled for sm_90, a
# 3-stage pipeline double-buffers the codes (their consumer is the register operand, one stage later than the
# activation's shared-memory tile): one step of codes in flight per program. Run 4 halved the programs (no K split)
# and the time rose 1.65x, as if bytes in flight bounded the bandwidth (Little's law); run 5's grid (stages 3-4,
# steps of 4-8 blocks, tiles of 64-128 columns on 4-8 warps, 264 or 1056 programs) refuted that: every change that
# puts more bytes in flight per program was slower (it costs shared memory, so fewer programs are resident per SM);
# only more programs helped (1056: 16.4 us against 17.0 at one row). Run 6's grid asked the converse (steps of 2
# blocks, 2 stages: less shared memory per program): steps of 2 blocks won at every one-row shape, as they let K
# split 8 ways instead of 4 (int4 4096 x 14336: 15.35 us, 74.6% of copy), and lost at 16 rows, where the split stays
# 2; 2 stages won only at one row of 4096 x 14336 (15.17 us). `KMAJOR` now halves its step only where that splits
# K further (`min_step_rows`). This grid asks whether splitting further still pays: at one row, steps down to one
# block and up to 2112 programs (1792 now at 4096 x 14336); at 16 rows, whose split the partial sums' bound holds
# at 2 (448 programs, all resident at once at 40 KiB of shared memory each: 3.4 per SM, so some SMs run 4 and some
# 3, and the 4s set the time; at 4096 x 4096, 128 programs for 132 SMs), that bound at 1/4 or 1/2 of the codes'
# bytes instead of 1/8 (split 4 or 8; the partial sums, 2-4 MiB, are read back from the 50 MiB L2); with 2 or 3
# stages and tiles of 64 or 128 columns (NF4's best one-row time in run 6, 23.75 us against 26.26, had 128-column
# tiles and steps of 2 blocks).
GRID_FIELDS = {"split": ((128, 1056), (64, 2112)), "partial_frac": (0.125, 0.25, 0.5), "num_stages": (3, 2),
               "tile": ((64, 4), (128, 4))}


def grid_policies():
  """Every `GRID_FIELDS` combination as a BlockSizes (steps of 256 rows of K halved down to min_step_rows, scales a
  step ahead), `KMAJOR`'s own first."""
  out = [dataclasses.replace(KMAJOR)]
  for (step_rows, programs), frac, stages, (bn, warps) in itertools.product(*GRID_FIELDS.values()):
    p = BlockSizes(bn=bn, num_warps=warps, k_rows=256, min_step_rows=step_rows, min_programs=programs,
                   partial_frac=frac, num_stages=stages, prefetch=1)
    if p != out[0]:
      out.append(p)
  return out


def kmajor_grid(args, result, interp, gib, t_end):
  """Device time of the K-major kernel under every `grid_policies` entry: int4_sym at 1 and 16 rows on
  4096 x 14336 (both rows per policy, so a budget cut leaves whole policies), then the six best (least summed
  device time, outputs within the tolerance of the reference) on nf4 and on 4096 x 4096. Returns the tuned
  policies {(fmt + KMAJOR_SUFFIX, 16): best} for the main table: int4's best over both shapes, NF4's best of its
  six. Each policy's row records device time, kernels per op and % of the copy bandwidth."""
  rows = result["kmajor_grid"] = []
  copy = result["peaks"]["copy_gb_s"]
  main, small = ((256, 128), (256, 128)) if args.dry_run else ((4096, 14336), (4096, 4096))
  ms = (1, 16)
  print(f"\nK-major grid (device time): {'fmt':8s} {'K':>5} {'N':>5} {'M':>3} {'policy':44s} {'dev us':>7} "
        f"{'kern':>4} {'% copy':>6} {'wall us':>7}", flush=True)
  weights = {}

  def run(fmt, k, n, p):
    if (fmt, k, n) not in weights:
      weights.clear()
      weights[(fmt, k, n)] = kmajor_copies(gpu_weights(args, k, n, fmt, gib)[1])
    km = weights[(fmt, k, n)]
    out = []
    for m in ms:
      bs = call_blocks(m, km[0], p)
      row = {"fmt": fmt, "K": k, "N": n, "M": m, "policy": policy_of(p), "resolved": policy_of(bs),
             "bytes": km[0].nbytes()}
      rows.append(row)
      try:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        first = []
        prof = time_profiled(row, lambda x, w: qmatmul_pallas(x, w, blocks=p, interpret=interp), x, km, args,
                             row["bytes"], first)
        row["rel_err"] = rel_err(first[0], np.asarray(qmatmul_reference(x, km[0])))
        row["pass"] = bool(row["rel_err"] < TOL)
        dev = prof.get("device_s")
        if dev:
          row["device_frac_copy_bw"] = row["device_gb_s"] / copy
        tag = (f"bn {bs.bn} w{bs.num_warps} s{bs.num_stages} bk {bs.bk} sk {bs.split_k} "
               f"({(n // bs.bn) * bs.split_k} programs)")
        print(f"K-major grid: {fmt:8s} {k:5d} {n:5d} {m:3d} {tag:44s} {(dev or float('nan')) * 1e6:7.1f} "
              f"{prof.get('kernels_per_op', float('nan')):4.1f} {100 * row.get('device_frac_copy_bw', float('nan')):6.1f} "
              f"{row['time_s'] * 1e6:7.1f}{'' if row['pass'] else '  WRONG'}", flush=True)
      except Exception as e:
        record_error(row, e, f"K-major grid: {fmt:8s} {k:5d} {n:5d} {m:3d}")
      out.append(row)
    save_json(result, args.out)
    return out

  def total(timed):  # summed device time of a policy's rows, inf if any failed
    if len(timed) < len(ms) or not all(r.get("pass") and r.get("device", {}).get("device_s") for r in timed):
      return float("inf")
    return sum(r["device"]["device_s"] for r in timed)

  policies = grid_policies()[:3] if args.dry_run else grid_policies()
  first, main_end = {}, time.perf_counter() + 0.7 * (t_end - time.perf_counter())  # the rest: the six best
  for p in policies:
    if time.perf_counter() > main_end:
      break
    first[p] = total(run("int4_sym", *main, p))
  ranked = sorted((p for p in first if first[p] < float("inf")), key=first.get)[:6]
  tuned, summary = {}, result.setdefault("kmajor_grid_summary", {})
  if not ranked:
    return tuned
  both = {p: first[p] + total(run("int4_sym", *small, p)) for p in ranked if time.perf_counter() < t_end}
  int4_total = both or {p: first[p] for p in ranked}  # compared on both shapes, or (no time left) on the first
  nf4_total = {p: total(run("nf4", *main, p)) for p in ranked if time.perf_counter() < t_end}
  best4 = min(int4_total, key=int4_total.get)
  tuned[("int4_sym" + KMAJOR_SUFFIX, 16)] = best4
  summary["int4"] = {"best": policy_of(best4), "default": policy_of(KMAJOR),
                     "best_main_device_s": first[best4], "default_main_device_s": first.get(KMAJOR)}
  ok = {p: t for p, t in nf4_total.items() if t < float("inf")}
  if ok:
    best_nf4 = min(ok, key=ok.get)
    tuned[("nf4" + KMAJOR_SUFFIX, 16)] = best_nf4
    summary["nf4"] = {"best": policy_of(best_nf4), "best_main_device_s": ok[best_nf4]}
  print(f"K-major grid: {len(first)} policies; int4 best {policy_of(best4)}: {first[best4] * 1e6:.1f} us (M 1 + 16) "
        f"against KMAJOR's {first.get(KMAJOR, float('nan')) * 1e6:.1f}", flush=True)
  save_json(result, args.out)
  return tuned


def seed_name(p):
  """A SEED_POLICIES entry's variant in words: what it changes from BlockSizes' defaults ("gather + partial")."""
  base = BlockSizes()
  if p.dot == "words":
    return f"words, bn {p.bn}"
  changed = [str(getattr(p, f)) for f in ("lookup", "convert", "rescale") if getattr(p, f) != getattr(base, f)]
  return " + ".join(changed + [f"{f} {getattr(p, f)}" for f in ("bn", "bk", "k_rows", "num_stages", "min_programs",
                                                                "prefetch") if getattr(p, f) != getattr(base, f)])


def policy_fields(fmt, m):
  """The values each BlockSizes field may take at (fmt, m): "fma" and "words" only for M = 1, "words" and bn 256
  only for the formats that convert integers (not NF4), "gather" / "prmt" only for NF4, "magic" / "magic16" only
  for the formats that convert integers."""
  f = dict(POLICY_FIELDS)
  if layout_of(fmt)[1]:  # the K-major kernel: tensor cores, its own code-to-value step; warpgroup dots need 4 warps
    return {**f, "dot": ("mma",), "lookup": ("select",), "convert": ("i2f",),
            "rescale": ("weight",), "bn": (64, 128, 256), "num_warps": (4, 8), "bk": (1, 2, 4, 8),
            "prefetch": (1, 0)}  # run 4: no K split (min_programs 1) and bn 32 were slow; prefetch in all 12 best
  if m > 1:
    f["dot"] = ("mma",)
  if fmt != "nf4":
    f["lookup"] = ("select",)
    if m == 1:
      f["bn"] += (256,)
  else:
    f["convert"] = ("i2f",)
    f["dot"] = tuple(d for d in f["dot"] if d != "words")
  return f


def valid_policy(p, m, k=None, n=128):
  """Whether `BlockSizes` accepts the combination (e.g. rescale="partial" needs tensor-core dots) and, given K, an
  explicit bk (times split_k) divides its blocks of 64."""
  try:
    bs = p.for_shape(m, n, k, 64) if k else p.for_shape(m, n)
  except ValueError:
    return False
  return not k or (k // 64) % (bs.bk * bs.split_k) == 0


def policy_of(blocks):
  """Every field of a policy (those the sweep varies and the rest, e.g. `KMAJOR`'s k_rows), as a dict."""
  return dataclasses.asdict(blocks)


def compile_many(jobs):
  """[(fn, args)] -> [compiled executable or exception], lowered and compiled on a thread pool (XLA's and Triton's
  compilers release the GIL: a sweep's hundred kernels compile in parallel on the machine's cores)."""
  from concurrent.futures import ThreadPoolExecutor

  def one(job):
    fn, args = job
    try:
      return jax.jit(fn).lower(*args).compile()
    except Exception as e:  # a policy that does not lower or compile is a result, not a crash
      return e
  with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
    out = list(pool.map(one, jobs))
  # a failure in the pool is retried alone, so that only a policy that fails by itself is reported as failing
  return [one(job) if isinstance(c, Exception) else c for job, c in zip(jobs, out)]


def time_policies(args, policies, x, qs, ref, pallas):
  """Each policy's op over the weight copies (as `time_op`), compiled in parallel, timed one after another; the
  first output checked against the reference. Returns one entry per policy."""
  fns = [(lambda x, ws, p=p: [pallas(p)(x, w) for w in ws]) for p in policies]
  compiled = compile_many([(f, (x, qs)) for f in fns])
  out = []
  for p, c in zip(policies, compiled):
    entry = {"policy": policy_of(p)}
    if isinstance(c, Exception):
      entry["error"] = err_text(c)
    else:
      try:
        first = np.asarray(jax.block_until_ready(c(x, qs))[0])
        entry["rel_err"] = rel_err(first, ref)
        entry["pass"] = bool(entry["rel_err"] < TOL)  # a fast policy that computes the wrong thing is no candidate
        entry["time_s"] = median_s(c, x, qs, reps=args.reps, warmup=max(0, args.warmup - 1)) / len(qs)
      except Exception as e:
        entry["error"] = err_text(e)
    out.append(entry)
  return out


def policy_sweep(args, result, shapes, pallas, gib, t_end):
  """A search over shape-independent kernel policies (`POLICY_FIELDS`: dot, NF4 lookup, bn, bk, warps, stages,
  min_programs, which sets split_k, prefetch, convert, rescale; combinations `BlockSizes` refuses are skipped) for
  each (format, M) of `SWEEP_CLASSES`, on the first shape: the default and the format's `SEED_POLICIES` entries, then
  random policies, then two rounds of every one-field change of the best so far; the best three and the default
  are then timed on the second shape too, and the one with the least total time wins. Every timing's output is
  checked against the reference. Returns {(fmt, M): winning BlockSizes}."""
  import random
  rng = random.Random(0)
  tuned = {}
  classes = (SWEEP_CLASSES[0], SWEEP_CLASSES[-1]) if args.dry_run else SWEEP_CLASSES
  share = (t_end - time.perf_counter()) / len(classes)
  for ci, (fmt, m) in enumerate(classes):
    c_end = min(t_end, time.perf_counter() + share * (1 if ci < len(classes) - 1 else 2))
    fields = policy_fields(fmt, m)
    default = default_for(m, fmt)
    entry = {"fmt": fmt, "M": m, "shapes": [list(s) for s in shapes[:2]], "default": policy_of(default), "timed": []}
    result["sweep"].append(entry)
    seen = {}

    def run(k, n, policies):
      _, qs = gpu_weights(args, k, n, fmt, gib)
      x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
      ref = np.asarray(qmatmul_reference(x, qs[0]))
      timed = time_policies(args, policies, x, qs, ref, pallas)
      for t in timed:
        t.update(K=k, N=n)
      entry["timed"].extend(timed)
      save_json(result, args.out)
      return timed

    def key(p):
      return tuple(sorted(policy_of(p).items()))

    def explore(policies, k, n):
      todo = [p for p in policies if key(p) not in seen and valid_policy(p, m, k, n)]
      for i in range(0, len(todo), 16):
        if time.perf_counter() > c_end:
          return
        for p, t in zip(todo[i:i + 16], run(k, n, todo[i:i + 16])):
          seen[key(p)] = (p, t)

    def best(n_best=1):
      ok = [(t["time_s"], p) for p, t in seen.values() if t.get("pass")]
      return [p for _, p in sorted(ok, key=lambda e: e[0])[:n_best]]

    k, n = shapes[0]
    space = [BlockSizes(**dict(zip(fields, combo))) for combo in itertools.product(*fields.values())]
    rng.shuffle(space)
    seeds = list(SEED_POLICIES.get(fmt, ()))
    explore([default] + seeds + space[:2 if args.dry_run else 31], k, n)
    for _ in range(0 if args.dry_run else 2):
      top = best()
      if not top:
        break
      explore([dataclasses.replace(top[0], **{f: v}) for f, vals in fields.items() for v in vals
               if v != getattr(top[0], f)], k, n)
    finalists = best(3)
    if not finalists:
      entry["winner"] = None
      continue
    finalists = finalists + ([default] if key(default) not in {key(p) for p in finalists} else [])
    if len(shapes) > 1 and time.perf_counter() < t_end:
      k2, n2 = shapes[1]
      second = {key(p): t for p, t in zip(finalists, run(k2, n2, finalists))}
    else:
      second = {}
    def total(p):
      t2 = second.get(key(p), {})
      return seen[key(p)][1]["time_s"] + (t2["time_s"] if t2.get("pass") else (0 if not second else float("inf")))
    win = min((p for p in finalists if key(p) in seen and seen[key(p)][1].get("pass")), key=total)
    d_total = total(default) if key(default) in seen and seen[key(default)][1].get("pass") else None
    entry["winner"] = policy_of(win)
    entry["winner_total_s"], entry["default_total_s"] = total(win), d_total
    entry["speedup_vs_default"] = d_total / total(win) if d_total else None
    tuned[(fmt, m)] = win
    print(f"{fmt:8s} M={m:<3d} {len(seen):3d} policies: best {policy_of(win)}  "
          f"x{entry['speedup_vs_default'] or float('nan'):.2f} vs default", flush=True)
  result["tuned"] = [{"fmt": f, "M": m, "policy": policy_of(p)} for (f, m), p in tuned.items()]
  save_json(result, args.out)
  return tuned


def tuned_for(tuned, fmt, m):
  """The swept policy for a main-table row: M = 1 its format's M = 1 class, 2..16 its M = 16 class; otherwise (a
  class not swept, larger M, no sweep) `default_blocks`. (The second H200 run gave int4 at M = 2..16 NF4's M = 16
  winner, which was slower there than the default had been in the first run.)"""
  p = tuned.get((fmt, 1 if m == 1 else 16)) if m <= 16 else None
  if p is None and layout_of(fmt)[1] and m <= 16:  # K-major: one policy for 1-16 rows (the dot pads them to 16)
    p = tuned.get((fmt, 16))
  return p if p is not None else default_for(m, fmt)


def print_gpu_row(r):
  us = lambda k: f"{r[k]['time_s'] * 1e6:9.1f}" if "time_s" in r.get(k, {}) else f"{'err' if k in r else '-':>9}"
  chk = r["check"]
  ck = f"{chk['rel_err']:.1e}{'' if chk['pass'] else '!'}" if "rel_err" in chk else "ERROR"
  p = r.get("pallas", {})
  gb = f"{p['weight_gb_s']:7.0f} ({p['frac_copy_bw']:4.0%})" if "time_s" in p else " " * 14
  rat = lambda k: f"{r[k]:6.2f}" if k in r else f"{'-':>6}"
  def dev_of(k):  # device time (profiled rows): us, kernels per op, % of copy bandwidth
    d = r.get(k, {}).get("device", {})
    return (f" {d['device_s'] * 1e6:7.1f} {d['kernels_per_op']:4.1f} {d.get('device_frac_copy_bw', float('nan')):4.0%}"
            if "device_s" in d else "")
  dev = dev_of("pallas") + (f"  bf16 dot:{dev_of('bf16_dot')}" if dev_of("bf16_dot") else "")
  km = ""
  if "pallas_kmajor" in r:
    kp, kc = r["pallas_kmajor"], r["kmajor_check"]
    km = (f"\n{'':20s}K-major {kc.get('rel_err', float('nan')):.1e}{'' if kc['pass'] else '!'} {us('pallas_kmajor')}"
          f" us {kp.get('frac_copy_bw', float('nan')):4.0%} of copy, x{r.get('pallas_kmajor_over_pallas_time', float('nan')):.2f}"
          f" the QTensor kernel's time, x{r.get('pallas_kmajor_over_reference_time', float('nan')):.2f} the reference's;"
          f" device{dev_of('pallas_kmajor') or ' -'}")
  print(f"{r['M']:5d} {r['K']:5d} {r['N']:5d} {r['fmt']:8s} {ck:>8s} {us('pallas')} {us('reference')} "
        f"{us('bf16_dot')} {gb} {p.get('tflop_s', float('nan')):7.2f} {rat('pallas_over_reference_time')} "
        f"{rat('pallas_over_bf16_dot_time')}{dev}{km}", flush=True)


GPU_HEADER = (f"{'M':>5} {'K':>5} {'N':>5} {'fmt':8s} {'rel err':>8} {'pallas us':>9} {'ref us':>9} {'bf16 us':>9} "
              f"{'pallas GB/s(%copy)':>14} {'TFLOP/s':>7} {'p/ref':>6} {'p/bf16':>6}  (--profile, M <= 16: device us, "
              f"kernels per op, % of copy bandwidth over device time; pallas, bf16 dot, K-major)")


def tree_bytes(params, only_linear=False):
  """Bytes of the weights `params` holds (`nbytes()` for 4-bit leaves, either layout); only_linear: the
  DEFAULT_RULES kernels."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
    key = "/".join(str(getattr(p, "key", p)) for p in path if not hasattr(p, "idx"))  # per-layer: drop the index
    if only_linear and not any(re.fullmatch(r, key) for r in DEFAULT_RULES):
      continue
    total += leaf.nbytes() if is_quantized(leaf) else leaf.nbytes
  return total


NARROW = {  # weight dtype -> (activation dtype, accumulation dtype) of the XLA dot
    "bfloat16": (jnp.float32, jnp.float32), "int8": (jnp.float32, jnp.float32), "int4": (jnp.float32, jnp.float32),
    "int8 x int8 -> int32": (jnp.int8, jnp.int32)}


def narrow_dots(args, result, f32_dot):
  """Why 4-bit does not beat fp32 on XLA:CPU: a dot whose weight is stored narrower than f32 (bf16, int8, int4,
  and int8 x int8 with int32 accumulation, llama.cpp's scheme) against the f32 dot, M = 1, 576 x 1536."""
  k, n, m = 576, 1536, 1
  c = max(2, -(-(64 << 20) // (4 * k * n)))
  w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.02
  x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
  f32 = time_op(f32_dot, x, copies_of(w, c), args)
  rows = result["narrow_dot"] = []
  print(f"\nnarrow weights, M=1 576x1536: {'weight':22s} {'us':>8} {'vs f32 dot':>10}  (XLA:CPU converts before the dot)")
  for name, (xdt, acc) in NARROW.items():
    wq = (jnp.clip(jnp.round(w * 300), -7, 7) if "int" in name else w).astype(name.split()[0])
    op = lambda x, w, xdt=xdt, acc=acc: jax.lax.dot_general(  # int8 x: a stand-in for quantized activations
        x.astype(xdt), w.astype(xdt), (((1,), (0,)), ((), ())), preferred_element_type=acc)
    t = time_op(op, x, copies_of(wq, c), args)
    rows.append({"M": m, "K": k, "N": n, "weight": name, "time_s": t, "f32_dot_time_s": f32, "over_f32_dot": t / f32,
                 "weight_bytes": int(wq.nbytes)})
    print(f"{'':31s}{name:22s} {t * 1e6:8.1f} {t / f32:10.2f}", flush=True)


def decode_temp_bytes(params, cfg, new_tokens):
  """XLA temporaries of the batch-1 decode program `generate_ids` runs for a 32-token prompt (its default chunk of
  DECODE_CHUNK steps): what a decode step holds besides weights and cache; a dequantized base held at once would
  show here."""
  from lora_jax.generate import DECODE_CHUNK, SamplingConfig, cache_slots, decode_chunk
  from lora_jax.models import KVCache
  cache = KVCache.empty(cfg, 1, cache_slots(32, new_tokens), jnp.float32, per_layer=True)
  compiled = decode_chunk.lower(params, cfg, cache, jnp.zeros((1, cfg.vocab_size)), jnp.zeros((1,), bool),
                                jnp.int32(32), jnp.int32(DECODE_CHUNK), jax.random.key(0), steps=DECODE_CHUNK,
                                sampling=SamplingConfig(), eos=()).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def run_cpu(args, result):
  from lora_jax import load_model
  from lora_jax.generate import generate_ids
  from lora_jax.models import unstack_layers

  from lora_jax.kernels.qmatmul import cpu as cpu_kernel
  result["cpu_kernel"] = {"available": cpu_kernel.available()[0], "why_not": cpu_kernel.available()[1],
                          "vector_isa": cpu_kernel.vector_isa(), "flags": list(cpu_kernel.FLAGS)}
  print(f"CPU kernel: {result['cpu_kernel']['vector_isa'] or result['cpu_kernel']['why_not']}", flush=True)
  peaks = result["peaks"] = device_peaks(args, 256 << 20, 2048, jnp.float32)
  print(f"copy {peaks['copy_gb_s']:.1f} GB/s, f32 matmul {peaks['matmul_tflop_s'] * 1e3:.0f} GFLOP/s", flush=True)
  print(f"\n{'M':>4} {'K':>5} {'N':>5} {'fmt':8s} {'cpu us':>8} {'ref us':>9} {'small_m us':>10} {'f32 dot us':>10} "
        f"{'cpu/f32':>7} {'ref/f32':>7} {'small/f32':>9} {'cpu GB/s':>8}")
  f32_dot = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
  for k, n in CPU_SHAPES:
    c = max(2, min(30, -(-(64 << 20) // (4 * k * n))))  # C copies: >= 64 MiB of f32 weights, past the CPU caches
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.02
    wf = copies_of(w, c)
    for fmt in args.formats:
      qs = copies_of(quantize(w, fmt, block_size=64), c)
      for m in CPU_MS:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32)
        row = {"M": m, "K": k, "N": n, "fmt": fmt, "copies": c, "weight_bytes": qs[0].nbytes()}
        row["reference"] = perf(time_op(qmatmul_reference, x, qs, args), m, k, n, row["weight_bytes"], peaks)
        row["f32_dot"] = perf(time_op(f32_dot, x, wf, args), m, k, n, 4 * k * n, peaks)
        row["reference_over_f32_dot_time"] = row["reference"]["time_s"] / row["f32_dot"]["time_s"]
        if m <= CPU_M_MAX:  # the path `qmatmul` picks on CPU where the kernel builds
          row["cpu"] = perf(time_op(qmatmul_cpu, x, qs, args), m, k, n, row["weight_bytes"], peaks)
          row["cpu_over_f32_dot_time"] = row["cpu"]["time_s"] / row["f32_dot"]["time_s"]
        if m <= SMALL_M_MAX:  # the XLA path for decoding without the kernel
          row["small_m"] = perf(time_op(qmatmul_small_m, x, qs, args), m, k, n, row["weight_bytes"], peaks)
          row["small_m_over_f32_dot_time"] = row["small_m"]["time_s"] / row["f32_dot"]["time_s"]
        result["rows"].append(row)
        us = lambda key, w: f"{row[key]['time_s'] * 1e6:{w}.1f}" if key in row else f"{'-':>{w}}"
        rat = lambda key, w: f"{row[key]:{w}.2f}" if key in row else f"{'-':>{w}}"
        print(f"{m:4d} {k:5d} {n:5d} {fmt:8s} {us('cpu', 8)} {us('reference', 9)} {us('small_m', 10)} "
              f"{us('f32_dot', 10)} {rat('cpu_over_f32_dot_time', 7)} {rat('reference_over_f32_dot_time', 7)} "
              f"{rat('small_m_over_f32_dot_time', 9)} "
              f"{row['cpu']['weight_gb_s'] if 'cpu' in row else float('nan'):8.2f}", flush=True)
  save_json(result, args.out)
  narrow_dots(args, result, f32_dot)
  save_json(result, args.out)

  model = load_model("smollm2-135m")
  ids = model.tokenizer.encode(PARAGRAPH)[:32]
  assert len(ids) == 32, len(ids)
  new, base_ids, ids_of = args.new_tokens, None, {}
  result["decode_config"] = {"model": "smollm2-135m", "gguf": model.source, "batch": 1, "prompt_tokens": 32,
                             "new_tokens": new, "eos": [], "reps": args.decode_reps, "statistic": "median"}
  print(f"\n{'variant':8s} {'weights MB':>10} {'linear MB':>9} {'tok/s':>7} {'vs fp32':>7} {'same ids':>8} {'temp MB':>8} {'= kernel':>8}")
  for variant in ("fp32", "nf4", "int4", "native", "nf4-xla", "int4-xla", "native-xla"):
    mode, xla = variant.split("-")[0], variant.endswith("-xla")
    os.environ["LORA_JAX_CPU_KERNEL"] = "0" if xla else "1"  # read by qmatmul's dispatch at trace time
    jax.clear_caches()
    params = model.params if mode == "fp32" else quantize_model_params(model.params, mode,
                                                                       gguf_blocks=model.quantized)
    params = unstack_layers(params)  # the layout generation runs in (lora_jax.models.unstack_layers)
    gen = lambda: generate_ids(params, model.config, [ids], max_new_tokens=new, eos=())[0][0]
    out = gen()
    assert len(out) == new, len(out)
    base_ids = base_ids or out
    times = []
    t = median_s(gen, reps=args.decode_reps, warmup=0, record=times)
    same = identical_prefix(out, base_ids)
    ids_of[variant] = out
    d = {"variant": variant, "weight_bytes": tree_bytes(params), "linear_weight_bytes": tree_bytes(params, True),
         "generate_s": t, "times_s": times, "tok_s": new / t, "identical_prefix_vs_fp32": same,
         "identical_prefix_vs_kernel": identical_prefix(out, ids_of[mode]) if xla else None,
         "decode_temp_bytes": decode_temp_bytes(params, model.config, new)}
    d["tok_s_vs_fp32"] = d["tok_s"] / (result["decode"][0]["tok_s"] if result["decode"] else d["tok_s"])
    result["decode"].append(d)
    print(f"{variant:8s} {d['weight_bytes'] / 1e6:10.1f} {d['linear_weight_bytes'] / 1e6:9.1f} {d['tok_s']:7.1f} "
          f"{d['tok_s_vs_fp32']:7.2f} {same:>5d}/{new} {d['decode_temp_bytes'] / 1e6:8.1f} "
          f"{str(d['identical_prefix_vs_kernel']) + '/' + str(new) if xla else '-':>8}", flush=True)
    del params
    save_json(result, args.out)
  os.environ.pop("LORA_JAX_CPU_KERNEL")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--mode", choices=("gpu", "cpu"), help="default: gpu if jax.default_backend() is a GPU, else cpu")
  ap.add_argument("--quick", action="store_true", help="GPU: --shapes small, 10 reps; CPU: 3 reps, 16 new tokens, 1 decode rep")
  ap.add_argument("--shapes", choices=tuple(GPU_SHAPES), default="all",
                  help="GPU (K, N) set: all (4 shapes), small (2), cross (every K, N in 4096, 8192, 14336; all's first)")
  ap.add_argument("--formats", type=lambda v: tuple(v.split(",")), default=FORMATS, help="GPU: nf4,int4_sym")
  ap.add_argument("--policy-sweep", action="store_true", help="GPU: search the kernel's BlockSizes policies first "
                  "(nf4 M = 1 and 16, int4_sym M = 1, int4_sym K-major M = 16); the main table then uses the winners")
  ap.add_argument("--floor", action="store_true", help="GPU: first, where the one-row time goes (the op, XLA's "
                  "dequantize + dot, a bf16 dot, a Pallas kernel that only streams the codes (as stored, and laid out in "
                  "contiguous column slabs), one that only writes, XLA's sum of the codes; each timed and profiled: device time, kernels per op)")
  ap.add_argument("--kmajor-grid", action="store_true", help="GPU: first, the K-major kernel's device time over "
                  "pipeline depth, step size, programs and tile (GRID_FIELDS); the main table's K-major rows then use "
                  "the fastest")
  ap.add_argument("--grid-budget-s", type=float, default=1e9, help="GPU: seconds for --kmajor-grid")
  ap.add_argument("--profile", action="store_true", help="GPU: also profile the main table's Pallas op at M <= 16 "
                  "(one traced call per row: kernels per op, device time; benchmarks/device_trace.py)")
  ap.add_argument("--dry-run", action="store_true", help="GPU mode on any backend: tiny shapes, Pallas interpret, 1 rep")
  ap.add_argument("--reps", type=int, help="timed calls per op, median reported (GPU 20, CPU 10; quick 10 / 3)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--budget-s", type=float, default=1e9, help="GPU: skip the remaining shapes of the main table "
                  "after this many seconds")
  ap.add_argument("--floor-budget-s", type=float, default=1e9, help="GPU: seconds for --floor")
  ap.add_argument("--sweep-budget-s", type=float, default=1e9, help="GPU: seconds for the policy sweep")
  ap.add_argument("--lora-budget-s", type=float, default=1e9, help="GPU: seconds for the fused-LoRA timing")
  ap.add_argument("--decode-budget-s", type=float, default=0, help="GPU: seconds for the end-to-end decode of a "
                  "random Llama with Llama-3-8B's layer shapes (bf16, int4, NF4; both 4-bit layouts); 0 (default) "
                  "skips it")
  ap.add_argument("--new-tokens", type=int, help="CPU decode: new tokens (64; 16 with --quick)")
  ap.add_argument("--decode-reps", type=int, help="CPU decode: timed repetitions (3; 1 with --quick)")
  ap.add_argument("--out", help="JSON path (default benchmarks/results/int4_matmul_{mode}.json)")
  args = ap.parse_args()
  args.mode = args.mode or ("gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu")
  if args.dry_run:
    args.mode, args.reps, args.warmup, args.policy_sweep, args.floor, args.profile = "gpu", 1, 0, True, True, True
    args.kmajor_grid, args.decode_budget_s = True, 1e9
    args.out = args.out or "/tmp/int4_matmul_dryrun.json"
  if args.quick and args.mode == "gpu":
    args.shapes = "small"
  if not args.reps:
    args.reps = (10 if args.quick else 20) if args.mode == "gpu" else (3 if args.quick else 10)
  args.new_tokens = args.new_tokens or (16 if args.quick else 64)
  args.decode_reps = args.decode_reps or (1 if args.quick else 3)
  args.out = args.out or os.path.join(RESULTS, f"int4_matmul_{args.mode}.json")
  result = {"benchmark": "int4_matmul", "mode": args.mode, "dry_run": args.dry_run, "machine": machine(),
            "config": {k: v for k, v in vars(args).items() if k != "out"} | {"tolerance": TOL, "block_size": 64},
            "rows": [], "sweep": [], "decode": [], "notes": []}
  t0 = time.perf_counter()
  if args.mode == "gpu":
    result["notes"].append("time per op = wall of one jit over C distinct weight copies / C (no L2 reuse, dispatch "
                           "amortised); weight_gb_s = weight bytes / time; frac_copy_bw vs jitted a+1 (read+write)")
    run_gpu(args, result)
  else:
    result["notes"].append("CPU has no Pallas: qmatmul runs the C++ kernel (XLA FFI, kernels/qmatmul/cpu_kernel.cc) "
                           "for <= CPU_M_MAX rows; without it ('-xla' variants) small_m (<= SMALL_M_MAX rows, "
                           "int4/GGUF) or the reference, each weight's dequantization depending on its input "
                           "(kernels._after), so none is hoisted out of the decode loop or run ahead: "
                           "decode_temp_bytes. Decode tok/s is end to end (prefill included), all variants in the "
                           "per-layer layout.")
    run_cpu(args, result)
  result["wall_s"] = time.perf_counter() - t0
  save_json(result, args.out)
  print(f"wrote {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
  main()
