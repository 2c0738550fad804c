"""What the CPU benchmarks share: the machine's description, peak RSS, worker subprocesses, the Hugging Face
anchor loaded from the same GGUF file, and writing the JSON result (to a temporary path, then renamed)."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import json
import os
import platform
import resource
import subprocess
import sys


def machine_info() -> dict:
  cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None) \
      if os.path.exists("/proc/cpuinfo") else platform.processor()
  versions = {p: md.version(p) for p in ("jax", "jaxlib", "torch", "transformers", "numpy")}
  return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
          "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
          "python": platform.python_version(), **versions,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def cpu_seconds() -> float:
  """CPU seconds (user + system) this process has used: over a timed section, divided by its wall seconds, the
  number of cores it kept busy (``cpu_util``), so a comparison records whether both sides used the same cores."""
  t = os.times()
  return t.user + t.system


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_worker(script: str, name: str, argv: list[str], inputs: dict | None = None) -> dict:
  """Runs ``script --worker ...argv`` in its own process (so its peak RSS is its own), `inputs` as JSON on stdin;
  returns the dict of the worker's last ``RESULT {json}`` line, or exits naming the worker."""
  print(f"running {name} worker ...", file=sys.stderr, flush=True)
  proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", *argv],
                        input=json.dumps(inputs or {}), stdout=subprocess.PIPE, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    sys.exit(f"{name} worker failed (exit {proc.returncode}); stdout:\n{proc.stdout[-2000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def worker_main(fn, args) -> None:
  """A worker process's body: fn(args, inputs read from stdin) printed as one ``RESULT {json}`` line."""
  print("RESULT " + json.dumps(fn(args, json.loads(sys.stdin.read() or "{}"))), flush=True)


def hf_causal_lm_from_gguf(path: str):
  """transformers' model of the GGUF file at `path`, in float32, on 2 torch threads (the anchor's settings)."""
  import torch
  from transformers import AutoModelForCausalLM
  from transformers.utils import logging as hf_logging
  torch.set_num_threads(2)
  hf_logging.disable_progress_bar()
  return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)


def save_json(result: dict, path: str) -> None:
  """Writes `result` to `path` through a temporary file, so a crash never leaves half a JSON file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
  os.replace(path + ".tmp", path)
