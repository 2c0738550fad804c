"""Training-step benchmark: one LoRA step, lora_jax vs transformers + PEFT, same model, same batch, CPU fp32.

Model: the ``smollm2-135m`` preset (SmolLM2-135M-Instruct GGUF, dequantized to float32 by both libraries).
LoRA r=8, alpha=16, dropout 0 on q/k/v/o/gate/up/down of every layer; AdamW lr 1e-4 (betas 0.9/0.999, eps 1e-8,
no weight decay on either side); batch 4 x 256 random token ids (numpy seed 0, vocab 49152), causal-LM loss on all
tokens (mean next-token cross-entropy over the 4 x 255 shifted targets, no padding). Each system runs in its own
subprocess (``--worker lora_jax`` / ``--worker hf``) so peak RSS figures are independent; a worker prints one
``RESULT {json}`` line. The lora_jax worker runs first and hands the ids and the GGUF path to the HF worker.

  * lora_jax: ``make_train_step`` (one jitted function: forward, backward w.r.t. the adapter only, AdamW update),
              with its default activation policy ``remat="auto"``: "dots" for the fp32 base (projection outputs
              kept, the rest recomputed), "full" for a 4-bit base (layer inputs kept).
  * HF:       ``get_peft_model``, ``model.train()``, ``loss.backward(); opt.step(); opt.zero_grad()``; 2 torch threads.

Measured per system: first_step_s (the first step; for lora_jax it includes tracing + XLA compilation), then the
remaining warm-up steps untimed, then the median wall seconds of N timed steps (each blocks on the loss), tokens/s
= 1024 / median, peak RSS (``ru_maxrss`` of the worker), cpu_util (the worker's CPU seconds over the timed steps'
wall seconds: the cores it kept busy, so the table shows whether both sides used the same cores), and the loss of
the first step. At init LoRA B = 0, so the
first loss is the base model's loss on identical weights and ids: the two must agree to ~1e-3.

FLOPs of one step (multiply-add = 2 FLOPs; T = batch x seq = 1024 tokens; d hidden, L layers, V vocab, r rank):
  fwd_base = 2 T L (d*q + 2 d*kv + q*d + 3 d*ffn)        the frozen projection matmuls (q = heads*head_dim, kv likewise)
  fwd_attn = 4 B S^2 heads head_dim L                     QK^T and PV over the full S x S (a fixed convention for both
                                                          sides; lora_jax's causal blocks skip ~3/8 of it at S=256)
  fwd_head = 2 T d V                                      the tied LM head (49152-vocab logits)
  fwd_lora = 2 T r L sum_targets(in + out)                x A and (x A) B
  step = 2 fwd_base + 2 fwd_head + 3 fwd_attn + 3 fwd_lora
Backward of a frozen matmul only needs the input gradient (1x its forward; no weight gradient), so base projections
and the LM head cost 2x forward in total; the attention products have two activation inputs (2x forward in the
backward) and the LoRA matmuls need input and weight gradients (2x), hence the factor 3. Norms, RoPE, softmax,
the loss and the optimizer update are elementwise and not counted. Achieved GFLOP/s = step FLOPs / median step
time. Peak: median of 10 jitted fp32 ``jnp.dot`` (2048x2048)@(2048x2048) after 2 warm-ups, in the lora_jax worker
(2*2048^3 FLOPs each); "FLOP floor" = step FLOPs / peak, the step time if every FLOP ran at matmul peak.

QLoRA (``--qlora nf4,native``, default): the same lora_jax step with the frozen base quantized (NF4, or the GGUF's
own Q4_1 blocks), each in its own worker, for peak RSS and step time against the fp32 base. On CPU, at 1024 rows,
the 4-bit base takes the XLA path: each weight is dequantized right before its GEMM (x [W | A], `lora_linear`),
forward and backward, and with "full" rematerialisation once more for the recomputed forward.

Usage: python benchmarks/train_step.py [--quick] [--steps N] [--qlora nf4,native|none] [--out ...json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (cpu_seconds, hf_causal_lm_from_gguf, machine_info, peak_rss_mib, run_worker,  # noqa: E402
                     save_json, worker_main)

PRESET = "smollm2-135m"
BATCH, SEQ, VOCAB, SEED = 4, 256, 49152, 0
RANK, ALPHA, LR = 8, 16.0, 1e-4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEAK_N = 2048


def run_steps(step, args):
  """first step (timed alone), warm-up - 1 untimed steps, `steps` timed steps; step() blocks and returns the loss."""
  t0 = time.perf_counter()
  losses = [step()]
  first = time.perf_counter() - t0
  for _ in range(args.warmup - 1):
    losses.append(step())
  times = []
  cpu0 = cpu_seconds()
  for _ in range(args.steps):
    t0 = time.perf_counter()
    losses.append(step())
    times.append(time.perf_counter() - t0)
  util = (cpu_seconds() - cpu0) / sum(times)
  print(f"  first {first:.2f}s, steps: {' '.join(f'{t:.3f}s' for t in times)} (cpu_util {util:.2f})", file=sys.stderr,
        flush=True)
  return {"first_step_s": first, "median_step_s": statistics.median(times), "times_s": [round(t, 4) for t in times],
          "cpu_util": util,
          "first_loss": losses[0], "losses": losses, "peak_rss_mib": peak_rss_mib()}


def worker_lora_jax(args, _inputs):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lora_jax import load_model
  from lora_jax.peft import LoraConfig, init_lora, lora_optimizer, trainable_summary
  from lora_jax.train import TrainState, make_train_step, resolve_remat

  t0 = time.perf_counter()
  m = load_model(PRESET)
  if args.quantize != "none":  # QLoRA: the frozen base in 4 bits; the float copy is dropped before training
    from lora_jax.quant import quantize_model_params
    m.params = quantize_model_params(m.params, args.quantize, gguf_blocks=m.quantized)
    m.quantized = {}
  load_s = time.perf_counter() - t0
  assert m.config.vocab_size == VOCAB, m.config.vocab_size
  ids = np.random.default_rng(SEED).integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
  lcfg = LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
  adapter, frozen = init_lora(lcfg, m.config, m.params, key=jax.random.key(0))
  m.params = None
  tx = lora_optimizer(LR, adapter)
  state = TrainState(jnp.int32(0), adapter, tx.init(adapter), jax.random.key_data(jax.random.key(1)))
  step_fn = make_train_step(m.config, lcfg, tx)
  batch = {"ids": ids, "positions": np.tile(np.arange(SEQ), (BATCH, 1)).astype(np.int32),
           "segments": np.ones((BATCH, SEQ), np.int32), "loss": np.ones((BATCH, SEQ), bool)}
  batch = jax.tree.map(jnp.asarray, batch)

  def step():
    nonlocal state
    state, metrics = step_fn(state, frozen, batch)
    return float(metrics["loss"])

  out = {"load_s": load_s, "gguf": m.source, "ids": ids.tolist(), **run_steps(step, args)}
  out["trainable"] = {k: v for k, v in trainable_summary(lcfg, m.config, adapter).items() if k != "text"}
  out["base_weight_bytes"] = sum(int(a.nbytes) for a in jax.tree.leaves(frozen))
  out["remat"] = resolve_remat("auto", frozen)  # make_train_step's default policy for this base
  if args.quantize != "none":
    return out
  c = m.config
  out["model"] = {k: getattr(c, k) for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                             "num_kv_heads", "head_dim", "vocab_size", "tie_embeddings")}

  a, b = (jax.random.normal(k, (PEAK_N, PEAK_N), jnp.float32) for k in jax.random.split(jax.random.key(2)))
  dot = jax.jit(jnp.dot)
  for _ in range(2):
    dot(a, b).block_until_ready()
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  out["matmul_peak"] = {"n": PEAK_N, "median_s": statistics.median(times), "times_s": [round(t, 4) for t in times],
                        "gflop_s": 2 * PEAK_N ** 3 / statistics.median(times) / 1e9}
  out["device"] = str(jax.devices()[0])
  return out


def worker_hf(args, inputs):
  import peft
  import torch
  t0 = time.perf_counter()
  model = hf_causal_lm_from_gguf(inputs["gguf"])
  model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                     target_modules=list(TARGETS)))
  load_s = time.perf_counter() - t0
  trainable, total = model.get_nb_trainable_parameters()  # the figures print_trainable_parameters prints
  # weight_decay=0 to match lora_jax's lora_optimizer default (torch's AdamW default is 0.01)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
  model.train()
  ids = torch.tensor(inputs["ids"], dtype=torch.long)

  def step():
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()

  out = {"load_s": load_s, **run_steps(step, args)}
  out["trainable"] = {"trainable": trainable, "all": total, "percent": 100 * trainable / total}
  out["threads"] = torch.get_num_threads()
  out["attn_implementation"] = model.config._attn_implementation
  return out


def step_flops(m):
  d, f, L, V = m["hidden_size"], m["intermediate_size"], m["num_layers"], m["vocab_size"]
  q, kv, T = m["num_heads"] * m["head_dim"], m["num_kv_heads"] * m["head_dim"], BATCH * SEQ
  io = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
        "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
  fwd = {"base": 2 * T * L * sum(i * o for i, o in io.values()),
         "attention": 4 * BATCH * SEQ ** 2 * q * L,
         "lm_head": 2 * T * d * V,
         "lora": 2 * T * RANK * L * sum(i + o for t, (i, o) in io.items() if t in TARGETS)}
  total = 2 * fwd["base"] + 2 * fwd["lm_head"] + 3 * fwd["attention"] + 3 * fwd["lora"]
  return {"forward": fwd, "step": total}


def worker(name, args, inputs=None, quantize="none"):
  return run_worker(__file__, name, [name.split(":")[0], "--quantize", quantize, "--steps", str(args.steps),
                                     "--warmup", str(args.warmup)], inputs)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up step, 2 timed steps")
  ap.add_argument("--steps", type=int, help="timed steps, median reported (default 5; 2 with --quick)")
  ap.add_argument("--warmup", type=int, help="warm-up steps incl. the first (default 2; 1 with --quick)")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                "train_step.json"),
                  help="JSON output (default benchmarks/results/train_step.json)")
  ap.add_argument("--qlora", default="nf4,native",
                  help="comma-separated 4-bit base formats for extra lora_jax QLoRA workers (none: skip; default "
                       "nf4,native): step time, peak RSS and first loss against the fp32-base LoRA worker")
  ap.add_argument("--worker", choices=("lora_jax", "hf"), help=argparse.SUPPRESS)
  ap.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
  args = ap.parse_args()
  args.steps = args.steps or (2 if args.quick else 5)
  args.warmup = max(1, args.warmup or (1 if args.quick else 2))

  if args.worker:
    fn = worker_lora_jax if args.worker == "lora_jax" else worker_hf
    worker_main(fn, args)
    return

  lj = worker("lora_jax", args)
  hf = worker("hf", args, {k: lj[k] for k in ("gguf", "ids")})
  qlora = {fmt: worker(f"lora_jax:{fmt}", args, quantize=fmt)
           for fmt in args.qlora.split(",") if fmt and fmt != "none"}
  flops = step_flops(lj["model"])
  peak = lj["matmul_peak"]["gflop_s"] * 1e9
  tokens = BATCH * SEQ
  for r in (lj, hf):
    r["tok_s"] = tokens / r["median_step_s"]
    r["gflop_s"] = flops["step"] / r["median_step_s"] / 1e9
    r["fraction_of_peak"] = flops["step"] / r["median_step_s"] / peak

  rows = [("load (s)", "load_s", "hf/lj"), ("first step incl. compile (s)", "first_step_s", "hf/lj"),
          ("median step (s)", "median_step_s", "hf/lj"), ("tokens/s", "tok_s", "lj/hf"),
          ("achieved GFLOP/s", "gflop_s", "lj/hf"), ("fraction of matmul peak", "fraction_of_peak", "lj/hf"),
          ("peak RSS (MiB)", "peak_rss_mib", "hf/lj"), ("cores busy while timed (cpu_util)", "cpu_util", None),
          ("first-step loss", "first_loss", None)]
  figures = {}
  for label, k, kind in rows:
    a, b = lj[k], hf[k]
    figures[label] = {"lora_jax": a, "transformers": b, "ratio": (b / a if kind == "hf/lj" else a / b) if kind else None,
                      "ratio_kind": kind}
  w = max(len(l) for l in figures) + 2
  print(f"\n{'metric':<{w}}{'lora_jax':>12}{'transformers+PEFT':>19}{'ratio':>14}")
  for label, f in figures.items():
    fmt = ".4f" if label in ("first-step loss", "fraction of matmul peak") else ".2f" if f["lora_jax"] < 100 else ".0f"
    ratio = f"{f['ratio']:.2f} ({f['ratio_kind']})" if f["ratio"] is not None else ""
    print(f"{label:<{w}}{f['lora_jax']:>12{fmt}}{f['transformers']:>19{fmt}}{ratio:>14}")
  loss_diff = lj["first_loss"] - hf["first_loss"]
  floor = flops["step"] / peak
  print(f"\nfirst-step loss difference lj - hf: {loss_diff:+.2e}")
  print(f"trainable params: lora_jax {lj['trainable']['trainable']:,} / {lj['trainable']['all']:,}; "
        f"PEFT {hf['trainable']['trainable']:,} / {hf['trainable']['all']:,}")
  print(f"step FLOPs {flops['step'] / 1e9:.1f} GFLOP; matmul peak ({PEAK_N}^2 fp32 jnp.dot) "
        f"{peak / 1e9:.1f} GFLOP/s; FLOP floor {floor:.2f} s/step")
  qlora_figures = {}
  if qlora:
    print(f"\n{'lora_jax base':<16}{'base MB':>9}{'step (s)':>10}{'peak RSS (MiB)':>16}{'RSS / fp32':>12}{'first loss':>12}")
    for fmt, r in (("float32", lj), *qlora.items()):
      qlora_figures[fmt] = {"base_weight_mb": r["base_weight_bytes"] / 1e6, "median_step_s": r["median_step_s"],
                            "peak_rss_mib": r["peak_rss_mib"], "rss_vs_fp32": r["peak_rss_mib"] / lj["peak_rss_mib"],
                            "first_loss": r["first_loss"], "remat": r.get("remat")}
      f = qlora_figures[fmt]
      print(f"{fmt:<16}{f['base_weight_mb']:>9.0f}{f['median_step_s']:>10.2f}{f['peak_rss_mib']:>16.0f}"
            f"{f['rss_vs_fp32']:>12.2f}{f['first_loss']:>12.4f}")

  result = {
      "benchmark": "train_step", "machine": machine_info(),
      "config": {"model": PRESET, "gguf": lj["gguf"], "dtype": "float32", "batch": BATCH, "seq": SEQ,
                 "tokens_per_step": tokens, "ids": f"numpy default_rng({SEED}).integers(0, {VOCAB}, ({BATCH}, {SEQ}))",
                 "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": list(TARGETS)},
                 "optimizer": {"name": "AdamW", "lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
                 "loss": "mean next-token CE over all 4x255 targets", "warmup_steps": args.warmup,
                 "timed_steps": args.steps, "statistic": "median", "torch_threads": hf["threads"],
                 "hf_attn_implementation": hf["attn_implementation"], "jax_device": lj["device"], "quick": args.quick},
      "figures": figures, "first_loss_diff": loss_diff, "qlora": qlora_figures,
      "trainable": {"lora_jax": lj["trainable"], "transformers": hf["trainable"]},
      "flops": {**flops, "matmul_peak_gflop_s": peak / 1e9, "floor_s": floor,
                "formula": "2*fwd_base + 2*fwd_lm_head + 3*fwd_attention + 3*fwd_lora (see module docstring)"},
      "raw": {name: {k: v for k, v in r.items() if k not in ("ids", "model")}
              for name, r in (("lora_jax", lj), ("transformers", hf))},
  }
  save_json(result, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
