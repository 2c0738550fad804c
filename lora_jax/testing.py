"""Test helpers: the one tolerance table and pytree assertions.

Every numeric comparison in the test-suite takes its tolerance from `TOLS` by name; none is written inline.
Never loosen an entry to make a test pass: find the bug, or re-pin deliberately with a reason.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Tol:
  rtol: float
  atol: float
  source: str


TOLS = {
    # single f32 op (norm, rope, attention core) against a float64 numpy reference
    "f32_op": Tol(1e-5, 1e-6, "levanter '1e-5 for simpler'; equinox rtol 1e-5"),
    # f32 composite computations (a whole model, merged vs unmerged) against a float64 or float32 reference
    "f32_composite": Tol(1e-4, 1e-4, "levanter '1e-4 for more complex'"),
    # f32 logits of a real checkpoint against transformers (issue 'Foundation': max |Δlogit| <= 2e-4)
    "parity_logits_f32": Tol(0.0, 2e-4, "issue 'Foundation' target"),
    # perplexity against transformers: relative difference <= 1e-4
    "parity_perplexity": Tol(1e-4, 0.0, "issue 'Foundation' target"),
    # KL divergence of float32 logits (`quant.drift`) against float64: each term keeps its relative precision
    # (float32 softmax and sums over the vocabulary); atol sits far below the KL of logits 1e-6 apart (~1e-13)
    "kl_f32": Tol(1e-4, 1e-16, "float32 sums over ~1e3 terms; atol below the smallest KL measured"),
    "bf16": Tol(2e-2, 2e-2, "≈2×eps (eps = 2⁻⁷)"),
    # a float32 dot on a GPU's matrix units (tf32: 10-bit mantissa, eps = 2⁻¹¹), values normalised by max |ref|
    "tf32": Tol(5e-3, 5e-3, "≈10×eps of tf32; device METHOD.md: tf32 lands near 3e-4 relative norm error"),
    "f16": Tol(2e-3, 5e-2, "rtol ≈2×eps; jax fp16 atol 0.05"),
}


def assert_allclose(actual, desired, tol: str, err_msg: str = "") -> None:
  t = TOLS[tol]
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(desired, np.float64),
                             rtol=t.rtol, atol=t.atol, err_msg=f"[{tol}] {err_msg}")


def max_abs_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_trees_all_close(actual, desired, tol: str) -> None:
  for path, a, d in _paired_leaves(actual, desired):
    assert_allclose(a, d, tol, err_msg=jax.tree_util.keystr(path))


def assert_trees_all_equal(actual, desired) -> None:
  for path, a, d in _paired_leaves(actual, desired):
    np.testing.assert_array_equal(_host(a), _host(d), err_msg=jax.tree_util.keystr(path))


def _paired_leaves(actual, desired):
  """(path, actual leaf, desired leaf) for trees of the same structure (custom pytree nodes included)."""
  assert jax.tree.structure(actual) == jax.tree.structure(desired), "tree structures differ"
  return [(p, a, d) for (p, a), d in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(desired))]


def _host(a):
  """Numpy view of a leaf; typed PRNG keys compare by their key data."""
  if hasattr(a, "dtype") and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
    a = jax.random.key_data(a)
  return np.asarray(a)


def assert_trees_all_shapes(actual, desired) -> None:
  shapes = lambda t: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), t)
  assert shapes(actual) == shapes(desired)


def random_qtensor(fmt: str, k: int, n: int, block: int | None = None, *, double_quant: bool = False,
                   param_dtype=None, seed: int = 0, std: float = 0.05):
  """A quantized (k, n) kernel of N(0, std) weights for tests (deterministic in `seed`, k and n).

  nf4 / int4_sym / int4_asym come from `quant.quantize` (`double_quant` for nf4). q4_0 / q4_1 are built as GGUF
  stores them: the int4_sym / int4_asym codes with float16 block parameters. `param_dtype` casts the block
  parameters (not of a double-quantized tensor). Under `jax.eval_shape` it gives the abstract tensor.
  """
  import jax.numpy as jnp
  from .quant import QTensor, quantize
  from .quant._quantize import DEFAULT_BLOCK
  block = block or DEFAULT_BLOCK[fmt]
  w = jax.random.normal(jax.random.key(seed + k * 7 + n), (k, n), jnp.float32) * std
  gguf = {"q4_0": "int4_sym", "q4_1": "int4_asym"}
  t = quantize(w, gguf.get(fmt, fmt), block_size=block, double_quant=double_quant and fmt == "nf4")
  if fmt in gguf:
    param_dtype = param_dtype or jnp.float16
  if param_dtype is None or t.double_quantized:
    return t
  cast = lambda a: None if a is None else a.astype(param_dtype)
  return QTensor(t.codes, cast(t.scale), cast(t.offset), fmt=fmt, block_size=block, shape=(k, n))
