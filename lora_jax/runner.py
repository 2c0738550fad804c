"""Training runs: a run directory per config, checkpoints that resume exactly, sweeps that skip finished (and
diverged) points.

A run directory holds::

  config.yaml        the resolved config (re-running with a different one is refused unless --overwrite)
  provenance.json    git SHA, package versions, device, command line
  metrics.jsonl      one JSON object per logged train step / evaluation
  tb/                TensorBoard event files (tensorboardX)
  checkpoints/       orbax checkpoints: adapter, optimizer state, step, data position, RNG
  adapter/           the final adapter in HF PEFT format
  summary.json       final figures (read by `lora-jax report`)

The directory is written once the run is set up (model, data and adapter built), so a config that fails before
its first step leaves nothing behind. Re-running the same command resumes from the last checkpoint; since the data stream, the dropout keys and the
optimizer state are all functions of the checkpointed values, a resumed run reproduces the uninterrupted one
bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from ._errors import LoraJaxError
from ._log import log
from .config import PROMPT_METHODS, PeftConfig, RunConfig, expand_sweep, flat_defaults, flatten, to_dict
from .data import batch_at, build_rows, read_examples, split_examples
from .peft import (IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, PTuningConfig, lora_optimizer,
                   save_adapter)
from .train import TrainState, make_eval_loss, make_schedule, make_train_step, resolve_remat, target_budget

PACKAGES = ("lora_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tokenizers", "safetensors",
            "gguf", "tensorboardX")


DEFAULT_TARGETS = PeftConfig().targets


def lora_config(cfg: RunConfig):
  """The PEFT method object (LoraConfig, IA3Config, PromptTuningConfig, ...) a run config describes."""
  p = cfg.peft
  if p.method == "ia3":
    targets = ("k_proj", "v_proj", "down_proj") if p.targets == DEFAULT_TARGETS else p.targets
    return IA3Config(targets=targets, feedforward=tuple(f for f in p.feedforward if f in targets))
  if p.method == "prompt_tuning":
    return PromptTuningConfig(num_virtual_tokens=p.num_virtual_tokens, init=p.prompt_init,
                              init_text=p.prompt_init_text)
  if p.method == "p_tuning":
    return PTuningConfig(num_virtual_tokens=p.num_virtual_tokens, encoder_hidden_size=p.encoder_hidden_size)
  if p.method == "prefix_tuning":
    return PrefixTuningConfig(num_virtual_tokens=p.num_virtual_tokens, projection=p.prefix_projection,
                              encoder_hidden_size=p.encoder_hidden_size)
  return LoraConfig(rank=p.rank, alpha=p.alpha, targets=p.targets, layers_to_transform=p.layers_to_transform,
                    dropout=p.dropout, use_rslora=p.method == "rslora", use_dora=p.method == "dora", init=p.init)


SPLIT_INITS = ("pissa", "olora")  # inits that move part of each base kernel into the adapter


def init_run_adapter(cfg: RunConfig, lcfg, model, *, key) -> tuple[dict, dict]:
  """(adapter, frozen base) for a run: the base in 4 bits when ``cfg.quantize`` says (QLoRA; in the K-major
  layout with ``cfg.kmajor``). The adapter starts from the 4-bit base it trains over (DoRA's magnitudes are the
  norms of the quantized kernel's columns, as PEFT takes them from a bitsandbytes base, so the initial model is
  the 4-bit base), except PiSSA / OLoRA, which split the float kernel and quantize the residual (QPiSSA)."""
  from .quant import quantize_model_params
  quantized = cfg.quantize != "none"
  quantize = lambda params: quantize_model_params(params, cfg.quantize, gguf_blocks=model.quantized)
  split_first = getattr(lcfg, "init", None) in SPLIT_INITS
  start = quantize(model.params) if quantized and not split_first else model.params
  adapter, frozen = lcfg.init_adapter(model.config, start, key=key, tokenizer=model.tokenizer)
  if quantized and split_first:
    frozen = quantize(frozen)
    log(f"note: peft.init {lcfg.init} over a 4-bit base (QPiSSA): the run trains over the quantized residual, but "
        f"its adapter file is saved converted to plain LoRA for the original float base (as PEFT saves it), so no "
        f"file reproduces the trained model exactly; the run's own evaluation is of the trained model")
  if cfg.kmajor:  # the GPU kernel's layout (kernels.to_kmajor): the same codes, moved once, here
    from .kernels import to_kmajor
    frozen = to_kmajor(frozen)
  return adapter, frozen


def reset_peak_rss() -> bool:
  """Starts a new peak-RSS window for this process, so that each run of a sweep (all in one process) reports its
  own peak rather than the process's high-water mark so far; what earlier runs left resident (compiled programs,
  allocator memory not returned to the OS) still counts, so it is an upper bound. Linux: writing 5 to
  /proc/self/clear_refs resets VmHWM to the current RSS. Returns False where that is not possible (the peak then
  covers the whole process). `sweep` calls it before each point; `train` does not (it is the caller's process)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_mib() -> float:
  """Peak resident memory (MiB) since the last `reset_peak_rss` (VmHWM), or of the whole process (ru_maxrss)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def provenance(argv: list[str] | None) -> dict[str, Any]:
  from importlib import metadata
  root = Path(__file__).resolve().parent.parent
  try:
    sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                         timeout=10).stdout.strip() or None
    dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                                timeout=10).stdout.strip())
  except (OSError, subprocess.SubprocessError):
    sha, dirty = None, None
  versions = {}
  for p in PACKAGES:
    try:
      versions[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
      versions[p] = None
  dev = jax.devices()[0]
  return {"git_sha": sha, "git_dirty": dirty, "versions": versions, "python": sys.version.split()[0],
          "device": {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count()},
          "command": argv if argv is not None else sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _write_text(path: Path, text: str) -> None:
  """Writes through a temporary file, so a crash never leaves half of one."""
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
  _write_text(path, json.dumps(obj, indent=2, default=float))


class _Metrics:
  """metrics.jsonl (appending; on resume, lines past the restored step are dropped) + TensorBoard."""

  def __init__(self, out: Path, resume_step: int, last_step: int):
    self.path = out / "metrics.jsonl"
    if self.path.exists():
      def kept(rec):  # what the resumed run will not write again: every record of a step up to the checkpoint's
        # (written before it was saved), except the final evaluation, which follows the last step's checkpoint
        final_eval = rec["step"] == last_step and rec["split"] == "eval"
        return rec["step"] <= resume_step and not final_eval
      keep = [line for line in self.path.read_text().splitlines() if line.strip() and kept(json.loads(line))]
      self.path.write_text("".join(line + "\n" for line in keep))
    self.f = open(self.path, "a")
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)
    except ImportError:
      log("tensorboardX is not installed: no TensorBoard events")
      self.tb = None

  def write(self, record: dict) -> None:
    self.f.write(json.dumps(record) + "\n")
    self.f.flush()
    if self.tb is not None:
      for k, v in record.items():
        if k not in ("step", "split") and isinstance(v, (int, float)):
          self.tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

  def close(self):
    self.f.close()
    if self.tb is not None:
      self.tb.close()


def _check_out_dir(out: Path, resolved: dict, overwrite: bool) -> bool:
  """True when `out` holds this same run (resume). Refuses another run's directory unless `overwrite`."""
  cfg_path = out / "config.yaml"
  if not cfg_path.exists():
    if out.exists() and any(out.iterdir()) and not overwrite:
      raise LoraJaxError(f"{out}: output directory is not empty and holds no run config; pass --overwrite to reuse it")
    return False
  # a key added to RunConfig since the run was saved counts at its default: the value the run ran with
  old = {k: v for k, v in {**flat_defaults(), **flatten(yaml.safe_load(cfg_path.read_text()))}.items()
         if k != "sweep"}
  new = flatten(resolved)
  diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  if not diff:
    return True
  if not overwrite:
    raise LoraJaxError(f"{out}: output directory holds a different run (config differs in {', '.join(diff[:5])}); "
                       f"pass --overwrite to replace it, or choose another --out")
  shutil.rmtree(out)
  return False


def resolve_run_config(cfg: RunConfig) -> tuple[RunConfig, dict, list[str]]:
  """The config a run records (``config.yaml``, compared when resuming): `train.remat: auto` replaced by the
  policy that runs (`full` for a quantized base, else `dots`; per sweep point, as it depends on `quantize`), so
  runs saved before `auto` existed still resume; without the sweep section. Also the dotted keys whose values
  were derived from others that way (the summary's ``derived``: a report does not make them axes)."""
  derived = []
  if cfg.train.remat == "auto":
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, remat=resolve_remat("auto", quantized=cfg.quantize != "none")))
    derived.append("train.remat")
  resolved = to_dict(cfg)
  resolved.pop("sweep", None)
  return cfg, resolved, derived


