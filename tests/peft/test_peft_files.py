"""Adapter files round-trip with Hugging Face PEFT: same logits both ways (fp32, <= 2e-4), clear errors otherwise."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import LoraJaxError
from lora_jax.models import forward
from lora_jax.peft import LoraConfig, apply_lora, init_lora, load_adapter, save_adapter
from lora_jax.testing import TOLS, max_abs_diff

torch = pytest.importorskip("torch", reason="needs the [parity] extra")
transformers = pytest.importorskip("transformers", reason="needs the [parity] extra")
peft = pytest.importorskip("peft", reason="needs the [parity] extra")
pytestmark = pytest.mark.parity

VARIANTS = {
    "lora": dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")),
    "rslora": dict(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "o_proj", "up_proj"), use_rslora=True),
    "dora": dict(rank=4, alpha=8.0, targets=("q_proj", "gate_proj", "down_proj"), use_dora=True),
    "layers": dict(rank=2, alpha=4.0, targets=("k_proj", "up_proj"), layers_to_transform=(1,)),
}
IDS = np.array([[5, 9, 17, 33, 2, 8, 11, 60, 42, 7]])


@pytest.fixture(scope="module")
def base(hf_tiny_llama):
  return hf_tiny_llama


def _ours_logits(model, cfg, adapter, params=None):
  return np.asarray(forward(apply_lora(cfg, model.config, params or model.params, adapter), model.config,
                            IDS.astype(np.int32)))


def _peft_logits(pm):
  with torch.no_grad():
    return pm(torch.tensor(IDS)).logits.numpy()


def _assert_parity(a, b):
  d = max_abs_diff(a, b)
  assert d <= TOLS["parity_logits_f32"].atol, d


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_written_adapter_loads_in_lora_jax(base, variant, tmp_path):
  hf, ours = base
  v = VARIANTS[variant]
  pcfg = peft.LoraConfig(r=v["rank"], lora_alpha=v["alpha"], target_modules=list(v["targets"]),
                         use_rslora=v.get("use_rslora", False), use_dora=v.get("use_dora", False),
                         layers_to_transform=list(v["layers_to_transform"]) if "layers_to_transform" in v else None)
  pm = peft.get_peft_model(copy.deepcopy(hf), pcfg).eval()
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.add_(0.2 * torch.randn_like(p))
  pm.save_pretrained(tmp_path)
  cfg, adapter = load_adapter(tmp_path, ours.config)
  assert (cfg.rank, cfg.alpha, cfg.use_rslora, cfg.use_dora) == (v["rank"], v["alpha"], v.get("use_rslora", False),
                                                                 v.get("use_dora", False))
  _assert_parity(_ours_logits(ours, cfg, adapter), _peft_logits(pm))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_jax_written_adapter_loads_in_peft(base, variant, tmp_path):
  hf, ours = base
  cfg = LoraConfig(**VARIANTS[variant])
  adapter, _ = init_lora(cfg, ours.config, ours.params, key=jax.random.key(3))
  adapter = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(4), x.shape), adapter)
  save_adapter(tmp_path / "a", cfg, ours.config, adapter)
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "a").eval()
  _assert_parity(_ours_logits(ours, cfg, adapter), _peft_logits(pm))
  cfg2, adapter2 = load_adapter(tmp_path / "a", ours.config)  # and back
  _assert_parity(_ours_logits(ours, cfg2, adapter2), _peft_logits(pm))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_svd_init_adapters_are_saved_for_the_original_base(base, init, tmp_path):
  hf, ours = base
  cfg = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"), init=init)
  initial, residual = init_lora(cfg, ours.config, ours.params, key=jax.random.key(0))
  trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape), initial)
  save_adapter(tmp_path / "a", cfg, ours.config, trained, initial_adapter=initial)
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "a").eval()
  _assert_parity(_ours_logits(ours, cfg, trained, residual), _peft_logits(pm))


def test_real_smollm2_adapter_both_ways(smollm2, hf_smollm2, tmp_path):
  hf, _ = hf_smollm2
  cfg = LoraConfig(rank=8, alpha=16.0, targets=("all-linear",), use_dora=True)
  adapter, _ = init_lora(cfg, smollm2.config, smollm2.params, key=jax.random.key(0))
  adapter = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), adapter)
  save_adapter(tmp_path / "a", cfg, smollm2.config, adapter)
  pm = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
  try:
    ids = smollm2.tokenizer.encode("LoRA adapters are small.")
    with torch.no_grad():
      ref = pm(torch.tensor([ids])).logits.numpy()
    got = forward(apply_lora(cfg, smollm2.config, smollm2.params, adapter), smollm2.config, np.asarray([ids]))
    _assert_parity(np.asarray(got), ref)
    assert max_abs_diff(ref, np.asarray(forward(smollm2.params, smollm2.config, np.asarray([ids])))) > 1e-2
  finally:
    pm.unload()  # restore the shared transformers model


# ------------------------------------------------------------------ bad input
def _write(tmp_path, config, tensors=None):
  from safetensors.numpy import save_file
  tmp_path.mkdir(parents=True, exist_ok=True)
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  if tensors is not None:
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
  return tmp_path


def test_bad_adapters_are_refused_with_names(base, tmp_path):
  _, ours = base
  good = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
  a = np.zeros((2, 32), np.float32)
  b = np.zeros((32, 2), np.float32)
  key = "base_model.model.model.layers.0.self_attn.q_proj"
  with pytest.raises(LoraJaxError, match="peft_type 'ADALORA' is not supported .supported: LORA, IA3, PROMPT_TUNING"):
    load_adapter(_write(tmp_path / "1", {**good, "peft_type": "ADALORA"}), ours.config)
  with pytest.raises(LoraJaxError, match="rank_pattern"):
    load_adapter(_write(tmp_path / "2", {**good, "rank_pattern": {"q_proj": 4}}), ours.config)
  bins = _write(tmp_path / "3", good)
  (bins / "adapter_model.bin").write_bytes(b"pickle")
  with pytest.raises(LoraJaxError, match="only safetensors adapters are loaded"):
    load_adapter(bins, ours.config)
  other = {f"{key}.lora_A.weight": np.zeros((2, 48), np.float32), f"{key}.lora_B.weight": b}
  with pytest.raises(LoraJaxError, match=r"q_proj.lora_A.weight' has shape \(2, 48\) but the base model needs \(2, 32\)"):
    load_adapter(_write(tmp_path / "4", good, other), ours.config)
  with pytest.raises(LoraJaxError, match="for layer 7, but the base model has 2 layers"):
    load_adapter(_write(tmp_path / "5", good, {key.replace("layers.0", "layers.7") + ".lora_A.weight": a}), ours.config)
  with pytest.raises(LoraJaxError, match="adapter folder not found"):
    load_adapter(tmp_path / "missing", ours.config)
  with pytest.raises(LoraJaxError, match="init_lora_weights='pissa'"):
    load_adapter(_write(tmp_path / "6", {**good, "init_lora_weights": "pissa"},
                        {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}), ours.config)
  pair = {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
  for field, value, want in (("lora_alpha", "sixteen", "lora_alpha must be a number, got 'sixteen'"),
                             ("use_rslora", "false", "use_rslora must be true or false, got 'false'"),  # not True
                             ("r", 2.5, "r must be an integer, got 2.5"), ("use_dora", 1, "use_dora must be true")):
    with pytest.raises(LoraJaxError, match=rf"adapter_config.json: {want}"):
      load_adapter(_write(tmp_path / f"8{field}", {**good, field: value}, pair), ours.config)
  with pytest.raises(LoraJaxError, match=r"adapter_config.json: r=4, but tensor .*q_proj.lora_A.weight' has rank 2"):
    load_adapter(_write(tmp_path / "9", {**good, "r": 4}, pair), ours.config)
  listed = _write(tmp_path / "10", good, pair)
  (listed / "adapter_config.json").write_text("[1, 2]")
  with pytest.raises(LoraJaxError, match="adapter_config.json: expected a JSON object, got list"):
    load_adapter(listed, ours.config)
  cfg = LoraConfig(rank=2, targets=("q_proj",), init="pissa")
  with pytest.raises(LoraJaxError, match="initial_adapter"):
    save_adapter(tmp_path / "7", cfg, ours.config, {"layers/attn/q_proj": {"lora_A": jnp.zeros((2, 32, 2)),
                                                                            "lora_B": jnp.zeros((2, 2, 32))}})
  assert not (tmp_path / "7").exists()


# ------------------------------------------------------------------ CLI
def test_cli_merge_writes_a_folder_transformers_loads(base, tmp_path, capsys):
  from lora_jax.cli import main
  hf, ours = base
  cfg = LoraConfig(**VARIANTS["dora"])
  adapter, _ = init_lora(cfg, ours.config, ours.params, key=jax.random.key(3))
  adapter = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(4), x.shape), adapter)
  save_adapter(tmp_path / "a", cfg, ours.config, adapter)
  assert main(["merge", "--model", ours.source, "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m"),
               "-q"]) == 0
  assert capsys.readouterr().out.strip() == str(tmp_path / "m")
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "a").eval()
  with torch.no_grad():
    _assert_parity(merged(torch.tensor(IDS)).logits.numpy(), _peft_logits(pm))


def test_cli_perplexity_and_generate_take_an_adapter(base, tmp_path, capsys):
  from lora_jax.cli import main
  _, ours = base
  cfg = LoraConfig(**VARIANTS["lora"])
  adapter, _ = init_lora(cfg, ours.config, ours.params, key=jax.random.key(3))
  adapter = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(4), x.shape), adapter)
  save_adapter(tmp_path / "a", cfg, ours.config, adapter)
  text = tmp_path / "t.txt"
  text.write_text(" ".join(f"t{i % 50}" for i in range(40)))
  runs = {}
  for name, extra in (("base", []), ("adapter", ["--adapter", str(tmp_path / "a")])):
    assert main(["perplexity", "--model", ours.source, "--text-file", str(text), "-q", *extra]) == 0
    runs[name] = json.loads(capsys.readouterr().out)
  assert runs["base"]["tokens"] == runs["adapter"]["tokens"] and runs["base"]["nll"] != runs["adapter"]["nll"]
  assert main(["generate", "--model", ours.source, "--prompt", "t1 t2", "--max-new-tokens", "4", "-q",
               "--adapter", str(tmp_path / "a")]) == 0
  assert main(["generate", "--model", ours.source, "--prompt", "t1", "--adapter", str(tmp_path / "nope")]) == 2
  assert "adapter folder not found" in capsys.readouterr().err
