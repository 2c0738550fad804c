"""The real SmolLM2-135M GGUF against transformers loading the same file (fp32)."""

import math

import jax
import numpy as np
import pytest

from lora_jax.generate import generate_ids
from lora_jax.io import eos_ids
from lora_jax.models import forward
from lora_jax.perplexity import perplexity_of_ids
from lora_jax.testing import TOLS, max_abs_diff

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch", reason="needs the [parity] extra")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:",
    "In 1492, Columbus sailed 3 ships across the Atlantic; the voyage took 70 days and",
    "<|im_start|>user\nWhat is gradient descent?<|im_end|>\n<|im_start|>assistant\n",
]
TEXT = ("Low-rank adaptation freezes the pretrained weights and injects trainable rank decomposition matrices "
        "into each layer of the Transformer architecture, greatly reducing the number of trainable parameters "
        "for downstream tasks. Compared to full fine-tuning, it reduces the number of trainable parameters by "
        "10,000 times and the GPU memory requirement by 3 times, while performing on-par or better in quality. "
        "Numbers like 3.14159 and 2026-11-29, code like `x = f(y) + 1`, and names like SmolLM2 are all here. ") * 3


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_tokenizer_matches_transformers(smollm2, hf_smollm2, prompt):
  _, hf_tok = hf_smollm2
  assert smollm2.tokenizer.encode(prompt) == hf_tok(prompt)["input_ids"]


def test_tokenizer_decode_round_trip(smollm2):
  assert smollm2.tokenizer.decode(smollm2.tokenizer.encode(TEXT)) == TEXT


def test_logits_match_transformers(smollm2, hf_smollm2):
  hf, _ = hf_smollm2
  f = jax.jit(forward, static_argnums=1)
  for prompt in PROMPTS:
    ids = smollm2.tokenizer.encode(prompt)
    with torch.no_grad():
      ref = hf(torch.tensor([ids])).logits.numpy()
    got = np.asarray(f(smollm2.params, smollm2.config, np.asarray([ids], np.int32)))
    diff = max_abs_diff(got, ref)
    assert diff <= TOLS["parity_logits_f32"].atol, f"max |Δlogit| = {diff:.2e} on {prompt!r}"


def test_greedy_continuations_match_transformers(smollm2, hf_smollm2):
  hf, _ = hf_smollm2
  prompts = [smollm2.tokenizer.encode(p) for p in PROMPTS[:3]]
  eos = eos_ids(smollm2)
  ours = generate_ids(smollm2.params, smollm2.config, prompts, max_new_tokens=32, eos=eos)
  lengths = []
  for ids, (gen, _) in zip(prompts, ours):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=list(eos),
                        pad_token_id=eos[0])[0, len(ids):].tolist()
    assert gen == [t for t in ref if t not in eos]  # HF keeps the EOS that ended the row; we drop it
    lengths.append(len(gen))
  assert max(lengths) == 32  # at least one prompt runs the full 32 tokens


def test_perplexity_matches_transformers(smollm2, hf_smollm2):
  hf, _ = hf_smollm2
  ids = smollm2.tokenizer.encode(TEXT)
  window = 128
  ours = perplexity_of_ids(smollm2.params, smollm2.config, ids, max_length=window)
  total, count = 0.0, 0
  with torch.no_grad():
    for s in range(0, len(ids), window):
      w = torch.tensor([ids[s:s + window]])
      if w.shape[1] < 2:
        continue
      logp = torch.log_softmax(hf(w).logits[0, :-1].double(), -1)
      total -= logp.gather(-1, w[0, 1:, None]).sum().item()
      count += w.shape[1] - 1
  assert ours["tokens"] == count
  rel = abs(ours["perplexity"] - math.exp(total / count)) / math.exp(total / count)
  assert rel <= TOLS["parity_perplexity"].rtol, rel
