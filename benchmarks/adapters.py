"""Benchmark adapters: the native calls of each registered provider, for timing.

Pairs with ``qlora_ref.conformance.providers`` (one registry of providers with fixed names: ``oracle``,
``torch``, ``triton``, ``bnb``, ``torchao``). The registry's protocol is NumPy in and out, which
is right for checking and wrong for timing (the conversions would dominate), so each adapter
here names the same provider and exposes its native calls on its native data: NumPy arrays for
the oracle, torch tensors for the rest. Every adapter also converts its quantized weight back to
an oracle ``QuantState`` (exactly: same bits), which is how ``benchmarks/checks.py`` compares it.

Note: benchmark adapters
    ``ADAPTERS[name]`` builds the adapter of a registry name; ``compiled=True`` wraps the timed
    calls of decode, product and layer in ``torch.compile`` (label ``name+compile``). Handles
    (what ``quantize`` returns) are each library's own: ``(packed, QuantState)`` of the oracle or
    of ``qlora_gpu``, ``(packed, bitsandbytes QuantState)``, or a torchao ``NF4Tensor``.

Note: where the decoded weight is rounded
    A 4-bit product decodes the weight to some dtype before multiplying, and the oracle's
    reference must round where the provider does. ``qlora_gpu`` decodes exactly and rounds once
    to the compute dtype (the oracle's Note: QLoRA rounding). bitsandbytes' ``gemm_4bit``
    (forward and inference) decodes straight to the input's dtype too, but ``MatMul4Bit``'s
    backward decodes to the stored weight's dtype first (``dequantize_4bit(B, state)``) and
    then converts. torchao decodes in the stored dtype (``NF4Tensor.to(dtype)`` =
    ``get_original_weight().to(dtype)``). With bfloat16 weights and bfloat16 compute (the GPU
    cases) all of these agree; with float32 compute (the CPU cases) they differ, and
    ``forward_weight_dtype`` / ``backward_weight_dtype`` say which rounding each one uses.
    Under ``torch.compile`` torchao's decode keeps its intermediates in float32 (inductor's
    default), a different rounding again: ``qlora_ref.conformance.variants.torchao_float32_intermediates``.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import torch
import torch.nn.functional as F

from qlora_gpu.state import tensor_to_numpy
from qlora_ref.state import NestedAbsmax as RefNested
from qlora_ref.state import QuantState as RefState

__all__ = ["ADAPTERS", "make_adapter", "lora_branch"]

BLOCKSIZE = 64
QUANT_TYPE = "nf4"


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def lora_branch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """PEFT's adapter term ``s * B(A(x))`` in the adapters' dtype (no dropout)."""
    return F.linear(F.linear(x.to(A.dtype), A), B) * scaling


class Adapter:
    """Base class: a provider's name, availability and native calls (see Note: benchmark adapters)."""

    name = ""
    scheme = "bnb"  # the 4-bit format it writes: "bnb" (bitsandbytes') or "torchao"
    module = ""  # the import that must succeed

    def __init__(self, compiled: bool = False):
        self.compiled = compiled

    @property
    def label(self) -> str:
        return self.name + ("+compile" if self.compiled else "")

    def available(self, device: torch.device) -> tuple[bool, str]:
        if self.module and importlib.util.find_spec(self.module) is None:
            return False, f"{self.module} is not installed"
        return True, ""

    def supports(self, op: str, shape: tuple) -> tuple[bool, str]:
        """Whether this provider implements ``op`` for a weight of ``shape``, and why not."""
        return True, ""

    def _compile(self, fn):
        # Default dynamic-shape policy: static first, one dynamic recompile when a size changes
        # (the layer's token counts), so a run compiles each graph at most twice.
        return torch.compile(fn) if self.compiled else fn

    def forward_weight_dtype(self, compute_dtype, weight_dtype):
        return compute_dtype

    def backward_weight_dtype(self, compute_dtype, weight_dtype):
        return compute_dtype

    # quantize(W) -> handle; decode(handle, dtype) -> Tensor; matmul(handle, x) -> Tensor;
    # base(handle) -> differentiable x -> x W^T; to_oracle(handle) -> (packed, RefState);
    # buffers(handle) -> {name: bytes}


