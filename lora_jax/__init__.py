"""lora_jax: parameter-efficient fine-tuning of LLMs in JAX."""

from ._errors import LoraJaxError as LoraJaxError
from .io import Model as Model, load_model as load_model
from .models import ModelConfig as ModelConfig, forward as forward

__version__ = "0.1.0"
__all__ = ["LoraJaxError", "Model", "ModelConfig", "forward", "load_model", "__version__"]
