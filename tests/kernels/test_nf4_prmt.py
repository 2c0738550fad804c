"""The NF4 byte-permute lookup (`lora_jax.kernels.qmatmul.nf4_prmt`): its program, run by the numpy model of the
PTX it emits, against the 16-bit table over every code byte; the model's permute against PTX's definition; the
emitted PTX text, executed by a model of the PTX subset it uses, and its operands. (Its machine code and the
kernel's values with it: tests/kernels/test_qmatmul.py; on a GPU: test_qmatmul_gpu.py.)"""

import functools
import re

import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.kernels.qmatmul import nf4_prmt
from lora_jax.quant._qtensor import NF4_TABLE


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_program_looks_up_every_code_byte(dtype):
  codes = np.concatenate([np.roll(np.arange(256, dtype=np.uint8), r) for r in range(4)])  # byte b at position
  even, odd = nf4_prmt.lookup(codes, dtype)                                             # (b + r) % 4 of a word
  assert {(int(b), i % 4) for i, b in enumerate(codes)} == {(b, p) for b in range(256) for p in range(4)}
  table = nf4_prmt.table16(dtype)
  bits = lambda v: np.asarray(v).view(np.uint16)
  np.testing.assert_array_equal(bits(even), bits(table[codes & 0xF]))
  np.testing.assert_array_equal(bits(odd), bits(table[codes >> 4]))
  # the table is NF4's, rounded once to the 16-bit type
  np.testing.assert_allclose(table.astype(np.float32), NF4_TABLE, rtol=2 ** -8 if dtype == jnp.bfloat16 else 2 ** -11)
  assert table[7] == 0 and table[0] == -1 and table[15] == 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kmajor_program_looks_up_every_code_at_every_position(dtype):
  """KMAJOR_PROGRAM on words of 8 codes: pair p holds the values of the codes at bits 8p and 8p + 4, as 16-bit
  halves; every code at every one of the 8 positions, beside random neighbours."""
  rng = np.random.default_rng(0)
  words = rng.integers(0, 2 ** 32, (8, 16, 64), dtype=np.uint64).astype(np.uint32)
  for pos in range(8):  # code c at nibble `pos` of words[pos, c]
    words[pos] = (words[pos] & ~np.uint32(0xF << (4 * pos))) | (np.arange(16, dtype=np.uint32)[:, None] << (4 * pos))
  words = words.ravel()
  out = nf4_prmt.run({"codes": words, **{k: np.full_like(words, v) for k, v in nf4_prmt.table_words(dtype).items()}},
                     nf4_prmt.KMAJOR_PROGRAM, nf4_prmt.KMAJOR_OUTPUTS)
  table = nf4_prmt.table16(dtype).view(np.uint16)
  for p in range(4):
    pair = out[f"pair{p}"]
    np.testing.assert_array_equal(pair & 0xFFFF, table[(words >> (8 * p)) & 0xF])
    np.testing.assert_array_equal(pair >> 16, table[(words >> (8 * p + 4)) & 0xF])
  text = nf4_prmt.ptx_kmajor(dtype, 2)
  assert sorted({int(n) for n in re.findall(r"\$(\d+)", text)}) == [0, 1] and "%pair2" not in text
  assert len(re.findall(r"\bprmt\.b32 ", text)) == sum(op == "prmt" for op, _, _ in nf4_prmt.KMAJOR_PROGRAM) == 14


def test_permute_model_follows_the_ptx_definition():
  """prmt.b32 d, a, b, c: byte i of d is byte c[4i+2:4i] of {b, a} (a = bytes 0-3), or with c[4i+3] set that
  byte's sign bit replicated."""
  prmt = nf4_prmt._prmt
  assert prmt(np.uint32(0x03020100), np.uint32(0x07060504), np.uint32(0x7531)) == 0x07050301  # CUB's PRMT example
  a, b = np.uint32(0x33221100), np.uint32(0xF7E6D5C4)
  assert prmt(a, b, np.uint32(0x3210)) == 0x33221100
  assert prmt(a, b, np.uint32(0x7654)) == 0xF7E6D5C4
  assert prmt(a, b, np.uint32(0x0404)) == 0x00C400C4
  assert prmt(a, b, np.uint32(0xC8F3)) == 0xFF00FF33  # 0xC4 and 0xF7 have the sign bit, 0x00 not
  assert prmt(a, b, np.uint32(0x12345)) == prmt(a, b, np.uint32(0x2345))  # only the low 16 bits select


