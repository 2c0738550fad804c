"""The GPU benchmark script's code path, run on CPU (`--mode gpu --dry-run`: tiny shape, the Pallas kernel in
interpret mode), so the one-shot run on a lent GPU does not fail on a bug that CPU could have shown."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
  assert len(result["floor"]) == 6 and all("time_s" in row for row in result["floor"]), result["floor"]
  # each row ran its class's sweep winner (which one wins on CPU is timing: any of the policies), else the default
  tuned = {(t["fmt"], t["M"]): t["policy"]["dot"] for t in result["tuned"]}
  for row in rows:
    default = "fma" if (row["M"], row["fmt"]) == (1, "nf4") else "mma"
    assert row["blocks"]["dot"] == tuned.get((row["fmt"], 1 if row["M"] == 1 else 16), default), (row, tuned)
