"""PEFT files for (IA)³ and the prompt-learning methods (PROMPT_TUNING, P_TUNING, PREFIX_TUNING).

* IA3: ``base_model.model.model.layers.N.<module>.ia3_l`` of shape (out, 1) (output scaling) or (1, in)
  (feed-forward modules, input scaling).
* Prompt methods: one tensor ``prompt_embeddings``: the virtual tokens [n, D] (prompt tuning; P-tuning saves the
  prompt encoder's *output*, so it loads as fixed virtual tokens) or the folded prefix [n, L·2·kv] (prefix tuning).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from .._errors import LoraJaxError
from ..models._config import ModelConfig
from ._ia3 import IA3Config
from ._prompt import PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from ._targets import HF_PREFIX, PATH_MODULES, hf_module_name

_IA3_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.ia3_l$")
_GROUP = {v: k for k, v in HF_PREFIX.items()}


def _write(folder: Path, config: dict, tensors: dict) -> Path:
  from safetensors.numpy import save_file

  from ..io._hf import atomic_dir
  tmp, commit = atomic_dir(Path(folder))
  try:
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    commit()
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return Path(folder)


def save_other(folder, cfg, model_cfg: ModelConfig, adapter: dict, *, base_model_name_or_path=None) -> Path:
  common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
            "revision": None}
  if isinstance(cfg, IA3Config):
    tensors = {}
    for path, entry in adapter.items():
      ff = cfg.is_feedforward(path)
      for i in range(model_cfg.num_layers):
        v = np.asarray(entry["ia3"][i], np.float32)
        tensors[f"base_model.model.{hf_module_name(path, i)}.ia3_l"] = v[None, :] if ff else v[:, None]
    config = {**common, "peft_type": "IA3", "target_modules": sorted(PATH_MODULES[p] for p in adapter),
              "feedforward_modules": sorted(PATH_MODULES[p] for p in adapter if cfg.is_feedforward(p)),
              "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None}
    return _write(folder, config, tensors)
  prompt_common = {**common, "num_virtual_tokens": cfg.num_virtual_tokens, "num_transformer_submodules": 1,
                   "num_layers": model_cfg.num_layers}
  if isinstance(cfg, PrefixTuningConfig):
    config = {**prompt_common, "peft_type": "PREFIX_TUNING", "token_dim": model_cfg.kv_size,
              "num_attention_heads": model_cfg.num_kv_heads, "prefix_projection": False,
              "encoder_hidden_size": cfg.encoder_hidden_size}
    emb = cfg.folded(adapter)
  else:
    emb = cfg.virtual_tokens(model_cfg, adapter)
    config = {**prompt_common, "token_dim": model_cfg.hidden_size, "num_attention_heads": model_cfg.num_heads}
    if isinstance(cfg, PTuningConfig):
      config.update(peft_type="P_TUNING", encoder_reparameterization_type="MLP",
                    encoder_hidden_size=cfg.encoder_hidden_size, encoder_num_layers=2, encoder_dropout=0.0)
    else:
      config.update(peft_type="PROMPT_TUNING", prompt_tuning_init={"random": "RANDOM", "vocab": "SAMPLE_VOCAB",
                                                                   "text": "TEXT"}[cfg.init],
                    prompt_tuning_init_text=cfg.init_text)
  return _write(folder, config, {"prompt_embeddings": np.asarray(emb, np.float32)})


def load_other(folder: Path, raw: dict, model_cfg: ModelConfig, dtype=jnp.float32):
  """(config, adapter) for IA3 / prompt-method files (called by `load_adapter` after the peft_type check)."""
  from safetensors import safe_open
  from ._files import config_value, weights_file
  src = folder / "adapter_config.json"
  weights = weights_file(folder)
  try:
    with safe_open(str(weights), "numpy") as f:
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:
    raise LoraJaxError(f"{weights}: corrupt or truncated safetensors file ({e})") from None
  kind = raw["peft_type"]
  if kind == "IA3":
    for key in ("fan_in_fan_out", "modules_to_save"):
      if raw.get(key):
        raise LoraJaxError(f"{src}: option {key}={raw[key]!r} is not supported by lora_jax")
    found: dict[str, dict[int, np.ndarray]] = {}
    for key, t in tensors.items():
      m = _IA3_KEY.match(key)
      if not m:
        raise LoraJaxError(f"{weights}: unexpected tensor {key!r}")
      layer, path = int(m.group(1)), f"{_GROUP[m.group(2)]}/{m.group(3)}"
      if path not in PATH_MODULES or layer >= model_cfg.num_layers:
        raise LoraJaxError(f"{weights}: tensor {key!r} does not fit a base with {model_cfg.num_layers} layers")
      found.setdefault(path, {})[layer] = t
    ff = raw.get("feedforward_modules") or []
    ff = [ff] if isinstance(ff, str) else ff
    cfg = IA3Config(targets=tuple(PATH_MODULES[p] for p in sorted(found)),
                    feedforward=tuple(m for m in ff if m in {PATH_MODULES[p] for p in found}))
    sizes = model_cfg.kernel_shapes()
    adapter = {}
    for path, per_layer in sorted(found.items()):
      n_in, n_out = sizes[PATH_MODULES[path]]
      want = (1, n_in) if cfg.is_feedforward(path) else (n_out, 1)
      if sorted(per_layer) != list(range(model_cfg.num_layers)):
        raise LoraJaxError(f"{weights}: {PATH_MODULES[path]} is not adapted in every layer (layers "
                           f"{sorted(per_layer)}); layer subsets are not supported for IA3")
      for i, t in per_layer.items():
        if t.shape != want:
          raise LoraJaxError(f"{weights}: tensor 'base_model.model.{hf_module_name(path, i)}.ia3_l' has shape "
                             f"{tuple(t.shape)} but the base model needs {want}: made for another base model")
      adapter[path] = {"ia3": jnp.asarray(np.stack([per_layer[i].reshape(-1) for i in range(model_cfg.num_layers)]),
                                          jnp.float32)}
    return cfg, adapter
  if set(tensors) != {"prompt_embeddings"}:
    raise LoraJaxError(f"{weights}: expected one tensor 'prompt_embeddings', found {sorted(tensors)}")
  emb = tensors["prompt_embeddings"]
  n = config_value(raw, "num_virtual_tokens", int, emb.shape[0], src)
  if kind == "PREFIX_TUNING":
    width = model_cfg.num_layers * 2 * model_cfg.kv_size
    if emb.shape != (n, width):
      raise LoraJaxError(f"{weights}: prompt_embeddings has shape {tuple(emb.shape)} but a prefix for this base "
                         f"needs ({n}, {width}) = (virtual tokens, layers {model_cfg.num_layers} × 2 × kv "
                         f"{model_cfg.kv_size}): made for another base model")
    return PrefixTuningConfig(num_virtual_tokens=n), {"prefix": jnp.asarray(emb, jnp.float32)}
  if raw.get("num_transformer_submodules", 1) != 1:
    raise LoraJaxError(f"{src}: num_transformer_submodules={raw['num_transformer_submodules']} (encoder-decoder) "
                       f"is not supported")
  if emb.shape != (n, model_cfg.hidden_size):
    raise LoraJaxError(f"{weights}: prompt_embeddings has shape {tuple(emb.shape)} but this base needs "
                       f"({n}, {model_cfg.hidden_size}) (hidden size {model_cfg.hidden_size}): made for another "
                       f"base model")
  # P-tuning files hold the encoder's output: as fixed virtual tokens they are prompt tuning.
  return PromptTuningConfig(num_virtual_tokens=n), {"prompt": jnp.asarray(emb, jnp.float32)}
