"""The Pallas kernel compiled and run on a GPU (`-m gpu`; skipped without one): values against the reference for
every format, the tilings (bk, split_k) and variants (dot, NF4 lookup, warps, stages, prefetch, convert, rescale),
the K-major layout's kernel, QLoRA's linear and its gradients, and a QLoRA training step. On CPU the same kernel is checked in interpret mode
(test_qmatmul.py) and compiled for sm_90 without running."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.kernels import (BlockSizes, qmatmul, qmatmul_lora, qmatmul_lora_pallas, qmatmul_pallas,
                              qmatmul_reference)
from lora_jax.testing import assert_allclose, random_qtensor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")]


def _q(fmt, k, n):
  return random_qtensor(fmt.removesuffix("_dq"), k, n, double_quant=fmt == "nf4_dq")


def _close(got, want, tol):
  scale = float(jnp.max(jnp.abs(want)))
  assert np.isfinite(np.asarray(got)).all()
  assert_allclose(np.asarray(got, np.float32) / scale, np.asarray(want, np.float32) / scale, tol)


@pytest.mark.parametrize("fmt", ["nf4", "nf4_dq", "int4_sym", "int4_asym", "q4_0", "q4_1"])
@pytest.mark.parametrize("m", [1, 300])  # 1: the default multiply-reduce path; 300: tensor cores
@pytest.mark.parametrize("k,n", [(576, 1536), (4096, 4096)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_pallas_on_gpu_matches_reference(fmt, m, k, n, dtype):
  w = _q(fmt, k, n)
  x = jax.random.normal(jax.random.key(m), (m, k), dtype)
  got = jax.block_until_ready(qmatmul_pallas(x, w))
  _close(got, qmatmul_reference(x, w), "bf16" if dtype == jnp.bfloat16 else "tf32")


@pytest.mark.parametrize("m,fmt,blocks", [
    (4, "nf4", BlockSizes(bk=1, split_k=1)), (4, "nf4", BlockSizes(bk=2, split_k=1)),
    (4, "nf4", BlockSizes(bk=4, split_k=1)), (4, "nf4", BlockSizes(bk=1, split_k=2)),
    (4, "nf4", BlockSizes(bk=2, split_k=4)), (4, "nf4", BlockSizes(bk=4, split_k=8)),
    (4, "nf4_dq", BlockSizes(lookup="gather", bn=128, num_warps=8, num_stages=2)),
    (16, "nf4_dq", BlockSizes(lookup="gather", bk=4, split_k=2, num_warps=2, num_stages=4)),
    (1, "nf4_dq", BlockSizes(dot="fma", lookup="gather", bn=32, bk=1, split_k=8)),
    (1, "nf4_dq", BlockSizes(dot="fma", bn=128, bk=4, num_warps=8, num_stages=4)),
    (3, "int4_sym", BlockSizes(dot="fma", bn=64, bk=2, split_k=4, num_warps=2, num_stages=2)),
    (1, "q4_1", BlockSizes(dot="mma", bk=2, split_k=2)),
    (1, "nf4_dq", BlockSizes(dot="fma", lookup="gather", bn=128, bk=1, prefetch=1)),
    (16, "int4_sym", BlockSizes(bk=2, split_k=2, prefetch=1)),
    (1, "int4_sym", BlockSizes(convert="magic", rescale="partial")),
    (16, "q4_0", BlockSizes(convert="magic")),
    (4, "int4_asym", BlockSizes(convert="magic", rescale="partial", bk=2, split_k=2)),
    (1, "int4_sym", BlockSizes(convert="magic16", rescale="partial")),
    (8, "q4_1", BlockSizes(convert="magic16", rescale="partial", bk=2, split_k=2)),
    (16, "q4_0", BlockSizes(convert="magic16")),
    (16, "nf4_dq", BlockSizes(lookup="prmt", rescale="partial")),
    (4, "nf4", BlockSizes(lookup="prmt", bk=2, split_k=2)),
    (1, "nf4_dq", BlockSizes(dot="fma", lookup="prmt", bn=128, bk=1, num_stages=2, min_programs=1056)),
    (1, "q4_1", BlockSizes(rescale="partial")),
    (1, "nf4_dq", BlockSizes(lookup="gather", rescale="partial")),
    (16, "nf4", BlockSizes(rescale="partial", num_warps=8)),
    (1, "int4_sym", BlockSizes(dot="words", bn=256)), (1, "q4_0", BlockSizes(dot="words", bn=128, bk=2, split_k=4)),
    (2, "q4_1", BlockSizes(dot="words", bn=128)), (3, "int4_asym", BlockSizes(dot="words", bn=64, num_warps=2)),
], ids=str)
def test_tilings_and_variants_on_gpu(m, fmt, blocks):
  """bk, split_k, the three dots (tensor cores; CUDA-core multiply-reduce; multiply-add over code words), the
  three NF4 lookups (select tree, table
  gather, byte permutes in inline PTX), warps, stages, prefetch, the three code conversions and both places to
  apply the scale."""
  w = _q(fmt, 4096, 4096)
  x = jax.random.normal(jax.random.key(m), (m, 4096), jnp.bfloat16)
  got = qmatmul_pallas(x, w, blocks=blocks)
  _close(got, qmatmul_reference(x, w), "bf16")


def test_prmt_lookup_with_f16_prefetch_and_lora_on_gpu():
  """The byte-permute NF4 lookup's PTX with float16 activations (its float16 table), loads a step ahead, and the
  fused LoRA term."""
  w = _q("nf4_dq", 4096, 1024)
  x = jax.random.normal(jax.random.key(3), (8, 4096), jnp.float16)
  got = qmatmul_pallas(x, w, blocks=BlockSizes(lookup="prmt", rescale="partial", prefetch=1, bk=2, split_k=2))
  _close(got, qmatmul_reference(x, w), "f16")
  low = jax.random.normal(jax.random.key(4), (8, 16), jnp.float32)
  b = jax.random.normal(jax.random.key(5), (16, 1024), jnp.float32) * 0.1
  xb = x.astype(jnp.bfloat16)
  got = qmatmul_lora_pallas(xb, w, low, b, blocks=BlockSizes(lookup="prmt", rescale="partial"))
  _close(got, qmatmul_reference(xb, w) + low @ b, "bf16")


def test_fused_lora_and_gradients_on_gpu():
  w = _q("q4_1", 4096, 1024)
  keys = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(keys[0], (8, 4096), jnp.bfloat16)
  a = (jax.random.normal(keys[1], (4096, 16)) * 0.02).astype(jnp.bfloat16)
  b = (jax.random.normal(keys[2], (16, 1024)) * 0.02).astype(jnp.bfloat16)
  loss = lambda impl: lambda x, a, b: jnp.sum(jnp.tanh(qmatmul_lora(x, w, a, b, jnp.float32(2.0), impl=impl)))
  nf4 = _q("nf4_dq", 4096, 1024)
  for weight, rows in ((w, x), (w, x[:1]), (nf4, x[:1])):  # tensor cores; one row of NF4: DECODE_NF4's fma path
    _close(qmatmul_lora(rows, weight, a, b, 2.0, impl="pallas"),
           qmatmul_lora(rows, weight, a, b, 2.0, impl="reference"), "bf16")
  got = jax.grad(loss("pallas"), argnums=(0, 1, 2))(x, a, b)
  want = jax.grad(loss("reference"), argnums=(0, 1, 2))(x, a, b)
  for g, h in zip(got, want):
    assert g.dtype == jnp.bfloat16
    _close(g, h, "bf16")


@pytest.mark.parametrize("fmt,m,k,n,dtype", [  # each format, row count, shape and dtype at least once
    ("int4_sym", 1, 4096, 4096, jnp.bfloat16), ("int4_sym", 16, 576, 1536, jnp.float16),
    ("int4_sym", 40, 4096, 4096, jnp.bfloat16), ("int4_asym", 1, 576, 1536, jnp.bfloat16),
    ("int4_asym", 16, 4096, 4096, jnp.float16), ("q4_0", 1, 4096, 4096, jnp.float16),
    ("q4_0", 40, 576, 1536, jnp.bfloat16), ("q4_1", 16, 4096, 4096, jnp.bfloat16),
    ("q4_1", 1, 576, 1536, jnp.float16), ("nf4_dq", 1, 4096, 4096, jnp.bfloat16),
    ("nf4_dq", 16, 576, 1536, jnp.float16), ("nf4", 40, 4096, 4096, jnp.bfloat16)],
    ids=lambda v: getattr(v, "__name__", str(v)))
def test_kmajor_on_gpu_matches_reference(fmt, m, k, n, dtype):
  """The K-major kernel (its default policy) against the float32 reference on the same 16-bit activations: the
  affine formats' 16-bit values are exact, so only the order of float32 sums differs; NF4's table is rounded once
  to the 16-bit type (the byte-permute lookup in PTX), so its tolerance is that type's."""
  from lora_jax.kernels import pack_kmajor
  w = _q(fmt, k, n)
  x = jax.random.normal(jax.random.key(m), (m, k), dtype)
  got = jax.block_until_ready(qmatmul_pallas(x, pack_kmajor(w)))
  tol = "f32_composite" if not fmt.startswith("nf4") else ("bf16" if dtype == jnp.bfloat16 else "f16")
  with jax.default_matmul_precision("highest"):
    _close(got, qmatmul_reference(x.astype(jnp.float32), w), tol)


