"""Data: reading with file:line errors, response-only loss masks, packing with segments, deterministic order."""

import json

import numpy as np
import pytest

from lora_jax import LoraJaxError
from lora_jax.data import (batch_at, build_rows, example_kind, prompt_ids, read_examples, split_examples,
                           tokenize_example)


def test_malformed_jsonl_names_file_and_line(tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
  with pytest.raises(LoraJaxError, match=r"d.jsonl:2: malformed JSON"):
    read_examples(p)
  p.write_text('{"prompt": "a"}\n')
  with pytest.raises(LoraJaxError, match=r"d.jsonl:1: expected keys"):
    read_examples(p)
  p.write_text("\n")
  with pytest.raises(LoraJaxError, match="empty"):
    read_examples(p)
  with pytest.raises(LoraJaxError, match="not found"):
    read_examples(tmp_path / "nope.jsonl")


def test_chat_loss_mask_covers_only_the_answer(smollm2):
  tok = smollm2.tokenizer
  ex = {"instruction": "Say hi.", "output": "Hi there!"}
  ids, mask = tokenize_example(ex, tok, chat=True, loss_on="response")
  text = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
  assert text == "Hi there!<|im_end|>"  # ChatML's newline after the end of turn is the template's, not the model's
  assert tok.decode(ids, skip_special_tokens=False) == tok.render_chat(
      [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}],
      add_generation_prompt=False)
  _, all_mask = tokenize_example(ex, tok, chat=True, loss_on="all")
  assert all(all_mask)


def test_multi_turn_messages_mask_every_assistant_turn(smollm2):
  tok = smollm2.tokenizer
  ex = {"messages": [{"role": "user", "content": "1?"}, {"role": "assistant", "content": "one"},
                     {"role": "user", "content": "2?"}, {"role": "assistant", "content": "two"}]}
  ids, mask = tokenize_example(ex, tok, chat=True, loss_on="response")
  text = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
  assert text == "one<|im_end|>two<|im_end|>"


def test_packing_segments_positions_and_truncation(smollm2):
  tok = smollm2.tokenizer
  exs = [{"instruction": f"Repeat {i}", "output": "x" * (i + 1)} for i in range(6)]
  rows = build_rows(exs, tok, seq_len=64, chat=False, packing=True)
  assert rows.n_examples == 6 and len(rows) < 6
  for r in range(len(rows)):
    seg, pos = rows.segments[r], rows.positions[r]
    for s in set(seg[seg > 0].tolist()):
      np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
      assert not rows.loss[r][np.argmax(seg == s)]  # first token of each example is never a target
  padded = build_rows(exs, tok, seq_len=64, chat=False, packing=False)
  assert len(padded) == 6 and padded.segments.max() == 1
  long = [{"instruction": "a " * 100, "output": "b"}]
  with pytest.raises(LoraJaxError, match=r"an example \('a a a .*\.\.\.'\) has \d+ tokens, more than train.seq_len=16"):
    build_rows(exs + long, tok, seq_len=16, chat=False, truncate=False)  # named by its text, not its place


def test_order_is_deterministic_and_epoch_shuffled(smollm2):
  exs = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
  rows = build_rows(exs, smollm2.tokenizer, seq_len=16, chat=False, packing=False)
  a = batch_at(rows, 0, 10, seed=1)["ids"]
  assert (batch_at(rows, 0, 10, seed=1)["ids"] == a).all()
  assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, rows.ids.tolist()))  # an epoch is a permutation
  assert not (batch_at(rows, 10, 10, seed=1)["ids"] == a).all()                 # the next epoch differs
  assert not (batch_at(rows, 0, 10, seed=2)["ids"] == a).all()
  np.testing.assert_array_equal(batch_at(rows, 3, 4, seed=1)["ids"], a[3:7])


def test_split_is_deterministic():
  exs = list(range(100))
  tr, va = split_examples(exs, 0.1, seed=0)
  assert len(va) == 10 and sorted(tr + va) == exs and split_examples(exs, 0.1, seed=0) == (tr, va)


