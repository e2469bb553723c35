"""qlora_ref: the readable NumPy oracle for QLoRA.

NF4/FP4 codebooks, blockwise 4-bit quantization and packing, double quantization, the file
formats real checkpoints use, LoRA and QLoRA math with gradients, and memory accounting.
It never imports torch; the fast path ``qlora_gpu`` is checked against it.
"""

from qlora_ref.codebooks import (
    FP4_CODEBOOK,
    INT4_CODEBOOK,
    NF4_CODEBOOK,
    codebook,
    fp4_codebook,
    int4_codebook,
    nf4_codebook,
    normal_float_codebook,
    normal_float_offset,
)

from qlora_ref.bnb_format import from_bnb_state_dict, to_bnb_state_dict
from qlora_ref.double_quant import dequantize_absmax, double_quantize, dynamic_map
from qlora_ref.dora import dora_backward, dora_forward, dora_merge, dora_weight_norm
from qlora_ref.lora import lora_backward, lora_forward, lora_init, lora_merge, lora_scaling, lora_unmerge
from qlora_ref.memory import FinetuneSetup, ModelShape, estimate_memory, model_shape
from qlora_ref.qlora import merge_error, merge_into_4bit, qlora_backward, qlora_base_weight, qlora_forward
from qlora_ref.quantize import dequantize_4bit, pack_4bit, quantize_4bit, unpack_4bit
from qlora_ref.state import NestedAbsmax, QuantState

__version__ = "0.1.0"

__all__ = [
    "FP4_CODEBOOK",
    "FinetuneSetup",
    "INT4_CODEBOOK",
    "ModelShape",
    "NF4_CODEBOOK",
    "NestedAbsmax",
    "QuantState",
    "codebook",
    "dequantize_4bit",
    "dequantize_absmax",
    "dora_backward",
    "dora_forward",
    "dora_merge",
    "dora_weight_norm",
    "double_quantize",
    "dynamic_map",
    "estimate_memory",
    "fp4_codebook",
    "from_bnb_state_dict",
    "int4_codebook",
    "lora_backward",
    "lora_forward",
    "lora_init",
    "lora_merge",
    "lora_scaling",
    "lora_unmerge",
    "merge_error",
    "merge_into_4bit",
    "model_shape",
    "nf4_codebook",
    "normal_float_codebook",
    "normal_float_offset",
    "pack_4bit",
    "qlora_backward",
    "qlora_base_weight",
    "qlora_forward",
    "quantize_4bit",
    "to_bnb_state_dict",
    "unpack_4bit",
]
