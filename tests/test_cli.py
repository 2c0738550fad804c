"""The lora-jax CLI: stdout carries only results; bad input gives one clear line on stderr and exit code 2."""

import json

import pytest

from lora_jax.cli import main
from tests.conftest import make_tiny_folder


def run(capsys, *argv):
  code = main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_generate_prints_only_the_continuation(capsys, smollm2):
  code, out, err = run(capsys, "generate", "--model", "smollm2-135m", "--prompt", "What is 2+2?", "--chat",
                       "--max-new-tokens", "16")
  assert code == 0
  assert "[lora_jax]" not in out and "[lora_jax]" in err
  assert out.strip() and "<|im_start|>" not in out and "What is 2+2?" not in out


@pytest.mark.parametrize("setting,want", [({}, "{cache}/xla 2147483648"), ({"LORA_JAX_XLA_CACHE": "0"}, "None -1"),
                                          ({"JAX_COMPILATION_CACHE_DIR": "{tmp}/own"}, "{tmp}/own -1"),
                                          ({"LORA_JAX_CACHE": "/proc/nope"}, "None -1")])
def test_cli_keeps_compiled_programs_in_its_cache(tmp_path, setting, want):
  """The CLI's persistent compilation cache: under $LORA_JAX_CACHE/xla with a 2 GiB cap; off when asked, left to a
  directory set through jax, and off (no error) where the directory cannot be made."""
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "LORA_JAX_XLA_CACHE")}
  env.update({"LORA_JAX_CACHE": str(tmp_path / "c"), "JAX_PLATFORMS": "cpu"})
  env.update({k: v.format(tmp=tmp_path) for k, v in setting.items()})
  code = ("import jax; from lora_jax.cli import _use_compilation_cache as use; use(); "
          "print(jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == want.format(cache=tmp_path / "c", tmp=tmp_path).split()


def test_generate_json_batch(capsys, tiny_folder):
  code, out, _ = run(capsys, "generate", "--model", str(tiny_folder), "--prompt", "w3 w4", "--prompt", "w5",
                     "--max-new-tokens", "5", "--json", "-q")
  assert code == 0
  rows = [json.loads(line) for line in out.splitlines()]
  assert [r["prompt"] for r in rows] == ["w3 w4", "w5"]
  assert all(r["finish_reason"] in ("length", "eos") for r in rows)


def test_perplexity_json_line(capsys, smollm2, tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
  code, out, _ = run(capsys, "perplexity", "--model", "smollm2-135m", "--text-file", str(text), "--max-length", "64")
  assert code == 0
  result = json.loads(out)
  assert set(result) == {"tokens", "nll", "perplexity"}
  n = len(smollm2.tokenizer.encode(text.read_text()))
  windows = -(-n // 64)
  assert result["tokens"] == n - windows  # one unpredicted first token per window
  assert 1 < result["perplexity"] < 20   # repeated text is easy to predict


def test_info(capsys):
  code, out, _ = run(capsys, "info", "--model", "smollm2-135m", "-q")
  info = json.loads(out)
  assert code == 0
  assert (info["architecture"], info["num_layers"], info["hidden_size"], info["num_heads"], info["num_kv_heads"]) == \
      ("llama", 30, 576, 9, 3)
  assert info["parameters"] == 134_515_008 and info["tie_embeddings"] and info["dtype"] == "float32"


# ------------------------------------------------------------------ bad input
def _one_line_error(code, err, *needles):
  assert code == 2
  lines = [line for line in err.splitlines() if line.startswith("lora-jax")]
  assert len(lines) == 1 and "Traceback" not in err, err
  for n in needles:
    assert n in lines[0], lines[0]


def test_unknown_preset_lists_valid_ones(capsys):
  code, _, err = run(capsys, "info", "--model", "smollm9")
  _one_line_error(code, err, "smollm9", "smollm2-135m", "minilm-l6")


def test_truncated_gguf(capsys, smollm2, tmp_path):
  bad = tmp_path / "cut.gguf"
  with open(smollm2.source, "rb") as f:
    bad.write_bytes(f.read(3_000_000))
  code, _, err = run(capsys, "info", "--model", str(bad))
  _one_line_error(code, err, "cut.gguf", "truncated")


def test_not_a_gguf(capsys, tmp_path):
  bad = tmp_path / "x.gguf"
  bad.write_text("hello")
  code, _, err = run(capsys, "info", "--model", str(bad))
  _one_line_error(code, err, "x.gguf", "not a GGUF file")


def test_unsupported_architecture(capsys, tiny_folder):
  cfg = json.loads((tiny_folder / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (tiny_folder / "config.json").write_text(json.dumps(cfg))
  code, _, err = run(capsys, "info", "--model", str(tiny_folder))
  _one_line_error(code, err, "config.json", "'gpt2'", "llama", "mistral", "qwen2")


def test_missing_and_truncated_safetensors(capsys, tiny_folder):
  st = tiny_folder / "model.safetensors"
  data = st.read_bytes()
  st.write_bytes(data[: len(data) // 2])
  code, _, err = run(capsys, "info", "--model", str(tiny_folder))
  _one_line_error(code, err, "model.safetensors")
  st.unlink()
  (tiny_folder / "pytorch_model.bin").write_bytes(b"pickle")
  code, _, err = run(capsys, "info", "--model", str(tiny_folder))
  _one_line_error(code, err, "no model.safetensors", "pytorch_model.bin")


def test_missing_tensor_is_named(capsys, tiny_folder):
  from safetensors.numpy import load_file, save_file
  st = tiny_folder / "model.safetensors"
  tensors = load_file(st)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, st)
  code, _, err = run(capsys, "info", "--model", str(tiny_folder))
  _one_line_error(code, err, "model.layers.1.mlp.up_proj.weight")


def test_prompt_longer_than_context(capsys, tmp_path):
  folder = make_tiny_folder(tmp_path / "short", max_position_embeddings=16)
  prompt = " ".join(f"w{i % 60 + 2}" for i in range(20))
  code, _, err = run(capsys, "generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "4")
  _one_line_error(code, err, "exceeds the model context of 16", "--truncate")
  code, out, _ = run(capsys, "generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "4",
                     "--truncate", "-q")
  assert code == 0


def test_empty_text_file(capsys, tiny_folder, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n")
  code, _, err = run(capsys, "perplexity", "--model", str(tiny_folder), "--text-file", str(empty))
  _one_line_error(code, err, "empty.txt", "empty")
  code, _, err = run(capsys, "perplexity", "--model", str(tiny_folder), "--text-file", str(tmp_path / "nope.txt"))
  _one_line_error(code, err, "nope.txt", "not found")


def test_hub_id_offline_says_what_to_do(capsys, monkeypatch):
  pytest.importorskip("huggingface_hub")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  code, _, err = run(capsys, "info", "--model", "someorg/some-model-that-is-not-cached")
  _one_line_error(code, err, "someorg/some-model-that-is-not-cached", "pass its path with --model")


def test_kmajor_layout_gives_the_same_perplexity_and_needs_quantization(capsys, tmp_path):
  """--kmajor keeps --quantize int4's (and nf4's) weights in the K-major layout: the same perplexity (here the
  reference path instead of the C++ kernel: the same sums in another order); without quantization it is
  refused."""
  from lora_jax.testing import assert_allclose
  tiny_folder = make_tiny_folder(tmp_path / "tiny64", hidden_size=64, intermediate_size=128, head_dim=16)
  text = tmp_path / "t.txt"
  text.write_text("w3 w4 w5 w6 w7 " * 8)
  base = ["perplexity", "--model", str(tiny_folder), "--text-file", str(text), "--max-length", "16", "-q",
          "--quantize", "int4"]
  results = []
  for extra in ([], ["--kmajor"]):
    code, out, _ = run(capsys, *base, *extra)
    assert code == 0
    results.append(json.loads(out))
  assert results[0]["tokens"] == results[1]["tokens"]
  assert_allclose(results[1]["perplexity"], results[0]["perplexity"], "parity_perplexity")
  code, out, _ = run(capsys, "generate", "--model", str(tiny_folder), "--prompt", "w3", "--max-new-tokens", "3",
                     "--quantize", "int4", "--kmajor", "-q")
  assert code == 0
  code, out, _ = run(capsys, *base[:-1], "nf4", "--kmajor")
  assert code == 0 and json.loads(out)["tokens"] == results[0]["tokens"]
  code, _, err = run(capsys, *base[:-1], "none", "--kmajor")
  assert code == 2 and "needs --quantize nf4, int4 or native" in err


def test_adapter_over_a_quantized_base(capsys, smollm2, tmp_path):
  """--adapter with --quantize: by default the adapter stays apart from the 4-bit base (`--adapter-merge separate`,
  the model a QLoRA run trains). Over ``native`` (the GGUF's own Q4_1 blocks, which dequantize to exactly the
  float weights) that is the float model with the adapter merged, to float rounding; so is ``dequantized``, while
  ``requantized`` rounds part of the adapter away. (``native`` once took the stored blocks in place of the merged
  weights: the adapter was silently dropped.) `eval` takes the same options, and its loss is the float one."""
  import jax
  from lora_jax.peft import IA3Config, LoraConfig, PromptTuningConfig, save_adapter
  from lora_jax.testing import assert_allclose
  cfg = LoraConfig(rank=4, alpha=8, targets=("q_proj", "down_proj"))
  adapter, _ = cfg.init_adapter(smollm2.config, smollm2.params, key=jax.random.key(0))
  adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), adapter)
  save_adapter(tmp_path / "ad", cfg, smollm2.config, adapter)
  text = tmp_path / "t.txt"
  text.write_text("The quick brown fox jumps over the lazy dog. " * 4)

  def ppl(*extra):
    code, out, err = run(capsys, "perplexity", "--model", "smollm2-135m", "--text-file", str(text), "-q", *extra)
    assert code == 0, err
    return json.loads(out)["perplexity"]
  with_adapter = ["--adapter", str(tmp_path / "ad")]
  base, merged = ppl(), ppl(*with_adapter)
  assert abs(merged - base) > 0.05 * base  # the adapter matters
  for mode in ("separate", "dequantized"):
    assert_allclose(ppl("--quantize", "native", *with_adapter, "--adapter-merge", mode), merged, "parity_perplexity")
  requantized = ppl("--quantize", "native", *with_adapter, "--adapter-merge", "requantized")
  assert abs(requantized - merged) > 1e-3 * merged, "requantizing rounds part of the adapter away"
  code, _, err = run(capsys, "perplexity", "--model", "smollm2-135m", "--text-file", str(text),
                     "--adapter-merge", "requantized", *with_adapter)
  _one_line_error(code, err, "--adapter-merge requantized", "--quantize")
  ia3 = IA3Config()  # the same for an IA3 adapter: apart from the 4-bit base, it is the merged float model
  vectors, _ = ia3.init_adapter(smollm2.config, smollm2.params)
  vectors = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(2), v.shape, v.dtype), vectors)
  save_adapter(tmp_path / "ia3", ia3, smollm2.config, vectors)
  ia3_merged = ppl("--adapter", str(tmp_path / "ia3"))
  assert abs(ia3_merged - base) > 0.05 * base
  assert_allclose(ppl("--quantize", "native", "--adapter", str(tmp_path / "ia3")), ia3_merged, "parity_perplexity")
  prompt = PromptTuningConfig(num_virtual_tokens=4)  # virtual tokens: nothing to merge, so no merge mode to ask
  save_adapter(tmp_path / "pt", prompt, smollm2.config, prompt.init_adapter(smollm2.config, smollm2.params,
                                                                            key=jax.random.key(3))[0])
  code, _, err = run(capsys, "perplexity", "--model", "smollm2-135m", "--text-file", str(text), "--quantize",
                     "int4", "--adapter", str(tmp_path / "pt"), "--adapter-merge", "requantized")
  _one_line_error(code, err, "pt", "no weights to merge")

  data = tmp_path / "d.jsonl"
  data.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
  evals = []
  native = ["--quantize", "native", "--adapter-merge"]
  for extra in ([], [*native, "separate"], [*native, "dequantized"], [*native, "requantized"]):
    code, out, err = run(capsys, "eval", "--model", "smollm2-135m", "--data", str(data), *with_adapter,
                         "--max-new-tokens", "4", "-q", *extra)
    assert code == 0, err
    evals.append(json.loads(out))
  for e in evals[1:3]:  # the loss of the model --adapter-merge describes (requantized: once the separate one's)
    assert_allclose(e["loss"], evals[0]["loss"], "f32_composite")
  assert abs(evals[3]["loss"] - evals[0]["loss"]) > 1e-3 * evals[0]["loss"]
  assert all(e["exact_match_n"] == 1 for e in evals)


@pytest.mark.parametrize("name,content,want", [
    ("config.json", b"\xff\xfe{}", "config.json: not UTF-8 text"),
    ("config.json", b"[1]", "config.json: expected a JSON object, got list"),
    ("generation_config.json", b"[2]", "generation_config.json: expected a JSON object"),
    ("tokenizer_config.json", b"[3]", "tokenizer_config.json: expected a JSON object"),
    ("model.safetensors.index.json", b"[1]", "model.safetensors.index.json: expected a JSON object"),
    ("model.safetensors.index.json", b"{}", "index.json: not a valid safetensors index"),
    ("chat_template.jinja", b"\x80abc", "chat_template.jinja: not UTF-8 text")])
def test_a_damaged_model_file_is_one_error_line(capsys, tmp_path, name, content, want):
  """Files that are not UTF-8, or JSON that is not an object, gave tracebacks (exit code 1)."""
  folder = make_tiny_folder(tmp_path / "m")
  (folder / name).write_bytes(content)
  code, _, err = run(capsys, "info", "--model", str(folder))
  _one_line_error(code, err, want)


def test_damaged_run_config_data_and_adapter_files_are_one_error_line(capsys, tiny_folder, tmp_path):
  binary = tmp_path / "bin.yaml"
  binary.write_bytes(b"\xff\xfe\x00 binary")
  code, _, err = run(capsys, "train", str(binary))
  _one_line_error(code, err, "bin.yaml: not UTF-8 text")
  data = tmp_path / "d.jsonl"
  data.write_bytes(b'{"text": "ok"}\n\xff\n')
  code, _, err = run(capsys, "eval", "--model", str(tiny_folder), "--data", str(data))
  _one_line_error(code, err, "d.jsonl: not UTF-8 text")
  adapter = tmp_path / "ad"
  adapter.mkdir()
  (adapter / "adapter_config.json").write_bytes(b"\xff")
  code, _, err = run(capsys, "generate", "--model", str(tiny_folder), "--prompt", "w3", "--adapter", str(adapter))
  _one_line_error(code, err, "adapter_config.json: not UTF-8 text")


def test_merge_does_not_replace_what_it_was_not_asked_to(capsys, tiny_folder, tmp_path):
  """merge --out on a non-empty folder (it was silently replaced, with whatever else it held) or on a file is
  refused; --overwrite replaces a folder; the output has the permissions the umask gives (mkdtemp's 0700 and
  safetensors' 0600 kept other users from loading it)."""
  import os
  import stat

  import jax
  from lora_jax.peft import LoraConfig, save_adapter
  from lora_jax import load_model
  model = load_model(str(tiny_folder))
  cfg = LoraConfig(rank=2, targets=("q_proj",))
  save_adapter(tmp_path / "ad", cfg, model.config, cfg.init_adapter(model.config, model.params,
                                                                    key=jax.random.key(0))[0])
  out = tmp_path / "my project"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  merge = ["merge", "--model", str(tiny_folder), "--adapter", str(tmp_path / "ad"), "--out"]
  code, _, err = run(capsys, *merge, str(out))
  _one_line_error(code, err, "my project: exists and is not empty; pass --overwrite")
  assert (out / "notes.txt").read_text() == "keep me"
  (tmp_path / "afile").write_text("x")
  code, _, err = run(capsys, *merge, str(tmp_path / "afile"))
  _one_line_error(code, err, "afile: exists and is not a folder")
  code, _, _ = run(capsys, *merge, str(out), "--overwrite", "-q")
  assert code == 0 and not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
  assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
  code, _, err = run(capsys, "perplexity", "--model", str(tiny_folder), "--text-file", str(tmp_path / "afile"),
                     "--max-length", "0")
  _one_line_error(code, err, "--max-length must be >= 2, got 0")  # 0 once meant the default
