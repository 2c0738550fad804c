"""Loading and saving Hugging Face model folders (``config.json`` + ``*.safetensors``, sharded or not).

Tensor files are read with `safetensors` (memory-mapped, one tensor at a time, so peak memory stays near the
size of the model). HF linear weights are (out, in); our kernels are (in, out).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .._errors import LoraJaxError
from .._jsonl import read_json_object
from ..models._config import ModelConfig

_LAYER_MAP = {
    # HF name inside model.layers.N -> (group, sub, leaf, transpose)
    "input_layernorm.weight": ("attn_norm", None, "scale", False),
    "post_attention_layernorm.weight": ("mlp_norm", None, "scale", False),
    "self_attn.q_proj.weight": ("attn", "q_proj", "kernel", True),
    "self_attn.k_proj.weight": ("attn", "k_proj", "kernel", True),
    "self_attn.v_proj.weight": ("attn", "v_proj", "kernel", True),
    "self_attn.o_proj.weight": ("attn", "o_proj", "kernel", True),
    "self_attn.q_proj.bias": ("attn", "q_proj", "bias", False),
    "self_attn.k_proj.bias": ("attn", "k_proj", "bias", False),
    "self_attn.v_proj.bias": ("attn", "v_proj", "bias", False),
    "mlp.gate_proj.weight": ("mlp", "gate_proj", "kernel", True),
    "mlp.up_proj.weight": ("mlp", "up_proj", "kernel", True),
    "mlp.down_proj.weight": ("mlp", "down_proj", "kernel", True),
}


def read_config(folder: Path) -> ModelConfig:
  path = folder / "config.json"
  if not path.is_file():
    raise LoraJaxError(f"{folder}: no config.json (expected an HF model folder)")
  return ModelConfig.from_hf_dict(read_json_object(path), source=str(path))


def _tensor_files(folder: Path) -> dict[str, Path]:
  """Tensor name -> file, from the shard index or the single ``model.safetensors``."""
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise LoraJaxError(f"{index}: not a valid safetensors index (no 'weight_map' object)")
    return {k: folder / v for k, v in weight_map.items()}
  single = folder / "model.safetensors"
  if not single.is_file():
    bins = sorted(p.name for p in folder.glob("*.bin"))
    hint = f" (found {bins}: pickle checkpoints are not loaded, convert them to safetensors)" if bins else ""
    raise LoraJaxError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
  return {k: single for k in _keys(single)}


def _keys(path: Path) -> list[str]:
  from safetensors import safe_open
  try:
    with safe_open(str(path), "numpy") as f:
      return list(f.keys())
  except Exception as e:
    raise LoraJaxError(f"{path}: corrupt or truncated safetensors file ({e})") from None


class _Reader:
  """Opens each shard once and reads tensors by name, naming the file in every error."""

  def __init__(self, files: dict[str, Path]):
    self.files = files
    self._open = {}

  def get(self, name: str) -> np.ndarray:
    from safetensors import safe_open
    if name not in self.files:
      raise LoraJaxError(f"missing tensor {name!r} (looked in {sorted({p.name for p in self.files.values()})})")
    path = self.files[name]
    try:
      if path not in self._open:
        self._open[path] = safe_open(str(path), "numpy")
      return self._open[path].get_tensor(name)
    except LoraJaxError:
      raise
    except Exception as e:
      raise LoraJaxError(f"{path}: cannot read tensor {name!r} ({e})") from None


def load_hf_params(folder: Path, cfg: ModelConfig, *, dtype=np.float32) -> dict:
  """Parameters of an HF Llama/Mistral/Qwen2 folder as our (stacked, (in, out)) numpy tree."""
  reader = _Reader(_tensor_files(folder))
  L = cfg.num_layers
  expected = {**cfg.kernel_shapes(), None: (cfg.hidden_size,)}
  layers: dict = {"attn_norm": {}, "attn": {}, "mlp_norm": {}, "mlp": {}}
  for suffix, (group, sub, leaf, transpose) in _LAYER_MAP.items():
    if leaf == "bias" and not cfg.attention_bias:
      continue
    out = None
    for i in range(L):
      name = f"model.layers.{i}.{suffix}"
      w = reader.get(name)
      if transpose:
        w = w.T
      want = (expected[sub][-1],) if leaf == "bias" else expected[sub]
      if w.shape != want:
        raise LoraJaxError(f"{reader.files[name]}: tensor {name!r} has shape {w.shape[::-1] if transpose else w.shape}, "
                           f"expected {want[::-1] if transpose else want}")
      if out is None:
        out = np.empty((L, *w.shape), dtype)
      out[i] = w
    node = layers[group] if sub is None else layers[group].setdefault(sub, {})
    node[leaf] = out
  embed = reader.get("model.embed_tokens.weight")
  if embed.shape != (cfg.vocab_size, cfg.hidden_size):
    raise LoraJaxError(f"tensor 'model.embed_tokens.weight' has shape {embed.shape}, "
                       f"expected {(cfg.vocab_size, cfg.hidden_size)}")
  params = {"embed": {"embedding": embed.astype(dtype)}, "layers": layers,
            "final_norm": {"scale": reader.get("model.norm.weight").astype(dtype)}}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": np.ascontiguousarray(reader.get("lm_head.weight").T).astype(dtype)}
  return params


def hf_state_dict(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Our parameter tree as HF tensor names and (out, in) layouts (inverse of `load_hf_params`)."""
  out = {"model.embed_tokens.weight": np.asarray(params["embed"]["embedding"]),
         "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)
  layers = params["layers"]
  for suffix, (group, sub, leaf, transpose) in _LAYER_MAP.items():
    node = layers[group] if sub is None else layers[group].get(sub, {})
    if leaf not in node:
      continue
    stacked = np.asarray(node[leaf])
    for i in range(cfg.num_layers):
      w = stacked[i].T if transpose else stacked[i]
      out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(w)
  return out


def atomic_dir(target: Path):
  """A temp directory next to `target`; call ``commit()`` to rename it into place (never half-written), with the
  permissions the umask gives a new folder and new files (mkdtemp's and safetensors' owner-only modes would stop
  other users from loading it). A `target` that is a file is refused."""
  target = Path(target)
  if target.exists() and not target.is_dir():
    raise LoraJaxError(f"{target}: exists and is not a folder")
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))

  def commit():
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(tmp):
      os.chmod(folder, 0o777 & ~umask)
      for f in files:
        os.chmod(os.path.join(folder, f), 0o666 & ~umask)
    if target.exists():
      import shutil
      old = target.with_name(f".{target.name}.old-{os.getpid()}")
      os.replace(target, old)
      os.replace(tmp, target)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, target)

  return tmp, commit


def save_hf_folder(folder: str | Path, params: dict, cfg: ModelConfig, tokenizer=None) -> Path:
  """Writes ``config.json``, ``model.safetensors`` and tokenizer files atomically (temp dir, then rename)."""
  from safetensors.numpy import save_file
  import shutil
  folder = Path(folder)
  tmp, commit = atomic_dir(folder)
  try:
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    save_file(hf_state_dict(params, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
      tokenizer.backend.save(str(tmp / "tokenizer.json"))
      tok_cfg = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                 "pad_token": tokenizer.pad_token, "chat_template": tokenizer.chat_template,
                 "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
      (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    commit()
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return folder
