"""Each layer of the Llama forward against a float64 numpy reference, and cache/padding invariants."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models import KVCache, ModelConfig, forward, init_params
from lora_jax.models import _llama as L
from lora_jax.testing import assert_allclose, assert_trees_all_close, assert_trees_all_equal

TINY = ModelConfig(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                   max_position_embeddings=128)


# ---------------------------------------------------------------- float64 numpy reference
def ref_rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def ref_rope(x, pos, cfg):
  inv = cfg.inv_freq().astype(np.float64)
  ang = pos[..., None].astype(np.float64) * inv
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  half = x.shape[-1] // 2
  rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * cos[:, :, None] + rot * sin[:, :, None]


def ref_attention(q, k, v, mask):
  b, t, hq, hd = q.shape
  rep = hq // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
  s = np.where(mask[:, None], s, -np.inf)
  s = s - s.max(-1, keepdims=True)
  p = np.exp(s)
  p = p / p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def ref_forward(params, cfg, tokens, valid):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b, t = tokens.shape
  pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
  causal = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
  if cfg.sliding_window:
    causal &= (pos[:, :, None] - pos[:, None, :]) < cfg.sliding_window
  causal |= ~valid[:, :, None] & np.eye(t, dtype=bool)[None]  # padding queries: see themselves (ignored later)
  x = p["embed"]["embedding"][tokens]
  lay = p["layers"]
  for i in range(cfg.num_layers):
    g = lambda *ks: _get(lay, ks)[i]
    n = ref_rms(x, g("attn_norm", "scale"), cfg.rms_norm_eps)
    def proj(name, h):
      y = h @ g("attn", name, "kernel")
      return y + g("attn", name, "bias") if "bias" in lay["attn"][name] else y
    q = proj("q_proj", n).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = proj("k_proj", n).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = proj("v_proj", n).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    o = ref_attention(ref_rope(q, pos, cfg), ref_rope(k, pos, cfg), v, causal)
    x = x + o.reshape(b, t, -1) @ g("attn", "o_proj", "kernel")
    n = ref_rms(x, g("mlp_norm", "scale"), cfg.rms_norm_eps)
    gate = n @ g("mlp", "gate_proj", "kernel")
    x = x + (gate / (1 + np.exp(-gate)) * (n @ g("mlp", "up_proj", "kernel"))) @ g("mlp", "down_proj", "kernel")
  x = ref_rms(x, p["final_norm"]["scale"], cfg.rms_norm_eps)
  w = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
  return x @ w


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


# ---------------------------------------------------------------- single ops
def test_rms_norm_matches_reference():
  x = np.random.default_rng(0).normal(size=(3, 5, 32)).astype(np.float32)
  w = np.random.default_rng(1).normal(size=(32,)).astype(np.float32)
  got = jax.jit(lambda x, w: L.rms_norm(x, w, 1e-6))(x, w)
  assert got.dtype == jnp.float32
  assert_allclose(got, ref_rms(x.astype(np.float64), w.astype(np.float64), 1e-6), "f32_op")


@pytest.mark.parametrize("rope", [("default", ()), ("linear", (("factor", 4.0),)),
                                  ("llama3", (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                              ("original_max_position_embeddings", 16.0)))], ids=lambda r: r[0])
def test_rope_matches_reference(rope):
  cfg = dataclasses.replace(TINY, rope_type=rope[0], rope_scaling=rope[1], rope_theta=500000.0)
  x = np.random.default_rng(0).normal(size=(2, 7, 4, 8)).astype(np.float32)
  pos = np.array([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 30, 100]], np.int32)
  got = jax.jit(lambda x, p: L.apply_rope(x, *L.rope_angles(cfg, p)))(x, pos)
  assert_allclose(got, ref_rope(x.astype(np.float64), pos, cfg), "f32_op")


def test_llama3_inv_freq_scales_only_low_frequencies():
  cfg = dataclasses.replace(TINY, head_dim=64, rope_type="llama3", rope_theta=500000.0, rope_scaling=(
      ("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
      ("original_max_position_embeddings", 8192.0)))
  base = dataclasses.replace(cfg, rope_type="default", rope_scaling=()).inv_freq()
  scaled = cfg.inv_freq()
  assert scaled[0] == base[0]                      # highest frequency untouched
  np.testing.assert_allclose(scaled[-1], base[-1] / 8, rtol=1e-6)  # lowest divided by the factor


@pytest.mark.parametrize("t", [5, 1], ids=["sequence", "one_query"])  # one query per row: the decode path
def test_attention_matches_reference_gqa_and_mask(t):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, t, 4, 8)).astype(np.float32)
  k = rng.normal(size=(2, 6, 2, 8)).astype(np.float32)
  v = rng.normal(size=(2, 6, 2, 8)).astype(np.float32)
  mask = rng.random((2, t, 6)) < 0.7
  mask[..., 0] = True
  heads_first = lambda a: a.transpose(0, 2, 1, 3)  # the cache layout [B, Hkv, S, hd]
  got = jax.jit(L.attention)(q, heads_first(k), heads_first(v), mask)
  assert_allclose(got, ref_attention(*(a.astype(np.float64) for a in (q, k, v)), mask), "f32_op")


@pytest.mark.parametrize("t", [1, 64, 127, 128, 200, 513, 2048])
def test_causal_blocks_tile_the_sequence(t):
  blocks = L.causal_blocks(t)
  assert blocks[0][0] == 0 and blocks[-1][1] == t
  assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))               # contiguous, no overlap
  assert len(blocks) == (1 if t < 128 else min(8, t // 64))
  assert max(e - s for s, e in blocks) - min(e - s for s, e in blocks) <= 1  # near-equal


@pytest.mark.parametrize("t", [130, 256, 513])
def test_causal_blocks_attention_matches_reference_and_full_product(t):
  """Causal self-attention in blocks against the float64 reference and against the unblocked product, value and
  gradient, under a mask that is any subset of the causal one: packed segments, right padding, a window."""
  rng = np.random.default_rng(t)
  b, hq, hkv, hd = 2, 4, 2, 8
  q = rng.normal(size=(b, t, hq, hd)).astype(np.float32)
  k, v = (rng.normal(size=(b, t, hkv, hd)).astype(np.float32) for _ in range(2))
  seg = np.stack([np.repeat([1, 2, 3], [t // 3, t // 2, t - t // 3 - t // 2]), np.ones(t, int)])
  valid = np.ones((b, t), bool)
  valid[1, t - 17:] = False                                                    # right padding
  slot = np.arange(t)
  mask = (slot[None, :, None] >= slot[None, None, :]) & valid[:, None, :] & (seg[:, :, None] == seg[:, None, :])
  mask[1] &= (slot[:, None] - slot[None, :]) < 100                             # a sliding window on row 1
  assert mask[:, np.arange(t), np.arange(t)][valid].all()                     # every real query sees a key
  heads_first = lambda a: jnp.asarray(a).transpose(0, 2, 1, 3)
  blocked = jax.jit(lambda q, k, v: L.attention(q, heads_first(k), heads_first(v), mask, causal=True))
  full = jax.jit(lambda q, k, v: L.attention(q, heads_first(k), heads_first(v), mask))
  got = np.asarray(blocked(q, k, v))
  assert_allclose(got[valid], ref_attention(*(a.astype(np.float64) for a in (q, k, v)), mask)[valid], "f32_op")
  assert_allclose(got[valid], np.asarray(full(q, k, v))[valid], "f32_op")
  w = rng.normal(size=q.shape).astype(np.float32) * valid[:, :, None, None]   # the loss ignores padded rows
  grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
  assert_trees_all_close(grad(blocked), grad(full), "f32_composite")


def test_long_sequence_forward_matches_float64_reference():
  """A sequence long enough for `causal_blocks` to split it (160 tokens: two blocks), padded on the right."""
  cfg = dataclasses.replace(TINY, max_position_embeddings=256)
  params = init_params(cfg, key=jax.random.key(0), std=0.2)
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 160)).astype(np.int32)
  valid = np.ones((2, 160), bool)
  valid[1, 150:] = False
  got = jax.jit(forward, static_argnums=1)(params, cfg, tokens, valid=valid)
  assert_allclose(np.asarray(got)[valid], ref_forward(params, cfg, tokens, valid)[valid], "f32_composite")


# ---------------------------------------------------------------- whole model
LAYOUTS = {"stacked": lambda p: p, "per_layer": L.unstack_layers}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["llama", "tied", "qwen2_bias", "sliding_window"])
def test_forward_matches_float64_reference(variant, layout):
  cfg = {"llama": TINY, "tied": dataclasses.replace(TINY, tie_embeddings=True),
         "qwen2_bias": dataclasses.replace(TINY, architecture="qwen2", attention_bias=True),
         "sliding_window": dataclasses.replace(TINY, architecture="mistral", sliding_window=3)}[variant]
  params = init_params(cfg, key=jax.random.key(0), std=0.2)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
  valid = np.ones((2, 9), bool)
  valid[1, :3] = False  # left padding
  got = jax.jit(forward, static_argnums=1)(LAYOUTS[layout](params), cfg, tokens, valid=valid)
  want = ref_forward(params, cfg, tokens, valid)
  assert_allclose(np.asarray(got)[valid], want[valid], "f32_composite")


def test_left_padding_does_not_change_logits():
  params = init_params(TINY, key=jax.random.key(0), std=0.2)
  ids = np.array([[5, 6, 7, 8]], np.int32)
  padded = np.array([[0, 0, 0, 5, 6, 7, 8]], np.int32)
  valid = padded != 0
  f = jax.jit(forward, static_argnums=1)
  assert_allclose(f(params, TINY, padded, valid=valid)[:, 3:], f(params, TINY, ids), "f32_composite")


@pytest.mark.parametrize("cache_layout", ["stacked", "per_layer"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("window", [None, 3])
def test_cached_decode_matches_full_forward(window, layout, cache_layout):
  """Any parameter layout with any cache layout (a cache of the other layout is converted on entry)."""
  cfg = dataclasses.replace(TINY, sliding_window=window, architecture="mistral" if window else "llama")
  stacked = init_params(cfg, key=jax.random.key(0), std=0.2)
  params = LAYOUTS[layout](stacked)
  tokens = np.random.default_rng(2).integers(1, cfg.vocab_size, (2, 10)).astype(np.int32)
  valid = np.ones((2, 10), bool)
  valid[0, :2] = False
  full = jax.jit(forward, static_argnums=1)(stacked, cfg, tokens, valid=valid)
  cache = KVCache.empty(cfg, 2, 16, jnp.float32, per_layer=cache_layout == "per_layer")
  h, cache = L.hidden_states(params, cfg, tokens[:, :6], valid=valid[:, :6], cache=cache, write_slot=0)
  steps = [L.logits(params, cfg, h)]
  for i in range(6, 10):
    h, cache = L.hidden_states(params, cfg, tokens[:, i:i + 1], valid=valid[:, i:i + 1], cache=cache, write_slot=i)
    steps.append(L.logits(params, cfg, h))
  got = np.concatenate([np.asarray(s) for s in steps], axis=1)
  assert_allclose(got[valid], np.asarray(full)[valid], "f32_composite")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_applies_in_both_layouts_and_changes_no_gradient(remat, layout):
  params = LAYOUTS[layout](init_params(TINY, key=jax.random.key(0), std=0.2))
  tokens = np.arange(1, 9, dtype=np.int32)[None]
  f = lambda p, r: jnp.sum(jnp.tanh(L.hidden_states(p, TINY, tokens, remat=r)[0]))
  has_remat = lambda r: re.search(r"\b(remat2?|checkpoint)\[", str(jax.make_jaxpr(f, static_argnums=1)(params, r)))
  assert has_remat(remat) and not has_remat("none")
  assert_trees_all_close(jax.grad(f)(params, remat), jax.grad(f)(params, "none"), "f32_composite")


def test_unstack_stack_round_trip_for_every_node_type():
  """Plain kernels, LoRA (with dropout keys) and quantized nodes: each leaf is the layer's slice, and stacking
  back gives the identical tree."""
  from lora_jax.peft import LoraConfig
  from lora_jax.quant import quantize_params
  params = quantize_params(init_params(TINY, key=jax.random.key(0), std=0.2), "nf4", block_size=16,
                           double_quant=True)
  lcfg = LoraConfig(rank=2, targets=("all-linear",), dropout=0.1)
  adapter, params = lcfg.init_adapter(TINY, params, key=jax.random.key(1))
  tree = lcfg.apply(TINY, params, adapter, dropout_key=jax.random.key(2))
  per_layer = L.unstack_layers(tree)
  assert L.is_unstacked(per_layer) and len(per_layer["layers"]) == TINY.num_layers
  for i, layer_tree in enumerate(per_layer["layers"]):
    want = jax.tree.map(lambda a: a[i] if np.ndim(a) else a, tree["layers"])
    assert_trees_all_equal(layer_tree, want)
  assert_trees_all_equal(L.stack_layers(per_layer), tree)
  assert L.unstack_layers(per_layer) is per_layer and L.stack_layers(tree) is tree


def test_model_unstack_layers_in_place(tiny_folder):
  from lora_jax import load_model
  model = load_model(tiny_folder)
  tokens = np.arange(1, 9, dtype=np.int32)[None]
  before = forward(model.params, model.config, tokens)
  assert model.unstack_layers() is model and L.is_unstacked(model.params)
  assert_allclose(forward(model.params, model.config, tokens), before, "f32_composite")


@pytest.mark.parametrize("t", [70, 1], ids=["sequence", "one_query"])
def test_attention_bf16_inputs(t):
  # shapes where XLA:CPU has no bf16 x bf16 -> f32 dot for the attention products (it raised UNIMPLEMENTED)
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((3, t, 9, 64), (3, 70, 3, 64), (3, 70, 3, 64)))
  mask = np.tril(np.ones((70, 70), bool))[-t:][None].repeat(3, 0)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  got = jax.jit(L.attention)(bf(q), bf(k).transpose(0, 2, 1, 3), bf(v).transpose(0, 2, 1, 3), mask)
  assert got.dtype == jnp.bfloat16
  exact = lambda a: np.asarray(bf(a).astype(jnp.float32), np.float64)  # the reference sees the same rounded inputs
  assert_allclose(got.astype(jnp.float32), ref_attention(exact(q), exact(k), exact(v), mask), "bf16")


def test_bf16_forward_close_to_f32():
  params = init_params(TINY, key=jax.random.key(0), std=0.2)
  tokens = np.arange(1, 9, dtype=np.int32)[None]
  f = jax.jit(forward, static_argnums=1)
  low = f(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), TINY, tokens)
  assert low.dtype == jnp.float32
  ref = f(params, TINY, tokens)
  # compare softmax probabilities: bf16 logits differ by O(eps * |logit|)
  assert_allclose(jax.nn.softmax(low), jax.nn.softmax(ref), "bf16")


def test_param_count_matches_config():
  for cfg in (TINY, dataclasses.replace(TINY, tie_embeddings=True, attention_bias=True)):
    params = init_params(cfg, key=jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_parameters()
