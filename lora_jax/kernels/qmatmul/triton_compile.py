"""Compiling the Pallas GPU kernel to machine code for an NVIDIA Hopper GPU (sm_90: H100 / H200) without a GPU.

JAX lowers a jitted call for CUDA on any machine (``.lower(lowering_platforms=("cuda",))``); for a `pallas_call` that
runs JAX's Pallas-to-Triton lowering rules and embeds the kernel's Triton IR in the program. On a GPU, XLA then
compiles that IR with its own copy of Triton. Here the IR is captured as text and compiled by the ``triton``
package (pinned in the ``test`` extra) for sm_90 down to a cubin with the ``ptxas`` it ships, whose ``-v`` report
gives the kernel's registers, spills and, from Triton, its shared memory; the ``nvdisasm`` it ships turns the cubin
into machine code (SASS), whose main loop's instructions say how much work each weight costs. So an unsupported
op, a tile that does not fit, or register spilling shows up on CPU, in CI, before a GPU is ever lent.

What this does not show: the kernel's numbers on a GPU (interpret mode checks the semantics on CPU) and its speed
(instruction counts bound it from below, nothing more); nor whether XLA's Triton (a different version from the
package's) makes the same choices.
Uses a private JAX hook (the Pallas Triton lowering function) to read the IR.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

SM90_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one block may use on sm_90 (H100 / H200)
SM90_REGISTERS = 255        # registers per thread at most


def triton_kernels(fn, *args) -> list[dict]:
  """Lowers ``jax.jit(fn)(*args)`` for CUDA (args may be `jax.ShapeDtypeStruct`s) and returns, for each Pallas
  kernel in it, ``{"ir": Triton IR text, "num_warps": .., "num_stages": ..}``. Raises whatever the lowering raises
  (an op or shape the Pallas Triton lowering does not support)."""
  from jax._src.pallas.triton import pallas_call_registration as registration

  irs: list[str] = []
  lower = registration.lowering.lower_jaxpr_to_triton_module

  def capture(*a, **k):
    result = lower(*a, **k)
    irs.append(result.module.operation.get_asm())
    return result

  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = lower
  launches = re.findall(r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", text)
  if len(launches) != len(irs):
    raise RuntimeError(f"found {len(irs)} Triton kernels but {len(launches)} launch configurations in the program")
  return [{"ir": ir, "num_stages": int(s), "num_warps": int(w)} for ir, (s, w) in zip(irs, launches)]


class IRVersionMismatch(RuntimeError):
  """The triton package cannot read the IR JAX's lowering wrote (a different Triton version): nothing is known
  about the kernel. Never raised for a pair in `IR_COMPATIBLE`: there a parse failure is the kernel's error."""


IR_COMPATIBLE = {("0.10.2", "3.5.1")}  # (jax, triton) versions seen reading each other's Triton IR (CI's pair)


def _cuda_tool(name: str) -> str:
  """The triton package's bundled CUDA binary `name` (ptxas, nvdisasm), else one on the PATH."""
  import triton
  bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
  found = str(bundled) if bundled.exists() else shutil.which(name)
  if not found:
    raise RuntimeError(f"no {name}: neither the triton package's nor one on the PATH")
  return found


_SASS_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_BRANCH_TARGET = re.compile(r"\b(?:BRA|JMP)(?:\.\w+)*\s+`?\((\.L_x_\d+)\)")


def sass_loop(sass: str) -> dict:
  """The machine code's main loop, from ``nvdisasm`` text: the longest span that a branch jumps back over (the
  kernel's loop over K; software pipelining does not unroll it). Returns its length in instructions and its
  opcodes counted by base name (``I2F.F32.S32`` counts as ``I2F``), plus the kernel's whole length. Raises if
  there is no such loop."""
  ops, labels, loops = [], {}, []
  for line in sass.splitlines():
    label = _SASS_LABEL.match(line)
    if label:
      labels[label.group(1)] = len(ops)
      continue
    ins = _SASS_INSTRUCTION.match(line)
    if not ins:
      continue
    if ins.group(1) in ("BRA", "JMP"):
      target = _SASS_BRANCH_TARGET.search(line)
      if target and labels.get(target.group(1), len(ops)) < len(ops):  # a backward branch closes a loop
        loops.append((labels[target.group(1)], len(ops)))
    ops.append(ins.group(1))
  if not ops:
    raise RuntimeError("no SASS instructions in nvdisasm's output")
  if not loops:  # a zero-length loop would read as a zero cost: say so instead
    raise RuntimeError(f"no loop (backward branch to a label) in {len(ops)} SASS instructions")
  start, end = max(loops, key=lambda span: span[1] - span[0])
  counts: dict[str, int] = {}
  for op in ops[start:end + 1]:
    counts[op] = counts.get(op, 0) + 1
  return {"instructions": len(ops), "loop_instructions": end + 1 - start,
          "loop_ops": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}


