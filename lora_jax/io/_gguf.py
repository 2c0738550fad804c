"""Loading Llama-family GGUF files (llama.cpp's format) into a parameter pytree.

Parsing and block dequantization are the `gguf` package's (`GGUFReader`, `gguf.quants.dequantize`); this module
maps GGUF metadata to a `ModelConfig` and GGUF tensor names to our parameter tree.

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` of the ``llama`` architecture so that its
interleaved RoPE kernel sees pairs ``(2i, 2i+1)``; we undo that with
``w.reshape(n_head, hd // 2, 2, in).swapaxes(1, 2)`` to get transformers' "rotate half" layout. Since quantization
blocks run along the *input* axis, a row permutation moves whole blocks, so the quantized blocks can be
un-permuted exactly too: `GGUFQuantized` keeps them as stored (for QLoRA on a native GGUF base).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import LoraJaxError
from ..models._config import ModelConfig

# GGUF architecture -> our architecture. Mistral GGUFs declare "llama".
_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_LAYER_TENSORS = {
    # gguf suffix -> (group, name, leaf)
    "attn_norm.weight": ("attn_norm", None, "scale"),
    "ffn_norm.weight": ("mlp_norm", None, "scale"),
    "attn_q.weight": ("attn", "q_proj", "kernel"),
    "attn_k.weight": ("attn", "k_proj", "kernel"),
    "attn_v.weight": ("attn", "v_proj", "kernel"),
    "attn_output.weight": ("attn", "o_proj", "kernel"),
    "attn_q.bias": ("attn", "q_proj", "bias"),
    "attn_k.bias": ("attn", "k_proj", "bias"),
    "attn_v.bias": ("attn", "v_proj", "bias"),
    "ffn_gate.weight": ("mlp", "gate_proj", "kernel"),
    "ffn_up.weight": ("mlp", "up_proj", "kernel"),
    "ffn_down.weight": ("mlp", "down_proj", "kernel"),
}


def _open(path: Path):
  """The file's `GGUFReader` (read-only memory map) and its metadata fields, parsed once per process for a given
  file version (`_read`): a sweep or a session that loads the same GGUF again skips the parse, which for a
  49k-token vocabulary is most of a small model's load time (SmolLM2-135M: ~6 of ~10 s)."""
  if not path.is_file():
    raise LoraJaxError(f"{path}: GGUF file not found")
  st = path.stat()
  return _read(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read(path: str, size: int, mtime_ns: int):
  """(reader, fields) of the GGUF at `path` with this size and modification time (the cache key: a rewritten
  file is read again). Errors are raised, never cached."""
  import gguf
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise LoraJaxError(f"{path}: not a GGUF file (first bytes {magic!r}, expected b'GGUF')")
  try:
    reader = gguf.GGUFReader(path)  # mode "r": its tensors' data are read-only views, safe to share
  except Exception as e:  # truncated or corrupt: the reader raises ValueError/IndexError/etc.
    raise LoraJaxError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
  return reader, types.MappingProxyType(_fields(reader))


def _fields(reader) -> dict[str, Any]:
  out = {}
  for key, field in reader.fields.items():
    try:
      out[key] = field.contents()
    except Exception:  # pragma: no cover - exotic field types we do not need
      continue
  return out


def config_from_gguf(fields: dict[str, Any], tensor_names: set[str], source: str,
                     rope_freqs: np.ndarray | None = None) -> ModelConfig:
  """The model config from a GGUF file's metadata; `rope_freqs`: its ``rope_freqs.weight`` tensor, if any (the
  per-frequency divisors in which llama.cpp stores Llama 3.1+'s rope scaling)."""
  arch = fields.get("general.architecture")
  if arch not in _ARCH:
    raise LoraJaxError(f"{source}: unsupported GGUF architecture {arch!r}; supported: {sorted(_ARCH)}")

  def need(key):
    full = f"{arch}.{key}"
    if full not in fields:
      raise LoraJaxError(f"{source}: missing GGUF metadata key {full!r}")
    return fields[full]

  heads = int(need("attention.head_count"))
  hidden = int(need("embedding_length"))
  head_dim = int(fields.get(f"{arch}.attention.key_length", hidden // heads))
  rope_type, scaling = "default", ()
  scale_type = fields.get(f"{arch}.rope.scaling.type")
  if scale_type == "linear":
    rope_type, scaling = "linear", (("factor", float(fields[f"{arch}.rope.scaling.factor"])),)
  elif scale_type not in (None, "none"):
    raise LoraJaxError(f"{source}: unsupported rope scaling type {scale_type!r} (supported: none, linear)")
  eos = fields.get("tokenizer.ggml.eos_token_id")
  return ModelConfig(
      architecture=_ARCH[arch],
      vocab_size=int(fields.get(f"{arch}.vocab_size", len(fields.get("tokenizer.ggml.tokens", [])))),
      hidden_size=hidden,
      intermediate_size=int(need("feed_forward_length")),
      num_layers=int(need("block_count")),
      num_heads=heads,
      num_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv", heads)),
      head_dim=head_dim,
      rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
      rope_theta=float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
      rope_type=rope_type,
      rope_scaling=scaling,
      rope_freq_factors=() if rope_freqs is None else tuple(float(f) for f in np.asarray(rope_freqs).reshape(-1)),
      max_position_embeddings=int(fields.get(f"{arch}.context_length", 4096)),
      tie_embeddings="output.weight" not in tensor_names,
      attention_bias="blk.0.attn_q.bias" in tensor_names,
      bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
      eos_token_ids=(int(eos),) if eos is not None else (),
      pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
  )


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation; works on weights (out, in) and on raw block rows."""
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class GGUFQuantized:
  """One stored quantized weight, exactly as in the file (rows un-permuted, bytes untouched).

  ``blocks`` is uint8 [out, in_bytes]: each row is the concatenation of the quantization blocks of that
  output row along the input axis; ``dequantize()`` gives float32 (out, in).
  """

  name: str
  qtype: str
  shape: tuple[int, int]  # (out, in)
  blocks: np.ndarray

  def dequantize(self) -> np.ndarray:
    import gguf
    return gguf.quants.dequantize(self.blocks, gguf.GGMLQuantizationType[self.qtype])


@dataclasses.dataclass
class GGUFModel:
  config: ModelConfig
  params: dict
  fields: dict[str, Any]
  quantized: dict[str, list[GGUFQuantized]]  # param path -> per-layer stored blocks


def load_gguf(path: str | Path, *, dtype=np.float32) -> GGUFModel:
  """Reads config, dequantized parameters (as numpy, `dtype`) and metadata from a GGUF file."""
  import gguf
  path = Path(path)
  reader, fields = _open(path)
  fields = copy.deepcopy(dict(fields))  # the caller's own (GGUFModel.fields): the cached parse stays as read
  tensors = {t.name: t for t in reader.tensors}
  rope_freqs = tensors.get("rope_freqs.weight")
  cfg = config_from_gguf(fields, set(tensors), str(path),
                         None if rope_freqs is None else gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type))
  L = cfg.num_layers
  expected_shapes = {
      "attn_q.weight": (cfg.q_size, cfg.hidden_size), "attn_k.weight": (cfg.kv_size, cfg.hidden_size),
      "attn_v.weight": (cfg.kv_size, cfg.hidden_size), "attn_output.weight": (cfg.hidden_size, cfg.q_size),
      "ffn_gate.weight": (cfg.intermediate_size, cfg.hidden_size),
      "ffn_up.weight": (cfg.intermediate_size, cfg.hidden_size),
      "ffn_down.weight": (cfg.hidden_size, cfg.intermediate_size),
      "attn_norm.weight": (cfg.hidden_size,), "ffn_norm.weight": (cfg.hidden_size,),
      "attn_q.bias": (cfg.q_size,), "attn_k.bias": (cfg.kv_size,), "attn_v.bias": (cfg.kv_size,),
  }
  permute = cfg.architecture == "llama"
  heads_of = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}

  def tensor(name) -> np.ndarray:
    if name not in tensors:
      raise LoraJaxError(f"{path}: missing tensor {name!r}")
    t = tensors[name]
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise LoraJaxError(f"{path}: tensor {name!r} has unsupported quantization type {t.tensor_type.name}") from None
    return w

  layers: dict = {"attn_norm": {}, "attn": {}, "mlp_norm": {}, "mlp": {}}
  quantized: dict[str, list[GGUFQuantized]] = {}
  for suffix, (group, sub, leaf) in _LAYER_TENSORS.items():
    if f"blk.0.{suffix}" not in tensors and suffix.endswith(".bias"):
      continue
    out = None
    stored = []
    for i in range(L):
      name = f"blk.{i}.{suffix}"
      w = tensor(name)
      if w.shape != expected_shapes[suffix]:
        raise LoraJaxError(f"{path}: tensor {name!r} has shape {w.shape}, expected {expected_shapes[suffix]}")
      base = suffix.split(".")[0]
      if permute and base in heads_of:
        w = _unpermute_rows(w, heads_of[base])
      if leaf == "kernel":
        w = w.T
        t = tensors[name]
        if t.tensor_type.name not in ("F32", "F16", "BF16"):
          blocks = np.asarray(t.data).reshape(w.shape[1], -1)
          if permute and base in heads_of:
            blocks = _unpermute_rows(blocks, heads_of[base])
          stored.append(GGUFQuantized(name, t.tensor_type.name, (w.shape[1], w.shape[0]), blocks))
      if out is None:
        out = np.empty((L, *w.shape), dtype)
      out[i] = w
    node = layers[group] if sub is None else layers[group].setdefault(sub, {})
    node[leaf] = out
    if stored:
      quantized[f"layers/{group}/{sub}/{leaf}"] = stored
  params = {
      "embed": {"embedding": tensor("token_embd.weight").astype(dtype)},
      "layers": layers,
      "final_norm": {"scale": tensor("output_norm.weight").astype(dtype)},
  }
  if params["embed"]["embedding"].shape != (cfg.vocab_size, cfg.hidden_size):
    raise LoraJaxError(f"{path}: token_embd.weight has shape {params['embed']['embedding'].shape}, "
                       f"expected {(cfg.vocab_size, cfg.hidden_size)}")
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": np.ascontiguousarray(tensor("output.weight").T).astype(dtype)}
  return GGUFModel(cfg, params, fields, quantized)
