"""The Pallas 4-bit matmul (interpret mode on CPU) and the small-M multiply-reduce against the reference;
gradients through the custom VJP; dispatch."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import LoraJaxError
from lora_jax.kernels import (CPU_M_MAX, SMALL_M_MAX, _choose, qmatmul, qmatmul_lora, qmatmul_lora_pallas,
                              qmatmul_pallas, qmatmul_reference, qmatmul_small_m, supports)
from lora_jax.kernels.qmatmul import cpu
from lora_jax.quant import quantize
from lora_jax.testing import assert_allclose, random_qtensor
from tests.conftest import cuda_ops_and_masks, sm90_or_skip_version_skew


def _q(fmt, k, n, block):
  return random_qtensor(fmt, k, n, block)


SHAPES = [(576, 192), (576, 1536), (1536, 576), (256, 128)]
CASES = [(m, k, n, fmt, 64 if fmt in ("nf4", "int4_sym", "int4_asym") else 32)
         for m in (1, 8, 33) for (k, n) in SHAPES for fmt in ("nf4", "int4_sym", "int4_asym", "q4_0", "q4_1")
         if (m, k, n) != (33, 576, 1536)]  # keep the interpret-mode grid affordable
CASES += [(512, 256, 128, "nf4", 64), (512, 256, 128, "q4_1", 32), (16, 1024, 256, "int4_sym", 128),
          (4, 512, 64, "int4_asym", 32)]


@pytest.mark.parametrize("m,k,n,fmt,block", CASES, ids=lambda v: str(v))
def test_pallas_matches_reference_f32(m, k, n, fmt, block):
  w = _q(fmt, k, n, block)
  x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32)
  ok, why = supports(x, w)
  assert ok, why
  got = qmatmul_pallas(x, w, interpret=True)
  with jax.default_matmul_precision("highest"):
    want = qmatmul_reference(x, w)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  assert_allclose(got, want, "f32_composite")


SMALL_CASES = [(m, k, n, fmt, block) for (m, k, n, fmt, block) in CASES if m == 1]
SMALL_CASES += [(3, 576, 1536, "nf4", 64), (4, 1536, 576, "q4_1", 32), (2, 1024, 256, "int4_sym", 128)]


@pytest.mark.parametrize("m,k,n,fmt,block", SMALL_CASES, ids=lambda v: str(v))
def test_small_m_matches_reference_f32(m, k, n, fmt, block):
  w = _q(fmt, k, n, block)
  x = jax.random.normal(jax.random.key(m + 1), (m, k), jnp.float32)
  got = jax.jit(qmatmul_small_m)(x, w)
  with jax.default_matmul_precision("highest"):
    want = qmatmul_reference(x, w)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  assert_allclose(got, want, "f32_composite")


def test_small_m_double_quantized_leading_axes_and_bf16():
  w = quantize(jax.random.normal(jax.random.key(0), (512, 128)) * 0.05, "nf4", double_quant=True)
  x = jax.random.normal(jax.random.key(1), (1, 2, 512))
  assert_allclose(qmatmul_small_m(x, w), qmatmul_reference(x, w), "f32_composite")
  xb = x.astype(jnp.bfloat16)
  want = qmatmul_reference(x, w)
  scale = float(jnp.max(jnp.abs(want)))
  assert_allclose(qmatmul_small_m(xb, w) / scale, want / scale, "bf16")


def test_auto_dispatch_on_cpu_by_rows_and_format(monkeypatch):
  w = _q("q4_1", 256, 128, 32)
  if cpu._compiler() is not None:  # where a compiler exists the kernel builds, and auto takes it
    assert _choose(jnp.ones((CPU_M_MAX, 256)), w, "auto", False) == "cpu"
    assert _choose(jnp.ones((1, 256)), _q("nf4", 256, 128, 64), "auto", False) == "cpu"
    assert _choose(jnp.ones((CPU_M_MAX + 1, 256)), w, "auto", False) == "reference"
  monkeypatch.setattr(cpu, "available", lambda: (False, "no compiler (test)"))  # the XLA paths take over
  assert _choose(jnp.ones((SMALL_M_MAX, 256)), w, "auto", False) == "small_m"
  assert _choose(jnp.ones((1, 1, 256)), w, "auto", False) == "small_m"
  assert _choose(jnp.ones((SMALL_M_MAX + 1, 256)), w, "auto", False) == "reference"
  assert _choose(jnp.ones((1, 256)), _q("nf4", 256, 128, 64), "auto", False) == "reference"
  with pytest.raises(LoraJaxError, match="unknown kernel implementation 'fast'"):
    qmatmul(jnp.ones((1, 256)), w, impl="fast")


@pytest.mark.parametrize("fmt", ["nf4", "q4_1"])
def test_pallas_bf16_activations(fmt):
  w = _q(fmt, 576, 192, 64 if fmt == "nf4" else 32)
  x = jax.random.normal(jax.random.key(3), (5, 576), jnp.float32)
  got = qmatmul_pallas(x.astype(jnp.bfloat16), w, interpret=True)
  want = qmatmul_reference(x, w)
  scale = float(jnp.max(jnp.abs(want)))
  assert_allclose(got / scale, want / scale, "bf16")


def test_leading_axes_are_kept():
  w = _q("nf4", 256, 128, 64)
  x = jax.random.normal(jax.random.key(0), (2, 3, 256))
  assert_allclose(qmatmul_pallas(x, w, interpret=True), qmatmul_reference(x, w), "f32_composite")


@pytest.mark.parametrize("impl", ["reference", "pallas", "small_m", "cpu"])
def test_gradient_through_custom_vjp(impl):
  if impl == "cpu" and cpu._compiler() is None:
    pytest.skip("no C++ compiler on this machine")
  w = _q("nf4", 256, 128, 64)
  x = jax.random.normal(jax.random.key(0), (4, 256))
  f = lambda x: jnp.sum(jnp.tanh(qmatmul(x, w, impl=impl, interpret=True)))
  g = lambda x: jnp.sum(jnp.tanh(x @ w.dequantize()))
  assert_allclose(jax.grad(f)(x), jax.grad(g)(x), "f32_composite")


@pytest.mark.parametrize("impl", ["reference", "small_m"])
def test_input_dependency_changes_nothing(impl):
  """`_after` ties the dequantization to the input without changing any value: a NaN in one row leaves the other
  rows exact, an empty input gives an empty product, and the backward pass keeps the stored codes."""
  w = _q("int4_sym", 256, 128, 64)
  x = jax.random.normal(jax.random.key(0), (3, 256)).at[0, 0].set(jnp.nan)
  got = jax.jit(lambda x: qmatmul(x, w, impl=impl))(x)
  assert np.isnan(np.asarray(got[0])).all()
  assert_allclose(got[1:], qmatmul_reference(x[1:], w), "f32_composite")  # wrong codes would be off by O(1)
  assert qmatmul(jnp.zeros((0, 256)), w, impl=impl).shape == (0, 128)
  _, vjp = jax.vjp(lambda x: qmatmul(x, w, impl=impl), x[1:])
  residual_codes = [leaf for leaf in jax.tree.leaves(vjp) if getattr(leaf, "dtype", None) == jnp.uint8]
  assert residual_codes and all(r is w.codes for r in residual_codes)


def test_dispatch_errors_and_fallback():
  w = _q("nf4", 256, 128, 64)
  x = jnp.ones((2, 256))
  with pytest.raises(LoraJaxError, match="needs a GPU"):
    qmatmul(x, w, impl="pallas")
  odd = quantize(jnp.ones((256, 120)), "nf4")
  assert supports(x, odd) == (False, "N=120 not a multiple of 16")
  with pytest.raises(LoraJaxError, match="does not support this call: N=120"):
    qmatmul(x, odd, impl="pallas", interpret=True)
  with pytest.raises(ValueError, match="N=120 is not a multiple of the tile width"):  # called directly: no silent gap
    qmatmul_pallas(x, odd, interpret=True)
  x = jnp.ones((CPU_M_MAX + 1, 256))
  assert_allclose(qmatmul(x, w), qmatmul_reference(x, w), "f32_op")  # auto on CPU above CPU_M_MAX: the reference
  for impl in ("auto", "cpu", "small_m", "reference"):  # an x that does not fit W: one error naming both, 0 rows too
    for bad in (jnp.ones((4, 128)), jnp.ones((0, 128)), jnp.ones((2, 3, 512))):
      with pytest.raises(LoraJaxError, match=rf"x of shape \({', '.join(map(str, bad.shape))},?\) has "
                                             rf"{bad.shape[-1]} input features; the 4-bit weight is \(K=256, N=128\)"):
        qmatmul(bad, w, impl=impl)


@pytest.mark.parametrize("m", [1, 16, 40])
def test_pallas_double_quantized_nf4(m):
  """`--quantize nf4` double-quantizes: the kernel takes it (float32 block scales formed before the call), plain
  and with the fused LoRA term, against the reference."""
  w = quantize(jax.random.normal(jax.random.key(3), (1024, 192)) * 0.05, "nf4", double_quant=True)
  assert w.double_quantized and supports(jnp.ones((m, 1024)), w) == (True, "")
  x = jax.random.normal(jax.random.key(m), (m, 1024))
  a = jax.random.normal(jax.random.key(5), (1024, 8)) * 0.05
  b = jax.random.normal(jax.random.key(6), (8, 192)) * 0.05
  with jax.default_matmul_precision("highest"):
    want = qmatmul_reference(x, w)
    lora = 2.0 * (x @ a) @ b
    assert_allclose(qmatmul(x, w, impl="pallas", interpret=True), want, "f32_composite")
    assert_allclose(qmatmul_lora(x, w, a, b, 2.0, impl="pallas", interpret=True), want + lora, "f32_composite")


@pytest.mark.parametrize("fmt,m,r", [("nf4", 1, 8), ("nf4", 33, 1), ("q4_1", 5, 24), ("int4_asym", 16, 16),
                                     ("nf4", 2, 40)])
def test_pallas_fused_lora_matches_unfused(fmt, m, r):
  """QLoRA's linear on the Pallas path (the kernel, then the two small products) and the kernel with the LoRA
  term inside (`qmatmul_lora_pallas`, rank padded to a power of two >= 16), in interpret mode, against the
  reference plus the two small products."""
  w = _q(fmt, 576, 192, 64 if fmt == "nf4" else 32)
  keys = jax.random.split(jax.random.key(m * 31 + r), 3)
  x = jax.random.normal(keys[0], (m, 576))
  a, b = jax.random.normal(keys[1], (576, r)) * 0.1, jax.random.normal(keys[2], (r, 192)) * 0.1
  scale = jnp.float32(2.0)
  got = qmatmul_lora(x, w, a, b, scale, impl="pallas", interpret=True)
  with jax.default_matmul_precision("highest"):
    want = qmatmul_reference(x, w) + scale * ((x @ a) @ b)
    fused = qmatmul_lora_pallas(x, w, scale * (x @ a), b, interpret=True)  # the rank padded inside the kernel
  assert got.shape == fused.shape == (m, 192) and got.dtype == fused.dtype == jnp.float32
  assert_allclose(got, want, "f32_composite")
  assert_allclose(fused, want, "f32_composite")


def test_pallas_fused_lora_gradients():
  w = _q("q4_1", 256, 128, 32)
  keys = jax.random.split(jax.random.key(7), 3)
  args = (jax.random.normal(keys[0], (2, 3, 256)), jax.random.normal(keys[1], (256, 8)) * 0.1,
          jax.random.normal(keys[2], (8, 128)) * 0.1, jnp.float32(0.5))
  loss = lambda impl: lambda x, a, b, s: jnp.sum(jnp.tanh(qmatmul_lora(x, w, a, b, s, impl=impl, interpret=True)))
  with jax.default_matmul_precision("highest"):
    got = jax.grad(loss("pallas"), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(loss("reference"), argnums=(0, 1, 2, 3))(*args)
  for g, h in zip(got, want):
    assert_allclose(g, h, "f32_composite")


@pytest.mark.parametrize("impl", ["reference", "pallas", "cpu", "small_m"])
def test_bf16_qlora_gradients_have_the_inputs_dtypes(impl):
  """A bf16 QLoRA layer trains: every cotangent has its primal's dtype (dx was float32, which failed to add to
  the LoRA branch's bf16 cotangent) and matches the float32 computation at bf16 precision."""
  if impl == "cpu" and cpu._compiler() is None:
    pytest.skip("no C++ compiler on this machine")
  w = _q("q4_1", 256, 128, 32)
  keys = jax.random.split(jax.random.key(11), 3)
  args32 = (jax.random.normal(keys[0], (4, 256)), jax.random.normal(keys[1], (256, 8)) * 0.1,
            jax.random.normal(keys[2], (8, 128)) * 0.1)
  args16 = tuple(t.astype(jnp.bfloat16) for t in args32)
  loss = lambda x, a, b: jnp.sum(jnp.tanh(qmatmul_lora(x, w, a, b, jnp.float32(0.5), impl=impl, interpret=True)))
  got = jax.grad(loss, argnums=(0, 1, 2))(*args16)
  want = jax.grad(loss, argnums=(0, 1, 2))(*(t.astype(jnp.float32) for t in args16))
  for g, h in zip(got, want):
    assert g.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(h)))
    assert_allclose(g.astype(jnp.float32) / scale, h / scale, "bf16")


