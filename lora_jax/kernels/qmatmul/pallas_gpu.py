"""Pallas (Triton) GPU kernel: 4-bit dequantize-and-multiply without materialising the float kernel.

Grid: (M / bm, N / bn, split_k) programs; each computes one (bm × bn) output tile over its share of K. It walks
that share `bk` quantization blocks per loop step: for each block it loads the packed codes (B/2 × bn bytes) and
the per-block scale (and offset) row, unpacks the low and high nibbles (even and odd rows of K), maps codes to
values in registers (NF4: a 4-level select tree over the code bits; int4/q4: an affine map), and accumulates two
dots ``x_even · W_even + x_odd · W_odd`` in float32. The activation is split into its even and odd columns outside
the kernel (a copy of M × K elements, negligible next to the weights for the small M of decoding), which turns the
nibble interleave into two plain dots. With split_k > 1 the programs write float32 partial tiles that one XLA
reduction sums (deterministic, unlike atomics). `BlockSizes` holds every tiling choice.

Weight bytes read per output tile: K·bn/2 (+ K/B·bn·2 for f16 scales): the 4-bit traffic the decode-time speed
depends on. `interpret=True` runs the same kernel on CPU (tests). On GPU it lowers through Triton, chosen
explicitly with Triton compiler parameters: since JAX 0.10 a `pallas_call` without them lowers through Mosaic
GPU, which this kernel is not written for (it fails there: "exceeds available shared memory"). Without a GPU,
the tests check that the kernel lowers for CUDA to a Triton call and that its Triton IR compiles for sm_90 within
the hardware's limits (`triton_compile.py`); its numbers on a GPU and its speed need one
(benchmarks/int4_matmul.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ...quant._qtensor import QTensor, nf4_values


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling and Triton's launch parameters, in one place; `for_shape` resolves them for a call.

  * ``bm × bn``: the output tile of one program (bm >= 16: Triton's dots need it; M is padded to it).
  * ``bk``: quantization blocks loaded per step of the loop over K (None: the largest power of two up to 128 rows
    of K per step that divides the blocks evenly; one block when the block count is odd). Each program
    keeps only a few loads in flight per step, and at decode sizes the weight stream is all there is, so larger
    steps mean more bytes in flight (Little's law: ~3 MB across an H200 to reach its bandwidth).
  * ``split_k``: programs along K, whose float32 partial tiles are summed afterwards (None: doubled while there are
    fewer than `min_programs` programs, each keeps >= 4 steps, and the partial sums' traffic, written and read
    back, 8·split_k·M_padded·N bytes, stays within 1/8 of the packed codes' K·N/2). At decode sizes the output
    alone gives too few programs (N/bn: 64 for N = 4096, bn = 64, on 132 SMs); at M <= 16, K = 4096 gets
    split_k = 2 (+12.5% bytes), K = 14336 gets 4 (+7%).
  * ``num_warps``, ``num_stages``: Triton's warps per program and software-pipelining depth.

  The defaults are reasoned, not measured (no GPU has been lent to this project's sessions so far);
  `benchmarks/int4_matmul.py --block-sweep` times the alternatives on a GPU."""

  bm: int = 16
  bn: int = 64
  bk: int | None = None
  split_k: int | None = None
  num_warps: int = 4
  num_stages: int = 3
  min_programs: int = 264  # two per SM of an H100 / H200 (132 SMs)

  def for_shape(self, m: int, n: int, k: int | None = None, block_size: int | None = None) -> "BlockSizes":
    """Tile sizes for an (m × k) @ (k × n) call; bk and split_k are resolved when k and block_size are given."""
    bm = max(16, min(self.bm if m <= 16 else 64, _pow2_at_least(m)))
    bn = next((b for b in (self.bn, 128, 64, 32, 16) if n % b == 0), None)
    out = dataclasses.replace(self, bm=bm, bn=bn or self.bn)
    return out.resolve(m, n, k, block_size) if k and block_size else out

  def resolve(self, m: int, n: int, k: int, block_size: int) -> "BlockSizes":
    """bk and split_k for this shape (each a power of two dividing the work evenly), given bm and bn."""
    nb = k // block_size
    per_split = nb // self.split_k if self.split_k and nb % self.split_k == 0 else nb
    bk = self.bk or _pow2_divisor(per_split, max(1, 128 // block_size))
    steps = nb // bk if nb % bk == 0 else 0
    split = self.split_k
    if split is None:
      mp = -(-m // self.bm) * self.bm
      programs = mp // self.bm * (n // self.bn)
      split = 1
      while (programs * split < self.min_programs and steps % (2 * split) == 0 and steps // (2 * split) >= 4
             and 8 * (2 * split) * mp <= k // 2 // 8):  # partial sums' bytes <= 1/8 of the packed codes'
        split *= 2
    return dataclasses.replace(self, bk=bk, split_k=split)

  def compiler_params(self) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _pow2_divisor(n: int, at_most: int) -> int:
  """The largest power of two <= at_most that divides n."""
  d = 1
  while 2 * d <= at_most and n % (2 * d) == 0:
    d *= 2
  return d


def _pow2_at_least(m: int) -> int:
  return 1 << max(0, (m - 1).bit_length())


def _values(q, scale, offset, fmt):
  if fmt == "nf4":
    return nf4_values(q) * scale
  if fmt in ("int4_sym", "q4_0"):
    return (q.astype(jnp.float32) - 8.0) * scale
  return q.astype(jnp.float32) * scale + offset


def _kernel(xe_ref, xo_ref, codes_ref, scale_ref, *rest, fmt: str, half: int, bk: int, steps: int, lora: bool):
  rest = list(rest)
  offset_ref = rest.pop(0) if fmt in ("int4_asym", "q4_1") else None
  low_ref, b_ref = (rest.pop(0), rest.pop(0)) if lora else (None, None)
  (o_ref,) = rest
  first = pl.program_id(2) * steps  # this program's first step along K (split_k)

  def body(t, acc):
    for u in range(bk):  # bk quantization blocks per step: their loads are in flight together
      g = (first + t) * bk + u
      rows = pl.ds(g * half, half)
      c = codes_ref[rows, :].astype(jnp.int32)
      sc = scale_ref[pl.ds(g, 1), :].astype(jnp.float32)
      off = offset_ref[pl.ds(g, 1), :].astype(jnp.float32) if offset_ref is not None else None
      w_even = _values(c & 0xF, sc, off, fmt).astype(xe_ref.dtype)
      w_odd = _values(c >> 4, sc, off, fmt).astype(xe_ref.dtype)
      acc += jnp.dot(xe_ref[:, rows], w_even, preferred_element_type=jnp.float32)
      acc += jnp.dot(xo_ref[:, rows], w_odd, preferred_element_type=jnp.float32)
    return acc

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape[-2:], jnp.float32))
  if lora:  # the LoRA term's second product, s·(xA)·B, on the tile already in registers (once: split 0)
    lora_tile = jnp.dot(low_ref[...], b_ref[...], preferred_element_type=jnp.float32)
    acc += jnp.where(pl.program_id(2) == 0, lora_tile, jnp.zeros_like(lora_tile))
  o_ref[...] = acc.reshape(o_ref.shape)


def supports(x, w: QTensor, blocks: BlockSizes = BlockSizes()) -> tuple[bool, str]:
  """Whether this kernel handles the call, and why not."""
  if w.block_size // 2 < 16 or w.block_size & (w.block_size - 1):
    return False, f"block size {w.block_size} (needs a power of two >= 32)"
  k, n = w.shape
  if n % 16:
    return False, f"N={n} not a multiple of 16"
  if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return False, f"activation dtype {x.dtype}"
  return True, ""


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def qmatmul_pallas(x, w: QTensor, *, blocks: BlockSizes = BlockSizes(), interpret: bool = False):
  """``x @ dequantize(w)`` (float32 result, shape (..., N)) with the Pallas kernel."""
  return _pallas(x, w, None, None, blocks, interpret)


LORA_RANK_PAD = 16  # the rank is padded with zeros to a power of two >= this: Triton's dots need dims >= 16 and
# Pallas Triton needs power-of-two block shapes (a rank of 40 padded to 48 would not lower)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def qmatmul_lora_pallas(x, w: QTensor, low, b, *, blocks: BlockSizes = BlockSizes(), interpret: bool = False):
  """``x @ dequantize(w) + low @ b`` (float32, (..., N)) in one kernel: the LoRA term of QLoRA, with
  ``low = s·(x A)`` (M × r, computed outside: r is tiny) and ``b`` = B (r × N). Each output tile adds
  ``low_tile · B_tile`` to its accumulator before it is written, so the LoRA update costs no second pass over the
  output and no extra kernel launch."""
  return _pallas(x, w, low, b, blocks, interpret)


def _pallas(x, w: QTensor, low, b, blocks: BlockSizes, interpret: bool):
  k, n = w.shape
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  half = w.block_size // 2
  nb = k // w.block_size
  bs = blocks.for_shape(m, n, k, w.block_size)
  bk, split = bs.bk or 1, bs.split_k or 1
  if n % bs.bn:
    raise ValueError(f"N={n} is not a multiple of the tile width bn={bs.bn}")
  if nb % (bk * split):
    raise ValueError(f"bk={bk} x split_k={split} must divide the {nb} quantization blocks along K")
  steps = nb // (bk * split)
  mp = -(-m // bs.bm) * bs.bm
  x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
  xe, xo = x2[:, 0::2], x2[:, 1::2]
  in_specs = [
      pl.BlockSpec((bs.bm, k // 2), lambda i, j, s: (i, 0)),
      pl.BlockSpec((bs.bm, k // 2), lambda i, j, s: (i, 0)),
      pl.BlockSpec((k // 2, bs.bn), lambda i, j, s: (0, j)),
      pl.BlockSpec((nb, bs.bn), lambda i, j, s: (0, j)),
  ]
  # double-quantized NF4: the float32 block scales are formed first (an elementwise op reading 1 byte and writing 4
  # per block of 64 weights, i.e. +1/64 of the f32 weight's size); the kernel reads them like plain absmax
  args = [xe, xo, w.codes, w.block_scales() if w.double_quantized else w.scale]
  if w.offset is not None:
    in_specs.append(pl.BlockSpec((nb, bs.bn), lambda i, j, s: (0, j)))
    args.append(w.offset)
  lora = low is not None
  if lora:
    r = b.shape[0]
    rp = max(LORA_RANK_PAD, _pow2_at_least(r))
    low2 = jnp.pad(low.reshape(-1, r).astype(jnp.float32), ((0, mp - m), (0, rp - r)))
    in_specs += [pl.BlockSpec((bs.bm, rp), lambda i, j, s: (i, 0)),
                 pl.BlockSpec((rp, bs.bn), lambda i, j, s: (0, j))]
    args += [low2, jnp.pad(b.astype(jnp.float32), ((0, rp - r), (0, 0)))]
  if split == 1:
    out_shape, out_spec = (mp, n), pl.BlockSpec((bs.bm, bs.bn), lambda i, j, s: (i, j))
  else:  # one float32 partial tile per split, summed below
    out_shape, out_spec = (split, mp, n), pl.BlockSpec((None, bs.bm, bs.bn), lambda i, j, s: (s, i, j))
  out = pl.pallas_call(
      functools.partial(_kernel, fmt=w.fmt, half=half, bk=bk, steps=steps, lora=lora),
      out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
      grid=(mp // bs.bm, n // bs.bn, split),
      in_specs=in_specs,
      out_specs=out_spec,
      compiler_params=bs.compiler_params(),  # Triton, not JAX's default Mosaic GPU (module docstring)
      interpret=interpret,
  )(*args)
  if split > 1:
    out = jnp.sum(out, axis=0)
  return out[:m].reshape(*lead, n)
