"""QLoRA as composition: LoRA over a quantized base; merging three ways with measured drift; training parity."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models import ModelConfig, forward, init_params
from lora_jax.peft import LoraConfig, LoRAWeight, apply_lora, init_lora
from lora_jax.quant import QTensor, drift, merge_quantized, quantize_params
from lora_jax.quant._merge import kl_divergence
from lora_jax.testing import assert_allclose, assert_trees_all_equal

CFG = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)
PARAMS = init_params(CFG, key=jax.random.key(0), std=0.1)
TOKENS = np.arange(1, 17, dtype=np.int32).reshape(2, 8)
LCFG = LoraConfig(rank=4, alpha=8, targets=("all-linear",))


def _deq(tree):
  return jax.tree.map(lambda x: x.dequantize() if isinstance(x, QTensor) else x, tree,
                      is_leaf=lambda x: isinstance(x, QTensor))


@pytest.mark.parametrize("fmt", ["nf4", "int4_sym"])
def test_qlora_is_lora_over_the_dequantized_base(fmt):
  q = quantize_params(PARAMS, fmt)
  adapter, frozen = init_lora(LCFG, CFG, q, key=jax.random.key(1))
  assert isinstance(frozen["layers"]["attn"]["q_proj"]["kernel"], QTensor)
  f = jax.jit(forward, static_argnums=1)
  # B = 0: the base output up to float32 rounding (XLA fuses the two programs differently)
  assert_allclose(f(apply_lora(LCFG, CFG, frozen, adapter), CFG, TOKENS), f(frozen, CFG, TOKENS), "f32_op")
  adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapter)
  qlora = f(apply_lora(LCFG, CFG, frozen, adapter), CFG, TOKENS)
  dense = f(apply_lora(LCFG, CFG, _deq(frozen), adapter), CFG, TOKENS)
  assert_allclose(qlora, dense, "f32_composite")


def test_qlora_gradients_flow_to_the_adapter_only():
  q = quantize_params(PARAMS, "nf4")
  adapter, frozen = init_lora(LCFG, CFG, q, key=jax.random.key(1))
  adapter = jax.tree.map(lambda x: x + 0.05, adapter)
  loss = lambda a, fz: jnp.mean(forward(apply_lora(LCFG, CFG, fz, a), CFG, TOKENS) ** 2)
  dense = lambda a: jnp.mean(forward(apply_lora(LCFG, CFG, _deq(frozen), a), CFG, TOKENS) ** 2)
  from lora_jax.testing import assert_trees_all_close
  assert_trees_all_close(jax.grad(loss)(adapter, frozen), jax.grad(dense)(adapter), "f32_composite")


def test_merge_three_ways_reports_drift():
  q = quantize_params(PARAMS, "nf4")
  adapter, frozen = init_lora(LCFG, CFG, q, key=jax.random.key(1))
  adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapter)
  ref = merge_quantized(LCFG, CFG, frozen, adapter, "separate")
  assert isinstance(ref["layers"]["mlp"]["up_proj"]["kernel"], LoRAWeight)
  deq = merge_quantized(LCFG, CFG, frozen, adapter, "dequantized")
  req = merge_quantized(LCFG, CFG, frozen, adapter, "requantized")
  assert isinstance(req["layers"]["mlp"]["up_proj"]["kernel"], QTensor)
  assert not isinstance(deq["layers"]["mlp"]["up_proj"]["kernel"], QTensor)
  d_deq, d_req = drift(CFG, ref, deq, TOKENS), drift(CFG, ref, req, TOKENS)
  assert d_deq["max_abs_logit"] <= 1e-4 and d_deq["mean_kl"] <= 1e-8
  assert d_req["max_abs_logit"] > 10 * d_deq["max_abs_logit"] and d_req["mean_kl"] > 0  # requantizing costs


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 3.0])
def test_kl_divergence_is_accurate_for_close_and_far_logits(scale):
  """Against numpy in extended precision: the drift metric must resolve logits that differ at float32 rounding level (the
  textbook float32 form reports ~1e-8 there, for a true KL of ~1e-12) and stay right for far-apart ones."""
  if np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps:
    pytest.skip("numpy has no extended precision on this platform (the reference needs it)")
  a = 4.0 * jax.random.normal(jax.random.key(0), (3, 5, 1000))
  b = a + scale * jax.random.normal(jax.random.key(1), a.shape)
  # the textbook formula in x87 extended precision (float64's own rounding, ~1e-15 here, is above the tolerance)
  log_softmax = lambda z: z - z.max(-1, keepdims=True) - np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1,
                                                                     keepdims=True))
  la, lb = (log_softmax(np.asarray(z, np.longdouble)) for z in (a, b))
  want = np.sum(np.exp(la) * (la - lb), -1)
  assert_allclose(kl_divergence(a, b), want, "kl_f32")


@pytest.mark.usefixtures("standard_promotion")
def test_qlora_training_matches_lora(smollm2, tmp_path):
  """Same data, seed and steps on SmolLM2 with the base in 4 bits.

  QLoRA against fp32 LoRA on the same base values: ``native`` trains on the GGUF file's own Q4_1 blocks, i.e. on
  exactly the weights the float run uses, and ``nf4`` against a float run on its own dequantized NF4 weights:
  each within 2% (they agree to float rounding). Against the original weights, ``nf4`` *re*-quantizes weights
  that were already 4-bit, so its base is a slightly different model (first loss measured ≈10% higher): it must
  learn, and stay within the measured gap (≈12% on the mean of the last losses; bound 25%).
  """
  import dataclasses
  from lora_jax.quant import quantize_model_params
  from lora_jax.quant._merge import _dequantize_tree
  from lora_jax.config import config_from_dict
  from lora_jax.runner import train
  data = tmp_path / "d.jsonl"
  with open("data/ticket_routing/train.jsonl") as src:
    data.write_text("".join(src.readlines()[:64]))
  raw = {"model": "smollm2-135m", "seed": 0, "data": {"train": str(data), "max_eval_examples": 0},
         "peft": {"rank": 8, "alpha": 16},
         "train": {"steps": 10, "batch_size": 2, "seq_len": 128, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
                   "checkpoint_every": 100, "exact_match": False}}
  nf4_values = dataclasses.replace(smollm2, params=_dequantize_tree(quantize_model_params(smollm2.params, "nf4")))
  curves = {}
  for name, quant, model in (("none", "none", smollm2), ("native", "native", smollm2), ("nf4", "nf4", smollm2),
                             ("float_nf4_values", "none", nf4_values)):
    train(config_from_dict({**raw, "quantize": quant}), tmp_path / name, progress=False, model=model)
    curves[name] = np.array([json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").open()
                             if '"train"' in line])
  last = {q: float(np.mean(c[-4:])) for q, c in curves.items()}
  assert abs(last["native"] - last["none"]) <= 0.02 * last["none"], last
  assert abs(last["nf4"] - last["float_nf4_values"]) <= 0.02 * last["float_nf4_values"], last
  assert last["nf4"] < 0.5 * curves["nf4"][0], "QLoRA (nf4) must learn"
  assert last["nf4"] <= 1.25 * last["none"], last


@pytest.mark.parametrize("fmt", ["nf4", "int4_sym"])
def test_decoding_never_holds_the_dequantized_base(fmt):
  """A decode program over a 4-bit base dequantizes one weight at a time: XLA must neither hoist the
  dequantization out of the decode loop nor run every layer's ahead of time (both hold the whole base in float32;
  `kernels._after` prevents them). Checked on the compiled program's temporaries, per-layer layout."""
  from lora_jax.generate import SamplingConfig, decode_chunk
  from lora_jax.models import KVCache, unstack_layers
  cfg = dataclasses.replace(CFG, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=4, head_dim=32,
                            num_layers=4)
  q = unstack_layers(quantize_params(init_params(cfg, key=jax.random.key(0)), fmt))
  linear = [leaf for leaf in jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, QTensor)) if isinstance(leaf, QTensor)]
  dequantized = sum(4 * leaf.shape[0] * leaf.shape[1] for leaf in linear)
  largest = max(4 * leaf.shape[0] * leaf.shape[1] for leaf in linear)
  cache = KVCache.empty(cfg, 1, 64, jnp.float32, per_layer=True)
  compiled = decode_chunk.lower(q, cfg, cache, jnp.zeros((1, cfg.vocab_size)), jnp.zeros((1,), bool), jnp.int32(8),
                                jnp.int32(8), jax.random.key(0), steps=8, sampling=SamplingConfig(), eos=()).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 3 * largest < dequantized / 4, (temp, largest, dequantized)