def train(cfg: RunConfig, out: str | Path, *, overwrite: bool = False, argv: list[str] | None = None,
          progress: bool = True, model=None) -> dict[str, Any]:
  """Runs (or resumes) one training run into `out`; returns its summary."""
  import orbax.checkpoint as ocp
  out = Path(out).absolute()
  cfg, resolved, derived = resolve_run_config(cfg)
  resuming = _check_out_dir(out, resolved, overwrite)
  if resuming and (out / "summary.json").exists():
    summary = json.loads((out / "summary.json").read_text())
    if summary.get("status") == "finished":
      log(f"{out.name}: already finished, skipping")
      return summary
  t_start = time.perf_counter()

  from .io import load_model
  owned = model is None
  model = model or load_model(cfg.model, dtype="float32")
  tc, dc = cfg.train, cfg.data
  examples = read_examples(dc.train)
  if dc.validation:  # validation_split holds out part of train only when no validation file is given
    train_ex, val_ex = examples, read_examples(dc.validation)
  else:
    train_ex, val_ex = split_examples(examples, dc.validation_split, cfg.seed)
  test_ex = read_examples(dc.test) if dc.test else val_ex
  tok = model.tokenizer
  pad = tok.pad_id if tok.pad_id is not None else 0
  if cfg.peft.method in PROMPT_METHODS and dc.packing:
    raise LoraJaxError(f"peft.method={cfg.peft.method} prepends virtual tokens to every row: set data.packing: false")
  rows = build_rows(train_ex, tok, seq_len=tc.seq_len, chat=dc.chat_template, loss_on=dc.loss_on,
                    packing=dc.packing, truncate=dc.truncate, pad_id=pad, source=dc.train)
  log(f"data: {rows.n_examples} train examples in {len(rows)} rows of {tc.seq_len} tokens "
      f"({'packed' if dc.packing else 'padded'}), {len(val_ex)} validation, {len(test_ex)} test")
  val_rows = build_rows(val_ex, tok, seq_len=tc.seq_len, chat=dc.chat_template, loss_on=dc.loss_on, packing=False,
                        truncate=True, pad_id=pad, source="validation") if val_ex else None

  lcfg = lora_config(cfg)
  adapter, frozen = init_run_adapter(cfg, lcfg, model, key=jax.random.key(cfg.seed))
  if cfg.quantize != "none" and owned:
    model.params = None  # release the float copy: the point of QLoRA is the memory
  base = frozen
  # (a copy: the train step donates the state's buffers)
  initial_adapter = jax.tree.map(jnp.copy, adapter) if getattr(lcfg, "init", None) in SPLIT_INITS else None
  if tc.dtype == "bfloat16":
    frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
  schedule = make_schedule(tc.lr, tc.steps, tc.warmup_steps, tc.schedule)
  tx = lora_optimizer(schedule, adapter, weight_decay=tc.weight_decay, lora_plus_ratio=tc.lora_plus_ratio,
                      max_grad_norm=tc.max_grad_norm)
  state = TrainState(jnp.int32(0), adapter, tx.init(adapter), jax.random.key_data(jax.random.key(cfg.seed + 1)))
  data_pos = 0
  # the run directory is written only now: a config that fails to set up (a missing file, a bad rank) leaves
  # nothing behind that would block its corrected rerun
  out.mkdir(parents=True, exist_ok=True)
  _write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
  _write_json(out / "provenance.json", provenance(argv))
  ckpt_dir = out / "checkpoints"
  mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=2, enable_async_checkpointing=False, create=True))
  latest = mngr.latest_step()
  if latest is not None:
    target = {"state": state, "data_pos": np.zeros((), np.int64)}
    restored = mngr.restore(latest, args=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                                                  target)))
    state, data_pos = restored["state"], int(restored["data_pos"])
    log(f"resumed from checkpoint at step {latest}")
  start_step = int(state.step)
  metrics = _Metrics(out, start_step, tc.steps)
  summary = {"name": cfg.name or out.name, "status": "running", "steps": tc.steps, "overrides": {},
             "config": flatten(resolved), "derived": derived, "seed": cfg.seed}  # what a report groups by
  try:
    before_path = out / "eval_before.json"
    if tc.exact_match and test_ex and not before_path.exists():
      from .evaluate import exact_match
      log(f"exact match of the base model on {min(len(test_ex), dc.max_eval_examples)} test examples ...")
      em0 = exact_match(model, base, test_ex, max_new_tokens=dc.max_new_tokens, chat=dc.chat_template,
                        limit=dc.max_eval_examples)  # the base as it is trained (a quantized base when QLoRA)
      _write_json(before_path, em0)
    eval_fn = make_eval_loss(model.config, lcfg)
    budget = target_budget(rows.loss, tc.batch_size // tc.grad_accum)
    step_fn = make_train_step(model.config, lcfg, tx, grad_accum=tc.grad_accum, remat=tc.remat, max_targets=budget)
    from tqdm import tqdm
    bar = tqdm(total=tc.steps, initial=start_step, disable=not progress, file=sys.stderr, dynamic_ncols=True,
               desc=out.name)
    t_log, tokens_since = time.perf_counter(), 0.0
    last_loss = None
    for step in range(start_step, tc.steps):
      batch = batch_at(rows, data_pos, tc.batch_size, cfg.seed)
      state, m = step_fn(state, frozen, batch)
      data_pos += tc.batch_size
      loss = float(m["loss"])
      tokens_since += float(m["tokens"])
      if not bool(m["ok"]):
        good = mngr.latest_step()
        summary.update(status="diverged", diverged_step=step + 1, last_good_checkpoint=good)
        raise LoraJaxError(f"non-finite loss or gradient at step {step + 1}: training stopped; the last good "
                           f"checkpoint is step {good} in {ckpt_dir}")
      last_loss = loss
      n = step + 1
      if n % tc.log_every == 0 or n == tc.steps:
        now = time.perf_counter()
        rec = {"split": "train", "step": n, "loss": loss, "lr": float(schedule(step)),
               "grad_norm": float(m["grad_norm"]), "tokens_per_s": tokens_since / (now - t_log),
               "time_s": now - t_start}
        metrics.write(rec)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        t_log, tokens_since = now, 0.0
      if tc.eval_every and n % tc.eval_every == 0 and val_rows is not None and n != tc.steps:
        from .evaluate import mean_loss
        metrics.write({"split": "eval", "step": n, "loss": mean_loss(eval_fn, state.adapter, frozen, val_rows)})
      if n % tc.checkpoint_every == 0 or n == tc.steps:
        mngr.save(n, args=ocp.args.StandardSave({"state": state, "data_pos": np.asarray(data_pos, np.int64)}), force=True)
      bar.update(1)
    bar.close()

    from .evaluate import exact_match, mean_loss
    final = {"split": "eval", "step": tc.steps}
    if val_rows is not None:
      final["loss"] = mean_loss(eval_fn, state.adapter, frozen, val_rows)
    em = None
    if tc.exact_match and test_ex:
      log("exact match of the fine-tuned model ...")
      extras = {}
      if cfg.peft.method in PROMPT_METHODS:
        merged = frozen
        extras = {"virtual_tokens": lcfg.virtual_tokens(model.config, state.adapter),
                  "kv_prefix": lcfg.kv_prefix(model.config, state.adapter)}
      elif cfg.quantize != "none":  # keep the 4-bit base and the adapter apart: exactly the trained model
        merged = lcfg.apply(model.config, frozen, state.adapter)
      else:
        merged = lcfg.merge(model.config, jax.tree.map(lambda x: x.astype(jnp.float32), frozen), state.adapter)
      em = exact_match(model, merged, test_ex, max_new_tokens=dc.max_new_tokens, chat=dc.chat_template,
                       limit=dc.max_eval_examples, **extras)
      final["exact_match"] = em["exact_match"]
      _write_json(out / "eval_after.json", em)
    metrics.write(final)
    save_adapter(out / "adapter", lcfg, model.config, state.adapter, base_model_name_or_path=cfg.model,
                 initial_adapter=initial_adapter)
    before = json.loads(before_path.read_text()) if before_path.exists() else None
    if last_loss is None:  # resumed at the very end
      last_loss = next((json.loads(l)["loss"] for l in reversed((out / "metrics.jsonl").read_text().splitlines())
                        if json.loads(l)["split"] == "train"), None)
    summary.update(
        status="finished", overrides={}, config=flatten(resolved), derived=derived, seed=cfg.seed,
        trainable_params=lcfg.count_trainable(model.config, state.adapter),
        wall_time_s=time.perf_counter() - t_start, peak_rss_mib=peak_rss_mib(), final_train_loss=last_loss,
        eval_loss=final.get("loss"), exact_match=em["exact_match"] if em else None,
        exact_match_before=before["exact_match"] if before else None)
    return summary
  finally:
    metrics.close()
    mngr.close()
    if summary.get("status") != "running":
      _write_json(out / "summary.json", summary)


def _diverged_summary(run_dir: Path) -> dict | None:
  """The run's summary if it records a divergence, else None."""
  path = run_dir / "summary.json"
  summary = json.loads(path.read_text()) if path.exists() else {}
  return summary if summary.get("status") == "diverged" else None


def sweep(cfg: RunConfig, out: str | Path, *, source: str, argv=None, progress: bool = True,
          overwrite: bool = False) -> list[dict]:
  """Runs every grid point of `cfg.sweep` into ``out/<point>``. Finished points are skipped, and so are points that
  diverged (recorded as such in their summary: the same seed and data diverge again); a point whose directory
  holds a different run is refused unless `overwrite`."""
  out = Path(out).absolute()
  points = expand_sweep(cfg, source)
  out.mkdir(parents=True, exist_ok=True)
  _write_json(out / "sweep.json", {"source": source, "points": [{"name": n, "overrides": o} for n, o, _ in points]})
  from .io import load_model
  models = {}
  summaries = []
  for i, (name, overrides, point) in enumerate(points, 1):
    log(f"sweep point {i}/{len(points)}: {name}")
    if point.model not in models:
      models.clear()
      models[point.model] = load_model(point.model)
    reset_peak_rss()  # each point's summary gets its own peak (the shared model is resident, so it counts)
    s = _diverged_summary(out / name)
    if s is not None and not overwrite:
      log(f"{name}: diverged in an earlier run, skipping (its summary says where)")
    else:
      try:
        s = train(point, out / name, overwrite=overwrite, argv=argv, progress=progress, model=models[point.model])
      except LoraJaxError as e:
        s = _diverged_summary(out / name)
        if s is None:
          raise
        log(f"{name}: {e}; the sweep goes on")
    if s.get("overrides") != overrides:
      s["overrides"] = overrides
      _write_json(out / name / "summary.json", s)
    summaries.append(s)
  return summaries
