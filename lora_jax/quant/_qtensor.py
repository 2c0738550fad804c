"""`QTensor`: a 4-bit quantized kernel as a pytree node, and the formats it holds.

Layout (all formats): the kernel is (K, N) = (in, out) and ``y = x @ W``. Quantization blocks of `block_size`
consecutive elements run along K, as in bitsandbytes (blocks over each output row of the (out, in) weight) and in
GGUF. Codes are 4-bit integers packed two per byte along K: ``codes[k2, n] = q[2·k2, n] | q[2·k2 + 1, n] << 4``
(uint8, shape (K/2, N)). Per-block parameters have shape (K / block_size, N).

Formats and their dequantization ``w = f(q, block parameters)``:

* ``nf4``  (QLoRA, Dettmers et al. 2023): ``w = NF4[q] · absmax``; block 64; NF4 is bitsandbytes' 16-value table.
  With double quantization the absmax values are themselves stored in 8 bits: ``absmax = c · s2[g] + offset`` with
  ``c`` int8, one f32 ``s2`` per group of 256 blocks and one f32 ``offset`` (the mean), i.e.
  4 + 8/64 + 32/(64·256) ≈ 4.127 bits per parameter instead of 4.5.
* ``int4``  symmetric: ``w = (q − 8) · scale``; asymmetric: ``w = q · scale + min``; block (group) 32, 64 or 128.
* ``q4_0`` / ``q4_1``: llama.cpp's GGUF blocks of 32: ``w = (q − 8) · d`` / ``w = q · d + m`` with f16 ``d``, ``m``.
  The f16 block parameters are kept as stored and the nibbles are only moved to the layout above, so the
  dequantized values equal `gguf.quants.dequantize` bit for bit (no requantization).

Invariants (checked in `__post_init__`, raising ValueError): codes are uint8 of shape (K/2, N); K is a multiple of
`block_size` and `block_size` is even; every block-parameter array has shape (K / block_size, N).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# bitsandbytes' NF4 code book (bitsandbytes/functional.py, `get_4bit_type("nf4")`): quantiles of N(0, 1)
# normalised to [-1, 1], with an exact zero.
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)

FORMATS = ("nf4", "int4_sym", "int4_asym", "q4_0", "q4_1")
DQ_GROUP = 256  # blocks per second-level scale (double quantization), as bitsandbytes
OFFSET_FORMATS = ("int4_asym", "q4_1")


class Blocks4bit:
  """What a 4-bit kernel's layouts share (`QTensor`; `kernels.KMajor`, the same codes moved): the children codes,
  scale, offset, dq_scale, dq_offset and the aux data fmt, block_size, shape, dtype; the pytree plumbing; the
  checks of the block parameters; the byte count."""

  _CHILDREN = ("codes", "scale", "offset", "dq_scale", "dq_offset")
  _AUX = ("fmt", "block_size", "shape", "dtype")
  _CODES_RANK = 2  # the trailing dims of `codes` that hold one kernel; any before them are a layer stack's

  def tree_flatten(self):
    aux = tuple(jnp.dtype(self.dtype).name if f == "dtype" else getattr(self, f) for f in self._AUX)
    return tuple(getattr(self, f) for f in self._CHILDREN), aux

  @property
  def lead_shape(self) -> tuple[int, ...]:
    """The layer-stack dims before one kernel's arrays: () for one kernel, (L,) for L stacked layers."""
    return tuple(self.codes.shape[:len(self.codes.shape) - self._CODES_RANK])

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)  # skip validation: leaves may be tracers, sliced layer stacks or sentinels
    for f, v in zip(cls._CHILDREN + cls._AUX, (*children, *aux)):
      object.__setattr__(obj, f, v)
    return obj

  def _check_block_params(self, shape: tuple[int, ...], owner: str = "") -> None:
    """ValueError unless scale (and offset) end in `shape` and offsets are there exactly for the offset formats."""
    for name in ("scale", "offset"):
      v = getattr(self, name)
      if v is not None and _shape(v)[-len(shape):] != shape:
        raise ValueError(f"{owner}{name} must have shape (..., {', '.join(map(str, shape))}), got {_shape(v)}")
    if (self.offset is None) != (self.fmt not in OFFSET_FORMATS):
      raise ValueError(f"{owner}format {self.fmt} {'needs' if self.offset is None else 'takes no'} offsets")

  @property
  def double_quantized(self) -> bool:
    return self.dq_scale is not None

  def nbytes(self) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in (getattr(self, f) for f in self._CHILDREN) if a is not None)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QTensor(Blocks4bit):
  """A quantized (K, N) kernel. Children: arrays; aux data: format, block size, shape, dtype."""

  codes: Any                   # uint8 (K/2, N)
  scale: Any                   # (K/B, N): absmax (nf4), scale (int4), d (q4_*); int8 codes when double-quantized
  offset: Any = None           # (K/B, N): min (int4_asym), m (q4_1); None otherwise
  dq_scale: Any = None         # nf4 double quantization: f32 (ceil(n_blocks / 256),)
  dq_offset: Any = None        # nf4 double quantization: f32 ()
  fmt: str = "nf4"
  block_size: int = 64
  shape: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32     # dtype of the dequantized kernel

  def __post_init__(self):
    if self.fmt not in FORMATS:
      raise ValueError(f"unknown quantization format {self.fmt!r}; supported: {FORMATS}")
    k, n = self.shape
    if self.block_size % 2 or k % self.block_size:
      raise ValueError(f"K={k} must be a multiple of block_size={self.block_size} (an even number)")
    if _shape(self.codes)[-2:] != (k // 2, n) or _dtype(self.codes) not in (None, np.uint8):
      raise ValueError(f"codes must be uint8 of shape (..., {k // 2}, {n}), got {_dtype(self.codes)} "
                       f"{_shape(self.codes)}")
    self._check_block_params((k // self.block_size, n))

  def block_scales(self):
    """Per-block scales as float32 (K/B, N), undoing double quantization."""
    return block_scales(self.scale, self.dq_scale, self.dq_offset)

  def dequantize(self):
    """The (K, N) kernel in `self.dtype`. The reference every kernel is tested against."""
    return dequantize(self)

  def linear(self, x):
    from ..kernels import qmatmul
    return qmatmul(x, self)

  def bits_per_parameter(self) -> float:
    """Stored bits per weight, codes and block parameters together (every layer of a stacked tensor counted)."""
    layers = int(np.prod(self.lead_shape))
    return 8 * self.nbytes() / (layers * self.shape[0] * self.shape[1])


def is_quantized(x) -> bool:
  """Whether `x` is a 4-bit kernel: a `QTensor`, or the same codes in the GPU kernel's K-major layout
  (`lora_jax.kernels.KMajor`); both have `dequantize()` and the aux data `fmt`, `block_size`, `shape`."""
  from ..kernels.qmatmul.kmajor import KMajor  # imported here: the kernels package imports this module
  return isinstance(x, (QTensor, KMajor))


def _shape(a):
  return tuple(a.shape) if hasattr(a, "shape") else (None, None)


def _dtype(a):
  return np.dtype(a.dtype) if hasattr(a, "dtype") else None


def unpack(codes):
  """uint8 (..., K/2, N) -> int32 codes (..., K, N) in 0..15."""
  lo = (codes & 0xF).astype(jnp.int32)
  hi = (codes >> 4).astype(jnp.int32)
  k2, n = codes.shape[-2:]
  return jnp.stack([lo, hi], axis=-2).reshape(*codes.shape[:-2], 2 * k2, n)


def pack(q):
  """int codes (..., K, N) in 0..15 -> uint8 (..., K/2, N); numpy in, numpy out (no device op: loading a GGUF
  packs hundreds of tensors, each shape a compile), otherwise a jax array."""
  q = q.astype(np.uint8) if isinstance(q, np.ndarray) else jnp.asarray(q).astype(jnp.uint8)
  return q[..., 0::2, :] | (q[..., 1::2, :] << 4)


def nf4_values(q):
  """NF4 code -> table value (float32) as a select tree on the 4 code bits: elementwise, so it fuses into the
  kernels that use it (a table gather does not lower in Triton and breaks XLA's fusion)."""
  t = [float(v) for v in NF4_TABLE]
  b0, b1, b2, b3 = (q & 1) != 0, (q & 2) != 0, (q & 4) != 0, (q & 8) != 0
  level1 = [jnp.where(b0, t[i + 1], t[i]) for i in range(0, 16, 2)]
  level2 = [jnp.where(b1, level1[i + 1], level1[i]) for i in range(0, 8, 2)]
  level3 = [jnp.where(b2, level2[i + 1], level2[i]) for i in range(0, 4, 2)]
  return jnp.where(b3, level3[1], level3[0]).astype(jnp.float32)


def block_scales(scale, dq_scale=None, dq_offset=None):
  """Per-block scales as float32, shaped like `scale` (..., K/B, N): as stored, or formed from double-quantized
  int8 codes: ``c · dq_scale[i // DQ_GROUP] + dq_offset`` for the i-th block of the flattened (K/B, N) array."""
  if dq_scale is None:
    return scale.astype(jnp.float32)
  nb = scale.shape[-2] * scale.shape[-1]
  group = jnp.repeat(dq_scale, DQ_GROUP, axis=-1)[..., :nb].reshape(scale.shape)
  return scale.astype(jnp.float32) * group + jnp.asarray(dq_offset)[..., None, None]


def values(fmt: str, q, scale, offset=None):
  """Dequantized float32 values of int codes `q` in 0..15 under `fmt`, with `scale` (and `offset`, for the offset
  formats) broadcast against `q`: the one statement of each format's map, shared by both layouts' dequantize."""
  if fmt == "nf4":
    return jnp.asarray(NF4_TABLE)[q] * scale
  if fmt in ("int4_sym", "q4_0"):
    return (q - 8).astype(jnp.float32) * scale
  return q.astype(jnp.float32) * scale + offset


def dequantize(t: QTensor):
  rep = lambda p: None if p is None else jnp.repeat(p.astype(jnp.float32), t.block_size, axis=-2)
  return values(t.fmt, unpack(t.codes), rep(t.block_scales()), rep(t.offset)).astype(t.dtype)