@pytest.mark.parametrize("mode,dtype,kmajor", [("nf4", jnp.bfloat16, False), ("int4", jnp.float32, False),
                                               ("int4", jnp.bfloat16, True), ("nf4", jnp.bfloat16, True)])
def test_qlora_programs_lower_for_gpu(monkeypatch, mode, dtype, kmajor):
  """What a GPU would run, lowered for CUDA on CPU with the dispatch told it is on a GPU: a QLoRA train step (the
  base as `--quantize` makes it: NF4 double-quantized, or int4, each also in the K-major layout: `to_kmajor` on
  the stacked tree) and the prefill and decode programs. Every projection must go through the Pallas kernel as a
  Triton call (2 x 32 rows here: within PALLAS_M_MAX), none through the dequantize-and-dot fallback."""
  import optax
  import lora_jax.kernels as kernels
  from lora_jax.generate import SamplingConfig, decode_chunk, prefill
  from lora_jax.models._llama import KVCache
  from lora_jax.quant import quantize_model_params
  from lora_jax.train import TrainState, make_train_step
  monkeypatch.setattr(kernels, "_backend", lambda: "gpu")
  choices = []
  choose = kernels._choose
  monkeypatch.setattr(kernels, "_choose", lambda *a: choices.append(choose(*a)) or choices[-1])
  cfg = dataclasses.replace(CFG, hidden_size=128, intermediate_size=256, head_dim=32)
  params = jax.tree.map(lambda a: a.astype(dtype), init_params(cfg, key=jax.random.key(0)))
  frozen = quantize_model_params(params, mode)
  if kmajor:
    from lora_jax.kernels import KMajor, to_kmajor
    frozen = to_kmajor(frozen)
    assert any(isinstance(leaf, KMajor) for leaf in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, KMajor)))
  adapter, frozen = init_lora(LCFG, cfg, frozen, key=jax.random.key(1))
  tx = optax.adamw(1e-3)
  state = TrainState(jnp.int32(0), adapter, tx.init(adapter), jax.random.key_data(jax.random.key(0)))
  b, t = 2, 32
  batch = {"ids": jnp.zeros((b, t), jnp.int32), "segments": jnp.ones((b, t), jnp.int32),
           "positions": jnp.tile(jnp.arange(t), (b, 1)), "loss": jnp.ones((b, t), bool)}
  cuda = lambda jitted, *a, **k: jitted.trace(*a, **k).lower(lowering_platforms=("cuda",)).as_text()
  applied = apply_lora(LCFG, cfg, frozen, adapter)
  cache = KVCache.empty(cfg, b, 64, dtype)
  with jax.numpy_dtype_promotion("standard"):  # optax's AdamW on a bf16 adapter is not written for strict mode
    train_step = cuda(make_train_step(cfg, LCFG, tx), state, frozen, batch)
  programs = {
      "train_step": train_step,
      "prefill": cuda(prefill, applied, cfg, batch["ids"], batch["segments"] > 0, cache),
      "decode": cuda(decode_chunk, applied, cfg, cache, jnp.zeros((b, cfg.vocab_size)), jnp.zeros((b,), bool),
                     jnp.int32(t), jnp.int32(8), jax.random.key(0), steps=8, sampling=SamplingConfig(), eos=()),
  }
  # 7 projections per (scanned) layer body in each of the 3 programs (the decode loop's body traced once)
  assert len(choices) == 21 and set(choices) == {"pallas"}, choices
  for name, text in programs.items():
    calls = re.findall(r"custom_call @([\w$.]+)", text)
    assert calls and set(calls) == {"__gpu$xla.gpu.triton"}, (name, calls)  # identical kernels may be shared


