"""Reference 4-bit matmul: dequantize the whole kernel, then one dot with float32 accumulation. Runs everywhere."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ...quant._qtensor import QTensor


def qmatmul_reference(x, w: QTensor):
  """``x @ dequantize(w)`` accumulated in float32; returns float32 (..., N). `w` may be a `KMajor` (dequantized
  from its own layout)."""
  return jnp.einsum("...k,kn->...n", x, w.dequantize().astype(x.dtype), preferred_element_type=jnp.float32)


def _after(w: QTensor, x, field: str = "codes") -> QTensor:
  """`w` with its codes made to depend on `x` by adding a zero computed from it (``(x₀ != x₀) & (x₀ == x₀)``,
  false for every value, NaN included; XLA does not fold float self-comparisons), so that XLA cannot start the
  dequantization before `x` exists. Without it, XLA hoists the dequantization of a loop-invariant weight out of a
  decode loop, and XLA:CPU's default scheduler dequantizes every layer of an unrolled program up front: either way
  the whole base is held in float32 at once (405 MB of temporaries for SmolLM2 with an NF4 base; ≈14 MB with
  this). The add fuses into the dequantization. Not for the codes of the kernels (Pallas, CPU), whose custom
  calls would read a modified copy. Applied inside the custom VJPs, so the residual kept for the backward pass is
  the stored `w`.
  Under `vmap` over `x` the tie takes x₀ of the first example (`_tie`'s batching rule), so the codes (and so the
  dequantized kernel, or the CPU kernel's call) do not gain the batch axis. Under SPMD sharding of `x` the scalar
  x₀ would be broadcast from its device at each call (the library does not shard yet; a per-shard dependency via
  shard_map would avoid that). ``field="scale"`` ties the (int8, double-quantized) scales instead, for the CPU
  kernel, which reads the codes as stored and forms those scales before the call."""
  if x.size == 0:
    return w
  a = getattr(w, field)
  return dataclasses.replace(w, **{field: _tie(a, x.reshape(-1)[0])})


@jax.custom_batching.custom_vmap
def _tie(a, x0):
  """`a` plus a zero computed from the scalar `x0` (`_after`)."""
  zero = (x0 != x0) & (x0 == x0)
  return a + zero.astype(a.dtype)


@_tie.def_vmap
def _tie_rule(axis_size, in_batched, a, x0):
  """Batched x₀: the first example's stands for all (the tie orders the computation; its value is zero whatever
  x₀ is), so an unbatched `a` stays unbatched: one dequantization per weight, not one per example."""
  a_batched, x_batched = in_batched
  return _tie(a, x0[0] if x_batched else x0), a_batched
