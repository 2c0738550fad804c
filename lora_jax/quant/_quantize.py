"""Quantizing float kernels into `QTensor`s, importing GGUF blocks, and quantizing a parameter tree by rules."""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import LoraJaxError
from ._qtensor import DQ_GROUP, NF4_TABLE, QTensor, pack

DEFAULT_BLOCK = {"nf4": 64, "int4_sym": 64, "int4_asym": 64, "q4_0": 32, "q4_1": 32}
# Default rule: the linear kernels of every block (not norms, not embeddings, not the LM head).
DEFAULT_RULES = (r"layers/(attn|mlp)/\w+_proj/kernel",)


def _blocks(w, b):
  """(..., K, N) -> (..., K/B, B, N)."""
  *lead, k, n = w.shape
  return w.reshape(*lead, k // b, b, n)


def quantize(w, fmt: str = "nf4", *, block_size: int | None = None, double_quant: bool = False,
             name: str = "tensor") -> QTensor:
  """Quantizes a (..., K, N) kernel (leading axes, e.g. stacked layers, are kept).

  nf4: absmax per block, nearest NF4 code (bitsandbytes' scheme). int4_sym: scale = absmax / 7, q = round(w/scale)+8.
  int4_asym: scale = (max − min) / 15, q = round((w − min) / scale).
  """
  if fmt not in ("nf4", "int4_sym", "int4_asym"):
    raise LoraJaxError(f"cannot quantize into {fmt!r}: choose nf4, int4_sym or int4_asym (q4_0/q4_1 come from GGUF)")
  b = DEFAULT_BLOCK[fmt] if block_size is None else block_size
  if jnp.ndim(w) < 2:
    raise LoraJaxError(f"{name}: a kernel to quantize is (..., K, N); got shape {tuple(jnp.shape(w))}")
  if not isinstance(b, (int, np.integer)) or b < 2 or b % 2:
    raise LoraJaxError(f"{name}: block size must be an even integer >= 2 (two codes per byte), got {b!r}")
  *lead, k, n = w.shape
  if k % b:
    raise LoraJaxError(f"{name}: input dimension {k} is not divisible by the block size {b}")
  dtype = w.dtype
  w = jnp.asarray(w, jnp.float32)
  one = lambda wi: _quantize_2d(wi, fmt, b, double_quant)
  if lead:  # one 2-D slice at a time (lax.map): the nearest-code search needs 16 values per weight
    outs = jax.lax.map(one, w.reshape(-1, k, n))
    codes, scale, offset, dq_scale, dq_offset = (
        None if a is None else a.reshape(*lead, *a.shape[1:]) for a in outs)
  else:
    codes, scale, offset, dq_scale, dq_offset = one(w)
  return QTensor(codes, scale, offset, dq_scale, dq_offset, fmt=fmt, block_size=b, shape=(k, n), dtype=dtype)


def _quantize_2d(w, fmt: str, b: int, double_quant: bool):
  """(K, N) float32 -> (codes, scale, offset, dq_scale, dq_offset) as `QTensor` stores them."""
  k, n = w.shape
  wb = _blocks(w, b)
  offset = dq_scale = dq_offset = None
  if fmt == "nf4":
    absmax = jnp.max(jnp.abs(wb), axis=-2)
    normed = wb / jnp.where(absmax == 0, 1.0, absmax)[..., None, :]
    q = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4_TABLE)), axis=-1)
    scale = absmax
    if double_quant:
      scale, dq_scale, dq_offset = _double_quantize(absmax)
  elif fmt == "int4_sym":
    scale = jnp.max(jnp.abs(wb), axis=-2) / 7
    q = jnp.clip(jnp.round(wb / jnp.where(scale == 0, 1.0, scale)[..., None, :]) + 8, 0, 15)
  else:
    lo, hi = jnp.min(wb, axis=-2), jnp.max(wb, axis=-2)
    scale = (hi - lo) / 15
    q = jnp.clip(jnp.round((wb - lo[..., None, :]) / jnp.where(scale == 0, 1.0, scale)[..., None, :]), 0, 15)
    offset = lo
  return pack(q.reshape(k, n).astype(jnp.int32)), scale, offset, dq_scale, dq_offset


