"""Model definitions as pure functions over parameter pytrees."""

from ._config import ModelConfig as ModelConfig, SUPPORTED_ARCHITECTURES as SUPPORTED_ARCHITECTURES
from ._llama import (KVCache as KVCache, forward as forward, hidden_states as hidden_states,
                     init_params as init_params, is_unstacked as is_unstacked, logits as logits,
                     stack_layers as stack_layers, unstack_layers as unstack_layers)

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES", "KVCache", "forward", "hidden_states", "init_params", "is_unstacked", "logits",
           "stack_layers", "unstack_layers"]
