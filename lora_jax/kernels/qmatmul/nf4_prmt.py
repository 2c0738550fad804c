"""NF4 codes to 16-bit floats by byte permutes: the lookup of ``BlockSizes(lookup="prmt")`` on NVIDIA GPUs, and
of the K-major kernel's NF4 weights (`KMAJOR_PROGRAM`, `ptx_kmajor`; `kmajor.py`).

A packed code byte holds two NF4 codes (low nibble: an even row of K, high nibble: the next odd row). The 16
table values, rounded to bfloat16 (or float16), are 32 bytes: their low bytes in four 32-bit words and their high
bytes in four more. PTX's byte permute ``prmt.b32 d, a, b, c`` builds each byte of d from one of the 8 bytes of
{b, a}, chosen by a 3-bit field of c: so a code's low 3 bits index one half of the table (codes 0-7 or 8-15) and
its fourth bit picks the half. The permute reads its four selectors from the low 16 bits of c, which for a word
of four code bytes are exactly the four codes of its first two bytes: the selectors need only masking to their
low 3 bits (a set fourth bit would make the permute replicate a sign). For 8 codes (4 bytes) the program below is
24 integer instructions (3 per weight), against 15 selects per weight for NF4's select tree and a load per
weight for its table gather.

A permute's first data operand must be a register in the machine code (its second may be an immediate). A
constant table word, or one loaded once by the kernel, is uniform across the warp, and ptxas keeps such words
in uniform registers and copies one into a register before every permute that reads it (about 10 moves per word
of 8 codes in the K-major kernel's loop). So the words permutes take first (`REGISTER_WORDS`) are emitted as
``zero ^ word``, where ``zero = %lanemask_eq & %lanemask_lt`` is 0 in every lane (a lane's own bit and the bits
below it are disjoint) but is a per-lane value ptxas does not fold: it computes the four words once, outside the
loop, and keeps them in ordinary registers (compiled for sm_90, that removed 1.3 of the K-major NF4 loop's then
6.3 instructions per weight; benchmarks/pallas_compile_sm90.py counts them).

The program is written once (`PROGRAM`) as straight-line three-address code over 32-bit words, and is both
emitted as PTX (`ptx`, for ``pallas.triton.elementwise_inline_asm``) and executed by a numpy model of the same
instructions (`run`), which the tests check against the table over all 256 code bytes. The GPU tests check the
kernel itself. The interpret-mode kernel (CPU) looks the codes up in `table16` directly: the same values.
"""

from __future__ import annotations

import functools

import numpy as np

from ...quant._qtensor import NF4_TABLE

# Straight-line code over 32-bit words: (op, destination, sources). Sources are names or integer immediates.
# Inputs: "codes" (eight codes: four code bytes); "t_lo0".."t_lo3", "t_hi0".."t_hi3" (the table's low / high
# bytes, four entries per word: word j holds entries 4j..4j+3).
#
# The selectors, for all eight codes at once: a permute reads its four selectors from the low 16 bits of its
# third operand, so the low half-word's codes are looked up from these words as they are and the high half-word's
# from them shifted by 16.
_SELECTORS = (
    ("and", "sel", ("codes", 0x77777777)),             # each code's low 3 bits: the byte within a half table
    ("and", "b3", ("codes", 0x88888888)),              # each code's fourth bit
    ("shr", "b3s", ("b3", 1)),
    ("or", "msel", ("b3", "b3s")),                      # per code: 0xC (fourth bit set) or 0 (not)
    ("shr", "sel_hi", ("sel", 16)),
    ("shr", "msel_hi", ("msel", 16)),
)


