"""Prompt-learning methods: prompt tuning, P-tuning and prefix tuning, as transforms of the model's inputs.

* Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691): ``n`` learned embeddings P ∈ R^{n×D} are
  prepended to the input embeddings; they take positions 0..n-1 and the text continues at n.
* P-tuning (Liu et al. 2021, https://arxiv.org/abs/2103.10385): the virtual tokens are produced by a prompt encoder,
  ``P = MLP(E)`` with E ∈ R^{n×D} and a two-hidden-layer ReLU MLP (PEFT's ``PromptEncoder``, type MLP).
* Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190): every layer attends to ``n`` learned key/value
  pairs before the text (stored as K/V cache entries, not rotated); optionally reparameterised during training as
  ``[K; V] = W₂ tanh(W₁ E + b₁) + b₂`` (PEFT's ``prefix_projection``) and folded to plain prefixes for inference.

None of them touches the weights: `apply` returns the frozen tree unchanged, and the model receives
``virtual_tokens`` (prompt tuning / P-tuning) or ``kv_prefix`` (prefix tuning). All parameters are float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import LoraJaxError
from ..models._config import ModelConfig

PROMPT_INITS = ("random", "vocab", "text")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _PromptBase:
  num_virtual_tokens: int = 20

  def __post_init__(self):
    if self.num_virtual_tokens < 1:
      raise LoraJaxError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")

  def apply(self, model_cfg, frozen, adapter, *, dropout_key=None):
    return frozen

  def virtual_tokens(self, model_cfg, adapter):
    return None

  def kv_prefix(self, model_cfg, adapter):
    return None

  def merge(self, model_cfg, frozen, adapter):
    raise LoraJaxError(f"{type(self).__name__} changes the model's inputs, not its weights: there is nothing to merge")

  def count_trainable(self, model_cfg, adapter) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapter))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(_PromptBase):
  init: str = "random"                  # random (N(0,1), PEFT's RANDOM) | vocab (sampled rows) | text
  init_text: str | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.init not in PROMPT_INITS:
      raise LoraJaxError(f"prompt tuning init must be one of {list(PROMPT_INITS)}, got {self.init!r}")
    if self.init == "text" and not self.init_text:
      raise LoraJaxError("prompt tuning init 'text' needs init_text")

  def init_params(self, model_cfg: ModelConfig, params: dict, *, key, tokenizer=None) -> dict:
    n, table = self.num_virtual_tokens, params["embed"]["embedding"]
    if self.init == "random":
      prompt = jax.random.normal(key, (n, model_cfg.hidden_size), jnp.float32)
    elif self.init == "vocab":
      prompt = table[jax.random.randint(key, (n,), 0, model_cfg.vocab_size)].astype(jnp.float32)
    else:
      if tokenizer is None:
        raise LoraJaxError("prompt tuning init 'text' needs the model's tokenizer")
      ids = tokenizer.encode(self.init_text, add_special_tokens=False)
      if not ids:
        raise LoraJaxError("prompt tuning init_text tokenizes to nothing")
      ids = (ids * math.ceil(n / len(ids)))[:n]  # PEFT repeats/truncates the text to n tokens
      prompt = table[jnp.asarray(ids)].astype(jnp.float32)
    return {"prompt": prompt}

  def init_adapter(self, model_cfg, params, *, key, tokenizer=None):
    return self.init_params(model_cfg, params, key=key, tokenizer=tokenizer), params

  def virtual_tokens(self, model_cfg, adapter):
    return adapter["prompt"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTuningConfig(_PromptBase):
  encoder_hidden_size: int = 128

  def init_adapter(self, model_cfg, params, *, key, tokenizer=None):
    d, h, n = model_cfg.hidden_size, self.encoder_hidden_size, self.num_virtual_tokens
    k = jax.random.split(key, 4)
    lin = lambda kk, i, o: {"kernel": jax.random.uniform(kk, (i, o), jnp.float32, -1, 1) / math.sqrt(i),
                            "bias": jnp.zeros((o,), jnp.float32)}
    return {"embedding": jax.random.normal(k[0], (n, d), jnp.float32),
            "mlp": [lin(k[1], d, h), lin(k[2], h, h), lin(k[3], h, d)]}, params

  def virtual_tokens(self, model_cfg, adapter):
    x = adapter["embedding"]
    layers = adapter["mlp"]
    for i, l in enumerate(layers):
      x = x @ l["kernel"] + l["bias"]
      if i < len(layers) - 1:
        x = jax.nn.relu(x)
    return x


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuningConfig(_PromptBase):
  projection: bool = False
  encoder_hidden_size: int = 128

  def init_adapter(self, model_cfg, params, *, key, tokenizer=None):
    n, width = self.num_virtual_tokens, model_cfg.num_layers * 2 * model_cfg.kv_size
    k = jax.random.split(key, 3)
    if not self.projection:
      return {"prefix": jax.random.normal(k[0], (n, width), jnp.float32)}, params
    kv, h = model_cfg.kv_size, self.encoder_hidden_size
    lin = lambda kk, i, o: {"kernel": jax.random.uniform(kk, (i, o), jnp.float32, -1, 1) / math.sqrt(i),
                            "bias": jnp.zeros((o,), jnp.float32)}
    return {"embedding": jax.random.normal(k[0], (n, kv), jnp.float32),
            "mlp": [lin(k[1], kv, h), lin(k[2], h, width)]}, params

  def folded(self, adapter):
    """The plain prefix [n, L·2·kv] (applies the projection when there is one)."""
    if "prefix" in adapter:
      return adapter["prefix"]
    l1, l2 = adapter["mlp"]
    return jnp.tanh(adapter["embedding"] @ l1["kernel"] + l1["bias"]) @ l2["kernel"] + l2["bias"]

  def kv_prefix(self, model_cfg, adapter):
    """(k, v), each [L, n, Hkv, hd]: PEFT's layout is [n, L·2, Hkv, hd] with keys at 2l and values at 2l+1."""
    p = self.folded(adapter)
    n = p.shape[0]
    p = p.reshape(n, model_cfg.num_layers, 2, model_cfg.num_kv_heads, model_cfg.head_dim)
    return jnp.moveaxis(p[:, :, 0], 0, 1), jnp.moveaxis(p[:, :, 1], 0, 1)
