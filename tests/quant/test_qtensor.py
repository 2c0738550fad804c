"""QTensor invariants, packing, pinned quantization error per format, double quantization, GGUF blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lora_jax import LoraJaxError
from lora_jax.quant import NF4_TABLE, QTensor, from_gguf, quantize, quantize_params
from lora_jax.quant._qtensor import pack, unpack

W = jax.random.normal(jax.random.key(0), (256, 96), jnp.float32)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 8), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(k2, n, seed):
  q = np.random.default_rng(seed).integers(0, 16, (2 * k2, n))
  np.testing.assert_array_equal(unpack(pack(q)), q)


def test_invariants_are_checked():
  q = quantize(W, "nf4")
  with pytest.raises(ValueError, match="codes must be uint8"):
    QTensor(q.codes[:-1], q.scale, fmt="nf4", block_size=64, shape=(256, 96))
  with pytest.raises(ValueError, match="multiple of block_size"):
    QTensor(q.codes, q.scale, fmt="nf4", block_size=60, shape=(256, 96))
  with pytest.raises(ValueError, match="scale must have shape"):
    QTensor(q.codes, q.scale[:2], fmt="nf4", block_size=64, shape=(256, 96))
  with pytest.raises(ValueError, match="needs offsets"):
    QTensor(q.codes, q.scale, fmt="int4_asym", block_size=64, shape=(256, 96))
  with pytest.raises(LoraJaxError, match="not divisible by the block size 64"):
    quantize(W[:200], "nf4", name="layers/attn/q_proj/kernel")
  with pytest.raises(LoraJaxError, match=r"attn_norm/scale: a kernel to quantize is \(\.\.\., K, N\); got shape \(96,\)"):
    quantize(W[0], "nf4", name="attn_norm/scale")
  for bad in (0, 33, 64.0):  # 0 was once taken silently as the default
    with pytest.raises(LoraJaxError, match=f"q_proj/kernel: block size must be an even integer >= 2.*{bad}"):
      quantize(W, "int4_sym", block_size=bad, name="q_proj/kernel")


# Relative mean absolute error of dequantize(quantize(W)) for W ~ N(0, 1), 256x96, key 0. Pinned: a change in
# either direction (worse *or* better) means the scheme changed and must be re-pinned on purpose.
PINNED_REL_MAE = {
    ("nf4", 64, False): 0.09143,
    ("nf4", 64, True): 0.09148,
    ("int4_sym", 32, False): 0.10106,
    ("int4_sym", 64, False): 0.11349,
    ("int4_sym", 128, False): 0.12473,
    ("int4_asym", 32, False): 0.08131,
    ("int4_asym", 64, False): 0.09477,
    ("int4_asym", 128, False): 0.10721,
}


@pytest.mark.parametrize("fmt,block,dq", sorted(PINNED_REL_MAE), ids=str)
def test_quantization_error_is_pinned(fmt, block, dq):
  q = quantize(W, fmt, block_size=block, double_quant=dq)
  err = float(jnp.mean(jnp.abs(q.dequantize() - W)) / jnp.mean(jnp.abs(W)))
  np.testing.assert_almost_equal(err, PINNED_REL_MAE[(fmt, block, dq)], decimal=5)  # places=5, as qwix


def test_nf4_codes_are_nearest_table_entries():
  q = quantize(W, "nf4")
  absmax = np.abs(np.asarray(W)).reshape(4, 64, 96).max(1)
  normed = np.asarray(W).reshape(4, 64, 96) / absmax[:, None]
  want = np.abs(normed[..., None] - NF4_TABLE).argmin(-1).reshape(256, 96)
  np.testing.assert_array_equal(unpack(q.codes), want)
  np.testing.assert_allclose(np.asarray(q.scale), absmax, rtol=0)


def test_double_quantization_bits_per_parameter():
  w = jax.random.normal(jax.random.key(1), (4096, 1024))
  plain, dq = quantize(w, "nf4"), quantize(w, "nf4", double_quant=True)
  assert plain.bits_per_parameter() == pytest.approx(4.5, abs=1e-3)
  assert dq.bits_per_parameter() <= 4.13
  stacked = quantize(jnp.stack([w[:1024]] * 3), "nf4", double_quant=True)  # per weight, however many layers
  assert stacked.bits_per_parameter() == pytest.approx(quantize(w[:1024], "nf4", double_quant=True)
                                                       .bits_per_parameter())
  assert float(jnp.max(jnp.abs(dq.block_scales() - plain.scale))) < 0.01 * float(jnp.max(plain.scale))


def test_native_gguf_blocks_dequantize_bit_exactly(smollm2):
  """Our Q4_1 layout gives exactly gguf.quants.dequantize's values (the loaded float params)."""
  for path in ("layers/attn/q_proj/kernel", "layers/attn/k_proj/kernel", "layers/mlp/down_proj/kernel"):
    stored = smollm2.quantized[path][3]
    q = from_gguf(stored)
    assert q.fmt == "q4_1" and q.scale.dtype == jnp.float16
    group, sub, leaf = path.split("/")[1:]
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(smollm2.params["layers"][group][sub][leaf][3]))
    stacked = from_gguf(smollm2.quantized[path][2:5])  # a list of layers: one QTensor, stacked on the host
    assert stacked.codes.shape == (3, *q.codes.shape)
    np.testing.assert_array_equal(np.asarray(stacked.dequantize()),
                                  np.asarray(smollm2.params["layers"][group][sub][leaf][2:5]))