def _lookup(sel: str, msel: str, tag: str) -> tuple:
  """The table bytes of the four codes whose selectors are the low 16 bits of `sel` / `msel`: "lo<tag>" and
  "hi<tag>" hold the four values' low / high bytes, in code order."""
  return (
      ("prmt", f"mask{tag}", (0, 0x80, msel)),             # 0xC: byte 4 (0x80), its sign replicated -> 0xFF; 0: 0x00
      ("prmt", f"lo_a{tag}", ("t_lo0", "t_lo1", sel)),     # low bytes of entries 0-7 ...
      ("prmt", f"lo_b{tag}", ("t_lo2", "t_lo3", sel)),     # ... and of entries 8-15
      ("prmt", f"hi_a{tag}", ("t_hi0", "t_hi1", sel)),
      ("prmt", f"hi_b{tag}", ("t_hi2", "t_hi3", sel)),
      ("bitsel", f"lo{tag}", (f"mask{tag}", f"lo_b{tag}", f"lo_a{tag}")),  # mask ? b : a, bit by bit
      ("bitsel", f"hi{tag}", (f"mask{tag}", f"hi_b{tag}", f"hi_a{tag}")),
  )


# A QTensor's code bytes hold an even row of K in the low nibble and the next odd row in the high one. Outputs:
# "even0", "even1" (the low nibbles' values: bytes 0, 1 then 2, 3, two 16-bit values per word, the first in the
# low half) and "odd0", "odd1" (the high nibbles'). 24 instructions for 8 codes.
PROGRAM = (_SELECTORS + _lookup("sel", "msel", "0")
           + (("prmt", "even0", ("lo0", "hi0", 0x6240)), ("prmt", "odd0", ("lo0", "hi0", 0x7351)))
           + _lookup("sel_hi", "msel_hi", "1")
           + (("prmt", "even1", ("lo1", "hi1", 0x6240)), ("prmt", "odd1", ("lo1", "hi1", 0x7351))))
INPUTS = ("codes",) + tuple(f"t_{part}{j}" for part in ("lo", "hi") for j in range(4))
OUTPUTS = ("even0", "even1", "odd0", "odd1")

# A word of NF4 codes in the K-major layout (`kmajor.nibble_order`): its 8 codes are 4 register pairs of the dot's
# operand, pair p the codes at bits 8p-8p+3 and 8p+4-8p+7 (`kmajor.NF4_WORD_SLOTS`). Each half-word's low and high
# bytes are interleaved into its 2 pairs by one permute each: 24 instructions per word, 14 of them permutes.
_KMAJOR_PAIRS = (("prmt", "pair0", ("lo0", "hi0", 0x5140)), ("prmt", "pair1", ("lo0", "hi0", 0x7362)),
                 ("prmt", "pair2", ("lo1", "hi1", 0x5140)), ("prmt", "pair3", ("lo1", "hi1", 0x7362)))
KMAJOR_PROGRAM = _SELECTORS + _lookup("sel", "msel", "0") + _lookup("sel_hi", "msel_hi", "1") + _KMAJOR_PAIRS
KMAJOR_OUTPUTS = ("pair0", "pair1", "pair2", "pair3")


def table16(dtype) -> np.ndarray:
  """The NF4 table rounded to `dtype` (bfloat16 or float16), as numpy values of that dtype."""
  import jax.numpy as jnp  # its bfloat16 is numpy's (ml_dtypes): round to nearest even, as XLA converts
  return np.asarray(NF4_TABLE, np.float32).astype(jnp.dtype(dtype))


def table_words(dtype) -> dict[str, int]:
  """The table's 16-bit patterns as the program's eight input words: t_lo<j> / t_hi<j> hold the low / high bytes
  of entries 4j..4j+3, entry 4j in the lowest byte."""
  bits = table16(dtype).view(np.uint16).astype(np.uint32)
  words = {}
  for j in range(4):
    entries = bits[4 * j: 4 * j + 4]
    words[f"t_lo{j}"] = int(sum(int(e & 0xFF) << (8 * i) for i, e in enumerate(entries)))
    words[f"t_hi{j}"] = int(sum(int(e >> 8) << (8 * i) for i, e in enumerate(entries)))
  return words


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
  """PTX ``prmt.b32`` (default mode): byte i of the result is byte (c >> 4i) & 7 of the 8 bytes {b, a} (a's bytes
  0-3, b's 4-7), or, if bit (4i + 3) of c is set, that byte's sign bit replicated over all 8 bits."""
  pool = (a.astype(np.uint64) | (b.astype(np.uint64) << 32))
  out = np.zeros(np.broadcast(a, b, c).shape, np.uint32)
  for i in range(4):
    nib = (c >> (4 * i)) & 0xF
    byte = ((pool >> ((nib & 7) * 8).astype(np.uint64)) & 0xFF).astype(np.uint32)
    byte = np.where(nib & 8, np.where(byte & 0x80, 0xFF, 0x00), byte).astype(np.uint32)
    out |= byte << (8 * i)
  return out


