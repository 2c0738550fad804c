"""Model assets: presets, GGUF files, HF folders -> (config, parameter pytree, tokenizer)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import LoraJaxError
from .._jsonl import read_json_object
from .._log import log
from ..models._config import ModelConfig
from ._assets import PRESETS, cache_dir, fetch_preset, resolve_model_path
from ._gguf import GGUFModel, GGUFQuantized, load_gguf
from ._hf import load_hf_params, read_config, save_hf_folder
from ._tokenizer import Tokenizer, tokenizer_from_folder, tokenizer_from_gguf

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Model:
  """A loaded checkpoint: architecture, parameters (jax arrays), tokenizer and where it came from."""

  config: ModelConfig
  params: dict
  tokenizer: Tokenizer
  source: str
  format: str                                  # "gguf" | "hf"
  quantized: dict[str, list[GGUFQuantized]] = dataclasses.field(default_factory=dict)
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def dtype(self):
    return self.params["embed"]["embedding"].dtype

  def unstack_layers(self) -> "Model":
    """Switches `params` to the per-layer layout (`lora_jax.models.unstack_layers`) in place, which decodes about
    2x faster on CPU; each stacked array is freed as soon as it is split (when nothing else holds it), so peak
    memory grows by one array, not by the model. Training and adapter functions take the stacked layout
    (`lora_jax.models.stack_layers` converts back). Returns self."""
    from ..models._llama import _num_layers, is_unstacked, split_layer_leaves
    if is_unstacked(self.params):
      return self
    _num_layers(jax.tree.leaves(self.params["layers"]))  # validate before detaching anything
    rest = dict(self.params)
    layers = rest.pop("layers")
    self.params = None
    leaves, treedef = jax.tree.flatten(layers)
    del layers
    self.params = {**rest, "layers": split_layer_leaves(leaves, treedef)}
    return self

  def info(self) -> dict[str, Any]:
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
    c = self.config
    return {
        "source": self.source, "format": self.format, "architecture": c.architecture,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_layers": c.num_layers, "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta, "rope_type": c.rope_type, "rope_freq_factors": bool(c.rope_freq_factors),
        "tie_embeddings": c.tie_embeddings,
        "attention_bias": c.attention_bias, "sliding_window": c.sliding_window,
        "parameters": n, "dtype": str(self.dtype),
        "stored_quantization": sorted({q.qtype for qs in self.quantized.values() for q in qs}) or None,
        "chat_template": bool(self.tokenizer.chat_template),
    }


def _to_device(tree, dtype):
  """numpy tree -> jax arrays, one leaf at a time, releasing each host copy (keeps peak RSS low)."""
  def put(x):
    return jnp.asarray(x, dtype=dtype)
  return jax.tree.map(put, tree)


def load_model(spec: str | Path, *, dtype: str = "float32") -> Model:
  """Loads a model from a preset name, a GGUF file, an HF folder or (with huggingface_hub) an HF hub id.

  Args:
    spec: e.g. ``"smollm2-135m"``, ``"model.gguf"``, ``"path/to/hf_folder"``.
    dtype: parameter/compute dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
  """
  if dtype not in DTYPES:
    raise LoraJaxError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
  t0 = time.perf_counter()
  path = resolve_model_path(str(spec))
  jdtype = DTYPES[dtype]
  if path.is_file():
    if path.suffix != ".gguf":
      raise LoraJaxError(f"{path}: model file must be a .gguf file, or pass an HF model folder")
    g = load_gguf(path)
    tok = tokenizer_from_gguf(g.fields, str(path))
    meta = {k: v for k, v in g.fields.items() if k.startswith("general.")}
    model = Model(g.config, _to_device(g.params, jdtype), tok, str(path), "gguf", g.quantized, meta)
  elif path.is_dir():
    cfg = read_config(path)
    params = load_hf_params(path, cfg)
    tok = tokenizer_from_folder(path)
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():
      eos = read_json_object(gen_cfg).get("eos_token_id")
      if eos is not None:
        cfg = dataclasses.replace(cfg, eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))
    model = Model(cfg, _to_device(params, jdtype), tok, str(path), "hf")
  else:
    raise LoraJaxError(f"{path}: neither a file nor a folder")
  log(f"loaded {model.config.architecture} from {path.name} in {time.perf_counter() - t0:.2f}s ({dtype})")
  return model


def eos_ids(model: Model) -> tuple[int, ...]:
  """Token ids that end generation: the config's EOS ids plus the tokenizer's EOS token."""
  ids = set(model.config.eos_token_ids)
  if model.tokenizer.eos_id is not None:
    ids.add(model.tokenizer.eos_id)
  return tuple(sorted(ids))


__all__ = ["Model", "load_model", "PRESETS", "fetch_preset", "cache_dir", "resolve_model_path", "Tokenizer",
           "save_hf_folder", "eos_ids", "load_gguf", "GGUFQuantized", "DTYPES"]
