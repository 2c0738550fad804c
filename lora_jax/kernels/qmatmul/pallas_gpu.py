"""Pallas (Triton) GPU kernel: 4-bit dequantize-and-multiply without materialising the float kernel.

Grid: (M / bm, N / bn, split_k) programs; each computes one (bm × bn) output tile over its share of K. It walks
that share `bk` quantization blocks per loop step: for each block it loads the packed codes (B/2 × bn bytes) and
the per-block scale (and offset) row, unpacks the low and high nibbles (even and odd rows of K), maps codes to
values in registers, and accumulates ``x_even · W_even + x_odd · W_odd`` in float32. Everything a call needs
happens in the one kernel, plus, with split_k > 1, one XLA reduction that sums the float32 partial tiles
(deterministic, unlike atomics). The kernel reads x as the caller holds it, (m, K), and stores the m rows of the
result: the rows of a partial row tile are masked on load and store (`_rows`), so no XLA op pads x or slices the
result (but for the CUDA-core paths' few rows below):

* double-quantized NF4 scales are formed per block from their int8 codes and second-level scales (a gather of one
  float per 256 blocks), so the call reads 1 byte per scale, not a float32 copy made by a separate XLA op;
* NF4 codes become values by a 4-level select tree over the code bits, by a gather from the 16-entry table, or
  by byte permutes over the table in registers (inline PTX, `nf4_prmt`) (`BlockSizes.lookup`); the int4 / GGUF
  formats are an affine map, their codes turned into floats by a conversion instruction or by bit operations
  (`BlockSizes.convert`); the scale multiplies each weight or, with tensor-core dots, each block's partial
  product (`BlockSizes.rescale`);
* the products run on tensor cores (``dot="mma"``: bm >= 16; each block's x tile loaded in one piece and its
  even and odd columns split in registers. The first H200 run split them with XLA ops before the call and ran
  int4 at M = 16 1.2-1.5x faster than the second run's strided loads in the kernel, though under different tile
  policies; the split in registers, which ships since run 4, takes fewer sm_90 machine instructions than either:
  8.0-8.1 per weight for int4's default, against 9.1-9.4 with the split outside) or, for a few rows, as a
  multiply-reduce on the CUDA cores (``dot="fma"``: bm = M rounded up to a power of two, x read with strided
  loads, which take no mask in interpret mode, so x is padded to bm rows when M is not a power of two; W stays
  float32), or, for one or two rows of an int4 / GGUF weight, as multiply-adds over whole 32-bit words of codes
  (``dot="words"``, `_words_kernel`: each code a float by one masked OR, ~3.7 machine instructions per weight at
  one row against 5.8 for the best tensor-core variant; its activation prepared by XLA ops; the run 3-4 sweeps'
  pick for one int4 row, 1.11-1.15x the default policy).

A weight in the K-major layout (`kmajor.KMajor`) runs that module's kernel instead, over the same grid
and `BlockSizes` (its tiling fields; default `KMAJOR`): the weight tile as the register operand of a warpgroup
dot, no weight through shared memory, ~3.3-3.9 machine instructions per weight for int4 and ~6.1 for NF4
(`KMAJOR`) at any row count up to 16 (on an H200, int4 at 1-16 rows of 4096 x 14336: 65-75% of the copy
bandwidth in device time, runs 5-6, README). It reads x as the caller holds it and stores the m rows of the
result, masking the rest of a partial tile, and sums x per block itself (offset formats): no XLA op around the call but,
with split_k > 1, the sum of the partial tiles.

Measured on an H200 in runs 1-6 (benchmarks/results/int4_matmul_gpu*.json, README): correct in every format and
in every variant (all GPU tests pass in run 4); at M <= 16 faster than XLA's dequantize + dot (2x or more in all but
two rows of run 5's table), the default QTensor policy at 39-40% of the copy bandwidth in device time (run 6,
4096 x 14336) and the K-major layout at 59-75% (int4), below the 75% a bandwidth-bound kernel should reach; above
64 rows (NF4) or 256 (int4) XLA's dequantize + cuBLAS is faster, and `kernels.qmatmul` dispatches there.

Weight bytes read per output tile: K·bn/2 (+ K/B·bn scale bytes): the 4-bit traffic the decode-time speed
depends on. `interpret=True` runs the same kernel on CPU (tests). On GPU it lowers through Triton, chosen
explicitly with Triton compiler parameters: since JAX 0.10 a `pallas_call` without them lowers through Mosaic
GPU, which this kernel is not written for (it fails there: "exceeds available shared memory"). Without a GPU,
the tests check that the kernel lowers for CUDA to a Triton call and that its Triton IR compiles for sm_90 within
the hardware's limits (`triton_compile.py`); `scripts/gpu_check.sh` checks its numbers and times it on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ...quant._qtensor import DQ_GROUP, NF4_TABLE, OFFSET_FORMATS, QTensor, nf4_values
from . import _kloop, _rows, nf4_prmt
from . import kmajor as _kmajor


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling, kernel variants and Triton's launch parameters, in one place; `for_shape` resolves them for a call.

  * ``bm × bn``: the output tile of one program. With ``dot="mma"`` bm >= 16 (Triton's dots need it; the rows of
    a partial tile are masked on load and store, `_rows`): `bm` for M <= 16, 64 above. With ``dot="fma"`` bm is
    M rounded up to a power of two (at most 16).
  * ``bk``: quantization blocks loaded per step of the loop over K (None: the largest power of two up to
    ``k_rows`` rows of K per step that divides the blocks evenly; one block when the block count is odd). An
    explicit bk must divide the blocks (per split); ``k_rows`` adapts to any K. At decode sizes the
    weight stream is all there is, so larger steps mean more bytes in flight (Little's law: ~3 MB across an H200
    to reach its bandwidth); for the K-major kernel the H200 grids (runs 5-6) found more programs worth more.
  * ``min_step_rows`` (None: off): with bk and split_k unset, halve the step (down to this many rows of K) while
    that alone lets K split further toward `min_programs` (the split keeps >= 4 steps per program, so a step of
    fewer blocks is what allows the next split).
  * ``split_k``: programs along K, whose float32 partial tiles are summed afterwards (None: doubled while there are
    fewer than `min_programs` programs, each keeps >= 4 steps, and the partial sums' traffic, written and read
    back, 8·split_k·M·N bytes, stays within ``partial_frac`` (1/8) of the packed codes' K·N/2).
  * ``dot``: "mma" (tensor cores) or "fma" (multiply-reduce on CUDA cores; for one or a few rows: its float32
    accumulator holds bm·B/2·bn values; Triton 3.5 spills at 64 per thread, e.g. one row, bn 128, 2 warps) or
    "words" (multiply-add on CUDA cores over whole 32-bit words of codes, for one or a few rows of an affine
    format: int4 and GGUF, not NF4; `_words_kernel`). "words" brings its own code-to-float step, so `convert`
    and `lookup` do not apply to it; it scales per weight and has no `prefetch`.
  * ``lookup``: NF4 code to value by "select" (a select tree on the code bits: 15 selects per weight), "gather"
    (a load from the 16-entry table, cached in L1) or "prmt" (byte permutes over the table held in registers,
    `nf4_prmt`: as many machine instructions per weight as the gather, none of them a load; values in the
    activation's 16-bit dtype, so it needs bfloat16 or float16 activations; with rescale="weight" the scaled
    weight is rounded to that dtype a second time, for the dot).
  * ``num_warps``, ``num_stages``: Triton's warps per program and software-pipelining depth.
  * ``prefetch``: 1 issues each loop step's loads one step ahead, carried in registers (Triton pipelines loads
    that feed a dot through shared memory, but not those of the multiply-reduce path; in run 3-4's sweeps).
    In the K-major kernel, whose codes and activation Triton pipelines, it loads each block's scale (and
    offset) a step ahead: the one load in its loop that Triton leaves in place, two bytes per column and block.
  * ``convert``: int4 / GGUF codes to floats by "i2f" (an int-to-float conversion instruction: on sm_90 a
    quarter-rate or slower pipe, one per weight) or "magic" (OR the code into the mantissa of 2^23 and subtract:
    an integer OR and a float subtraction, on pipes 4-8x faster than I2F's; the same values exactly) or "magic16"
    (the same in bfloat16: OR into the bits of 128.0, whose ulp is 1, and subtract in bfloat16, two weights per
    HADD2; the values, integers below 16 in magnitude, are exact in bfloat16, so a bf16 dot takes them with no
    float32-to-bf16 conversion (F2FP, another conversion-pipe instruction); scaled per weight they are promoted
    to float32 first, the same values again). NF4 codes index a table and convert nothing.
  * ``rescale``: "weight" scales every dequantized weight before the dot; "partial" (tensor-core dots only) dots
    the block's unscaled values (integers, or NF4 table values, exact or rounded once to the activation's dtype)
    and scales the (bm × bn) partial product, once per block and column instead of once per weight; offsets
    (int4_asym, q4_1) then add ``offset · Σ x`` over the block.

  `convert="magic"` / `"magic16"`, `lookup="prmt"`, `rescale="partial"` and `dot="words"` came from counting the
  machine code's instructions per weight (`triton_compile.sass_loop`, benchmarks/pallas_compile_sm90.py) and were
  timed in the run 3-4 policy sweeps (`words` 1.11-1.15x the default for one int4 row; `prmt` 1.17-1.19x for one
  NF4 row, with `partial` 1.79-1.87x at 16 rows); the defaults keep run 2's measured policies for this layout,
  since the K-major layout (`KMAJOR`) is faster than all of them at 1-16 rows.

  `default_blocks` picks the policy for a call when none is given: the fields' defaults here are the
  tensor-core policy, `DECODE_NF4` the one-row NF4 policy. Both were measured on an H200
  (benchmarks/results/int4_matmul_gpu*.json; `benchmarks/int4_matmul.py --policy-sweep` times the alternatives)."""

  bm: int = 16
  bn: int = 64
  bk: int | None = None
  split_k: int | None = None
  num_warps: int = 4
  num_stages: int = 3
  min_programs: int = 264  # two per SM of an H100 / H200 (132 SMs)
  dot: str = "mma"
  lookup: str = "select"
  prefetch: int = 0
  convert: str = "i2f"
  rescale: str = "weight"
  k_rows: int = 128
  min_step_rows: int | None = None
  partial_frac: float = 0.125

  def for_shape(self, m: int, n: int, k: int | None = None, block_size: int | None = None,
                max_bn: int | None = None) -> "BlockSizes":
    """Tile sizes for an (m × k) @ (k × n) call; bk and split_k are resolved when k and block_size are given.
    `max_bn`: the widest column tile the weight's layout allows (a K-major weight's column group)."""
    if self.dot not in ("mma", "fma", "words") or self.lookup not in ("select", "gather", "prmt"):
      raise ValueError(f"BlockSizes: dot must be 'mma', 'fma' or 'words' (got {self.dot!r}) and lookup 'select', "
                       f"'gather' or 'prmt' (got {self.lookup!r})")
    if self.convert not in ("i2f", "magic", "magic16") or self.rescale not in ("weight", "partial"):
      raise ValueError(f"BlockSizes: convert must be 'i2f', 'magic' or 'magic16' (got {self.convert!r}) and rescale "
                       f"'weight' or 'partial' (got {self.rescale!r})")
    if self.rescale == "partial" and self.dot != "mma":
      raise ValueError("BlockSizes: rescale='partial' needs dot='mma' (the multiply-reduce keeps one product per "
                       "weight until after the loop, so there is no per-block partial product to scale)")
    if self.dot == "words" and (self.prefetch or self.convert != "i2f" or self.lookup != "select"):
      raise ValueError("BlockSizes: dot='words' has its own code-to-float step and no prefetch: convert, lookup and "
                       "prefetch must keep their defaults ('i2f', 'select', 0)")
    if self.dot != "mma":
      bm = min(16, _pow2_at_least(m))
    else:
      bm = max(16, min(self.bm if m <= 16 else 64, _pow2_at_least(m)))
    bn = next((b for b in (self.bn, 128, 64, 32, 16) if n % b == 0 and b <= (max_bn or b)), None)
    out = dataclasses.replace(self, bm=bm, bn=bn or self.bn)
    return out.resolve(m, n, k, block_size) if k and block_size else out

  def resolve(self, m: int, n: int, k: int, block_size: int) -> "BlockSizes":
    """bk and split_k for this shape (each a power of two dividing the work evenly), given bm and bn."""
    nb = k // block_size
    per_split = nb // self.split_k if self.split_k and nb % self.split_k == 0 else nb
    bk = self.bk or _pow2_divisor(per_split, max(1, self.k_rows // block_size))
    if self.split_k is not None:
      return dataclasses.replace(self, bk=bk)
    programs = -(-m // self.bm) * (n // self.bn)
    split = self._split(m, k, nb // bk if nb % bk == 0 else 0, programs)
    # Smaller steps where only they let K split further toward min_programs (each program keeps >= 4 steps)
    while (self.bk is None and self.min_step_rows and programs * split < self.min_programs and bk % 2 == 0
           and bk // 2 * block_size >= self.min_step_rows):
      finer = self._split(m, k, nb // (bk // 2), programs)
      if finer <= split:
        break
      bk, split = bk // 2, finer
    return dataclasses.replace(self, bk=bk, split_k=split)

  def _split(self, m: int, k: int, steps: int, programs: int) -> int:
    """split_k for `steps` loop steps along K and `programs` (row tile, column tile) programs: doubled while there
    are fewer than min_programs programs, each keeps >= 4 steps and the partial sums' bytes (m rows each, `_rows`:
    a kernel stores only the call's rows) stay within `partial_frac` of the packed codes'."""
    split = 1
    while (programs * split < self.min_programs and steps % (2 * split) == 0 and steps // (2 * split) >= 4
           and 8 * (2 * split) * m <= k // 2 * self.partial_frac):
      split *= 2
    return split

  def compiler_params(self) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


# One row of NF4 (batch-1 decoding), block size 64: run 2's policy sweep winner on an H200
# (benchmarks/results/int4_matmul_gpu.json; the later sweeps, with the byte-permute lookup, preferred "prmt",
# 1.17-1.19x this; kept as the measured default, the K-major layout being faster than both). NF4's code-to-value
# map dominates there, and gathering it from the table in L1 is the win: 76 us at 4096 x 14336 against 125 us for
# the best multiply-reduce with the select tree, 151 us for the best tensor-core policy and 153 us for the sweep's
# default (multiply-reduce, select); at 14336 x 4096, 77 us against that default's 128. Of the two best (153.1 us in total each) this is the one with
# 4 warps, not 2: with 2, each thread holds twice the (1 x 32 x 128) float32 accumulator, and Triton 3.5 spills it
# (tests/kernels: no default may spill). With block 128 the accumulator doubles and spills too: that gets the
# tensor-core default.
DECODE_NF4 = BlockSizes(bn=128, bk=1, num_warps=4, num_stages=2, min_programs=1056, dot="fma", lookup="gather")


# A weight in the K-major layout (`kmajor`), up to 16 rows: H200 run 4's sweep winner (benchmarks/results/
# int4_matmul_gpu_run4.json, int4 at 16 rows, 59 policies timed on 4096 x 14336 and 14336 x 4096): tensor-core tiles of
# 64 columns, 4 blocks of 64 rows of K per loop step, each step's block scales loaded a step ahead (prefetch): 37.0 us
# wall at 4096 x 14336 against 65.6 for the earlier default (bn 128, bk 2, no prefetch); prefetch was in every one
# of the 12 fastest policies. Run 5's grid (device time, 24 policies: `benchmarks/int4_matmul.py --kmajor-grid`)
# then raised `min_programs` from 264 to 1056: K split 4 ways instead of 2 at one row of 4096 x 14336 (16.4 us
# against 17.0; NF4 26.7 against 30.3); 16 rows keep their split of 2 (the partial sums' bound) and their time.
# Deeper pipelines (4 stages: 17.8-18.5 us), larger steps (8 blocks: 20.5-21.4) and tiles of 128 columns (19.3-21.2,
# on 4 or 8 warps) were all slower: more shared memory per program, fewer programs resident per SM. Run 6's grid:
# steps of 2 blocks (k_rows 128) let one row split K 8 ways instead of 4 (each program keeps 4 steps), and won at
# every one-row shape it timed: int4 4096 x 14336 15.35 us against 16.55 (74.6% of that run's copy bandwidth
# against 69.2%), 4096 x 4096 7.19 against 7.95, NF4 26.26 against 26.75; at 16 rows, where the partial sums'
# bound keeps the split at 2 either way, steps of 4 blocks stayed faster (17.66 us against 18.12; 10.56 against
# 12.18; NF4 30.73 against 32.10). So the step halves (`min_step_rows`) only where that lets K split further.
KMAJOR = BlockSizes(bn=64, k_rows=256, min_step_rows=128, prefetch=1, min_programs=1056)
# Above 16 rows (tiles of 64 rows): tiles of 128 columns, the (128 x 64) float32 accumulator on 8 warps' registers
# (with 4: 255 registers per thread and spills; with 8: ~100, none), int4 and q4_1 alike (compiled for sm_90). On
# the H200 (run 4) 0.74-1.44x the QTensor kernel's time at 64-256 rows.
KMAJOR_ROWS = BlockSizes(bn=128, num_warps=8)


def default_blocks(m: int, fmt: str, block_size: int = 64, kmajor: bool = False) -> BlockSizes:
  """The kernel policy for `m` rows of a `fmt` weight when the caller gives none: `DECODE_NF4` for one row of NF4
  in blocks of 64, else tensor-core dots with `BlockSizes`' defaults: the first H200 run's configuration (29-77 us
  for int4 at M = 1 on the benchmark's shapes). For int4 at one row the second run's sweep found no clear winner:
  its best (tensor cores, bn 128, bk 4) took 0.90x the then-default multiply-reduce's total time, and longer on
  one of the two shapes. Since those runs, a tile stores only the call's rows (the rest of a 16-row tile is
  masked), so the partial-sum bound lets a few rows split K further than those runs did (8 ways instead of 2 at
  4096 x 4096 for one row: 512 programs on 132 SMs instead of 128; as runs 5-6 timed it). A K-major weight
  (``kmajor``) gets `KMAJOR`, above 16 rows `KMAJOR_ROWS`."""
  if kmajor:
    return KMAJOR if m <= 16 else KMAJOR_ROWS
  return DECODE_NF4 if (m, fmt, block_size) == (1, "nf4", 64) else BlockSizes()


def call_blocks(m: int, w, blocks: BlockSizes | None = None) -> BlockSizes:
  """The resolved `BlockSizes` of a call with `m` rows on weight `w` (a `QTensor` or a `kmajor.KMajor`): `blocks`,
  or `default_blocks` when None, for this shape; a K-major weight's column tiles at most its column group."""
  kmajor = isinstance(w, _kmajor.KMajor)
  k, n = w.shape
  policy = blocks or default_blocks(m, w.fmt, w.block_size, kmajor)
  return policy.for_shape(m, n, k, w.block_size, max_bn=w.group if kmajor else None)


def _pow2_divisor(n: int, at_most: int) -> int:
  """The largest power of two <= at_most that divides n."""
  d = 1
  while 2 * d <= at_most and n % (2 * d) == 0:
    d *= 2
  return d


def _pow2_at_least(m: int) -> int:
  return 1 << max(0, (m - 1).bit_length())


_MANTISSA_2_23 = 0x4B000000  # float32 bits of 2^23: its ulp is 1, so OR-ing in an integer q < 2^23 gives 2^23 + q
_BF16_128 = 0x4300  # bfloat16 bits of 128.0 (7 mantissa bits: ulp 1), so OR-ing in q < 128 gives 128 + q


def _as_float(q, minus: float, convert: str):
  """q - minus for integer codes q (int32), exactly: float32 by a conversion instruction ("i2f", any q) or by
  setting q into the mantissa of 2^23 and subtracting 2^23 + minus ("magic", q < 2^23: both operands are integers
  in [2^23, 2^24), so the difference is exact); bfloat16 by the same in 16 bits ("magic16", q < 128 and
  minus <= 128: 128 + q and 128 + minus are integers of at most 256, exact in bfloat16's 8 significant bits, and
  so is their difference)."""
  if convert == "magic":
    return jax.lax.bitcast_convert_type(q | _MANTISSA_2_23, jnp.float32) - (2.0 ** 23 + minus)
  if convert == "magic16":
    v = jax.lax.bitcast_convert_type((q | _BF16_128).astype(jnp.uint16), jnp.bfloat16)
    return v - jnp.asarray(128.0 + minus, jnp.bfloat16)
  v = q.astype(jnp.float32)
  return v - minus if minus else v


def _unscaled(q, fmt, table_ref, convert):
  """Codes (int32) to unscaled values: NF4 table values, q - 8 (int4_sym, q4_0) or q."""
  if fmt == "nf4":
    return table_ref[q] if table_ref is not None else nf4_values(q)
  return _as_float(q, _minus(fmt), convert)


def _minus(fmt: str) -> float:
  """The code an affine format maps to zero before scaling: 8 for the symmetric ones, 0 for those with offsets."""
  return 8.0 if fmt in ("int4_sym", "q4_0") else 0.0


def _scaled(v, scale, offset):
  """Unscaled values to weights, in float32 (magic16's and prmt's 16-bit values are exact there)."""
  v = v.astype(jnp.float32)
  return v * scale if offset is None else v * scale + offset


def _nf4_prmt(codes, dtype, words, interpret: bool):
  """The NF4 values (even rows: low nibbles; odd rows: high nibbles) of uint8 code bytes as `dtype` (bfloat16 or
  float16), by the byte-permute program of `nf4_prmt` in inline PTX, four code bytes per instance, with `words`
  (scalars: the table's `nf4_prmt.REGISTER_WORDS`, loaded once by the kernel); in interpret mode (no PTX) by the
  select tree, rounded to `dtype`: the same values (`nf4_prmt.table16`)."""
  if interpret:
    c = codes.astype(jnp.int32)
    return nf4_values(c & 0xF).astype(dtype), nf4_values(c >> 4).astype(dtype)
  args = [codes] + [jnp.full(codes.shape, word, jnp.uint32) for word in words]
  out = [jax.ShapeDtypeStruct(codes.shape, dtype)]
  return tuple(pltriton.elementwise_inline_asm(nf4_prmt.ptx(dtype, half), args=args, constraints=nf4_prmt.CONSTRAINTS,
                                               pack=4, result_shape_dtypes=out)[0] for half in ("even", "odd"))


def _products(a, b):
  """The (bm × r × bn) products a[:, i] · b[i, :] in float32, for the multiply-reduce of ``dot="fma"``."""
  return a.astype(jnp.float32)[:, :, None] * b.astype(jnp.float32)[None, :, :]


def _mac(acc, a, b, dot):
  """acc + a (bm × r) · b (r × bn): a tensor-core dot in a's dtype into the (bm × bn) float32 accumulator, or, for
  "fma", the products added into a (bm × r × bn) accumulator that is reduced over r once, after the loop (a
  reduction per step would cross threads through shared memory at every step)."""
  if dot == "fma":
    return acc + _products(a, b)
  return acc + jnp.dot(a, b.astype(a.dtype), preferred_element_type=jnp.float32)


def _lora_tile(low_ref, b_ref, dot: str):
  """The LoRA term's second product, s·(xA)·B, for the output tile (added once: by split 0): a tensor-core dot,
  or, for the CUDA-core dots, a multiply-reduce."""
  tile = (jnp.dot(low_ref[...], b_ref[...], preferred_element_type=jnp.float32) if dot == "mma"
          else jnp.sum(_products(low_ref[...], b_ref[...]), axis=1))
  return jnp.where(pl.program_id(2) == 0, tile, jnp.zeros_like(tile))


def _kernel(*refs, fmt: str, block: int, m: int, x_rows: int, n: int, bk: int, steps: int, dq: bool, gather: bool,
            lora: bool, dot: str, prefetch: bool, convert: str, rescale: str, prmt=None, interpret: bool = False):
  """One (bm × bn) tile of the m-row result over its share of K (module docstring). x has `x_rows` rows: m as the
  caller holds it (tensor-core dots: a partial tile's rows masked, `_rows`), or m padded to whole tiles (the
  multiply-reduce, whose strided loads take no mask in interpret mode); the result's m rows are stored."""
  rest = list(refs)
  half = block // 2
  x_ref = rest.pop(0)
  bm = x_ref.shape[0]
  rows, x_tile = _rows.Rows(m, bm), _rows.Rows(x_rows, bm)

  def x_columns(g):
    """Thunks for block g's even and odd columns of x, (bm, B/2) each: for tensor-core dots one contiguous load
    (made by whichever thunk runs first), its columns split in registers; for the multiply-reduce one strided
    load each, made where its values are first needed."""
    if dot != "mma":
      return (lambda: x_tile.load(x_ref.at[:, pl.ds(g * block, half, stride=2)]),
              lambda: x_tile.load(x_ref.at[:, pl.ds(g * block + 1, half, stride=2)]))
    split = []

    def column(i):
      if not split:
        t = x_tile.load(x_ref.at[:, pl.ds(g * block, block)]).reshape(bm, half, 2)
        split.extend(v.reshape(bm, half) for v in jax.lax.split(t, (1, 1), axis=2))
      return split[i]
    return (lambda: column(0)), (lambda: column(1))

  codes_ref, scale_ref = rest.pop(0), rest.pop(0)
  offset_ref = rest.pop(0) if fmt in OFFSET_FORMATS else None
  dq_ref, dq_offset_ref = (rest.pop(0), rest.pop(0)) if dq else (None, None)
  table_ref = rest.pop(0) if gather else None
  words_ref = rest.pop(0) if prmt is not None else None
  low_ref, b_ref = (rest.pop(0), rest.pop(0)) if lora else (None, None)
  (o_ref,) = rest
  bn = codes_ref.shape[-1]
  first = pl.program_id(2) * steps  # this program's first step along K (split_k)
  if dq:  # flat index of this tile's first scale in each block row; second-level groups of DQ_GROUP scales
    cols = pl.program_id(1) * bn + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)
    dq_offset = dq_offset_ref[0]

  if words_ref is not None:  # the lookup's table words, in registers for the whole loop
    words = [words_ref[i] for i in range(len(nf4_prmt.REGISTER_WORDS))]
  blocks_of = lambda t: [(first + t) * bk + u for u in range(bk)]  # bk quantization blocks per loop step

  def loads(g):
    """Block g's loads, each deferred (a thunk): its packed codes, scale row, second-level scales, offset row, and
    the activation's even and odd columns (None: not in this format; `x_columns`)."""
    return (lambda: codes_ref[pl.ds(g * half, half), :], lambda: scale_ref[pl.ds(g, 1), :],
            (lambda: dq_ref[(g * n + cols) // DQ_GROUP]) if dq else None,
            (lambda: offset_ref[pl.ds(g, 1), :]) if offset_ref is not None else None, *x_columns(g))

  def add_block(acc, codes, scale, dq_scale, offset, xe, xo):
    """acc + one block's product. Each load happens where its value is first needed (for `step`, the order the
    H200 runs timed: Triton's schedule, and so the registers, follow it)."""
    if prmt is not None:  # both nibbles' NF4 values at once, as 16-bit floats (nf4_prmt)
      even, odd = _nf4_prmt(codes(), prmt, words, interpret)
      low, high = (lambda: even), (lambda: odd)
    else:  # unscaled values of the low (even rows) and high (odd rows) nibbles
      c = codes().astype(jnp.int32)
      low = lambda: _unscaled(c & 0xF, fmt, table_ref, convert)
      high = lambda: _unscaled(c >> 4, fmt, table_ref, convert)
    sc = scale().astype(jnp.float32)
    if dq:
      sc = sc * dq_scale() + dq_offset
    off = offset().astype(jnp.float32) if offset is not None else None
    if rescale == "weight":
      w_even, w_odd = _scaled(low(), sc, off), _scaled(high(), sc, off)
      acc = _mac(acc, xe(), w_even, dot)
      return _mac(acc, xo(), w_odd, dot)
    # rescale == "partial": the block's product on unscaled values, scaled once (module doc)
    x_e, x_o = xe(), xo()
    part = _mac(_mac(jnp.zeros(acc.shape, jnp.float32), x_e, low(), dot), x_o, high(), dot)
    acc = acc + part * sc
    if off is not None:  # sum_k x_k (q_k s + o) = s sum_k x_k q_k + o sum_k x_k
      x_sum = (jnp.sum(x_e.astype(jnp.float32), axis=1, keepdims=True)
               + jnp.sum(x_o.astype(jnp.float32), axis=1, keepdims=True))
      acc = acc + x_sum * off
    return acc

  def step(t, acc, loaded):  # loaded: the step's values, issued a step earlier (prefetch), or None
    for g, values in zip(blocks_of(t), loaded or [None] * bk):
      thunks = loads(g) if values is None else ((lambda v=v: v) if v is not None else None for v in values)
      acc = add_block(acc, *thunks)
    return acc

  issue = lambda t: [tuple(f() if f is not None else None for f in loads(g)) for g in blocks_of(t)]
  acc = jnp.zeros((bm, half, bn) if dot == "fma" else (bm, bn), jnp.float32)
  acc = _kloop.k_loop(steps, acc, step, issue if prefetch else None)
  if dot == "fma":
    acc = jnp.sum(acc, axis=1)
  if lora:
    acc += _lora_tile(low_ref, b_ref, dot)
  rows.store(o_ref, acc)


_WORDS_MAGIC = 0x43800000  # float32 bits of 256.0: its ulp is 2^-15, so mantissa bits 15-22 hold integers
_WORDS_SHIFTS = (15, 7, -1, -9)  # left shifts that bring byte b of a word (bits 8b..8b+7) to bits 15-22


def _byte_values(word, b: int, magic):
  """Both codes of byte b of each uint32 word as float32, without unpacking bytes or converting integers: the
  word shifted so that the byte's low nibble sits in bits 15-18 and its high nibble in 19-22, each nibble masked
  and OR-ed into the bits of 256.0 (one LOP3 each when `magic` is a runtime value). Returns (256 + q_lo,
  256 + 16·q_hi), both exact (integers below 512 in float32's 24 significant bits)."""
  shift = _WORDS_SHIFTS[b]
  s = word << shift if shift > 0 else word >> -shift
  lo = jax.lax.bitcast_convert_type((s & 0x00078000) | magic, jnp.float32)
  hi = jax.lax.bitcast_convert_type((s & 0x00780000) | magic, jnp.float32)
  return lo, hi


def _lane(values, b: int):
  """values[..., b] of a (..., 4) float32 tensor, by an integer masked sum over the last axis (in each thread's
  registers: Triton has no indexing of a tensor's elements); exact, the sum adds zeros to one value's bits."""
  bits = jax.lax.bitcast_convert_type(values, jnp.uint32)
  lane = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
  return jax.lax.bitcast_convert_type(jnp.sum(jnp.where(lane == b, bits, 0), axis=-1), jnp.float32)


def _words_kernel(x_ref, codes_ref, scale_ref, *refs, block: int, m: int, bk: int, steps: int, offset: bool,
                  lora: bool):
  """``dot="words"``: one or a few rows of an affine format (int4, GGUF) as multiply-adds on CUDA cores over whole
  32-bit words of codes.

  A word of the (K/2, N) codes holds 4 columns × 2 rows of K. The code bytes of a block are loaded as they are
  stored and reassembled into words (LLVM folds the byte shifts and ORs back into the loaded registers, so this
  costs nothing), and each word's 8 codes become floats by one shift per byte and one masked OR per code with the
  bits of 256.0 (`_byte_values`): 256 + q for the low nibble (even row of K) and 256 + 16·q for the high one
  (odd row). The activation comes prepared (`_words_inputs`): x_even, x_odd / 16 and, per row of codes, the
  offset the magic adds, c = 256·(x_even + x_odd / 16) + minus·(x_even + x_odd) with minus = 8 for int4_sym /
  q4_0 and 0 otherwise, and, for the offset formats, the sum of x over each block. Then for each code byte
  ``t = x_even·(256 + q_lo) + (x_odd/16)·(256 + 16·q_hi) - c = x_even·(q_lo - minus) + x_odd·(q_hi - minus)``
  (two FFMAs), scaled per column into an elementwise accumulator (a third), which is reduced over rows once,
  after the loop; the offset formats add each block's ``offset · Σx`` once per column. Compiled for sm_90 that is
  about 3.7 machine instructions per weight at one row (`benchmarks/pallas_compile_sm90.py`), against 5.8 for the
  best tensor-core variant. Float32 throughout: bf16 / f16 activations are widened outside. The magic's offset
  cancels in float32 arithmetic whose operands are ~256/8 times the weights' codes, which costs about 5 bits of
  the sum's 24 (the interpret-mode tests hold it to the composite tolerance)."""
  rest = list(refs)
  offset_ref, x_blocks_ref = (rest.pop(0), rest.pop(0)) if offset else (None, None)
  magic_ref = rest.pop(0)
  low_ref, b_ref = (rest.pop(0), rest.pop(0)) if lora else (None, None)
  (o_ref,) = rest
  half = block // 2
  bm, bn = x_ref.shape[0], codes_ref.shape[-1]
  out_rows = _rows.Rows(m, bm)  # x comes padded to whole tiles; the result's m rows are stored
  first = pl.program_id(2) * steps
  magic = magic_ref[0]  # a runtime value: a constant would be folded into two LOP3s per code instead of one

  def add_block(g, carry):
    acc, acc_off = carry
    rows = pl.ds(g * half, half)
    c = codes_ref[rows, :].astype(jnp.uint32).reshape(half, bn // 4, 4)
    word = jnp.sum(c << (jax.lax.broadcasted_iota(jnp.uint32, c.shape, 2) * 8), axis=2)  # (half, bn/4), as stored
    sc = scale_ref[pl.ds(g, 1), :].astype(jnp.float32).reshape(bn // 4, 4)
    off = offset_ref[pl.ds(g, 1), :].astype(jnp.float32).reshape(bn // 4, 4) if offset else None
    values = [_byte_values(word, b, magic) for b in range(4)]  # byte b of each word: column 4·w + b
    out, out_off = [], []
    for r in range(bm):  # rows of x: 2-D tensors throughout (a 3-D product converts layouts every step)
      x_even, x_odd16, corr = (x_ref[r, i, rows][:, None] for i in range(3))  # (half, 1)
      for b, (lo, hi) in enumerate(values):
        t = x_odd16 * hi + (x_even * lo - corr)
        out.append(acc[4 * r + b] + t * _lane(sc, b)[None, :])
        if offset:  # the block's offsets times the sum of its x, once per column
          out_off.append(acc_off[4 * r + b] + x_blocks_ref[r, g] * _lane(off, b))
    return tuple(out), tuple(out_off)

  def step(t, acc):
    for u in range(bk):
      acc = add_block((first + t) * bk + u, acc)
    return acc

  acc, acc_off = jax.lax.fori_loop(0, steps, step, (
      tuple(jnp.zeros((half, bn // 4), jnp.float32) for _ in range(4 * bm)),
      tuple(jnp.zeros((bn // 4,), jnp.float32) for _ in range(4 * bm if offset else 0))))
  lane = jax.lax.broadcasted_iota(jnp.int32, (bm, bn // 4, 4), 2)
  row = jax.lax.broadcasted_iota(jnp.int32, (bm, bn // 4, 4), 0)
  res = jnp.zeros((bm, bn // 4, 4), jnp.float32)
  for i, a in enumerate(acc):  # row i // 4, column 4·w + i % 4
    col = jnp.sum(a, axis=0) + acc_off[i] if offset else jnp.sum(a, axis=0)
    res = res + jnp.where((row == i // 4) & (lane == i % 4), col[None, :, None], 0.0)
  res = res.reshape(bm, bn)
  if lora:
    res += _lora_tile(low_ref, b_ref, "words")
  out_rows.store(o_ref, res)


def _words_inputs(x2, fmt: str, block: int):
  """The activation as `_words_kernel` reads it: (M, 3, K/2) float32 rows x_even, x_odd / 16 and the magic's
  offset per row of codes; for the offset formats also (M, K/B), the sum of x over each block."""
  x = x2.astype(jnp.float32)
  x_even, x_odd = x[:, 0::2], x[:, 1::2]
  rows = jnp.stack([x_even, x_odd / 16, 256.0 * (x_even + x_odd / 16) + _minus(fmt) * (x_even + x_odd)], axis=1)
  if fmt not in OFFSET_FORMATS:
    return rows, None
  return rows, jnp.sum(x.reshape(x.shape[0], -1, block), axis=-1)


def supports(x, w: QTensor) -> tuple[bool, str]:
  """Whether this kernel handles the call, and why not (`w` a `QTensor` or a `kmajor.KMajor`)."""
  if isinstance(w, _kmajor.KMajor):
    try:
      _kmajor.check(x.dtype, w)
    except ValueError as e:
      return False, str(e)
    return True, ""
  if w.block_size // 2 < 16 or w.block_size & (w.block_size - 1):
    return False, f"block size {w.block_size} (needs a power of two >= 32)"
  k, n = w.shape
  if n % 16:
    return False, f"N={n} not a multiple of 16"
  if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return False, f"activation dtype {x.dtype}"
  return True, ""


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def qmatmul_pallas(x, w: QTensor, *, blocks: BlockSizes | None = None, interpret: bool = False):
  """``x @ dequantize(w)`` (float32 result, shape (..., N)) with the Pallas kernel; `blocks` None: `default_blocks`.
  `w` is a `QTensor` or a `kmajor.KMajor` (its own kernel: bf16 / f16 activations)."""
  return _pallas(x, w, None, None, blocks, interpret)


LORA_RANK_PAD = 16  # the rank is padded with zeros to a power of two >= this: Triton's dots need dims >= 16 and
# Pallas Triton needs power-of-two block shapes (a rank of 40 padded to 48 would not lower)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def qmatmul_lora_pallas(x, w: QTensor, low, b, *, blocks: BlockSizes | None = None, interpret: bool = False):
  """``x @ dequantize(w) + low @ b`` (float32, (..., N)) in one kernel: the LoRA term of QLoRA, with
  ``low = s·(x A)`` (M × r, computed outside: r is tiny) and ``b`` = B (r × N). Each output tile adds
  ``low_tile · B_tile`` to its accumulator before it is written, so the LoRA update costs no second pass over the
  output and no extra kernel launch. (On an H200 that saved nothing at decode sizes, 0.98-1.13x the unfused time,
  so `kernels.qmatmul_lora` runs the kernel and the two small products separately.)"""
  return _pallas(x, w, low, b, blocks, interpret)


def _pallas(x, w: QTensor, low, b, blocks: BlockSizes | None, interpret: bool):
  k, n = w.shape
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  nb = k // w.block_size
  if m == 0:
    return jnp.zeros((*lead, n), jnp.float32)
  kmajor = isinstance(w, _kmajor.KMajor)
  if kmajor:
    _kmajor.check(x2.dtype, w)
  bs = call_blocks(m, w, blocks)
  bk, split = bs.bk or 1, bs.split_k or 1
  if n % bs.bn:
    raise ValueError(f"N={n} is not a multiple of the tile width bn={bs.bn}")
  if nb % (bk * split):
    raise ValueError(f"bk={bk} x split_k={split} must divide the {nb} quantization blocks along K")
  steps = nb // (bk * split)
  mp = -(-m // bs.bm) * bs.bm
  whole = lambda a: pl.BlockSpec(a.shape, lambda i, j, s: (0,) * a.ndim)
  if kmajor:
    return _pallas_kmajor(x2, w, low, b, bs, m, mp, split, lead, steps, whole, interpret)
  tile = lambda rows: pl.BlockSpec((rows, bs.bn), lambda i, j, s: (0, j))
  rows = lambda cols: pl.BlockSpec((bs.bm, cols), lambda i, j, s: (i, 0))
  if bs.dot == "words":
    if w.fmt == "nf4":
      raise ValueError(f"dot='words' turns codes into floats by an affine map: it takes int4 and GGUF formats, "
                       f"not {w.fmt} (use dot='fma' or 'mma')")
    xw, x_blocks = _words_inputs(jnp.pad(x2, ((0, mp - m), (0, 0))) if mp != m else x2, w.fmt, w.block_size)
    in_specs = [pl.BlockSpec((bs.bm,) + xw.shape[1:], lambda i, j, s: (i, 0, 0)), tile(k // 2), tile(nb)]
    args = [xw, w.codes, w.scale]
    if w.offset is not None:
      in_specs += [tile(nb), rows(nb)]
      args += [w.offset, x_blocks]
    magic = jnp.asarray([_WORDS_MAGIC], jnp.uint32)
    in_specs.append(whole(magic))
    args.append(magic)
    kernel = functools.partial(_words_kernel, block=w.block_size, m=m, bk=bk, steps=steps,
                               offset=w.offset is not None, lora=low is not None)
    return _launch(kernel, w, low, b, bs, in_specs, args, m, mp, split, lead, interpret)
  if bs.dot == "fma" and mp != m:  # strided loads: x padded to whole tiles (the kernel masks only the store)
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
  in_specs, args = [rows(k)], [x2]  # mma: as it is; the kernel masks a partial tile's rows, splits its columns
  in_specs += [tile(k // 2), tile(nb)]
  args += [w.codes, w.scale]  # double-quantized NF4: int8 scale codes, formed into floats in the kernel
  if w.offset is not None:
    in_specs.append(tile(nb))
    args.append(w.offset)
  dq = w.double_quantized
  if dq:
    dq_specs, dq_args = _dq_inputs(w, whole)
    in_specs, args = in_specs + dq_specs, args + dq_args
  gather = w.fmt == "nf4" and bs.lookup == "gather"
  if gather:
    table = jnp.asarray(NF4_TABLE, jnp.float32)
    in_specs.append(whole(table))
    args.append(table)
  prmt = None
  if w.fmt == "nf4" and bs.lookup == "prmt":  # 16-bit table values, in the dot's dtype
    if x.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"lookup='prmt' gives NF4 values as 16-bit floats: it needs bfloat16 or float16 "
                       f"activations, got {x.dtype}")
    prmt = jnp.dtype(x.dtype)
    words = jnp.asarray([nf4_prmt.table_words(prmt)[k] for k in nf4_prmt.REGISTER_WORDS], jnp.uint32)
    in_specs.append(whole(words))
    args.append(words)
  kernel = functools.partial(_kernel, fmt=w.fmt, block=w.block_size, m=m, x_rows=x2.shape[0], n=n, bk=bk,
                             steps=steps, dq=dq, gather=gather, lora=low is not None, dot=bs.dot,
                             prefetch=bool(bs.prefetch), convert=bs.convert, rescale=bs.rescale, prmt=prmt,
                             interpret=interpret)
  return _launch(kernel, w, low, b, bs, in_specs, args, m, mp, split, lead, interpret)


def _dq_inputs(w, whole):
  """A double-quantized NF4's second-level scales and offset as the kernels read them, each whole (`whole`: its
  BlockSpec): float32, the scalar offset as one element (one float per 256 blocks: small)."""
  args = [w.dq_scale.astype(jnp.float32), jnp.reshape(w.dq_offset, (1,)).astype(jnp.float32)]
  return [whole(a) for a in args], args


def _pallas_kmajor(x2, w: _kmajor.KMajor, low, b, bs: BlockSizes, m, mp, split, lead, steps, whole, interpret):
  """`_pallas` for a weight in the K-major layout (`kmajor`): its own kernel, over the same grid and launch, with x
  read as it is and the result stored unpadded (the kernel masks a partial tile's rows): no XLA op around the call
  but, with split_k > 1, the sum of the partial tiles."""
  if (bs.dot, bs.lookup, bs.convert, bs.rescale) != ("mma", "select", "i2f", "weight"):
    raise ValueError("BlockSizes: the K-major kernel has one code-to-value step (16-bit pairs, scaled per block) "
                     "on tensor cores: dot, lookup, convert and rescale must keep their defaults")
  k, n = w.shape
  nb = k // w.block_size
  per = w.group // bs.bn  # programs per column group: program j takes the columns of part j % per of group j // per
  cols = lambda *words: pl.BlockSpec((None, nb, bs.bn, *words), lambda i, j, s: (j // per, 0, j % per, *[0] * len(words)))
  in_specs = [pl.BlockSpec((bs.bm, k), lambda i, j, s: (i, 0)), cols(w.block_size // 8), cols()]
  args = [x2, w.codes, w.scale]
  if w.offset is not None:
    in_specs.append(cols())
    args.append(w.offset)
  if w.double_quantized:  # int8 scale codes, formed into floats in the kernel (as for a QTensor)
    dq_specs, dq_args = _dq_inputs(w, whole)
    in_specs, args = in_specs + dq_specs, args + dq_args
  kernel = functools.partial(_kmajor.kernel, fmt=w.fmt, block=w.block_size, bk=bs.bk or 1, steps=steps,
                             dtype=x2.dtype, lora=low is not None, lora_tile=functools.partial(_lora_tile, dot="mma"),
                             m=m, n=n, dq=w.double_quantized, prefetch=bool(bs.prefetch), interpret=interpret)
  return _launch(kernel, w, low, b, bs, in_specs, args, m, mp, split, lead, interpret)


def _launch(kernel, w: QTensor, low, b, bs: BlockSizes, in_specs, args, m, mp, split, lead, interpret):
  """The pallas_call over the (row tiles, column tiles, split_k) grid: the LoRA term's inputs appended to the
  kernel's; an (m, N) result (each kernel stores only the m rows, `_rows`), the split partial tiles summed."""
  n = w.shape[1]
  in_specs, args = list(in_specs), list(args)
  lora = low is not None
  if lora:
    r = b.shape[0]
    rp = max(LORA_RANK_PAD, _pow2_at_least(r))
    low2 = jnp.pad(low.reshape(-1, r).astype(jnp.float32), ((0, mp - m), (0, rp - r)))
    in_specs += [pl.BlockSpec((bs.bm, rp), lambda i, j, s: (i, 0)),
                 pl.BlockSpec((rp, bs.bn), lambda i, j, s: (0, j))]
    args += [low2, jnp.pad(b.astype(jnp.float32), ((0, rp - r), (0, 0)))]
  if split == 1:
    out_shape, out_spec = (m, n), pl.BlockSpec((bs.bm, bs.bn), lambda i, j, s: (i, j))
  else:  # one float32 partial tile per split, summed below
    out_shape, out_spec = (split, m, n), pl.BlockSpec((None, bs.bm, bs.bn), lambda i, j, s: (s, i, j))
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
      grid=(mp // bs.bm, n // bs.bn, split),
      in_specs=in_specs,
      out_specs=out_spec,
      compiler_params=bs.compiler_params(),  # Triton, not JAX's default Mosaic GPU (module docstring)
      interpret=interpret,
  )(*args)
  if split > 1:
    out = jnp.sum(out, axis=0)
  return out.reshape(*lead, n)