def _execute_ptx(text: str, operands: dict[str, np.ndarray], lane: int) -> dict[str, np.ndarray]:
  """Runs the PTX text that `nf4_prmt` emits, statement by statement, on uint32 arrays for one lane of a warp: the
  subset it uses (mov, and, or, xor, shr, prmt, lop3 on b32; %lanemask_eq / %lanemask_lt), each instruction by its
  PTX definition (prmt by the model checked above). Returns every register and operand by name."""
  regs = {k: np.asarray(v, np.uint32) for k, v in operands.items()}
  special = {"%lanemask_eq": np.uint32(1 << lane), "%lanemask_lt": np.uint32((1 << lane) - 1)}
  value = lambda v: regs[v] if v in regs else special[v] if v in special else np.uint32(int(v, 0))
  lop3 = lambda a, b, c, lut: functools.reduce(np.bitwise_or, [  # lut bit i: the minterm (a, b, c) = bits of i
      (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c) for i in range(8) if lut >> i & 1],
      np.uint32(0))
  ops = {"mov": lambda a: a, "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor,
         "shr": lambda a, b: a >> b, "prmt": nf4_prmt._prmt, "lop3": lambda a, b, c, lut: lop3(a, b, c, int(lut))}
  for statement in text.replace("{", ";").replace("}", ";").split(";"):
    statement = statement.strip()
    if not statement or statement.startswith(".reg"):
      continue
    op, args = statement.split(None, 1)
    name, kind = op.split(".", 1)
    assert kind == "b32", statement
    dst, *srcs = [a.strip() for a in args.split(",")]
    regs[dst] = np.asarray(ops[name](*(value(v) for v in srcs)), np.uint32)
  return regs


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("lane", [0, 1, 17, 31])
def test_emitted_ptx_looks_up_every_code(dtype, lane):
  """The PTX text itself, executed (not only the program it is emitted from): `ptx` on every code byte at every
  position of a word, with the register words as the kernel passes them; `ptx_kmajor` on every code at every
  nibble. The table words set from the per-lane zero are the table's in every lane."""
  codes = np.concatenate([np.roll(np.arange(256, dtype=np.uint8), r) for r in range(4)])
  words = codes.reshape(-1, 4).astype(np.uint32) @ (np.uint32(1) << (8 * np.arange(4, dtype=np.uint32)))
  even, odd = nf4_prmt.lookup(codes, dtype)
  expect = {"even": even.view(np.uint16).reshape(-1, 4), "odd": odd.view(np.uint16).reshape(-1, 4)}
  table_words = nf4_prmt.table_words(dtype)
  arguments = {f"${3 + 4 * i}": table_words[name] for i, name in enumerate(nf4_prmt.REGISTER_WORDS)}
  for half in ("even", "odd"):
    out = _execute_ptx(nf4_prmt.ptx(dtype, half), {"$2": words, **arguments}, lane)
    got = np.stack([out["$0"] & 0xFFFF, out["$0"] >> 16, out["$1"] & 0xFFFF, out["$1"] >> 16], -1)
    np.testing.assert_array_equal(got, expect[half])
    assert all(int(out["%" + k]) == v for k, v in table_words.items())
  kwords = np.arange(16, dtype=np.uint32)[:, None] * (np.uint32(0x11111111) >> (4 * np.arange(8, dtype=np.uint32)))
  kwords = (kwords ^ np.uint32(0x9E3779B9)).ravel()  # code c at every nibble, beside other codes
  table = nf4_prmt.table16(dtype).view(np.uint16)
  for p in range(4):
    out = _execute_ptx(nf4_prmt.ptx_kmajor(dtype, p), {"$1": kwords}, lane)
    np.testing.assert_array_equal(out["$0"] & 0xFFFF, table[(kwords >> (8 * p)) & 0xF])
    np.testing.assert_array_equal(out["$0"] >> 16, table[(kwords >> (8 * p + 4)) & 0xF])
    assert all(int(out["%" + k]) == v for k, v in table_words.items())


@pytest.mark.parametrize("half", ["even", "odd"])
def test_ptx_operands(half):
  """One result (two words, $0 $1), the codes word ($2), and the register table words: the first of each
  argument's four operands ($3, $7, $11, $15), set from the per-lane zero; every scratch register declared."""
  text = nf4_prmt.ptx(jnp.bfloat16, half)
  used = sorted({int(n) for n in re.findall(r"\$(\d+)", text)})
  assert used == [0, 1, 2, 3, 7, 11, 15]
  assert nf4_prmt.CONSTRAINTS.count("=r") == 2 and nf4_prmt.CONSTRAINTS.count(",r") == 1 + 16
  assert len(re.findall(r"\b(and|or|xor|shr|mov|prmt|lop3)\.b32 ", text)) >= len(nf4_prmt.PROGRAM)
  declared = set(re.findall(r"%(\w+)", text.split(";")[0]))
  scoped = {"imm0", "imm1", "imm2", "eq", "lt", "lanemask_eq", "lanemask_lt"}
  assert {v[1:] for v in re.findall(r"%[a-z_0-9]+", text)} - scoped <= declared
  assert set(re.findall(r"xor\.b32 %(\w+), %zero, \$", text)) == set(nf4_prmt.REGISTER_WORDS)
  other = "odd" if half == "even" else "even"
  assert f"%{other}0" in text and f"%{half}0" not in text  # the other half stays in scratch registers
