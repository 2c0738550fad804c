"""Adapter files in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys follow PEFT for a ``*ForCausalLM`` base, e.g.
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r) and, for
DoRA, ``...lora_magnitude_vector`` (out,). Only safetensors are read; pickled ``.bin`` adapters are refused.
Files are written to a temporary folder and renamed into place, so an interrupted save leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import LoraJaxError
from .._jsonl import read_json_object
from ..models._config import ModelConfig
from ._lora import LoraConfig
from ._targets import HF_PREFIX, MODULE_PATHS, PATH_MODULES, hf_module_name

CONFIG_NAME = "adapter_config.json"
OTHER_TYPES = ("IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                  r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
_LEAF = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "lora_magnitude",
         "lora_magnitude_vector.weight": "lora_magnitude"}
_GROUP = {v: k for k, v in HF_PREFIX.items()}

# adapter_config.json options that change the computation and that we do not implement: (key, default).
_UNSUPPORTED = [("bias", "none"), ("fan_in_fan_out", False), ("modules_to_save", None), ("rank_pattern", {}),
                ("alpha_pattern", {}), ("use_qalora", False), ("lora_bias", False), ("layer_replication", None),
                ("target_parameters", None), ("trainable_token_indices", None), ("alora_invocation_tokens", None),
                ("use_bdlora", None), ("megatron_config", None)]
_CONVERTIBLE_INITS = (True, False, "gaussian", None)


def save_adapter(folder: str | Path, cfg: LoraConfig, model_cfg: ModelConfig, adapter: dict, *,
                 base_model_name_or_path: str | None = None, initial_adapter: dict | None = None) -> Path:
  """Writes `adapter` as a PEFT adapter folder (atomically).

  PiSSA/OLoRA adapters live on a modified (residual) base; pass the `initial_adapter` returned by `init_lora` and
  the file is converted, as PEFT's ``path_initial_model_for_weight_conversion`` does, into a plain LoRA of rank 2r
  relative to the *original* base: ``A' = [A, A0]``, ``B' = [B; -B0]`` (α scaled to keep the same scale).
  """
  from safetensors.numpy import save_file

  from ..io._hf import atomic_dir
  if not isinstance(cfg, LoraConfig):
    from ._files_prompt import save_other
    return save_other(folder, cfg, model_cfg, adapter, base_model_name_or_path=base_model_name_or_path)
  rank, alpha, init = cfg.rank, cfg.alpha, "gaussian" if cfg.init == "gaussian" else True
  if cfg.init in ("pissa", "olora"):
    if initial_adapter is None:
      raise LoraJaxError(f"saving a {cfg.init} adapter needs initial_adapter (the adapter as initialised) to convert "
                         f"it to a plain LoRA on the original base weights")
    if cfg.use_dora:
      raise LoraJaxError(f"saving {cfg.init} + DoRA adapters in PEFT format is not supported")
    adapter = {p: {"lora_A": jnp.concatenate([e["lora_A"], initial_adapter[p]["lora_A"]], axis=-1),
                   "lora_B": jnp.concatenate([e["lora_B"], -initial_adapter[p]["lora_B"]], axis=-2)}
               for p, e in adapter.items()}
    rank, alpha = 2 * rank, alpha * (math.sqrt(2) if cfg.use_rslora else 2)
  layers = list(range(model_cfg.num_layers)) if cfg.layers_to_transform is None else list(cfg.layers_to_transform)
  tensors = {}
  for path, entry in sorted(adapter.items()):
    for i in layers:
      prefix = f"base_model.model.{hf_module_name(path, i)}"
      tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(entry["lora_A"][i], np.float32).T)
      tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(entry["lora_B"][i], np.float32).T)
      if "lora_magnitude" in entry:
        tensors[f"{prefix}.lora_magnitude_vector"] = np.asarray(entry["lora_magnitude"][i], np.float32)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
      "r": rank, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
      "use_dora": cfg.use_dora, "init_lora_weights": init,
      "target_modules": sorted(PATH_MODULES[p] for p in adapter), "layers_to_transform": cfg.layers_to_transform
      and list(cfg.layers_to_transform), "layers_pattern": None, "bias": "none", "fan_in_fan_out": False,
      "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
      "revision": None, "lora_bias": False, "exclude_modules": None,
  }
  folder = Path(folder)
  tmp, commit = atomic_dir(folder)
  try:
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    commit()
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return folder


def weights_file(folder: Path) -> Path:
  """The adapter's safetensors file; pickled ``.bin`` adapters are refused with a message."""
  weights = folder / WEIGHTS_NAME
  if not weights.is_file():
    bins = sorted(p.name for p in folder.glob("*.bin"))
    if bins:
      raise LoraJaxError(f"{folder}: found {bins[0]} but only safetensors adapters are loaded (pickle files can run "
                         f"code); re-save it with safe_serialization=True")
    raise LoraJaxError(f"{folder}: no {WEIGHTS_NAME}")
  return weights


