"""NumPy <-> torch conversion for the comparator providers, bit for bit.

The comparators run bitsandbytes and torchao, which take torch tensors, but must not use the
fast path (``qlora_gpu``) that they are checked beside; this module is their converter. NumPy
has no native bfloat16: ``ml_dtypes.bfloat16`` arrays travel as their 16-bit patterns. Needs
torch (an optional dependency of ``qlora_ref``: only the comparators import this module).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

__all__ = ["DTYPES", "default_device", "to_torch", "to_numpy", "torch_dtype"]

#: Output dtypes by name, as the provider protocol names them.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device(device=None) -> torch.device:
    """``device``, or CUDA when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def torch_dtype(dtype) -> torch.dtype:
    """The torch dtype for a name (``"bfloat16"``) or a NumPy dtype (``ml_dtypes.bfloat16``)."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DTYPES:
        raise TypeError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def to_torch(a: np.ndarray, device=None) -> torch.Tensor:
    """A NumPy array as a tensor on ``device``, bit for bit.

    Examples
    --------
    >>> to_torch(np.array([1.5, -2], ml_dtypes.bfloat16))
    tensor([ 1.5000, -2.0000], dtype=torch.bfloat16)
    """
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a.copy())
    return t if device is None else t.to(device)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a host NumPy array, bit for bit (bfloat16 becomes ``ml_dtypes.bfloat16``).

    Examples
    --------
    >>> to_numpy(torch.tensor([1.5], dtype=torch.bfloat16)).dtype
    dtype(bfloat16)
    """
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
