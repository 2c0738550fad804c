"""LoRA / rsLoRA / DoRA math, inits, merge/unmerge, targeting, partitions and hot-swap without retracing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import LoraJaxError
from lora_jax.models import ModelConfig, forward, init_params
from lora_jax.peft import (LoraConfig, LoRAWeight, apply_lora, init_lora, lora_optimizer, merge, resolve_targets,
                           trainable_summary, unmerge)
from lora_jax.peft._optim import state_nbytes
from lora_jax.testing import assert_allclose, assert_trees_all_close

CFG = ModelConfig(architecture="llama", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
PARAMS = init_params(CFG, key=jax.random.key(0), std=0.2)
TOKENS = np.arange(1, 13, dtype=np.int32).reshape(2, 6)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
fwd = jax.jit(forward, static_argnums=1)


def _random_adapter(cfg, key=1):
  """An adapter with non-zero B (the default init has B = 0)."""
  adapter, frozen = init_lora(cfg, CFG, PARAMS, key=jax.random.key(key))
  bumped = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(key + 7), x.shape), adapter)
  return bumped, frozen


def test_scales_pinned():
  assert LoraConfig(rank=8, alpha=16).scale == 2.0
  assert LoraConfig(rank=16, alpha=16, use_rslora=True).scale == 4.0


def test_default_init_is_exactly_the_base():
  cfg = LoraConfig(rank=4, alpha=8, targets=ALL)
  adapter, frozen = init_lora(cfg, CFG, PARAMS, key=jax.random.key(0))
  a = adapter["layers/attn/q_proj"]["lora_A"]
  assert a.shape == (3, 32, 4) and float(jnp.abs(a).max()) <= 1 / np.sqrt(32)
  assert float(jnp.abs(adapter["layers/mlp/down_proj"]["lora_B"]).max()) == 0
  # Not bit-exact: the fused path computes x W inside the wider GEMM x [W | A], whose blocking can round
  # differently; it must still be the base up to single-op float32 rounding.
  assert_allclose(fwd(apply_lora(cfg, CFG, frozen, adapter), CFG, TOKENS), fwd(PARAMS, CFG, TOKENS), "f32_op")


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "layers"])
def test_fused_linear_matches_materialize(variant):
  cfg = LoraConfig(rank=4, alpha=8, targets=ALL, use_rslora=variant == "rslora", use_dora=variant == "dora",
                   layers_to_transform=(0, 2) if variant == "layers" else None)
  adapter, frozen = _random_adapter(cfg)
  fused = fwd(apply_lora(cfg, CFG, frozen, adapter), CFG, TOKENS)
  merged = fwd(merge(cfg, CFG, frozen, adapter), CFG, TOKENS)
  assert_allclose(fused, merged, "f32_composite")
  assert float(jnp.abs(fused - fwd(PARAMS, CFG, TOKENS)).max()) > 1e-3  # the adapter does something


def test_materialize_is_the_stated_formula():
  w = jax.random.normal(jax.random.key(0), (6, 5))
  a = jax.random.normal(jax.random.key(1), (6, 2))
  b = jax.random.normal(jax.random.key(2), (2, 5))
  lw = LoRAWeight(w, a, b, jnp.float32(0.5))
  assert_allclose(lw.materialize(), np.asarray(w) + 0.5 * np.asarray(a) @ np.asarray(b), "f32_op")
  m = jnp.arange(1.0, 6.0)
  dw = LoRAWeight(w, a, b, jnp.float32(0.5), m).materialize()
  assert_allclose(jnp.linalg.norm(dw, axis=0), m, "f32_op")  # DoRA: column norms are the magnitudes
  x = jax.random.normal(jax.random.key(3), (4, 6))
  assert_allclose(LoRAWeight(w, a, b, jnp.float32(0.5), m).linear(x), x @ dw, "f32_composite")


@pytest.mark.parametrize("wrt", [0, 2, 3, 4])
def test_fused_lora_linear_gradients_match_autodiff(wrt):
  from lora_jax.kernels import lora_linear
  w = jax.random.normal(jax.random.key(0), (6, 5))
  a = jax.random.normal(jax.random.key(1), (6, 2))
  b = jax.random.normal(jax.random.key(2), (2, 5))
  x = jax.random.normal(jax.random.key(3), (3, 4, 6))
  args = [x, w, a, b, jnp.float32(0.5)]

  def plain(*args):
    x, w, a, b, s = args
    return jnp.sum(jnp.sin(x @ w + s * (x @ a) @ b))
  fused = lambda *args: jnp.sum(jnp.sin(lora_linear(*args)))
  assert_allclose(jax.grad(fused, argnums=wrt)(*args), jax.grad(plain, argnums=wrt)(*args), "f32_composite")
  if wrt != 4:  # a Python number as the scale (once an AttributeError)
    python_scale = lambda *args: fused(*args[:4], 0.5)
    assert_allclose(jax.grad(python_scale, argnums=wrt)(*args), jax.grad(plain, argnums=wrt)(*args), "f32_composite")


def test_dora_norm_is_constant_in_backward():
  w = jax.random.normal(jax.random.key(0), (6, 5))
  a = jax.random.normal(jax.random.key(1), (6, 2))
  b = jax.random.normal(jax.random.key(2), (2, 5))
  x = jax.random.normal(jax.random.key(3), (4, 6))
  m = jnp.linalg.norm(w, axis=0)

  def fused(b):
    return jnp.sum(LoRAWeight(w, a, b, jnp.float32(0.5), m).linear(x) ** 2)

  def reference(b):  # PEFT: treat ‖W + sAB‖ as a constant
    adapted = w + 0.5 * a @ b
    norm = jax.lax.stop_gradient(jnp.linalg.norm(adapted, axis=0))
    return jnp.sum((x @ adapted * (m / norm)) ** 2)
  assert_allclose(jax.grad(fused)(b), jax.grad(reference)(b), "f32_composite")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_svd_inits_keep_the_model_and_move_weight_into_the_adapter(init):
  cfg = LoraConfig(rank=4, alpha=8, targets=("q_proj", "down_proj"), init=init)
  adapter, frozen = init_lora(cfg, CFG, PARAMS, key=jax.random.key(0))
  assert float(jnp.abs(adapter["layers/attn/q_proj"]["lora_B"]).max()) > 0
  assert_allclose(fwd(apply_lora(cfg, CFG, frozen, adapter), CFG, TOKENS), fwd(PARAMS, CFG, TOKENS), "f32_composite")
  residual = frozen["layers"]["attn"]["q_proj"]["kernel"]
  assert float(jnp.abs(residual - PARAMS["layers"]["attn"]["q_proj"]["kernel"]).max()) > 1e-3
  if init == "pissa":  # the adapter holds the top singular directions: B A is the best rank-4 approximation
    w = np.asarray(PARAMS["layers"]["attn"]["q_proj"]["kernel"][0], np.float64)
    u, s, vt = np.linalg.svd(w)
    best = (u[:, :4] * s[:4]) @ vt[:4]
    got = cfg.scale * np.asarray(adapter["layers/attn/q_proj"]["lora_A"][0]) @ np.asarray(
        adapter["layers/attn/q_proj"]["lora_B"][0])
    assert_allclose(got, best, "f32_composite")


def test_merge_unmerge_round_trip():
  cfg = LoraConfig(rank=4, alpha=8, targets=ALL)
  adapter, frozen = _random_adapter(cfg)
  back = unmerge(cfg, CFG, merge(cfg, CFG, frozen, adapter), adapter)
  assert_trees_all_close(back, frozen, "f32_op")
  with pytest.raises(LoraJaxError, match="DoRA"):
    unmerge(dataclasses.replace(cfg, use_dora=True), CFG, frozen, adapter)


def test_hot_swap_does_not_retrace():
  cfg = LoraConfig(rank=4, alpha=8, targets=ALL)
  traces = []

  @jax.jit
  def run(frozen, adapter, tokens):
    traces.append(1)
    return forward(apply_lora(cfg, CFG, frozen, adapter), CFG, tokens)

  outs = [run(PARAMS, _random_adapter(cfg, key=k)[0], TOKENS) for k in (1, 2, 3)]
  assert len(traces) == 1
  assert float(jnp.abs(outs[0] - outs[1]).max()) > 1e-3


def test_targets_and_errors():
  assert resolve_targets("all-linear") == resolve_targets(list(ALL))
  assert resolve_targets(r".*\.(q|v)_proj") == ("layers/attn/q_proj", "layers/attn/v_proj")
  assert resolve_targets(["re:layers/mlp/.*"]) == ("layers/mlp/down_proj", "layers/mlp/gate_proj",
                                                   "layers/mlp/up_proj")
  with pytest.raises(LoraJaxError, match="matches no weight; available module names: q_proj"):
    resolve_targets(["qkv"])
  assert resolve_targets(r"model\.layers\.\d+\.self_attn\.q_proj") == ("layers/attn/q_proj",)
  for layer_specific in (r"model\.layers\.0\.self_attn\.q_proj", r"model\.layers\.1\.mlp\.\w+"):  # once widened to
    with pytest.raises(LoraJaxError, match="in some layers only.*layers_to_transform"):  # every layer, or "no weight"
      resolve_targets(layer_specific)
  with pytest.raises(LoraJaxError, match="rank must be a positive integer"):
    LoraConfig(rank=0)
  with pytest.raises(LoraJaxError, match="rank 40 is larger than layers/attn/k_proj allows"):
    init_lora(LoraConfig(rank=40, targets=("k_proj",)), CFG, PARAMS, key=jax.random.key(0))
  with pytest.raises(LoraJaxError, match="out of range"):
    init_lora(LoraConfig(layers_to_transform=(5,)), CFG, PARAMS, key=jax.random.key(0))


def test_smollm2_summary_matches_peft_numbers():
  smol = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                     num_heads=9, num_kv_heads=3, head_dim=64, tie_embeddings=True)
  params = jax.eval_shape(lambda: init_params(smol, key=jax.random.key(0)))
  cfg = LoraConfig(rank=8, alpha=16, targets=ALL)
  adapter = jax.eval_shape(lambda p: init_lora(cfg, smol, p, key=jax.random.key(0))[0], params)
  s = trainable_summary(cfg, smol, adapter)
  assert (s["trainable"], s["all"]) == (2_442_240, 136_957_248)
  assert s["text"] == "trainable params: 2,442,240 || all params: 136,957,248 || trainable%: 1.7832"


# optax's Adam bias correction computes `b1 ** count` (python float ** int32), which strict promotion rejects.
optax_promotion = pytest.mark.usefixtures("standard_promotion")


@optax_promotion
def test_gradients_and_optimizer_state_only_for_the_adapter():
  cfg = LoraConfig(rank=4, alpha=8, targets=ALL, use_dora=True)
  adapter, frozen = _random_adapter(cfg)

  def loss(adapter, frozen):
    logits = forward(apply_lora(cfg, CFG, frozen, adapter), CFG, TOKENS)
    return jnp.mean(jax.nn.logsumexp(logits, -1))
  grads = jax.grad(loss)(adapter, frozen)
  assert jax.tree.structure(grads) == jax.tree.structure(adapter)
  tx = lora_optimizer(1e-3, adapter, weight_decay=0.01)
  state = tx.init(adapter)
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(adapter))
  assert state_nbytes(state) <= 2 * adapter_bytes + 64  # Adam's mu and nu for the adapter, plus step counters
  updates, _ = tx.update(grads, state, adapter)
  assert jax.tree.structure(updates) == jax.tree.structure(adapter)


@optax_promotion
def test_lora_plus_scales_b_learning_rate():
  cfg = LoraConfig(rank=4, alpha=8, targets=("q_proj",))
  adapter, _ = _random_adapter(cfg)
  grads = jax.tree.map(jnp.ones_like, adapter)
  plain = lora_optimizer(1e-3, adapter)
  plus = lora_optimizer(1e-3, adapter, lora_plus_ratio=16.0)
  u1, _ = plain.update(grads, plain.init(adapter), adapter)
  u2, _ = plus.update(grads, plus.init(adapter), adapter)
  e1, e2 = u1["layers/attn/q_proj"], u2["layers/attn/q_proj"]
  assert_allclose(e2["lora_A"], e1["lora_A"], "f32_op")
  assert_allclose(e2["lora_B"], 16 * e1["lora_B"], "f32_op")


def test_dropout_only_with_key_and_changes_output():
  cfg = LoraConfig(rank=4, alpha=8, targets=ALL, dropout=0.5)
  adapter, frozen = _random_adapter(cfg)
  eval_out = fwd(apply_lora(cfg, CFG, frozen, adapter), CFG, TOKENS)
  merged = fwd(merge(cfg, CFG, frozen, adapter), CFG, TOKENS)
  assert_allclose(eval_out, merged, "f32_composite")
  train_out = forward(apply_lora(cfg, CFG, frozen, adapter, dropout_key=jax.random.key(0)), CFG, TOKENS)
  assert float(jnp.abs(train_out - eval_out).max()) > 1e-3
