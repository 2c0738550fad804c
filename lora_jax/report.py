"""Sweep reports: tables and plots from the run directories written by the trainer.

A run directory holds ``summary.json`` (name, sweep overrides, flattened resolved config, final metrics) and
``metrics.jsonl`` (one JSON object per logged train/eval step). A sweep directory holds one run directory per grid
point at any depth. Runs whose configs differ only by the seed form a *group*; a group's metrics are reported as
mean and sample standard deviation (``ddof=1``; 0 for a single run) over its seeds.

The *varying axes* of a set of runs are the config keys whose values are not the same in every run, the seed key
excepted. They name the groups in the tables and give one ``<metric>_by_<axis>.png`` plot each.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import uuid
from pathlib import Path
from typing import Any, Callable

from ._errors import LoraJaxError
from ._jsonl import read_jsonl

#: Metrics aggregated per group (mean and std over seeds), in table order.
GROUP_METRICS = ("exact_match", "eval_loss", "final_train_loss", "wall_time_s", "peak_rss_mib", "trainable_params")
#: Numeric fields of ``summary.json`` (each a number or null).
_NUMERIC_FIELDS = ("trainable_params", "wall_time_s", "peak_rss_mib", "steps", "final_train_loss", "eval_loss",
                   "exact_match", "exact_match_before")
#: Per-run columns of ``results.csv`` after path, axes and seed.
_CSV_FIELDS = ("name", "status", "trainable_params", "steps", "final_train_loss", "eval_loss", "exact_match",
               "exact_match_before", "wall_time_s", "peak_rss_mib")


# ----------------------------------------------------------------------------------------------- collecting


def _read_summary(path: Path) -> dict:
  """One validated ``summary.json`` as a dict, with ``path`` (its run directory) added."""
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except UnicodeDecodeError as e:
    raise LoraJaxError(f"{path}: not UTF-8 text (byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise LoraJaxError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
  if not isinstance(data, dict):
    raise LoraJaxError(f"{path}: expected a JSON object, got {type(data).__name__}")
  for key in ("config", "overrides"):
    value = data.get(key, {})
    if value is None:
      value = {}
    if not isinstance(value, dict):
      raise LoraJaxError(f"{path}: key {key!r} must be an object of dotted keys, got {type(value).__name__}")
    data[key] = value
  derived = data.get("derived") or []
  if not isinstance(derived, list) or not all(isinstance(k, str) for k in derived):
    raise LoraJaxError(f"{path}: key 'derived' must be a list of dotted config keys, got {derived!r}")
  data["derived"] = derived
  for key in _NUMERIC_FIELDS:
    value = data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
      raise LoraJaxError(f"{path}: key {key!r} must be a number or null, got {value!r}")
    data[key] = value
  data["path"] = path.parent
  return data


def collect_runs(root: str | Path) -> list[dict]:
  """Every run below ``root``: the contents of each ``summary.json``, sorted by path.

  Args:
    root: a sweep directory (searched recursively) or a single run directory.

  Returns:
    One dict per run: the keys of its ``summary.json`` plus ``path``, the run directory (a ``Path``). Numeric
    fields absent from the file are ``None``; ``config`` and ``overrides`` are always dicts.

  Raises:
    LoraJaxError: ``root`` is not a directory, holds no ``summary.json``, or one of them is malformed.
  """
  root = Path(root)
  if not root.is_dir():
    raise LoraJaxError(f"{root}: not a directory")
  files = sorted(root.rglob("summary.json"))
  if not files:
    raise LoraJaxError(f"{root}: no summary.json found in it or below it (is this a run or sweep directory?)")
  return [_read_summary(f) for f in files]


def read_metrics(run_dir: str | Path) -> list[dict]:
  """The lines of ``<run_dir>/metrics.jsonl`` as dicts (``[]`` if the file does not exist)."""
  path = Path(run_dir) / "metrics.jsonl"
  if not path.is_file():
    return []
  return [row for _, row in read_jsonl(path)]


# ------------------------------------------------------------------------------------------------- grouping


def _canon(value: Any) -> str:
  """A hashable, order-independent form of a config value (lists and dicts included)."""
  return json.dumps(value, sort_keys=True, allow_nan=True)


def _config_value(run: dict, key: str):
  """``run``'s value of a config key; a key its summary lacks has the value it ran with: the key's `RunConfig`
  default (the key was added after the run), else null."""
  from .config import flat_defaults
  return run["config"][key] if key in run["config"] else flat_defaults().get(key)


def varying_axes(runs: list[dict], *, seed_key: str = "seed") -> list[str]:
  """Config keys whose value differs between runs (a key missing from a run counts as its `RunConfig` default,
  else null), except ``seed_key`` and keys every run derived from others (its summary's ``derived``, e.g.
  ``train.remat: auto`` resolved per ``quantize``) that no run set itself (``overrides``).

  Ordered as the keys first appear in the runs' ``overrides`` (the sweep's axis order), then alphabetically.
  """
  overridden = {k for r in runs for k in r["overrides"]}
  derived = set.intersection(*(set(r.get("derived", ())) for r in runs)) - overridden if runs else set()
  keys = sorted({k for r in runs for k in r["config"]} - {seed_key} - derived)
  varying = {k for k in keys if len({_canon(_config_value(r, k)) for r in runs}) > 1}
  ordered = []
  for r in runs:
    for k in r["overrides"]:
      if k in varying and k not in ordered:
        ordered.append(k)
  return ordered + [k for k in keys if k in varying and k not in ordered]


def _sort_key(value: Any) -> tuple:
  """Sorts mixed axis values: null, then numbers numerically, then strings, then anything else."""
  if value is None:
    return (0, 0.0, "")
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return (1, float(value), "")
  if isinstance(value, str):
    return (2, 0.0, value)
  return (3, 0.0, _canon(value))


def _stats(values: list) -> dict:
  """``{"mean", "std", "n"}`` over the non-null values (mean/std null when there are none)."""
  vals = [float(v) for v in values if v is not None]
  if not vals:
    return {"mean": None, "std": None, "n": 0}
  if not all(math.isfinite(v) for v in vals):
    # A diverged run's NaN/inf loss makes the group's summary non-finite rather than being hidden.
    return {"mean": math.fsum(vals) / len(vals), "std": math.nan, "n": len(vals)}
  std = statistics.stdev(vals) if len(vals) > 1 else 0.0
  return {"mean": statistics.mean(vals), "std": std, "n": len(vals)}


def group_runs(runs: list[dict], *, seed_key: str = "seed") -> list[dict]:
  """Groups runs whose configs differ only by the seed, with mean/std of their metrics over the seeds.

  Args:
    runs: as returned by :func:`collect_runs`.
    seed_key: the config key that holds the seed.

  Returns:
    One dict per group, sorted by its axis values:
      ``axes``: {axis: value} for every varying axis (see :func:`varying_axes`), in axis order;
      ``n_seeds``: the number of runs in the group; ``seeds``: their seeds; ``paths``: their run directories;
      ``n_diverged``: how many of them have status ``"diverged"``;
      one entry per name in :data:`GROUP_METRICS`: ``{"mean", "std", "n"}``, the mean and sample standard
      deviation (ddof=1; 0.0 for one run) over the runs where the metric is not null (both null if it is null in
      all of them; std NaN if some value is not finite).
  """
  if not runs:
    raise LoraJaxError("no runs to group")
  axes = varying_axes(runs, seed_key=seed_key)
  buckets: dict[tuple, list[dict]] = {}
  for r in runs:
    buckets.setdefault(tuple(_canon(_config_value(r, a)) for a in axes), []).append(r)
  groups = []
  for members in buckets.values():
    group = {"axes": {a: _config_value(members[0], a) for a in axes}, "n_seeds": len(members),
             "seeds": [m["config"].get(seed_key) for m in members], "paths": [m["path"] for m in members],
             "n_diverged": sum(m.get("status") == "diverged" for m in members)}
    for metric in GROUP_METRICS:
      group[metric] = _stats([m.get(metric) for m in members])
    groups.append(group)
  groups.sort(key=lambda g: tuple(_sort_key(g["axes"][a]) for a in axes))
  return groups


# -------------------------------------------------------------------------------------------------- writing


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
  """Calls ``write(tmp)`` for a temp file next to ``path``, then renames it into place."""
  # Not mkstemp: its 0600 mode would stick to the report; a fresh name gets the umask's usual permissions.
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path


def _write_text(path: Path, text: str) -> Path:
  return _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def _fmt_value(value: Any) -> str:
  """An axis value as text: lists comma-joined, null as ``-``."""
  if value is None:
    return "-"
  if isinstance(value, (list, tuple)):
    return ",".join(_fmt_value(v) for v in value)
  if isinstance(value, dict):
    return _canon(value)
  return str(value)


def _fmt_stat(stat: dict, *, scale: float = 1.0, digits: int = 1, thousands: bool = False) -> str:
  """``"mean ± std"`` (just the mean for a single value); ``-`` when there is no value."""
  if stat["mean"] is None:
    return "-"
  spec = f"{',' if thousands else ''}.{digits}f"
  mean = format(stat["mean"] * scale, spec)
  if stat["n"] < 2:
    return mean
  return f"{mean} ± {format(stat['std'] * scale, spec)}"


def _fmt_params(stat: dict) -> str:
  """Trainable parameters: one number when equal across the group (the normal case), else mean ± std."""
  if stat["mean"] is not None and stat["std"] == 0.0:
    return format(round(stat["mean"]), ",d")
  return _fmt_stat(stat, digits=0, thousands=True)


def _rel(path: Path, root: Path) -> str:
  try:
    return path.relative_to(root).as_posix() or "."
  except ValueError:
    return str(path)


def results_csv(runs: list[dict], root: str | Path, *, seed_key: str = "seed") -> str:
  """``results.csv`` text: one row per run with its path (relative to ``root``), axes, seed and metrics."""
  root = Path(root)
  axes = varying_axes(runs, seed_key=seed_key)
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(["path", *axes, seed_key, *_CSV_FIELDS])

  def cell(v):
    if v is None:
      return ""
    return json.dumps(v) if isinstance(v, (list, dict)) else v

  for r in runs:
    writer.writerow([_rel(r["path"], root), *(cell(r["config"].get(a)) for a in axes),
                     cell(r["config"].get(seed_key)), *(cell(r.get(f)) for f in _CSV_FIELDS)])
  return buf.getvalue()


def results_markdown(runs: list[dict], root: str | Path, *, seed_key: str = "seed") -> str:
  """``results.md`` text: a header line naming ``root`` and the run count, then one table row per group."""
  groups = group_runs(runs, seed_key=seed_key)
  axes = list(groups[0]["axes"])
  diverged = sum(g["n_diverged"] for g in groups)
  header = (f"Sweep `{root}`: {len(runs)} run{'s' if len(runs) != 1 else ''} in {len(groups)} "
            f"group{'s' if len(groups) != 1 else ''}, mean ± std over seeds"
            + (f", {diverged} diverged" if diverged else ""))
  cols = [*axes, "exact match (%)", "eval loss", "trainable params", "wall time (s)", "peak RSS (MiB)", "seeds"]
  lines = [header, "", "| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |",
           "|" + "|".join("---" if i < len(axes) else "---:" for i in range(len(cols))) + "|"]
  for g in groups:
    seeds = str(g["n_seeds"]) + (f" ({g['n_diverged']} diverged)" if g["n_diverged"] else "")
    cells = [*(_fmt_value(g["axes"][a]) for a in axes),
             _fmt_stat(g["exact_match"], scale=100.0, digits=1),
             _fmt_stat(g["eval_loss"], digits=3),
             _fmt_params(g["trainable_params"]),
             _fmt_stat(g["wall_time_s"], digits=1),
             _fmt_stat(g["peak_rss_mib"], digits=0, thousands=True),
             seeds]
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- plotting


def _new_figure(width: float = 7.0, height: float = 4.5):
  """A Figure on an Agg canvas (no pyplot, no global backend switch)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _save_png(fig, path: Path) -> Path:
  return _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def _run_label(run: dict, root: Path) -> str:
  if run["overrides"]:
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in run["overrides"].items())
  return str(run.get("name") or _rel(run["path"], root))