@pytest.mark.parametrize("m,fmt,blocks", [
    (1, "int4_sym", BlockSizes(bn=256, bk=2)), (16, "int4_sym", BlockSizes(bn=64, bk=1, split_k=8)),
    (8, "q4_1", BlockSizes(bn=128, bk=4, split_k=2, num_warps=8)), (1, "q4_0", BlockSizes(bn=256, num_stages=2)),
    (64, "int4_asym", BlockSizes(bn=128, num_warps=8, num_stages=4)), (1, "nf4_dq", BlockSizes(bn=256, bk=4)),
    (5, "q4_1", BlockSizes(bn=128, bk=2, split_k=2, prefetch=1)), (1, "nf4_dq", BlockSizes(bn=128, prefetch=1)),
    (1, "int4_sym", BlockSizes(bn=32, min_programs=1)), (16, "nf4_dq", BlockSizes(bn=64, bk=4, min_programs=528))],
    ids=str)
def test_kmajor_tilings_lora_and_gradients_on_gpu(m, fmt, blocks):
  from lora_jax.kernels import pack_kmajor, qmatmul_lora
  w = _q(fmt, 4096, 1024)
  p = pack_kmajor(w)
  x = jax.random.normal(jax.random.key(m), (m, 4096), jnp.bfloat16)
  with jax.default_matmul_precision("highest"):
    want = qmatmul_reference(x.astype(jnp.float32), w)
  _close(qmatmul_pallas(x, p, blocks=blocks), want, "bf16" if fmt.startswith("nf4") else "f32_composite")
  a = (jax.random.normal(jax.random.key(1), (4096, 16)) * 0.02).astype(jnp.bfloat16)
  b = (jax.random.normal(jax.random.key(2), (16, 1024)) * 0.02).astype(jnp.bfloat16)
  _close(qmatmul_lora(x, p, a, b, 2.0), qmatmul_lora(x, w, a, b, 2.0, impl="reference"), "bf16")
  loss = lambda w: lambda x: jnp.sum(jnp.tanh(qmatmul(x, w)))
  _close(jax.grad(loss(p))(x), jax.grad(loss(w))(x), "bf16")


