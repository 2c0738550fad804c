"""Strict YAML configs, --set overrides, sweep grids; every shipped experiment parses and traces."""

import glob
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from lora_jax import LoraJaxError
from lora_jax.config import RunConfig, config_from_dict, expand_sweep, load_config

ROOT = Path(__file__).resolve().parent.parent
BASE = {"model": "smollm2-135m", "data": {"train": "x.jsonl"}}


def test_defaults_and_types():
  cfg = config_from_dict({**BASE, "train": {"lr": "2e-4", "steps": 5}, "peft": {"targets": "q_proj"}})
  assert isinstance(cfg, RunConfig) and cfg.train.lr == 2e-4 and cfg.peft.targets == ("q_proj",)
  with pytest.raises(Exception):
    cfg.seed = 3  # frozen


@pytest.mark.parametrize("raw,msg", [
    ({**BASE, "train": {"lrr": 1}}, "unknown key 'train.lrr'"),
    ({**BASE, "train": {"steps": "many"}}, "'train.steps' must be int"),
    ({**BASE, "peft": {"rank": 2.5}}, "'peft.rank' must be int"),
    ({"model": "m"}, "missing required key 'data'"),
    ({**BASE, "data": {}}, "missing required key 'data.train'"),
    ({**BASE, "peft": {"method": "adalora"}}, "peft.method must be one of"),
    ({**BASE, "sweep": {"peft.rnk": [1, 2]}}, "sweep axis 'peft.rnk' is not a config key"),
    ({**BASE, "quantize": "nf3"}, "quantize must be one of .*'nf4'.*got 'nf3'"),
    ({**BASE, "kmajor": True}, "kmajor: true .* needs quantize: nf4, int4 or native"),
    ({**BASE, "quantize": "native", "peft": {"init": "pissa"}}, "quantize: native keeps .* peft.init: pissa"),
    ({**BASE, "peft": {"method": "dora", "init": "olora"}}, "peft.init: olora with peft.method: dora has no PEFT"),
    ({**BASE, "train": {"checkpoint_every": 0}}, "train.checkpoint_every must be >= 1, got 0"),
    ({**BASE, "train": {"log_every": 0}}, "train.log_every must be >= 1, got 0"),
    ({**BASE, "train": {"eval_every": -1}}, "train.eval_every must be >= 0"),
    ({**BASE, "train": {"lr": -1e-4}}, "train.lr must be >= 0"),
    ({**BASE, "train": {"warmup_steps": -2}}, "train.warmup_steps must be >= 0"),
    ({**BASE, "sweep": {"seed": []}}, "sweep axis 'seed' has no values"),
    ({**BASE, "quantize": "int4", "kmajor": "yes"}, "'kmajor' must be bool"),
])
def test_errors_name_the_key_and_file(raw, msg):
  with pytest.raises(LoraJaxError, match=msg) as e:
    config_from_dict(raw, "exp.yaml")
  assert str(e.value).startswith("exp.yaml")


def test_set_overrides(tmp_path):
  p = tmp_path / "c.yaml"
  p.write_text("model: m\ndata: {train: a.jsonl}\ntrain: {steps: 3}\n")
  cfg = load_config(p, ["train.steps=7", "peft.targets=[q_proj, v_proj]", "seed=4"])
  assert (cfg.train.steps, cfg.peft.targets, cfg.seed) == (7, ("q_proj", "v_proj"), 4)
  with pytest.raises(LoraJaxError, match="key=value"):
    load_config(p, ["train.steps"])
  p.write_text("model: m\n  data: [\n")
  with pytest.raises(LoraJaxError, match="invalid YAML at line"):
    load_config(p)


def test_sweep_expands_the_grid():
  cfg = config_from_dict({**BASE, "sweep": {"peft.rank": [4, 8, 16], "seed": [0, 1], "peft.method": ["lora", "dora"]}})
  points = expand_sweep(cfg)
  assert len(points) == 12 and len({n for n, _, _ in points}) == 12
  name, overrides, point = points[-1]
  assert overrides == {"peft.rank": 16, "seed": 1, "peft.method": "dora"}
  assert (point.peft.rank, point.seed, point.peft.method, point.sweep) == (16, 1, "dora", None)
  assert name == "rank-16_seed-1_method-dora"


def test_sweep_points_that_one_slug_cannot_tell_apart_get_distinct_names():
  """Values cut at 40 characters or differing only in characters a directory name drops once shared a run
  directory (the second point was refused as "a different run"); they get a hash, the other names stay."""
  long = [list(range(18)), list(range(20))]  # "0+1+...+16" for both
  cfg = config_from_dict({**BASE, "sweep": {"peft.layers_to_transform": long, "data.train": ["a_b.jsonl",
                                                                                          "ab.jsonl"]}})
  names = [n for n, _, _ in expand_sweep(cfg)]
  assert len(set(names)) == 4 and all(re.fullmatch(r".*-[0-9a-f]{8}", n) for n in names), names
  plain = [n for n, _, _ in expand_sweep(config_from_dict({**BASE, "sweep": {"data.train": ["a.jsonl", "b.jsonl"]}}))]
  assert plain == ["train-a.jsonl", "train-b.jsonl"]


CONFIGS = sorted(glob.glob(str(ROOT / "experiments" / "*.yaml")))


def test_experiments_exist():
  assert any(Path(c).name == "quickstart.yaml" for c in CONFIGS)


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).stem)
def test_every_experiment_point_traces_one_step(path, smollm2):
  """Parses the config and every sweep point, and traces one train step with jax.eval_shape (no compute)."""
  from lora_jax.models import ModelConfig, init_params
  from lora_jax.peft import lora_optimizer
  from lora_jax.runner import lora_config
  from lora_jax.train import TrainState, make_schedule, make_train_step
  cfg = load_config(path)
  for name, _, point in expand_sweep(cfg, path):
    assert point.model == "smollm2-135m", "shipped experiments run on the embedded model"
    for f in (point.data.train, point.data.validation, point.data.test):
      assert f is None or (ROOT / f).exists(), f"{path}: {f} missing"
    mcfg = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, tie_embeddings=True)
    lcfg = lora_config(point)
    tc = point.train

    def one_step():
      params = init_params(mcfg, key=jax.random.key(0))
      adapter, frozen = lcfg.init_adapter(mcfg, params, key=jax.random.key(point.seed), tokenizer=smollm2.tokenizer)
      tx = lora_optimizer(make_schedule(tc.lr, tc.steps, tc.warmup_steps, tc.schedule), adapter,
                          lora_plus_ratio=tc.lora_plus_ratio, max_grad_norm=tc.max_grad_norm)
      state = TrainState(jnp.int32(0), adapter, tx.init(adapter), jax.random.key_data(jax.random.key(0)))
      step = make_train_step(mcfg, lcfg, tx, grad_accum=tc.grad_accum, remat=tc.remat)
      shape = (tc.batch_size, tc.seq_len)
      batch = {"ids": jnp.zeros(shape, jnp.int32), "positions": jnp.zeros(shape, jnp.int32),
               "segments": jnp.ones(shape, jnp.int32), "loss": jnp.ones(shape, bool)}
      return step(state, frozen, batch)
    _, metrics = jax.eval_shape(one_step)
    assert metrics["loss"].shape == ()
