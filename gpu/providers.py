"""The fast path behind the provider protocol of ``qlora_ref.conformance.providers`` (``torch`` and ``triton``).

Registered there as ``qlora_gpu.providers:TorchProvider`` and
``qlora_gpu.providers:TritonProvider``; the tests, ``qlora-ref check`` and the benchmarks load
them by those names. They take and return NumPy arrays and ``qlora_ref.QuantState`` (the
registry's common currency; see its Note: provider protocol) and convert exactly to and from
torch tensors on their device: CUDA when there is one, else the CPU (where the Triton provider
needs Triton's interpreter, ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from qlora_gpu.quantize import dequantize_4bit, quantize_4bit
from qlora_gpu.state import QUANT_TYPES, QuantState, tensor_from_numpy, tensor_to_numpy

__all__ = ["TorchProvider", "TritonProvider"]


class TorchProvider:
    """``qlora_gpu`` with its plain torch backend (any device).

    Parameters
    ----------
    device : str or torch.device, optional
        Default: ``"cuda"`` when available, else ``"cpu"``.

    Examples
    --------
    >>> p = TorchProvider(device="cpu")
    >>> packed, state = p.quantize(np.array([1, -1, 0, 0.5], np.float32))
    >>> [hex(b) for b in packed.ravel()], p.dequantize(packed, state).tolist()
    (['0xf0', '0x7c'], [1.0, -1.0, 0.0, 0.44070982933044434])
    """

    name = "torch"
    backend = "torch"

    def __init__(self, device=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def available(self):
        """``(True, "")``: plain torch runs wherever torch is installed."""
        return True, ""

    def supports(self, quant_type, double_quant) -> bool:
        """NF4, FP4 and INT4, without or with bitsandbytes' double quantization."""
        return quant_type in QUANT_TYPES and double_quant in (False, None, True, "bnb")

    def quantize(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        """NumPy in, ``(packed uint8 ((n+1)//2, 1), qlora_ref.QuantState)`` out.

        Raises
        ------
        TypeError, ValueError
            As ``qlora_gpu.quantize_4bit``; TypeError if ``x`` is not a NumPy array.
        """
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a NumPy array, got {type(x).__name__}")
        packed, state = quantize_4bit(tensor_from_numpy(x, self.device), blocksize=blocksize, quant_type=quant_type,
                                      double_quant=double_quant, backend=self.backend)
        return tensor_to_numpy(packed), state.to_oracle()

    def dequantize(self, packed, state, *, dtype=None):
        """``(packed, qlora_ref.QuantState)`` in, a NumPy array of ``state.shape`` in ``dtype`` out."""
        if not isinstance(packed, np.ndarray):
            raise TypeError(f"packed must be a NumPy array, got {type(packed).__name__}")
        fast_state = QuantState.from_oracle(state, self.device)
        y = dequantize_4bit(tensor_from_numpy(packed, self.device), fast_state,
                            dtype=state.dtype if dtype is None else _dtype_name(dtype), backend=self.backend)
        return tensor_to_numpy(y)


class TritonProvider(TorchProvider):
    """``qlora_gpu`` with its Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Examples
    --------
    >>> ok, reason = TritonProvider().available()
    >>> ok or "TRITON_INTERPRET" in reason
    True
    """

    name = "triton"
    backend = "triton"

    def available(self):
        """Whether the kernels can run here, and if not, what is missing."""
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "triton is not installed"
        if self.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return True, ""
        return False, "needs CUDA (or TRITON_INTERPRET=1 for Triton's CPU interpreter)"


def _dtype_name(dtype) -> str:
    """``"bfloat16"`` for ``"bfloat16"``, ``ml_dtypes.bfloat16`` or ``np.dtype(...)``; same for the others."""
    if isinstance(dtype, str):
        return dtype
    try:
        return np.dtype(dtype).name
    except TypeError:
        raise TypeError(f"unsupported dtype {dtype!r}") from None