def read_adapter_config(folder: str | Path) -> dict:
  folder = Path(folder)
  if not folder.is_dir():
    raise LoraJaxError(f"{folder}: adapter folder not found")
  path = folder / CONFIG_NAME
  if not path.is_file():
    raise LoraJaxError(f"{folder}: no {CONFIG_NAME} (expected a PEFT adapter folder)")
  return read_json_object(path)


_TYPES = {int: "an integer", float: "a number", bool: "true or false"}


def config_value(raw: dict, key: str, kind: type, default, src):
  """``raw[key]`` (`default` when absent or null) checked to be of `kind` (int, float or bool; a JSON int is a
  float too, a bool is neither): a `LoraJaxError` naming the file and key otherwise, never a silent cast (the
  string "false" is not False)."""
  value = raw.get(key)
  if value is None:
    return default
  ok = isinstance(value, bool) if kind is bool else (
      isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool))
  if not ok:
    raise LoraJaxError(f"{src}: {key} must be {_TYPES[kind]}, got {value!r}")
  return kind(value)


def load_adapter(folder: str | Path, model_cfg: ModelConfig, *, dtype=jnp.float32) -> tuple[LoraConfig, dict]:
  """Reads a PEFT LoRA/rsLoRA/DoRA adapter folder for a base with config `model_cfg` (an IA3 or prompt-method
  folder is handed to `load_other`).

  Raises:
    LoraJaxError: unknown peft_type or unsupported option (named), pickled weights, tensors of another base
      (names the first mismatched tensor and both shapes), missing files.
  """
  from safetensors import safe_open
  folder = Path(folder)
  raw = read_adapter_config(folder)
  src = folder / CONFIG_NAME
  peft_type = raw.get("peft_type")
  if peft_type in OTHER_TYPES:
    from ._files_prompt import load_other
    return load_other(folder, raw, model_cfg, dtype)
  if peft_type != "LORA":
    raise LoraJaxError(f"{src}: peft_type {peft_type!r} is not supported (supported: "
                       f"{', '.join(['LORA', *OTHER_TYPES])})")
  for key, default in _UNSUPPORTED:
    value = raw.get(key, default)
    if value not in (default, None) and value != {} and value != []:
      raise LoraJaxError(f"{src}: option {key}={value!r} is not supported by lora_jax")
  init = raw.get("init_lora_weights", True)
  if init not in _CONVERTIBLE_INITS:
    raise LoraJaxError(f"{src}: init_lora_weights={init!r} adapters need their modified base weights; save them "
                       f"converted to plain LoRA (PEFT: path_initial_model_for_weight_conversion)")
  weights = weights_file(folder)
  L = model_cfg.num_layers
  found: dict[str, dict[str, dict[int, np.ndarray]]] = {}
  try:
    with safe_open(str(weights), "numpy") as f:
      for key in f.keys():
        m = _KEY.match(key)
        if not m:
          raise LoraJaxError(f"{weights}: unexpected tensor {key!r} (supported: LoRA A/B and DoRA magnitude of "
                             f"{', '.join(MODULE_PATHS)} in model.layers.N)")
        layer, group, name, leaf = int(m.group(1)), m.group(2), m.group(3), _LEAF[m.group(4)]
        path = f"{_GROUP[group]}/{name}"
        if path not in PATH_MODULES:
          raise LoraJaxError(f"{weights}: tensor {key!r} adapts unknown module {name!r}")
        if layer >= L:
          raise LoraJaxError(f"{weights}: tensor {key!r} is for layer {layer}, but the base model has {L} layers")
        found.setdefault(path, {}).setdefault(leaf, {})[layer] = f.get_tensor(key)
  except LoraJaxError:
    raise
  except Exception as e:
    raise LoraJaxError(f"{weights}: corrupt or truncated safetensors file ({e})") from None
  if not found:
    raise LoraJaxError(f"{weights}: contains no LoRA tensors")
  r = config_value(raw, "r", int, 8, src)
  sizes = model_cfg.kernel_shapes()
  layer_sets = {tuple(sorted(leaves["lora_A"])) for leaves in found.values() if "lora_A" in leaves}
  if len(layer_sets) != 1:
    raise LoraJaxError(f"{weights}: adapted modules cover different layer sets; not supported")
  layers = layer_sets.pop()
  adapter = {}
  use_dora = config_value(raw, "use_dora", bool, False, src)
  for path, leaves in sorted(found.items()):
    n_in, n_out = sizes[PATH_MODULES[path]]
    want = {"lora_A": (r, n_in), "lora_B": (n_out, r), "lora_magnitude": (n_out,)}
    if use_dora and "lora_magnitude" not in leaves:
      raise LoraJaxError(f"{weights}: use_dora is set but {path} has no lora_magnitude_vector")
    entry = {}
    for leaf, per_layer in leaves.items():
      if tuple(sorted(per_layer)) != layers:
        raise LoraJaxError(f"{weights}: {leaf} of {PATH_MODULES[path]} covers layers {sorted(per_layer)}, "
                           f"expected {list(layers)}")
      stacked = np.zeros((L, *want[leaf][::-1]) if leaf != "lora_magnitude" else (L, n_out), np.float32)
      for i, t in per_layer.items():
        if t.shape != want[leaf]:
          key = f"base_model.model.{hf_module_name(path, i)}.{[k for k, v in _LEAF.items() if v == leaf][0]}"
          rank_axis = {"lora_A": 0, "lora_B": 1}.get(leaf)
          if rank_axis is not None and len(t.shape) == 2 and \
             t.shape[1 - rank_axis] == want[leaf][1 - rank_axis]:  # only the rank differs: the config's r
            raise LoraJaxError(f"{src}: r={r}, but tensor {key!r} has rank {t.shape[rank_axis]} (shape "
                               f"{tuple(t.shape)}): the config does not describe its tensors")
          raise LoraJaxError(f"{weights}: tensor {key!r} has shape {tuple(t.shape)} but the base model needs "
                             f"{want[leaf]}: this adapter was made for another base model")
        stacked[i] = t.T if leaf != "lora_magnitude" else t
      entry[leaf] = jnp.asarray(stacked, dtype)
    adapter[path] = entry
  cfg = LoraConfig(rank=r, alpha=config_value(raw, "lora_alpha", float, 8.0, src),
                   targets=tuple(PATH_MODULES[p] for p in adapter),
                   layers_to_transform=None if len(layers) == L else layers,
                   dropout=config_value(raw, "lora_dropout", float, 0.0, src),
                   use_rslora=config_value(raw, "use_rslora", bool, False, src),
                   use_dora=use_dora, init="gaussian" if init == "gaussian" else "default")
  return cfg, adapter