def _double_quantize(absmax):
  """absmax (..., nb, N) -> int8 codes, f32 per-256-block group scales, f32 mean offset (bitsandbytes' layout:
  blocks flattened row-major, grouped by 256)."""
  lead = absmax.shape[:-2]
  flat = absmax.reshape(*lead, -1)
  offset = jnp.mean(flat, axis=-1)
  centered = flat - offset[..., None]
  nb = flat.shape[-1]
  groups = -(-nb // DQ_GROUP)
  padded = jnp.pad(centered, [(0, 0)] * len(lead) + [(0, groups * DQ_GROUP - nb)])
  g = padded.reshape(*lead, groups, DQ_GROUP)
  s2 = jnp.max(jnp.abs(g), axis=-1) / 127
  c = jnp.clip(jnp.round(g / jnp.where(s2 == 0, 1.0, s2)[..., None]), -127, 127).astype(jnp.int8)
  c = c.reshape(*lead, -1)[..., :nb].reshape(absmax.shape)
  return c, s2, offset


def from_gguf(stored, dtype=jnp.float32) -> QTensor:
  """A GGUF Q4_0/Q4_1 weight (`lora_jax.io.GGUFQuantized`, rows = outputs) as a `QTensor` (K, N); a list of them
  (one per layer, same shape and type) as one stacked `QTensor` (L, K, N), stacked on the host (no device op).

  GGUF block (32 values): f16 d [, f16 m], then 16 bytes whose low nibbles are values 0..15 and high nibbles values
  16..31. The f16 parameters are kept; the nibbles are moved to our layout. Nothing is requantized.
  """
  stacked = isinstance(stored, (list, tuple))
  layers = stored if stacked else [stored]
  codes, d, m = (None if arrays[0] is None else np.stack(arrays) if stacked else arrays[0]
                 for arrays in zip(*map(_gguf_arrays, layers)))
  out, k = layers[0].shape
  return QTensor(jnp.asarray(codes), jnp.asarray(d), None if m is None else jnp.asarray(m),
                 fmt="q4_0" if layers[0].qtype == "Q4_0" else "q4_1", block_size=32, shape=(k, out), dtype=dtype)


def _gguf_arrays(stored):
  """(codes (K/2, N) uint8, d (K/32, N) f16, m (K/32, N) f16 or None) of one stored GGUF weight, as numpy."""
  if stored.qtype not in ("Q4_0", "Q4_1"):
    raise LoraJaxError(f"{stored.name}: GGUF quantization {stored.qtype} is not supported natively "
                       f"(supported: Q4_0, Q4_1); use --quantize nf4/int4 to requantize instead")
  out, k = stored.shape
  per = 18 if stored.qtype == "Q4_0" else 20
  raw = np.asarray(stored.blocks).reshape(out, k // 32, per)
  d = raw[..., 0:2].copy().view(np.float16)[..., 0]                 # (out, nb)
  m = raw[..., 2:4].copy().view(np.float16)[..., 0] if per == 20 else None
  qs = raw[..., per - 16:]
  q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(out, k)   # element j and j+16 of each block
  return pack(q.T), d.T, None if m is None else m.T


def _matches(path: str, rules: Sequence[str]) -> bool:
  return any(re.fullmatch(r, path) for r in rules)


def quantize_params(params: dict, fmt: str, *, rules: Sequence[str] = DEFAULT_RULES, block_size: int | None = None,
                    double_quant: bool = False, gguf_blocks: dict | None = None) -> dict:
  """`params` with every kernel whose path matches `rules` replaced by a `QTensor`.

  ``fmt="native"`` takes the stored GGUF blocks (`Model.quantized`) instead of quantizing: the matched leaves'
  values are not read, so pass the kernels as loaded (a merged adapter or a PiSSA residual would be replaced by
  the stored weights; quantize those with nf4 or int4, or keep an adapter apart with `merge_quantized`).
  """
  hits = []

  def visit(path, leaf):
    key = "/".join(str(getattr(k, "key", k)) for k in path)
    if not _matches(key, rules):
      return leaf
    hits.append(key)
    if fmt == "native":
      stored = (gguf_blocks or {}).get(key)
      if not stored:
        raise LoraJaxError(f"--quantize native: {key} has no stored 4-bit blocks (the model is not a 4-bit GGUF, "
                           f"or this tensor is stored as {'float' if gguf_blocks else 'unknown'})")
      return from_gguf(stored, leaf.dtype)
    return quantize(leaf, fmt, block_size=block_size, double_quant=double_quant, name=key)

  out = jax.tree_util.tree_map_with_path(visit, params)
  if not hits:
    keys = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    per_layer = any(re.match(r"layers/\[\d+\]/", key) for key in keys)
    raise LoraJaxError(f"quantization rules {list(rules)} match no parameter" + (
        " (these params are in the per-layer layout of Model.unstack_layers: quantize the stacked params, then "
        "unstack)" if per_layer else ""))
  return out


QUANTIZE_MODES = ("none", "nf4", "int4", "native")


def quantize_model_params(params: dict, mode: str, *, gguf_blocks: dict | None = None,
                          double_quant: bool = True) -> dict:
  """The frozen base for ``--quantize MODE``: none | nf4 (double-quantized, block 64) | int4 (symmetric, group 64) |
  native (a GGUF file's own Q4_0/Q4_1 blocks)."""
  if mode not in QUANTIZE_MODES:
    raise LoraJaxError(f"--quantize must be one of {list(QUANTIZE_MODES)}, got {mode!r}")
  if mode == "none":
    return params
  if mode == "nf4":
    return quantize_params(params, "nf4", double_quant=double_quant)
  if mode == "int4":
    return quantize_params(params, "int4_sym")
  return quantize_params(params, "native", gguf_blocks=gguf_blocks)


def from_bitsandbytes(packed, absmax, out_in: tuple[int, int], *, blocksize: int = 64, dtype=jnp.float32) -> QTensor:
  """An NF4 weight quantized by bitsandbytes (`quantize_4bit` on an (out, in) weight) as a `QTensor` (in, out).

  bitsandbytes flattens the weight row-major, takes blocks of `blocksize` consecutive values with one absmax each,
  and packs two codes per byte with the *first* value in the high nibble. `absmax` must be the float32 block absmax
  (with double quantization: bitsandbytes' ``dequantize_blockwise(state.absmax, state.state2) + state.offset``),
  so the dequantized values are bitsandbytes' exactly.
  """
  out, k = out_in
  if k % blocksize:
    raise LoraJaxError(f"bitsandbytes weight: in={k} is not divisible by blocksize {blocksize}")
  b = np.asarray(packed, np.uint8).reshape(-1)
  q = np.stack([b >> 4, b & 0xF], axis=-1).reshape(out, k)
  codes = jnp.asarray(pack(q.T))
  scale = np.asarray(absmax, np.float32).reshape(out, k // blocksize).T
  return QTensor(codes, jnp.asarray(scale), fmt="nf4", block_size=blocksize, shape=(k, out), dtype=dtype)
