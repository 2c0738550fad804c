"""Optimizers over the trainable (adapter) tree only, with per-group treatment via optax.

The optimizer is only ever initialised on the adapter tree, so the frozen base has no gradient and no optimizer
state at all (not merely masked-out updates). Groups:

* LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): ``lora_B`` gets ``lr × ratio`` via
  `optax.multi_transform`.
* Weight decay applies to ``lora_A``/``lora_B`` but not to DoRA magnitudes (`optax.adamw`'s ``mask``).
"""

from __future__ import annotations

from typing import Callable

import jax
import optax


def _leaf_name(path) -> str:
  return str(getattr(path[-1], "key", getattr(path[-1], "idx", ""))) if path else ""


def param_labels(adapter) -> dict:
  """``"b"`` for every ``lora_B`` leaf, ``"default"`` for everything else (same tree structure as `adapter`)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: "b" if _leaf_name(p) == "lora_B" else "default", adapter)


def _decay_mask(adapter) -> dict:
  """Weight decay on LoRA factors only (not DoRA magnitudes, IA3 vectors or virtual tokens)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) in ("lora_A", "lora_B"), adapter)


def lora_optimizer(learning_rate: float | Callable[[int], float], adapter: dict, *, weight_decay: float = 0.0,
                   lora_plus_ratio: float | None = None, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   max_grad_norm: float | None = None) -> optax.GradientTransformation:
  """AdamW for an adapter tree; optional LoRA+ ratio for B and global-norm clipping."""
  mask = _decay_mask(adapter)

  def adamw(lr):
    return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)

  if lora_plus_ratio is None or lora_plus_ratio == 1:
    tx = adamw(learning_rate)
  else:
    lr_b = ((lambda step: learning_rate(step) * lora_plus_ratio) if callable(learning_rate)
            else learning_rate * lora_plus_ratio)
    tx = optax.multi_transform({"default": adamw(learning_rate), "b": adamw(lr_b)}, param_labels(adapter))
  if max_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
  return tx


def state_nbytes(state) -> int:
  """Bytes held by an optimizer state (for the 'state exists only for trainable leaves' check)."""
  return sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
