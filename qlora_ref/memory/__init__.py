"""How much memory a QLoRA fine-tune takes: stored tensors, adapters, optimizer, activations.

``qlora_ref.memory.model`` is the calculator (``FinetuneSetup`` -> ``estimate_memory``),
``qlora_ref.memory.activations`` the per-layer activation terms, ``qlora_ref.memory.shapes`` the
model shapes (``models.json`` beside it). The calculator's public names are re-exported here.
"""

from qlora_ref.memory.model import (
    LINEAR_NAMES,
    OPTIMIZERS,
    FinetuneSetup,
    MemoryBreakdown,
    MemoryItem,
    ModelShape,
    activation_items,
    estimate_memory,
    format_bytes,
    korthikanti_activation_bytes,
    load_models,
    model_shape,
    optimizer_state_nbytes,
    published_parameters,
    quantized_tensor_nbytes,
    shape_from_config,
)

__all__ = [
    "ModelShape",
    "FinetuneSetup",
    "MemoryItem",
    "MemoryBreakdown",
    "LINEAR_NAMES",
    "OPTIMIZERS",
    "load_models",
    "model_shape",
    "shape_from_config",
    "published_parameters",
    "quantized_tensor_nbytes",
    "optimizer_state_nbytes",
    "estimate_memory",
    "korthikanti_activation_bytes",
    "activation_items",
    "format_bytes",
]
