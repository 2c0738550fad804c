"""4-bit quantized base weights (NF4, int4, GGUF Q4_0/Q4_1) as pytree nodes."""

from ._merge import MERGE_MODES as MERGE_MODES, drift as drift, merge_quantized as merge_quantized
from ._qtensor import FORMATS as FORMATS, NF4_TABLE as NF4_TABLE, QTensor as QTensor, dequantize as dequantize
from ._quantize import DEFAULT_RULES as DEFAULT_RULES, from_bitsandbytes as from_bitsandbytes, from_gguf as from_gguf
from ._quantize import quantize as quantize
from ._quantize import QUANTIZE_MODES as QUANTIZE_MODES, quantize_model_params as quantize_model_params
from ._quantize import quantize_params as quantize_params

__all__ = ["MERGE_MODES", "drift", "merge_quantized", "FORMATS", "NF4_TABLE", "QTensor", "dequantize", "from_bitsandbytes", "from_gguf", "quantize", "quantize_params",
           "DEFAULT_RULES", "QUANTIZE_MODES", "quantize_model_params"]
