"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) as pure functions over a parameter pytree.

Parameter tree (layers stacked along a leading axis of size ``num_layers``; kernels are (in, out))::

  embed/embedding                 [V, D]
  layers/attn_norm/scale          [L, D]
  layers/attn/{q,k,v}_proj/kernel [L, D, H*hd]     (+ bias [L, H*hd] for Qwen2)
  layers/attn/o_proj/kernel       [L, Hq*hd, D]
  layers/mlp_norm/scale           [L, D]
  layers/mlp/{gate,up}_proj/kernel [L, D, F]
  layers/mlp/down_proj/kernel     [L, F, D]
  final_norm/scale                [D]
  lm_head/kernel                  [D, V]           (absent when embeddings are tied)

Math, per layer (pre-norm):  h = x + Attn(RMSNorm(x));  y = h + W_down(silu(W_gate n) * W_up n), n = RMSNorm(h).
RMSNorm(x) = x / sqrt(mean(x²) + eps) * scale, computed in float32. RoPE uses the "rotate half" convention of
transformers (GGUF q/k rows are un-permuted at load time). Attention uses grouped-query heads and a softmax in
float32.

Attention masking is expressed with a key-value *slot* axis shared by training and generation: a query at slot
``q`` may attend to slot ``s`` iff ``s <= q``, the slot holds a real token (``kv_valid``) and, with a sliding
window, ``pos(q) - pos(s) < window``. Without a cache the slots are the input positions; with a cache they are
the cache entries, so the same function serves prefill, decode and full-sequence scoring.

Two layouts of ``layers`` run the same math:

* **stacked** (the default, above): layers run under `jax.lax.scan`, one compiled layer body regardless of depth,
  which keeps compile time flat (30 layers compile as fast as 2). Training and adapters use this layout.
* **per-layer** (``layers`` a tuple of L per-layer trees, made by `unstack_layers`): a Python loop, unrolled at
  trace time. Decoding is weight-bound, and inside a scan XLA copies each step's slice of every stacked weight
  before the dot (read, write, read again instead of one read). The layout ablation in
  `benchmarks/generate.py` times both layouts in one process (results/generate.json). `generate`'s CLI and
  `exact_match` use it; compile time grows with depth.

The KV cache follows the parameter layout (stacked [L, ...] or a tuple of per-layer arrays, see `KVCache`) and is
updated in place.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ..ops import linear
from ._config import ModelConfig

Params = dict


class KVCache(NamedTuple):
  """Key/value cache: ``k``/``v`` [L, B, Hkv, S, hd] (or, per layer, a tuple of L [B, Hkv, S, hd] arrays);
  ``valid`` [B, S] marks slots holding real tokens. Heads come before slots because that is the layout the
  attention products read: with slots first, XLA transposed the whole cache of every layer at every step.

  The cache follows the parameter layout: stacked for the scanned layers, per layer for `unstack_layers`
  parameters (there, updating one layer's slice of a stacked cache would copy the whole cache at every layer).
  `hidden_states` converts a cache of the other layout on entry (one copy).
  """

  k: Float[Array, "L B Hkv S hd"] | tuple
  v: Float[Array, "L B Hkv S hd"] | tuple
  valid: Bool[Array, "B S"]

  @classmethod
  def empty(cls, cfg: ModelConfig, batch: int, slots: int, dtype, *, per_layer: bool = False) -> "KVCache":
    if per_layer:
      shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
      zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
      return cls(zeros(), zeros(), jnp.zeros((batch, slots), bool))
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, slots), bool))


