"""Sweep reports (lora_jax.report) on synthetic run directories: grouping, statistics, tables and plots."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest

from lora_jax._errors import LoraJaxError
from lora_jax.report import collect_runs, group_runs, main_report, varying_axes, write_report

RANKS = (4, 8)
METHODS = ("lora", "dora")
SEEDS = (0, 1, 2)
# exact match of seed s = BASE + (s - 1) * SPREAD, so mean = BASE and sample std = SPREAD.
BASE = {(4, "lora"): 0.85, (4, "dora"): 0.80, (8, "lora"): 0.90, (8, "dora"): 0.70}
SPREAD = {(4, "lora"): 0.05, (4, "dora"): 0.02, (8, "lora"): 0.01, (8, "dora"): 0.10}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _params(rank, method):
  return 1000 * rank + (3000 if method == "dora" else 0) + 12345


def _exact(rank, method, seed):
  return BASE[rank, method] + (seed - 1) * SPREAD[rank, method]


def _eval_loss(rank, method, seed):
  return 1.0 + 0.1 * rank / 8 + (0.05 if method == "dora" else 0.0) + 0.01 * seed


def _write_run(run_dir, *, rank, method, seed, exact=True, status="finished", final_loss=None, extra_config=None):
  run_dir.mkdir(parents=True)
  config = {"seed": seed, "peft.method": method, "peft.rank": rank, "peft.alpha": 16,
            "peft.targets": ["q_proj", "v_proj"], "train.lr": 1e-3, **(extra_config or {})}
  em = _exact(rank, method, seed) if exact else None
  summary = {"name": run_dir.name, "overrides": {"peft.rank": rank, "peft.method": method, "seed": seed},
             "config": config, "trainable_params": _params(rank, method), "wall_time_s": 10.0 + rank + seed,
             "peak_rss_mib": 2000.0 + 10 * rank, "steps": 20,
             "final_train_loss": 0.5 + 0.01 * seed if final_loss is None else final_loss,
             "eval_loss": _eval_loss(rank, method, seed), "exact_match": em,
             "exact_match_before": 0.1 if exact else None, "status": status}
  (run_dir / "summary.json").write_text(json.dumps(summary))
  lines = []
  for step in range(1, 21):
    lines.append({"split": "train", "step": step, "loss": 3.0 / step + 0.01 * rank + 0.001 * seed,
                  "lr": 1e-3, "tokens_per_s": 500.0, "time_s": 0.5 * step})
    if step % 10 == 0:
      eval_line = {"split": "eval", "step": step, "loss": _eval_loss(rank, method, seed)}
      if exact:
        eval_line["exact_match"] = em
      lines.append(eval_line)
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _make_sweep(root, *, exact=True):
  for rank in RANKS:
    for method in METHODS:
      for seed in SEEDS:
        _write_run(root / f"rank={rank}" / f"method={method}" / f"seed={seed}",
                   rank=rank, method=method, seed=seed, exact=exact)
  return root


@pytest.fixture
def sweep(tmp_path):
  return _make_sweep(tmp_path / "sweep")


def test_collect_runs_recursive_and_sorted(sweep):
  runs = collect_runs(sweep)
  assert len(runs) == 12
  paths = [r["path"] for r in runs]
  assert paths == sorted(paths)
  assert all((p / "summary.json").is_file() for p in paths)
  assert runs[0]["config"]["peft.targets"] == ["q_proj", "v_proj"]


def test_derived_keys_are_not_axes():
  """A key a run derived from others (train.remat: auto, resolved per quantize) is no axis of a sweep over
  quantize; set by the sweep itself (in overrides), or not derived in every run, it is."""
  run = lambda quantize, remat, derived=("train.remat",), overrides=None: {
      "config": {"quantize": quantize, "train.remat": remat, "seed": 0}, "derived": list(derived),
      "overrides": overrides if overrides is not None else {"quantize": quantize}}
  assert varying_axes([run("none", "dots"), run("nf4", "full")]) == ["quantize"]
  assert varying_axes([run("none", "dots"), run("nf4", "full", derived=())]) == ["quantize", "train.remat"]
  swept = [run("nf4", r, overrides={"quantize": "nf4", "train.remat": r}) for r in ("dots", "full")]
  assert varying_axes(swept) == ["train.remat"]


def test_group_runs_means_and_stds(sweep):
  runs = collect_runs(sweep)
  assert varying_axes(runs) == ["peft.rank", "peft.method"]
  groups = group_runs(runs)
  assert len(groups) == 4
  assert [tuple(g["axes"].items()) for g in groups] == [
      (("peft.rank", 4), ("peft.method", "dora")), (("peft.rank", 4), ("peft.method", "lora")),
      (("peft.rank", 8), ("peft.method", "dora")), (("peft.rank", 8), ("peft.method", "lora"))]
  for g in groups:
    rank, method = g["axes"]["peft.rank"], g["axes"]["peft.method"]
    assert g["n_seeds"] == 3
    assert sorted(g["seeds"]) == list(SEEDS)
    assert g["n_diverged"] == 0
    em = [_exact(rank, method, s) for s in SEEDS]
    assert g["exact_match"] == {"mean": statistics.mean(em), "std": statistics.stdev(em), "n": 3}
    assert g["exact_match"]["mean"] == pytest.approx(BASE[rank, method])
    assert g["exact_match"]["std"] == pytest.approx(SPREAD[rank, method])
    losses = [_eval_loss(rank, method, s) for s in SEEDS]
    assert g["eval_loss"]["mean"] == statistics.mean(losses)
    assert g["eval_loss"]["std"] == statistics.stdev(losses)
    walls = [10.0 + rank + s for s in SEEDS]
    assert g["wall_time_s"]["mean"] == statistics.mean(walls)
    assert g["wall_time_s"]["std"] == statistics.stdev(walls)
    assert g["trainable_params"] == {"mean": _params(rank, method), "std": 0.0, "n": 3}
    assert g["peak_rss_mib"]["std"] == 0.0


def test_group_of_one_seed_has_zero_std(tmp_path):
  _write_run(tmp_path / "a", rank=4, method="lora", seed=0)
  _write_run(tmp_path / "b", rank=8, method="lora", seed=0)
  groups = group_runs(collect_runs(tmp_path))
  assert [g["axes"] for g in groups] == [{"peft.rank": 4}, {"peft.rank": 8}]
  assert all(g["n_seeds"] == 1 and g["exact_match"]["std"] == 0.0 for g in groups)


def test_seed_only_sweep_is_one_group(tmp_path):
  for seed in SEEDS:
    _write_run(tmp_path / f"seed{seed}", rank=4, method="lora", seed=seed)
  (group,) = group_runs(collect_runs(tmp_path))
  assert group["axes"] == {} and group["n_seeds"] == 3


def test_write_report_files(sweep, tmp_path):
  out = tmp_path / "report"
  written = write_report(sweep, out)
  assert set(written) == {"results.csv", "results.md", "loss_curves.png", "exact_match_by_peft.rank.png",
                          "exact_match_by_peft.method.png"}
  assert all(p.parent == out and p.is_file() for p in written.values())
  assert sorted(p.name for p in out.iterdir()) == sorted(written)  # no temp files left behind

  with written["results.csv"].open(newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 12
  assert list(rows[0])[:4] == ["path", "peft.rank", "peft.method", "seed"]
  row = next(r for r in rows if r["path"] == "rank=8/method=dora/seed=2")
  assert (row["peft.rank"], row["peft.method"], row["seed"]) == ("8", "dora", "2")
  assert float(row["exact_match"]) == _exact(8, "dora", 2)
  assert int(row["trainable_params"]) == _params(8, "dora")
  assert row["status"] == "finished"

  md = written["results.md"].read_text()
  assert str(sweep) in md.splitlines()[0] and "12 runs" in md.splitlines()[0]
  for cell in ("85.0 ± 5.0", "80.0 ± 2.0", "90.0 ± 1.0", "70.0 ± 10.0", "20,345", "16,345", "19,345", "23,345"):
    assert cell in md
  table = [line for line in md.splitlines() if line.startswith("|")]
  assert len(table) == 2 + 4
  assert table[0].startswith("| peft.rank | peft.method | exact match (%) | eval loss |")
  assert table[-1].startswith("| 8 | lora | 90.0 ± 1.0 | 1.110 ± 0.010 | 20,345 | 19.0 ± 1.0 | 2,080 ± 0 |")
  assert table[-1].endswith("| 3 |")

  for name, path in written.items():
    if name.endswith(".png"):
      data = path.read_bytes()
      assert data[:8] == PNG_MAGIC, name
      assert len(data) > 5000, name


def test_write_report_defaults_to_root_and_reruns(sweep):
  first = write_report(sweep)
  assert all(p.parent == sweep for p in first.values())
  second = write_report(sweep)  # overwrites in place; the report files are not mistaken for runs
  assert second == first
  assert len(list(csv.DictReader(second["results.csv"].open(newline="")))) == 12


def test_missing_exact_match_falls_back_to_eval_loss(tmp_path):
  root = _make_sweep(tmp_path / "sweep", exact=False)
  written = write_report(root)
  assert "eval_loss_by_peft.rank.png" in written and "exact_match_by_peft.rank.png" not in written
  assert written["eval_loss_by_peft.rank.png"].read_bytes()[:8] == PNG_MAGIC
  groups = group_runs(collect_runs(root))
  assert groups[0]["exact_match"] == {"mean": None, "std": None, "n": 0}
  md = written["results.md"].read_text()
  assert "| 4 | dora | - | 1.110 ± 0.010 |" in md


def test_list_axis_is_tabulated_not_plotted(tmp_path):
  _write_run(tmp_path / "a", rank=4, method="lora", seed=0, extra_config={"peft.targets": ["q_proj"]})
  _write_run(tmp_path / "b", rank=4, method="lora", seed=0, extra_config={"peft.targets": ["q_proj", "v_proj"]})
  written = write_report(tmp_path)
  assert not any("peft.targets" in name for name in written)
  assert "| q_proj,v_proj |" in written["results.md"].read_text()


def test_diverged_run(tmp_path):
  _write_run(tmp_path / "s0", rank=4, method="lora", seed=0)
  _write_run(tmp_path / "s1", rank=4, method="lora", seed=1, status="diverged", final_loss=float("nan"))
  (group,) = group_runs(collect_runs(tmp_path))
  assert group["n_diverged"] == 1
  assert math.isnan(group["final_train_loss"]["mean"]) and math.isnan(group["final_train_loss"]["std"])
  written = write_report(tmp_path)
  assert "2 (1 diverged)" in written["results.md"].read_text()


def test_a_key_added_since_a_run_counts_as_its_default(tmp_path):
  """Runs saved before a config key existed (no ``kmajor`` in their summary) group with runs at its default: the
  same runs, as a sweep treats them; a run at another value is its own group."""
  _write_run(tmp_path / "s0", rank=4, method="lora", seed=0)
  _write_run(tmp_path / "s1", rank=4, method="lora", seed=1, extra_config={"kmajor": False})
  (group,) = group_runs(collect_runs(tmp_path))
  assert group["n_seeds"] == 2 and group["axes"] == {}
  _write_run(tmp_path / "s2", rank=4, method="lora", seed=2, extra_config={"kmajor": True})
  groups = group_runs(collect_runs(tmp_path))
  assert sorted((g["axes"]["kmajor"], g["n_seeds"]) for g in groups) == [(False, 2), (True, 1)]


def test_main_report_prints_table(sweep, tmp_path, capsys):
  main_report(str(sweep), str(tmp_path / "out"))
  printed = capsys.readouterr().out
  assert printed == (tmp_path / "out" / "results.md").read_text()
  assert "85.0 ± 5.0" in printed


def test_empty_dir_raises(tmp_path):
  with pytest.raises(LoraJaxError, match="no summary.json"):
    collect_runs(tmp_path)
  with pytest.raises(LoraJaxError, match="no summary.json"):
    write_report(tmp_path)


def test_bad_inputs_raise(tmp_path):
  with pytest.raises(LoraJaxError, match="not a directory"):
    collect_runs(tmp_path / "missing")
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "summary.json").write_text("{not json")
  with pytest.raises(LoraJaxError, match=r"bad[/\\]summary\.json: not valid JSON"):
    collect_runs(tmp_path)
  (bad / "summary.json").write_text(json.dumps({"config": {}, "exact_match": "high"}))
  with pytest.raises(LoraJaxError, match="'exact_match' must be a number"):
    collect_runs(tmp_path)
  (bad / "summary.json").write_text(json.dumps({"config": {"seed": 0}, "overrides": {}}))
  (bad / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 1.0}\n{oops\n')
  with pytest.raises(LoraJaxError, match=r"metrics\.jsonl:2: malformed JSON"):
    write_report(tmp_path)
