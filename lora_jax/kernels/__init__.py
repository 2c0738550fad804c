"""Kernels behind one op each, with a pure-jnp reference beside every fast implementation.

`qmatmul(x, w)` computes ``x @ dequantize(w)`` for a `QTensor` ``w``:

* ``impl="reference"``: dequantize + dot (float32 accumulation); runs on every backend.
* ``impl="pallas"``: the Pallas GPU kernel (`kernels/qmatmul/pallas_gpu.py`); an error where it cannot run
  (unless ``interpret=True``, which runs it on CPU for tests).
* ``impl="cpu"``: the C++ CPU kernel called through XLA's FFI (`kernels/qmatmul/cpu.py`, `cpu_kernel.cc`),
  compiled on first use; it streams the packed codes and never writes the float kernel. An error where it
  cannot be built.
* ``impl="small_m"``: a multiply-reduce that XLA fuses with the nibble unpacking (`kernels/qmatmul/small_m.py`),
  reading only the packed bytes; for decoding without the CPU kernel.
* ``impl="auto"`` (default): on GPU, Pallas for 1 to `PALLAS_M_MAX[fmt]` rows when `supports(...)` holds (above
  that XLA's dequantize + cuBLAS dot was faster on an H200, and within 1.12-1.34x of a bf16 dot at M = 4096,
  where the kernel took 2.8-7.3x its time); on CPU the C++ kernel for at most
  `CPU_M_MAX` rows when it builds here, else ``small_m`` for at most `SMALL_M_MAX` rows of an int4 / GGUF
  tensor (for NF4 its select tree costs more than the dequantize + dot it replaces); the reference otherwise,
  logging the reason once.

`w` may also be a `KMajor` (`pack_kmajor` / `to_kmajor`: a 4-bit weight's codes laid out for the
tensor-core kernel that takes them as a register operand, `kernels/qmatmul/kmajor.py`): on a GPU auto takes that
Pallas kernel for 16-bit activations and up to `PALLAS_M_MAX` rows, and the reference otherwise; the CPU kernel
and small_m read the QTensor layout and refuse it.

On the XLA paths each weight's dequantization is made to depend on its input (`_after`), so XLA dequantizes one
weight at a time, right before its product, and never holds the whole base in float32 (in a decode loop it would
otherwise hoist them all out of the loop). XLA:CPU has no narrow-weight dot, so those paths decode slower than
fp32 (benchmarks/int4_matmul.py); the C++ kernel is what makes a 4-bit base decode faster than fp32 on CPU.

The op is differentiable in ``x`` through a `jax.custom_vjp` (``dx = dy · Wᵀ`` with the dequantized kernel), so a
LoRA adapter on a quantized base trains; the quantized base itself gets no gradient. `qmatmul_lora` is QLoRA's
whole linear. The Pallas kernel can also add the LoRA term inside (`qmatmul_lora_pallas`, the issue's stretch
goal), but on an H200 that was no faster than the kernel plus two small dots (0.98-1.13x), so `qmatmul_lora`
runs those.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import LoraJaxError
from .._log import log
from ..quant._qtensor import QTensor
from .qmatmul import cpu as _cpu
from .qmatmul.cpu import CPU_M_MAX, qmatmul_cpu
from .qmatmul.kmajor import KMajor, pack_kmajor, to_kmajor, unpack_kmajor
from .qmatmul.pallas_gpu import (DECODE_NF4, KMAJOR, BlockSizes, call_blocks, default_blocks, qmatmul_lora_pallas,
                                 qmatmul_pallas, supports)
from .qmatmul.reference import _after, qmatmul_reference
from .fused_lora import lora_linear
from .qmatmul.small_m import SMALL_M_MAX, qmatmul_small_m

IMPLS = ("auto", "reference", "pallas", "cpu", "small_m")
# Rows up to which auto takes the Pallas kernel on a GPU, per format: the H200 crossover with XLA's dequantize +
# dot for the tensor-core layout that ships (first run, benchmarks/results/int4_matmul_gpu_run1.json): NF4 took
# 0.48-0.99x XLA's time at M = 64 and 1.15-1.30x at 256; int4 0.85-0.97x at 256 (2.8-3.0x at 4096). int4_asym and
# the GGUF formats share int4's affine map (q4_1 one more multiply-add) and its threshold; they were not timed.
PALLAS_M_MAX = {"nf4": 64, "int4_sym": 256, "int4_asym": 256, "q4_0": 256, "q4_1": 256}
_DEFAULT_IMPL = "auto"
_LOGGED: set[str] = set()


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise LoraJaxError(f"unknown kernel implementation {impl!r}; choose one of {', '.join(IMPLS)}")


def set_default_impl(impl: str) -> None:
  """Process-wide default for `qmatmul` (one of `IMPLS`)."""
  global _DEFAULT_IMPL
  _check_impl(impl)
  _DEFAULT_IMPL = impl


def _backend() -> str:
  """The backend the dispatch decides for (a function, so tests can lower a GPU program on CPU)."""
  return jax.default_backend()


def _choose(x, w: QTensor, impl: str, interpret: bool) -> str:
  _check_impl(impl)
  if x.shape[-1:] != (w.shape[0],):
    raise LoraJaxError(f"qmatmul: x of shape {tuple(x.shape)} has {x.shape[-1] if x.ndim else 'no'} input features; "
                       f"the 4-bit weight is (K={w.shape[0]}, N={w.shape[1]})")
  backend = _backend()
  qtensor_layout = not isinstance(w, KMajor)  # the CPU kernel and small_m read a QTensor's (K/2, N) codes
  if impl in ("cpu", "small_m") and not qtensor_layout:
    raise LoraJaxError(f"the {impl} qmatmul path reads a QTensor's (K/2, N) codes, not a K-major weight "
                       f"(unpack_kmajor turns it back)")
  if impl in ("reference", "small_m"):
    return impl
  if impl == "cpu":
    if backend != "cpu":
      raise LoraJaxError(f"the CPU qmatmul kernel needs the CPU backend (backend is {backend})")
    ok, why = _cpu.supports(x, w)
    if ok:
      ok, why = _cpu.available()
    if not ok:
      raise LoraJaxError(f"the CPU qmatmul kernel cannot take this call: {why}")
    return "cpu"
  on_gpu = backend == "gpu"
  ok, why = supports(x, w)
  if impl == "pallas":
    if not (on_gpu or interpret):
      raise LoraJaxError(f"the Pallas qmatmul kernel needs a GPU (backend is {backend}); "
                         f"use impl='auto' or 'reference'")
    if not ok:
      raise LoraJaxError(f"the Pallas qmatmul kernel does not support this call: {why}")
    return "pallas"
  rows = int(np.prod(x.shape[:-1]))
  if on_gpu and ok and 0 < rows <= PALLAS_M_MAX[w.fmt]:  # no rows: XLA's path handles the empty product
    return "pallas"
  if qtensor_layout and rows <= CPU_M_MAX and backend == "cpu" and _cpu.supports(x, w)[0]:
    built, why = _cpu.available()
    if built:
      return "cpu"
    _log_once(why)
  # NF4's code-to-value select tree costs more than the bytes it saves (benchmarks/results/int4_matmul_cpu.json)
  if qtensor_layout and rows <= SMALL_M_MAX and backend == "cpu" and w.fmt != "nf4":
    return "small_m"
  if not on_gpu:
    _log_once(f"backend {backend}")
  elif not ok:
    _log_once(why)
  return "reference"


def _log_once(reason: str) -> None:
  if reason not in _LOGGED:
    _LOGGED.add(reason)
    log(f"qmatmul: using an XLA path, not a kernel ({reason})")


def qmatmul(x, w: QTensor, *, impl: str | None = None, interpret: bool = False):
  """``x @ dequantize(w)``, float32 result of shape (..., N); differentiable in `x`."""
  choice = _choose(x, w, impl or _DEFAULT_IMPL, interpret)
  return _qmatmul_vjp(choice, interpret, x, w)


def qmatmul_lora(x, w: QTensor, a, b, scale, *, impl: str | None = None, interpret: bool = False):
  """QLoRA's linear, ``x @ dequantize(w) + scale · (x a) b`` (float32, (..., N)); differentiable in x, a, b and
  scale. On the reference path the dequantized W and A share one GEMM, forward and backward (`lora_linear`:
  skinny rank-r GEMMs run far below the matmul rate on CPU). With a kernel (Pallas, CPU) or small_m (a few rows)
  it is `qmatmul` plus the two small products: the Pallas kernel with the LoRA term inside (`qmatmul_lora_pallas`)
  was no faster on an H200."""
  choice = _choose(x, w, impl or _DEFAULT_IMPL, interpret)
  scale = jnp.asarray(scale).astype(jnp.float32)  # a bf16 adapter's scale: no implicit promotion needed
  if choice == "reference":  # dequantize + one GEMM for x [W | A], as for a dense base (`lora_linear`)
    return lora_linear(x, w, a, b, scale)
  low = jnp.einsum("...i,ir->...r", x, a.astype(x.dtype), preferred_element_type=jnp.float32)
  lora = jnp.einsum("...r,ro->...o", low.astype(x.dtype), b.astype(x.dtype), preferred_element_type=jnp.float32)
  return _qmatmul_vjp(choice, interpret, x, w) + lora * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _qmatmul_vjp(choice, interpret, x, w):
  if choice == "pallas":
    return qmatmul_pallas(x, w, interpret=interpret)
  if choice == "cpu":  # reads the stored codes; only double-quantized scales are computed, after x
    return qmatmul_cpu(x, _after(w, x, field="scale") if w.double_quantized else w)
  w = _after(w, x)
  if choice == "small_m":
    return qmatmul_small_m(x, w)
  return qmatmul_reference(x, w)


def _fwd(choice, interpret, x, w):
  return _qmatmul_vjp(choice, interpret, x, w), (w, jnp.zeros((0,), x.dtype))


def _bwd(choice, interpret, res, dy):
  w, x_dtype = res  # x's dtype as an empty array: the cotangent must have the primal's dtype
  dx = jnp.einsum("...n,kn->...k", dy, _after(w, dy).dequantize().astype(jnp.float32)).astype(
      x_dtype.dtype)
  zero = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.floating)
                      else jnp.zeros_like(a), w)
  return dx, zero


_qmatmul_vjp.defvjp(_fwd, _bwd)

__all__ = ["BlockSizes", "CPU_M_MAX", "DECODE_NF4", "IMPLS", "KMAJOR", "KMajor", "PALLAS_M_MAX", "SMALL_M_MAX",
           "call_blocks", "default_blocks", "lora_linear", "pack_kmajor", "qmatmul", "qmatmul_cpu", "qmatmul_lora",
           "qmatmul_lora_pallas", "qmatmul_pallas", "qmatmul_reference", "qmatmul_small_m", "set_default_impl",
           "supports", "to_kmajor", "unpack_kmajor"]
