"""Logging to stderr (stdout carries only results)."""

import sys

_VERBOSE = True


def set_verbose(verbose: bool) -> None:
  global _VERBOSE
  _VERBOSE = verbose


def log(msg: str) -> None:
  if _VERBOSE:
    print(f"[lora_jax] {msg}", file=sys.stderr, flush=True)
