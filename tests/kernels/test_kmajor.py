"""The K-major layout (`kernels/qmatmul/kmajor.py`): its code order, packing, the Pallas kernel that reads it
(interpret mode on CPU, and its sm_90 machine code), and the `qmatmul` dispatch for it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import LoraJaxError
from lora_jax.kernels import (KMAJOR, BlockSizes, KMajor, _choose, call_blocks, default_blocks, pack_kmajor, qmatmul,
                              qmatmul_lora, qmatmul_lora_pallas, qmatmul_pallas, qmatmul_reference, to_kmajor,
                              unpack_kmajor)
from lora_jax.kernels.qmatmul.kmajor import column_group, nibble_order
from lora_jax.peft._lora import LoRAWeight
from lora_jax.testing import assert_allclose, random_qtensor
from tests.conftest import cuda_ops_and_masks, sm90_or_skip_version_skew

AFFINE = [("int4_sym", 64), ("int4_asym", 32), ("q4_0", 32), ("q4_1", 32), ("int4_sym", 128)]
ALL = AFFINE + [("nf4", 64), ("nf4_dq", 64)]  # nf4_dq: double-quantized, as --quantize nf4 makes it


def _q(fmt, k, n, block):
  return random_qtensor(fmt.removesuffix("_dq"), k, n, block, double_quant=fmt == "nf4_dq")


@pytest.mark.parametrize("fmt", ["int4_sym", "nf4"])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_nibble_order_puts_each_threads_register_pairs_in_its_words(block, fmt):
  """The order is a permutation of the block's rows, and it is what the kernel's speed rests on: word w' of
  thread t (word t·B/32 + w' of the block) holds rows (r, r + 1) with r = 16·2w' + 2t, the pair that thread holds
  in a 16-row step of a Hopper register-operand dot, as its pair 0; the pair 8 rows on as pair 1; the same for
  the next 16-row step as pairs 2 and 3. Pair p is at bits 4p / 16 + 4p for the affine formats (a shift and a
  mask give it), at bits 8p / 8p + 4 for NF4 (each half-word's lookup gives two pairs)."""
  order = nibble_order(block, fmt)
  assert sorted(order.tolist()) == list(range(block))
  row = lambda word, bit: order[8 * word + bit // 4]  # slot i of the block: bits 4·(i mod 8) of word i // 8
  bits = (lambda p: (8 * p, 8 * p + 4)) if fmt == "nf4" else (lambda p: (4 * p, 16 + 4 * p))
  for t in range(4):
    for w in range(block // 32):
      word = t * (block // 32) + w
      for p, (step, hi_rows) in enumerate([(2 * w, 0), (2 * w, 8), (2 * w + 1, 0), (2 * w + 1, 8)]):
        r = 16 * step + 2 * t + hi_rows
        assert tuple(row(word, bit) for bit in bits(p)) == (r, r + 1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("minus", [0.0, 8.0])
def test_pair_step_constants_give_exact_values(dtype, minus):
  """The words the GPU's code-to-value step (`pair_ptx`) computes with, read back with numpy: every code pair
  (q_lo, q_hi) ORed into the magic is (base + q_lo, base + q_hi), and the fused multiply-add by one and the
  negated offset gives (q_lo - minus, q_hi - minus) exactly (in float32, as the 16-bit FMA rounds only its
  result, exact here); the asm carries exactly these constants. The interpret-mode step gives the same values."""
  from lora_jax.kernels.qmatmul.kmajor import _pair, pair_constants, pair_ptx
  magic, one, neg = pair_constants(dtype, minus)
  halves = lambda w: np.array([w & 0xFFFF, w >> 16], np.uint16).view(jnp.dtype(dtype)).astype(np.float32)
  q = np.arange(16)
  lo, hi = np.meshgrid(q, q, indexing="ij")
  words = (lo | hi << 16).astype(np.uint32).ravel() | np.uint32(magic)
  for w, a, b in zip(words, lo.ravel(), hi.ravel()):
    value = halves(int(w)) * halves(one) + halves(neg)
    np.testing.assert_array_equal(value, [a - minus, b - minus])
  assert all(str(c) in pair_ptx(dtype, minus) for c in (magic, one, neg))
  got = _pair(jnp.asarray((lo | hi << 16).astype(np.uint32) | np.uint32(0xF0F0F0F0)), dtype, minus, interpret=True)
  np.testing.assert_array_equal(np.asarray(got[0], np.float32), lo - minus)
  np.testing.assert_array_equal(np.asarray(got[1], np.float32), hi - minus)


@pytest.mark.parametrize("fmt,block", ALL)
def test_pack_kmajor_round_trips_exactly(fmt, block):
  """pack then unpack gives the QTensor back bit for bit, stacked layers included; nothing is requantized. The
  codes and block parameters come in column groups (96 columns: groups of 32), each block's group in one run."""
  w = _q(fmt, 256, 96, block)
  stacked = jax.tree.map(lambda a: jnp.stack([a, a[::-1] if a.ndim else a]), w)
  for q in (w, stacked):
    p = pack_kmajor(q)
    assert p.group == column_group(96) == 32 and p.lead_shape == q.lead_shape
    assert p.codes.dtype == jnp.uint32 and p.codes.shape[-4:] == (3, 256 // block, 32, block // 8)
    assert p.scale.shape[-3:] == (3, 256 // block, 32)
    # column 40's block 1 is group 1's column 8: its scale sits there
    np.testing.assert_array_equal(np.asarray(p.scale[..., 1, 1, 8]), np.asarray(q.scale[..., 1, 40]))
    back = unpack_kmajor(p)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(q)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(p.dequantize()), np.asarray(q.dequantize()))  # from its own layout
  assert pack_kmajor(w).nbytes() == w.nbytes()


@pytest.mark.parametrize("fmt", ["int4_sym", "nf4"])
@pytest.mark.parametrize("block", [32, 64, 128, 256])
def test_slot_to_row_transpose_is_the_nibble_order(block, fmt):
  """`dequantize_kmajor` puts a block's rows in order with a transpose (`_rows_from_slots`), not a gather by the
  inverse of `nibble_order`: the two agree for every block size the layout takes, both code orders."""
  from lora_jax.kernels.qmatmul.kmajor import _rows_from_slots
  rows = np.asarray(_rows_from_slots(jnp.asarray(nibble_order(block, fmt)), block, fmt))
  np.testing.assert_array_equal(rows, np.arange(block))


@pytest.mark.parametrize("fmt", ["int4_sym", "q4_1", "nf4_dq"])
def test_kmajor_dequantize_reads_its_own_layout(fmt):
  """The XLA path of a K-major weight (more rows than its kernel takes, training, the backward pass) dequantizes
  from the K-major words, bf16 output and a layer stack included: the same values as the QTensor it came from,
  and its program does not re-lay the codes: no gather (the affine formats' only one would be the inverse
  nibble order; NF4's table lookup is the one gather in both layouts) and no uint8 repacking."""
  w = random_qtensor(fmt.removesuffix("_dq"), 256, 48, 64 if fmt != "q4_1" else 32, double_quant=fmt == "nf4_dq")
  w = dataclasses.replace(w, dtype=jnp.bfloat16)
  stacked = jax.tree.map(lambda a: jnp.stack([a, a[::-1] if a.ndim else a]), w)
  p = pack_kmajor(stacked)
  got = jax.jit(lambda p: p.dequantize())(p)
  assert got.dtype == jnp.bfloat16 and got.shape == (2, 256, 48)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(stacked.dequantize(), np.float32))
  eqns = jax.make_jaxpr(lambda p: p.dequantize())(p).jaxpr.eqns
  assert sum(str(e.primitive) == "gather" for e in eqns) == (1 if fmt == "nf4_dq" else 0)
  assert not any(v.aval.dtype == jnp.uint8 for e in eqns for v in e.outvars)


KERNEL_SHAPES = [(1, 512, 256, jnp.bfloat16, None), (5, 576, 384, jnp.float16, None),
                 (16, 512, 256, jnp.bfloat16, None), (40, 256, 128, jnp.float16, None),
                 (3, 1024, 256, jnp.bfloat16, BlockSizes(bn=64, bk=1, split_k=4)),
                 (2, 1024, 512, jnp.bfloat16, BlockSizes(bn=256, bk=2, split_k=2, num_warps=8)),
                 (7, 1024, 256, jnp.float16, BlockSizes(bn=128, bk=2, split_k=2, prefetch=1)),
                 (2, 256, 48, jnp.bfloat16, BlockSizes(bn=128))]  # 48 columns: groups of 16, so tiles of 16


def _reference16(x, w, dtype):
  """The float32 reference, NF4's table first rounded to `dtype` (what the kernel's 16-bit operand holds; the
  affine formats' values are exact in it)."""
  if not w.fmt == "nf4":
    return qmatmul_reference(x, w)
  from lora_jax.kernels.qmatmul import nf4_prmt
  from lora_jax.quant._qtensor import unpack
  table = jnp.asarray(nf4_prmt.table16(dtype).astype(np.float32))
  dense = table[unpack(w.codes)] * jnp.repeat(w.block_scales(), w.block_size, axis=0)
  return x @ dense


@pytest.mark.parametrize("fmt,block,m,k,n,dt,blocks", [(f, b, *s) for f, b in ALL for s in KERNEL_SHAPES
                                                       if s[1] % b == 0], ids=lambda v: getattr(v, "__name__", str(v)))
def test_kmajor_kernel_matches_reference(fmt, block, m, k, n, dt, blocks):
  """The kernel (interpret mode) against the float32 reference on the same 16-bit activations (for NF4 with its
  table rounded to the 16-bit type, as the kernel's operand holds it): the 16-bit values are exact, so within the
  composite tolerance; any rows (padded to 16, tiled above), tilings, K split; NF4 plain and double-quantized."""
  w = _q(fmt, k, n, block)
  x = jax.random.normal(jax.random.key(m), (m, k)).astype(dt)
  got = qmatmul_pallas(x, pack_kmajor(w), blocks=blocks, interpret=True)
  with jax.default_matmul_precision("highest"):
    want = _reference16(x.astype(jnp.float32), w, dt)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  assert_allclose(got, want, "f32_composite")


@pytest.mark.parametrize("fmt,m,r", [("q4_1", 1, 8), ("int4_sym", 20, 40)])
def test_kmajor_kernel_with_fused_lora(fmt, m, r):
  w = random_qtensor(fmt, 512, 128, 32 if fmt == "q4_1" else 64)
  x = jax.random.normal(jax.random.key(0), (m, 512)).astype(jnp.bfloat16)
  low = jax.random.normal(jax.random.key(1), (m, r))
  b = jax.random.normal(jax.random.key(2), (r, 128)) * 0.1
  got = qmatmul_lora_pallas(x, pack_kmajor(w), low, b, blocks=BlockSizes(bn=128, split_k=2), interpret=True)
  with jax.default_matmul_precision("highest"):
    want = qmatmul_reference(x.astype(jnp.float32), w) + low @ b
  assert_allclose(got, want, "f32_composite")


@pytest.mark.parametrize("fmt,block", [("int4_sym", 64), ("q4_1", 32), ("nf4_dq", 64)])
def test_a_kmajor_call_is_one_kernel(fmt, block):
  """Lowered for CUDA, a K-major call is the Triton kernel and nothing else: no XLA op pads or transposes x, sums
  it per block (the offset formats) or slices the padding off the result; with split_k > 1, one reduction adds
  the partial tiles. Rows that do not fill a tile are masked in the kernel's Triton IR: x's loads and the
  result's store take a mask (the rows past m are never read or written: on a GPU that memory is not x's)."""
  w = jax.eval_shape(lambda: pack_kmajor(_q(fmt, 1024, 256, block)))
  for m, split in ((1, 1), (5, 1), (16, 1), (40, 1), (5, 2)):
    call = lambda x, w: qmatmul_pallas(x, w, blocks=BlockSizes(bn=128, split_k=split))
    ops, loads, stores = cuda_ops_and_masks(call, jax.ShapeDtypeStruct((m, 1024), jnp.bfloat16), w)
    assert ops == ({"custom_call"} if split == 1 else {"custom_call", "reduce", "add"}), (m, split, ops)
    partial = m % (16 if m <= 16 else 64) != 0
    assert loads and all(masked == partial for masked in loads + stores) and len(stores) == 1, (m, loads, stores)


@pytest.mark.parametrize("m,k,n,fmt,block,want", [
    (1, 4096, 14336, "int4_sym", 64, (2, 8)),   # run 6: 15.35 us against 16.55 with steps of 4 blocks (split 4)
    (1, 4096, 4096, "int4_sym", 64, (2, 8)),    # run 6: 7.19 us against 7.95
    (1, 4096, 14336, "nf4", 64, (2, 8)),        # run 6: 26.26 us against 26.75
    (4, 4096, 14336, "int4_sym", 64, (2, 8)),   # 4 rows split as one does (not timed)
    (16, 4096, 14336, "int4_sym", 64, (4, 2)),  # the partial sums' bound holds the split at 2: 4-block steps stay
    (16, 4096, 4096, "int4_sym", 64, (4, 2)),   # (run 6: 17.66 / 10.56 us against 18.12 / 12.18 with 2-block steps)
    (8, 4096, 14336, "int4_sym", 64, (4, 4)),   # split 4 is the bound at 8 rows: halving the step gains nothing
    (1, 14336, 4096, "q4_1", 32, (4, 16)),      # blocks of 32: 8 per step, halved to 4 (128 rows of K)
    (1, 576, 1536, "int4_sym", 64, (1, 1)),     # 9 blocks: odd, one block per step, no split
])
def test_kmajor_policy_halves_the_step_only_to_split_k_further(m, k, n, fmt, block, want):
  """`KMAJOR` resolves (bk, split_k) per call: steps of 256 rows of K, halved to 128 (`min_step_rows`) only where
  that lets K split further toward its 1056 programs, as run 6's grid measured it at one row; at 16 rows, where
  the split is bounded by the partial sums' bytes, the longer steps stay (faster there)."""
  w = jax.eval_shape(lambda: pack_kmajor(_q(fmt, k, n, block)))
  bs = call_blocks(m, w)
  assert (bs.bm, bs.bn, bs.bk, bs.split_k) == (16, 64, *want)
  fixed = dataclasses.replace(KMAJOR, min_step_rows=None).for_shape(m, n, k, block, max_bn=w.group)
  assert bs.bk == fixed.bk or bs.split_k > fixed.split_k  # halved only for a further split


def test_kmajor_refuses_what_it_cannot_take():
  w = random_qtensor("int4_sym", 256, 128, 64)
  p = pack_kmajor(w)
  with pytest.raises(ValueError, match=r"pack_kmajor: block size 16 \(the kernel needs a power of two >= 32\)"):
    pack_kmajor(random_qtensor("int4_sym", 256, 128, 16))
  with pytest.raises(ValueError, match="needs N a multiple of 16, got N=40"):
    qmatmul_pallas(jnp.ones((1, 256), jnp.bfloat16), pack_kmajor(random_qtensor("int4_sym", 256, 40, 64)),
                   interpret=True)
  with pytest.raises(ValueError, match="bfloat16 or float16 activations, got float32"):
    qmatmul_pallas(jnp.ones((1, 256)), p, interpret=True)
  with pytest.raises(ValueError, match="the K-major kernel has one code-to-value step"):
    qmatmul_pallas(jnp.ones((1, 256), jnp.bfloat16), p, blocks=BlockSizes(dot="fma"), interpret=True)
  with pytest.raises(ValueError, match=r"codes must be uint32 of shape \(\.\.\., 1, 4, 128, 8\) \(column groups"):
    KMajor(w.codes, p.scale, fmt="int4_sym", block_size=64, shape=(256, 128), group=128)
  with pytest.raises(ValueError, match="group 48 must be a power of two dividing N=128"):
    KMajor(p.codes, p.scale, fmt="int4_sym", block_size=64, shape=(256, 128), group=48)
  with pytest.raises(ValueError, match=r"scale must have shape \(\.\.\., 1, 4, 128\)"):
    KMajor(p.codes, w.scale, fmt="int4_sym", block_size=64, shape=(256, 128), group=128)
  with pytest.raises(ValueError, match="block_size 16 must be a power of two >= 32"):
    KMajor(jnp.zeros((128, 32), jnp.uint32), jnp.zeros((128, 16)), fmt="int4_sym", block_size=16, shape=(256, 128))


def test_qmatmul_dispatch_and_gradients_for_kmajor(monkeypatch):
  """On CPU a K-major weight takes the reference (its CPU paths read the other layout; asked for, they refuse);
  on a GPU auto takes the kernel for 16-bit activations up to PALLAS_M_MAX rows and the reference otherwise. The
  values and the gradient in x equal the QTensor's on the reference path, and so does QLoRA's linear."""
  import lora_jax.kernels as kernels
  w = random_qtensor("q4_1", 256, 128, 32)
  p = pack_kmajor(w)
  x = jax.random.normal(jax.random.key(0), (3, 256))
  assert _choose(x, p, "auto", False) == "reference"
  np.testing.assert_array_equal(np.asarray(qmatmul(x, p)), np.asarray(qmatmul(x, w, impl="reference")))
  grad = lambda w: jax.grad(lambda x: jnp.sum(qmatmul(x, w, impl="reference") ** 2))(x)
  np.testing.assert_array_equal(np.asarray(grad(p)), np.asarray(grad(w)))
  a, b = jax.random.normal(jax.random.key(1), (256, 4)), jax.random.normal(jax.random.key(2), (4, 128))
  np.testing.assert_array_equal(np.asarray(qmatmul_lora(x, p, a, b, 0.5)),
                                np.asarray(qmatmul_lora(x, w, a, b, 0.5, impl="reference")))
  for impl in ("cpu", "small_m"):
    with pytest.raises(LoraJaxError, match="not a K-major weight"):
      qmatmul(x, p, impl=impl)
  with pytest.raises(LoraJaxError, match="needs a GPU"):
    qmatmul(x.astype(jnp.bfloat16), p, impl="pallas")
  monkeypatch.setattr(kernels, "_backend", lambda: "gpu")
  assert _choose(x.astype(jnp.bfloat16), p, "auto", False) == "pallas"
  assert _choose(jnp.ones((257, 256), jnp.bfloat16), p, "auto", False) == "reference"
  assert _choose(x, p, "auto", False) == "reference"  # float32 activations
  with pytest.raises(LoraJaxError, match="does not support this call: .*float32"):
    _choose(x, p, "pallas", False)
  xb = x.astype(jnp.bfloat16)
  gk = jax.grad(lambda x: jnp.sum(qmatmul(x, p, impl="pallas", interpret=True)))(xb)
  gr = jax.grad(lambda x: jnp.sum(qmatmul(x, w, impl="reference")))(xb)
  assert gk.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(gk), np.asarray(gr))


def test_to_kmajor_converts_the_affine_qtensors_of_a_tree():
  """Every QTensor of a tree whose block the kernel takes, a LoRA weight's base included, becomes K-major;
  arrays and a block of 16 stay; a LoRA linear over it gives the same values (up to summation order)."""
  w4, wn, w16 = (random_qtensor("int4_sym", 256, 128, 64), random_qtensor("nf4", 256, 128, 64),
                 random_qtensor("int4_sym", 256, 128, 16))
  lora = LoRAWeight(w4, jnp.ones((256, 4)) * 0.01, jnp.ones((4, 128)) * 0.01, jnp.asarray(2.0))
  tree = {"q": w4, "nf4": wn, "q16": w16, "dense": jnp.ones(3), "lora": lora}
  out = to_kmajor(tree)
  assert all(isinstance(out[k], KMajor) for k in ("q", "nf4")) and isinstance(out["lora"].w, KMajor)
  assert out["q16"] is w16 and out["dense"] is tree["dense"]
  x = jax.random.normal(jax.random.key(3), (2, 256))
  # the QTensor takes the CPU kernel, the K-major weight the reference: the same sums in another order
  assert_allclose(out["lora"].linear(x), lora.linear(x), "f32_composite")


def _sm90(fmt, m, blocks, block=64, kmajor=True, k=4096, n=4096):
  from lora_jax.kernels.qmatmul import triton_compile as tc
  w = jax.eval_shape(lambda: _q(fmt, k, n, block))
  if kmajor:
    w = jax.eval_shape(pack_kmajor, w)
  return sm90_or_skip_version_skew(tc.qmatmul_sm90, m, w, blocks)


def test_sm90_machine_code_of_the_kmajor_kernel():
  """What the layout is for, read off the sm_90 machine code at 16 rows of int4: the weights go from the loaded
  words into a warpgroup dot's register operand (HGMMA) with no shuffles and no shared-memory stores per weight (the
  QTensor layout's tensor-core kernels move every weight through shared memory), by one LOP3 and one packed FMA
  (HFMA2) per pair of weights and a shift per word (`pair_ptx`); under half the instructions of the best QTensor
  tensor-core variant (magic16 + partial) and below the one-row words kernel's, at any row count up to 16; no
  spills."""
  pytest.importorskip("triton", reason="the triton package (test extra) is not installed")
  layout = BlockSizes(bn=128)  # the layout's instruction count (KMAJOR's wider steps and prefetch add ~0.4 per weight)
  km = _sm90("int4_sym", 16, layout)
  km1 = _sm90("int4_sym", 1, layout)
  best_mma = _sm90("int4_sym", 16, BlockSizes(convert="magic16", rescale="partial"), kmajor=False)
  words = _sm90("int4_sym", 1, BlockSizes(dot="words", bn=256), kmajor=False)
  ops = km["per_weight_ops"]
  assert km["per_weight"] < 0.5 * best_mma["per_weight"] and km["spill_bytes"] == 0, (km, best_mma)
  assert km1["per_weight"] < words["per_weight"], (km1, words)
  moves = ("SHFL", "STS", "STSM", "PRMT", "I2F", "F2FP")  # none per weight (a shared-memory store per step: 0.016)
  assert ops.get("HGMMA", 0) > 0 and all(ops.get(op, 0) < 0.05 for op in moves), ops
  assert 0.45 < ops.get("LOP3", 0) < 0.55 and 0.45 < ops.get("HFMA2", 0) < 0.55, ops
  # NF4 (double-quantized): the byte-permute lookup per word (nf4_prmt.ptx_kmajor), still no data movement:
  # under 0.6x the best QTensor NF4 policy's instructions (prmt + partial, 9.0 at 16 rows); the table words in
  # registers for the whole loop (nf4_prmt.REGISTER_WORDS: without the per-lane zero, ptxas copies them from
  # uniform registers before every permute, 1.3 IMAD per weight); 14 permutes per word of 8 codes
  # (kmajor.NF4_WORD_SLOTS: with the affine formats' slots the interleave took 4 more)
  nf4 = _sm90("nf4_dq", 16, layout)
  nf4_best = _sm90("nf4_dq", 16, BlockSizes(lookup="prmt", rescale="partial"), kmajor=False)
  assert nf4["per_weight"] < 0.6 * nf4_best["per_weight"] and nf4["spill_bytes"] == 0, (nf4, nf4_best)
  assert all(nf4["per_weight_ops"].get(op, 0) < 0.05 for op in ("SHFL", "STS", "STSM", "FSEL")), nf4
  assert nf4["per_weight_ops"].get("IMAD", 0) < 0.3 and abs(nf4["per_weight_ops"].get("PRMT", 0) - 14 / 8) < 0.05, nf4
  for fmt in ("q4_0", "q4_1"):  # blocks of 32, one row (KMAJOR's shorter steps): within the chip's limits, and
    r = _sm90(fmt, 1, KMAJOR, block=32)  # fewer instructions than the QTensor layout's kernel for the same call
    qt = _sm90(fmt, 1, default_blocks(1, fmt, 32), block=32, kmajor=False)
    assert r["spill_bytes"] == 0 and r["registers"] <= 255 and r["per_weight"] < qt["per_weight"], (r, qt)
  for fmt, block in (("int4_sym", 64), ("q4_1", 32)):  # above 16 rows: tiles of 64 rows, the default's 8 warps
    r = _sm90(fmt, 40, default_blocks(40, fmt, block, kmajor=True), block=block)
    assert r["spill_bytes"] == 0 and r["registers"] < 255, r


def test_a_model_runs_on_a_kmajor_base():
  """A Llama forward over `to_kmajor` of an int4 base, in both layer layouts (stacked under scan: the K-major
  leaves carry the layer axis; per layer), gives the QTensor base's logits (on CPU the K-major weights take the
  reference and the QTensors the CPU kernel: the same sums in another order)."""
  from lora_jax.models import ModelConfig, forward, init_params, unstack_layers
  from lora_jax.quant import quantize_model_params
  cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16)
  q = quantize_model_params(init_params(cfg, key=jax.random.key(0)), "int4")
  ids = jnp.array([[1, 5, 9, 3, 7, 2]])
  want = forward(q, cfg, ids)
  for params in (to_kmajor(q), to_kmajor(unstack_layers(q))):
    assert any(isinstance(a, KMajor) for a in jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, KMajor)))
    assert_allclose(forward(params, cfg, ids), want, "f32_composite")
