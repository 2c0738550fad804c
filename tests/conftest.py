import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
# Rank promotion stays allowed: per-feature vectors (norm scales, biases) broadcast over leading axes by design.


def _has(module: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(module) is not None


HAS_PARITY_STACK = _has("torch") and _has("transformers")


@pytest.fixture(scope="session")
def smollm2():
  """The real SmolLM2-135M preset (fetched once into the cache), loaded in float32."""
  from lora_jax import load_model
  return load_model("smollm2-135m")


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
