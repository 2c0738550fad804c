"""LoRA, rsLoRA and DoRA as pure transforms over the parameter tree.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) adds a low-rank update to a frozen weight. With our kernel
layout ``W: (in, out)`` and ``y = x W``::

    y = x W + s · dropout(x) A B,     A: (in, r),  B: (r, out),  s = α / r        (rsLoRA: s = α / √r)

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) splits the adapted weight into a magnitude vector and a
direction, with the column norm (over the input axis) treated as a constant in the backward pass, as PEFT does::

    W' = m ⊙ (W + s A B) / ‖W + s A B‖_c ,   m initialised to ‖W‖_c
    y  = (m / ‖W + s A B‖_c) ⊙ (x W + s · x A B)

Invariants (tested): `LoRAWeight.materialize()` is the definition and the fused `LoRAWeight.linear` equals
``x @ materialize()``; B = 0 at the default init gives exactly the base output; `unmerge(merge(W)) ≈ W`.
Initialisations follow PEFT: A Kaiming-uniform (bound 1/√in), B = 0 ("default"); A ~ N(0, 1/r), B = 0
("gaussian"); PiSSA (A, B from the top-r SVD of W, base replaced by the residual); OLoRA (A, B from the QR
decomposition of W, base replaced by the residual). Relation to PEFT's tensors: ``lora_A.weight = Aᵀ (r, in)``,
``lora_B.weight = Bᵀ (out, r)``, ``lora_magnitude_vector = m (out,)``.

Adapter parameters are a flat dict ``{path: {"lora_A": [L, in, r], "lora_B": [L, r, out] (, "lora_magnitude":
[L, out])}}`` over the stacked layers; `layers_to_transform` leaves the other layers' entries inert (scale 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._errors import LoraJaxError
from ..models._config import ModelConfig
from ._targets import get_path, resolve_layers, resolve_targets, set_path

INITS = ("default", "gaussian", "pissa", "olora")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """What to adapt and how. Field names follow PEFT's `LoraConfig` where one exists."""

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q_proj", "v_proj")
  layers_to_transform: tuple[int, ...] | None = None
  dropout: float = 0.0
  use_rslora: bool = False
  use_dora: bool = False
  init: str = "default"

  def __post_init__(self):
    if isinstance(self.targets, str):
      object.__setattr__(self, "targets", (self.targets,))
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise LoraJaxError(f"LoRA rank must be a positive integer, got {self.rank!r}")
    if not 0 <= self.dropout < 1:
      raise LoraJaxError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    if self.init not in INITS:
      raise LoraJaxError(f"unknown LoRA init {self.init!r}; choose one of {list(INITS)}")

  @property
  def scale(self) -> float:
    return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

  # the PEFT-method interface shared with IA3Config and the prompt-method configs
  def init_adapter(self, model_cfg, params, *, key, tokenizer=None):
    return init_lora(self, model_cfg, params, key=key)

  def apply(self, model_cfg, frozen, adapter, *, dropout_key=None):
    return apply_lora(self, model_cfg, frozen, adapter, dropout_key=dropout_key)

  def merge(self, model_cfg, frozen, adapter):
    return merge(self, model_cfg, frozen, adapter)

  def virtual_tokens(self, model_cfg, adapter):
    return None

  def kv_prefix(self, model_cfg, adapter):
    return None

  def count_trainable(self, model_cfg, adapter) -> int:
    return count_trainable(self, model_cfg, adapter)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class LoRAWeight:
  """A frozen kernel with a low-rank (optionally DoRA) update; a drop-in for the kernel in `ops.linear`.

  Leaves may carry a leading layer axis (scan slices it away). ``scale == 0`` marks an inactive layer.
  """

  w: Any                      # base kernel (in, out): an array, or a `QTensor` (QLoRA)
  a: Float[Array, "in r"]
  b: Float[Array, "r out"]
  scale: Float[Array, ""]
  magnitude: Float[Array, "out"] | None = None
  dropout_key: Any = None
  dropout: float = 0.0        # static

  def tree_flatten(self):
    return (self.w, self.a, self.b, self.scale, self.magnitude, self.dropout_key), (self.dropout,)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, dropout=aux[0])

  def _delta(self):
    return self.scale[..., None, None] * jnp.einsum("...ir,...ro->...io", self.a, self.b.astype(self.a.dtype))

  def _base(self):
    """The base kernel as a dense array (a quantized base is dequantized: QLoRA)."""
    return self.w.dequantize() if hasattr(self.w, "dequantize") else self.w

  def _base_linear(self, x):
    if hasattr(self.w, "linear"):  # quantized base: the 4-bit kernel, no dense copy
      return self.w.linear(x)
    return jnp.einsum("...i,io->...o", x, self.w.astype(x.dtype), preferred_element_type=jnp.float32)

  def materialize(self) -> Float[Array, "in out"]:
    """The effective kernel: ``W + s A B`` (DoRA: ``m ⊙ (W + s A B) / ‖W + s A B‖_c``). The definition."""
    w = self._base()
    adapted = w + self._delta().astype(w.dtype)
    if self.magnitude is None:
      return adapted
    norm = jnp.linalg.norm(adapted.astype(jnp.float32), axis=-2)
    dora = (self.magnitude / norm)[..., None, :].astype(w.dtype) * adapted
    return jnp.where((self.scale != 0)[..., None, None], dora, w)

  def linear(self, x: Float[Array, "... in"]) -> Float[Array, "... out"]:
    """``x @ materialize()`` without forming the dense update (float32 accumulation)."""
    if self.magnitude is None and not (self.dropout > 0 and self.dropout_key is not None):
      from ..kernels import lora_linear, qmatmul_lora
      if hasattr(self.w, "linear"):  # QLoRA: one op (on GPU one kernel) for the 4-bit base and the LoRA term
        return qmatmul_lora(x, self.w, self.a, self.b, self.scale)
      return lora_linear(x, self.w, self.a, self.b, self.scale)
    xd = x
    if self.dropout > 0 and self.dropout_key is not None:
      keep = jax.random.bernoulli(self.dropout_key, 1 - self.dropout, x.shape)
      xd = jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype)
    base = self._base_linear(x)
    low = jnp.einsum("...i,ir->...r", xd, self.a.astype(x.dtype), preferred_element_type=jnp.float32)
    lora = jnp.einsum("...r,ro->...o", low.astype(x.dtype), self.b.astype(x.dtype),
                      preferred_element_type=jnp.float32) * self.scale.astype(jnp.float32)
    if self.magnitude is None:
      return base + lora
    # DoRA (PEFT's DoraLinearLayer.forward): the column norm is a constant for the backward pass.
    w = self._base()
    adapted = w.astype(jnp.float32) + self._delta().astype(jnp.float32)
    norm = jax.lax.stop_gradient(jnp.linalg.norm(adapted, axis=0))
    factor = self.magnitude.astype(jnp.float32) / norm
    if xd is not x:  # with dropout PEFT recomputes the base term on the dropped input
      base_d = self._base_linear(xd)
      dora = base + (factor - 1) * base_d + factor * lora
    else:
      dora = factor * (base + lora)
    return jnp.where(self.scale != 0, dora, base)