def test_auto_dispatch_on_gpu_takes_the_kernel():
  from lora_jax.kernels import _choose
  w = _q("nf4_dq", 576, 1536)
  assert _choose(jnp.ones((1, 576), jnp.bfloat16), w, "auto", False) == "pallas"
  _close(qmatmul(jnp.ones((3, 576), jnp.bfloat16), w), qmatmul_reference(jnp.ones((3, 576), jnp.bfloat16), w),
         "bf16")


def test_qlora_training_on_gpu_follows_the_reference(standard_promotion):
  """Three AdamW steps of a QLoRA model (NF4 base as --quantize nf4 makes it) with the kernel and with the
  dequantize-and-dot reference: the same losses at bf16 precision."""
  import optax
  from lora_jax.kernels import set_default_impl
  from lora_jax.models import ModelConfig, init_params
  from lora_jax.peft import LoraConfig, init_lora
  from lora_jax.quant import quantize_model_params
  from lora_jax.train import TrainState, make_train_step
  cfg = ModelConfig(architecture="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=64)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init_params(cfg, key=jax.random.key(0)))
  lcfg = LoraConfig(rank=8, alpha=16, targets=("all-linear",))
  ids = jax.random.randint(jax.random.key(2), (4, 64), 0, cfg.vocab_size)
  batch = {"ids": ids, "segments": jnp.ones_like(ids), "positions": jnp.tile(jnp.arange(64), (4, 1)),
           "loss": jnp.ones(ids.shape, bool)}
  losses = {}
  for impl in ("pallas", "reference"):
    set_default_impl(impl)
    try:
      adapter, frozen = init_lora(lcfg, cfg, quantize_model_params(params, "nf4"), key=jax.random.key(1))
      adapter = jax.tree.map(lambda t: t.astype(jnp.float32), adapter)
      tx = optax.adamw(1e-2)
      state = TrainState(jnp.int32(0), adapter, tx.init(adapter), jax.random.key_data(jax.random.key(0)))
      step = make_train_step(cfg, lcfg, tx)
      losses[impl] = []
      for _ in range(3):
        state, metrics = step(state, frozen, batch)
        losses[impl].append(float(metrics["loss"]))
    finally:
      set_default_impl("auto")
  assert all(np.isfinite(losses["pallas"])) and losses["pallas"][-1] < losses["pallas"][0], losses
  assert_allclose(np.array(losses["pallas"]), np.array(losses["reference"]), "bf16")
