"""Training runs on a tiny model: loss goes down, same seed = same curve, accumulation = big batch,
kill -9 + resume = uninterrupted, NaN guard, refusing another run's directory."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from lora_jax import LoraJaxError
from lora_jax.config import config_from_dict
from lora_jax.runner import train
from lora_jax.testing import assert_allclose, assert_trees_all_close
from tests.conftest import make_tiny_folder

pytestmark = pytest.mark.usefixtures("standard_promotion")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("train")
  make_tiny_folder(root / "tiny")
  rng = np.random.default_rng(0)
  for name, n in (("train", 160), ("val", 16)):
    with open(root / f"{name}.jsonl", "w") as f:
      for _ in range(n):
        a, b = rng.integers(2, 30, 2)
        f.write(json.dumps({"instruction": f"w{a} w{b}", "output": f"w{b} w{a} w{a + 30}"}) + "\n")
  raw = {"model": str(root / "tiny"), "seed": 0,
         "data": {"train": str(root / "train.jsonl"), "validation": str(root / "val.jsonl"), "chat_template": False,
                  "max_new_tokens": 4, "max_eval_examples": 8},
         "peft": {"rank": 4, "alpha": 8, "dropout": 0.1},
         "train": {"steps": 12, "batch_size": 4, "seq_len": 32, "lr": 1e-2, "log_every": 1, "checkpoint_every": 4,
                   "warmup_steps": 2}}
  return root, raw


def _cfg(raw, **sections):
  out = json.loads(json.dumps(raw))
  for sec, vals in sections.items():
    if isinstance(vals, dict):
      out[sec].update(vals)
    else:
      out[sec] = vals
  return config_from_dict(out)


def _losses(run):
  return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()
          if json.loads(l)["split"] == "train"]


def test_run_directory_and_learning(setup):
  root, raw = setup
  s = train(_cfg(raw, train={"steps": 40}), root / "r1", progress=False)
  run = root / "r1"
  for f in ("config.yaml", "provenance.json", "metrics.jsonl", "summary.json", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors"):
    assert (run / f).exists(), f
  assert list((run / "tb").iterdir()), "TensorBoard events"
  prov = json.loads((run / "provenance.json").read_text())
  assert prov["versions"]["jax"] and prov["device"]["platform"] == "cpu" and "command" in prov
  losses = _losses(run)
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
  assert s["status"] == "finished" and s["trainable_params"] > 0 and s["eval_loss"] is not None
  assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 40


def test_same_seed_same_curve_and_rerun_is_a_noop(setup):
  root, raw = setup
  train(_cfg(raw), root / "a", progress=False)
  train(_cfg(raw), root / "b", progress=False)
  assert _losses(root / "a") == _losses(root / "b")  # bit-identical
  before = (root / "a" / "summary.json").read_text()
  train(_cfg(raw), root / "a", progress=False)  # finished: skipped
  assert (root / "a" / "summary.json").read_text() == before
  train(_cfg(raw, seed=1), root / "c", progress=False)
  assert _losses(root / "c") != _losses(root / "a")


def test_other_runs_directory_is_refused(setup):
  root, raw = setup
  train(_cfg(raw, train={"steps": 2}), root / "d", progress=False)
  with pytest.raises(LoraJaxError, match="holds a different run.*train.steps.*--overwrite"):
    train(_cfg(raw, train={"steps": 3}), root / "d", progress=False)
  train(_cfg(raw, train={"steps": 3}), root / "d", overwrite=True, progress=False)
  assert json.loads((root / "d" / "summary.json").read_text())["steps"] == 3


def _tiny_lora(setup):
  """(model, LoRA config, non-zero adapter, frozen params) on the tiny model, without dropout."""
  from lora_jax.io import load_model
  from lora_jax.peft import init_lora
  from lora_jax.runner import lora_config
  root, raw = setup
  cfg = _cfg(raw, peft={"dropout": 0.0})
  model = load_model(cfg.model)
  lcfg = lora_config(cfg)
  adapter, frozen = init_lora(lcfg, model.config, model.params, key=jax.random.key(0))
  return model, lcfg, jax.tree.map(lambda x: x + 0.05, adapter), frozen


def test_gradient_accumulation_equals_big_batch(setup):
  from lora_jax.peft import lora_optimizer
  from lora_jax.train import TrainState, make_train_step
  model, lcfg, adapter, frozen = _tiny_lora(setup)
  tx = lora_optimizer(1e-2, adapter)
  rng = np.random.default_rng(1)
  batch = {"ids": rng.integers(0, 64, (4, 16)).astype(np.int32), "positions": np.tile(np.arange(16), (4, 1)),
           "segments": np.ones((4, 16), np.int32), "loss": rng.random((4, 16)) < 0.5}
  results = []
  for accum in (1, 2, 4):
    fresh = jax.tree.map(jnp.copy, adapter)  # the step donates its state
    state = TrainState(jnp.int32(0), fresh, tx.init(fresh), jax.random.key_data(jax.random.key(0)))
    new, m = make_train_step(model.config, lcfg, tx, grad_accum=accum)(state, frozen, batch)
    results.append((new.adapter, float(m["loss"])))
  for other, loss in results[1:]:
    assert_trees_all_close(other, results[0][0], "f32_composite")
    assert abs(loss - results[0][1]) < 1e-5


def test_a_run_that_fails_to_set_up_leaves_nothing_behind(setup):
  """A config that fails before the first step (here a missing data file) writes no run directory, so the
  corrected config reruns into the same --out instead of meeting "holds a different run"."""
  root, raw = setup
  with pytest.raises(LoraJaxError, match="nope.jsonl: data file not found"):
    train(_cfg(raw, data={"train": str(root / "nope.jsonl")}, train={"steps": 1}), root / "fix", progress=False)
  assert not (root / "fix").exists()
  assert train(_cfg(raw, train={"steps": 1, "exact_match": False}), root / "fix", progress=False)["status"] == \
      "finished"


def test_a_sweep_goes_on_past_a_diverged_point(setup, tmp_path):
  """A point that diverges is recorded (its summary carries the config, seed and overrides a report groups by),
  the sweep runs the other points, and a rerun skips it."""
  from lora_jax.report import collect_runs
  from lora_jax.runner import sweep
  root, raw = setup
  cfg = _cfg({**raw, "sweep": {"train.lr": [float("nan"), 0.01]}},
             train={"steps": 2, "warmup_steps": 0, "schedule": "constant", "exact_match": False})
  summaries = sweep(cfg, tmp_path / "s", source="t.yaml", progress=False)
  assert [s["status"] for s in summaries] == ["diverged", "finished"]
  diverged = json.loads((tmp_path / "s" / "lr-nan" / "summary.json").read_text())
  assert diverged["overrides"] == {"train.lr": float("nan")} or math.isnan(diverged["overrides"]["train.lr"])
  assert diverged["seed"] == 0 and diverged["config"]["peft.rank"] == 4
  assert len(collect_runs(tmp_path / "s")) == 2
  assert [s["status"] for s in sweep(cfg, tmp_path / "s", source="t.yaml", progress=False)] == ["diverged",
                                                                                                  "finished"]


def test_nan_guard_stops_and_names_the_step(setup):
  root, raw = setup
  with pytest.raises(LoraJaxError, match=r"non-finite loss or gradient at step 1: .*last good checkpoint is step None"):
    train(_cfg(raw, train={"lr": float("nan"), "warmup_steps": 0, "schedule": "constant"}), root / "nan",
          progress=False)
  s = json.loads((root / "nan" / "summary.json").read_text())
  assert s["status"] == "diverged" and s["diverged_step"] == 1
  assert not (root / "nan" / "adapter").exists()


def test_sigkill_and_resume_reach_the_same_final_loss(setup, tmp_path):
  root, raw = setup
  cfg_path = tmp_path / "c.yaml"
  raw2 = json.loads(json.dumps(raw))
  raw2["train"].update(steps=16, checkpoint_every=2, eval_every=2)
  raw2["data"]["max_eval_examples"] = 2
  cfg_path.write_text(yaml.safe_dump(raw2))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "lora_jax", "train", str(cfg_path), "-q"]
  whole = tmp_path / "whole"
  subprocess.run(cmd + ["--out", str(whole)], check=True, env=env, capture_output=True)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(cmd + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and not (killed / "checkpoints" / "6").exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (killed / "checkpoints" / "6").exists(), "the run never reached step 6"
  assert not (killed / "summary.json").exists(), "killed too late: the run had finished"
  subprocess.run(cmd + ["--out", str(killed)], check=True, env=env, capture_output=True)
  a = json.loads((whole / "summary.json").read_text())
  b = json.loads((killed / "summary.json").read_text())
  assert a["final_train_loss"] == b["final_train_loss"] and a["eval_loss"] == b["eval_loss"]
  assert _losses(whole) == _losses(killed)
  # the whole metrics record, evaluations included: the one at the checkpoint's step was once dropped on resume
  records = lambda run: [(r["split"], r["step"], r.get("loss")) for r in
                         map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
  assert records(whole) == records(killed) and ("eval", 6) in [r[:2] for r in records(killed)]


def test_gathered_targets_give_the_same_loss_and_gradient(setup):
  from lora_jax.train import batch_loss, target_budget
  model, lcfg, adapter, frozen = _tiny_lora(setup)
  rng = np.random.default_rng(2)
  batch = {"ids": rng.integers(0, 64, (4, 32)).astype(np.int32), "positions": np.tile(np.arange(32), (4, 1)),
           "segments": np.ones((4, 32), np.int32), "loss": rng.random((4, 32)) < 0.2}
  budget = target_budget(batch["loss"], 4, multiple=8)
  assert budget is not None and budget < 4 * 31
  f = lambda a, k: batch_loss(a, frozen, batch, model_cfg=model.config, lora_cfg=lcfg, max_targets=k)
  (s1, n1), g1 = jax.value_and_grad(lambda a: f(a, None), has_aux=True)(adapter)
  (s2, n2), g2 = jax.value_and_grad(lambda a: f(a, budget), has_aux=True)(adapter)
  assert float(n1) == float(n2) == batch["loss"][:, 1:].sum()
  assert abs(float(s1) - float(s2)) <= 1e-4 * abs(float(s1))
  assert_trees_all_close(g2, g1, "f32_composite")


@pytest.mark.parametrize("remat", ["dots", "full"])
@pytest.mark.parametrize("method", ["lora", "dora", "prefix_tuning"])
def test_remat_policies_give_the_same_loss_and_gradient(setup, remat, method):
  """Rematerialisation changes what the backward pass keeps, never what it computes."""
  from lora_jax.config import REMAT
  from lora_jax.models._llama import REMAT as MODEL_REMAT
  from lora_jax.runner import lora_config
  from lora_jax.io import load_model
  from lora_jax.train import batch_loss
  assert REMAT == MODEL_REMAT
  root, raw = setup
  model = load_model(root / "tiny")
  lcfg = lora_config(_cfg(raw, peft={"method": method, "dropout": 0.0, "num_virtual_tokens": 4}))
  adapter, frozen = lcfg.init_adapter(model.config, model.params, key=jax.random.key(3))
  adapter = jax.tree.map(lambda a: a + 0.05, adapter)  # non-zero LoRA B, so every path carries gradient
  rng = np.random.default_rng(4)
  batch = {"ids": rng.integers(0, 64, (2, 16)).astype(np.int32), "positions": np.tile(np.arange(16), (2, 1)),
           "segments": np.ones((2, 16), np.int32), "loss": np.ones((2, 16), bool)}
  f = lambda a, r: batch_loss(a, frozen, batch, model_cfg=model.config, lora_cfg=lcfg, remat=r)[0]
  l0, g0 = jax.value_and_grad(lambda a: f(a, "none"))(adapter)
  l1, g1 = jax.value_and_grad(lambda a: f(a, remat))(adapter)
  assert abs(float(l1) - float(l0)) <= 1e-5 * abs(float(l0))
  assert_trees_all_close(g1, g0, "f32_composite")


def test_dots_remat_keeps_less_for_the_backward_pass(setup):
  """XLA's own accounting of the compiled step: the "dots" policy needs less temporary memory than keeping
  every activation, and "full" less still."""
  from lora_jax.io import load_model
  from lora_jax.peft import LoraConfig, lora_optimizer
  from lora_jax.train import TrainState, make_train_step
  root, _ = setup
  model = load_model(root / "tiny")
  lcfg = LoraConfig(rank=4, targets=("all-linear",))
  adapter, frozen = lcfg.init_adapter(model.config, model.params, key=jax.random.key(0))
  tx = lora_optimizer(1e-3, adapter)
  state = TrainState(jnp.int32(0), adapter, tx.init(adapter), jax.random.key_data(jax.random.key(1)))
  shape = (8, 64)
  batch = {"ids": jnp.zeros(shape, jnp.int32), "positions": jnp.tile(jnp.arange(64), (8, 1)),
           "segments": jnp.ones(shape, jnp.int32), "loss": jnp.ones(shape, bool)}
  temp = {r: make_train_step(model.config, lcfg, tx, remat=r).lower(state, frozen, batch).compile()
          .memory_analysis().temp_size_in_bytes for r in ("none", "dots", "full")}
  assert temp["full"] < temp["dots"] < temp["none"], temp


def test_remat_config_is_checked(setup):
  _, raw = setup
  with pytest.raises(LoraJaxError, match="train.remat must be one of"):
    _cfg(raw, train={"remat": "some"})
  assert _cfg(raw, train={"remat": False}).train.remat == "none"   # the earlier boolean form
  assert _cfg(raw, train={"remat": True}).train.remat == "full"
  assert _cfg(raw).train.remat == "auto"


def test_auto_remat_is_full_for_a_quantized_base(setup):
  """``remat="auto"`` (the default) keeps only layer inputs for a 4-bit base (QLoRA is about memory) and the
  projection outputs for a float one: the compiled step's temporaries equal those of the explicit policy."""
  from lora_jax.io import load_model
  from lora_jax.peft import LoraConfig, lora_optimizer
  from lora_jax.quant import quantize_params
  from lora_jax.train import TrainState, make_train_step, resolve_remat
  root, _ = setup
  model = load_model(root / "tiny")
  lcfg = LoraConfig(rank=4, targets=("all-linear",))
  shape = (8, 64)
  batch = {"ids": jnp.zeros(shape, jnp.int32), "positions": jnp.tile(jnp.arange(64), (8, 1)),
           "segments": jnp.ones(shape, jnp.int32), "loss": jnp.ones(shape, bool)}
  for base, want in ((model.params, "dots"), (quantize_params(model.params, "int4_sym", block_size=16), "full")):
    adapter, frozen = lcfg.init_adapter(model.config, base, key=jax.random.key(0))
    assert resolve_remat("auto", frozen) == want and resolve_remat("none", frozen) == "none"
    tx = lora_optimizer(1e-3, adapter)
    state = TrainState(jnp.int32(0), adapter, tx.init(adapter), jax.random.key_data(jax.random.key(1)))
    temp = {r: make_train_step(model.config, lcfg, tx, remat=r).lower(state, frozen, batch).compile()
            .memory_analysis().temp_size_in_bytes for r in ("auto", "dots", "full")}
    other = "full" if want == "dots" else "dots"
    assert temp["auto"] == temp[want] != temp[other], (want, temp)