def _kernel(params, path):
  try:
    return get_path(params, path + "/kernel")
  except (KeyError, TypeError):
    raise LoraJaxError(f"model has no weight at {path}/kernel") from None


def _check_rank(cfg: LoraConfig, path: str, w) -> None:
  n_in, n_out = _kshape(w)[-2:]
  if cfg.rank > min(n_in, n_out):
    raise LoraJaxError(f"LoRA rank {cfg.rank} is larger than {path} allows (weight {n_in}x{n_out}: at most "
                       f"{min(n_in, n_out)})")


def init_lora(cfg: LoraConfig, model_cfg: ModelConfig, params: dict, *, key: jax.Array) -> tuple[dict, dict]:
  """Creates adapter parameters. Returns ``(adapter, frozen)``.

  `frozen` is `params` itself, except for PiSSA/OLoRA, which move the top-rank part of each target weight into the
  adapter and leave the residual in the base (so the initial model computes exactly what the base did).
  """
  paths = resolve_targets(cfg.targets)
  layers = resolve_layers(cfg.layers_to_transform, model_cfg.num_layers)
  active = np.zeros((model_cfg.num_layers,), bool)
  active[list(layers)] = True
  adapter, frozen = {}, params
  s = cfg.scale
  for i, path in enumerate(paths):
    w = _kernel(params, path)
    _check_rank(cfg, path, w)
    n_layers, n_in, n_out = _kshape(w)
    if hasattr(w, "dequantize") and (cfg.init in ("pissa", "olora") or cfg.use_dora):
      w = w.dequantize()  # SVD/QR inits and DoRA magnitudes need the dense kernel
    k = jax.random.fold_in(key, i)
    if cfg.init in ("default", "gaussian"):
      if cfg.init == "default":  # PEFT: kaiming_uniform_(a=√5) on lora_A (r, in) → U(±1/√in)
        bound = 1 / math.sqrt(n_in)
        a = jax.random.uniform(k, (n_layers, n_in, cfg.rank), jnp.float32, -bound, bound)
      else:
        a = jax.random.normal(k, (n_layers, n_in, cfg.rank), jnp.float32) / cfg.rank
      b = jnp.zeros((n_layers, cfg.rank, n_out), jnp.float32)
      residual = w
    else:
      a, b = jax.vmap(lambda wl: _svd_or_qr_init(wl.astype(jnp.float32), cfg.rank, s, cfg.init))(w)
      mask = jnp.asarray(active)[:, None, None]
      a, b = jnp.where(mask, a, 0), jnp.where(mask, b, 0)
      residual = (w.astype(jnp.float32) - s * jnp.einsum("lir,lro->lio", a, b)).astype(w.dtype)
      frozen = set_path(frozen, path + "/kernel", residual)
    entry = {"lora_A": a.astype(w.dtype), "lora_B": b.astype(w.dtype)}
    if cfg.use_dora:
      entry["lora_magnitude"] = jnp.linalg.norm(w.astype(jnp.float32), axis=1).astype(w.dtype)
    adapter[path] = entry
  return adapter, frozen


