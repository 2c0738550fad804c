"""Perplexity of a text under the model.

Protocol (fixed, so numbers are comparable across tools): the text is tokenized whole with the tokenizer's
defaults, cut into consecutive non-overlapping windows of `max_length` tokens, and in each window every token after
the first is predicted from the ones before it in that window. The result is the mean negative log-likelihood over
all predicted tokens (nats/token) and its exponential.

A window shorter than `max_length` (a short text, or a long text's last window) is scored at the next power of two
of its length (at least 16) instead of at `max_length`: causal attention keeps the padding out of every scored
token, so the result is the same, and a 40-token text no longer costs a 1024-token forward pass. At most one
program is compiled per power of two.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import LoraJaxError
from .models import ModelConfig
from .models._llama import hidden_states, logits as lm_logits


@functools.partial(jax.jit, static_argnames=("cfg",))
def window_nll(params, cfg: ModelConfig, tokens, valid, virtual_tokens=None, kv_prefix=None):
  """Summed NLL (float32) of tokens[:, 1:] given their prefixes, over valid targets; and the target count."""
  h, _ = hidden_states(params, cfg, tokens, valid=valid, virtual_tokens=virtual_tokens, kv_prefix=kv_prefix)
  logits = lm_logits(params, cfg, h[:, :-1])
  target = tokens[:, 1:]
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
  mask = valid[:, 1:] & valid[:, :-1]
  return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask)


def _padded_length(n: int, max_length: int) -> int:
  """The length a window of `n` tokens is scored at: the next power of two (at least 16), at most `max_length`."""
  return min(max_length, max(16, 1 << (n - 1).bit_length()))


def perplexity_of_ids(params, cfg: ModelConfig, ids, *, max_length: int = 1024, virtual_tokens=None,
                      kv_prefix=None) -> dict:
  """``{"tokens", "nll", "perplexity"}`` for a token-id sequence (see module docstring)."""
  if max_length < 2:
    raise LoraJaxError(f"--max-length must be >= 2, got {max_length}")
  n_virtual = sum(int(x.shape[0]) for x in (virtual_tokens,) if x is not None) + (
      int(kv_prefix[0].shape[1]) if kv_prefix is not None else 0)
  if max_length + n_virtual > cfg.max_position_embeddings:
    raise LoraJaxError(f"--max-length {max_length}{f' + {n_virtual} virtual tokens' if n_virtual else ''} exceeds "
                       f"the model context of {cfg.max_position_embeddings}")
  ids = np.asarray(ids, np.int32)
  total, count = 0.0, 0
  for start in range(0, len(ids), max_length):
    window = ids[start:start + max_length]
    if len(window) < 2:
      continue
    length = _padded_length(len(window), max_length)
    tokens = np.zeros((1, length), np.int32)
    valid = np.zeros((1, length), bool)
    tokens[0, :len(window)] = window
    valid[0, :len(window)] = True
    s, n = window_nll(params, cfg, jnp.asarray(tokens), jnp.asarray(valid), virtual_tokens, kv_prefix)
    total += float(s)
    count += int(n)
  if count == 0:
    raise LoraJaxError("text has fewer than 2 tokens: nothing to predict")
  nll = total / count
  return {"tokens": count, "nll": nll, "perplexity": math.exp(nll)}


def perplexity(model, text: str, *, max_length: int = 1024, params=None, **extras) -> dict:
  """Perplexity of `text`; `extras` are ``virtual_tokens`` / ``kv_prefix`` of a prompt-method adapter."""
  if not text.strip():
    raise LoraJaxError("the text is empty: nothing to score")
  return perplexity_of_ids(params if params is not None else model.params, model.config,
                           model.tokenizer.encode(text), max_length=max_length, **extras)
