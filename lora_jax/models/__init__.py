"""Model definitions as pure functions over parameter pytrees."""

from ._config import ModelConfig as ModelConfig, SUPPORTED_ARCHITECTURES as SUPPORTED_ARCHITECTURES
from ._llama import (KVCache as KVCache, forward as forward, hidden_states as hidden_states,
                     init_params as init_params, logits as logits)

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES", "KVCache", "forward", "hidden_states", "init_params", "logits"]
