"""Reading JSON Lines files with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from ._errors import LoraJaxError


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
  """The objects of a JSONL file as (line number, object), blank lines skipped. A line that is not JSON, or not a
  JSON object, is a `LoraJaxError` naming ``path:line``."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise LoraJaxError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(obj, dict):
        raise LoraJaxError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
      rows.append((n, obj))
  return rows