def _abstract_q(fmt, k, n, block):
  """The tensor's shapes and dtypes only (lowering needs no values, and no 14336-wide arrays on CPU); "nf4_dq":
  double-quantized NF4."""
  return jax.eval_shape(lambda: random_qtensor(fmt.removesuffix("_dq"), k, n, block, double_quant=fmt == "nf4_dq"))


LOWER_CASES = [(m, k, n, fmt, 32 if fmt.startswith("q4") else 64, dt)
               for m, (k, n) in ((1, (4096, 14336)), (16, (14336, 4096)), (300, (576, 1536)))
               for fmt in ("nf4", "nf4_dq", "int4_sym", "int4_asym", "q4_0", "q4_1")
               for dt in (jnp.bfloat16, jnp.float32)]


@pytest.mark.parametrize("m,k,n,fmt,block,dt", LOWER_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_pallas_lowers_to_triton_for_cuda(m, k, n, fmt, block, dt):
  """The GPU kernel's lowering, checked without a GPU: JAX lowers the jitted call for CUDA on CPU, running the Pallas
  Triton lowering rules (an unsupported op or shape fails here). The call must be a Triton custom call: since JAX
  0.10 Pallas defaults to Mosaic GPU, which this kernel is not written for. (Compiling the Triton IR to PTX, and
  the kernel's numbers, need a GPU: benchmarks/int4_matmul.py.)"""
  from lora_jax.kernels import qmatmul_lora_pallas
  w = _abstract_q(fmt, k, n, block)
  x = jax.ShapeDtypeStruct((m, k), dt)
  lower = lambda f, *a: jax.jit(f).trace(*a).lower(lowering_platforms=("cuda",)).as_text()
  rank = 40 if m == 300 else 8  # padded to a power of two (48 would not lower)
  for text in (lower(lambda x, w: qmatmul_pallas(x, w), x, w),
               lower(lambda x, w, low, b: qmatmul_lora_pallas(x, w, low, b), x, w,
                     jax.ShapeDtypeStruct((m, rank), jnp.float32), jax.ShapeDtypeStruct((rank, n), dt))):
    calls = set(re.findall(r"custom_call @([\w$.]+)", text))
    assert calls == {"__gpu$xla.gpu.triton"}, calls


@pytest.mark.parametrize("fmt,block", [("int4_sym", 64), ("q4_1", 32), ("nf4_dq", 64)])
def test_a_tensor_core_call_is_one_kernel(fmt, block):
  """Lowered for CUDA, a tensor-core call is the Triton kernel and nothing else: x is read as the caller holds it
  (a partial tile's rows masked; each block's even and odd columns split in registers), the result stored in its
  m rows, so no XLA op pads x, splits its columns or slices the result; with split_k > 1, one reduction adds the
  partial tiles. The multiply-reduce (``dot="fma"``) reads x with strided loads, which take no mask in interpret
  mode: one row is one kernel, a few rows pad x first."""
  from lora_jax.kernels import BlockSizes
  w = _abstract_q(fmt, 1024, 256, block)
  x = lambda m: jax.ShapeDtypeStruct((m, 1024), jnp.bfloat16)
  for m, split in ((1, 1), (5, 1), (16, 1), (40, 1), (5, 2)):
    ops, loads, stores = cuda_ops_and_masks(lambda x, w: qmatmul_pallas(x, w, blocks=BlockSizes(split_k=split)),
                                            x(m), w)
    assert ops == ({"custom_call"} if split == 1 else {"custom_call", "reduce", "add"}), (m, split, ops)
    partial = m % (16 if m <= 16 else 64) != 0
    assert loads and all(masked == partial for masked in loads + stores) and len(stores) == 1, (m, loads, stores)
  for m in (1, 3):
    ops, _, stores = cuda_ops_and_masks(lambda x, w: qmatmul_pallas(x, w, blocks=BlockSizes(dot="fma", split_k=1)),
                                        x(m), w)
    assert (ops == {"custom_call"} if m == 1 else {"custom_call", "pad"} <= ops) and stores == [m == 3], (m, ops)


COMPILE_CASES = [c for c in LOWER_CASES if c[0] != 300 or c[3] in ("nf4", "q4_1")]


@pytest.mark.parametrize("m,k,n,fmt,block,dt", COMPILE_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_pallas_compiles_for_sm90(m, k, n, fmt, block, dt):
  """The kernel's Triton IR compiles to an H100/H200 (sm_90) cubin with the triton package, within sm_90's
  shared memory and registers and without spilling (triton_compile.py says what this does and does not show)."""
  pytest.importorskip("triton", reason="the triton package (test extra) is not installed")
  from lora_jax.kernels import qmatmul_lora_pallas
  from lora_jax.kernels.qmatmul import triton_compile as tc
  w = _abstract_q(fmt, k, n, block)
  x = jax.ShapeDtypeStruct((m, k), dt)
  rank = 40 if m == 300 else 8
  for fn, args in ((lambda x, w: qmatmul_pallas(x, w), (x, w)),
                   (lambda x, w, low, b: qmatmul_lora_pallas(x, w, low, b),
                    (x, w, jax.ShapeDtypeStruct((m, rank), jnp.float32), jax.ShapeDtypeStruct((rank, n), dt)))):
    (kernel,) = tc.triton_kernels(fn, *args)
    r = sm90_or_skip_version_skew(tc.compile_sm90, kernel)
    assert r["arch"].startswith("sm_90"), r
    assert 0 < r["shared_bytes"] <= tc.SM90_SHARED_BYTES and r["registers"] <= tc.SM90_REGISTERS, r
    assert r["spill_bytes"] == 0, r
    assert 0 < r["loop_instructions"] < r["instructions"], r  # the K loop was found in the machine code


def _sm90_loop(fmt, m, blocks, k=4096, n=4096):
  """`qmatmul_sm90` of one policy (resources, K-loop instructions per weight) at (m, k, n) in blocks of 64."""
  from lora_jax.kernels.qmatmul import triton_compile as tc
  return sm90_or_skip_version_skew(tc.qmatmul_sm90, m, _abstract_q(fmt, k, n, 64), blocks)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_sm90_compiles_a_partial_tile(m):
  """Tensor-core tiles of 16 rows holding 2, 4 or 8 rows of x: the masked loads and store compile."""
  pytest.importorskip("triton", reason="the triton package (test extra) is not installed")
  from lora_jax.kernels import BlockSizes
  r = _sm90_loop("int4_asym", m, BlockSizes(rescale="partial", split_k=2))
  assert r["spill_bytes"] == 0 and r["registers"] <= 255 and r["per_weight"] > 0, r


def test_sm90_machine_code_of_the_conversion_and_rescale_variants():
  """What convert="magic" and rescale="partial" are for, read off the sm_90 machine code: the K loop of int4's
  tensor-core policy converts with I2F once per weight and scales with FMUL once per weight; with both variants
  there is no int-to-float conversion and no per-weight multiply left, and fewer instructions per weight; with
  "magic16" not even the float32-to-bf16 packing (F2FP) the dot's operand needs after "magic". For
  NF4, the table gather with partial scaling needs fewer than half the select tree's. All fit without spilling."""
  pytest.importorskip("triton", reason="the triton package (test extra) is not installed")
  from lora_jax.kernels import BlockSizes
  base = _sm90_loop("int4_sym", 16, BlockSizes())
  new = _sm90_loop("int4_sym", 16, BlockSizes(convert="magic", rescale="partial"))
  base_ops, new_ops = base["per_weight_ops"], new["per_weight_ops"]
  assert base_ops.get("I2F", 0) >= 1 and base_ops.get("FMUL", 0) >= 1, base_ops
  assert not any(op.startswith("I2F") for op in new_ops) and new_ops.get("FMUL", 0) < 0.1, new_ops
  assert new["per_weight"] < 0.8 * base["per_weight"] and new["spill_bytes"] == 0, (base, new)
  packed = _sm90_loop("int4_sym", 16, BlockSizes(convert="magic16", rescale="partial"))["per_weight_ops"]
  conversions = ("I2F", "I2FP", "F2F", "F2FP")  # magic16: no conversion of any kind; bf16 pairs made by HADD2
  assert not any(packed.get(op, 0) for op in conversions) and packed.get("HADD2", 0) > 0, packed
  assert new_ops.get("F2FP", 0) > 0, new_ops  # what magic16 saves over magic: packing float32 into bf16 for the dot
  select = _sm90_loop("nf4", 16, BlockSizes())
  gather = _sm90_loop("nf4", 16, BlockSizes(lookup="gather", rescale="partial"))
  assert gather["per_weight"] < 0.5 * select["per_weight"] and gather["spill_bytes"] == 0, (select, gather)
  # byte permutes: as few instructions as the gather, without its load per weight (only the scales' loads remain)
  prmt = _sm90_loop("nf4", 16, BlockSizes(lookup="prmt", rescale="partial"))
  loads = lambda r: sum(c for op, c in r["per_weight_ops"].items() if op in ("LDG", "LDGSTS", "LDS", "LD"))
  assert prmt["per_weight"] < 0.5 * select["per_weight"] and prmt["spill_bytes"] == 0, (select, prmt)
  assert prmt["per_weight_ops"].get("PRMT", 0) > 1 and not prmt["per_weight_ops"].get("FSEL"), prmt
  assert loads(prmt) < 0.5 < 1 < loads(gather), (prmt, gather)


def test_sm90_machine_code_of_the_words_dot():
  """What dot="words" is for, read off the sm_90 machine code at one row of int4: whole code words turned into
  floats by one masked OR per weight (LOP3 ~1, no byte permutes, no conversions, no tensor cores), one FFMA and a
  half per weight, and under 0.65x the instructions of the best tensor-core variant (magic16 + partial scaling: 5.8
  per weight since the compile runs Triton's front-end passes, as XLA does, which fold its accumulation into the
  dot; 6.3 without them, when the bound was 0.6x); no spills."""
  pytest.importorskip("triton", reason="the triton package (test extra) is not installed")
  from lora_jax.kernels import BlockSizes
  words = _sm90_loop("int4_sym", 1, BlockSizes(dot="words", bn=256))
  best_mma = _sm90_loop("int4_sym", 1, BlockSizes(convert="magic16", rescale="partial"))
  ops = words["per_weight_ops"]
  assert words["per_weight"] < 0.65 * best_mma["per_weight"] and words["spill_bytes"] == 0, (words, best_mma)
  assert 0.9 < ops.get("LOP3", 0) < 1.2 and 1.4 < ops.get("FFMA", 0) < 1.6, ops
  assert not any(ops.get(op, 0) for op in ("I2F", "I2FP", "F2F", "F2FP", "PRMT", "HMMA")), ops


def test_sass_loop_reads_the_longest_backward_branch():
  from lora_jax.kernels.qmatmul.triton_compile import sass_loop
  sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   I2F.F32.S32 R2, R3 ;
        /*0020*/              @!P0 FMUL R4, R2, R5 ;
.L_x_2:
        /*0030*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0040*/              @UP0 BRA.U `(.L_x_2) ;
        /*0050*/               @P1 BRA `(.L_x_0) ;
        /*0060*/                   STG.E [R6.64], R8 ;
        /*0070*/               @P2 BRA `(.L_x_3) ;
        /*0080*/                   EXIT ;
.L_x_3:
        /*0090*/                   EXIT ;
.L_x_1:
        /*00a0*/                   BRA `(.L_x_1);
"""
  r = sass_loop(sass)  # three backward branches (a self-loop, an inner two, the outer five); a forward one
  assert r["instructions"] == 11 and r["loop_instructions"] == 5
  assert r["loop_ops"] == {"BRA": 2, "I2F": 1, "FMUL": 1, "HMMA": 1}
  with pytest.raises(RuntimeError, match="no SASS instructions"):
    sass_loop("nothing here")
  with pytest.raises(RuntimeError, match="no loop"):
    sass_loop(sass.replace("@P1 BRA `(.L_x_0)", "NOP").replace("@UP0 BRA.U `(.L_x_2)", "NOP"))


def test_sm90_compile_skips_only_for_an_untested_version_pair(monkeypatch):
  """An IR that the triton package cannot parse is version skew (the compile test skips, naming both versions)
  only for a (jax, triton) pair not in IR_COMPATIBLE; for CI's pair it is a failure like any other."""
  triton = pytest.importorskip("triton", reason="the triton package (test extra) is not installed")
  from lora_jax.kernels.qmatmul import triton_compile as tc

  def unparsable(*args, **kwargs):
    raise RuntimeError("Parse MLIR file failed")
  monkeypatch.setattr(triton, "compile", unparsable)
  kernel = {"ir": "not IR", "num_warps": 4, "num_stages": 3}
  monkeypatch.setattr(tc, "IR_COMPATIBLE", {(jax.__version__, triton.__version__)})
  with pytest.raises(RuntimeError, match="Parse MLIR") as raised:
    tc.compile_sm90(kernel)
  assert not isinstance(raised.value, tc.IRVersionMismatch)
  monkeypatch.setattr(tc, "IR_COMPATIBLE", set())
  with pytest.raises(tc.IRVersionMismatch, match=f"triton {triton.__version__} cannot parse"):
    tc.compile_sm90(kernel)


@pytest.mark.parametrize("fmt,bk,split,lora,dot,lookup,prefetch", [
    ("nf4", 2, 1, False, "mma", "select", 0), ("nf4", 1, 4, True, "mma", "select", 0),
    ("q4_1", 2, 2, True, "mma", "select", 0), ("int4_asym", 4, 2, False, "mma", "select", 0),
    ("q4_0", 8, 4, True, "mma", "select", 0), ("nf4", 2, 2, True, "fma", "gather", 0),
    ("nf4_dq", 1, 2, False, "mma", "gather", 0), ("nf4_dq", 4, 1, True, "fma", "select", 0),
    ("q4_1", 1, 8, False, "fma", "select", 0), ("nf4_dq", 2, 2, True, "fma", "gather", 1),
    ("int4_sym", 2, 4, True, "mma", "select", 1), ("q4_1", 1, 1, False, "fma", "select", 1),
    ("int4_sym", 2, 2, True, "words", "select", 0), ("q4_1", 1, 4, False, "words", "select", 0),
    ("int4_asym", 4, 1, True, "words", "select", 0), ("q4_0", 2, 8, False, "words", "select", 0)])
def test_pallas_steps_split_k_and_variants(fmt, bk, split, lora, dot, lookup, prefetch):
  """Several quantization blocks per loop step (bk), K split over programs whose partial tiles are summed
  (split_k), the three dots (tensor cores; CUDA-core multiply-reduce and multiply-add over code words, on 5 rows
  padded to 8), both NF4 lookups and
  loads issued a step ahead (prefetch), in interpret mode against the reference; the fused LoRA term is added
  once, not once per split."""
  from lora_jax.kernels import BlockSizes, qmatmul_lora_pallas
  block = 64 if fmt.startswith("nf4") or fmt == "int4_asym" else 32
  w = random_qtensor(fmt.removesuffix("_dq"), 2048, 128, block, double_quant=fmt == "nf4_dq")
  x = jax.random.normal(jax.random.key(bk * 10 + split), (5, 2048))
  blocks = BlockSizes(bk=bk, split_k=split, dot=dot, lookup=lookup, prefetch=prefetch)
  resolved = blocks.for_shape(5, 128, 2048, block)
  assert resolved.split_k == split and resolved.bm == (16 if dot == "mma" else 8)
  with jax.default_matmul_precision("highest"):
    want = qmatmul_reference(x, w)
    if lora:
      low = jax.random.normal(jax.random.key(7), (5, 8))
      b = jax.random.normal(jax.random.key(8), (8, 128)) * 0.1
      got = qmatmul_lora_pallas(x, w, low, b, blocks=blocks, interpret=True)
      want = want + low @ b
    else:
      got = qmatmul_pallas(x, w, blocks=blocks, interpret=True)
  assert_allclose(got, want, "f32_composite")
  with pytest.raises(ValueError, match="must divide the 32 quantization blocks"):
    qmatmul_pallas(x, _q("nf4", 2048, 128, 64), blocks=BlockSizes(bk=3, split_k=1), interpret=True)


@pytest.mark.parametrize("fmt,lookup,convert,rescale,dt", [
    ("int4_sym", "select", "magic", "weight", jnp.float32), ("int4_sym", "select", "magic", "partial", jnp.float32),
    ("q4_0", "select", "i2f", "partial", jnp.float32), ("int4_asym", "select", "magic", "partial", jnp.float32),
    ("q4_1", "select", "magic", "weight", jnp.float32), ("q4_1", "select", "i2f", "partial", jnp.bfloat16),
    ("nf4", "select", "i2f", "partial", jnp.float32), ("nf4_dq", "gather", "i2f", "partial", jnp.bfloat16),
    ("int4_sym", "select", "magic", "partial", jnp.bfloat16),
    ("int4_sym", "select", "magic16", "partial", jnp.bfloat16),
    ("int4_asym", "select", "magic16", "partial", jnp.float32), ("q4_0", "select", "magic16", "weight", jnp.float32),
    ("q4_1", "select", "magic16", "partial", jnp.bfloat16), ("nf4", "prmt", "i2f", "partial", jnp.bfloat16),
    ("nf4_dq", "prmt", "i2f", "weight", jnp.float16)])
def test_pallas_conversion_and_rescale_variants(fmt, lookup, convert, rescale, dt):
  """NF4 values by byte permutes (lookup="prmt", 16-bit), codes to floats without a conversion instruction
  (convert="magic", or "magic16" in bfloat16) and the scale
  applied to each block's partial product instead of each weight (rescale="partial", with the offset's share o·Σx
  for int4_asym / q4_1), over two blocks per step and K split in two, against the reference: f32 activations
  within the composite tolerance, bf16 ones within bf16's (relative to the output's largest value)."""
  from lora_jax.kernels import BlockSizes
  block = 64 if fmt.startswith("nf4") or fmt == "int4_asym" else 32
  w = random_qtensor(fmt.removesuffix("_dq"), 1024, 128, block, double_quant=fmt == "nf4_dq")
  x = jax.random.normal(jax.random.key(11), (3, 1024))
  blocks = BlockSizes(bk=2, split_k=2, lookup=lookup, convert=convert, rescale=rescale)
  with jax.default_matmul_precision("highest"):
    want = qmatmul_reference(x, w)
    got = qmatmul_pallas(x.astype(dt), w, blocks=blocks, interpret=True)
  if dt == jnp.float32:
    assert_allclose(got, want, "f32_composite")
  else:
    scale = float(jnp.max(jnp.abs(want)))
    assert_allclose(got / scale, want / scale, "bf16")


@pytest.mark.parametrize("fmt,m,dt,prefetch", [("q4_1", 17, jnp.float16, 1), ("nf4_dq", 2, jnp.float16, 0),
                                               ("int4_asym", 33, jnp.float32, 1), ("int4_sym", 8, jnp.float32, 0)])
def test_partial_rescale_with_fused_lora_prefetch_and_partial_tiles(fmt, m, dt, prefetch):
  """rescale="partial" with the fused LoRA term, loads a step ahead, f16 activations, and row counts that leave a
  partial tile (2 and 8 of 16, 17 of 32, 33 of 64: its rows masked on load and store)."""
  from lora_jax.kernels import BlockSizes
  block = 64 if fmt.startswith("nf4") or fmt == "int4_asym" else 32
  w = random_qtensor(fmt.removesuffix("_dq"), 1024, 128, block, double_quant=fmt == "nf4_dq")
  x = jax.random.normal(jax.random.key(m), (m, 1024))
  low = jax.random.normal(jax.random.key(7), (m, 8))
  b = jax.random.normal(jax.random.key(8), (8, 128)) * 0.1
  blocks = BlockSizes(bk=2, split_k=2, convert="magic", rescale="partial", prefetch=prefetch)
  bm = blocks.for_shape(m, 128, 1024, block).bm
  assert bm == {2: 16, 8: 16, 17: 32, 33: 64}[m]
  with jax.default_matmul_precision("highest"):
    want = qmatmul_reference(x, w) + low @ b
    got = qmatmul_lora_pallas(x.astype(dt), w, low, b, blocks=blocks, interpret=True)
  assert got.shape == (m, 128)
  if dt == jnp.float32:
    assert_allclose(got, want, "f32_composite")
  else:
    scale = float(jnp.max(jnp.abs(want)))
    assert_allclose(got / scale, want / scale, "f16")


def test_words_byte_values_are_exact_for_every_code_byte():
  """`_byte_values`: every code byte, at each of a word's four byte positions and beside arbitrary neighbours,
  becomes exactly 256 + q_lo and 256 + 16·q_hi."""
  from lora_jax.kernels.qmatmul.pallas_gpu import _WORDS_MAGIC, _byte_values
  byte = np.arange(256, dtype=np.uint32)
  rng = np.random.default_rng(0)
  for b in range(4):
    others = rng.integers(0, 2 ** 32, 256, dtype=np.uint64).astype(np.uint32) & ~np.uint32(0xFF << (8 * b))
    lo, hi = _byte_values(jnp.asarray(others | (byte << (8 * b))), b, jnp.uint32(_WORDS_MAGIC))
    np.testing.assert_array_equal(np.asarray(lo), 256.0 + (byte & 15))
    np.testing.assert_array_equal(np.asarray(hi), 256.0 + 16.0 * (byte >> 4))


@pytest.mark.parametrize("fmt,block,m,dt,lora", [
    ("int4_sym", 64, 1, jnp.float32, False), ("int4_sym", 128, 2, jnp.bfloat16, True),
    ("q4_0", 32, 1, jnp.bfloat16, False), ("q4_1", 32, 3, jnp.float16, True), ("int4_asym", 32, 1, jnp.float32, True)])
def test_words_dot_matches_reference(fmt, block, m, dt, lora):
  """dot="words" (one to a few rows of the affine formats, float32 inside whatever the activation's dtype) against
  the reference on the activation widened to float32, within the composite tolerance: the magic's offset cancels
  in float32 without losing more than that; with the fused LoRA term, K split in two and two blocks per step."""
  from lora_jax.kernels import BlockSizes, qmatmul_lora_pallas
  w = random_qtensor(fmt, 1024, 256, block)
  x = jax.random.normal(jax.random.key(m), (m, 1024)).astype(dt)
  blocks = BlockSizes(dot="words", bn=256 if m == 1 else 128, bk=2, split_k=2)
  with jax.default_matmul_precision("highest"):
    want = qmatmul_reference(x.astype(jnp.float32), w)
    if lora:
      low = jax.random.normal(jax.random.key(7), (m, 8))
      b = jax.random.normal(jax.random.key(8), (8, 256)) * 0.1
      got = qmatmul_lora_pallas(x, w, low, b, blocks=blocks, interpret=True)
      want = want + low @ b
    else:
      got = qmatmul_pallas(x, w, blocks=blocks, interpret=True)
  assert got.shape == (m, 256)
  assert_allclose(got, want, "f32_composite")


def test_words_dot_refuses_what_it_cannot_do():
  from lora_jax.kernels import BlockSizes
  with pytest.raises(ValueError, match="dot='words' turns codes into floats by an affine map: .* not nf4"):
    qmatmul_pallas(jnp.ones((1, 1024)), random_qtensor("nf4", 1024, 128, 64), blocks=BlockSizes(dot="words"),
                   interpret=True)
  for change in ({"convert": "magic"}, {"prefetch": 1}, {"lookup": "gather"}):
    with pytest.raises(ValueError, match="dot='words' has its own code-to-float step"):
      BlockSizes(dot="words", **change).for_shape(1, 128, 1024, 64)
  with pytest.raises(ValueError, match="rescale='partial' needs dot='mma'"):
    BlockSizes(dot="words", rescale="partial").for_shape(1, 128, 1024, 64)


def test_magic_conversion_is_exact_and_policies_are_checked():
  from lora_jax.kernels import BlockSizes
  from lora_jax.kernels.qmatmul.pallas_gpu import _as_float
  q = jnp.concatenate([jnp.arange(4096, dtype=jnp.int32), jnp.array([2 ** 23 - 1, 2 ** 22 + 1], jnp.int32)])
  for minus in (0.0, 8.0):
    np.testing.assert_array_equal(np.asarray(_as_float(q, minus, "magic")), np.asarray(q, np.float64) - minus)
    np.testing.assert_array_equal(np.asarray(_as_float(q, minus, "magic")), np.asarray(_as_float(q, minus, "i2f")))
  with pytest.raises(ValueError, match="rescale='partial' needs dot='mma'"):
    BlockSizes(dot="fma", rescale="partial").for_shape(1, 128, 1024, 64)
  small = jnp.arange(128, dtype=jnp.int32)  # magic16: codes below 128 (4-bit codes are below 16)
  for minus in (0.0, 8.0, 128.0):
    got = _as_float(small, minus, "magic16")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(small, np.float64) - minus)
  with pytest.raises(ValueError, match="lookup='prmt' gives NF4 values as 16-bit floats"):
    qmatmul_pallas(jnp.ones((1, 1024)), random_qtensor("nf4", 1024, 128, 64),
                   blocks=BlockSizes(lookup="prmt"), interpret=True)
  with pytest.raises(ValueError, match="convert must be 'i2f', 'magic' or 'magic16'"):
    BlockSizes(convert="cvt").for_shape(1, 128, 1024, 64)


@pytest.mark.parametrize("m,k,n,fmt,block,want", [
    (1, 4096, 4096, "nf4", 64, (1, 128, 1, 16)),      # DECODE_NF4: one row (multiply-reduce), 32 tiles split 16 ways
    (1, 576, 1536, "nf4", 64, (1, 128, 1, 1)),        # 9 blocks: odd, no even split or step
    (1, 4096, 4096, "int4_sym", 64, (16, 64, 2, 8)),  # tensor cores pad to 16 rows but store 1: 64 tiles x 8 splits
    (2, 4096, 4096, "nf4", 64, (16, 64, 2, 8)),       # NF4 beyond one row: tensor cores too (2 rows stored)
    (16, 4096, 4096, "nf4", 64, (16, 64, 2, 2)),      # 16 rows stored: split K in two (+12.5% bytes, the bound)
    (16, 14336, 4096, "nf4", 64, (16, 64, 2, 4)),     # longer K: split further within the bound
    (2, 4096, 4096, "q4_0", 32, (16, 64, 4, 8)),      # 128 rows of K per step: 4 blocks of 32
    (64, 4096, 4096, "int4_sym", 64, (64, 64, 2, 1)),  # partial sums of 64 rows would cost too much
    (1, 4096, 4096, "nf4", 128, (16, 64, 1, 8)),      # NF4 in blocks of 128: DECODE_NF4 would spill; tensor cores
])
def test_default_blocks_resolution(m, k, n, fmt, block, want):
  from lora_jax.kernels import DECODE_NF4, BlockSizes, default_blocks
  policy = default_blocks(m, fmt, block)
  assert policy == (DECODE_NF4 if (m, fmt, block) == (1, "nf4", 64) else BlockSizes())
  bs = policy.for_shape(m, n, k, block)
  assert (bs.bm, bs.bn, bs.bk, bs.split_k) == want
  with pytest.raises(ValueError, match="dot must be 'mma', 'fma' or 'words'"):
    BlockSizes(dot="wgmma").for_shape(m, n, k, block)


def test_gpu_dispatch_by_rows_and_format(monkeypatch):
  """On a GPU, auto takes the Pallas kernel for 1 to PALLAS_M_MAX[fmt] rows (64 for NF4, 256 for int4 and GGUF)
  and XLA's dequantize + dot above (faster there on an H200) or for no rows; an explicit impl="pallas" is obeyed
  at any size, and an empty input gives an empty product."""
  import lora_jax.kernels as kernels
  from lora_jax.quant._qtensor import FORMATS
  assert set(kernels.PALLAS_M_MAX) == set(FORMATS)
  monkeypatch.setattr(kernels, "_backend", lambda: "gpu")
  for fmt, block, limit in (("nf4", 64, 64), ("int4_sym", 64, 256), ("q4_1", 32, 256)):
    w = _q(fmt, 256, 128, block)
    assert kernels.PALLAS_M_MAX[fmt] == limit
    assert _choose(jnp.ones((1, 256)), w, "auto", False) == "pallas"
    assert _choose(jnp.ones((2, limit // 2, 256)), w, "auto", False) == "pallas"
    assert _choose(jnp.ones((limit + 1, 256)), w, "auto", False) == "reference"
    assert _choose(jnp.ones((0, 256)), w, "auto", False) == "reference"
    assert _choose(jnp.ones((4096, 256)), w, "pallas", False) == "pallas"
    assert qmatmul(jnp.ones((2, 0, 256)), w, impl="pallas", interpret=True).shape == (2, 0, 128)


def test_explicit_split_k_picks_a_step_that_divides():
  """18 blocks split in 2: 9 per program, so one block per step (2 would not divide), and the call works."""
  from lora_jax.kernels import BlockSizes
  assert BlockSizes(split_k=2).for_shape(1, 128, 18 * 64, 64).bk == 1
  w = _q("nf4", 18 * 64, 128, 64)
  x = jax.random.normal(jax.random.key(0), (2, 18 * 64))
  with jax.default_matmul_precision("highest"):
    assert_allclose(qmatmul_pallas(x, w, blocks=BlockSizes(split_k=2), interpret=True), qmatmul_reference(x, w),
                    "f32_composite")


@pytest.mark.parametrize("fmt", ["nf4", "q4_1"])
def test_qlora_reference_path_is_one_gemm_with_4bit_residuals(fmt):
  """`qmatmul_lora` on the reference path (training-sized inputs on CPU) goes through `lora_linear`: values and
  gradients (x, A, B, scale) equal autodiff of the dense dequantized layer, and the backward pass keeps the
  stored 4-bit W, not a float copy."""
  w = _q(fmt, 256, 128, 64 if fmt == "nf4" else 32)
  keys = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(keys[0], (CPU_M_MAX + 6, 256))
  a, b = jax.random.normal(keys[1], (256, 4)) * 0.1, jax.random.normal(keys[2], (4, 128)) * 0.1
  s = jnp.float32(1.5)
  assert _choose(x, w, "auto", False) == "reference"
  fused = lambda x, a, b, s: jnp.sum(jnp.sin(qmatmul_lora(x, w, a, b, s)))
  dense = lambda x, a, b, s: jnp.sum(jnp.sin(x @ w.dequantize() + s * (x @ a) @ b))
  with jax.default_matmul_precision("highest"):
    for got, want in zip(jax.grad(fused, argnums=(0, 1, 2, 3))(x, a, b, s),
                         jax.grad(dense, argnums=(0, 1, 2, 3))(x, a, b, s)):
      assert_allclose(got, want, "f32_composite")
  _, vjp = jax.vjp(lambda x: qmatmul_lora(x, w, a, b, s), x)
  leaves = jax.tree.leaves(vjp)
  assert any(leaf is w.codes for leaf in leaves)
  assert not any(getattr(leaf, "shape", None) == (256, 128) for leaf in leaves)  # no dequantized kernel kept
