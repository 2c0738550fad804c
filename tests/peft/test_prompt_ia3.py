"""IA3, prompt tuning, P-tuning and prefix tuning: math, generation with the cache, PEFT files both ways."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import LoraJaxError
from lora_jax.generate import generate_ids
from lora_jax.models import forward
from lora_jax.peft import (IA3Config, PrefixTuningConfig, PromptTuningConfig, PTuningConfig, load_adapter,
                           save_adapter)
from lora_jax.testing import TOLS, assert_allclose, max_abs_diff

torch = pytest.importorskip("torch", reason="needs the [parity] extra")
transformers = pytest.importorskip("transformers", reason="needs the [parity] extra")
peft = pytest.importorskip("peft", reason="needs the [parity] extra")
pytestmark = pytest.mark.parity
IDS = np.array([[5, 9, 17, 33, 2, 8, 11, 60, 42, 7]])


@pytest.fixture(scope="module")
def base(hf_tiny_llama):
  return hf_tiny_llama


def _ours(model, cfg, adapter, ids=IDS):
  params = cfg.apply(model.config, model.params, adapter)
  return np.asarray(forward(params, model.config, ids.astype(np.int32),
                            virtual_tokens=cfg.virtual_tokens(model.config, adapter),
                            kv_prefix=cfg.kv_prefix(model.config, adapter)))


def _theirs(pm, ids=IDS):
  with torch.no_grad():
    return pm(torch.tensor(ids)).logits.numpy()


def _parity(a, b):
  assert max_abs_diff(a, b) <= TOLS["parity_logits_f32"].atol, max_abs_diff(a, b)


CONFIGS = {
    "ia3": (IA3Config(), lambda: peft.IA3Config(task_type="CAUSAL_LM")),
    "ia3_all": (IA3Config(targets=("q_proj", "o_proj", "up_proj", "down_proj"), feedforward=("up_proj", "down_proj")),
                lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                                       feedforward_modules=["up_proj", "down_proj"])),
    "prompt": (PromptTuningConfig(num_virtual_tokens=4),
               lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "ptuning": (PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16),
                lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16)),
    "prefix": (PrefixTuningConfig(num_virtual_tokens=4),
               lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "prefix_proj": (PrefixTuningConfig(num_virtual_tokens=4, projection=True, encoder_hidden_size=16),
                    lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                    prefix_projection=True, encoder_hidden_size=16)),
}


def _peft_logits_for_prompt_methods(pm, n_virtual):
  # PEFT returns logits for the virtual positions too (prompt tuning / P-tuning): drop them
  out = _theirs(pm)
  return out[:, n_virtual:] if out.shape[1] > IDS.shape[1] else out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_written_adapter_loads(base, name, tmp_path):
  hf, ours = base
  _, make = CONFIGS[name]
  pm = peft.get_peft_model(copy.deepcopy(hf), make()).eval()
  torch.manual_seed(1)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if p.requires_grad:
        p.add_(0.3 * torch.randn_like(p))
  pm.save_pretrained(tmp_path)
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()  # inference mode, as a user loads it
  cfg, adapter = load_adapter(tmp_path, ours.config)
  _parity(_ours(ours, cfg, adapter), _peft_logits_for_prompt_methods(pm, getattr(cfg, "num_virtual_tokens", 0)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lora_jax_written_adapter_loads_in_peft(base, name, tmp_path):
  hf, ours = base
  cfg, _ = CONFIGS[name]
  adapter, _ = cfg.init_adapter(ours.config, ours.params, key=jax.random.key(0))
  adapter = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), adapter)
  save_adapter(tmp_path / "a", cfg, ours.config, adapter)
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "a").eval()
  _parity(_ours(ours, cfg, adapter), _peft_logits_for_prompt_methods(pm, getattr(cfg, "num_virtual_tokens", 0)))


def test_ia3_merges_exactly_and_starts_as_the_base(base):
  _, ours = base
  cfg = IA3Config()
  adapter, _ = cfg.init_adapter(ours.config, ours.params)
  assert_allclose(_ours(ours, cfg, adapter), forward(ours.params, ours.config, IDS.astype(np.int32)), "f32_op")
  adapter = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), adapter)
  merged = forward(cfg.merge(ours.config, ours.params, adapter), ours.config, IDS.astype(np.int32))
  assert_allclose(merged, _ours(ours, cfg, adapter), "f32_composite")


@pytest.mark.parametrize("name", ["prompt", "prefix_proj"])
def test_generation_with_virtual_tokens_uses_the_cache_correctly(base, name):
  """Greedy generation with the cache equals argmax of repeated full forwards."""
  _, ours = base
  cfg, _ = CONFIGS[name]
  adapter, _ = cfg.init_adapter(ours.config, ours.params, key=jax.random.key(0))
  vt, kv = cfg.virtual_tokens(ours.config, adapter), cfg.kv_prefix(ours.config, adapter)
  (got, _), = generate_ids(ours.params, ours.config, [[5, 9, 17]], max_new_tokens=6, virtual_tokens=vt, kv_prefix=kv)
  ids = [5, 9, 17]
  for _ in range(6):
    logits = forward(ours.params, ours.config, np.asarray([ids], np.int32), virtual_tokens=vt, kv_prefix=kv)
    ids.append(int(jnp.argmax(logits[0, -1])))
  assert got == ids[3:]


def test_prompt_methods_refuse_other_bases_and_overlong_prompts(base, tmp_path):
  _, ours = base
  cfg = PromptTuningConfig(num_virtual_tokens=60)
  adapter, _ = cfg.init_adapter(ours.config, ours.params, key=jax.random.key(0))
  with pytest.raises(LoraJaxError, match="exceeds the model context of 4 tokens .60 of its 64 go to virtual"):
    generate_ids(ours.params, ours.config, [[1, 2, 3]], max_new_tokens=2, virtual_tokens=adapter["prompt"])
  save_adapter(tmp_path / "p", PromptTuningConfig(num_virtual_tokens=3), ours.config,
               {"prompt": jnp.zeros((3, 48))})
  with pytest.raises(LoraJaxError, match=r"\(3, 48\) but this base needs \(3, 32\) \(hidden size 32\)"):
    load_adapter(tmp_path / "p", ours.config)
  save_adapter(tmp_path / "x", PrefixTuningConfig(num_virtual_tokens=2), ours.config, {"prefix": jnp.zeros((2, 99))})
  with pytest.raises(LoraJaxError, match=r"layers 2 × 2 × kv 16"):
    load_adapter(tmp_path / "x", ours.config)
