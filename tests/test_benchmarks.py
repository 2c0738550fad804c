"""The GPU benchmark script's code path, run on CPU (`--mode gpu --dry-run`: tiny shape, the Pallas kernel in
interpret mode), so the one-shot run on a lent GPU does not fail on a bug that CPU could have shown; and the
profiler-trace reader it uses (benchmarks/device_trace.py), on a real CPU trace and on a GPU-shaped XSpace."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import device_trace  # noqa: E402

# A GPU trace as `jax.profiler.trace` writes it: kernels on a stream line, the same kernel again on a line derived
# from it ("XLA Ops"), which must not count twice; an event's time is its line's timestamp + offset.
GPU_XSPACE = """
planes {
  id: 1 name: "/device:GPU:0"
  lines { id: 1 name: "Stream #13(compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 10000 stats { metadata_id: 1 str_value: "custom-call.1" } }
    events { metadata_id: 2 offset_ps: 12000 duration_ps: 3000 stats { metadata_id: 1 str_value: "fusion.2" } }
    events { metadata_id: 1 offset_ps: 20000 duration_ps: 10000 stats { metadata_id: 1 str_value: "custom-call.3" } }
    events { metadata_id: 3 offset_ps: 32000 duration_ps: 3000 stats { metadata_id: 1 str_value: "fusion.4" } }
  }
  lines { id: 2 name: "XLA Ops" timestamp_ns: 1000 events { metadata_id: 1 offset_ps: 0 duration_ps: 10000 } }
  event_metadata { key: 1 value { id: 1 name: "qmatmul_kernel" } }
  event_metadata { key: 2 value { id: 2 name: "loop_reduce_fusion" } }
  event_metadata { key: 3 value { id: 3 name: "loop_reduce_fusion_1" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
planes { id: 2 name: "/host:CPU" lines { id: 1 name: "python" events { metadata_id: 1 duration_ps: 5 } }
  event_metadata { key: 1 value { id: 1 name: "PjitFunction" } } }
"""
# Older traces without stream lines: the kernels' own line counts, a line derived from it ("XLA Ops": the same
# time under the HLO op's name) does not.
GPU_XSPACE_NO_STREAMS = """
planes {
  id: 1 name: "/device:GPU:0"
  lines { id: 1 name: "Compute" timestamp_ns: 0
    events { metadata_id: 1 offset_ps: 0 duration_ps: 10000 stats { metadata_id: 1 str_value: "custom-call.1" } } }
  lines { id: 2 name: "XLA Ops" timestamp_ns: 0
    events { metadata_id: 2 offset_ps: 0 duration_ps: 10000 stats { metadata_id: 1 str_value: "custom-call.1" } } }
  event_metadata { key: 1 value { id: 1 name: "qmatmul_kernel" } }
  event_metadata { key: 2 value { id: 2 name: "custom-call.1" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
"""
# XLA:CPU: a while loop's thunk spans its body's thunks; both carry hlo_op, only the outer one counts.
HOST_XSPACE = """
planes { id: 2 name: "/host:CPU"
  lines { id: 1 name: "tf_XLACpu"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 9000 stats { metadata_id: 1 str_value: "while.1" } }
    events { metadata_id: 2 offset_ps: 1000 duration_ps: 3000 stats { metadata_id: 1 str_value: "fusion" } }
    events { metadata_id: 2 offset_ps: 5000 duration_ps: 3000 stats { metadata_id: 1 str_value: "fusion" } }
    events { metadata_id: 3 offset_ps: 9000 duration_ps: 1000 } }
  event_metadata { key: 1 value { id: 1 name: "while.1" } }
  event_metadata { key: 2 value { id: 2 name: "fusion" } }
  event_metadata { key: 3 value { id: 3 name: "SlinkyThreadPool::Await" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } } }
"""


def test_int4_matmul_gpu_dry_run(tmp_path):
  out = tmp_path / "gpu.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int4_matmul.py"), "--mode", "gpu", "--dry-run",
                      "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  rows = [row for row in result["rows"] if "M" in row]
  assert rows and all(row["check"]["pass"] for row in rows), rows
  assert all("time_s" in row[op] for row in rows for op in ("pallas", "reference", "bf16_dot")), rows
  assert result["fused_lora"] and all(row["pass"] for row in result["fused_lora"]), result["fused_lora"]
  timed = [t for entry in result["sweep"] for t in entry["timed"]]
  assert timed and all("time_s" in t and t["pass"] for t in timed), result["sweep"]
  assert result["tuned"] and all(entry["winner"] for entry in result["sweep"]), result["sweep"]
  floor = result["floor"]
  assert len(floor) == 24 and all("time_s" in row for row in floor), floor  # 14 rows + SEED_POLICIES' 10
  assert {"op, nf4/kmajor (bn 128 + min_programs 1056 + prefetch 1)",
          "op, int4_sym/kmajor (min_programs 1056 + prefetch 1)"} <= {row["what"] for row in floor}, floor
  # the K-major grid: device time per policy at 1 and 16 rows, every output checked; its winners ran in the table
  grid = result["kmajor_grid"]
  assert len(grid) >= 4 and all(row["pass"] and row["device"]["device_s"] > 0 for row in grid), grid
  assert result["kmajor_grid_summary"]["int4"]["best"], result["kmajor_grid_summary"]
  assert {f"op, {f} K-major (default policy)" for f in ("int4_sym", "nf4")} <= {row["what"] for row in floor}, floor
  # every row also times the K-major layout's kernel, checked against the reference too
  assert all(row["kmajor_check"]["pass"] and "time_s" in row["pallas_kmajor"] for row in rows), rows
  assert {entry["fmt"] for entry in result["sweep"]} == {"nf4", "int4_sym/kmajor"}, result["sweep"]
  # every floor op and every M <= 16 Pallas row was profiled: on CPU the host plane's XLA thunks
  profiles = [row["device"] for row in floor] + [row["pallas"]["device"] for row in rows]
  assert all(p["source"] == "host" and p["kernels_per_op"] > 0 and 0 < p["device_s"] for p in profiles), profiles
  # each row ran its class's sweep winner (which one wins on CPU is timing: any of the policies), else the default
  tuned = {(t["fmt"], t["M"]): t["policy"]["dot"] for t in result["tuned"]}
  for row in rows:
    default = "fma" if (row["M"], row["fmt"]) == (1, "nf4") else "mma"
    assert row["blocks"]["dot"] == tuned.get((row["fmt"], 1 if row["M"] == 1 else 16), default), (row, tuned)
  # end-to-end decode of the random Llama, both 4-bit layouts: a positive step time, 4-bit weights read per token
  decode = {row["variant"]: row for row in result["gpu_decode"]}
  assert set(decode) == {"int4", "int4/kmajor"} and all(r["step_s"] > 0 for r in decode.values()), decode
  assert decode["int4/kmajor"]["weight_bytes_per_token"] == decode["int4"]["weight_bytes_per_token"], decode
  bf16_linear = 2 * 2 * (256 * (256 + 2 * 128) + 256 * 256 + 3 * 256 * 512)  # 2 layers of the dry-run model, 2 B each
  assert decode["int4/kmajor"]["linear_weight_bytes"] < 0.3 * bf16_linear, decode


def test_device_trace_reads_gpu_kernels_once_each():
  source, events = device_trace.parse_xspace(jax.profiler.ProfileData.from_text_proto(GPU_XSPACE))
  assert source == "gpu"
  assert [e[:2] for e in events] == [("qmatmul_kernel", "custom-call.1"), ("loop_reduce_fusion", "fusion.2"),
                                     ("qmatmul_kernel", "custom-call.3"), ("loop_reduce_fusion_1", "fusion.4")]
  s = device_trace.summarize(source, events, per=2)  # two ops: a kernel and a reduction each (its copy numbered)
  assert s["kernels_per_op"] == 2 and s["kernel_kinds"] == 2
  assert s["device_s"] == pytest.approx(13e-9) and s["span_s"] == pytest.approx(17.5e-9)  # (35 - 0 ns) / 2
  top = s["kernels"][0]
  assert top["name"] == "qmatmul_kernel" and top["per_op"] == 1 and top["mean_s"] == pytest.approx(10e-9)
  assert top["share"] == pytest.approx(20 / 26)


def test_device_profile_of_a_cpu_call():
  f = jax.jit(lambda a, ws: [jnp.tanh(a @ w) for w in ws])
  a, ws = jnp.ones((64, 64)), [jnp.full((64, 64), i, jnp.float32) for i in range(3)]
  jax.block_until_ready(f(a, ws))
  p = device_trace.device_profile(f, a, ws, per=3)
  assert p["source"] == "host" and p["kernels_per_op"] >= 1, p
  assert 0 < p["device_s"] and p["kernels"][0]["mean_s"] > 0, p


def test_device_profile_reports_errors_instead_of_raising():
  def boom(*_):
    raise ValueError("not traceable")
  assert device_trace.device_profile(boom)["error"] == "ValueError: not traceable"
  assert device_trace.summarize("gpu", [], per=1)["error"] == "no device events in the trace"
  # a GPU run whose trace has no kernels must not report the host's thunk (launch) times as device time
  data = jax.profiler.ProfileData.from_text_proto(HOST_XSPACE)
  assert device_trace.parse_xspace(data, host_ok=False) == ("gpu", [])
  source, events = device_trace.parse_xspace(data, host_ok=True)  # the while loop only, not its body again
  assert source == "host" and [(e[0], e[3]) for e in events] == [("while.1", 9.0)]


def test_device_trace_skips_derived_lines_without_streams():
  _, events = device_trace.parse_xspace(jax.profiler.ProfileData.from_text_proto(GPU_XSPACE_NO_STREAMS))
  assert [e[:2] for e in events] == [("qmatmul_kernel", "custom-call.1")]


@pytest.mark.parametrize("slabs", [False, True])
def test_stream_kernels_read_every_code(slabs):
  """The floor's diagnostic kernels (interpret mode): "stream" sums every code of its column slab over its share of
  K, on the codes as stored or as `code_slabs` lays them out; "empty" writes zeros. A kernel that skipped or
  misread codes would make the floor's comparison meaningless."""
  import int4_matmul
  k, n, bn, bk, split = 512, 96, 32, 2, 2
  codes = jax.random.randint(jax.random.key(0), (k // 2, n), 0, 256, jnp.int32).astype(jnp.uint8)
  stream, empty = int4_matmul.stream_kernels(k, n, bn, bk, split, 4, 2, interp=True, slabs=slabs)
  arg = int4_matmul.code_slabs(codes, bn) if slabs else codes
  got = stream(arg)
  assert got.shape == (split, 1, n)
  halves = codes.astype(jnp.float32).reshape(split, k // 2 // split, n).sum(axis=1)  # each split's share of K
  assert jnp.array_equal(got[:, 0], halves)
  assert not jnp.any(empty(arg))
  if slabs:
    assert jnp.array_equal(int4_matmul.code_slabs(codes, bn)[1, :, 5], codes[:, bn + 5])


SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")
                 if not p.name.startswith("_") and p.name != "device_trace.py")  # device_trace: a module they import


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_imports(script):
  """Each benchmark script's imports resolve (`--help` runs it up to argument parsing): a helper moved between the
  scripts must not break one that is rarely run (pallas_compile_sm90.py once imported a name that had moved)."""
  r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True,
                     cwd=ROOT, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0 and "usage" in r.stdout, r.stderr[-2000:]


def test_gpu_check_script_passes_only_flags_the_benchmark_takes():
  """scripts/gpu_check.sh runs on a lent GPU, once: a flag the benchmark does not take, a `--shapes` value it does
  not know or a shell syntax error would cost that session. Every option the script passes to int4_matmul.py (and
  the decode-only command its header gives) must be one of the benchmark's, with a value it accepts."""
  import re
  script = (ROOT / "scripts" / "gpu_check.sh").read_text()
  assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
  call = script[script.index("python3 benchmarks/int4_matmul.py"):script.index("bench_rc=")]
  flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", call))
  assert {"--kmajor-grid", "--decode-budget-s", "--shapes", "--profile"} <= flags, flags
  r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int4_matmul.py"), "--help"], capture_output=True,
                     text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert flags <= set(re.findall(r"(--[a-z][a-z0-9-]*)", r.stdout)), flags - set(re.findall(r"--[a-z0-9-]+", r.stdout))
  shapes = re.search(r"--shapes (\w+)", call).group(1)
  assert re.search(r"--shapes \{([^}]*)\}", r.stdout).group(1).split(",").count(shapes) == 1, shapes
  # the environment variables the script documents are the ones it reads
  documented = set(re.findall(r"\b([A-Z_]+_S|TESTS)=", script[:script.index("set -uo")]))
  read = set(re.findall(r"\$\{([A-Z_]+):-", script))
  assert documented == read - {"PYTHONPATH", "OUT"}, (documented, read)  # OUT: where results go (header too)


def test_cpu_util_counts_the_cores_a_worker_kept_busy():
  """The CPU benchmarks record each side's CPU seconds over its timed wall seconds (`cpu_util`): a busy loop on one
  thread reads at most one core, a sleep about none, so a run in which one side used more cores than the other
  shows. The busy loop's lower bound is loose: the suite's other worker competes for the same two cores (0.67 was
  seen under CI's load), and a count that missed this process's time would read ~0."""
  import time
  from _common import cpu_seconds, machine_info
  def util(fn):
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    return (cpu_seconds() - c0) / (time.perf_counter() - t0)
  def spin(s=0.3):
    end = time.perf_counter() + s
    while time.perf_counter() < end:
      pass
  assert 0.2 < util(spin) < 1.3
  assert util(lambda: time.sleep(0.3)) < 0.2
  assert machine_info()["usable_cpus"] >= 1
