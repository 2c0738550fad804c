"""Tiny random Llama, Mistral and Qwen2 models written by transformers load into lora_jax with the same logits."""

import numpy as np
import pytest

from lora_jax import load_model
from lora_jax.models import forward
from lora_jax.testing import assert_allclose

torch = pytest.importorskip("torch", reason="needs the [parity] extra")
transformers = pytest.importorskip("transformers", reason="needs the [parity] extra")

pytestmark = pytest.mark.parity

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def _make(kind):
  if kind == "llama":
    return transformers.LlamaConfig(**COMMON, rope_theta=10000.0)
  if kind == "llama3_rope":
    return transformers.LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
  if kind == "llama_tied":
    return transformers.LlamaConfig(**COMMON, tie_word_embeddings=True)
  if kind == "mistral":
    return transformers.MistralConfig(**COMMON, sliding_window=5, head_dim=24)
  if kind == "qwen2":
    return transformers.Qwen2Config(**COMMON, tie_word_embeddings=False)
  raise ValueError(kind)


@pytest.fixture(scope="module", params=["llama", "llama3_rope", "llama_tied", "mistral", "qwen2"])
def tiny(request, tmp_path_factory):
  torch.manual_seed(0)
  cfg = _make(request.param)
  cfg._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():  # random non-trivial norm scales and biases, so they are exercised
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1 + 0.1 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(folder)
  _write_tokenizer(folder)
  return request.param, model, folder


def _write_tokenizer(folder):
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {f"t{i}": i for i in range(128)}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(folder / "tokenizer.json"))


def test_tiny_model_logits_match_transformers(tiny):
  kind, hf, folder = tiny
  ours = load_model(str(folder))
  assert ours.config.architecture == hf.config.model_type
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 128, (2, 12))
  mask = np.ones_like(ids)
  mask[1, :4] = 0  # left padding in row 1
  with torch.no_grad():
    pos = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos).logits.numpy()
  got = np.asarray(forward(ours.params, ours.config, ids.astype(np.int32), valid=mask.astype(bool)))
  valid = mask.astype(bool)
  assert_allclose(got[valid], ref[valid], "f32_composite", err_msg=kind)


def test_save_hf_folder_round_trips(tiny, tmp_path):
  from lora_jax.io import save_hf_folder
  kind, hf, folder = tiny
  ours = load_model(str(folder))
  save_hf_folder(tmp_path / "out", ours.params, ours.config, ours.tokenizer)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
  ids = torch.arange(1, 11)[None]
  with torch.no_grad():
    assert_allclose(back(ids).logits.numpy(), hf(ids).logits.numpy(), "f32_composite", err_msg=kind)


def test_ia3_scales_a_biased_projection_as_peft(tiny, tmp_path):
  """IA3's output scaling is ``(xW + b) ⊙ l``: on Qwen2's biased k/v projections the bias is scaled too (it once
  was added after the scaling, 0.12 off PEFT's logits), applied and merged; without biases nothing changes."""
  import copy

  import jax
  peft = pytest.importorskip("peft", reason="needs the [parity] extra")
  from lora_jax.peft import IA3Config, save_adapter
  kind, hf, folder = tiny
  ours = load_model(str(folder))
  cfg = IA3Config()  # k_proj, v_proj (output side) and down_proj (input side)
  adapter, frozen = cfg.init_adapter(ours.config, ours.params)
  adapter = {p: {"ia3": e["ia3"] + 0.5 * jax.random.normal(jax.random.key(i), e["ia3"].shape)}
             for i, (p, e) in enumerate(sorted(adapter.items()))}
  save_adapter(tmp_path / "ia3", cfg, ours.config, adapter)
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ia3").eval()
  ids = np.arange(1, 13)[None]
  with torch.no_grad():
    ref = pm(torch.tensor(ids)).logits.numpy()
  for params in (cfg.apply(ours.config, frozen, adapter), cfg.merge(ours.config, frozen, adapter)):
    assert_allclose(forward(params, ours.config, ids.astype(np.int32)), ref, "f32_composite", err_msg=kind)


QWEN2 = {**COMMON, "model_type": "qwen2", "sliding_window": 8, "use_sliding_window": True}


@pytest.mark.parametrize("extra,window", [({"max_window_layers": 0}, 8), ({"max_window_layers": 3}, None),
                                          ({"layer_types": ["sliding_attention"] * 3}, 8),
                                          ({"layer_types": ["full_attention"] * 3}, None),
                                          ({"use_sliding_window": False}, None)])
def test_which_layers_slide(extra, window):
  """Qwen2 slides only from layer max_window_layers on (or as layer_types says): a window on every layer or
  none loads, a window on some layers only is refused (it was applied to every layer, 0.03 off transformers)."""
  from lora_jax.models import ModelConfig
  cfg = ModelConfig.from_hf_dict({**QWEN2, **extra})
  assert cfg.sliding_window == window
  back = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "model_type"})
  assert set(back.layer_types) == {"sliding_attention" if window else "full_attention"}  # as saved, so loaded


@pytest.mark.parametrize("raw,msg", [({**QWEN2, "max_window_layers": 1}, "sliding window on some layers only"),
                                     ({**COMMON, "model_type": "llama", "attention_bias": True},
                                      "attention_bias=true .llama: biases on q/k/v and o_proj. is not supported"),
                                     ({**COMMON, "model_type": "llama", "mlp_bias": True}, "mlp_bias=true")])
def test_configs_lora_jax_would_run_wrongly_are_refused(raw, msg):
  from lora_jax import LoraJaxError
  from lora_jax.models import ModelConfig
  with pytest.raises(LoraJaxError, match=msg):
    ModelConfig.from_hf_dict(raw, source="m/config.json")