_OPS = {
    "and": lambda a, b: a & b,
    "or": lambda a, b: a | b,
    "xor": lambda a, b: a ^ b,
    "shr": lambda a, b: a >> b,
    "bitsel": lambda m, b, a: (b & m) | (a & ~m),
    "prmt": _prmt,
}


def run(inputs: dict[str, np.ndarray], program=PROGRAM, outputs=OUTPUTS) -> dict[str, np.ndarray]:
  """Executes `program` on uint32 arrays (the numpy model of the PTX that `ptx` / `ptx_kmajor` emit); returns the
  outputs."""
  regs = {k: np.asarray(v, np.uint32) for k, v in inputs.items()}
  word = lambda v: regs[v] if isinstance(v, str) else np.uint32(v)
  for op, dst, srcs in program:
    regs[dst] = np.asarray(_OPS[op](*(word(v) for v in srcs)), np.uint32)
  return {k: regs[k] for k in outputs}


def lookup(codes: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
  """The model applied the way the kernel applies the PTX: code bytes in fours (one word, byte i = element i),
  values out as 16-bit halves (element i in half i of the output words). Returns the (even, odd) values of each
  code byte as `dtype` (uint8 codes, size a multiple of 4)."""
  flat = np.asarray(codes, np.uint8).reshape(-1, 4)
  word = flat.astype(np.uint32) @ (np.uint32(1) << (8 * np.arange(4, dtype=np.uint32)))
  out = run({"codes": word, **{k: np.full_like(word, v) for k, v in table_words(dtype).items()}})
  halves = lambda w0, w1: np.stack([w0 & 0xFFFF, w0 >> 16, w1 & 0xFFFF, w1 >> 16], -1).astype(np.uint16)
  even = halves(out["even0"], out["even1"]).view(table16(dtype).dtype).reshape(np.shape(codes))
  odd = halves(out["odd0"], out["odd1"]).view(table16(dtype).dtype).reshape(np.shape(codes))
  return even, odd


# The table words the lookup's permutes take as their first operand, which must be a register; the other four
# are immediates, which the permute takes in its second operand. Set as ``zero ^ word`` (module docstring), so
# that ptxas keeps them in registers for the whole loop instead of copying each from a uniform register before
# every permute.
REGISTER_WORDS = ("t_lo0", "t_lo2", "t_hi0", "t_hi2")
CONSTRAINTS = "=r,=r,r" + ",r" * 4 * len(REGISTER_WORDS)  # `ptx`: 2 result words; the code bytes (4 in one word);
# 4 copies of each register word (a 32-bit argument of a pack-4 instance comes as 4 operands, one per element)


@functools.lru_cache(maxsize=None)  # traced once per block and loop step: the text is the same each time
def ptx(dtype, half: str) -> str:
  """PROGRAM as PTX for ``elementwise_inline_asm(pack=4)`` with one result: the `half` ("even" or "odd") values in
  operands $0, $1; $2 holds the four code bytes, then come the REGISTER_WORDS (each as 4 operands, of which the
  first is used; the kernel loads them once), the other table words are immediates; the other half's values stay
  in scratch registers. (The register words come in as arguments because, as immediates, Triton gives the asm a
  layout that reads the codes from shared memory byte by byte: 0.8 shared loads per weight instead of 0.33,
  compiled for sm_90. One result per instance: JAX 0.10's lowering of the primitive mishandles several. Two
  instances on the same codes repeat the same instructions up to their last two, which ptxas shares.)"""
  operand = {f"{half}0": "$0", f"{half}1": "$1", "codes": "$2"}
  arguments = {name: f"${3 + 4 * i}" for i, name in enumerate(REGISTER_WORDS)}
  return _emit(PROGRAM, operand, table_words(dtype), arguments)


@functools.lru_cache(maxsize=None)
def ptx_kmajor(dtype, pair: int) -> str:
  """KMAJOR_PROGRAM as PTX for ``elementwise_inline_asm(pack=1)`` on 32-bit words of codes: register pair `pair`
  (0-3) in $0, the word in $1, the table words as immediates. (Here every operand of the lookup must be a
  constant or derived from the loaded words: table words loaded at run time stop Triton from loading the words in
  the dot's layout. One result per instance, as for `ptx`: the two instances on each half-word of codes repeat
  its lookup, which ptxas shares: 14 permutes per word in the compiled loop.)"""
  return _emit(KMAJOR_PROGRAM, {f"pair{pair}": "$0", "codes": "$1"}, table_words(dtype))


def _emit(program, operand: dict[str, str], table: dict[str, int], arguments: dict[str, str] | None = None) -> str:
  """`program` as one PTX block: `operand` maps names to asm operands ($i); `table` gives the table words'
  values, set in scratch registers as immediates, or from the asm operands in `arguments`; the `REGISTER_WORDS`
  among them as ``zero ^ word`` with ``zero = %lanemask_eq & %lanemask_lt``, a per-lane 0 (module docstring).
  Every other name is a scratch register."""
  arguments = arguments or {}
  temps = sorted({dst for _, dst, _ in program if dst not in operand} | set(table) | {"zero"})
  lines = ["{", f"  .reg .b32 {', '.join('%' + t for t in temps)};",
           "  { .reg .b32 %eq, %lt; mov.b32 %eq, %lanemask_eq; mov.b32 %lt, %lanemask_lt; and.b32 %zero, %eq, %lt; }"]
  for name, value in table.items():
    source = arguments.get(name, f"{value:#010x}")
    lines.append(f"  xor.b32 %{name}, %zero, {source};" if name in REGISTER_WORDS else f"  mov.b32 %{name}, {source};")
  reg = lambda v: (operand.get(v) or f"%{v}") if isinstance(v, str) else f"{v:#x}"
  for op, dst, srcs in program:
    if op == "bitsel":  # (b & m) | (a & ~m): lop3's truth table for m ? b : a with (m, b, a) = (0xF0, 0xCC, 0xAA)
      lines.append(f"  lop3.b32 {reg(dst)}, {', '.join(reg(v) for v in srcs)}, 0xca;")
    elif op == "prmt":  # its operands are registers: immediates go through scoped ones
      imm = [f"%imm{i}" for i, v in enumerate(srcs) if isinstance(v, int)]
      movs = " ".join(f"mov.b32 %imm{i}, {v:#x};" for i, v in enumerate(srcs) if isinstance(v, int))
      args = ", ".join(f"%imm{i}" if isinstance(v, int) else reg(v) for i, v in enumerate(srcs))
      body = f"prmt.b32 {reg(dst)}, {args};"
      lines.append(f"  {{ .reg .b32 {', '.join(imm)}; {movs} {body} }}" if imm else f"  {body}")
    else:
      lines.append(f"  {op}.b32 {reg(dst)}, {', '.join(reg(v) for v in srcs)};")
  lines.append("}")
  return "\n".join(lines)


__all__ = ["CONSTRAINTS", "INPUTS", "KMAJOR_OUTPUTS", "KMAJOR_PROGRAM", "OUTPUTS", "PROGRAM", "REGISTER_WORDS",
           "lookup", "ptx", "ptx_kmajor", "run", "table16", "table_words"]
