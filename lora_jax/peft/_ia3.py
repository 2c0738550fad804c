"""(IA)³ (Liu et al. 2022, https://arxiv.org/abs/2205.05638): learned vectors that rescale activations.

For attention keys and values the vector scales the projection's *output*; for feed-forward modules (PEFT's
``feedforward_modules``, by default ``down_proj``) it scales the projection's *input*::

    y = (x W + b) ⊙ l      (k_proj, v_proj)        ⇔  W' = W · diag(l), b' = b ⊙ l
    y = (x ⊙ l) W + b      (down_proj)             ⇔  W' = diag(l) · W

(a bias, as Qwen2's q/k/v projections have, is scaled with the output, as PEFT does). Vectors start at 1, so the
initial model is the base. The rescaling is linear in the weight, so it merges exactly into W (and b). PEFT stores ``ia3_l`` as (out, 1) for output scaling and (1, in) for input
scaling; with our (in, out) kernels those are l over the out and in axes respectively.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import LoraJaxError
from ..models._config import ModelConfig
from ._targets import PATH_MODULES, get_path, resolve_targets, set_path


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config:
  targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
  feedforward: tuple[str, ...] = ("down_proj",)

  def __post_init__(self):
    if isinstance(self.targets, str):
      object.__setattr__(self, "targets", (self.targets,))
    paths = resolve_targets(self.targets)
    ff = set(resolve_targets(self.feedforward)) if self.feedforward else set()
    if not ff <= set(paths):
      raise LoraJaxError(f"IA3 feedforward modules {sorted(PATH_MODULES[p] for p in ff - set(paths))} are not "
                         f"among the targets")

  @property
  def paths(self) -> tuple[str, ...]:
    return resolve_targets(self.targets)

  def is_feedforward(self, path: str) -> bool:
    return bool(self.feedforward) and path in resolve_targets(self.feedforward)

  # the PEFT-method interface (see lora_jax.peft.methods)
  def init_adapter(self, model_cfg: ModelConfig, params: dict, *, key=None, tokenizer=None) -> tuple[dict, dict]:
    adapter = {}
    for path in self.paths:
      w = get_path(params, path + "/kernel")
      layers, n_in, n_out = (*w.lead_shape, *w.shape) if hasattr(w, "codes") else w.shape
      adapter[path] = {"ia3": jnp.ones((layers, n_in if self.is_feedforward(path) else n_out), jnp.float32)}
    return adapter, params

  def apply(self, model_cfg, frozen, adapter, *, dropout_key=None):
    out = frozen
    for path, entry in adapter.items():
      w = get_path(frozen, path + "/kernel")
      on_input = self.is_feedforward(path)
      out = set_path(out, path + "/kernel", IA3Weight(w, entry["ia3"], on_input))
      bias = get_path(frozen, path).get("bias")
      if bias is not None and not on_input:  # output scaling is (xW + b) ⊙ l, as PEFT (Qwen2's q/k/v biases)
        out = set_path(out, path + "/bias", (bias.astype(jnp.float32) * entry["ia3"]).astype(bias.dtype))
    return out

  def virtual_tokens(self, model_cfg, adapter):
    return None

  def kv_prefix(self, model_cfg, adapter):
    return None

  def merge(self, model_cfg, frozen, adapter):
    merged = self.apply(model_cfg, frozen, adapter)
    for path in adapter:
      merged = set_path(merged, path + "/kernel", get_path(merged, path + "/kernel").materialize())
    return merged

  def count_trainable(self, model_cfg, adapter) -> int:
    return sum(int(np.prod(e["ia3"].shape)) for e in adapter.values())


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class IA3Weight:
  """A frozen kernel rescaled by an (IA)³ vector on its input (feed-forward) or output side."""

  w: Any
  scale: Any
  on_input: bool = False  # static

  def tree_flatten(self):
    return (self.w, self.scale), (self.on_input,)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, on_input=aux[0])

  def _dense(self):
    return self.w.dequantize() if hasattr(self.w, "dequantize") else self.w

  def materialize(self):
    w = self._dense()
    s = self.scale.astype(w.dtype)
    return s[..., :, None] * w if self.on_input else w * s[..., None, :]

  def linear(self, x):
    if self.on_input:
      x = x * self.scale.astype(x.dtype)
    y = self.w.linear(x) if hasattr(self.w, "linear") else jnp.einsum(
        "...i,io->...o", x, self.w.astype(x.dtype), preferred_element_type=jnp.float32)
    return y if self.on_input else y * self.scale.astype(jnp.float32)
