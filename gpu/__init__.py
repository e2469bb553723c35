"""qlora_gpu: the fast path of qlora-ref, in PyTorch with Triton kernels on CUDA.

Installed from the folder ``gpu/`` under the import name ``qlora_gpu``. Every public function
mirrors a function of the oracle ``qlora_ref`` by name and signature, on torch tensors, and is
checked against it by property tests (``tests/test_gpu_*.py``, ``tests/test_qlora_linear.py``).

Public API (module where each lives)
------------------------------------
Quantization (``qlora_gpu.quantize``, ``qlora_gpu.state``):
    ``quantize_4bit(t, *, blocksize=64, quant_type="nf4", double_quant=False, backend="auto")``
    -> ``(packed, QuantState)``; ``dequantize_4bit(packed, state, *, dtype=None, backend="auto")``;
    ``double_quantize``, ``dequantize_absmax``, ``pack_4bit``, ``unpack_4bit``;
    ``QuantState`` / ``NestedAbsmax`` (``.from_oracle(ref_state)``, ``.to_oracle()``, ``.to(device)``).
Matrix product (``qlora_gpu.matmul``): ``matmul_4bit(x, packed, state, *, bias=None, backend="auto")``.
LoRA and QLoRA math (``qlora_gpu.lora``, ``qlora_gpu.qlora``): ``lora_scaling``,
    ``lora_forward``, ``lora_backward``, ``qlora_base_weight``, ``qlora_forward``,
    ``qlora_backward``, ``qlora_linear`` (differentiable).
Layers and models (``qlora_gpu.linear``, ``qlora_gpu.model``): ``QLoRALinear``,
    ``replace_linear_with_qlora(model, target_modules, *, r=8, alpha=16, **options)``,
    ``adapter_state_dict``, ``trainable_parameters``, ``save_peft_adapter`` (a PEFT adapter folder).
Checkpoints (``qlora_gpu.bnb_format``): ``to_bnb_state_dict``, ``from_bnb_state_dict``.
Several GPUs (``qlora_gpu.fsdp``, imported on its own: it loads ``torch.distributed``): the
    layers shard under FSDP2's ``fully_shard`` as they are; ``rank_nbytes``, ``full_state_dict``,
    ``load_full_state_dict``.
Codebook tensors (``qlora_gpu.codebooks``): the oracle's tables as cached device tensors.
Conformance (``qlora_gpu.providers``): ``TorchProvider`` and ``TritonProvider``, plugged into
    ``qlora-ref check`` through the entry-point group ``qlora_ref.providers``.

Backends: ``"torch"`` runs anywhere; ``"triton"`` runs the kernels of ``qlora_gpu.kernels``
(``quantize``, ``dequantize``, ``matmul``) on CUDA (or on CPU under ``TRITON_INTERPRET=1``);
``"auto"`` picks Triton for CUDA tensors.

Dependencies run one way: this package imports from ``qlora_ref`` only constants (codebooks,
block sizes, the bitsandbytes keys) and the public state types, never an oracle function, so a
test of the fast path against the oracle checks two independent implementations.

Examples
--------
>>> import torch, qlora_gpu
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
>>> qlora_gpu.replace_linear_with_qlora(model, ["0", "2"], r=4, quant_type="nf4", compute_dtype=torch.float32)
['0', '2']
>>> model(torch.randn(2, 64)).sum().backward()
>>> model[0].lora_A.weight.grad is not None, model[0].bias.grad is None
(True, True)
"""

from qlora_gpu.bnb_format import from_bnb_state_dict, to_bnb_state_dict
from qlora_gpu.linear import QLoRALinear
from qlora_gpu.lora import lora_backward, lora_forward, lora_scaling
from qlora_gpu.matmul import matmul_4bit
from qlora_gpu.model import (
    adapter_state_dict,
    replace_linear_with_qlora,
    save_peft_adapter,
    trainable_parameters,
)
from qlora_gpu.qlora import (
    qlora_backward,
    qlora_base_weight,
    qlora_forward,
    qlora_linear,
)
from qlora_gpu.quantize import (
    dequantize_4bit,
    dequantize_absmax,
    double_quantize,
    pack_4bit,
    quantize_4bit,
    unpack_4bit,
)
from qlora_gpu.state import NestedAbsmax, QuantState

__all__ = [
    "quantize_4bit", "dequantize_4bit", "double_quantize", "dequantize_absmax", "pack_4bit", "unpack_4bit",
    "QuantState", "NestedAbsmax", "matmul_4bit", "lora_scaling", "lora_forward", "lora_backward",
    "qlora_base_weight", "qlora_forward", "qlora_backward", "qlora_linear", "QLoRALinear",
    "replace_linear_with_qlora", "adapter_state_dict", "trainable_parameters", "save_peft_adapter",
    "to_bnb_state_dict", "from_bnb_state_dict",
]
