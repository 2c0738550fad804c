"""The training step and the loss: pure functions of (trainable, frozen, batch).

Only the adapter is differentiated (`jax.value_and_grad` w.r.t. its first argument), so the frozen base never gets
a gradient or optimizer state. The loss is the mean next-token cross-entropy over the batch's target tokens: each
micro-batch returns a *sum* and a *count*, and the accumulated sum is divided once by the total count, so gradient
accumulation gives the same update as one large batch. A step whose loss or gradient norm is not finite leaves the
state untouched and reports ``ok = False`` (the NaN/inf guard); the run loop then stops.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .models import ModelConfig
from .models._llama import hidden_states, logits as lm_logits
from .peft import LoraConfig


class TrainState(NamedTuple):
  step: jax.Array          # int32 []
  adapter: dict
  opt_state: Any
  rng: jax.Array           # raw uint32 key data (checkpointable)


def batch_loss(adapter, frozen, batch, *, model_cfg: ModelConfig, lora_cfg: LoraConfig, dropout_key=None,
               remat: bool | str = False, max_targets: int | None = None):
  """Summed cross-entropy over target tokens of `batch` and their count (float32).

  With `max_targets`, the vocabulary projection runs only on (at most that many) target positions, gathered
  first: in instruction tuning most tokens are prompt tokens without loss, and the [tokens, vocab] logits and their
  gradient are the largest matmuls of the step. The caller guarantees that no batch has more targets.
  """
  params = lora_cfg.apply(model_cfg, frozen, adapter, dropout_key=dropout_key)
  seg = batch["segments"]
  dtype = params["embed"]["embedding"].dtype
  vt = lora_cfg.virtual_tokens(model_cfg, adapter)
  kv = lora_cfg.kv_prefix(model_cfg, adapter)
  if vt is None and kv is None:
    h, _ = hidden_states(params, model_cfg, batch["ids"], valid=seg > 0, positions=batch["positions"],
                         segment_ids=seg, remat=remat)
  else:  # prompt methods: one example per row, positions follow the virtual tokens
    h, _ = hidden_states(params, model_cfg, batch["ids"], valid=seg > 0, remat=remat,
                         virtual_tokens=None if vt is None else vt.astype(dtype),
                         kv_prefix=None if kv is None else jax.tree.map(lambda a: a.astype(dtype), kv))
  h, targets, mask = h[:, :-1], batch["ids"][:, 1:], batch["loss"][:, 1:]
  if max_targets is not None:
    (idx,) = jnp.nonzero(mask.reshape(-1), size=max_targets, fill_value=0)
    h = h.reshape(-1, h.shape[-1])[idx]
    targets = targets.reshape(-1)[idx]
    mask = jnp.arange(max_targets) < jnp.sum(mask)
  logits = lm_logits(params, model_cfg, h)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask).astype(jnp.float32)


def resolve_remat(remat: bool | str, frozen=None, *, quantized: bool | None = None) -> bool | str:
  """`remat`, with ``"auto"`` resolved: ``"full"`` (keep each layer's input only) for a quantized base, ``"dots"``
  (keep the projection outputs) otherwise. Whether the base is quantized is read from the `frozen` tree (any
  `QTensor` or `KMajor` leaf) unless `quantized` says it. Memory is why one quantizes: on SmolLM2 at 4x256 tokens
  an NF4 base takes 462 MiB of XLA temporaries and 2.83 s per step with "full", against 1616 MiB and 2.41 s with
  "dots" (fp32 LoRA with "dots": 1616 MiB, 2.51 s)."""
  if remat != "auto":
    return remat
  if quantized is None:
    from .quant._qtensor import is_quantized
    quantized = any(is_quantized(leaf) for leaf in jax.tree.leaves(frozen, is_leaf=is_quantized))
  return "full" if quantized else "dots"


def make_train_step(model_cfg: ModelConfig, lora_cfg: LoraConfig, tx: optax.GradientTransformation, *,
                    grad_accum: int = 1, remat: bool | str = "auto", max_targets: int | None = None):
  """A jitted ``step(state, frozen, batch) -> (state, metrics)``; `batch` leaves are [batch, T].

  `remat` is the activation policy of `lora_jax.models.hidden_states`, or ``"auto"`` (`resolve_remat`): ``"dots"``
  keeps only the projection outputs (about 0.8 GiB less peak memory on SmolLM2 at 4x256 tokens than keeping
  everything, same speed), ``"full"`` for a quantized base.
  `max_targets` bounds the target tokens of one micro-batch (see `batch_loss`).
  """

  def micro(adapter, frozen, mb, key):
    return batch_loss(adapter, frozen, mb, model_cfg=model_cfg, lora_cfg=lora_cfg,
                      dropout_key=key if getattr(lora_cfg, "dropout", 0) > 0 else None,
                      remat=resolve_remat(remat, frozen), max_targets=max_targets)

  grad_fn = jax.value_and_grad(micro, has_aux=True)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state: TrainState, frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    mbs = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def acc(carry, xs):
      g_sum, l_sum, n_sum = carry
      mb, i = xs
      (l, n), g = grad_fn(state.adapter, frozen, mb, jax.random.fold_in(key, i))
      return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, n_sum + n), None

    zeros = jax.tree.map(jnp.zeros_like, state.adapter)
    (g, total, count), _ = jax.lax.scan(acc, (zeros, jnp.float32(0), jnp.float32(0)),
                                        (mbs, jnp.arange(grad_accum)))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda x: x / count, g)
    loss = total / count
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.adapter)
    adapter = optax.apply_updates(state.adapter, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new = TrainState(state.step + 1, keep(adapter, state.adapter), keep(opt_state, state.opt_state), state.rng)
    return new, {"loss": loss, "grad_norm": grad_norm, "tokens": count, "ok": ok}

  return step


def make_eval_loss(model_cfg: ModelConfig, lora_cfg: LoraConfig):
  """A jitted ``(adapter, frozen, batch) -> (sum, count)`` without dropout."""
  return jax.jit(functools.partial(batch_loss, model_cfg=model_cfg, lora_cfg=lora_cfg))


def target_budget(loss_mask, rows_per_micro_batch: int, multiple: int = 128) -> int | None:
  """A static bound on the target tokens of any micro-batch drawn from rows with this loss mask, or None when
  gathering would not pay off (most tokens are targets anyway)."""
  per_row = loss_mask[:, 1:].sum(axis=1)
  bound = int(np.sort(per_row)[::-1][:rows_per_micro_batch].sum())
  total = rows_per_micro_batch * (loss_mask.shape[1] - 1)
  budget = -(-max(bound, 1) // multiple) * multiple
  return budget if budget < 0.75 * total else None


def make_schedule(lr: float, steps: int, warmup: int, kind: str):
  warmup = min(warmup, max(steps - 1, 0))
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=0.0)
  decay = optax.linear_schedule(lr, 0.0, max(steps - warmup, 1)) if kind == "linear" else optax.constant_schedule(lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
