"""Reference 4-bit matmul: dequantize the whole kernel, then one dot with float32 accumulation. Runs everywhere."""

from __future__ import annotations

import jax.numpy as jnp

from ...quant._qtensor import QTensor, dequantize


def qmatmul_reference(x, w: QTensor):
  """``x @ dequantize(w)`` accumulated in float32; returns float32 (..., N)."""
  return jnp.einsum("...k,kn->...n", x, dequantize(w).astype(x.dtype), preferred_element_type=jnp.float32)
