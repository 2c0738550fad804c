"""Training data: examples from files, tokenized with the model's chat template, packed or padded into rows.

Example formats (JSONL, one object per line): ``{"instruction", "input"?, "output"}`` and chat
``{"messages": [{"role", "content"}, ...]}``; plain ``.txt`` files (one document per blank-line-separated block,
loss on every token); and HF `datasets` folders saved with ``save_to_disk`` (needs `datasets`; rows in one of the
JSONL forms).

Each example becomes ``(ids, loss_mask)``: with ``loss_on="response"`` only assistant tokens (including the end-of-turn
token, so the model learns to stop) carry loss. Rows are either *packed* (examples concatenated greedily up to
``seq_len``; positions restart and attention is confined to each example via segment ids) or *padded* (one example per
row). Row order is a permutation drawn from ``(seed, epoch)``, so a data position (a row counter) fully determines
what comes next: resuming from a checkpoint continues the exact stream.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ._errors import LoraJaxError
from ._jsonl import read_jsonl, read_text
from ._log import log


# ---------------------------------------------------------------- reading
def read_examples(path: str | Path) -> list[dict[str, Any]]:
  """Examples from a JSONL file, a ``.txt`` file or a `datasets` folder; errors name the file and line."""
  path = Path(path)
  if not path.exists():
    raise LoraJaxError(f"{path}: data file not found")
  if path.is_dir():
    return _read_datasets_dir(path)
  if path.suffix == ".txt":
    text = read_text(path)
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
      raise LoraJaxError(f"{path}: the dataset is empty")
    return [{"text": d} for d in docs]
  examples = []
  for n, ex in read_jsonl(path):
    _validate(ex, f"{path}:{n}")
    examples.append(ex)
  if not examples:
    raise LoraJaxError(f"{path}: the dataset is empty")
  return examples


def example_kind(ex: dict[str, Any]) -> str:
  """"messages", "instruction" (an ``output`` with its ``instruction``/``input``) or "text", in that order of
  precedence (a row with both ``output`` and ``text``, as Alpaca's columns, is an instruction example)."""
  return "messages" if "messages" in ex else "instruction" if "output" in ex else "text"


def _validate(ex, where: str) -> None:
  if not isinstance(ex, dict):
    raise LoraJaxError(f"{where}: expected a JSON object, got {type(ex).__name__}")
  if "messages" in ex:
    msgs = ex["messages"]
    if not isinstance(msgs, list) or not msgs or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
      raise LoraJaxError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    if msgs[0]["role"] == "assistant":
      raise LoraJaxError(f"{where}: the conversation starts with an assistant turn; it needs a user (or system) "
                         f"message before it")
  elif "output" in ex:
    for k in ("instruction", "input", "output"):
      if k in ex and not isinstance(ex[k], str):
        raise LoraJaxError(f"{where}: '{k}' must be a string")
    if "instruction" not in ex and "input" not in ex:
      raise LoraJaxError(f"{where}: an 'output' example needs an 'instruction' or 'input'")
  elif "text" in ex:
    if not isinstance(ex["text"], str):
      raise LoraJaxError(f"{where}: 'text' must be a string")
  else:
    raise LoraJaxError(f"{where}: expected keys 'instruction'/'input'/'output', 'messages' or 'text'; "
                       f"got {sorted(ex)}")


def _read_datasets_dir(path: Path) -> list[dict[str, Any]]:
  try:
    import datasets
  except ImportError:
    raise LoraJaxError(f"{path}: is a folder; reading HF datasets saved to disk needs `pip install datasets`") from None
  try:
    ds = datasets.load_from_disk(str(path))
  except Exception as e:
    raise LoraJaxError(f"{path}: cannot load with datasets.load_from_disk ({e})") from None
  if isinstance(ds, datasets.DatasetDict):
    if "train" not in ds:
      raise LoraJaxError(f"{path}: DatasetDict without a 'train' split (has {list(ds)})")
    ds = ds["train"]
  rows = [{k: v for k, v in r.items() if v is not None} for r in ds]  # a columnar dataset's missing value is None
  for i, r in enumerate(rows):
    _validate(r, f"{path}[{i}]")
  if not rows:
    raise LoraJaxError(f"{path}: the dataset is empty")
  return rows


# ---------------------------------------------------------------- prompts and tokenization
def prompt_messages(ex: dict[str, Any]) -> list[dict[str, str]]:
  """The conversation up to (not including) the answer to be generated."""
  kind = example_kind(ex)
  if kind == "messages":
    msgs = ex["messages"]
    return msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
  if kind == "instruction":
    parts = [p for p in (ex.get("instruction", ""), ex.get("input", "")) if p]
    return [{"role": "user", "content": "\n\n".join(parts)}]
  raise LoraJaxError("plain-text examples have no prompt/answer split")


def reference_answer(ex: dict[str, Any]) -> str:
  if example_kind(ex) == "messages":
    return ex["messages"][-1]["content"] if ex["messages"][-1]["role"] == "assistant" else ""
  return ex.get("output", "")


def uses_template(tok, chat: bool) -> bool:
  """Whether examples go through the chat template (asked for, and the tokenizer has one); else the plain
  format: each message's text on its own line, each answer followed by the end-of-sequence token."""
  return bool(chat and tok.chat_template)


def _plain_pieces(msgs, tok) -> list[tuple[str, bool]]:
  return [(m["content"] + (tok.eos_token or ""), True) if m["role"] == "assistant" else (m["content"] + "\n", False)
          for m in msgs]


def _segments(ex: dict[str, Any], tok, chat: bool) -> list[tuple[str, bool]]:
  """The example as text pieces with a flag 'is assistant output'. With the chat template an answer's piece ends
  with the end-of-turn token (the end-of-sequence token): what the template renders after it (ChatML's newline)
  is not the model's output."""
  if example_kind(ex) == "text":
    return [(ex["text"] + (tok.eos_token or ""), True)]
  msgs = ex["messages"] if "messages" in ex else prompt_messages(ex) + [
      {"role": "assistant", "content": ex["output"]}]
  if not uses_template(tok, chat):
    return _plain_pieces(msgs, tok)
  pieces, done = [], ""
  for i, m in enumerate(msgs):
    if m["role"] != "assistant":
      continue
    prefix = tok.render_chat(msgs[:i], add_generation_prompt=True)
    through = tok.render_chat(msgs[:i + 1], add_generation_prompt=False)
    if not (prefix.startswith(done) and through.startswith(prefix)):
      raise LoraJaxError("the chat template does not render conversations as extensions of their prefixes; "
                         "set data.chat_template: false")
    answer = through[len(prefix):]
    eot = tok.eos_token
    end = answer.rindex(eot) + len(eot) if eot and eot in answer else len(answer)
    pieces += [(prefix[len(done):], False), (answer[:end], True), (answer[end:], False)]
    done = through
  return pieces


def _encode_pieces(pieces, tok, chat: bool, loss_on: str) -> tuple[list[int], list[bool]]:
  """Token ids and loss flags of text pieces, each piece tokenized alone; the plain format starts with the
  tokenizer's special tokens (BOS), the chat template writes its own."""
  ids: list[int] = []
  mask: list[bool] = []
  first = True
  for text, is_answer in pieces:
    if not text:
      continue
    piece = tok.encode(text, add_special_tokens=first and not uses_template(tok, chat))
    first = False
    ids += piece
    mask += [is_answer or loss_on == "all"] * len(piece)
  return ids, mask


def tokenize_example(ex: dict[str, Any], tok, *, chat: bool, loss_on: str) -> tuple[list[int], list[bool]]:
  return _encode_pieces(_segments(ex, tok, chat), tok, chat, loss_on)


def prompt_ids(ex: dict[str, Any], tok, *, chat: bool) -> list[int]:
  """The ids a model generates the answer after: exactly the prefix of the example's training ids before its
  (last) answer."""
  msgs = prompt_messages(ex)
  if uses_template(tok, chat):
    return tok.encode_chat(msgs)
  return _encode_pieces(_plain_pieces(msgs, tok), tok, chat, "response")[0]


# ---------------------------------------------------------------- rows
@dataclasses.dataclass
class Rows:
  """Token rows for training: ids/positions/segments int32 [N, T]; ``loss`` bool [N, T] marks *targets*."""

  ids: np.ndarray
  positions: np.ndarray
  segments: np.ndarray
  loss: np.ndarray
  n_examples: int
  n_truncated: int

  def __len__(self):
    return len(self.ids)


def _preview(ex: dict[str, Any]) -> str:
  """The start of an example's text, to find it in its file (its position in a split is not its line)."""
  kind = example_kind(ex)
  text = ex["text"] if kind == "text" else prompt_messages(ex)[-1]["content"] if prompt_messages(ex) else ""
  text = " ".join(text.split())
  return repr(text[:60] + ("..." if len(text) > 60 else ""))


def build_rows(examples, tok, *, seq_len: int, chat: bool = True, loss_on: str = "response", packing: bool = True,
               truncate: bool = True, pad_id: int = 0, source: str = "data") -> Rows:
  """Tokenizes and packs (or pads) examples into rows of `seq_len` tokens."""
  encoded, n_trunc = [], 0
  for i, ex in enumerate(examples):
    ids, mask = tokenize_example(ex, tok, chat=chat, loss_on=loss_on)
    if len(ids) > seq_len:
      if not truncate:
        raise LoraJaxError(f"{source}: an example ({_preview(ex)}) has {len(ids)} tokens, more than "
                           f"train.seq_len={seq_len} (set data.truncate: true to cut it)")
      ids, mask, n_trunc = ids[:seq_len], mask[:seq_len], n_trunc + 1
    if sum(mask[1:]) == 0:
      continue  # nothing to learn from (e.g. the answer was truncated away)
    encoded.append((ids, mask))
  if not encoded:
    raise LoraJaxError(f"{source}: no usable examples (empty, or every answer truncated away)")
  if n_trunc:
    log(f"{source}: truncated {n_trunc} of {len(examples)} examples to {seq_len} tokens")
  rows: list[list[tuple[list[int], list[bool]]]] = []
  if packing:
    current, used = [], 0
    for ids, mask in encoded:
      if used + len(ids) > seq_len and current:
        rows.append(current)
        current, used = [], 0
      current.append((ids, mask))
      used += len(ids)
    rows.append(current)
  else:
    rows = [[e] for e in encoded]
  n = len(rows)
  out_ids = np.full((n, seq_len), pad_id, np.int32)
  out_pos = np.zeros((n, seq_len), np.int32)
  out_seg = np.zeros((n, seq_len), np.int32)
  out_loss = np.zeros((n, seq_len), bool)
  for r, row in enumerate(rows):
    at = 0
    for s, (ids, mask) in enumerate(row, 1):
      k = len(ids)
      out_ids[r, at:at + k] = ids
      out_pos[r, at:at + k] = np.arange(k)
      out_seg[r, at:at + k] = s
      out_loss[r, at:at + k] = mask
      out_loss[r, at] = False  # the first token of an example is never a target
      at += k
  return Rows(out_ids, out_pos, out_seg, out_loss, len(encoded), n_trunc)


def batch_at(rows: Rows, position: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  """The batch starting at row counter `position` of the endless, per-epoch shuffled stream."""
  n = len(rows)
  idx = []
  for p in range(position, position + batch_size):
    epoch, i = divmod(p, n)
    idx.append(_permutation(n, seed, epoch)[i])
  idx = np.asarray(idx)
  return {"ids": rows.ids[idx], "positions": rows.positions[idx], "segments": rows.segments[idx],
          "loss": rows.loss[idx]}


_PERM_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  key = (n, seed, epoch)
  if key not in _PERM_CACHE:
    if len(_PERM_CACHE) > 8:
      _PERM_CACHE.clear()
    _PERM_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(n)
  return _PERM_CACHE[key]


def split_examples(examples: list, fraction: float, seed: int) -> tuple[list, list]:
  """Deterministic train/validation split."""
  if fraction <= 0:
    return examples, []
  order = np.random.default_rng([seed, 12345]).permutation(len(examples))
  k = max(1, int(round(fraction * len(examples))))
  held = set(order[:k].tolist())
  return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def iter_batches(rows: Rows, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Every row once, in order (for evaluation); the last batch is padded with empty rows."""
  for start in range(0, len(rows), batch_size):
    sl = slice(start, start + batch_size)
    b = {"ids": rows.ids[sl], "positions": rows.positions[sl], "segments": rows.segments[sl], "loss": rows.loss[sl]}
    short = batch_size - len(b["ids"])
    if short:
      b = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in b.items()}
    yield b
