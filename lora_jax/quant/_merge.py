"""Folding a LoRA adapter into a quantized base, three ways, with the drift each causes.

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
from ..peft._lora import LoraConfig, apply_lora
from ..peft._targets import get_path, set_path
from ._qtensor import QTensor
from ._quantize import quantize

MERGE_MODES = ("separate", "dequantized", "requantized")


def _dequantize_tree(params):
  return jax.tree.map(lambda x: x.dequantize() if isinstance(x, QTensor) else x, params,
                      is_leaf=lambda x: isinstance(x, QTensor))


def merge_quantized(cfg: LoraConfig, model_cfg, qparams: dict, adapter: dict, mode: str) -> dict:
  """Parameters for inference from a quantized base `qparams` and a trained `adapter` (see module docstring)."""
  if mode not in MERGE_MODES:
    raise LoraJaxError(f"merge mode must be one of {list(MERGE_MODES)}, got {mode!r}")
  applied = apply_lora(cfg, model_cfg, qparams, adapter)
  if mode == "separate":
    return applied
  # "dequantized": every kernel dense; "requantized": kernels stay 4-bit, adapted ones re-quantized after merging
  out = _dequantize_tree(qparams) if mode == "dequantized" else qparams
  for path in adapter:
    merged = get_path(applied, path + "/kernel").materialize()
    if mode == "requantized":
      base = get_path(qparams, path + "/kernel")
      if not isinstance(base, QTensor):
        raise LoraJaxError(f"{path}: the base kernel is not quantized; nothing to requantize into")
      fmt = {"q4_0": "int4_sym", "q4_1": "int4_asym"}.get(base.fmt, base.fmt)
      merged = quantize(merged, fmt, block_size=base.block_size, double_quant=base.double_quantized, name=path)
    out = set_path(out, path + "/kernel", merged)
  return out


def drift(model_cfg, reference: dict, params: dict, tokens) -> dict:
  """max |Δlogit| and mean KL(reference ‖ params) over every position of `tokens` [B, T]."""
  f = jax.jit(forward, static_argnums=1)
  a = f(reference, model_cfg, tokens)
  b = f(params, model_cfg, tokens)
  la, lb = jax.nn.log_softmax(a, -1), jax.nn.log_softmax(b, -1)
  kl = jnp.sum(jnp.exp(la) * (la - lb), axis=-1)
  return {"max_abs_logit": float(jnp.max(jnp.abs(a - b))), "mean_kl": float(jnp.mean(kl))}
