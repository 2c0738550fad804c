"""The shipped ticket-routing data (data/ticket_routing): reproducible, well-formed, with truly held-out splits."""

import importlib.util
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "ticket_routing"
SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}


def _load_generator():
  spec = importlib.util.spec_from_file_location("make_ticket_data", ROOT / "scripts" / "make_ticket_data.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


gen = _load_generator()


@pytest.fixture(scope="module")
def splits():
  return {split: [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text("utf-8").splitlines()]
          for split in SPLIT_SIZES}


def _parse(row):
  m = gen.OUTPUT_RE.fullmatch(row["output"])
  assert m, row["output"]
  cat, prio, order, last, first = m.groups()
  return cat, prio, order, last, first


def test_shipped_files_are_reproducible():
  files = gen.render(gen.generate(0))
  assert gen.differing_files(DATA, files) == []
  assert gen.main(["--check", "--out", str(DATA)]) == 0
  assert gen.render(gen.generate(0)) == files  # nothing depends on state outside the seed
  assert gen.render(gen.generate(1)) != files


def test_check_flags_stale_or_missing_files(tmp_path, capsys):
  assert gen.main(["--out", str(tmp_path), "--seed", "0"]) == 0
  for name in SPLIT_SIZES:
    assert (tmp_path / f"{name}.jsonl").read_bytes() == (DATA / f"{name}.jsonl").read_bytes()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind
  assert gen.main(["--check", "--out", str(tmp_path)]) == 0
  with open(tmp_path / "test.jsonl", "a", encoding="utf-8") as f:
    f.write("\n")
  assert gen.main(["--check", "--out", str(tmp_path)]) == 1
  (tmp_path / "test.jsonl").unlink()
  shutil.copy(DATA / "test.jsonl", tmp_path / "validation.jsonl")
  assert gen.main(["--check", "--out", str(tmp_path)]) == 1
  assert "test.jsonl" in capsys.readouterr().err


def test_split_sizes_and_fields(splits):
  for split, n in SPLIT_SIZES.items():
    rows = splits[split]
    assert len(rows) == n
    for row in rows:
      assert set(row) == {"instruction", "input", "output"}
      assert row["instruction"] == gen.INSTRUCTION
      assert row["input"].isascii() and row["output"].isascii()
      assert 0 < len(row["input"].split()) < 60


def test_every_output_matches_the_documented_regex(splits):
  readme = (DATA / "README.md").read_text("utf-8")
  assert gen.OUTPUT_RE.pattern in readme
  for rows in splits.values():
    for row in rows:
      assert gen.OUTPUT_RE.fullmatch(row["output"]), row["output"]


def test_outputs_copy_the_order_and_name_from_the_input(splits):
  for rows in splits.values():
    for row in rows:
      _, _, order, last, first = _parse(row)
      text = row["input"]
      assert re.search(rf"(?<!\d){order}(?!\d)", text)
      assert len(re.findall(r"(?<!\d)\d{5}(?!\d)", text)) == 1  # exactly one order number in the message
      names = re.findall(r"\b([A-Z][a-z]+) ([A-Z][a-z]+)\b", text)
      assert (first, last) in names, (row["output"], text)


def test_inputs_never_contain_the_code(splits):
  codes = re.compile(r"\b(BILL|SHIP|LOGIN|DMG|CANCEL|RETURN)\b|-P[123]\b")
  for rows in splits.values():
    for row in rows:
      assert not codes.search(row["input"]), row["input"]


def test_inputs_are_distinct_within_and_across_splits(splits):
  inputs = [row["input"] for rows in splits.values() for row in rows]
  assert len(set(inputs)) == len(inputs)
  normalised = {re.sub(r"\s+", " ", s.strip().lower()) for s in inputs}
  assert len(normalised) == len(inputs)


def test_order_numbers_are_unique_across_all_splits(splits):
  orders = [_parse(row)[2] for rows in splits.values() for row in rows]
  assert len(set(orders)) == len(orders) == sum(SPLIT_SIZES.values())
  train_text = "\n".join(row["input"] for row in splits["train"])
  for row in splits["test"] + splits["validation"]:
    assert _parse(row)[2] not in train_text


@pytest.mark.parametrize("held_out", ["test", "validation"])
def test_held_out_customer_names_never_appear_in_train(splits, held_out):
  train_firsts = {_parse(row)[4] for row in splits["train"]}
  train_lasts = {_parse(row)[3].capitalize() for row in splits["train"]}
  firsts = {_parse(row)[4] for row in splits[held_out]}
  lasts = {_parse(row)[3].capitalize() for row in splits[held_out]}
  assert not firsts & train_firsts
  assert not lasts & train_lasts
  train_words = set(re.findall(r"[A-Za-z]+", "\n".join(r["input"] + " " + r["output"] for r in splits["train"])))
  train_words = {w.lower() for w in train_words}
  assert not {n.lower() for n in firsts | lasts} & train_words


def test_validation_and_test_names_are_disjoint(splits):
  val = {_parse(row)[4] for row in splits["validation"]} | {_parse(row)[3] for row in splits["validation"]}
  test = {_parse(row)[4] for row in splits["test"]} | {_parse(row)[3] for row in splits["test"]}
  assert not val & test


def test_every_category_and_priority_in_every_split_roughly_balanced(splits):
  for split, rows in splits.items():
    cats = Counter(_parse(row)[0] for row in rows)
    prios = Counter(_parse(row)[1] for row in rows)
    pairs = Counter(_parse(row)[:2] for row in rows)
    assert set(cats) == set(gen.CATEGORIES) and set(prios) == set(gen.PRIORITIES)
    n = len(rows)
    assert all(abs(c - n / 6) <= 2 for c in cats.values()), cats
    assert all(abs(c - n / 3) <= 2 for c in prios.values()), prios
    assert len(pairs) == 18 and max(pairs.values()) - min(pairs.values()) <= 1, pairs


def test_priority_follows_the_urgency_cue(splits):
  for rows in splits.values():
    for row in rows:
      prio = _parse(row)[1]
      text = row["input"].lower()
      urgent = any(c in text for c in gen.URGENT_CUES)
      relaxed = any(c in text for c in gen.RELAXED_CUES)
      assert (urgent, relaxed) == {"P1": (True, False), "P2": (False, False), "P3": (False, True)}[prio], row


def test_wording_is_varied(splits):
  # Many distinct message shapes: strip the names and order numbers and count what is left.
  shapes = set()
  for row in splits["train"]:
    _, _, order, last, first = _parse(row)
    shapes.add(row["input"].replace(first, "F").replace(last.capitalize(), "L").replace(order, "N"))
  assert len(shapes) > 1500
  openings = Counter(" ".join(row["input"].split()[:2]) for row in splits["train"])
  assert len(openings) >= 20
