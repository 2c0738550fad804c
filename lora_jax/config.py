"""Run configuration: YAML parsed strictly into frozen dataclasses, ``--set`` overrides and sweep grids.

The schema below is a documented contract (README "Configs"): ``seed``, ``model``, ``data.*``, ``peft.method``,
``peft.rank``, ``peft.alpha``, ``peft.targets``, ``train.steps``, ``train.batch_size``, ``train.seq_len``,
``train.lr``, ``train.checkpoint_every`` and ``sweep``. An unknown key, a wrong type or a missing required value is an
error naming the key and the file.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from ._errors import LoraJaxError
from ._jsonl import read_text

METHODS = ("lora", "rslora", "dora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
SCHEDULES = ("cosine", "linear", "constant")
REMAT = ("none", "dots", "full")  # the policies of lora_jax.models.hidden_states (its REMAT; a test keeps them equal)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Where the examples come from and how they become token rows."""

  train: str                                  # JSONL (instruction/input/output or messages), .txt, or a datasets dir
  validation: str | None = None               # held-out file for eval loss (default: split off `validation_split`)
  test: str | None = None                     # held-out file for exact match (default: the validation data)
  validation_split: float = 0.0               # fraction of train held out when `validation` is not given
  chat_template: bool = True                  # wrap examples in the model's chat template
  loss_on: str = "response"                   # "response" (assistant tokens only) or "all"
  packing: bool = True                        # pack examples into rows (attention never crosses examples)
  truncate: bool = True                       # cut over-long examples (and report how many) instead of failing
  max_eval_examples: int = 200                # exact-match examples generated per evaluation
  max_new_tokens: int = 48                    # generation budget for exact match

  def __post_init__(self):
    if self.loss_on not in ("response", "all"):
      raise LoraJaxError(f"data.loss_on must be 'response' or 'all', got {self.loss_on!r}")
    if not 0 <= self.validation_split < 1:
      raise LoraJaxError(f"data.validation_split must be in [0, 1), got {self.validation_split}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeftConfig:
  """The adapter. LoRA-family keys: rank, alpha, targets, dropout, init, layers_to_transform. IA3: targets (default
  k_proj, v_proj, down_proj when left at the LoRA default) and feedforward. Prompt methods: num_virtual_tokens,
  prompt_init / prompt_init_text (prompt tuning), encoder_hidden_size (p_tuning; prefix_tuning with
  prefix_projection)."""

  method: str = "lora"                        # lora | rslora | dora | ia3 | prompt_tuning | p_tuning | prefix_tuning
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  dropout: float = 0.0
  init: str = "default"                       # default | gaussian | pissa | olora
  layers_to_transform: tuple[int, ...] | None = None
  feedforward: tuple[str, ...] = ("down_proj",)
  num_virtual_tokens: int = 20
  prompt_init: str = "random"                 # random | vocab | text
  prompt_init_text: str | None = None
  encoder_hidden_size: int = 128
  prefix_projection: bool = False

  def __post_init__(self):
    if self.method not in METHODS:
      raise LoraJaxError(f"peft.method must be one of {list(METHODS)}, got {self.method!r}")
    if self.method == "dora" and self.init in ("pissa", "olora"):  # refused here, not after training
      raise LoraJaxError(f"peft.init: {self.init} with peft.method: dora has no PEFT adapter file to save the run "
                         f"in (PEFT converts PiSSA/OLoRA to plain LoRA only); use init: default or gaussian")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  steps: int = 200
  batch_size: int = 8                         # rows per optimizer step (split into grad_accum micro-batches)
  seq_len: int = 128                          # tokens per row
  lr: float = 2e-4
  schedule: str = "cosine"                    # cosine | linear | constant (after linear warmup)
  warmup_steps: int = 10
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0
  grad_accum: int = 1
  lora_plus_ratio: float | None = None        # LoRA+: lr of B = lr × ratio
  dtype: str = "float32"                      # compute dtype: float32 | bfloat16
  remat: str | bool = "auto"                  # auto | none | dots | full: what the backward pass keeps (see
                                              # REMAT; auto: full for a quantized base, else dots);
                                              # false / true (the earlier boolean form) mean none / full
  eval_every: int = 0                         # eval loss every N steps (0: only at the end)
  checkpoint_every: int = 50
  log_every: int = 10
  exact_match: bool = True                    # generate on the test data before and after training

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "checkpoint_every", "log_every"):
      if getattr(self, name) < 1:
        raise LoraJaxError(f"train.{name} must be >= 1, got {getattr(self, name)}")
    if self.lr < 0:
      raise LoraJaxError(f"train.lr must be >= 0, got {self.lr}")
    if self.warmup_steps < 0:
      raise LoraJaxError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
    if self.eval_every < 0:
      raise LoraJaxError(f"train.eval_every must be >= 0 (0: only at the end), got {self.eval_every}")
    if self.batch_size % self.grad_accum:
      raise LoraJaxError(f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}")
    if self.schedule not in SCHEDULES:
      raise LoraJaxError(f"train.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
    if self.dtype not in ("float32", "bfloat16"):
      raise LoraJaxError(f"train.dtype must be float32 or bfloat16, got {self.dtype!r}")
    if isinstance(self.remat, bool):
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in ("auto", *REMAT):
      raise LoraJaxError(f"train.remat must be one of {['auto', *REMAT]}, got {self.remat!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """One run. ``quantize`` picks the frozen base format (QLoRA when not "none"), ``kmajor`` its layout."""

  model: str
  data: DataConfig
  seed: int = 0
  name: str | None = None
  quantize: str = "none"                      # frozen base in 4 bits (QLoRA): none | nf4 | int4 | native
  kmajor: bool = False                        # with quantize: the 4-bit base in the K-major layout of the GPU
                                              # kernel (kernels.to_kmajor; bf16 compute on a GPU, else the XLA
                                              # reference path, slower on CPU than the default layout)
  peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  sweep: dict[str, list] | None = None        # dotted key -> values; expanded into a grid by `expand_sweep`

  def __post_init__(self):
    from .quant._quantize import QUANTIZE_MODES
    if self.quantize not in QUANTIZE_MODES:
      raise LoraJaxError(f"quantize must be one of {list(QUANTIZE_MODES)}, got {self.quantize!r}")
    if self.quantize == "native" and self.peft.init in ("pissa", "olora"):
      raise LoraJaxError(f"quantize: native keeps the GGUF file's stored 4-bit blocks, but peft.init: {self.peft.init} "
                         f"moves the principal part of each weight into the adapter and trains over the residual; "
                         f"quantize the residual with quantize: nf4 or int4")
    if self.kmajor and self.quantize == "none":
      raise LoraJaxError("kmajor: true lays out a 4-bit base for its GPU kernel: it needs quantize: nf4, int4 or "
                         "native")


# ---------------------------------------------------------------- strict parsing
def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str, source: str):
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _coerce(value, a, key, source)
      except LoraJaxError as e:
        errors.append(e)
    raise errors[0]
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, Mapping):
      raise LoraJaxError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
    return _build(tp, value, source, prefix=key + ".")
  if origin is tuple:
    if isinstance(value, (str, int, float)):
      value = [value]
    if not isinstance(value, (list, tuple)):
      raise LoraJaxError(f"{source}: '{key}' must be a list, got {type(value).__name__}")
    return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
  if origin is dict:
    if not isinstance(value, Mapping):
      raise LoraJaxError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
    return {str(k): list(v) if isinstance(v, (list, tuple)) else _bad(key, k, source) for k, v in value.items()}
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp is float and isinstance(value, str):
    try:
      return float(value)  # YAML 1.1 reads "2e-4" as a string
    except ValueError:
      pass
  if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
    raise LoraJaxError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
  return value


def _bad(key, k, source):
  raise LoraJaxError(f"{source}: '{key}.{k}' must be a list of values")


def _build(cls, raw: Mapping[str, Any], source: str, prefix: str = ""):
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - set(fields))
  if unknown:
    raise LoraJaxError(f"{source}: unknown key '{prefix}{unknown[0]}' (valid keys here: {', '.join(fields)})")
  kwargs = {}
  for name, f in fields.items():
    if name in raw:
      kwargs[name] = _coerce(raw[name], hints[name], prefix + name, source)
    elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
      raise LoraJaxError(f"{source}: missing required key '{prefix}{name}'")
  try:
    return cls(**kwargs)
  except LoraJaxError as e:
    raise LoraJaxError(f"{source}: {e}") from None


def parse_value(text: str):
  """A ``--set`` value, typed the way YAML types it (``8`` -> int, ``[a, b]`` -> list, ``null`` -> None)."""
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError:
    return text


def set_dotted(raw: dict, key: str, value) -> dict:
  """A deep copy of `raw` with ``a.b.c = value``."""
  import copy
  out = copy.deepcopy(raw)
  node = out
  parts = key.split(".")
  for p in parts[:-1]:
    if not isinstance(node.setdefault(p, {}), dict):
      raise LoraJaxError(f"cannot set '{key}': '{p}' is not a section")
    node = node[p]
  node[parts[-1]] = value
  return out


def read_yaml(path: str | Path) -> dict:
  path = Path(path)
  if not path.is_file():
    raise LoraJaxError(f"{path}: config file not found")
  try:
    raw = yaml.safe_load(read_text(path))
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark else ""
    raise LoraJaxError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
  if not isinstance(raw, dict):
    raise LoraJaxError(f"{path}: top level must be a mapping of keys")
  return raw


def load_config(path: str | Path, overrides: Mapping[str, Any] | list[str] = ()) -> RunConfig:
  """Parses a YAML config with ``--set``-style overrides (``["train.lr=1e-4", ...]`` or a dict)."""
  raw = read_yaml(path)
  return config_from_dict(apply_overrides(raw, overrides), str(path))


def apply_overrides(raw: dict, overrides: Mapping[str, Any] | list[str]) -> dict:
  items = overrides.items() if isinstance(overrides, Mapping) else [_split_set(s) for s in overrides]
  for key, value in items:
    raw = set_dotted(raw, key, value)
  return raw


def _split_set(s: str):
  if "=" not in s:
    raise LoraJaxError(f"--set expects key=value, got {s!r}")
  key, value = s.split("=", 1)
  return key.strip(), parse_value(value)


def config_from_dict(raw: Mapping[str, Any], source: str = "<config>") -> RunConfig:
  cfg = _build(RunConfig, raw, source)
  if cfg.sweep:
    for key, values in cfg.sweep.items():
      _check_key(key, source)
      if not values:
        raise LoraJaxError(f"{source}: sweep axis '{key}' has no values")
  return cfg


def _check_key(key: str, source: str) -> None:
  cls = RunConfig
  for part in key.split("."):
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    if part not in fields or part == "sweep":
      raise LoraJaxError(f"{source}: sweep axis '{key}' is not a config key")
    cls = typing.get_type_hints(cls)[part]


def to_dict(cfg) -> dict:
  """Plain nested dict (tuples as lists), as written to the run's resolved ``config.yaml``."""
  def conv(v):
    if dataclasses.is_dataclass(v):
      return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
      return [conv(x) for x in v]
    if isinstance(v, dict):
      return {k: conv(x) for k, x in v.items()}
    return v
  return conv(cfg)


@functools.cache
def flat_defaults(cls=None, prefix: str = "") -> dict[str, Any]:
  """The default of every `RunConfig` key that has one, as dotted keys (``train.lr``: 2e-4): what a run saved
  before a key existed ran with. Cached: read it, do not change it."""
  cls = cls or RunConfig
  out: dict[str, Any] = {}
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[f.name]):
      out.update(flat_defaults(hints[f.name], f"{prefix}{f.name}."))
    elif f.default is not dataclasses.MISSING:
      out[prefix + f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
  return out


def flatten(d: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping) and k != "sweep":
      out.update(flatten(v, f"{prefix}{k}."))
    elif k != "sweep":
      out[f"{prefix}{k}"] = v
  return out


def expand_sweep(cfg: RunConfig, source: str = "<config>") -> list[tuple[str, dict, RunConfig]]:
  """The grid of a ``sweep:`` block: ``[(point name, overrides, config)]`` (one point if there is no sweep)."""
  base = to_dict(cfg)
  base["sweep"] = None
  if not cfg.sweep:
    return [("run", {}, config_from_dict(base, source))]
  keys = list(cfg.sweep)
  grid = [dict(zip(keys, values)) for values in itertools.product(*(cfg.sweep[k] for k in keys))]
  names = ["_".join(f"{k.split('.')[-1]}-{_slug(v)}" for k, v in overrides.items()) for overrides in grid]
  count = collections.Counter(names)
  # values a slug cannot tell apart (cut at 40 characters, or differing only in dropped characters) get a hash
  # of the point's overrides; every other name stays as before, so existing sweep directories still resume
  names = [f"{name}-{hashlib.sha1(json.dumps(o, sort_keys=True).encode()).hexdigest()[:8]}" if count[name] > 1
           else name for name, o in zip(names, grid)]
  if len(set(names)) != len(names):
    raise LoraJaxError(f"{source}: sweep points with the same values: {sorted(n for n in names if names.count(n) > 1)[0]}")
  return [(name, overrides, config_from_dict(apply_overrides(base, overrides), f"{source} (sweep {name})"))
          for name, overrides in zip(names, grid)]


def _slug(v) -> str:
  text = "+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
  return re.sub(r"[^A-Za-z0-9.+-]+", "", text)[:40]