_LINESTYLES = ("-", "--", ":", "-.")


def plot_loss_curves(runs: list[dict], root: str | Path, path: Path, *, seed_key: str = "seed") -> Path:
  """``loss_curves.png``: training loss against step, one line per run, labelled by the run's overrides.

  Runs of one seed group share a colour and differ by line style.
  """
  from matplotlib.ticker import MaxNLocator
  root = Path(root)
  axes = varying_axes(runs, seed_key=seed_key)
  group_of: dict[tuple, int] = {}
  seen_in_group: dict[int, int] = {}
  fig = _new_figure(9.0, 5.0)
  ax = fig.add_subplot()
  plotted = 0
  for r in runs:
    points = [(row["step"], row["loss"]) for row in read_metrics(r["path"])
              if row.get("split") == "train" and isinstance(row.get("step"), (int, float))
              and isinstance(row.get("loss"), (int, float)) and math.isfinite(row["loss"])]
    if not points:
      continue
    points.sort()
    g = group_of.setdefault(tuple(_canon(r["config"].get(a)) for a in axes), len(group_of))
    k = seen_in_group[g] = seen_in_group.get(g, -1) + 1
    ax.plot([p[0] for p in points], [p[1] for p in points], color=f"C{g % 10}",
            linestyle=_LINESTYLES[k % len(_LINESTYLES)], linewidth=1.2, label=_run_label(r, root))
    plotted += 1
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("step")
  ax.set_ylabel("train loss")
  ax.set_title("Training loss")
  ax.grid(True, alpha=0.3)
  if plotted == 0:
    ax.text(0.5, 0.5, "no training metrics found", ha="center", va="center", transform=ax.transAxes)
  elif plotted <= 40:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if plotted <= 20 else 2,
              frameon=False)
  return _save_png(fig, path)


