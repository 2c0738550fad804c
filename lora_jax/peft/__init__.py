"""PEFT methods as pure transforms over parameter trees, and PEFT-format adapter files."""

from ._files import inference_params as inference_params, load_adapter as load_adapter
from ._files import load_for_inference as load_for_inference
from ._files import merged_params as merged_params, read_adapter_config as read_adapter_config, save_adapter as save_adapter
from ._lora import (LoraConfig as LoraConfig, LoRAWeight as LoRAWeight, apply_lora as apply_lora,
                    count_trainable as count_trainable, init_lora as init_lora, merge as merge,
                    trainable_summary as trainable_summary, unmerge as unmerge)
from ._ia3 import IA3Config as IA3Config, IA3Weight as IA3Weight
from ._prompt import PrefixTuningConfig as PrefixTuningConfig, PromptTuningConfig as PromptTuningConfig
from ._prompt import PTuningConfig as PTuningConfig
from ._optim import lora_optimizer as lora_optimizer, param_labels as param_labels
from ._targets import MODULE_PATHS as MODULE_PATHS, resolve_targets as resolve_targets

__all__ = ["IA3Config", "IA3Weight", "PrefixTuningConfig", "PromptTuningConfig", "PTuningConfig",
           "inference_params", "load_for_inference", "LoraConfig", "LoRAWeight", "apply_lora", "count_trainable", "init_lora", "load_adapter", "lora_optimizer",
           "merge", "merged_params", "param_labels", "read_adapter_config", "resolve_targets", "save_adapter", "trainable_summary",
           "unmerge", "MODULE_PATHS"]
