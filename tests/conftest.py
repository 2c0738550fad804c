import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
# Rank promotion stays allowed: per-feature vectors (norm scales, biases) broadcast over leading axes by design.


def pytest_configure(config):
  """One persistent XLA compilation cache for the whole test session (`LORA_JAX_TEST_XLA_CACHE`; made by the process
  that starts the session, inherited by pytest-xdist's workers and by the CLI subprocesses the tests start): the
  suite is compile-bound, and modules, workers and subprocesses compile many of the same programs (a train step,
  a model's forward). jax keys each entry by the program, the compile options and the jax/XLA versions. Removed
  when the session ends; `LORA_JAX_TEST_XLA_CACHE=0` turns it off."""
  import tempfile
  if os.environ.get("LORA_JAX_TEST_XLA_CACHE") == "0":
    os.environ["LORA_JAX_XLA_CACHE"] = "0"  # nor the CLI's own cache (`cli._use_compilation_cache`)
    return
  if "LORA_JAX_TEST_XLA_CACHE" not in os.environ:
    os.environ["LORA_JAX_TEST_XLA_CACHE"] = config._lora_jax_xla_cache = tempfile.mkdtemp(prefix="lora_jax_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["LORA_JAX_TEST_XLA_CACHE"]
  jax.config.update("jax_compilation_cache_dir", os.environ["LORA_JAX_TEST_XLA_CACHE"])


def pytest_unconfigure(config):
  import shutil
  if getattr(config, "_lora_jax_xla_cache", None):
    shutil.rmtree(config._lora_jax_xla_cache, ignore_errors=True)


def _has(module: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(module) is not None


HAS_PARITY_STACK = _has("torch") and _has("transformers")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """XLA:CPU maps each compiled program's code into many small memory regions, and jax keeps every program it
  has compiled. Over the whole suite one process reached Linux's limit of 65530 mappings (vm.max_map_count; 64077
  counted before the crash) and died with a segfault inside a compile. Test modules rarely share programs, so
  each module's are released after it (all together they now stay far below the limit)."""
  yield
  import gc
  jax.clear_caches()
  gc.collect()


@pytest.fixture
def standard_promotion():
  """Standard dtype promotion for tests that run third-party code (optax) not written for strict mode."""
  with jax.numpy_dtype_promotion("standard"):
    yield


@pytest.fixture(scope="session")
def smollm2():
  """The real SmolLM2-135M preset (fetched once into the cache), loaded in float32."""
  from lora_jax import load_model
  return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def hf_tiny_llama(tmp_path_factory):
  """A tiny random Llama from transformers (eval mode) and the same folder loaded by lora_jax: the base for
  adapter-file parity tests. Tests must not modify the transformers model (deep-copy it before wrapping)."""
  if not HAS_PARITY_STACK:
    pytest.fail("parity tests need the [parity] extra (torch==2.13.0, transformers); install it")
  import torch
  import transformers

  from lora_jax import load_model
  from tests.models.test_hf_parity import _write_tokenizer
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  folder = tmp_path_factory.mktemp("tiny_llama")
  hf.save_pretrained(folder)
  _write_tokenizer(folder)
  return hf, load_model(str(folder))


@pytest.fixture(scope="session")
def hf_smollm2(smollm2):
  """transformers loading the very same GGUF file, float32."""
  if not HAS_PARITY_STACK:
    pytest.fail("parity tests need the [parity] extra (torch==2.13.0, transformers); install it")
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  torch.set_num_threads(2)
  path = os.path.dirname(smollm2.source)
  name = os.path.basename(smollm2.source)
  model = AutoModelForCausalLM.from_pretrained(path, gguf_file=name, dtype=torch.float32).eval()
  tok = AutoTokenizer.from_pretrained(path, gguf_file=name)
  return model, tok


def make_tiny_folder(folder, *, max_position_embeddings=64, **overrides):
  """A tiny random Llama HF folder written by lora_jax itself (no torch needed): config, safetensors, tokenizer."""
  import dataclasses

  from tokenizers import Tokenizer, models, pre_tokenizers

  from lora_jax.io import Tokenizer as LJTokenizer, save_hf_folder
  from lora_jax.models import ModelConfig, init_params
  cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=max_position_embeddings,
                    eos_token_ids=(1,), bos_token_id=None)
  cfg = dataclasses.replace(cfg, **overrides)
  params = init_params(cfg, key=jax.random.key(0), std=0.3)
  vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 64)}}
  backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  save_hf_folder(folder, params, cfg, LJTokenizer(backend=backend, eos_token="</s>", pad_token="<unk>"))
  return folder


@pytest.fixture
def tiny_folder(tmp_path):
  return make_tiny_folder(tmp_path / "tiny")


def sm90_or_skip_version_skew(compile_fn, *args):
  """compile_fn(*args) (a `triton_compile` sm_90 compile), skipping the test when the triton package cannot read
  this jax's IR: only for a (jax, triton) pair outside `IR_COMPATIBLE` (for CI's pair that is a failure:
  tests/kernels/test_qmatmul.py::test_sm90_compile_skips_only_for_an_untested_version_pair)."""
  from lora_jax.kernels.qmatmul import triton_compile as tc
  try:
    return compile_fn(*args)
  except tc.IRVersionMismatch as e:
    pytest.skip(str(e))


def cuda_ops_and_masks(call, x, w):
  """``call(x, w)`` lowered for CUDA on this machine: the StableHLO ops of the program around its one Triton kernel
  (constants left out, and the bitcast-like reshape of a scalar to one element), and, in that kernel's Triton IR,
  whether each load of a 16-bit tile of x and the result's store take a mask (`lora_jax/kernels/qmatmul/_rows.py`)."""
  import re

  from lora_jax.kernels.qmatmul import triton_compile as tc
  (kernel,) = tc.triton_kernels(call, x, w)
  text = jax.jit(lambda x, w: call(x, w)).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  scalar_to_1d = re.findall(r"stablehlo\.reshape .*: \(tensor<f32>\) -> tensor<1xf32>", text)
  ops = set(re.findall(r"stablehlo\.(\w+)", text)) - {"constant"}
  if text.count("stablehlo.reshape") == len(scalar_to_1d):
    ops.discard("reshape")
  dtype = {"bfloat16": "bf16", "float16": "f16"}[str(x.dtype)]
  x_loads = re.findall(rf"tt\.load (.*) : tensor<\d+x\d+x!tt\.ptr<{dtype}>>", kernel["ir"])
  stores = re.findall(r"tt\.store (.*) :", kernel["ir"])
  return ops, [a.count(",") == 2 for a in x_loads], [a.count(",") == 2 for a in stores]  # ptr, mask, other / value
