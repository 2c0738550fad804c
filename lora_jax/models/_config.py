"""`ModelConfig`: the architecture hyper-parameters of a Llama-family decoder.

One frozen dataclass describes Llama 2/3, Mistral, Qwen2 and SmolLM2; the differences are flags
(`attention_bias` for Qwen2's qkv bias, `tie_embeddings`, `sliding_window`, `rope_scaling`). It is
built from an HF ``config.json`` dict (`from_hf_dict`) or from GGUF metadata (see `lora_jax.io`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from .._errors import LoraJaxError

SUPPORTED_ARCHITECTURES = {
    # HF `model_type` -> family; all run through the same forward.
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Hyper-parameters of a Llama-family decoder (hashable, so usable as a jit static argument)."""

  architecture: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_type: str = "default"
  # Sorted (key, value) pairs of the rope scaling parameters (a tuple keeps the dataclass hashable).
  rope_scaling: tuple[tuple[str, float], ...] = ()
  # Per-frequency divisors of the inverse frequencies, [head_dim // 2], as a GGUF file's ``rope_freqs.weight``
  # holds them (llama.cpp stores Llama 3.1+'s rope scaling only this way); () for none.
  rope_freq_factors: tuple[float, ...] = ()
  max_position_embeddings: int = 4096
  tie_embeddings: bool = False
  attention_bias: bool = False
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise LoraJaxError(
          f"unsupported architecture {self.architecture!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    if self.num_heads % self.num_kv_heads:
      raise LoraJaxError(
          f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise LoraJaxError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise LoraJaxError(f"unsupported rope scaling type {self.rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}")
    if self.rope_freq_factors and len(self.rope_freq_factors) != self.head_dim // 2:
      raise LoraJaxError(f"rope_freq_factors has {len(self.rope_freq_factors)} entries; head_dim={self.head_dim} "
                         f"needs {self.head_dim // 2}")

  @property
  def q_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_size(self) -> int:
    return self.num_kv_heads * self.head_dim

  def kernel_shapes(self) -> dict[str, tuple[int, int]]:
    """(in, out) of every block linear, by HF module name (the one place these shapes are spelled out)."""
    d, f = self.hidden_size, self.intermediate_size
    return {"q_proj": (d, self.q_size), "k_proj": (d, self.kv_size), "v_proj": (d, self.kv_size),
            "o_proj": (self.q_size, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}

  def num_parameters(self) -> int:
    """Number of parameters, counting tied embeddings once (as HF does)."""
    d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
    attn = d * self.q_size * 2 + d * self.kv_size * 2
    if self.attention_bias:
      attn += self.q_size + 2 * self.kv_size
    per_layer = attn + 3 * d * f + 2 * d
    n = L * per_layer + self.vocab_size * d + d
    if not self.tie_embeddings:
      n += self.vocab_size * d
    return n

  def inv_freq(self) -> np.ndarray:
    """Rotary inverse frequencies (float32, shape [head_dim // 2]), with rope scaling applied.

    Computed in float32 like transformers does, so positions map to the same angles bit for bit.
    """
    d = self.head_dim
    exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv = (np.float32(1.0) / (np.float32(self.rope_theta) ** exponents)).astype(np.float32)
    p = dict(self.rope_scaling)
    if self.rope_type == "linear":
      inv = inv / np.float32(p["factor"])
    elif self.rope_type == "llama3":
      factor = p["factor"]
      low, high = p["low_freq_factor"], p["high_freq_factor"]
      old_ctx = p["original_max_position_embeddings"]
      low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
      wavelen = 2 * math.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
      smooth = (old_ctx / wavelen - low) / (high - low)
      smoothed = (1 - smooth) * scaled / factor + smooth * scaled
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      inv = np.where(medium, smoothed, scaled).astype(np.float32)
    if self.rope_freq_factors:
      inv = (inv / np.asarray(self.rope_freq_factors, np.float32)).astype(np.float32)
    return inv

  @classmethod
  def from_hf_dict(cls, cfg: Mapping[str, Any], *, source: str = "config.json") -> "ModelConfig":
    """Builds a config from an HF ``config.json`` dict; errors name `source` and the key."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
      raise LoraJaxError(
          f"{source}: unsupported architecture model_type={model_type!r} "
          f"(architectures={cfg.get('architectures')}); supported: {sorted(SUPPORTED_ARCHITECTURES)}")

    def need(key):
      if key not in cfg:
        raise LoraJaxError(f"{source}: missing required key {key!r} for model_type={model_type!r}")
      return cfg[key]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    # transformers >= 5 writes `rope_parameters` (incl. rope_theta); older files `rope_theta` + `rope_scaling`.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    scaling = tuple(sorted((k, float(v)) for k, v in rope.items()
                           if k not in ("rope_type", "type", "rope_theta") and isinstance(v, (int, float))))
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    num_layers = int(need("num_hidden_layers"))
    if model_type != "qwen2" and cfg.get("attention_bias"):  # Qwen2's is q/k/v only, which the model has
      raise LoraJaxError(f"{source}: attention_bias=true ({model_type}: biases on q/k/v and o_proj) is not supported")
    if cfg.get("mlp_bias"):
      raise LoraJaxError(f"{source}: mlp_bias=true (biases on gate/up/down_proj) is not supported")
    sliding = cfg.get("sliding_window")
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
      sliding = None
    if sliding:  # which layers slide: layer_types (transformers >= 4.53), else Qwen2's max_window_layers
      kinds = cfg.get("layer_types")
      if kinds is None and model_type == "qwen2":
        first = int(cfg.get("max_window_layers", 28))  # transformers' default
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
      kinds = set(kinds or ["sliding_attention"])
      if kinds == {"full_attention"}:
        sliding = None
      elif kinds != {"sliding_attention"}:
        raise LoraJaxError(f"{source}: a sliding window on some layers only (layer_types / max_window_layers) is "
                           f"not supported: lora_jax applies sliding_window={sliding} to every layer or none")
    return cls(
        architecture=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_type=rope_type,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=cfg.get("pad_token_id"),
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF ``config.json`` for this model (inverse of `from_hf_dict`)."""
    if self.rope_freq_factors:
      raise LoraJaxError("this model's rope scaling is a GGUF file's per-frequency factors (rope_freqs.weight), "
                         "which an HF config.json cannot state without the rope parameters they came from; "
                         "start from the model's HF folder instead")
    arch_class = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **dict(self.rope_scaling)}
    out = {
        "architectures": [arch_class[self.architecture]],
        "model_type": self.architecture,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if self.rope_type == "default" else rope,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else
                        (self.eos_token_ids[0] if self.eos_token_ids else None),
        "pad_token_id": self.pad_token_id,
        "torch_dtype": "float32",
    }
    if self.architecture == "llama":
      out["attention_bias"] = self.attention_bias
      out["mlp_bias"] = False
    if self.architecture in ("mistral", "qwen2"):
      out["sliding_window"] = self.sliding_window
    if self.architecture == "qwen2":  # max_window_layers 0: the window on every layer, as lora_jax runs it
      out["use_sliding_window"] = self.sliding_window is not None
      out["max_window_layers"] = 0 if self.sliding_window is not None else self.num_layers
    return out
