"""The package's sources as any supported Python compiles them."""

import pathlib
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("lora_jax", "benchmarks", "scripts", "tests") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compiles_without_warnings(path):
  # An invalid escape sequence ("\." in a non-raw string) is a DeprecationWarning on Python 3.11, which the test
  # configuration ignores, but a SyntaxWarning on 3.12+, which it turns into an import error (the GPU machine's
  # python3 is 3.12): compile every file with all warnings as errors.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    compile(path.read_text(encoding="utf-8"), str(path), "exec")
