"""Folding a LoRA adapter into a quantized base, three ways, with the drift each causes (an IA3 adapter likewise,
its rescaling in place of ``s·A·B``).

* ``"separate"``: keep the 4-bit base and the adapter apart (`LoRAWeight` over a `QTensor`): exactly the model that
  was trained; no drift by definition, an extra low-rank matmul per layer at inference.
* ``"dequantized"``: dequantize the base and add ``s·A·B`` in float: numerically the same model (drift at float
  rounding level), but the base is no longer 4-bit (memory ×8 for f32).
* ``"requantized"``: merge, then quantize the sum again in the base's format: 4-bit and no extra matmul, but the
  adapter's update is partly rounded away, because ``s·A·B`` is small next to a quantization step.

`drift` measures what a choice costs on a calibration batch: max |Δlogit| and mean KL(reference ‖ merged) of the
next-token distributions, against the "separate" model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._errors import LoraJaxError
from ..models import forward
from ..peft._targets import get_path, set_path
from ._qtensor import QTensor, is_quantized
from ._quantize import quantize

MERGE_MODES = ("separate", "dequantized", "requantized")


def _dequantize_tree(params):
  return jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, params, is_leaf=is_quantized)


def merge_quantized(cfg, model_cfg, qparams: dict, adapter: dict, mode: str) -> dict:
  """Parameters for inference from a quantized base `qparams` and a trained `adapter` of a weight method (`cfg`: a
  `LoraConfig`, DoRA included, or an `IA3Config`; see module docstring)."""
  if mode not in MERGE_MODES:
    raise LoraJaxError(f"merge mode must be one of {list(MERGE_MODES)}, got {mode!r}")
  applied = cfg.apply(model_cfg, qparams, adapter)
  if mode == "separate":
    return applied
  # "dequantized": every kernel dense; "requantized": kernels stay 4-bit, adapted ones re-quantized after merging
  out = _dequantize_tree(qparams) if mode == "dequantized" else qparams
  for path in adapter:
    merged = get_path(applied, path + "/kernel").materialize()
    if mode == "requantized":
      base = get_path(qparams, path + "/kernel")
      if not is_quantized(base):
        raise LoraJaxError(f"{path}: the base kernel is not quantized; nothing to requantize into")
      fmt = {"q4_0": "int4_sym", "q4_1": "int4_asym"}.get(base.fmt, base.fmt)
      merged = quantize(merged, fmt, block_size=base.block_size, double_quant=base.double_quantized, name=path)
      if not isinstance(base, QTensor):  # a K-major base stays K-major
        from ..kernels import pack_kmajor
        merged = pack_kmajor(merged)
    out = set_path(out, path + "/kernel", merged)
  return out


def drift(model_cfg, reference: dict, params: dict, tokens) -> dict:
  """max |Δlogit| and mean KL(reference ‖ params) over every position of `tokens` [B, T]."""
  f = jax.jit(forward, static_argnums=1)
  a = f(reference, model_cfg, tokens)
  b = f(params, model_cfg, tokens)
  return {"max_abs_logit": float(jnp.max(jnp.abs(a - b))), "mean_kl": float(jnp.mean(kl_divergence(a, b)))}


@jax.jit
def kl_divergence(a, b):
  """KL(softmax(a) ‖ softmax(b)) over the last axis, accurate to float32 precision however close the logits are.

  The textbook ``Σ p·(log_softmax(a) − log_softmax(b))`` subtracts log-probabilities of size ≈10 whose float32
  rounding (≈1e-6) dwarfs the difference measured, and its terms, of first order in a − b, cancel to a second-
  order sum: it reports ≈1e-8 for logits 2e-6 apart (true KL ≈1e-12). Here, with ``u = log(p/q) = d − c``,
  ``d = a − b`` and ``c = lse(a) − lse(b) = log1p(Σ q·expm1(d))`` (no large terms), the KL is written as
  ``Σ q·φ(u)`` with ``φ(u) = u·eᵘ − eᵘ + 1 ≥ 0``: every term is non-negative, so nothing cancels. φ comes from
  its series for |u| < 0.5 and from ``p·(u − 1) + q`` (the same value, no overflow) otherwise."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  p, q = jax.nn.softmax(a, axis=-1), jax.nn.softmax(b, axis=-1)
  d = a - b
  close = jnp.max(jnp.abs(d), axis=-1, keepdims=True) < 1.0
  c_close = jnp.log1p(jnp.sum(q * jnp.expm1(jnp.where(close, d, 0.0)), axis=-1, keepdims=True))
  c_far = jax.nn.logsumexp(a, axis=-1, keepdims=True) - jax.nn.logsumexp(b, axis=-1, keepdims=True)
  u = d - jnp.where(close, c_close, c_far)
  small = jnp.abs(u) < 0.5
  us = jnp.where(small, u, 0.0)
  # φ(u) = Σ_{n≥2} (n−1)/n! · uⁿ; through n = 8 the truncation is < 3e-7 relative for |u| < 0.5
  series = us * us * (1 / 2 + us * (1 / 3 + us * (1 / 8 + us * (1 / 30 + us * (1 / 144 + us * (
      1 / 840 + us * (1 / 5760)))))))
  return jnp.sum(jnp.where(small, q * series, p * (u - 1.0) + q), axis=-1)
