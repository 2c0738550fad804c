"""Perplexity's protocol: windows of `max_length`, short windows scored at a power-of-two length."""

import math

import jax
import numpy as np
import pytest

from lora_jax import LoraJaxError
from lora_jax.models import ModelConfig, init_params
from lora_jax.perplexity import _padded_length, perplexity_of_ids
from lora_jax.testing import assert_allclose

CFG = ModelConfig(architecture="llama", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
PARAMS = init_params(CFG, key=jax.random.key(3), std=0.3)


def test_padded_length():
  assert [_padded_length(n, 1024) for n in (2, 16, 17, 40, 64, 65, 1000, 1024)] == [16, 16, 32, 64, 64, 128, 1024,
                                                                                     1024]
  assert _padded_length(100, 96) == 96 and _padded_length(5, 8) == 8


@pytest.mark.parametrize("n,max_length", [(21, 128), (150, 64), (129, 64), (64, 64)])
def test_short_windows_score_as_at_full_length(n, max_length, monkeypatch):
  """A text shorter than the window, and a long text whose last window is short (22 and 1 tokens: one is scored at
  32, one has nothing to predict), give the NLL of windows padded to `max_length` (the protocol as first written),
  and the same token count."""
  import lora_jax.perplexity as ppl
  ids = np.random.default_rng(n).integers(0, CFG.vocab_size, n)
  got = perplexity_of_ids(PARAMS, CFG, ids, max_length=max_length)
  monkeypatch.setattr(ppl, "_padded_length", lambda n, max_length: max_length)
  full = perplexity_of_ids(PARAMS, CFG, ids, max_length=max_length)
  assert got["tokens"] == full["tokens"] == n - math.ceil(n / max_length)
  assert_allclose(got["nll"], full["nll"], "f32_composite")
  assert_allclose(got["perplexity"], full["perplexity"], "f32_composite")


def test_nothing_to_predict_and_too_long_a_window_are_refused():
  with pytest.raises(LoraJaxError, match="fewer than 2 tokens"):
    perplexity_of_ids(PARAMS, CFG, [7], max_length=64)
  with pytest.raises(LoraJaxError, match="exceeds the model context of 256"):
    perplexity_of_ids(PARAMS, CFG, [7, 8, 9], max_length=512)
