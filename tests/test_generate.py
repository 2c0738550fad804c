"""Generation: batching with left padding, sampling determinism, stops, context limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import LoraJaxError
from lora_jax.generate import SamplingConfig, generate, generate_ids, greedy_token, sample_token
from lora_jax.models import ModelConfig, init_params, unstack_layers

CFG = ModelConfig(architecture="llama", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=96)
PARAMS = init_params(CFG, key=jax.random.key(1), std=0.3)


def test_batched_left_padded_equals_one_by_one():
  prompts = [[3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24], [30]]
  batched = generate_ids(PARAMS, CFG, prompts, max_new_tokens=20, chunk=8)
  single = [generate_ids(PARAMS, CFG, [p], max_new_tokens=20)[0] for p in prompts]
  assert batched == single
  assert all(len(ids) == 20 and reason == "length" for ids, reason in batched)


@pytest.mark.parametrize("extra", ["none", "virtual_tokens", "kv_prefix"])
def test_per_layer_layout_generates_the_same_tokens(extra):
  """`unstack_layers` (the fast decode layout) changes no token, with prompt-tuning or prefix-tuning inputs too."""
  rng = np.random.default_rng(0)
  kw = {}
  if extra == "virtual_tokens":
    kw["virtual_tokens"] = jnp.asarray(rng.normal(size=(3, CFG.hidden_size)), jnp.float32)
  elif extra == "kv_prefix":
    shape = (CFG.num_layers, 4, CFG.num_kv_heads, CFG.head_dim)
    kw["kv_prefix"] = tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
  prompts = [[3, 4, 5], [7, 8, 9, 10, 11, 12], [30]]
  want = generate_ids(PARAMS, CFG, prompts, max_new_tokens=16, chunk=8, **kw)
  assert generate_ids(unstack_layers(PARAMS), CFG, prompts, max_new_tokens=16, chunk=8, **kw) == want


def test_decode_chunk_takes_a_cache_of_either_layout():
  """A stacked cache handed to per-layer parameters (or the reverse) is converted before the decode loop."""
  from lora_jax.generate import decode_chunk, prefill
  from lora_jax.models import KVCache
  toks, valid = jnp.asarray([[3, 4, 5, 6]], jnp.int32), jnp.ones((1, 4), bool)

  def run(params, per_layer_cache):  # a fresh cache each time: decode_chunk donates it
    last, cache = prefill(PARAMS, CFG, toks, valid, KVCache.empty(CFG, 1, 16, jnp.float32))
    if per_layer_cache:
      cache = cache._replace(k=tuple(cache.k), v=tuple(cache.v))
    out = decode_chunk(params, CFG, cache, last, jnp.zeros((1,), bool), jnp.int32(4), jnp.int32(6),
                       jax.random.key(0), steps=6, sampling=SamplingConfig(), eos=())
    return np.asarray(out[0])

  want = run(PARAMS, False)
  np.testing.assert_array_equal(run(PARAMS, True), want)
  np.testing.assert_array_equal(run(unstack_layers(PARAMS), False), want)


def test_eos_stops_only_that_row():
  prompts = [[3, 4, 5], [9, 9]]
  free = generate_ids(PARAMS, CFG, prompts, max_new_tokens=12)
  eos = free[0][0][4]  # the 5th greedy token of row 0 becomes "EOS"
  stopped = generate_ids(PARAMS, CFG, prompts, max_new_tokens=12, eos=(eos,))
  assert stopped[0] == (free[0][0][:free[0][0].index(eos)], "eos")
  row1 = free[1][0]
  want = row1[:row1.index(eos)] if eos in row1 else row1
  assert stopped[1][0] == want


def test_sampling_is_deterministic_per_seed():
  s = SamplingConfig(temperature=1.5, top_p=0.95)
  a = generate_ids(PARAMS, CFG, [[3, 4]], max_new_tokens=24, sampling=s, seed=7)
  b = generate_ids(PARAMS, CFG, [[3, 4]], max_new_tokens=24, sampling=s, seed=7)
  c = generate_ids(PARAMS, CFG, [[3, 4]], max_new_tokens=24, sampling=s, seed=8)
  assert a == b and a != c


def test_greedy_token_is_argmax_ties_and_nan_included():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 97)).astype(np.float32)
  logits[1, [5, 40]] = logits[1].max() + 1       # a tie: the first one wins
  logits[2, [7, 60]] = np.nan                    # NaN: the first NaN, as jnp.argmax
  logits[3] = -np.inf
  logits[4, 96] = np.inf
  got = jax.jit(greedy_token)(logits)
  np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(logits), axis=-1))
  assert got.dtype == jnp.int32 and list(np.asarray(got)[1:3]) == [5, 7]


def test_tiny_top_p_is_greedy():
  logits = jax.random.normal(jax.random.key(0), (4, 50))
  got = sample_token(logits, jax.random.key(1), SamplingConfig(temperature=1.0, top_p=1e-6))
  np.testing.assert_array_equal(got, np.argmax(logits, -1))


def test_tiny_temperature_is_greedy():
  """A positive temperature too small for logits / T (inf, then NaN probabilities: garbage tokens) is greedy."""
  logits = jax.random.normal(jax.random.key(0), (4, 50)) * 10
  for t in (1e-30, 1e-40, 1e-45):
    for top_p in (1.0, 0.5):
      got = sample_token(logits, jax.random.key(1), SamplingConfig(temperature=t, top_p=top_p))
      np.testing.assert_array_equal(got, np.argmax(logits, -1))


def test_top_p_samples_only_from_nucleus():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  keys = jax.random.split(jax.random.key(0), 400)
  draws = np.array([int(sample_token(logits, k, SamplingConfig(temperature=1.0, top_p=0.7))[0]) for k in keys])
  assert set(draws) == {0, 1}  # 0.5 + 0.3 covers 0.7; tokens 2 and 3 are never drawn


def test_context_overflow_is_an_error_unless_truncating():
  long = list(range(2, 50)) * 2  # 96 tokens
  with pytest.raises(LoraJaxError, match="exceeds the model context of 96"):
    generate_ids(PARAMS, CFG, [long], max_new_tokens=8)
  (ids, _), = generate_ids(PARAMS, CFG, [long], max_new_tokens=8, truncate=True)
  assert ids == generate_ids(PARAMS, CFG, [long[-88:]], max_new_tokens=8)[0][0]


def test_bad_sampling_arguments():
  for bad in (-1, float("nan")):
    with pytest.raises(LoraJaxError, match="temperature"):
      SamplingConfig(temperature=bad)
  with pytest.raises(LoraJaxError, match="top-p"):
    SamplingConfig(top_p=0)
  with pytest.raises(LoraJaxError, match="max-new-tokens"):
    generate_ids(PARAMS, CFG, [[1]], max_new_tokens=0)


# ------------------------------------------------------------------ real model
def test_chat_generation_ends_at_eos(smollm2):
  out, = generate(smollm2, ["What is the capital of France? Answer in one word."], chat=True, max_new_tokens=40)
  assert out.finish_reason == "eos"
  assert "Paris" in out.text


def test_stop_string_cuts_output(smollm2):
  free, = generate(smollm2, ["Count from one to ten: one, two,"], max_new_tokens=24)
  assert "five" in free.text
  cut, = generate(smollm2, ["Count from one to ten: one, two,"], max_new_tokens=24, stop=["five"])
  assert cut.finish_reason == "stop_string"
  assert cut.text == free.text[:free.text.index("five")]
  # the ids end with the one that completes the stop string (they once ran on to the end of the decode chunk)
  assert cut.tokens == free.tokens[:len(cut.tokens)] and len(cut.tokens) < len(free.tokens)
  assert "five" in smollm2.tokenizer.decode(cut.tokens) and "five" not in smollm2.tokenizer.decode(cut.tokens[:-1])


def test_chat_template_matches_transformers(smollm2, hf_smollm2):
  _, hf_tok = hf_smollm2
  for messages in ([{"role": "user", "content": "Hi!"}],
                   [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"}, {"role": "user", "content": "Why?"}]):
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert smollm2.tokenizer.render_chat(messages) == want
    assert smollm2.tokenizer.encode_chat(messages) == hf_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False)