def _plottable_axis(groups: list[dict], axis: str) -> bool:
  """Whether every value of the axis is a number, string, bool or null (not a list or dict)."""
  return all(g["axes"][axis] is None or isinstance(g["axes"][axis], (int, float, str, bool)) for g in groups)


def _plot_metric(groups: list[dict]) -> tuple[str, str, float] | None:
  """(metric, y label, scale) for the by-axis plots: exact match if any group has it, else eval/train loss."""
  for metric, label, scale in (("exact_match", "exact match (%)", 100.0), ("eval_loss", "eval loss", 1.0),
                               ("final_train_loss", "final train loss", 1.0)):
    if any(g[metric]["mean"] is not None for g in groups):
      return metric, label, scale
  return None


def _safe_name(axis: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", axis)


def plot_metric_by_axis(groups: list[dict], axis: str, path: Path, *, metric: str, ylabel: str,
                        scale: float = 1.0) -> Path:
  """Mean ± std (over seeds) of ``metric`` per value of ``axis``, one series per combination of the other axes."""
  values = sorted({_canon(g["axes"][axis]): g["axes"][axis] for g in groups}.values(), key=_sort_key)
  position = {_canon(v): i for i, v in enumerate(values)}
  others = [a for a in groups[0]["axes"] if a != axis]
  series: dict[str, list[dict]] = {}
  for g in groups:
    label = ", ".join(f"{a}={_fmt_value(g['axes'][a])}" for a in others)
    series.setdefault(label, []).append(g)
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  fig = _new_figure(max(6.5, 1.0 + 0.9 * len(values)), 4.5)
  ax = fig.add_subplot()
  width = 0.5
  for k, (label, members) in enumerate(series.items()):
    offset = (k - (len(series) - 1) / 2) * width / len(series)
    pts = sorted((position[_canon(g["axes"][axis])] + offset, g[metric]["mean"] * scale,
                  (g[metric]["std"] or 0.0) * scale) for g in members if g[metric]["mean"] is not None)
    if not pts:
      continue
    yerr = [e if math.isfinite(e) else 0.0 for _, _, e in pts]
    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=yerr, fmt="o-" if numeric else "o",
                capsize=4, markersize=5, linewidth=1.2, label=label or None)
  ax.set_xticks(range(len(values)))
  ax.set_xticklabels([_fmt_value(v) for v in values])
  ax.set_xlim(-0.6, len(values) - 0.4)
  ax.set_xlabel(axis)
  ax.set_ylabel(ylabel)
  ax.set_title(f"{ylabel} by {axis} (mean ± std over seeds)")
  ax.grid(True, axis="y", alpha=0.3)
  if others and len(series) <= 40:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  return _save_png(fig, path)


