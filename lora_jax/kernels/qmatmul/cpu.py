"""The CPU 4-bit matmul for a few rows (decoding): a C++ kernel (`cpu_kernel.cc`) called through XLA's FFI.

XLA:CPU has no narrow-weight dot: whatever the formulation (dequantize + dot, the `small_m` multiply-reduce, bf16
or int8 weights), it widens the weight to float32 first, so a 4-bit base decodes slower than a float32 one
(benchmarks/results/int4_matmul_cpu.json). The kernel streams the packed codes once, maps codes to values with
one vector permute (NF4) or conversion (integer formats) and never writes the dequantized weight (see the header of `cpu_kernel.cc`).

The source is compiled on first use with the host's C++ compiler (``$CXX``, else ``g++``/``c++``/``clang++``;
``-O3 -march=native``, against the FFI headers jaxlib ships) into ``$LORA_JAX_CACHE/kernels/`` under a name
that hashes the source, the flags, the compiler and jaxlib versions and the host CPU, written to a temp name and
renamed, so concurrent processes never load a half-written library. Where no compiler works, `available()` says
why and `qmatmul` keeps its XLA paths (logged once). ``LORA_JAX_CPU_KERNEL=0`` disables the kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import shlex
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..._errors import LoraJaxError
from ...quant._qtensor import NF4_TABLE, QTensor

TARGET = "lora_jax_qmatmul_cpu"
SOURCE = Path(__file__).with_name("cpu_kernel.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-Wno-psabi")
CPU_M_MAX = 64  # rows (product of x's leading axes) up to which `qmatmul` picks the kernel on CPU: it beats
# dequantize + dot there (576x1536 NF4: 343 vs 502 us at 64 rows; 4096x4096: 6.6 vs 16.7 ms), not far above
MIN_PARALLEL_WEIGHTS = 1 << 18  # smaller weights run on one thread (waking a second costs more than it saves)

# value table per format: w = TABLE[q] · scale (+ offset)
_TABLES = {"nf4": NF4_TABLE, "int4_sym": np.arange(16, dtype=np.float32) - 8, "q4_0": np.arange(16, dtype=np.float32) - 8,
           "int4_asym": np.arange(16, dtype=np.float32), "q4_1": np.arange(16, dtype=np.float32)}
_PARAM_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


def _compiler() -> list[str] | None:
  """The compiler command: ``$CXX`` when set (it may carry arguments, e.g. "ccache g++"), else the first of g++,
  c++, clang++ on the PATH; None when there is none."""
  if os.environ.get("CXX"):
    cmd = shlex.split(os.environ["CXX"])
    return cmd if cmd and shutil.which(cmd[0]) else None
  found = next((shutil.which(c) for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
  return [found] if found else None


def _cpu_id() -> str:
  try:
    text = Path("/proc/cpuinfo").read_text()
    return next((line for line in text.splitlines() if line.startswith("flags")), "") + platform.processor()
  except OSError:
    return platform.machine() + platform.processor()


def _library_path(cxx: list[str], flags: tuple[str, ...]) -> Path:
  from ...io._assets import cache_dir
  version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, check=False).stdout
  key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), version, _jaxlib_version(), _cpu_id()])
                       .encode()).hexdigest()[:16]
  return cache_dir() / "kernels" / f"qmatmul_cpu-{key}.so"


def _jaxlib_version() -> str:
  import jaxlib
  return jaxlib.__version__


def _digest_path(lib: Path) -> Path:
  return lib.with_name(lib.name + ".sha256")


def _intact(lib: Path) -> bool:
  """Whether the cached library is the one this cache built: its sha256 as recorded beside it after the build
  (a damaged file, truncated by an interrupted copy say, would crash the process in dlopen)."""
  try:
    return _digest_path(lib).read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()
  except (OSError, UnicodeDecodeError):
    return False


def build(flags: tuple[str, ...] = FLAGS) -> Path:
  """Compile the kernel if its cached library is missing or not intact (`_intact`); returns the library's path.
  Raises RuntimeError with the compiler's message when it fails. (`flags` other than FLAGS: tests build the AVX2
  and generic variants.)"""
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError(f"no C++ compiler found ($CXX={os.environ['CXX']!r} is not on the PATH)" if
                       os.environ.get("CXX") else "no C++ compiler found (set $CXX, or install g++)")
  lib = _library_path(cxx, flags)
  if _intact(lib):
    return lib
  lib.parent.mkdir(parents=True, exist_ok=True)
  for stale in lib.parent.glob(".build-*"):  # left by a process killed while compiling
    try:
      if time.time() - stale.stat().st_mtime > 3600:
        stale.unlink(missing_ok=True)
    except FileNotFoundError:  # another process removed it first
      pass
  fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=lib.parent)
  os.close(fd)
  try:
    cmd = [*cxx, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
      raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o755 & ~umask)  # mkstemp made it owner-only: others sharing the cache could not load it
    digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
    os.replace(tmp, lib)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".sha256", dir=lib.parent)
    with os.fdopen(fd, "w") as f:
      f.write(digest + "\n")
    os.chmod(tmp, 0o644 & ~umask)
    os.replace(tmp, _digest_path(lib))
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return lib


@functools.cache
def _register() -> str:
  """Builds and registers the kernel once per process; returns '' on success, else why it is unavailable."""
  global _LIB
  with _LOCK:  # two threads tracing at once build and register once
    try:
      lib = ctypes.cdll.LoadLibrary(str(build()))
      jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.LjQmatmulCpu), platform="cpu")
    except (RuntimeError, OSError, AttributeError) as e:  # AttributeError: a library without the kernel's symbol
      return f"the CPU kernel could not be built or loaded: {e}"
    _LIB = lib
    return ""


_LIB = None
_LOCK = threading.Lock()


def vector_isa() -> str | None:
  """What the built kernel unpacks with: 'avx512', 'avx2' or 'generic' (GCC vectors, 4 lanes); None if not built."""
  if not available()[0] or _LIB is None:
    return None
  return ("generic", "avx2", "avx512")[_LIB.LjQmatmulCpuVectorIsa()]


def available() -> tuple[bool, str]:
  """(True, '') when the kernel is built and registered in this process, else (False, reason). Reads
  ``LORA_JAX_CPU_KERNEL`` at every call (programs traced while it is 0 keep the XLA paths)."""
  if os.environ.get("LORA_JAX_CPU_KERNEL", "1") == "0":
    return False, "disabled by LORA_JAX_CPU_KERNEL=0"
  why = _register()
  return not why, why


def supports(x, w: QTensor) -> tuple[bool, str]:
  """Whether `qmatmul_cpu` takes this call (a 2-D kernel with float block parameters)."""
  if getattr(w.codes, "ndim", 2) != 2:
    return False, f"stacked kernel (codes {tuple(w.codes.shape)})"
  if not w.double_quantized and w.scale.dtype not in _PARAM_DTYPES:
    return False, f"scale dtype {w.scale.dtype}"
  if w.offset is not None and w.offset.dtype not in _PARAM_DTYPES:
    return False, f"offset dtype {w.offset.dtype}"
  return True, ""


def qmatmul_cpu(x, w: QTensor):
  """``x @ dequantize(w)`` as float32 (..., N) by the C++ kernel; `x` is taken as float32 (exact for 16-bit
  floats) and the weights are used at float32 (the reference rounds the dequantized kernel to ``w.dtype`` first,
  so for a bf16 `w` the two differ at bf16 rounding). Builds and registers the kernel on first use; raises
  LoraJaxError where it cannot."""
  ok, why = available()
  if not ok:
    raise LoraJaxError(f"qmatmul impl='cpu': {why}")
  return _call(TARGET, x, w)


def _call(target: str, x, w: QTensor):
  k, n = w.shape
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k).astype(jnp.float32)
  scale = w.block_scales() if w.double_quantized else w.scale
  offset = w.offset if w.offset is not None else jnp.zeros((0,), jnp.float32)
  y = _ffi(target, w.block_size)(x2, w.codes, jnp.asarray(_TABLES[w.fmt]), scale, offset)
  return y.reshape(*lead, n)


@functools.cache
def _ffi(target: str, block_size: int):
  """The custom call (x2, codes, table, scale, offset) -> y, with a batching rule: under `vmap` over x alone
  the batch joins the rows (one pass over the codes for the whole batch, not one per example); when the weight
  is batched too, one call per example."""

  def call(x2, codes, table, scale, offset):
    out = jax.ShapeDtypeStruct((x2.shape[0], codes.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(target, out)(x2, codes, table, scale, offset, block_size=np.int64(block_size),
                                         min_parallel_weights=np.int64(MIN_PARALLEL_WEIGHTS))

  f = jax.custom_batching.custom_vmap(call)

  @f.def_vmap
  def _rule(axis_size, in_batched, x2, *w):
    x_batched, *w_batched = in_batched
    if not any(w_batched):  # x2 is (B, M, K)
      return f(x2.reshape(-1, x2.shape[-1]), *w).reshape(axis_size, x2.shape[1], -1), True
    args = (x2, *w)
    mapped = [a for a, b in zip(args, in_batched) if b]

    def one(slices):
      it = iter(slices)
      return f(*[next(it) if b else a for a, b in zip(args, in_batched)])

    return jax.lax.map(one, mapped), True

  return f


__all__ = ["CPU_M_MAX", "available", "build", "qmatmul_cpu", "supports", "vector_isa"]
