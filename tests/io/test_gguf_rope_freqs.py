"""A Llama 3.1+-style GGUF: llama.cpp stores the llama3 rope scaling only as the tensor ``rope_freqs.weight`` (per-
frequency divisors, no ``rope.scaling.type`` key). Loaded, it gives the logits of the transformers model it was
converted from (plain RoPE, as once read, is 0.5 off)."""

import math

import numpy as np
import pytest

from lora_jax import LoraJaxError, load_model
from lora_jax.models import forward
from lora_jax.testing import assert_allclose

torch = pytest.importorskip("torch", reason="needs the [parity] extra")
transformers = pytest.importorskip("transformers", reason="needs the [parity] extra")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.parity

H, HKV, HD, THETA, OLD_CTX, FACTOR, LOW, HIGH = 4, 2, 16, 10000.0, 16, 8.0, 1.0, 4.0
GGUF_NAMES = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
              "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
              "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
              "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}


def _llama3_divisors():
  """What llama.cpp's converter writes as rope_freqs for these llama3 parameters."""
  out = []
  for f in 1.0 / THETA ** (np.arange(0, HD, 2) / HD):
    wavelen = 2 * math.pi / f
    if wavelen < OLD_CTX / HIGH:
      out.append(1.0)
    elif wavelen > OLD_CTX / LOW:
      out.append(FACTOR)
    else:
      s = (OLD_CTX / wavelen - LOW) / (HIGH - LOW)
      out.append(1 / ((1 - s) / FACTOR + s))
  return np.asarray(out, np.float32)


def _permute(w, n_head):  # llama.cpp's q/k row order
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory):
  cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=H, num_key_value_heads=HKV, max_position_embeddings=256,
                                 rope_theta=THETA, rms_norm_eps=1e-6,
                                 rope_scaling={"rope_type": "llama3", "factor": FACTOR, "low_freq_factor": LOW,
                                               "high_freq_factor": HIGH, "original_max_position_embeddings": OLD_CTX})
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # sharper attention, so that the rotary angles matter
    for layer in hf.model.layers:
      layer.self_attn.q_proj.weight.mul_(10)
      layer.self_attn.k_proj.weight.mul_(10)
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  path = tmp_path_factory.mktemp("gguf") / "tiny-llama3.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(2); w.add_context_length(256); w.add_embedding_length(64); w.add_feed_forward_length(96)
  w.add_head_count(H); w.add_head_count_kv(HKV); w.add_rope_freq_base(THETA); w.add_layer_norm_rms_eps(1e-6)
  w.add_rope_dimension_count(HD); w.add_vocab_size(128)
  w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("default")
  w.add_token_list([chr(0x100 + i) for i in range(127)] + ["\u0100\u0101"])
  w.add_token_types([1] * 128); w.add_token_merges(["\u0100 \u0101"]); w.add_eos_token_id(2)
  w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
  w.add_tensor("output_norm.weight", sd["model.norm.weight"])
  w.add_tensor("output.weight", sd["lm_head.weight"])
  w.add_tensor("rope_freqs.weight", _llama3_divisors())
  for i in range(2):
    for hf_name, name in GGUF_NAMES.items():
      t = sd[f"model.layers.{i}.{hf_name}"]
      t = _permute(t, H) if name == "attn_q" else _permute(t, HKV) if name == "attn_k" else t
      w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(t))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  return hf, path


def test_rope_freqs_give_the_llama3_model(llama3_gguf, tmp_path):
  from lora_jax.io import save_hf_folder
  hf, path = llama3_gguf
  model = load_model(str(path))
  assert model.config.rope_freq_factors and model.info()["rope_freq_factors"]
  ids = np.random.default_rng(0).integers(0, 128, (1, 200))  # past the original 16-token context
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  assert_allclose(forward(model.params, model.config, ids.astype(np.int32)), ref, "f32_composite")
  with pytest.raises(LoraJaxError, match="rope_freqs.weight.*HF folder instead"):  # no config.json can state it
    save_hf_folder(tmp_path / "out", model.params, model.config, model.tokenizer)
  assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_gguf_is_parsed_once_per_file_version(llama3_gguf, tmp_path):
  """`load_gguf` parses a file's metadata once per process and file version (path, size, mtime): a second load
  reuses the parse, each caller gets its own fields, and a rewritten or damaged file is read again (errors are
  never cached)."""
  import os
  import shutil

  from lora_jax.io import _gguf, load_gguf
  path = tmp_path / "m.gguf"
  shutil.copy(llama3_gguf[1], path)
  first = load_gguf(path)
  hits = _gguf._read.cache_info().hits
  first.fields["general.architecture"] = "changed by a caller"
  again = load_gguf(path)
  assert _gguf._read.cache_info().hits == hits + 1 and again.fields["general.architecture"] == "llama"
  np.testing.assert_array_equal(again.params["layers"]["attn"]["q_proj"]["kernel"],
                                first.params["layers"]["attn"]["q_proj"]["kernel"])
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # damaged in place: another size, so read again and refused
  with pytest.raises(LoraJaxError, match="corrupt or truncated"):
    load_gguf(path)
  path.write_bytes(data)
  os.utime(path, ns=(1, 1))  # the same bytes, another version: parsed again, same model
  misses = _gguf._read.cache_info().misses
  np.testing.assert_array_equal(load_gguf(path).params["embed"]["embedding"], first.params["embed"]["embedding"])
  assert _gguf._read.cache_info().misses == misses + 1