def test_quantize_params_default_rules_skip_norms_and_embeddings():
  from lora_jax.models import ModelConfig, init_params
  cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16)
  params = init_params(cfg, key=jax.random.key(0))
  q = quantize_params(params, "nf4")
  assert isinstance(q["layers"]["attn"]["q_proj"]["kernel"], QTensor)
  assert q["layers"]["attn"]["q_proj"]["kernel"].codes.shape == (2, 32, 64)
  assert not isinstance(q["embed"]["embedding"], QTensor)
  assert not isinstance(q["layers"]["attn_norm"]["scale"], QTensor)
  with pytest.raises(LoraJaxError, match="match no parameter"):
    quantize_params(params, "nf4", rules=["nothing"])
  from lora_jax.models import unstack_layers
  with pytest.raises(LoraJaxError, match="per-layer layout of Model.unstack_layers: quantize the stacked params"):
    quantize_params(unstack_layers(params), "nf4")
  with pytest.raises(LoraJaxError, match="no stored 4-bit blocks"):
    quantize_params(params, "native", gguf_blocks={})


def test_bitsandbytes_nf4_layout_bit_exact():
  """Codes and absmax of bitsandbytes' own quantize_4bit equal ours; its dequantization equals ours."""
  torch = pytest.importorskip("torch")
  F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes CPU build not installed")
  from lora_jax.quant import from_bitsandbytes
  w_hf = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))  # (out, in)
  packed, state = F.quantize_4bit(w_hf, blocksize=64, quant_type="nf4")
  theirs = from_bitsandbytes(packed.numpy(), state.absmax.numpy(), (96, 256))
  ours = quantize(jnp.asarray(w_hf.numpy().T), "nf4", block_size=64)
  np.testing.assert_array_equal(np.asarray(theirs.codes), np.asarray(ours.codes))
  np.testing.assert_array_equal(np.asarray(theirs.scale), np.asarray(ours.scale))
  np.testing.assert_array_equal(np.asarray(theirs.dequantize()), F.dequantize_4bit(packed, state).numpy().T)
  # double-quantized bitsandbytes weights load exactly through their dequantized absmax
  packed2, st2 = F.quantize_4bit(w_hf, blocksize=64, quant_type="nf4", compress_statistics=True)
  absmax = (F.dequantize_blockwise(st2.absmax, st2.state2) + st2.offset).numpy()
  q2 = from_bitsandbytes(packed2.numpy(), absmax, (96, 256))
  np.testing.assert_array_equal(np.asarray(q2.dequantize()), F.dequantize_4bit(packed2, st2).numpy().T)