def merged_params(model, folder: str | Path) -> dict:
  """`model.params` with the PEFT adapter (LoRA/DoRA/IA3) in `folder` merged into the kernels (for inference)."""
  cfg, adapter = load_adapter(folder, model.config, dtype=model.dtype)
  return cfg.merge(model.config, model.params, adapter)


def load_for_inference(model, folder: str | Path, *, quantized_merge: str = "separate") -> tuple[dict, dict]:
  """(params, extras) for running `model` with the adapter in `folder`. Prompt methods give
  ``{"virtual_tokens": ...}`` or ``{"kv_prefix": ...}`` for generate/perplexity. Weight methods (LoRA, DoRA, IA3)
  are merged into float params; over a 4-bit base (`quant.quantize_model_params`, any layout) they go as
  `quantized_merge` says (`quant.merge_quantized`): ``"separate"`` (the default: the 4-bit base and the adapter
  apart, exactly the model a QLoRA run trained), ``"requantized"`` or ``"dequantized"``."""
  cfg, adapter = load_adapter(folder, model.config, dtype=model.dtype)
  return inference_params(model, cfg, adapter, quantized_merge=quantized_merge, source=folder)


def inference_params(model, cfg, adapter: dict, *, quantized_merge: str = "separate",
                     source: str | Path = "adapter") -> tuple[dict, dict]:
  """`load_for_inference` for an adapter already loaded (`load_adapter`'s (cfg, adapter)); `source` names it in
  errors."""
  vt = cfg.virtual_tokens(model.config, adapter)
  kv = cfg.kv_prefix(model.config, adapter) if vt is None and hasattr(cfg, "kv_prefix") else None
  if (vt is not None or kv is not None) and quantized_merge != "separate":
    raise LoraJaxError(f"{source}: a {type(cfg).__name__} adapter adds virtual tokens and has no weights to merge "
                       f"({quantized_merge!r} asked for)")
  if vt is not None:
    return model.params, {"virtual_tokens": vt.astype(model.dtype)}
  if kv is not None:
    return model.params, {"kv_prefix": kv}
  from ..quant import merge_quantized
  from ..quant._qtensor import is_quantized
  if any(is_quantized(leaf) for leaf in jax.tree.leaves(model.params, is_leaf=is_quantized)):
    return merge_quantized(cfg, model.config, model.params, adapter, quantized_merge), {}
  return cfg.merge(model.config, model.params, adapter), {}