def write_report(root: str | Path, out: str | Path | None = None, *, seed_key: str = "seed") -> dict[str, Path]:
  """Writes the tables and plots of the sweep (or run) under ``root`` into ``out`` (default: ``root``).

  Files (each written atomically: temp file, then rename):
    ``results.csv``: one row per run (path relative to ``root``, varying axes, seed, metrics);
    ``results.md``: a header line and one markdown table row per seed group (see :func:`results_markdown`);
    ``loss_curves.png``: training loss against step, one line per run;
    ``<metric>_by_<axis>.png`` for each varying axis with number/string values: mean ± std over seeds per axis
    value, where metric is ``exact_match`` if any run has it, else ``eval_loss`` (else ``final_train_loss``).

  Args:
    root: the sweep or run directory (searched recursively for ``summary.json``).
    out: the output directory (created if needed).
    seed_key: the config key that holds the seed.

  Returns:
    {file name: path} of the files written.

  Raises:
    LoraJaxError: no runs under ``root``, a malformed ``summary.json``/``metrics.jsonl``, or ``out`` unusable.
  """
  root = Path(root)
  runs = collect_runs(root)
  out = root if out is None else Path(out)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise LoraJaxError(f"{out}: cannot create the output directory ({e.strerror})") from None
  groups = group_runs(runs, seed_key=seed_key)
  written = {"results.csv": _write_text(out / "results.csv", results_csv(runs, root, seed_key=seed_key)),
             "results.md": _write_text(out / "results.md", results_markdown(runs, root, seed_key=seed_key))}
  written["loss_curves.png"] = plot_loss_curves(runs, root, out / "loss_curves.png", seed_key=seed_key)
  choice = _plot_metric(groups)
  if choice is not None:
    metric, ylabel, scale = choice
    for axis in groups[0]["axes"]:
      if not _plottable_axis(groups, axis):
        continue
      name = f"{metric}_by_{_safe_name(axis)}.png"
      written[name] = plot_metric_by_axis(groups, axis, out / name, metric=metric, ylabel=ylabel, scale=scale)
  return written


def main_report(root: str, out: str | None) -> None:
  """CLI hook for ``lora-jax report DIR [--out OUT]``: writes the report and prints the markdown table."""
  written = write_report(root, out)
  print(written["results.md"].read_text(encoding="utf-8"), end="")