def compile_sm90(kernel: dict) -> dict:
  """Compiles one `triton_kernels` entry for sm_90 with the ``triton`` package; returns shared memory (bytes),
  registers per thread, spill bytes (stores + loads), PTX size, and the cubin's main loop (`sass_loop`: its
  instructions by opcode, from ``nvdisasm``). Raises on a compile failure;
  `IRVersionMismatch` when the package cannot even parse the IR of an untested (jax, triton) pair."""
  import triton
  from triton.backends.compiler import GPUTarget

  with tempfile.TemporaryDirectory(prefix="lj-triton-") as tmp:
    src = Path(tmp) / "kernel.ttir"
    with _env(TRITON_CACHE_DIR=tmp):
      try:
        src.write_text(_ttir_passes(kernel["ir"]))
        compiled = triton.compile(str(src), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": kernel["num_warps"], "num_stages": kernel["num_stages"]})
      except RuntimeError as e:
        if "Parse MLIR" in str(e) and (jax.__version__, triton.__version__) not in IR_COMPATIBLE:  # version skew
          raise IRVersionMismatch(f"triton {triton.__version__} cannot parse the Triton IR that jax "
                                  f"{jax.__version__} emits (pin a triton matching jaxlib's)") from e
        raise
    ptx = Path(tmp) / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    arch = re.search(r"^\.target (\S+)", compiled.asm["ptx"], re.M).group(1)
    report = subprocess.run([_cuda_tool("ptxas"), f"-arch={arch}", "-v", str(ptx), "-o", os.devnull],
                            capture_output=True, text=True, check=True)
    cubin = Path(tmp) / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([_cuda_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
  out = report.stdout + report.stderr
  regs = re.search(r"Used (\d+) registers", out)
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
  if not regs or not spills:
    raise RuntimeError(f"unexpected ptxas report:\n{out}")
  return {"arch": arch, "shared_bytes": int(compiled.metadata.shared), "registers": int(regs.group(1)),
          "spill_bytes": int(spills.group(1)) + int(spills.group(2)), "ptx_lines": compiled.asm["ptx"].count("\n"),
          "num_warps": kernel["num_warps"], "num_stages": kernel["num_stages"], **sass_loop(sass)}


def _ttir_passes(ir_text: str) -> str:
  """The Triton IR after the passes Triton's own front end runs before layouts are assigned (the CUDA backend's
  ``make_ttir``: canonicalization, combining ``acc + dot(a, b, 0)`` into ``dot(a, b, acc)``, CSE, ...), which
  XLA's Triton pipeline runs too; ``triton.compile`` on an IR file starts after them. Raises what parsing raises."""
  from triton._C.libtriton import ir
  from triton.backends.compiler import GPUTarget
  from triton.backends.nvidia.compiler import CUDABackend

  backend = CUDABackend(GPUTarget("cuda", 90, 32))
  context = ir.context()
  ir.load_dialects(context)
  backend.load_dialects(context)
  with tempfile.NamedTemporaryFile("w", suffix=".ttir") as f:
    f.write(ir_text)
    f.flush()
    module = ir.parse_mlir_module(f.name, context)
  module.context = context
  return str(backend.make_ttir(module, {}, backend.parse_options({}), 90))


def qmatmul_sm90(m: int, w, blocks, dtype=None) -> dict:
  """`compile_sm90` of `qmatmul_pallas` for (m × K) activations (bf16 unless `dtype`) and the QTensor `w` (its
  shapes suffice: ``jax.eval_shape``) under the policy `blocks`, plus its K loop per weight: "per_weight" (thread-
  instructions per weight) and "per_weight_ops" (by opcode), where one loop step covers bk quantization blocks
  × bn columns on num_warps × 32 threads."""
  import jax.numpy as jnp
  from .pallas_gpu import call_blocks, qmatmul_pallas
  k, n = w.shape
  (kernel,) = triton_kernels(lambda x, w: qmatmul_pallas(x, w, blocks=blocks),
                             jax.ShapeDtypeStruct((m, k), dtype or jnp.bfloat16), w)
  report = compile_sm90(kernel)
  bs = call_blocks(m, w, blocks)
  per_step = bs.bk * w.block_size * bs.bn / (bs.num_warps * 32)  # weights per thread per loop step
  report["per_weight"] = report["loop_instructions"] / per_step
  report["per_weight_ops"] = {op: c / per_step for op, c in report["loop_ops"].items()}
  return report


@contextlib.contextmanager
def _env(**values):
  old = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


__all__ = ["IRVersionMismatch", "IR_COMPATIBLE", "SM90_REGISTERS", "SM90_SHARED_BYTES", "compile_sm90",
           "qmatmul_sm90", "sass_loop", "triton_kernels"]