class OracleAdapter(Adapter):
    """The NumPy oracle: quantize and decode only, CPU only (its products are float64 references)."""

    name = "oracle"

    def available(self, device):
        if device.type != "cpu":
            return False, "the oracle runs on the CPU only"
        return True, ""

    def supports(self, op, shape):
        if op in ("quantize", "decode"):
            return True, ""
        return False, "the oracle's products are float64 references, not an implementation to time"

    def prepare(self, W: torch.Tensor):
        return tensor_to_numpy(W)

    def quantize(self, W_np):
        from qlora_ref import quantize_4bit

        return quantize_4bit(W_np, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, double_quant=True)

    def decode(self, handle, dtype):
        from qlora_ref import dequantize_4bit

        return dequantize_4bit(handle[0], handle[1], dtype=_dtype_name(dtype))

    def to_oracle(self, handle):
        return handle

    def buffers(self, handle):
        packed, state = handle
        nested = state.nested
        return {"packed": packed.nbytes, "absmax codes": nested.codes.nbytes, "nested absmax": nested.absmax.nbytes,
                "nested map": nested.codebook.nbytes, "offset": np.asarray(nested.offset).nbytes, "code": state.codebook.nbytes}


class QloraGpuAdapter(Adapter):
    """``qlora_gpu`` with one backend (``torch`` or ``triton``)."""

    module = "qlora_gpu"

    def __init__(self, backend: str, compiled: bool = False):
        super().__init__(compiled)
        self.name = self.backend = backend

    def available(self, device):
        ok, why = super().available(device)
        if ok and self.backend == "triton" and device.type != "cuda":
            return False, "needs CUDA (the Triton interpreter on CPU is not a benchmark)"
        return ok, why

    def prepare(self, W):
        return W

    def quantize(self, W):
        import qlora_gpu

        return qlora_gpu.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, double_quant=True,
                                       backend=self.backend)

    def decode_fn(self, dtype):
        import qlora_gpu

        return self._compile(lambda packed, state: qlora_gpu.dequantize_4bit(packed, state, dtype=dtype,
                                                                              backend=self.backend))

    def matmul_fn(self):
        import qlora_gpu

        return self._compile(lambda x, packed, state: qlora_gpu.matmul_4bit(x, packed, state, backend=self.backend))

    def layer_fn(self, compute_dtype):
        import qlora_gpu

        def layer(x, packed, state, A, B, scaling):  # QLoRALinear.forward without a module
            return qlora_gpu.qlora_linear(x, packed, state, A, B, scaling=scaling, compute_dtype=compute_dtype,
                                          backend=self.backend)

        return self._compile(layer)

    def to_oracle(self, handle):
        packed, state = handle
        return tensor_to_numpy(packed), state.to_oracle()

    def buffers(self, handle):
        packed, state = handle
        n = state.nested

        def b(t):
            return t.numel() * t.element_size()

        return {"packed": b(packed), "absmax codes": b(n.codes), "nested absmax": b(n.absmax), "nested map": b(n.codebook),
                "offset": b(n.offset), "code": b(state.codebook)}


class BitsAndBytesAdapter(Adapter):
    """bitsandbytes' ``functional.quantize_4bit`` / ``dequantize_4bit`` / ``matmul_4bit`` (comparator)."""

    name = "bnb"
    module = "bitsandbytes"

    def backward_weight_dtype(self, compute_dtype, weight_dtype):
        return weight_dtype  # MatMul4Bit.backward: dequantize_4bit(B, state).to(dtype)

    def prepare(self, W):
        return W

    def quantize(self, W):
        import bitsandbytes.functional as bnbf

        return bnbf.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=True, quant_type=QUANT_TYPE)

    def decode_fn(self, dtype):
        import bitsandbytes.functional as bnbf

        def decode(packed, qs):
            if qs.dtype != dtype:  # dequantize_4bit writes the state's dtype
                qs = copy.copy(qs)
                qs.dtype = dtype
            return bnbf.dequantize_4bit(packed, qs)

        return self._compile(decode)

    def matmul_fn(self):
        import bitsandbytes as bnb

        return self._compile(lambda x, packed, qs: bnb.matmul_4bit(x, packed.t(), quant_state=qs))

    def layer_fn(self, compute_dtype):
        import bitsandbytes as bnb

        def layer(x, packed, qs, A, B, scaling):  # PEFT's LoRA on a bnb Linear4bit
            return bnb.matmul_4bit(x, packed.t(), quant_state=qs) + lora_branch(x, A, B, scaling).to(x.dtype)

        return self._compile(layer)

    def to_oracle(self, handle):
        packed, qs = handle
        nested = RefNested(scheme="bnb", codes=tensor_to_numpy(qs.absmax), absmax=tensor_to_numpy(qs.state2.absmax),
                           codebook=tensor_to_numpy(qs.state2.code), offset=np.float32(qs.offset.item()),
                           blocksize=qs.state2.blocksize)
        state = RefState(shape=tuple(qs.shape), dtype=_dtype_name(qs.dtype), blocksize=qs.blocksize,
                         quant_type=qs.quant_type, codebook=tensor_to_numpy(qs.code), nested=nested)
        return tensor_to_numpy(packed), state

    def buffers(self, handle):
        packed, qs = handle

        def b(t):
            return t.numel() * t.element_size()

        offset = qs.offset if torch.is_tensor(qs.offset) else torch.tensor(qs.offset, dtype=torch.float32)
        return {"packed": b(packed), "absmax codes": b(qs.absmax), "nested absmax": b(qs.state2.absmax),
                "nested map": b(qs.state2.code), "offset": b(offset), "code": b(qs.code)}