@pytest.mark.parametrize("method,extra", [("ia3", {}), ("prompt_tuning", {"num_virtual_tokens": 4}),
                                          ("p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
                                          ("prefix_tuning", {"num_virtual_tokens": 4}), ("dora", {})])
def test_every_method_trains_through_the_same_runner(setup, method, extra):
  root, raw = setup
  cfg = _cfg(raw, peft={"method": method, "dropout": 0.0, **extra},
             data={"packing": False, "max_eval_examples": 4}, train={"steps": 16, "lr": 3e-2, "log_every": 1})
  s = train(cfg, root / f"m-{method}", progress=False)
  losses = _losses(root / f"m-{method}")
  assert s["status"] == "finished" and s["trainable_params"] > 0
  assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
  from lora_jax.peft import load_adapter
  from lora_jax.io import load_model
  lcfg, adapter = load_adapter(root / f"m-{method}" / "adapter", load_model(cfg.model).config)
  assert lcfg.count_trainable(load_model(cfg.model).config, adapter) <= s["trainable_params"]


def test_prompt_methods_need_unpacked_rows(setup):
  root, raw = setup
  with pytest.raises(LoraJaxError, match="data.packing: false"):
    train(_cfg(raw, peft={"method": "prompt_tuning"}), root / "packed", progress=False)


def test_peak_rss_window_resets_per_run():
  """Each run of a sweep reports its own peak: a large allocation freed before the reset does not count."""
  from lora_jax.runner import peak_rss_mib, reset_peak_rss
  if not sys.platform.startswith("linux"):
    pytest.skip("the peak-RSS window needs Linux's /proc/self/clear_refs")
  assert reset_peak_rss()
  big = np.ones(400 << 20, np.uint8)  # 400 MiB, touched
  during = peak_rss_mib()
  del big
  assert reset_peak_rss()
  after = peak_rss_mib()
  assert during - after > 300, (during, after)


def test_saved_runs_record_the_resolved_remat_and_still_resume(setup, tmp_path):
  """A run records the policy that runs, not "auto"; a run directory saved with `remat: dots` (before "auto"
  existed) is the same run under the default config, so a sweep skips or resumes it instead of refusing it."""
  import yaml
  from lora_jax.runner import _check_out_dir, resolve_run_config
  _, raw = setup
  cfg = _cfg(raw)
  assert cfg.train.remat == "auto"
  _, resolved, derived = resolve_run_config(cfg)
  assert resolved["train"]["remat"] == "dots" and derived == ["train.remat"]
  assert resolve_run_config(_cfg(raw, quantize="int4"))[1]["train"]["remat"] == "full"
  old = dict(resolved, train=dict(resolved["train"], remat="dots"))
  del old["kmajor"]  # a key added later: a run saved before it existed is the same run at its default
  (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
  assert _check_out_dir(tmp_path, resolved, overwrite=False)
  with pytest.raises(LoraJaxError, match="config differs in kmajor"):  # but not at another value
    _check_out_dir(tmp_path, resolve_run_config(_cfg(raw, quantize="int4", kmajor=True))[1], overwrite=False)


def test_kmajor_trains_the_same_run_as_the_default_layout(setup, monkeypatch):
  """``kmajor: true`` trains over the K-major layout of the same 4-bit codes (`kernels.to_kmajor`, applied once
  after quantizing): on CPU both layouts run the XLA reference product, so the loss curves agree to float
  rounding. A wrong code order (the layout's whole risk) would give another model."""
  import lora_jax.kernels as kernels
  from tests.conftest import make_tiny_folder
  root, raw = setup
  folder = root / "tiny64"
  if not folder.exists():  # block 64 needs K a multiple of 64
    make_tiny_folder(folder, hidden_size=64, intermediate_size=128, head_dim=16)
  packed = []
  real = kernels.to_kmajor
  monkeypatch.setattr(kernels, "to_kmajor", lambda tree: packed.append(1) or real(tree))
  curves = {}
  for kmajor in (False, True):
    cfg = _cfg({**raw, "model": str(folder)}, quantize="int4", kmajor=kmajor,
               train={"steps": 4, "exact_match": False, "checkpoint_every": 100})
    out = root / f"kmajor_{kmajor}"
    s = train(cfg, out, progress=False)
    assert s["status"] == "finished" and yaml.safe_load((out / "config.yaml").read_text())["kmajor"] is kmajor
    curves[kmajor] = _losses(out)
  assert packed == [1], "kmajor: true must lay the base out once"
  assert len(curves[True]) == 4 and curves[True][-1] < curves[True][0]
  assert_allclose(curves[True], curves[False], "f32_composite")


def test_a_validation_file_leaves_the_whole_train_file_for_training(setup, monkeypatch):
  """``validation_split`` holds out part of train only without a ``validation`` file (with one, half the train
  file was once dropped, used neither for training nor for validation)."""
  import lora_jax.runner as runner
  root, raw = setup
  seen = []

  class Seen(Exception):
    pass

  def spy(examples, *args, **kw):
    seen.append(len(examples))
    raise Seen
  monkeypatch.setattr(runner, "build_rows", spy)
  for data, want in (({"validation_split": 0.5}, 160), ({"validation": None, "validation_split": 0.5}, 80)):
    with pytest.raises(Seen):
      train(_cfg(raw, data=data), root / "split", progress=False)
    assert seen.pop() == want
  assert not (root / "split").exists()
