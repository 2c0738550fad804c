"""Reference 4-bit matmul: dequantize the whole kernel, then one dot with float32 accumulation. Runs everywhere."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ...quant._qtensor import QTensor, dequantize
from .kmajor import as_qtensor


def qmatmul_reference(x, w: QTensor):
  """``x @ dequantize(w)`` accumulated in float32; returns float32 (..., N). `w` may be a `KMajor`."""
  w = as_qtensor(w)
  return jnp.einsum("...k,kn->...n", x, dequantize(w).astype(x.dtype), preferred_element_type=jnp.float32)


def _after(w: QTensor, x, field: str = "codes") -> QTensor:
  """`w` with its codes made to depend on `x` by adding a zero computed from it (``(x₀ != x₀) & (x₀ == x₀)``,
  false for every value, NaN included; XLA does not fold float self-comparisons), so that XLA cannot start the
  dequantization before `x` exists. Without it, XLA hoists the dequantization of a loop-invariant weight out of a
  decode loop, and XLA:CPU's default scheduler dequantizes every layer of an unrolled program up front: either way
  the whole base is held in float32 at once (405 MB of temporaries for SmolLM2 with an NF4 base; ≈14 MB with
  this). The add fuses into the dequantization. Not for the codes of the kernels (Pallas, CPU), whose custom
  calls would read a modified copy. Applied inside the custom VJPs, so the residual kept for the backward pass is
  the stored `w`.
  Costs: under `vmap` over `x` the codes (and so the dequantized kernel) gain the batch axis; under SPMD
  sharding of `x` the scalar x₀ would be broadcast from its device at each call (the library does not shard yet;
  a per-shard dependency via shard_map would avoid that). ``field="scale"`` ties the (int8, double-quantized)
  scales instead, for the CPU kernel, which reads the codes as stored and forms those scales before the call."""
  if x.size == 0:
    return w
  x0 = x.reshape(-1)[0]
  zero = (x0 != x0) & (x0 == x0)
  a = getattr(w, field)
  return dataclasses.replace(w, **{field: a + zero.astype(a.dtype)})
