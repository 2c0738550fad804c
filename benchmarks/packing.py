"""Packing vs padding for instruction tuning: what each costs per optimizer step and per example.

Runs the quickstart setting (SmolLM2-135M, LoRA r=16 on the 7 projections, fp32, 4 rows × 256 tokens per step) on
the shipped ticket-routing data twice: rows *packed* (examples concatenated, attention confined by segment ids) and
rows *padded* (one example per row), the latter both at the same row shape (4 × 256) and at a row length fitted to the
examples (10 × 96 ≈ the same tokens per step; longer examples are truncated). For each: examples per step, the fraction of row tokens that are padding,
median step time (after 2 warm-up steps), examples/s and target tokens/s. Writes benchmarks/results/packing.json.

  python benchmarks/packing.py [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=6)
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "packing.json"))
  args = ap.parse_args()
  from lora_jax import load_model
  from lora_jax.config import load_config
  from lora_jax.data import batch_at, build_rows, read_examples
  from lora_jax.peft import lora_optimizer
  from lora_jax.runner import lora_config
  from lora_jax.train import TrainState, make_train_step, target_budget

  cfg = load_config(ROOT / "experiments" / "quickstart.yaml")
  model = load_model(cfg.model)
  examples = read_examples(ROOT / cfg.data.train)
  lcfg = lora_config(cfg)
  results = {}
  variants = {"packed": (True, cfg.train.seq_len, cfg.train.batch_size),
              "padded": (False, cfg.train.seq_len, cfg.train.batch_size), "padded_96": (False, 96, 10)}
  for name, (packing, seq_len, batch_size) in variants.items():
    rows = build_rows(examples, model.tokenizer, seq_len=seq_len, chat=cfg.data.chat_template,
                      packing=packing, pad_id=model.tokenizer.pad_id or 0)
    adapter, frozen = lcfg.init_adapter(model.config, model.params, key=jax.random.key(0))
    tx = lora_optimizer(1e-4, adapter)
    state = TrainState(jnp.int32(0), adapter, tx.init(adapter), jax.random.key_data(jax.random.key(1)))
    step = make_train_step(model.config, lcfg, tx, max_targets=target_budget(rows.loss, batch_size))
    times, targets = [], 0.0
    for i in range(args.steps + 2):
      batch = batch_at(rows, i * batch_size, batch_size, seed=0)
      t = time.perf_counter()
      state, m = step(state, frozen, batch)
      float(m["loss"])
      if i >= 2:
        times.append(time.perf_counter() - t)
        targets += float(m["tokens"])
    sec = statistics.median(times)
    per_step = rows.n_examples / len(rows) * batch_size
    results[name] = {"row_shape": [batch_size, seq_len], "truncated": rows.n_truncated,
        "rows": len(rows), "examples_per_step": per_step, "padding_fraction": float(np.mean(rows.segments == 0)),
        "step_s": sec, "examples_per_s": per_step / sec, "target_tokens_per_s": targets / sum(times),
        "times_s": times}
  print(f"{'':22}" + "".join(f"{n:>12}" for n in results))
  for k in ("rows", "truncated", "examples_per_step", "padding_fraction", "step_s", "examples_per_s",
            "target_tokens_per_s"):
    print(f"{k:22}" + "".join(f"{r[k]:>12.3f}" for r in results.values()))
  p = results["packed"]
  ratios = {n: p["examples_per_s"] / r["examples_per_s"] for n, r in results.items() if n != "packed"}
  print("packed / padded examples per second: " + ", ".join(f"{n} {v:.2f}x" for n, v in ratios.items()))
  out = {"config": "experiments/quickstart.yaml", "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
         "results": results, "packed_over_padded_examples_per_s": ratios}
  save_json(out, args.out)
  print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
  main()
