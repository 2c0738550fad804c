"""The C++ CPU 4-bit matmul (XLA FFI) against the reference: formats, block sizes, parameter dtypes, row counts
(one to several passes of 4 rows), column counts that do not fill a vector, the threaded path; its build."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import LoraJaxError
from lora_jax.kernels import CPU_M_MAX, qmatmul, qmatmul_reference
from lora_jax.kernels.qmatmul import cpu
from lora_jax.quant import QTensor
from lora_jax.testing import assert_allclose, random_qtensor


@pytest.fixture(autouse=True, scope="module")
def _kernel():
  """Where a C++ compiler exists the kernel must build (a failure is a failure); without one it is skipped."""
  if cpu._compiler() is None:
    pytest.skip("no C++ compiler on this machine: qmatmul keeps its XLA paths")
  ok, why = cpu.available()
  assert ok, why


def _q(fmt, k, n, block, param_dtype=jnp.float32, double_quant=False, seed=0):
  return random_qtensor(fmt, k, n, block, param_dtype=param_dtype, double_quant=double_quant, seed=seed)


def _want(x, w):
  with jax.default_matmul_precision("highest"):
    return qmatmul_reference(x, w)


FORMATS = [("nf4", 64), ("int4_sym", 32), ("int4_sym", 128), ("int4_asym", 64), ("q4_0", 32), ("q4_1", 32)]
SHAPES = [(576, 192), (576, 1536), (1536, 576), (256, 100), (128, 8)]  # 576x1536: two threads; 100, 8: tail columns


CASES = [(m, k, n, fmt, block) for m in (1, 3, 6, CPU_M_MAX) for (k, n) in SHAPES for (fmt, block) in FORMATS
         if k % block == 0]


@pytest.mark.parametrize("m,k,n,fmt,block", CASES, ids=lambda v: str(v))
def test_matches_reference(m, k, n, fmt, block):
  w = _q(fmt, k, n, block, jnp.float16 if fmt.startswith("q4") else jnp.float32)
  x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32)
  got = jax.jit(cpu.qmatmul_cpu)(x, w)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  assert_allclose(got, _want(x, w), "f32_composite")


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("fmt", ["int4_asym", "q4_1"])
def test_block_parameter_dtypes(fmt, param_dtype):
  w = _q(fmt, 1536, 576, 32, param_dtype)
  x = jax.random.normal(jax.random.key(1), (2, 1536))
  assert_allclose(cpu.qmatmul_cpu(x, w), _want(x, w), "f32_composite")


def test_double_quantized_leading_axes_and_bf16_activations():
  w = _q("nf4", 512, 160, 64, double_quant=True)
  x = jax.random.normal(jax.random.key(2), (2, 3, 512))
  assert_allclose(cpu.qmatmul_cpu(x, w), _want(x, w), "f32_composite")
  xb = x.astype(jnp.bfloat16)  # widened to float32 exactly, so the product is the reference's on the same input
  assert_allclose(cpu.qmatmul_cpu(xb, w), _want(xb.astype(jnp.float32), w), "f32_composite")


@pytest.mark.parametrize("fmt,block", [("q4_1", 32), ("int4_asym", 64), ("nf4", 64)])
def test_rows_are_independent_and_non_finite_inputs(fmt, block):
  """A NaN or inf in one row leaves the others exact (rows share a pass over the codes, not accumulators), and
  an inf gives the reference's ±inf, not the NaN of the offset term's inf − inf."""
  w = _q(fmt, 576, 200, block, jnp.float16 if fmt == "q4_1" else jnp.float32)
  x = jax.random.normal(jax.random.key(3), (7, 576)).at[2, 5].set(jnp.nan).at[5, 0].set(jnp.inf)
  got, want = np.asarray(cpu.qmatmul_cpu(x, w)), np.asarray(_want(x, w))
  assert np.isnan(got[2]).all() and np.isinf(want[5]).any()
  assert_allclose(got, want, "f32_composite")  # NaN and ±inf where the reference has them, the rest close
  assert cpu.qmatmul_cpu(jnp.zeros((0, 576)), w).shape == (0, 200)


def _every_finite_half_as_scale(n_extra=0):
  """A one-block q4_0 tensor whose scales are every finite float16 (plus `n_extra` repeated ones, which land in
  the columns that do not fill a vector), codes 9 (value 1): row e₀ of the product is the scales themselves."""
  halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
  halves = halves[np.isfinite(halves)]
  halves = np.concatenate([halves, halves[:n_extra]])
  n = halves.size
  w = QTensor(jnp.full((16, n), 0x99, jnp.uint8), jnp.asarray(halves)[None], fmt="q4_0", block_size=32, shape=(32, n))
  return w, jnp.zeros((1, 32)).at[0, 0].set(1.0), halves.astype(np.float32)


def test_every_finite_float16_scale_is_read_exactly():
  w, x, want = _every_finite_half_as_scale(n_extra=7)
  np.testing.assert_array_equal(np.asarray(cpu.qmatmul_cpu(x, w))[0], want)


def test_inside_loops_vmap_and_through_qmatmul():
  w = _q("nf4", 576, 192, 64)
  xs = jax.random.normal(jax.random.key(4), (5, 1, 576))
  want = jnp.stack([_want(x, w) for x in xs])
  batched = jax.vmap(cpu.qmatmul_cpu, in_axes=(0, None))
  assert_allclose(batched(xs, w), want, "f32_composite")
  jaxpr = str(jax.make_jaxpr(batched)(xs, w))  # the batch joins the rows: one call, no loop over examples
  assert jaxpr.count("ffi_call") == 1 and "while" not in jaxpr and "scan" not in jaxpr
  stacked = jax.tree.map(lambda a: jnp.stack([a] * 5), w)  # weight batched too: one call per example
  assert_allclose(jax.vmap(cpu.qmatmul_cpu)(xs, stacked), want, "f32_composite")
  scanned = jax.jit(lambda xs: jax.lax.scan(lambda c, x: (c, qmatmul(x, w, impl="cpu")), 0, xs)[1])(xs)
  assert_allclose(scanned, want, "f32_composite")
  assert_allclose(qmatmul(xs[0], w), want[0], "f32_composite")  # auto picks the kernel for one row on CPU


def test_stacked_kernels_are_not_taken():
  w = _q("nf4", 256, 64, 64)
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), w)
  assert cpu.supports(jnp.ones((1, 256)), stacked)[0] is False
  with pytest.raises(LoraJaxError, match="stacked kernel"):
    qmatmul(jnp.ones((1, 256)), stacked, impl="cpu")


def test_build_failure_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
  monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path))
  stale = tmp_path / "kernels" / ".build-old.so"  # as a process killed while compiling leaves it
  stale.parent.mkdir()
  stale.write_bytes(b"half")
  os.utime(stale, (0, 0))
  monkeypatch.setenv("CXX", "env false")  # a "compiler" (with an argument) that always fails
  with pytest.raises(RuntimeError, match="compiling cpu_kernel.cc failed"):
    cpu.build()
  assert list((tmp_path / "kernels").iterdir()) == []  # no half-written library, the stale one gone
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  with pytest.raises(RuntimeError, match="no-such-compiler-here.*not on the PATH"):
    cpu.build()


def test_build_is_cached_by_content(tmp_path, monkeypatch):
  monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path))
  lib = cpu.build()
  assert lib.parent == tmp_path / "kernels" and lib.stat().st_size > 0
  assert cpu.vector_isa() in ("avx512", "avx2", "generic")
  mtime = os.stat(lib).st_mtime_ns
  assert cpu.build() == lib and os.stat(lib).st_mtime_ns == mtime  # the second call reuses it
  good = lib.read_bytes()
  for damage in (lambda: lib.write_bytes(good[:20000]),                 # truncated: dlopen would crash the process
                 lambda: cpu._digest_path(lib).unlink()):               # or a library this cache did not record
    damage()
    assert cpu.build() == lib and lib.read_bytes() == good and cpu._intact(lib)  # rebuilt, not loaded as it was


@pytest.mark.parametrize("march,isa", [("x86-64-v3", 1), ("x86-64", 0)])
def test_avx2_and_generic_builds_match_reference(march, isa, tmp_path, monkeypatch):
  """The unpacking has one code path per instruction set; this machine's build covers its own, these the others
  (compiled for an older x86-64 target, which this CPU also runs)."""
  if cpu.vector_isa() == "generic" or not os.uname().machine == "x86_64":
    pytest.skip("needs an x86-64 CPU with AVX2")
  import ctypes
  monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path))
  flags = tuple(f"-march={march}" if f == "-march=native" else f for f in cpu.FLAGS)
  lib = ctypes.cdll.LoadLibrary(str(cpu.build(flags)))
  assert lib.LjQmatmulCpuVectorIsa() == isa
  target = f"lora_jax_test_qmatmul_{march.replace('-', '_')}"
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.LjQmatmulCpu), platform="cpu")
  for fmt, block, dt, (m, k, n) in [("nf4", 64, jnp.float32, (5, 576, 200)), ("q4_1", 32, jnp.float16, (2, 256, 72)),
                                    ("int4_sym", 32, jnp.bfloat16, (1, 128, 16))]:
    w = _q(fmt, k, n, block, dt)
    x = jax.random.normal(jax.random.key(m), (m, k))
    assert_allclose(cpu._call(target, x, w), _want(x, w), "f32_composite", err_msg=f"{march} {fmt}")
  w, x, want = _every_finite_half_as_scale(n_extra=3)  # the scalar half -> float conversion on every value
  np.testing.assert_array_equal(np.asarray(cpu._call(target, x, w))[0], want)


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_vmap_over_examples_keeps_one_weight(impl):
  """`qmatmul` under vmap over x alone (per-example calls of a model): the dependency that keeps XLA from
  dequantizing early (`_after`) must not give the weight the batch axis: the CPU kernel on a double-quantized NF4
  base is one call for the whole batch (no loop over examples), and the reference dequantizes the kernel once
  (no (B, K, N) float array); both equal the per-example results."""
  from lora_jax.quant import quantize
  w = quantize(jax.random.normal(jax.random.key(0), (576, 192)) * 0.05, "nf4", block_size=64, double_quant=True)
  xs = jax.random.normal(jax.random.key(4), (5, 1, 576))
  f = jax.vmap(lambda x: qmatmul(x, w, impl=impl))
  want = jnp.stack([qmatmul(x, w, impl=impl) for x in xs])
  assert_allclose(f(xs), want, "f32_composite")
  jaxpr = str(jax.make_jaxpr(f)(xs))
  assert "while" not in jaxpr and "scan" not in jaxpr and "f32[5,576,192]" not in jaxpr, jaxpr
  if impl == "cpu":
    assert jaxpr.count("ffi_call") == 1