def test_merge_and_remat_treat_a_kmajor_base_as_quantized():
  """A K-major int4 base (`to_kmajor`) merges like its QTensor: "dequantized" gives the same dense kernels (not its
  packed words), "requantized" the same codes, kept K-major; and training's "auto" remat sees a quantized base."""
  from lora_jax.kernels import KMajor, to_kmajor
  from lora_jax.train import resolve_remat
  q = quantize_params(PARAMS, "int4_sym")
  adapter, frozen = init_lora(LCFG, CFG, q, key=jax.random.key(1))
  adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapter)
  frozen_km = to_kmajor(frozen)
  assert resolve_remat("auto", frozen_km) == "full"
  for mode in ("dequantized", "requantized"):
    want = merge_quantized(LCFG, CFG, frozen, adapter, mode)
    got = merge_quantized(LCFG, CFG, frozen_km, adapter, mode)
    kernel = got["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kernel, KMajor) == (mode == "requantized")
    if mode == "requantized":
      want = to_kmajor(want)
      assert all(isinstance(leaf, KMajor) for leaf in jax.tree.leaves(
          got["layers"], is_leaf=lambda x: isinstance(x, (KMajor, QTensor))) if isinstance(leaf, (KMajor, QTensor)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("method,init", [("dora", "default"), ("lora", "pissa")])
def test_a_run_starts_its_adapter_from_the_4bit_base(method, init):
  """`runner.init_run_adapter` with ``quantize: int4``. DoRA's magnitudes come from the quantized kernel, so the
  initial model is exactly the 4-bit base it trains over (magnitudes from the float kernel, then quantizing, start
  elsewhere); PiSSA splits the float kernel and quantizes the residual (QPiSSA)."""
  from types import SimpleNamespace
  from lora_jax.config import config_from_dict
  from lora_jax.quant import quantize_model_params
  from lora_jax.runner import init_run_adapter, lora_config
  cfg = config_from_dict({"model": "m", "data": {"train": "x.jsonl"}, "quantize": "int4",
                          "peft": {"method": method, "init": init, "rank": 4, "targets": ["all-linear"]}})
  model = SimpleNamespace(config=CFG, params=PARAMS, quantized=None, tokenizer=None)
  lcfg = lora_config(cfg)
  adapter, frozen = init_run_adapter(cfg, lcfg, model, key=jax.random.key(0))
  kernels = [leaf for leaf in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, QTensor))
             if isinstance(leaf, QTensor)]
  assert len(kernels) == 7
  if method == "dora":
    assert_allclose(forward(lcfg.apply(CFG, frozen, adapter), CFG, TOKENS), forward(frozen, CFG, TOKENS),
                    "f32_composite")
  else:
    float_adapter, residual = lcfg.init_adapter(CFG, PARAMS, key=jax.random.key(0))
    assert_trees_all_equal(adapter, float_adapter)
    assert_trees_all_equal(frozen, quantize_model_params(residual, "int4"))
