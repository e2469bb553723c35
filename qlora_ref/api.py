"""The two calls most users need: ``quantize_4bit`` and ``dequantize_4bit``, for every scheme.

Each call validates its arguments and hands the work to the module that defines the format:
``qlora_ref.blockwise`` (one level of 4-bit blocks, as bitsandbytes stores them),
``qlora_ref.double_quant`` (bitsandbytes' 8-bit quantization of the absmax constants) and
``qlora_ref.torchao_nf4`` (torchao's ``NF4Tensor`` format end to end). Read those for the
definitions; this module is the dispatch.

Fast pairs: ``qlora_gpu.quantize_4bit`` / ``qlora_gpu.dequantize_4bit`` (torch and Triton).
"""

from __future__ import annotations

import numpy as np

from qlora_ref.blockwise import (
    as_float32_flat,
    blockwise_absmax,
    check_blocksize,
    check_packed,
    check_quant_type,
    decode_packed_4bit,
    encode_4bit,
    pack_4bit,
)
from qlora_ref.codebooks import codebook
from qlora_ref.double_quant import dequantize_absmax, double_quantize
from qlora_ref.state import QuantState, numpy_dtype
from qlora_ref.torchao_nf4 import dequantize_torchao, quantize_torchao

__all__ = ["quantize_4bit", "dequantize_4bit"]


def quantize_4bit(x, *, blocksize: int = 64, quant_type: str = "nf4", double_quant=False):
    """Quantize an array blockwise to 4 bits, bit-identical with bitsandbytes.

    Parameters
    ----------
    x : ndarray, any shape, float32, float16 or bfloat16 (``ml_dtypes.bfloat16``)
    blocksize : int
        One of 32, 64, 128, 256, 512, 1024, 2048, 4096.
    quant_type : {"nf4", "fp4", "int4"}
    double_quant : bool or {"bnb", "torchao"}
        ``True`` or ``"bnb"``: bitsandbytes' double quantization of the absmax.
        ``"torchao"``: torchao's NF4Tensor format end to end (its rounded table, division in
        the input dtype, int8 linear double quantization; see ``qlora_ref.torchao_nf4``).

    Returns
    -------
    packed : ndarray, shape ((n + 1) // 2, 1), uint8
        Two codes per byte, first element in the high nibble.
    state : QuantState

    Raises
    ------
    TypeError
        If ``x`` is not a NumPy array of a supported dtype.
    ValueError
        If ``x`` is empty or holds NaN/Inf, or the block size, quant type or scheme is unknown.

    Notes
    -----
    QLoRA section 3: ``X_4bit = round_nearest(X / absmax(X))`` per block, with the NF4 table
    (see Note: quantization semantics in this module for every rounding decision).

    Examples
    --------
    >>> packed, state = quantize_4bit(np.array([1, -1, 0, 0.5], np.float32))
    >>> [hex(b) for b in packed.ravel()], state.absmax.tolist()
    (['0xf0', '0x7c'], [1.0])
    >>> dequantize_4bit(packed, state).tolist()
    [1.0, -1.0, 0.0, 0.44070982933044434]
    """
    blocksize = check_blocksize(blocksize)
    quant_type = check_quant_type(quant_type)
    if double_quant is True:
        double_quant = "bnb"
    if double_quant not in (False, None, "bnb", "torchao"):
        raise ValueError(f"double_quant must be False, True, 'bnb' or 'torchao', got {double_quant!r}")
    if double_quant == "torchao":
        if quant_type != "nf4":
            raise ValueError("the torchao scheme exists for quant_type='nf4' only")
        return quantize_torchao(x, blocksize=blocksize)
    x32, name = as_float32_flat(x)
    absmax = blockwise_absmax(x32, blocksize)  # (n_blocks,) float32
    codes = encode_4bit(x32, absmax, blocksize, quant_type)  # (n,) uint8
    packed = pack_4bit(codes, quant_type)
    common = dict(shape=tuple(int(d) for d in x.shape), dtype=name, blocksize=blocksize,
                  quant_type=quant_type, codebook=codebook(quant_type))
    if double_quant == "bnb":
        return packed, QuantState(**common, nested=double_quantize(absmax))
    return packed, QuantState(**common, absmax=absmax)


def dequantize_4bit(packed, state: QuantState, *, dtype=None) -> np.ndarray:
    """Decode a blockwise 4-bit tensor.

    Parameters
    ----------
    packed : ndarray, shape ((n + 1) // 2, 1) or ((n + 1) // 2,), uint8
    state : QuantState
    dtype : {"float32", "float16", "bfloat16"} or a NumPy dtype, optional
        Output dtype; defaults to ``state.dtype``.

    Returns
    -------
    ndarray of ``state.shape`` and ``dtype``
        ``float32(CODE[code] * absmax)`` rounded to nearest even into ``dtype``.

    Raises
    ------
    TypeError
        If ``packed`` or ``state`` has the wrong type, or ``dtype`` is unsupported.
    ValueError
        If the packed data and the state do not match.

    Examples
    --------
    >>> x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    >>> packed, state = quantize_4bit(x, blocksize=32)
    >>> dequantize_4bit(packed, state, dtype="bfloat16").dtype
    dtype(bfloat16)
    """
    flat = check_packed(packed, state)
    out_dtype = numpy_dtype(state.dtype if dtype is None else dtype)
    if state.nested is not None and state.nested.scheme == "torchao":
        return dequantize_torchao(packed, state, dtype=out_dtype)
    absmax = state.absmax if state.absmax is not None else dequantize_absmax(state.nested)
    # The fast decoder; it equals decode_4bit(unpack_4bit(...)) bit for bit (the definition,
    # in qlora_ref.blockwise; tests/test_quantize_properties.py checks the two agree).
    y = decode_packed_4bit(flat, state.numel, absmax.astype(np.float32, copy=False), state.blocksize, state.codebook)
    with np.errstate(over="ignore"):  # beyond the output dtype's range rounds to +-inf, as in torch
        return y.astype(out_dtype, copy=False).reshape(state.shape)
