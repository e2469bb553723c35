"""Small helpers shared by the Triton kernel modules (private)."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


#: The compute capability the launchers choose configurations for when set (``compiling_for``).
_TARGET = []


@contextlib.contextmanager
def compiling_for(capability: tuple):
    """Make the launchers choose their configurations for ``capability`` (e.g. ``(8, 0)``), as
    on such a GPU: the kernel report captures launches on ``meta`` tensors this way."""
    _TARGET.append(tuple(capability))
    try:
        yield
    finally:
        _TARGET.pop()


def capability(device) -> tuple:
    """Compute capability to choose launch configurations for: the GPU's own, the one set by
    ``compiling_for``, or ``(9, 0)`` (H100/H200) for any other device (the interpreter)."""
    if _TARGET:
        return _TARGET[-1]
    if device.type == "cuda":
        return tuple(torch.cuda.get_device_capability(device))
    return (9, 0)


def launch_context():
    """Silence NumPy's floating-point warnings under the interpreter.

    The kernels compute ``1 / 0 = inf`` and ``0 * inf = NaN`` on purpose for all-zero blocks
    (and then select the zero code); on a GPU that is silent, in the interpreter NumPy warns.
    """
    return np.errstate(all="ignore") if interpreting() else contextlib.nullcontext()


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def absmax_arguments(state):
    """The kernels' five absmax arguments for a state, with or without double quantization.

    Returns ``(absmax, nested_absmax, nested_code, offset, NESTED)``: without double
    quantization ``absmax`` is the float32 absmax, ``NESTED`` is 0 and the three nested
    pointers are placeholders the kernel never reads; with it, ``absmax`` holds the uint8 codes
    and ``NESTED`` the nested block size.
    """
    if state.nested is None:
        return state.absmax, state.absmax, state.codebook, state.codebook, 0
    n = state.nested
    return n.codes, n.absmax, n.codebook, n.offset, n.blocksize


@triton.jit
def cast_rne(y, dtype: tl.constexpr, BITWISE: tl.constexpr):
    """Round float32 ``y`` to nearest even in ``dtype``.

    On a GPU (``BITWISE=False``) this is the native conversion, ``cvt.rn.bf16x2.f32`` or
    ``cvt.rn.f16x2.f32``: two values per instruction, round to nearest even for every finite
    value and infinity, as the oracle rounds. A NaN stays a NaN; its payload is what the
    hardware's conversion writes, which the tests do not pin (they compare NaN positions).

    Under Triton's interpreter (``BITWISE=True``, chosen by the launcher with
    ``interpreting()``) a float32 -> bfloat16 cast truncates instead of rounding (triton 3.9,
    ``cast_impl``), so the rounding is done on the bits: the same bits as ``cvt.rn`` for every
    finite value; a NaN keeps the upper half of its payload (``0 * inf`` gives ``0x7fc0``),
    and a NaN whose payload sits only in the low 16 bits would become inf (no kernel here
    makes one).
    """
    if BITWISE and dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round half to even on the 16 dropped bits
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)  # Triton's default down-cast rounding is to nearest even