def rms_norm(x: Float[Array, "... D"], scale: Float[Array, "D"], eps: float) -> Float[Array, "... D"]:
  """RMSNorm in float32, cast back to the input dtype before the scale (as transformers does)."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * xf.astype(x.dtype)


def rope_angles(cfg: ModelConfig, positions: Int[Array, "B T"]) -> tuple[Array, Array]:
  """cos/sin tables [B, T, hd] for the given positions (float32)."""
  inv = jnp.asarray(cfg.inv_freq())
  freqs = positions.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Float[Array, "B T H hd"], cos: Array, sin: Array) -> Float[Array, "B T H hd"]:
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x.astype(jnp.float32) * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
  return out.astype(x.dtype)


def attention_mask(q_slots: Int[Array, "B T"], kv_valid: Bool[Array, "B S"], cfg: ModelConfig) -> Bool[Array, "B T S"]:
  """Which key slots each query may see: causal over slots, real tokens only, optional sliding window."""
  s = jnp.arange(kv_valid.shape[1])
  mask = (s[None, None, :] <= q_slots[:, :, None]) & kv_valid[:, None, :]
  if cfg.sliding_window is not None:
    kv_pos = jnp.cumsum(kv_valid, axis=1) - 1                             # position of the token in each slot
    q_pos = jnp.take_along_axis(kv_pos, jnp.clip(q_slots, 0, kv_valid.shape[1] - 1), axis=1)
    mask &= (q_pos[:, :, None] - kv_pos[:, None, :]) < cfg.sliding_window
  return mask


def causal_blocks(t: int) -> list[tuple[int, int]]:
  """Query blocks [start, end) for causal self-attention over `t` tokens: one block below 128 tokens, else
  `min(8, t // 64)` near-equal blocks. Block i needs only the keys [0, end_i); the keys after it are masked
  for every query in it, so their products are skipped (the upper triangle: up to ~45% of the work at 8 blocks).
  More blocks skip more but add code to compile per block (~0.3 s each for forward + backward); 64-token blocks
  and the cap of 8 were chosen from standalone forward + backward timings of one SmolLM2 layer's attention at
  4 x 256, 2 x 512 and 1 x 1024 tokens (README, "Performance"); the train step is `benchmarks/train_step.py`."""
  n = 1 if t < 128 else min(8, t // 64)
  edges = [round(i * t / n) for i in range(n + 1)]
  return list(zip(edges[:-1], edges[1:]))


def attention(q: Float[Array, "B T Hq hd"], k: Float[Array, "B Hkv S hd"], v: Float[Array, "B Hkv S hd"],
              mask: Bool[Array, "B T S"], *, causal: bool = False) -> Float[Array, "B T Hq hd"]:
  """Grouped-query softmax attention; scores and softmax in float32.

  The scores are laid out [B, Hkv, T, G, S] (G = Hq / Hkv query heads per key head), which keeps T next to B
  as q has it: XLA on CPU then needs no transpose of q, the scores or the output around the batched dots
  (forward + backward of one SmolLM2 layer at 4 x 256 tokens ≈20% faster than [B, Hkv, G, T, S]).

  causal: `k`/`v` are the queries' own sequence (slot i holds query i; no cache), so `mask` hides every slot
  after the query. The queries are then taken in `causal_blocks`, each against only the keys up to its last
  query. A query that sees at least one key gets the same result as the full product up to summation order
  (the skipped keys have probability exactly 0 there); a query that sees none (left padding) attends uniformly
  to the keys of its block instead of to all keys: an unspecified value either way, which callers discard.

  A single query per row (a decode step) takes the products as multiply-reduce: XLA on CPU fuses those with
  the cache reads, where the batched dots made it transpose each layer's V cache at every step (measured in
  `benchmarks/generate.py`: batch-1 decode ≈10% faster). Same math, other summation order.
  """
  b, t, hq, hd = q.shape
  hkv = k.shape[1]
  qg = q.reshape(b, t, hkv, hq // hkv, hd)
  if t == 1:
    qf = qg[:, 0, :, :, None, :].astype(jnp.float32)                         # [B, Hkv, G, 1, hd]
    scores = jnp.sum(qf * k[:, :, None].astype(jnp.float32), axis=-1)[:, :, None]  # [B, Hkv, 1, G, S]
    scores = jnp.where(mask[:, None, :, None], scores / np.sqrt(hd), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    pf = probs[:, :, 0, :, :, None].astype(jnp.float32)                      # [B, Hkv, G, S, 1]
    out = jnp.sum(pf * v[:, :, None].astype(jnp.float32), axis=-2)[:, None]  # [B, 1, Hkv, G, hd]
    return out.reshape(b, t, hq, hd).astype(q.dtype)
  # products of 16-bit floats are exact in float32, so widening first is the same math; XLA:CPU has no
  # bf16 x bf16 -> f32 dot for some of these layouts ("Unsupported element type for DotThunk")
  qg, k32, v32 = qg.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
  outs = []
  for start, end in causal_blocks(t) if causal else [(0, t)]:
    stop = end if causal else k.shape[2]                                     # keys this block can see
    scores = jnp.einsum("btkgd,bksd->bktgs", qg[:, start:end], k32[:, :, :stop])  # [B, Hkv, Tb, G, Sb]
    scores = jnp.where(mask[:, None, start:end, None, :stop], scores / np.sqrt(hd), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).astype(jnp.float32)
    outs.append(jnp.einsum("bktgs,bksd->btkgd", probs, v32[:, :, :stop]))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
  return out.reshape(b, t, hq, hd).astype(q.dtype)


def _proj(p: Params, name: str, x):
  node = p[name]
  return linear(x, node["kernel"], node.get("bias"))


def layer(cfg: ModelConfig, p: Params, x: Float[Array, "B T D"], cos, sin, k_all, v_all, write_slot, mask):
  """One decoder block. Writes this step's k/v at `write_slot` into the layer's cache ``k_all``/``v_all``
  [B, Hkv, S, hd] and attends over it. Returns (new x, new k_all, new v_all)."""
  b, t, _ = x.shape
  n = rms_norm(x, p["attn_norm"]["scale"], cfg.rms_norm_eps)
  a = p["attn"]
  q = _proj(a, "q_proj", n).reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = _proj(a, "k_proj", n).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = _proj(a, "v_proj", n).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, hd], the cache layout
  causal = k_all is None
  if causal:  # no cache: the keys are this sequence
    k_all, v_all = k, v
  else:
    k_all = jax.lax.dynamic_update_slice_in_dim(k_all, k.astype(k_all.dtype), write_slot, axis=2)
    v_all = jax.lax.dynamic_update_slice_in_dim(v_all, v.astype(v_all.dtype), write_slot, axis=2)
  o = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, causal=causal)
  x = x + _proj(a, "o_proj", o.reshape(b, t, cfg.q_size))
  n = rms_norm(x, p["mlp_norm"]["scale"], cfg.rms_norm_eps)
  m = p["mlp"]
  hidden = jax.nn.silu(_proj(m, "gate_proj", n)) * _proj(m, "up_proj", n)
  x = x + _proj(m, "down_proj", hidden)
  return x, k_all, v_all


def hidden_states(params: Params, cfg: ModelConfig, tokens: Int[Array, "B T"], *,
                  valid: Bool[Array, "B T"] | None = None, positions: Int[Array, "B T"] | None = None,
                  cache: KVCache | None = None, write_slot: Int[Array, ""] | int = 0,
                  segment_ids: Int[Array, "B T"] | None = None, dtype=None, remat: bool | str = False,
                  virtual_tokens: Float[Array, "n D"] | None = None, kv_prefix: tuple | None = None) -> tuple[Float[Array, "B T D"], KVCache | None]:
  """Final-norm hidden states for `tokens`.

  Args:
    tokens: token ids; padding entries are marked False in `valid`.
    valid: which entries are real tokens (default: all). Left padding is the generation convention.
    positions: rotary positions (default: count of real tokens before each entry, as transformers derives
      ``position_ids`` from the attention mask).
    cache: when given, k/v of these tokens are written at slots ``write_slot + [0, T)`` and attention runs
      over the whole cache; the updated cache is returned, in the layout of `params` (`match_cache_layout`).
    dtype: compute dtype (default: the embedding dtype).
    segment_ids: for packed rows (no cache): tokens attend only within their own segment; pass `positions`
      restarting at each segment.
    remat: what each layer keeps for the backward pass (`REMAT`): ``"none"``/False keeps every activation,
      ``"dots"`` keeps only the projection matmul outputs and recomputes the rest (attention scores and
      probabilities, norms, RoPE, SwiGLU) from them, ``"full"``/True keeps only the layer input.
    virtual_tokens: embeddings [n, D] prepended to every row (prompt tuning / P-tuning); they take positions
      0..n-1 and the returned hidden states cover only `tokens`.
    kv_prefix: per-layer keys and values ([L, n, Hkv, hd] each) every token attends to first (prefix tuning);
      placed in cache slots 0..n-1 (a cache is created when none is given).
  """
  b, t = tokens.shape
  if valid is None:
    valid = jnp.ones((b, t), bool)
  embed = params["embed"]["embedding"]
  dtype = dtype or embed.dtype
  x = embed[tokens].astype(dtype)
  n_virtual = 0
  if virtual_tokens is not None:
    if segment_ids is not None or positions is not None:
      raise ValueError("virtual tokens need unpacked rows (no segment_ids / explicit positions)")
    n_virtual = virtual_tokens.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(virtual_tokens.astype(dtype), (b, *virtual_tokens.shape)), x], axis=1)
    valid = jnp.concatenate([jnp.ones((b, n_virtual), bool), valid], axis=1)
    t = t + n_virtual
  if kv_prefix is not None and cache is None:
    if segment_ids is not None or positions is not None:
      raise ValueError("a kv prefix needs unpacked rows (no segment_ids / explicit positions)")
    cache = prefix_cache(cfg, kv_prefix, b, kv_prefix[0].shape[1] + t, dtype, per_layer=is_unstacked(params))
    write_slot = kv_prefix[0].shape[1]
  if cache is None:
    kv_valid, q_slots = valid, jnp.broadcast_to(jnp.arange(t), (b, t))
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  else:
    kv_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, write_slot, axis=1)
    q_slots = jnp.broadcast_to(write_slot + jnp.arange(t), (b, t))
    if positions is None:
      before = jnp.sum(cache.valid & (jnp.arange(cache.valid.shape[1]) < write_slot), axis=1, keepdims=True)
      positions = jnp.maximum(before + jnp.cumsum(valid, axis=1) - 1, 0)
  cos, sin = rope_angles(cfg, positions)
  mask = attention_mask(q_slots, kv_valid, cfg)
  if segment_ids is not None:
    if cache is not None:
      raise ValueError("segment_ids (packed rows) are for full-sequence calls, not for cached decoding")
    mask &= segment_ids[:, :, None] == segment_ids[:, None, :]

  # one layer under the rematerialisation policy; both layouts run exactly this
  one = _remat(lambda p, x, k, v: layer(cfg, p, x, cos, sin, k, v, write_slot, mask), remat)

  def body(carry, p):
    x, i, ks, vs = carry
    if ks is None:
      x, _, _ = one(p, x, None, None)
    else:
      x, k_new, v_new = one(p, x, ks[i], vs[i])
      ks = jax.lax.dynamic_update_index_in_dim(ks, k_new, i, axis=0)
      vs = jax.lax.dynamic_update_index_in_dim(vs, v_new, i, axis=0)
    return (x, i + 1, ks, vs), None

  ks, vs = (None, None) if cache is None else (cache.k, cache.v)
  if cache is not None:
    ks, vs = _cache_arrays(ks, is_unstacked(params)), _cache_arrays(vs, is_unstacked(params))
  if is_unstacked(params):
    ks, vs = (None, None) if ks is None else (list(ks), list(vs))
    for i, p in enumerate(params["layers"]):
      if ks is None:
        x, _, _ = one(p, x, None, None)
      else:
        x, ks[i], vs[i] = one(p, x, ks[i], vs[i])
    ks, vs = (None, None) if ks is None else (tuple(ks), tuple(vs))
  else:
    (x, _, ks, vs), _ = jax.lax.scan(body, (x, jnp.int32(0), ks, vs), params["layers"])
  x = rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps)
  new_cache = None if cache is None else KVCache(ks, vs, kv_valid)
  return x[:, n_virtual:], new_cache


REMAT = ("none", "dots", "full")


def _remat(body, remat: bool | str):
  """The layer body under the rematerialisation policy `remat` (see `hidden_states`).

  ``"dots"`` (what `train.remat: auto` picks for a float base) is
  `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`: the projection outputs are saved, the batched attention products and every elementwise op are recomputed. On the SmolLM2
  LoRA step (4x256 tokens) it cuts XLA's temporary memory from 2476 to 1616 MiB and peak RSS by about 0.8 GiB
  at no measurable cost in step time (the recomputed ops are cheap next to the saved matmuls).
  """
  mode = ("full" if remat else "none") if isinstance(remat, bool) else remat
  if mode not in REMAT:
    raise ValueError(f"remat must be one of {REMAT} (or a bool), got {remat!r}")
  if mode == "none":
    return body
  if mode == "full":
    return jax.checkpoint(body)
  return jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def _cache_arrays(c, per_layer: bool):
  """One cache array (k or v) in the wanted layout: stacked [L, ...] or a tuple of L arrays (one copy if not)."""
  if per_layer:
    return tuple(c) if isinstance(c, (tuple, list)) else tuple(jnp.unstack(c))
  return jnp.stack(c) if isinstance(c, (tuple, list)) else c


def match_cache_layout(params: Params, cache: KVCache) -> KVCache:
  """`cache` in the layout `hidden_states` returns for `params` (a loop carrying the cache needs it on entry)."""
  per_layer = is_unstacked(params)
  return KVCache(_cache_arrays(cache.k, per_layer), _cache_arrays(cache.v, per_layer), cache.valid)


def is_unstacked(params: Params) -> bool:
  """True when ``params["layers"]`` is a tuple of per-layer trees (see `unstack_layers`)."""
  return isinstance(params["layers"], (tuple, list))


def unstack_layers(params: Params) -> Params:
  """The per-layer layout: ``layers`` becomes a tuple of L trees, each leaf the layer's slice of the stacked one.

  Works for any node in the tree (LoRA, IA3, quantized weights): every leaf is sliced along its leading layer
  axis. The slices are copies, so drop the stacked tree afterwards
  (`lora_jax.io.Model.unstack_layers` does that one leaf at a time to keep peak memory low).
  """
  if is_unstacked(params):
    return params
  leaves, treedef = jax.tree.flatten(params["layers"])
  return {**params, "layers": split_layer_leaves(leaves, treedef)}


def split_layer_leaves(leaves: list, treedef) -> tuple:
  """Per-layer trees from the flattened stacked ``layers`` tree. Empties `leaves` as it goes, so a caller that
  holds no other reference frees each stacked array as soon as it is split."""
  n = _num_layers(leaves)
  per_leaf = []
  for j in range(len(leaves)):
    per_leaf.append(_split(leaves[j], n))
    leaves[j] = None
  return tuple(treedef.unflatten([pl[i] for pl in per_leaf]) for i in range(n))


def stack_layers(params: Params) -> Params:
  """Inverse of `unstack_layers`: the stacked (scan) layout that training and adapters use."""
  if not is_unstacked(params):
    return params
  layers = params["layers"]
  leaves = [jax.tree.leaves(t) for t in layers]
  treedef = jax.tree.structure(layers[0])
  stacked = [jnp.stack(xs) for xs in zip(*leaves)]
  return {**params, "layers": treedef.unflatten(stacked)}


def _num_layers(leaves) -> int:
  if any(not np.ndim(a) for a in leaves):
    raise ValueError("every leaf of a stacked layers tree needs a leading layer axis (as lax.scan does)")
  sizes = {a.shape[0] for a in leaves}
  if len(sizes) != 1:
    raise ValueError(f"stacked layer leaves disagree on the layer count: {sorted(sizes)}")
  return sizes.pop()


def _split(a, n: int):
  if isinstance(a, np.ndarray):
    return [a[i] for i in range(n)]  # views; the caller decides when to copy to device
  if a.devices() == {jax.devices("cpu")[0]} and not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
    host = np.asarray(a)  # a zero-copy view of the CPU buffer: slicing needs no compiled op per shape
    return [jnp.array(host[i]) for i in range(n)]
  return list(jnp.unstack(a))


def prefix_cache(cfg: ModelConfig, kv_prefix, batch: int, slots: int, dtype, *, per_layer: bool = False) -> KVCache:
  """A cache of `slots` entries whose first n hold the prefix keys/values (prefix tuning)."""
  k, v = kv_prefix
  n = k.shape[1]
  cache = KVCache.empty(cfg, batch, slots, dtype)
  def put(c, p):  # p [L, n, Hkv, hd] -> slots 0..n-1 of c [L, B, Hkv, S, hd]
    p = p.transpose(0, 2, 1, 3)[:, None].astype(dtype)
    return jax.lax.dynamic_update_slice_in_dim(c, jnp.broadcast_to(p, (cfg.num_layers, batch, *p.shape[2:])), 0,
                                               axis=3)
  k, v = put(cache.k, k), put(cache.v, v)
  if per_layer:
    k, v = tuple(jnp.unstack(k)), tuple(jnp.unstack(v))
  return KVCache(k, v, cache.valid.at[:, :n].set(True))


def logits(params: Params, cfg: ModelConfig, h: Float[Array, "... D"]) -> Float[Array, "... V"]:
  """Float32 logits from final hidden states. A tied embedding [V, D] is contracted on D as stored (a
  transposed copy would be materialised on every decode step)."""
  if cfg.tie_embeddings:
    e = params["embed"]["embedding"]
    return jnp.einsum("...d,vd->...v", h, e.astype(h.dtype), preferred_element_type=jnp.float32)
  w = params["lm_head"]["kernel"]
  return jnp.einsum("...d,dv->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def forward(params: Params, cfg: ModelConfig, tokens: Int[Array, "B T"], **kwargs) -> Float[Array, "B T V"]:
  """Logits for every position (no cache). Keyword arguments as in `hidden_states`."""
  h, _ = hidden_states(params, cfg, tokens, **kwargs)
  return logits(params, cfg, h)


def init_params(cfg: ModelConfig, *, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
  """Random parameters (normal(0, std) matrices, unit norms): for tests and shape tracing."""
  L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
  shapes = {
      "q_proj": (L, D, cfg.q_size), "k_proj": (L, D, cfg.kv_size), "v_proj": (L, D, cfg.kv_size),
      "o_proj": (L, cfg.q_size, D), "gate_proj": (L, D, F), "up_proj": (L, D, F), "down_proj": (L, F, D)}
  keys = iter(jax.random.split(key, 16))
  mat = lambda shape: (std * jax.random.normal(next(keys), shape)).astype(dtype)
  attn = {n: {"kernel": mat(shapes[n])} for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
  if cfg.attention_bias:
    for n in ("q_proj", "k_proj", "v_proj"):
      attn[n]["bias"] = mat(shapes[n][:1] + shapes[n][2:])
  params = {
      "embed": {"embedding": mat((cfg.vocab_size, D))},
      "layers": {
          "attn_norm": {"scale": jnp.ones((L, D), dtype)},
          "attn": attn,
          "mlp_norm": {"scale": jnp.ones((L, D), dtype)},
          "mlp": {n: {"kernel": mat(shapes[n])} for n in ("gate_proj", "up_proj", "down_proj")},
      },
      "final_norm": {"scale": jnp.ones((D,), dtype)},
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": mat((D, cfg.vocab_size))}
  return params
