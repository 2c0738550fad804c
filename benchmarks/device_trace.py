"""Device-side time of one call, read from a JAX profiler trace: which kernels an op launches and how long each runs.

Wall time over many calls (`int4_matmul.time_op`) says what a user waits; it cannot say whether that time is the
kernel's own or the gaps between launches (host-side launch cost, a split-K reduction's extra kernel, an
activation's padding). `device_profile` runs an already-compiled function once under ``jax.profiler.trace`` and
reads the trace with `jax.profiler.ProfileData` (no TensorFlow or xprof needed):

* on a GPU, the kernels of the device plane ("/device:GPU:<i>"), read from its stream lines: one event per kernel
  launch (or memcpy), with the XLA op it belongs to (`hlo_op` stat);
* on a CPU (the benchmark's dry run), the XLA thunks of the host plane: the events that carry an `hlo_op` stat.

Per op (`per` = the number of ops the call ran, e.g. the benchmark's C weight copies): kernels launched, summed
device time, the device-side span from the first kernel's start to the last one's end (span - sum = idle gaps
between kernels), and the kernels grouped by name (less the number XLA appends to each op's copy).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import tempfile

import jax

_DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework", "Source code", "TensorFlow", "XLA TraceMe",
                  "Launch Stats")  # lines some profilers derive from the kernels: the same time twice

_NUMBERED = re.compile(r"([._]\d+)+$")


def trace_events(fn, *args):
  """Runs fn(*args) once under the profiler; returns ("gpu" | "host", [(name, hlo_op, start_ns, duration_ns)])."""
  d = tempfile.mkdtemp(prefix="lj_trace_")
  try:
    with jax.profiler.trace(d):
      jax.block_until_ready(fn(*args))
    files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    if not files:
      raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {d}")
    return parse_xspace(jax.profiler.ProfileData.from_file(files[0]), host_ok=jax.default_backend() == "cpu")
  finally:
    shutil.rmtree(d, ignore_errors=True)


def parse_xspace(data, host_ok: bool = True) -> tuple[str, list[tuple[str, str, float, float]]]:
  """The device-side events of a `jax.profiler.ProfileData`: GPU kernels if a GPU plane has any, else (if
  `host_ok`: a CPU run, where the host is the device) host XLA thunks. Each event is (name, hlo_op, start_ns,
  duration_ns), sorted by start, duplicates removed, and only the outermost of nested events (XLA:CPU's `while`
  thunk spans its body's thunks, which carry `hlo_op` too: counting both would count the time twice)."""
  events = set()
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    streams = [ln for ln in plane.lines if ln.name.startswith("Stream")]
    for ln in streams or [ln for ln in plane.lines if not ln.name.startswith(_DERIVED_LINES)]:
      events.update(_outermost(ln, lambda stats: True))
  if events or not host_ok:  # a GPU run without kernel events (no CUPTI?): none, not the host's launch times
    return "gpu", sorted(events, key=lambda e: e[2])
  for plane in data.planes:
    if plane.name.startswith("/host:CPU"):
      for ln in plane.lines:
        events.update(_outermost(ln, lambda stats: "hlo_op" in stats))
  return "host", sorted(events, key=lambda e: e[2])


def _outermost(line, keep):
  """A line's events that `keep` accepts (by their stats), less those inside an earlier kept one's span."""
  out, end = [], float("-inf")
  candidates = []
  for e in line.events:
    stats = dict(e.stats)
    if keep(stats) and not e.name.startswith("end:"):
      candidates.append((e.name, str(stats.get("hlo_op", "")), float(e.start_ns), float(e.duration_ns)))
  for ev in sorted(candidates, key=lambda ev: (ev[2], -ev[3])):
    if ev[2] + ev[3] <= end:
      continue  # nested in the last outer event
    out.append(ev)
    end = max(end, ev[2] + ev[3])
  return out


def summarize(source: str, events, per: int, top: int = 6) -> dict:
  """Per-op figures of a traced call that ran `per` ops (see the module docstring); times in seconds."""
  if not events:
    return {"source": source, "error": "no device events in the trace"}
  total = sum(e[3] for e in events)
  span = max(e[2] + e[3] for e in events) - min(e[2] for e in events)
  groups, example_op = collections.defaultdict(list), {}
  for name, hlo_op, _, dur in events:
    kind = _NUMBERED.sub("", name)  # each op's copy of a fusion gets its own number: fusion_3, fusion.4
    groups[kind].append(dur)
    example_op.setdefault(kind, hlo_op)
  kernels = sorted(({"name": kind[:120], "hlo_op": example_op[kind][:80], "per_op": len(d) / per,
                     "mean_s": sum(d) / len(d) * 1e-9, "share": sum(d) / total}
                    for kind, d in groups.items()), key=lambda k: -k["share"])
  return {"source": source, "kernels_per_op": len(events) / per, "device_s": total / per * 1e-9,
          "span_s": span / per * 1e-9, "kernels": kernels[:top], "kernel_kinds": len(kernels)}


def device_profile(fn, *args, per: int = 1) -> dict:
  """`summarize` of one traced call fn(*args) (compile fn before: a compiling call would be traced too); an
  "error" entry instead if tracing fails, so a benchmark keeps going."""
  try:
    return summarize(*trace_events(fn, *args), per=per)
  except Exception as e:  # the profiler is a diagnostic: never the reason a run stops
    return {"error": f"{type(e).__name__}: {e}"[:400]}
