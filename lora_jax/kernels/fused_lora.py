"""LoRA's linear as one op: ``x W + s (x A) B`` with the rank-r product riding on the base GEMM (a custom VJP).

Used for a dense base (`LoRAWeight.linear`) and, through `qmatmul_lora`, for a 4-bit base on the XLA path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..quant._qtensor import is_quantized
from .qmatmul.reference import _after


def _dense(w, like):
  """The frozen base as an array: a `QTensor` (or `KMajor`) is dequantized once `like` exists (see `_after`)."""
  return _after(w, like).dequantize() if is_quantized(w) else w


def lora_linear(x, w, a, b, scale):
  """``x W + s (x A) B`` (float32) with one GEMM for ``x [W | A]``; W is a frozen array, a `QTensor` or a `KMajor`.

  A rank-r product ``x A`` alone is a skinny GEMM that runs far below the machine's matmul rate (and ``∂A`` is
  another); appending A to W's columns makes it ride along with the base GEMM, and the backward does the same with
  ``[∂y | ∂(xA)] [W | A]ᵀ``. The custom VJP also makes sure no gradient is ever formed for the frozen W (autodiff
  of the concatenation would build the full ``xᵀ ∂y`` and slice it).

  A `QTensor` W (QLoRA on the XLA path) is dequantized in the forward pass and again in the backward pass, each
  time after its input exists (`_after`); the residual is the stored 4-bit W, never a float copy. `scale` may be
  a Python number or an array.
  """
  return _lora_linear(x, w, a, b, scale if hasattr(scale, "dtype") else jnp.float32(scale))


@jax.custom_vjp
def _lora_linear(x, w, a, b, scale):
  return _fwd(x, w, a, b, scale)[0]


def _fwd(x, w, a, b, scale):
  wa = jnp.concatenate([_dense(w, x).astype(x.dtype), a.astype(x.dtype)], axis=-1)
  y = jnp.einsum("...i,io->...o", x, wa, preferred_element_type=jnp.float32)
  out = b.shape[-1]
  low = y[..., out:]
  lora = jnp.einsum("...r,ro->...o", low.astype(x.dtype), b.astype(x.dtype), preferred_element_type=jnp.float32)
  # keep W and A apart as residuals (W is already alive as a parameter, 4-bit or not; the concatenation would be a
  # second, dense copy of every adapted weight held until the backward pass) and concatenate again there
  return y[..., :out] + scale.astype(jnp.float32) * lora, (x, w, a, low, b, scale)


def _bwd(res, dy):
  x, w, a, low, b, scale_in = res
  scale = scale_in.astype(jnp.float32)
  wa = jnp.concatenate([_dense(w, dy).astype(x.dtype), a.astype(x.dtype)], axis=-1)
  dlow = scale * jnp.einsum("...o,ro->...r", dy, b.astype(jnp.float32))
  dx = jnp.einsum("...o,io->...i", jnp.concatenate([dy, dlow], axis=-1).astype(x.dtype), wa,
                  preferred_element_type=jnp.float32).astype(x.dtype)
  x2 = x.reshape(-1, x.shape[-1])
  da = jnp.einsum("ni,nr->ir", x2, dlow.reshape(-1, dlow.shape[-1]).astype(x.dtype),
                  preferred_element_type=jnp.float32)
  db = scale * jnp.einsum("nr,no->ro", low.reshape(-1, low.shape[-1]), dy.reshape(-1, dy.shape[-1]))
  dscale = jnp.sum(jnp.einsum("nr,ro->no", low.reshape(-1, low.shape[-1]), b.astype(jnp.float32))
                   * dy.reshape(-1, dy.shape[-1]))
  return dx, None, da.astype(a.dtype), db.astype(b.dtype), dscale.astype(scale_in.dtype)  # None: W is frozen


_lora_linear.defvjp(_fwd, _bwd)


__all__ = ["lora_linear"]
