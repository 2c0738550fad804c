"""Generation benchmark: lora_jax vs Hugging Face transformers, same model, same prompt, same run, CPU fp32.

Model: the ``smollm2-135m`` preset (SmolLM2-135M-Instruct GGUF, dequantized to float32 by both libraries).
Each system runs in its own subprocess (``--worker lora_jax`` / ``--worker hf``) so that peak RSS figures are
independent; a worker prints one ``RESULT {json}`` line on stdout. The lora_jax worker runs first and hands the
prompt ids (the model tokenizer's encoding of a fixed paragraph, cut to exactly 32 tokens; a 512-token prompt
repeats the paragraph) and the GGUF path to the HF worker, so both see identical inputs.

Measured per system (median of 3 timed repetitions after one untimed warm-up call that compiles/caches):
  * load_s:          wall time to load the cached model (lora_jax ``load_model``; HF ``from_pretrained(gguf_file=)``)
  * prefill tok/s:   full-sequence forward (logits at every position, no KV cache) on 8x32 and 1x512 tokens
  * generate tok/s:  end to end, batch x new tokens / wall time of the whole greedy generate call (with prefill)
  * decode tok/s:    batch x new tokens / (generate wall - wall of the generate-internal prefill, timed apart:
                     lora_jax ``prefill`` into an empty KV cache, HF forward with ``use_cache`` and
                     ``logits_to_keep=1``)
  * peak_rss_mib:    ``ru_maxrss`` of the worker process at the end (and right after loading)
  * weight GB/s:     b=1 decode reads every weight once per token (538 MB in fp32): bytes x tok/s, against the
                     machine's read bandwidth measured in the same run (a jitted sum over 1 GiB, own worker process)
lora_jax decodes with the per-layer parameter layout (``Model.unstack_layers``, part of its load time); the
stacked (``lax.scan``) layout's generate calls are timed last (after the RSS reading): the ablation behind that choice.
Greedy decoding must produce all new tokens: lora_jax gets ``eos=()``; HF gets ``min_new_tokens = max_new_tokens``.
Threads: torch uses 2 threads (``torch.set_num_threads(2)``); XLA uses its default (all cores).

Every repetition's time goes to stderr and into the JSON (``raw.*.times_s``): on a small shared VM single
repetitions can be several times slower than the rest, so look at the spread before trusting a ratio.

Usage: python benchmarks/generate.py [--quick] [--reps N] [--new-tokens N] [--out benchmarks/results/generate.json]
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
BATCHES = (1, 8)
PROMPT_LEN = 32
LONG_LEN = 512
PARAGRAPH = ("The old lighthouse stood at the edge of the cliff, its white paint peeling after decades of salt and "
             "wind. Every evening the keeper climbed the narrow spiral staircase, trimmed the wick, and watched the "
             "beam sweep across the dark water, counting the ships that passed safely into the harbour below. ")

TIMES = {}  # every repetition's wall seconds, by label: reported in the JSON to show the spread
UTIL = {}  # cores kept busy over those repetitions (CPU seconds / wall seconds), by label


def timed(label, fn, reps):
  """Median wall seconds of `reps` calls of fn() (fn must block until its result is ready)."""
  times = []
  cpu0 = cpu_seconds()
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  TIMES[label] = [round(t, 4) for t in times]
  UTIL[label] = round((cpu_seconds() - cpu0) / sum(times), 3)
  print(f"  {label}: {' '.join(f'{t:.3f}s' for t in times)} (cpu_util {UTIL[label]:.2f})", file=sys.stderr, flush=True)
  return statistics.median(times)


def worker_lora_jax(args, _inputs):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lora_jax import load_model
  from lora_jax.generate import cache_slots, generate_ids, prefill
  from lora_jax.models import KVCache, forward, stack_layers

  t0 = time.perf_counter()
  m = load_model(PRESET)
  out = {"load_stacked_s": time.perf_counter() - t0, "gguf": m.source}
  text = PARAGRAPH * 12
  long_ids = m.tokenizer.encode(text)[:LONG_LEN]
  assert len(long_ids) == LONG_LEN, len(long_ids)
  ids = long_ids[:PROMPT_LEN]
  out["prompt_ids"], out["long_ids"] = ids, long_ids
  cfg, n = m.config, args.new_tokens
  out["weight_bytes"] = sum(int(a.nbytes) for a in jax.tree.leaves(m.params))

  t1 = time.perf_counter()
  m.unstack_layers()
  out["load_s"] = out["load_stacked_s"] + time.perf_counter() - t1
  out["rss_after_load_mib"] = peak_rss_mib()
  params = m.params
  fwd = jax.jit(forward, static_argnums=1)

  for b, t, tokens in ((8, PROMPT_LEN, [ids] * 8), (1, LONG_LEN, [long_ids])):
    arr = jnp.asarray(np.asarray(tokens, np.int32))
    call = lambda: fwd(params, cfg, arr).block_until_ready()
    call()
    out[f"prefill_{b}x{t}_tok_s"] = b * t / timed(f"prefill_{b}x{t}", call, args.reps)

  for b in BATCHES:
    prompts = [ids] * b
    def gen():
      res = generate_ids(params, cfg, prompts, max_new_tokens=n, eos=())
      assert all(len(r[0]) == n for r in res), [len(r[0]) for r in res]
      return res
    first = gen()
    if b == 1:
      out["greedy_ids"] = first[0][0]
    wall = timed(f"generate_b{b}", gen, args.reps)
    # the prefill that generate_ids runs, with its shapes: prompt bucket and cache size as in generate_ids
    toks, valid = jnp.asarray(np.asarray(prompts, np.int32)), jnp.ones((b, PROMPT_LEN), bool)
    slots = cache_slots(PROMPT_LEN, n)
    def pre():
      cache = KVCache.empty(cfg, b, slots, params["embed"]["embedding"].dtype, per_layer=True)
      jax.block_until_ready(prefill(params, cfg, toks, valid, cache))
    pre()
    pre_wall = timed(f"generate_prefill_b{b}", pre, args.reps)
    out[f"b{b}"] = {"generate_s": wall, "prefill_s": pre_wall, "generate_tok_s": b * n / wall,
                    "decode_tok_s": b * n / (wall - pre_wall)}
  out["peak_rss_mib"] = peak_rss_mib()

  # ablation, after the RSS reading: the same generate calls with the stacked (lax.scan) layout
  stacked = stack_layers(params)
  for b in BATCHES:
    def gen_stacked():
      assert all(len(r[0]) == n for r in generate_ids(stacked, cfg, [ids] * b, max_new_tokens=n, eos=()))
    gen_stacked()
    out[f"generate_b{b}_stacked_tok_s"] = b * n / timed(f"generate_b{b}_stacked", gen_stacked, args.reps)
  out["times_s"], out["cpu_util"] = TIMES, UTIL
  out["device"] = str(jax.devices()[0])
  return out


def worker_bandwidth(args, _inputs):
  """The machine's read bandwidth: a jitted sum over a 1 GiB array (its own process: keeps it out of RSS)."""
  import jax
  import jax.numpy as jnp
  big = jnp.ones((1 << 28,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(big).block_until_ready()
  return {"read_gb_s": big.nbytes / timed("read_1GiB", lambda: total(big).block_until_ready(), 5) / 1e9}


def worker_hf(args, inputs):
  import torch
  t0 = time.perf_counter()
  model = hf_causal_lm_from_gguf(inputs["gguf"]).eval()
  out = {"load_s": time.perf_counter() - t0, "rss_after_load_mib": peak_rss_mib()}
  ids, long_ids, n = inputs["prompt_ids"], inputs["long_ids"], args.new_tokens

  with torch.inference_mode():
    for b, t, tokens in ((8, PROMPT_LEN, [ids] * 8), (1, LONG_LEN, [long_ids])):
      x = torch.tensor(tokens)
      call = lambda: model(input_ids=x, use_cache=False).logits
      call()
      out[f"prefill_{b}x{t}_tok_s"] = b * t / timed(f"prefill_{b}x{t}", call, args.reps)

    for b in BATCHES:
      x = torch.tensor([ids] * b)
      mask = torch.ones_like(x)
      def gen():
        res = model.generate(input_ids=x, attention_mask=mask, do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=model.config.eos_token_id)
        assert res.shape == (b, PROMPT_LEN + n), res.shape
        return res
      first = gen()
      if b == 1:
        out["greedy_ids"] = first[0, PROMPT_LEN:].tolist()
      wall = timed(f"generate_b{b}", gen, args.reps)
      pre = lambda: model(input_ids=x, attention_mask=mask, use_cache=True, logits_to_keep=1).logits
      pre()
      pre_wall = timed(f"generate_prefill_b{b}", pre, args.reps)
      out[f"b{b}"] = {"generate_s": wall, "prefill_s": pre_wall, "generate_tok_s": b * n / wall,
                      "decode_tok_s": b * n / (wall - pre_wall)}
  out["peak_rss_mib"] = peak_rss_mib()
  out["times_s"], out["cpu_util"] = TIMES, UTIL
  out["threads"] = torch.get_num_threads()
  return out


def worker(name, args, inputs=None):
  return run_worker(__file__, name, [name, "--new-tokens", str(args.new_tokens), "--reps", str(args.reps)], inputs)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="smoke test: 32 new tokens, 1 repetition")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "generate.json"),
                  help="JSON output (default benchmarks/results/generate.json)")
  ap.add_argument("--new-tokens", type=int, help="new tokens per generate call (default 128; 32 with --quick)")
  ap.add_argument("--reps", type=int, help="timed repetitions, median reported (default 3; 1 with --quick)")
  ap.add_argument("--worker", choices=("lora_jax", "hf", "bandwidth"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  args.new_tokens = args.new_tokens or (32 if args.quick else 128)
  args.reps = args.reps or (1 if args.quick else 3)

  if args.worker:
    fn = {"lora_jax": worker_lora_jax, "hf": worker_hf, "bandwidth": worker_bandwidth}[args.worker]
    worker_main(fn, args)
    return

  lj = worker("lora_jax", args)
  hf = worker("hf", args, {k: lj[k] for k in ("gguf", "prompt_ids", "long_ids")})
  lj["read_gb_s"] = worker("bandwidth", args)["read_gb_s"]
  same = 0
  for a, b in zip(lj["greedy_ids"], hf["greedy_ids"]):
    if a != b:
      break
    same += 1

  decode_b1 = lj["b1"]["decode_tok_s"]
  lj["weight_gb_s"] = lj["weight_bytes"] * decode_b1 / 1e9
  floor_tok_s = lj["read_gb_s"] * 1e9 / lj["weight_bytes"]
  rows = [("load time (s, lower is better)", "load_s"), ("peak RSS (MiB, lower is better)", "peak_rss_mib"),
          (f"prefill 8x{PROMPT_LEN} (tok/s)", f"prefill_8x{PROMPT_LEN}_tok_s"),
          (f"prefill 1x{LONG_LEN} (tok/s)", f"prefill_1x{LONG_LEN}_tok_s")]
  for b in BATCHES:
    rows += [(f"generate b={b}, end to end (tok/s)", (f"b{b}", "generate_tok_s")),
             (f"generate b={b}, decode only (tok/s)", (f"b{b}", "decode_tok_s"))]
  get = lambda r, k: r[k[0]][k[1]] if isinstance(k, tuple) else r[k]
  figures = {label: {"lora_jax": get(lj, k), "transformers": get(hf, k), "ratio": get(lj, k) / get(hf, k)}
             for label, k in rows}

  w = max(len(l) for l in figures) + 2
  print(f"\n{'metric':<{w}}{'lora_jax':>10}{'transformers':>14}{'ratio lj/hf':>13}")
  for label, f in figures.items():
    print(f"{label:<{w}}{f['lora_jax']:>10.1f}{f['transformers']:>14.1f}{f['ratio']:>13.2f}")
  print(f"\ngreedy b=1: first {same}/{args.new_tokens} generated tokens identical between lora_jax and transformers")
  print(f"lora_jax b=1 decode reads weights at {lj['weight_gb_s']:.1f} GB/s; this machine reads {lj['read_gb_s']:.1f} "
        f"GB/s -> bandwidth floor {floor_tok_s:.1f} tok/s, decode at {decode_b1 / floor_tok_s:.0%} of it")
  print("cores busy while timed (cpu_util, lora_jax / transformers): " + ", ".join(
      f"{k} {lj['cpu_util'][k]:.2f} / {hf['cpu_util'][k]:.2f}" for k in hf["cpu_util"] if k in lj["cpu_util"]))
  for b in BATCHES:
    print(f"layout ablation: b={b} generate {lj[f'generate_b{b}_stacked_tok_s']:.1f} tok/s stacked (scan) vs "
          f"{lj[f'b{b}']['generate_tok_s']:.1f} tok/s per-layer")

  result = {
      "benchmark": "generate", "machine": machine_info(),
      "config": {"model": PRESET, "gguf": lj["gguf"], "dtype": "float32", "prompt_tokens": PROMPT_LEN,
                 "prompt_ids": lj["prompt_ids"], "long_prompt_tokens": LONG_LEN, "new_tokens": args.new_tokens,
                 "batches": list(BATCHES), "repetitions": args.reps, "statistic": "median",
                 "decoding": "greedy, EOS ignored", "torch_threads": hf["threads"], "jax_device": lj["device"], "quick": args.quick},
      "figures": figures, "greedy_b1_identical_prefix": same,
      "bandwidth": {"weight_bytes": lj["weight_bytes"], "read_gb_s": lj["read_gb_s"],
                    "decode_b1_weight_gb_s": lj["weight_gb_s"], "floor_tok_s": floor_tok_s,
                    "fraction_of_floor": decode_b1 / floor_tok_s},
      "layout_ablation": {f"generate_b{b}_tok_s_{name}": v for b in BATCHES for name, v in
                          (("stacked_scan", lj[f"generate_b{b}_stacked_tok_s"]),
                           ("per_layer", lj[f"b{b}"]["generate_tok_s"]))},
      "raw": {name: {k: v for k, v in r.items() if k not in ("prompt_ids", "long_ids", "greedy_ids")}
              for name, r in (("lora_jax", lj), ("transformers", hf))},
  }
  save_json(result, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
