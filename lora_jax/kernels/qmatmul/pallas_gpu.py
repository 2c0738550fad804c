"""Pallas (Triton) GPU kernel: 4-bit dequantize-and-multiply without materialising the float kernel.

Grid: one program per (bm × bn) output tile. Each program walks K one quantization block at a time: it loads that
block's packed codes (B/2 × bn bytes) and its per-block scale (and offset) row, unpacks the low and high nibbles
(even and odd rows of K), maps codes to values in registers (NF4: a 4-level select tree over the code bits;
int4/q4: an affine map), and accumulates two dots ``x_even · W_even + x_odd · W_odd`` in float32. The activation
is split into its even and odd columns outside the kernel (a copy of M × K elements, negligible next to the
weights for the small M of decoding), which turns the nibble interleave into two plain dots.

Weight bytes read per output tile: K·bn/2 (+ K/B·bn·2 for f16 scales): the 4-bit traffic the decode-time speed
depends on. `interpret=True` runs the same kernel on CPU (tests); on GPU it lowers through Triton, chosen
explicitly with Triton compiler parameters: since JAX 0.10 a `pallas_call` without them lowers through Mosaic
GPU, which this kernel is not written for (its whole-K blocks exceed Mosaic's 256-element copies). That the
kernel lowers to Triton IR for CUDA is checked on CPU (`lower_for_cuda`, tests/kernels/test_qmatmul.py); that
Triton compiles it to PTX, and its speed, only on a GPU (benchmarks/int4_matmul.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ...quant._qtensor import QTensor, nf4_values


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Output tile sizes and Triton's launch parameters. Defaults are the usual Triton matmul settings for skinny
  (decode) shapes; they are the values to sweep with `benchmarks/int4_matmul.py` on a GPU (not yet tuned on
  hardware: no GPU has been lent to this project's sessions so far)."""

  bm: int = 16
  bn: int = 64
  num_warps: int = 4    # warps per program (32 threads each)
  num_stages: int = 3   # software-pipelining depth of the loop over K

  def for_shape(self, m: int, n: int) -> "BlockSizes":
    bm = max(16, min(self.bm if m <= 16 else 64, _pow2_at_least(m)))
    bn = next((b for b in (self.bn, 128, 64, 32, 16) if n % b == 0), None)
    return dataclasses.replace(self, bm=bm, bn=bn or self.bn)

  def compiler_params(self) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _pow2_at_least(m: int) -> int:
  return 1 << max(0, (m - 1).bit_length())


def _values(q, scale, offset, fmt):
  if fmt == "nf4":
    return nf4_values(q) * scale
  if fmt in ("int4_sym", "q4_0"):
    return (q.astype(jnp.float32) - 8.0) * scale
  return q.astype(jnp.float32) * scale + offset


def _kernel(xe_ref, xo_ref, codes_ref, scale_ref, *rest, fmt: str, half: int, n_blocks: int, lora: bool):
  rest = list(rest)
  offset_ref = rest.pop(0) if fmt in ("int4_asym", "q4_1") else None
  low_ref, b_ref = (rest.pop(0), rest.pop(0)) if lora else (None, None)
  (o_ref,) = rest

  def body(i, acc):
    rows = pl.ds(i * half, half)
    c = codes_ref[rows, :].astype(jnp.int32)
    s = scale_ref[pl.ds(i, 1), :].astype(jnp.float32)
    off = offset_ref[pl.ds(i, 1), :].astype(jnp.float32) if offset_ref is not None else None
    w_even = _values(c & 0xF, s, off, fmt).astype(xe_ref.dtype)
    w_odd = _values(c >> 4, s, off, fmt).astype(xe_ref.dtype)
    acc += jnp.dot(xe_ref[:, rows], w_even, preferred_element_type=jnp.float32)
    acc += jnp.dot(xo_ref[:, rows], w_odd, preferred_element_type=jnp.float32)
    return acc

  acc = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros(o_ref.shape, jnp.float32))
  if lora:  # the LoRA term's second product, s·(xA)·B, on the tile already in registers
    acc += jnp.dot(low_ref[...], b_ref[...], preferred_element_type=jnp.float32)
  o_ref[...] = acc


def supports(x, w: QTensor, blocks: BlockSizes = BlockSizes()) -> tuple[bool, str]:
  """Whether this kernel handles the call, and why not."""
  if w.block_size // 2 < 16 or w.block_size & (w.block_size - 1):
    return False, f"block size {w.block_size} (needs a power of two >= 32)"
  k, n = w.shape
  if blocks.for_shape(int(np.prod(x.shape[:-1])), n).bn is None or n % 16:
    return False, f"N={n} not a multiple of 16"
  if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return False, f"activation dtype {x.dtype}"
  return True, ""


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def qmatmul_pallas(x, w: QTensor, *, blocks: BlockSizes = BlockSizes(), interpret: bool = False):
  """``x @ dequantize(w)`` (float32 result, shape (..., N)) with the Pallas kernel."""
  return _pallas(x, w, None, None, blocks, interpret)


LORA_RANK_PAD = 16  # the rank is padded (with zeros) to a multiple of this: Triton's dots need dims >= 16


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
  bs = blocks.for_shape(m, n)
  mp = -(-m // bs.bm) * bs.bm
  x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
  xe, xo = x2[:, 0::2], x2[:, 1::2]
  half = w.block_size // 2
  nb = k // w.block_size
  in_specs = [
      pl.BlockSpec((bs.bm, k // 2), lambda i, j: (i, 0)),
      pl.BlockSpec((bs.bm, k // 2), lambda i, j: (i, 0)),
      pl.BlockSpec((k // 2, bs.bn), lambda i, j: (0, j)),
      pl.BlockSpec((nb, bs.bn), lambda i, j: (0, j)),
  ]
  # double-quantized NF4: the float32 block scales are formed first (an elementwise op reading 1 byte and writing 4
  # per block of 64 weights, i.e. +1/64 of the f32 weight's size); the kernel reads them like plain absmax
  args = [xe, xo, w.codes, w.block_scales() if w.double_quantized else w.scale]
  if w.offset is not None:
    in_specs.append(pl.BlockSpec((nb, bs.bn), lambda i, j: (0, j)))
    args.append(w.offset)
  lora = low is not None
  if lora:
    r = b.shape[0]
    rp = -(-r // LORA_RANK_PAD) * LORA_RANK_PAD
    low2 = jnp.pad(low.reshape(-1, r).astype(jnp.float32), ((0, mp - m), (0, rp - r)))
    in_specs += [pl.BlockSpec((bs.bm, rp), lambda i, j: (i, 0)), pl.BlockSpec((rp, bs.bn), lambda i, j: (0, j))]
    args += [low2, jnp.pad(b.astype(jnp.float32), ((0, rp - r), (0, 0)))]
  out = pl.pallas_call(
      functools.partial(_kernel, fmt=w.fmt, half=half, n_blocks=nb, lora=lora),
      out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32),
      grid=(mp // bs.bm, n // bs.bn),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bs.bm, bs.bn), lambda i, j: (i, j)),
      compiler_params=bs.compiler_params(),  # Triton, not JAX's default Mosaic GPU (module docstring)
      interpret=interpret,
  )(*args)
  return out[:m].reshape(*lead, n)
