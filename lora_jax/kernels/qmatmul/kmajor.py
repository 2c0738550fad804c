"""The K-major layout of a 4-bit kernel, and the Pallas (Triton) kernel that reads it on Hopper tensor cores.

A `QTensor` stores its codes as (K/2, N) bytes: a column's codes lie N bytes apart. A tensor-core kernel over that
layout moves every dequantized weight tile through shared memory into the dot's register layout (on sm_90 the
best such variant, magic16 + partial scaling, takes 5.8 machine instructions per weight, 0.7 of them
shared-memory loads; `benchmarks/pallas_compile_sm90.py`). `KMajor` holds the same codes as uint32
words in column groups (below): each column's codes for a block contiguous, in the order in which the threads of
a Hopper warpgroup dot hold a register operand (`nibble_order`). The kernel computes the transposed
product ``yᵀ = Wᵀ xᵀ`` with the weight tile as the dot's first operand, from registers (wgmma with a register A
operand): Triton stages the packed words through shared memory with asynchronous copies (its software pipeline)
and each thread reads its own words back with 64-bit loads already in that operand's layout; no dequantized
weight passes through shared memory or a shuffle. Only the small activation (bf16 / f16), the dot's other
operand, does: its m rows as the caller holds them, the rows that pad a tile to 16 or more masked off on load and
on store, so a call is the one kernel (and, with split_k > 1, the sum of its partial tiles), with no XLA op to
pad, transpose or slice.

Codes to values, for the affine formats (int4_sym, int4_asym, q4_0, q4_1): each word holds four register pairs
of the operand. ``((word >> s) & 0x000F000F) | magic`` (s = 0, 4, 8, 12) has as its two halves the 16-bit floats
``base + q`` of two codes (magic: base's bits in both halves; base = 128 in bfloat16, 1024 in float16, whose ulp
is 1, so a nibble in the low mantissa bits is the value's integer part), and one packed fused multiply-add,
``· 1 − (base + minus)`` (minus = 8 for int4_sym / q4_0, else 0), gives ``q − minus`` exactly (integers below
16 in magnitude). On a GPU that is two instructions per pair of weights in inline PTX (`pair_ptx`); interpret
mode runs the same operations in jnp. The (bn × bm) product of each quantization block is scaled once per column
(and the offset formats add ``offset · Σx`` over the block, x summed in the kernel by a dot with ones), as
``rescale="partial"`` does for the (K/2, N) layout. So the weights are exact in the 16-bit dot; the products and
sums are float32.

Compiled for sm_90, int4 in blocks of 64 at 16 rows (4096 × 14336): 3.30 instructions per weight under
`pallas_gpu.KMAJOR` (bn 64, 4 blocks per step, scales a step ahead; 3.92 at one row, whose steps of 2 blocks let
K split further; 2.84-2.87 at bn 128 without prefetch), 2.42 at bn 256, against 5.77-5.81 for magic16 + partial and
3.68 for the one-row
``dot="words"`` kernel (benchmarks/results/pallas_compile_sm90.json, variants "K-major"): half a LOP3 and half an
HFMA2 per weight, 0.38 shifts, a quarter FFMA for the block scale. (Written as jnp operations the mask and the OR
with two constants compile to two LOP3s, 3.33 per weight; a magic passed at run time, which folds them into one,
stops Triton from loading the words in the dot's layout.)

Column groups: the words are stored (N/G, K/B, G, B/8), G = `column_group(N)` (up to 256 columns), so one block's
words for G columns are one run of memory and a program's column tile (bn <= G) reads bn·B/2 contiguous bytes per
block; the block parameters are grouped alike, (N/G, K/B, G). On an H200 (benchmarks/results/*_run3/4.json) the
ungrouped (N, K/8) layout, a 32-byte piece per column and block, read int4 at 4096 × 14336 and one row at 1434
GB/s of device time; grouped, at 1789 GB/s under the same policy and 2079 GB/s (64% of that run's copy bandwidth)
with each step's scales loaded a step ahead; under run 5's `KMAJOR` 16.5 us, 62-70% of copy at 1-16 rows (runs
5-6), and with one row's step halved so that K splits 8 ways (`KMAJOR` now) 15.35 us, 74.6% (run 6's grid). A
kernel that only streams the same bytes in contiguous runs: 2900 GB/s.

NF4 (plain or double-quantized, whose int8 scale codes are formed into floats per block and column): the table
has no affine map, so each word's 8 codes are looked up by byte permutes over the table held in registers
(`nf4_prmt.KMAJOR_PROGRAM`, emitted by `nf4_prmt.ptx_kmajor`: 24 instructions per word, 14 of them permutes,
the table words kept in registers for the whole loop; each register pair's two codes adjacent in the word,
`NF4_WORD_SLOTS`), the table rounded once to the 16-bit type as the QTensor kernel's "prmt" lookup does:
6.05-6.16 instructions per weight at 1 or 16 rows under `KMAJOR` (4.05-4.18 at bn 256; 4.59-4.62 at bn 128
without prefetch), against 7.70-7.77 for the best QTensor NF4 policy (prmt + partial) and 11.3 / 26.2 for the
defaults.
Float32 activations are not taken (the register operand is 16-bit; rounding x would lose precision).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ...quant._qtensor import (DQ_GROUP, OFFSET_FORMATS, Blocks4bit, QTensor, block_scales, nf4_values, pack, unpack,
                               values)
from . import _kloop, _rows, nf4_prmt

AFFINE_FORMATS = ("int4_sym", "int4_asym", "q4_0", "q4_1")
FORMATS = AFFINE_FORMATS + ("nf4",)
DTYPES = (jnp.bfloat16, jnp.float16)
# Per 16-bit dtype: the bits of `base` and base, whose ulp is 1: a nibble ORed into the low mantissa bits is the
# value's integer part; and the PTX type of a pair of them.
_MAGIC = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0, "bf16x2"), jnp.dtype(jnp.float16): (0x6400, 1024.0, "f16x2")}
GROUP_MAX = 256  # the widest column group (`column_group`), so the widest column tile a program may take


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class KMajor(Blocks4bit):
  """A 4-bit (K, N) kernel in the K-major layout (module docstring), made by `pack_kmajor`
  from a `QTensor` and turned back by `unpack_kmajor`, exactly. Children: arrays; aux data: format, block size,
  shape (K, N), dtype of the dequantized kernel, as `QTensor`, which it stands in for in a parameter tree: it has
  `linear` (the `kernels.qmatmul` op) and `dequantize`.

  Invariants (checked on construction, ValueError): codes uint32 (..., N/G, K/B, G, B/8) for the column group G
  (`group`, a power of two dividing N; `pack_kmajor` takes `column_group(N)`), eight codes per word, each block's
  in `nibble_order`; scale (and offset, for int4_asym / q4_1) (..., N/G, K/B, G), as stored in the QTensor,
  grouped alike (a double-quantized NF4's int8 scale codes too, with its second-level `dq_scale` / `dq_offset`
  unchanged); a format of `FORMATS`; a block size that is a power of two >= 32."""

  codes: Any
  scale: Any
  offset: Any = None
  dq_scale: Any = None
  dq_offset: Any = None
  fmt: str = "int4_sym"
  block_size: int = 64
  shape: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32
  group: int | None = None  # None: `column_group(N)`, as `pack_kmajor` makes it

  _AUX = Blocks4bit._AUX + ("group",)
  _CODES_RANK = 4

  def __post_init__(self):
    if self.fmt not in FORMATS:
      raise ValueError(f"KMajor takes the formats {FORMATS}, not {self.fmt!r}")
    k, n = self.shape
    if self.group is None:
      object.__setattr__(self, "group", column_group(n))
    b, g = self.block_size, self.group
    if b < 32 or b & (b - 1) or k % b:
      raise ValueError(f"KMajor: block_size {b} must be a power of two >= 32 dividing K={k}")
    if g < 1 or g & (g - 1) or n % g:
      raise ValueError(f"KMajor: group {g} must be a power of two dividing N={n}")
    grid = (n // g, k // b, g)
    if tuple(self.codes.shape)[-4:] != (*grid, b // 8) or jnp.dtype(self.codes.dtype) != jnp.uint32:
      raise ValueError(f"KMajor: codes must be uint32 of shape (..., {', '.join(map(str, grid))}, {b // 8}) "
                       f"(column groups, blocks, columns, words), got {self.codes.dtype} {tuple(self.codes.shape)}")
    self._check_block_params(grid, owner="KMajor: ")

  def dequantize(self):
    """The (K, N) kernel in `self.dtype`, read from this layout (`dequantize_kmajor`; equal to
    ``unpack_kmajor(self).dequantize()``, the reference every kernel is tested against)."""
    return dequantize_kmajor(self)

  def linear(self, x):
    from .. import qmatmul
    return qmatmul(x, self)


# Where an NF4 word keeps its four register pairs: slot q of the word holds what slot NF4_WORD_SLOTS[q] holds in
# the affine formats' words, so pair p is nibbles 2p and 2p + 1 (bits 8p to 8p + 7) instead of p and p + 4.
NF4_WORD_SLOTS = (0, 4, 1, 5, 2, 6, 3, 7)


def nibble_order(block: int, fmt: str = "int4_sym") -> np.ndarray:
  """Where each code of a block is stored: slot i (byte i // 2, low nibble when i is even) holds the code of row
  ``order[i]`` of the block's B rows of K.

  In a 16-row-of-K step of a Hopper dot whose first operand is 16-bit and in registers, the thread with lane
  index t (mod 4) holds, per output column, rows 2t, 2t+1, 2t+8 and 2t+9 as two 32-bit registers of two values
  each (the pairs (2t, 2t+1) and (2t+8, 2t+9)). A block of B rows is B/16 such steps, so B/8 pairs per thread,
  which this order puts in B/32 32-bit words of codes per thread, adjacent in memory (word w' of thread t is word
  ``t·B/32 + w'`` of the block): byte b of word w' holds, in its low nibble, row ``16·(2w' + b mod 2) + 2t + b//2``
  and in its high nibble the row 8 after that. Then the word's bits 0-3 and 16-19 are a register pair (rows 2t
  and 2t+1 of step 2w'), bits 4-7 and 20-23 the pair 8 rows on, and the word shifted by 8 the same for step
  2w' + 1: a shift and two instructions per pair (`pair_ptx`), no byte permutes.

  NF4 (``fmt="nf4"``) keeps the same four pairs in each word, each pair's two codes adjacent (`NF4_WORD_SLOTS`:
  pair p in bits 8p to 8p + 7): its byte-permute lookup takes four codes at a time, from the low or the high
  half-word, and then gives two pairs with one permute each (`nf4_prmt.KMAJOR_PROGRAM`) instead of two."""
  order = np.empty(block, np.int32)
  for t in range(4):
    for w in range(block // 32):
      for b in range(4):
        byte = (t * (block // 32) + w) * 4 + b
        for nu in range(2):
          order[2 * byte + nu] = (2 * w + b % 2) * 16 + nu * 8 + 2 * t + b // 2
  if fmt == "nf4":
    order = order.reshape(-1, 8)[:, list(NF4_WORD_SLOTS)].reshape(-1)
  return order


# `nibble_order` as a transpose: a block's B slots, split into the mixed-radix digits (t 4, w' B/32, 2, 2, 2) of
# slot 2·byte + nu, byte = 4·(t·B/32 + w') + b, hold the rows whose digits (w', b mod 2, nu, t, b // 2) are these
# axes in this order. The affine formats' last three slot digits are (b // 2, b mod 2, nu); NF4's
# (`NF4_WORD_SLOTS`) are (b mod 2, nu, b // 2). Tested against `nibble_order`.
_SLOT_TO_ROW = {"affine": (1, 3, 4, 0, 2), "nf4": (1, 2, 3, 0, 4)}


def _rows_from_slots(a, block: int, fmt: str):
  """(..., B) values of a block in slot order -> the same in row order (a transpose, no gather)."""
  perm = _SLOT_TO_ROW["nf4" if fmt == "nf4" else "affine"]
  lead = a.shape[:-1]
  a = a.reshape(*lead, 4, block // 32, 2, 2, 2)
  return a.transpose(*range(len(lead)), *(len(lead) + i for i in perm)).reshape(*lead, block)


def _block_rows(p: KMajor):
  """`p`'s codes as int32 (..., N/G, nb, G, B), each block's B codes in row order: every word's eight nibbles,
  put in order by `_rows_from_slots`. What `dequantize_kmajor` and `unpack_kmajor` both read."""
  q = (p.codes[..., None] >> (4 * jnp.arange(8, dtype=jnp.uint32))) & 0xF  # (..., N/G, nb, G, B/8, 8)
  return _rows_from_slots(q.reshape(*q.shape[:-2], p.block_size).astype(jnp.int32), p.block_size, p.fmt)


def dequantize_kmajor(p: KMajor):
  """`p`'s (K, N) kernel in `p.dtype`, read from the K-major layout without moving the codes back: each word's
  eight nibbles, their format's values (`quant._qtensor.values`, the map the QTensor layout uses), the block's
  rows put in order by a transpose (`_rows_from_slots`) and the column groups undone by another, all of which
  XLA fuses. Equal to ``unpack_kmajor(p).dequantize()`` (tested). So the XLA path of a K-major weight (more rows
  than its kernel takes, as in training; its backward pass) does not re-lay the codes at every call: on a 2-core
  CPU, 4096 x 4096, 1.15-1.55x the time of the QTensor's own dequantize, against 1.3-1.7x through
  `unpack_kmajor`."""
  (k, n), lead = p.shape, len(p.lead_shape)
  q = _block_rows(p)  # (..., N/G, nb, G, B)
  scale = p.scale
  if p.double_quantized:  # the flat (block, column) index of bitsandbytes' layout picks the second-level group
    scale = _grouped(block_scales(jnp.swapaxes(_ungrouped(scale, lead), -1, -2), p.dq_scale, p.dq_offset)
                     .swapaxes(-1, -2), p.group, lead)
  param = lambda a: None if a is None else a.astype(jnp.float32)[..., None]
  w = values(p.fmt, q, param(scale), param(p.offset))  # (..., N/G, nb, G, B)
  w = jnp.moveaxis(w, (lead + 1, lead + 3), (lead, lead + 1))  # (..., nb, B, N/G, G)
  return w.reshape(*w.shape[:lead], k, n).astype(p.dtype)


def _reorder(codes_kn, block: int, order):
  """(..., K/2, N) packed codes to (..., N, K/8) words, the codes of each block of K moved to `order` (slot i takes
  row order[i]; slot i of a block is bits 4·(i mod 8) of its word i // 8)."""
  q = jnp.swapaxes(unpack(codes_kn), -1, -2)  # (..., N, K) int32
  *lead, n, k = q.shape
  q = q.reshape(*lead, n, k // block, block)[..., order].reshape(*lead, n, k // 8, 8).astype(jnp.uint32)
  return jnp.sum(q << (4 * jnp.arange(8, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32)


def _not_packable(w: QTensor) -> str | None:
  """Why `w` has no K-major layout, or None."""
  if w.fmt not in FORMATS:
    return f"the K-major kernel takes the formats {FORMATS}, not {w.fmt!r}"
  if w.block_size < 32 or w.block_size & (w.block_size - 1):
    return f"block size {w.block_size} (the kernel needs a power of two >= 32)"
  return None


def column_group(n: int) -> int:
  """The column group `pack_kmajor` gives an N-column weight: the largest power of two up to `GROUP_MAX` dividing
  N. A program's column tile (bn) is at most this, so that its codes for one block are one run of memory."""
  return math.gcd(n, GROUP_MAX)


def _grouped(a, g: int, lead: int):
  """(lead..., N, nb, rest...) -> (lead..., N/g, nb, g, rest...): each group of g columns' arrays for one block
  together in memory."""
  n, nb, *rest = a.shape[lead:]
  return jnp.swapaxes(a.reshape(*a.shape[:lead], n // g, g, nb, *rest), lead + 1, lead + 2)


def _ungrouped(a, lead: int):
  """`_grouped`'s inverse: (lead..., N/g, nb, g, rest...) -> (lead..., N, nb, rest...)."""
  ng, nb, g, *rest = a.shape[lead:]
  return jnp.swapaxes(a, lead + 1, lead + 2).reshape(*a.shape[:lead], ng * g, nb, *rest)


def pack_kmajor(w: QTensor) -> KMajor:
  """`w`'s codes in the K-major layout: the same codes, moved (`nibble_order`, `column_group`), and the same
  block parameters, transposed and grouped alike; nothing is requantized. Run it once per weight, outside the step
  that uses it (`to_kmajor` does a parameter tree). Raises ValueError for a block size the kernel cannot take."""
  why = _not_packable(w)
  if why:
    raise ValueError(f"pack_kmajor: {why}")
  (k, n), b, lead = w.shape, w.block_size, len(w.lead_shape)
  g = column_group(n)
  codes = _reorder(w.codes, b, nibble_order(b, w.fmt))  # (..., N, K/8)
  codes = _grouped(codes.reshape(*codes.shape[:-1], k // b, b // 8), g, lead)
  params = lambda a: None if a is None else _grouped(jnp.swapaxes(a, -1, -2), g, lead)
  return KMajor(codes, params(w.scale), params(w.offset), w.dq_scale, w.dq_offset, fmt=w.fmt, block_size=b,
                shape=w.shape, dtype=w.dtype, group=g)


def unpack_kmajor(p: KMajor) -> QTensor:
  """The `QTensor` whose codes `p` holds (`pack_kmajor`'s inverse, exactly)."""
  (k, n), b, lead = p.shape, p.block_size, len(p.lead_shape)
  q = _ungrouped(_block_rows(p), lead)  # (..., N, nb, B): each block's codes in row order
  q = q.reshape(*q.shape[:lead], n, k)
  params = lambda a: None if a is None else jnp.swapaxes(_ungrouped(a, lead), -1, -2)
  return QTensor(pack(jnp.swapaxes(q, -1, -2)), params(p.scale), params(p.offset), p.dq_scale, p.dq_offset,
                 fmt=p.fmt, block_size=b, shape=p.shape, dtype=p.dtype)


def to_kmajor(tree):
  """`tree` with every `QTensor` (NF4, int4, GGUF Q4_0 / Q4_1; block a power of two >= 32) in the K-major layout
  (`pack_kmajor`), for the GPU kernel; everything else unchanged."""
  ok = lambda w: isinstance(w, QTensor) and _not_packable(w) is None
  return jax.tree.map(lambda w: pack_kmajor(w) if ok(w) else w, tree, is_leaf=lambda w: isinstance(w, QTensor))


def check(x_dtype, p: KMajor) -> None:
  """Raises ValueError when the kernel cannot take this call."""
  if p.shape[1] % 16:
    raise ValueError(f"the K-major kernel needs N a multiple of 16, got N={p.shape[1]}")
  if jnp.dtype(x_dtype) not in [jnp.dtype(d) for d in DTYPES]:
    raise ValueError(f"the K-major kernel's dot takes bfloat16 or float16 activations, got {jnp.dtype(x_dtype)} "
                     f"(a float32 x would be rounded to 16 bits; use the QTensor kernel or the reference)")


def magic_word(dtype) -> int:
  """The word ORed into each masked code pair: the bits of base in both halves."""
  bits = _MAGIC[jnp.dtype(dtype)][0]
  return bits << 16 | bits


def pair_constants(dtype, minus: float) -> tuple[int, int, int]:
  """The 32-bit words the code-to-value step uses, each a pair of 16-bit halves: the magic (base's bits), one
  (1.0) and the negated offset, -(base + minus)."""
  bits = lambda v: int(np.asarray(v, dtype).view(np.uint16))
  pair = lambda h: h << 16 | h
  return magic_word(dtype), pair(bits(1.0)), pair(bits(-(_MAGIC[jnp.dtype(dtype)][1] + minus)))


def pair_ptx(dtype, minus: float) -> str:
  """Inline PTX for one register pair: ``fma(((w & 0x000F000F) | magic), 1, -(base + minus))`` on the two 16-bit
  halves: one LOP3 (a logic op on three inputs: the constant magic in a register) and one packed fused
  multiply-add (sm_80 and later; `sub` on bf16 pairs needs sm_90). In Triton's own operations the mask and the
  OR with two constants become two LOP3s, and a runtime magic stops Triton from loading the words in the dot's
  layout; the asm does neither."""
  magic, one, neg = pair_constants(dtype, minus)
  kind = _MAGIC[jnp.dtype(dtype)][2]
  return (f"{{.reg .b32 m, o, c, t; mov.b32 m, {magic}; mov.b32 o, {one}; mov.b32 c, {neg}; "
          f"lop3.b32 t, $1, 0x000F000F, m, 0xEA; fma.rn.{kind} $0, t, o, c;}}")


def _pair(shifted, dtype, minus: float, interpret: bool):
  """(q_lo − minus, q_hi − minus) as `dtype` (two tensors) for the codes at bits 0-3 and 16-19 of each word of
  `shifted` (uint32): by `pair_ptx` on a GPU, by the same operations in jnp in interpret mode."""
  if interpret:
    v = (shifted & 0x000F000F) | magic_word(dtype)
    base = _MAGIC[jnp.dtype(dtype)][1]
    half = lambda h: jax.lax.bitcast_convert_type(h.astype(jnp.uint16), dtype) - (base + minus)
    return half(v & 0xFFFF), half(v >> 16)
  words = jax.lax.bitcast_convert_type(shifted, jnp.int32)  # the asm takes signed words
  (v,) = pltriton.elementwise_inline_asm(pair_ptx(dtype, minus), args=[words], constraints="=r,r", pack=1,
                                         result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.int32)])
  half = lambda h: jax.lax.bitcast_convert_type(h.astype(jnp.uint16), dtype)
  return half(v & 0xFFFF), half(v >> 16)  # LLVM folds the split and the pairing for the dot back into v


def _nf4_pair(words, pair: int, dtype, interpret: bool):
  """The NF4 values (rounded to `dtype`) of register pair `pair` of each uint32 word of codes: the codes at bits
  8·pair and 8·pair + 4 (`NF4_WORD_SLOTS`). On a GPU by `nf4_prmt.ptx_kmajor` (byte permutes over the table
  held in the asm's registers); in interpret mode by indexing the same 16-bit table."""
  if interpret:  # the select tree's float32 values rounded to `dtype`: nf4_prmt.table16, without a captured table
    value = lambda shift: nf4_values(((words >> shift) & 0xF).astype(jnp.int32)).astype(dtype)
    return value(8 * pair), value(8 * pair + 4)
  signed = jax.lax.bitcast_convert_type(words, jnp.int32)  # the asm takes signed words
  (v,) = pltriton.elementwise_inline_asm(nf4_prmt.ptx_kmajor(dtype, pair), args=[signed], constraints="=r,r",
                                         pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(signed.shape, jnp.int32)])
  half = lambda h: jax.lax.bitcast_convert_type(h.astype(jnp.uint16), dtype)
  return half(v & 0xFFFF), half(v >> 16)


def kernel(x_ref, codes_ref, scale_ref, *refs, fmt: str, block: int, bk: int, steps: int, dtype, lora: bool,
           lora_tile, m: int, n: int = 0, dq: bool = False, prefetch: bool = False, interpret: bool = False):
  """One (bn × bm) tile of ``yᵀ``: per quantization block, the codes (bn × B/2 bytes) to 16-bit value pairs in
  registers, a tensor-core dot with the transposed (bm × B) tile of x, the product scaled per column (module
  docstring); the transposed tile stored at the end. ``lora_tile(low_ref, b_ref)`` gives the LoRA term's (bm × bn)
  tile.

  x is read as the caller holds it, (m, K) rows, the rows of a partial tile masked on load and store (`_rows`),
  so the call needs no XLA op to pad or transpose x, nor one to slice the padding off the result. The offset
  formats sum each block's x tile in the kernel, for ``offset · Σx``, by a second tensor-core dot: a (bn × B)
  tile of ones times the x tile. Compiled for sm_90
  (4096 × 14336, 1 or 16 rows) at tiles of 128 columns without prefetch, q4_1 in blocks of 32 took 5.2
  instructions per weight that way, against 5.8 with a reduction of the x tile across threads and 4.8 with the
  sums formed by an XLA op before the call (one more kernel per call); in blocks of 64, 4.4, 4.1 and 3.6. Under
  `pallas_gpu.KMAJOR` (64 columns, scales a step ahead) it takes 5.7 (benchmarks/results/pallas_compile_sm90.json).

  ``prefetch``: each loop step's block parameters (scale, offset; a double-quantized NF4's scale formed from its
  code) are loaded a step ahead and carried in registers. Triton pipelines the codes' and x's loads through
  shared memory, not these narrow per-column loads, which otherwise are issued in the step that uses them."""
  rest = list(refs)
  offset_ref = rest.pop(0) if fmt in OFFSET_FORMATS else None
  dq_ref, dq_offset_ref = (rest.pop(0), rest.pop(0)) if dq else (None, None)
  low_ref, b_ref = (rest.pop(0), rest.pop(0)) if lora else (None, None)
  (o_ref,) = rest
  bn, bm = codes_ref.shape[1], x_ref.shape[0]  # codes_ref: (blocks, bn, B/8), the program's columns' words
  rows = _rows.Rows(m, bm)  # the rows of a partial tile masked on load and store
  minus = 8.0 if fmt in ("int4_sym", "q4_0") else 0.0
  first = pl.program_id(2) * steps
  if dq:  # column indices, for the flat index (block · N + column) of each scale's second-level group
    cols = pl.program_id(1) * bn + jax.lax.broadcasted_iota(jnp.int32, (bn, 1), 0)

  def block_params(g):
    """Block g's per-column scale (formed from its int8 code for a double-quantized NF4) and offset (None: none),
    float32 (bn, 1)."""
    sc = scale_ref[g].reshape(bn, 1).astype(jnp.float32)  # scale_ref: (blocks, bn), like the codes
    if dq:  # double-quantized NF4: the scale from its int8 code and its group's second-level scale
      sc = sc * dq_ref[(g * n + cols) // DQ_GROUP] + dq_offset_ref[0]
    return sc, offset_ref[g].reshape(bn, 1).astype(jnp.float32) if offset_ref is not None else None

  def add_block(g, acc, params=None):  # params: block g's, loaded a step ahead (None: loaded here, after the dot)
    word = codes_ref[g].reshape(bn, 4, block // 32)  # thread t's words: one run of bn·B/2 bytes

    def pair(shift):  # one register pair per word: rows (r, r + 1) as (low half, high half), minus subtracted
      if fmt == "nf4":
        return jnp.stack(_nf4_pair(word, shift // 4, dtype, interpret), axis=-1)
      return jnp.stack(_pair(word >> shift, dtype, minus, interpret), axis=-1)  # (bn, 4 t, B/32 w', 2 e)

    step_of = lambda s: jnp.stack([pair(s), pair(s + 4)], axis=-1)  # (..., 2 e, 2 nu): +8 rows in the high nibble
    w = jnp.stack([step_of(0), step_of(8)], axis=-1)  # (bn, t, w', e, nu, b mod 2)
    w = w.transpose(0, 2, 5, 4, 1, 3).reshape(bn, block)  # row 16·(2w' + b mod 2) + 8·nu + 2t + e
    xt = rows.load(x_ref.at[:, pl.ds(g * block, block)]).T  # (B, bm)
    part = jnp.dot(w, xt, preferred_element_type=jnp.float32)
    sc, off = params if params is not None else block_params(g)
    acc = acc + part * sc
    if off is not None:  # sum_k x_k (q_k s + o) = s sum_k x_k q_k + o sum_k x_k
      # Σx over the block for each row of x, as a (bn × bm) tile (every row alike), from the tensor cores
      sums = jnp.dot(jnp.ones((bn, block), dtype), xt, preferred_element_type=jnp.float32)
      acc = acc + off * sums
    return acc

  blocks_of = lambda t: [(first + t) * bk + u for u in range(bk)]

  def step(t, acc, loaded):  # loaded: the blocks' parameters, loaded a step earlier (prefetch), or None
    for g, params in zip(blocks_of(t), loaded or [None] * bk):
      acc = add_block(g, acc, params)
    return acc

  issue = lambda t: [block_params(g) for g in blocks_of(t)]
  acc = _kloop.k_loop(steps, jnp.zeros((bn, bm), jnp.float32), step, issue if prefetch else None).T
  if lora:
    acc += lora_tile(low_ref, b_ref)
  rows.store(o_ref, acc)


__all__ = ["AFFINE_FORMATS", "FORMATS", "GROUP_MAX", "KMajor", "NF4_WORD_SLOTS", "check", "column_group",
           "dequantize_kmajor", "kernel", "magic_word", "nibble_order", "pack_kmajor", "pair_constants", "pair_ptx",
           "to_kmajor", "unpack_kmajor"]
