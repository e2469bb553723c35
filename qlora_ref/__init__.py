"""qlora_ref: the readable NumPy oracle for QLoRA.

The core, in reading order (the top level of this package, nothing else):

1. ``qlora_ref.codebooks``: the NF4, FP4 and INT4 tables, and how NF4 is derived from normal
   quantiles.
2. ``qlora_ref.blockwise``: one level of 4-bit blocks: absmax, encode, pack, decode.
3. ``qlora_ref.double_quant``: bitsandbytes' 8-bit quantization of the absmax constants.
4. ``qlora_ref.torchao_nf4``: torchao's NF4 format, end to end.
5. ``qlora_ref.state``: ``QuantState`` and ``NestedAbsmax``, what a quantized tensor stores.
6. ``qlora_ref.api``: ``quantize_4bit`` and ``dequantize_4bit``, the two calls for every scheme.
7. ``qlora_ref.lora``, ``qlora_ref.qlora``, ``qlora_ref.dora``: the adapters' forward and
   backward passes, and merging.

Around it: ``qlora_ref.formats`` (bitsandbytes state dicts, safetensors checkpoints, PEFT
adapters), ``qlora_ref.conformance`` (``qlora-ref check``: implementations against the oracle),
``qlora_ref.memory`` (the memory calculator) and ``qlora_ref.cli`` (the command line), with
``qlora_ref.text_table`` for their plain-text tables. Dependencies point down that list, never
up. NumPy and SciPy only: it never imports torch; the fast path ``qlora_gpu`` is checked
against it.
"""

from qlora_ref.api import dequantize_4bit, quantize_4bit
from qlora_ref.blockwise import pack_4bit, unpack_4bit
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
from qlora_ref.dora import dora_backward, dora_forward, dora_merge, dora_weight_norm
from qlora_ref.double_quant import dequantize_absmax, double_quantize, dynamic_map
from qlora_ref.formats.bnb import from_bnb_state_dict, to_bnb_state_dict
from qlora_ref.lora import (
    lora_backward,
    lora_forward,
    lora_init,
    lora_merge,
    lora_scaling,
    lora_unmerge,
)
from qlora_ref.memory import FinetuneSetup, ModelShape, estimate_memory, model_shape
from qlora_ref.qlora import (
    merge_error,
    merge_into_4bit,
    qlora_backward,
    qlora_base_weight,
    qlora_forward,
)
from qlora_ref.state import NestedAbsmax, QuantState

__version__ = "0.1.0"

__all__ = [
    # codebooks
    "NF4_CODEBOOK",
    "FP4_CODEBOOK",
    "INT4_CODEBOOK",
    "codebook",
    "nf4_codebook",
    "fp4_codebook",
    "int4_codebook",
    "normal_float_codebook",
    "normal_float_offset",
    # blockwise quantization, double quantization, the state
    "quantize_4bit",
    "dequantize_4bit",
    "pack_4bit",
    "unpack_4bit",
    "double_quantize",
    "dequantize_absmax",
    "dynamic_map",
    "QuantState",
    "NestedAbsmax",
    # LoRA, QLoRA, DoRA
    "lora_scaling",
    "lora_init",
    "lora_forward",
    "lora_backward",
    "lora_merge",
    "lora_unmerge",
    "qlora_base_weight",
    "qlora_forward",
    "qlora_backward",
    "merge_into_4bit",
    "merge_error",
    "dora_weight_norm",
    "dora_forward",
    "dora_backward",
    "dora_merge",
    # around the core
    "to_bnb_state_dict",
    "from_bnb_state_dict",
    "FinetuneSetup",
    "ModelShape",
    "estimate_memory",
    "model_shape",
]
