"""The Pallas kernels' loop over their share of K, with the loads of each step optionally issued a step ahead."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def k_loop(steps: int, acc, step, issue=None):
  """`acc` after ``step(t, acc, loaded)`` for t = 0 .. steps - 1 (a `fori_loop`).

  Without `issue`, ``loaded`` is None: the step loads what it needs where it first needs it. With `issue`
  (``BlockSizes.prefetch``), ``loaded = issue(t)``, made during step t - 1 (step 0's before the loop) and carried
  in registers, so each load has a whole step to arrive; the last step issues its own loads again rather than
  read past its share of K."""
  if issue is None:
    return jax.lax.fori_loop(0, steps, lambda t, acc: step(t, acc, None), acc)

  def prefetched(t, carry):
    acc, loaded = carry
    acc = step(t, acc, loaded)  # step t's arithmetic first, then step t + 1's loads: the order traced is the order
    return acc, issue(jnp.minimum(t + 1, steps - 1))  # Triton schedules
  return jax.lax.fori_loop(0, steps, prefetched, (acc, issue(0)))[0]
