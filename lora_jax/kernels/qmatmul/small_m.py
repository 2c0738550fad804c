"""4-bit matmul for a few rows (decoding) as one multiply-reduce that XLA fuses with the nibble unpacking.

The reference dequantizes the whole (K, N) kernel into a float buffer and then runs a dot: on CPU, where there is
no Pallas, that writes and reads 4 bytes per weight for every decoded token. Here the product is written blockwise
as elementwise arithmetic followed by reductions::

  y[m, n] = Σ_g s[g, n] · Σ_j ( xe[m, g, j] · v(lo[g, j, n]) + xo[m, g, j] · v(hi[g, j, n]) )   (+ offsets)

with ``lo``/``hi`` the low/high nibbles of the packed codes (even/odd rows of K, see `QTensor`), ``g`` the
quantization block and ``v`` the code-to-value map without its block scale (NF4: the table; int4/q4: the code,
minus 8 when symmetric). Asymmetric formats add ``Σ_g o[g, n] · Σ_j (xe + xo)``. XLA emits the inner sum as one
reduction loop over the packed bytes (the unpacked values never reach memory), so the weight traffic is K·N/2
bytes. The work per weight grows with the number of rows, so `SMALL_M_MAX` bounds where it is used; the
dequantize-and-dot reference takes over above it. On the 2-core CPU (`benchmarks/int4_matmul.py`, one row) it
halves the time of dequantize + dot for int4 on 576×1536 and 1536×576 weights, but NF4's select tree makes it
slower than the reference there, so `qmatmul` does not pick it for NF4. It stays 3–6× slower than a float32 dot:
XLA spends more on unpacking than the 8× fewer bytes save.
"""

from __future__ import annotations

import jax.numpy as jnp

from ...quant._qtensor import QTensor, nf4_values

SMALL_M_MAX = 4  # rows (product of the leading axes of x) up to which `qmatmul` picks this path on CPU (not NF4)


def qmatmul_small_m(x, w: QTensor):
  """``x @ dequantize(w)``, float32 (..., N), without materialising the float kernel."""
  k, n = w.shape
  b = w.block_size
  g = k // b
  lead = x.shape[:-1]
  xf = x.reshape(-1, k).astype(jnp.float32)
  xe = xf[:, 0::2].reshape(-1, g, b // 2, 1)                       # rows 2i of each block
  xo = xf[:, 1::2].reshape(-1, g, b // 2, 1)                       # rows 2i + 1
  codes = w.codes.reshape(g, b // 2, n)
  lo, hi = codes & 0xF, codes >> 4
  if w.fmt == "nf4":
    v_lo, v_hi = nf4_values(lo), nf4_values(hi)
  elif w.fmt in ("int4_sym", "q4_0"):
    v_lo, v_hi = lo.astype(jnp.float32) - 8.0, hi.astype(jnp.float32) - 8.0
  else:
    v_lo, v_hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
  inner = jnp.sum(xe * v_lo + xo * v_hi, axis=-2)                  # (M, G, N)
  y = jnp.sum(inner * w.block_scales(), axis=-2)                   # (M, N)
  if w.offset is not None:
    xsum = jnp.sum(xe + xo, axis=(-2, -1))                         # (M, G)
    y = y + jnp.einsum("mg,gn->mn", xsum, w.offset.astype(jnp.float32))
  return y.reshape(*lead, n)


__all__ = ["SMALL_M_MAX", "qmatmul_small_m"]
