"""`linear`: the one matmul every model weight goes through.

Model code calls ``linear(x, w)`` and never ``x @ w`` directly, so a weight can later be replaced
by another pytree node (a LoRA weight, a quantized tensor) without touching the model. Plain arrays
use a dot that accumulates in float32 and returns the activation dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def linear(x: Float[Array, "... i"], w, bias: Float[Array, "o"] | None = None) -> Float[Array, "... o"]:
  """``x @ w (+ bias)`` with float32 accumulation; ``w`` has layout (in, out)."""
  if isinstance(w, jax.Array) or hasattr(w, "__array__"):
    y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
  else:
    y = w.linear(x)  # adapter / quantized weight nodes implement their own (fused) product
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)