def _kshape(w) -> tuple[int, ...]:
  """(L, in, out) of a stacked kernel, dense or quantized."""
  if hasattr(w, "codes"):
    return (*w.lead_shape, *w.shape)
  return tuple(w.shape)


def _svd_or_qr_init(w, r, scale, kind):
  """PiSSA / OLoRA factors for one (in, out) kernel, in our layout (A: (in, r), B: (r, out))."""
  wt = w.T  # PEFT works on (out, in)
  if kind == "pissa":
    u, sv, vh = jnp.linalg.svd(wt, full_matrices=False)
    root = jnp.sqrt(sv[:r] / scale)
    a_hf = root[:, None] * vh[:r]                 # (r, in)
    b_hf = u[:, :r] * root[None, :]               # (out, r)
  else:
    q, rr = jnp.linalg.qr(wt)
    a_hf, b_hf = rr[:r], q[:, :r]
  return a_hf.T, b_hf.T


def _scales(cfg: LoraConfig, model_cfg: ModelConfig):
  layers = resolve_layers(cfg.layers_to_transform, model_cfg.num_layers)
  sc = np.zeros((model_cfg.num_layers,), np.float32)
  sc[list(layers)] = cfg.scale
  return jnp.asarray(sc)


def apply_lora(cfg: LoraConfig, model_cfg: ModelConfig, params: dict, adapter: dict, *,
               dropout_key: jax.Array | None = None) -> dict:
  """`params` with each adapted kernel replaced by a `LoRAWeight` (the model calls its fused `linear`).

  Pass `dropout_key` during training to enable dropout (each layer and target gets its own key).
  """
  scales = _scales(cfg, model_cfg)
  out = params
  for i, (path, entry) in enumerate(sorted(adapter.items())):
    keys = None
    if dropout_key is not None and cfg.dropout > 0:
      keys = jax.random.split(jax.random.fold_in(dropout_key, i), model_cfg.num_layers)
    node = LoRAWeight(_kernel(params, path), entry["lora_A"], entry["lora_B"], scales.astype(entry["lora_A"].dtype),
                      entry.get("lora_magnitude"), keys, cfg.dropout)
    out = set_path(out, path + "/kernel", node)
  return out


def merge(cfg: LoraConfig, model_cfg: ModelConfig, params: dict, adapter: dict) -> dict:
  """`params` with the adapter folded into the kernels (plain arrays; no extra cost at inference)."""
  merged = apply_lora(cfg, model_cfg, params, adapter)
  for path in adapter:
    merged = set_path(merged, path + "/kernel", get_path(merged, path + "/kernel").materialize())
  return merged


def unmerge(cfg: LoraConfig, model_cfg: ModelConfig, merged: dict, adapter: dict) -> dict:
  """Inverse of `merge` for LoRA/rsLoRA: subtracts ``s A B`` from each adapted kernel."""
  if cfg.use_dora:
    raise LoraJaxError("DoRA merges cannot be undone from the merged weights alone (the column norms of W are "
                       "lost); keep the base parameters instead of unmerging")
  scales = _scales(cfg, model_cfg)
  out = merged
  for path, entry in adapter.items():
    w = get_path(merged, path + "/kernel")
    delta = LoRAWeight(w, entry["lora_A"], entry["lora_B"], scales.astype(entry["lora_A"].dtype))._delta()
    out = set_path(out, path + "/kernel", w - delta.astype(w.dtype))
  return out


def count_trainable(cfg: LoraConfig, model_cfg: ModelConfig, adapter: dict) -> int:
  """Trainable parameters in the selected layers (what PEFT's print_trainable_parameters counts)."""
  n_layers = len(resolve_layers(cfg.layers_to_transform, model_cfg.num_layers))
  return sum(int(np.prod(x.shape[1:])) * n_layers for entry in adapter.values() for x in entry.values())


def trainable_summary(cfg: LoraConfig, model_cfg: ModelConfig, adapter: dict) -> dict:
  """PEFT's `print_trainable_parameters` numbers: trainable, all (base + adapter), percentage."""
  trainable = count_trainable(cfg, model_cfg, adapter)
  total = model_cfg.num_parameters() + trainable
  return {"trainable": trainable, "all": total, "percent": 100 * trainable / total,
          "text": f"trainable params: {trainable:,d} || all params: {total:,d} || "
                  f"trainable%: {100 * trainable / total:.4f}"}
