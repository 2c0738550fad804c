"""Reading text, JSON and JSON Lines files with errors that name the file (and line): one `LoraJaxError` for a
file that is not UTF-8, not JSON, or not the JSON object expected, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from ._errors import LoraJaxError


def read_text(path: str | Path) -> str:
  """A UTF-8 text file's contents."""
  try:
    return Path(path).read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise LoraJaxError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_json_object(path: str | Path) -> dict:
  """A JSON file whose top level is an object."""
  try:
    obj = json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise LoraJaxError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
  if not isinstance(obj, dict):
    raise LoraJaxError(f"{path}: expected a JSON object, got {type(obj).__name__}")
  return obj


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
  """The objects of a JSONL file as (line number, object), blank lines skipped. A line that is not JSON, or not a
  JSON object, is a `LoraJaxError` naming ``path:line``."""
  rows = []
  for n, line in enumerate(read_text(path).split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
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