class TorchaoAdapter(Adapter):
    """torchao's ``NF4Tensor`` (``to_nf4``, ``linear_nf4``), the format torchtune's QLoRA uses (comparator)."""

    name = "torchao"
    scheme = "torchao"
    module = "torchao"

    def supports(self, op, shape):
        n = int(np.prod(shape))
        if n % (BLOCKSIZE * 256):
            return False, f"torchao's NF4Tensor needs numel % (64 * 256) == 0; {shape[0]}x{shape[1]} has {n}"
        if op == "quantize" and self.compiled:
            return False, "to_nf4 builds a tensor subclass outside torch.compile (its constructor disables dynamo)"
        return True, ""

    def forward_weight_dtype(self, compute_dtype, weight_dtype):
        return weight_dtype  # NF4Tensor.to(dtype) decodes in its own dtype, then converts

    backward_weight_dtype = forward_weight_dtype

    @staticmethod
    def _nf4():
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

        return nf4_tensor

    def prepare(self, W):
        return W

    def quantize(self, W):
        return self._nf4().to_nf4(W, block_size=BLOCKSIZE, scaler_block_size=256)

    def decode_fn(self, dtype):
        return self._compile(lambda nf4: nf4.to(dtype))

    def matmul_fn(self):
        linear_nf4 = self._nf4().linear_nf4
        return self._compile(lambda x, nf4: linear_nf4(x, nf4))

    def layer_fn(self, compute_dtype):
        linear_nf4 = self._nf4().linear_nf4

        def layer(x, nf4, A, B, scaling):  # torchtune's LoRALinear with an NF4 base
            return linear_nf4(x, nf4) + lora_branch(x, A, B, scaling).to(x.dtype)

        return self._compile(layer)

    def to_oracle(self, nf4):
        from qlora_ref.torchao_nf4 import torchao_codebook

        dtype = _dtype_name(nf4.dtype)
        nested = RefNested(scheme="torchao", codes=tensor_to_numpy(nf4.quantized_scalers).astype(np.int8).reshape(-1),
                           absmax=tensor_to_numpy(nf4.quantization_factor).reshape(-1), codebook=None,
                           offset=tensor_to_numpy(nf4.scaler_mean).reshape(()).astype(tensor_to_numpy(nf4.nf4).dtype)[()],
                           blocksize=nf4.scaler_block_size)
        state = RefState(shape=tuple(nf4.shape), dtype=dtype, blocksize=nf4.block_size, quant_type="nf4",
                         codebook=torchao_codebook(dtype), nested=nested)
        return tensor_to_numpy(nf4.quantized_data).reshape(-1, 1), state

    def buffers(self, nf4):
        def b(t):
            return t.numel() * t.element_size()

        return {"packed": b(nf4.quantized_data), "absmax codes": b(nf4.quantized_scalers),
                "nested absmax": b(nf4.quantization_factor), "nested map": 0, "offset": b(nf4.scaler_mean),
                "code": b(nf4.nf4)}


#: Builders of the adapters, by registry name (``qlora_ref.conformance.providers.PROVIDERS``).
ADAPTERS = {
    "oracle": OracleAdapter,
    "torch": lambda compiled=False: QloraGpuAdapter("torch", compiled),
    "triton": lambda compiled=False: QloraGpuAdapter("triton", compiled),
    "bnb": BitsAndBytesAdapter,
    "torchao": TorchaoAdapter,
}


def make_adapter(label: str) -> Adapter:
    """Build the adapter for a label: a registry name, optionally with ``+compile``.

    Raises
    ------
    ValueError
        If the name is not registered (the names are ``qlora_ref.conformance.providers.PROVIDERS``).

    Examples
    --------
    >>> make_adapter("torchao+compile").label
    'torchao+compile'
    """
    from qlora_ref.conformance.providers import PROVIDERS

    name, _, suffix = label.partition("+")
    if name not in PROVIDERS or name not in ADAPTERS or suffix not in ("", "compile"):
        raise ValueError(f"unknown provider {label!r}; registered: {sorted(PROVIDERS)} (optionally +compile)")
    return ADAPTERS[name](compiled=suffix == "compile")
