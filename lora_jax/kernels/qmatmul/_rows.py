"""Row tiles that run past the activation's rows, for the Pallas kernels.

A kernel's row tile holds bm rows (a tensor-core dot needs 16 or more); a call may have fewer, or a count that no
tile size divides. Rather than pad x with an XLA op before the call and slice the result after it, the kernels read
x as the caller holds it, (m, K), and write an (m, N) result: in the last row tile the rows past the m-th are masked
off on load (read as zeros, never fetched: on a GPU that memory is not x's) and on store (never written). Row j of
a product depends on row j of x alone, so the masked rows change nothing else. When bm divides m nothing is masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


class Rows:
  """This program's row tile (grid axis 0, tiles of bm rows) of an m-row activation. Make it at the kernel's top
  level, outside its loops (it reads the program id)."""

  def __init__(self, m: int, bm: int):
    self.partial = m % bm != 0  # known when tracing: only then are loads and stores masked
    self.valid = m - pl.program_id(0) * bm if self.partial else None  # rows of this tile that hold rows of x

  def _mask(self, shape):
    return jax.lax.broadcasted_iota(jnp.int32, shape, 0) < self.valid

  def load(self, view):
    """`view` (a ref or a ``ref.at[...]`` view whose first axis is the tile's bm rows), rows past m as zeros."""
    if not self.partial:
      return view[...]
    return pltriton.load(view, mask=self._mask(view.shape), other=0)

  def store(self, ref, value) -> None:
    """Stores the (bm, ...) `value` into `ref`, the rows past m left unwritten."""
    if not self.partial:
      ref[...] = value
    else:
      pltriton.store(ref, value, mask=self._mask(value.shape))