def test_hf_datasets_folder_reads_like_jsonl(tmp_path):
  """`save_to_disk` folders (a Dataset, or a DatasetDict's train split) give the same examples as JSONL."""
  datasets = pytest.importorskip("datasets")
  rows = [{"instruction": f"route {i}", "input": "", "output": f"BILL-P{i % 3}"} for i in range(5)]
  jsonl = tmp_path / "d.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
  datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
  datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                        "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(tmp_path / "dd"))
  assert read_examples(tmp_path / "ds") == read_examples(jsonl)
  assert read_examples(tmp_path / "dd") == read_examples(jsonl)[:3]
  datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "no_train"))
  with pytest.raises(LoraJaxError, match="without a 'train' split"):
    read_examples(tmp_path / "no_train")
  datasets.Dataset.from_list([{"prompt": "x"}]).save_to_disk(str(tmp_path / "bad"))
  with pytest.raises(LoraJaxError, match=r"bad\[0\]"):
    read_examples(tmp_path / "bad")
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(LoraJaxError, match="cannot load with datasets.load_from_disk"):
    read_examples(tmp_path / "empty_dir")


EXAMPLES = [{"instruction": "Classify", "input": "printer on fire", "output": "hardware"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("ex", EXAMPLES, ids=["instruction", "multi_turn"])
def test_the_eval_prompt_is_the_trained_prefix(smollm2, ex, chat):
  """exact_match prompts with exactly the ids the example's last answer follows in training (a multi-turn plain
  prompt once lacked the earlier answers' end-of-sequence tokens)."""
  ids, mask = tokenize_example(ex, smollm2.tokenizer, chat=chat, loss_on="response")
  last = max(i for i in range(1, len(mask)) if mask[i] and not mask[i - 1])
  assert prompt_ids(ex, smollm2.tokenizer, chat=chat) == ids[:last]


def test_an_alpaca_row_with_a_text_column_is_an_instruction_example(smollm2):
  """Alpaca's columns are instruction, input, output and text (the rendered prompt): such a row was trained as
  plain text (its loss on every token) and left out of exact match."""
  ex = {"instruction": "Classify", "input": "printer on fire", "output": "hardware", "text": "### whatever"}
  assert example_kind(ex) == "instruction"
  plain = {k: v for k, v in ex.items() if k != "text"}
  assert tokenize_example(ex, smollm2.tokenizer, chat=True, loss_on="response") == \
      tokenize_example(plain, smollm2.tokenizer, chat=True, loss_on="response")


def test_the_plain_format_starts_with_bos_whatever_chat_says(smollm2):
  """A tokenizer that adds BOS and has no chat template: chat=True falls back to the plain format, with its BOS
  (it was dropped, while the eval prompt kept it)."""
  import copy
  import dataclasses

  from tokenizers import processors
  backend = copy.deepcopy(smollm2.tokenizer.backend)
  backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
  tok = dataclasses.replace(smollm2.tokenizer, backend=backend, chat_template=None)
  ex = EXAMPLES[0]
  with_chat, without = (tokenize_example(ex, tok, chat=c, loss_on="response") for c in (True, False))
  assert with_chat == without and with_chat[0][0] == 0
  assert prompt_ids(ex, tok, chat=True)[0] == 0


def test_rows_that_would_mislead_training_are_read_right_or_refused(tmp_path):
  """A conversation that starts with the assistant is refused with its line; a datasets folder's None (a
  missing value in a column) is a missing key."""
  p = tmp_path / "d.jsonl"
  p.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
  with pytest.raises(LoraJaxError, match=r"d.jsonl:1: the conversation starts with an assistant turn"):
    read_examples(p)
  datasets = pytest.importorskip("datasets")
  rows = [{"instruction": "a", "input": None, "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
  datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
  assert read_examples(tmp_path / "ds") == [{"instruction": "a", "output": "b"}, rows[1]]
