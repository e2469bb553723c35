"""Blockwise 4-bit quantization and decoding (NF4, FP4, INT4), bit-compatible with bitsandbytes.

One level of blocks, the definitions: ``blockwise_absmax``, ``encode_4bit``, ``pack_4bit`` /
``unpack_4bit``, ``decode_4bit``, and beside it ``decode_packed_4bit``, the faster equivalent that
``qlora_ref.api.dequantize_4bit`` runs (tested equal, bit for bit). ``qlora_ref.api`` puts these
together with double quantization into ``quantize_4bit`` / ``dequantize_4bit``. Fast pairs:
``qlora_gpu.quantize_4bit`` / ``qlora_gpu.dequantize_4bit`` (torch and Triton).

Note: quantization semantics
    1. The input (float32, float16 or bfloat16) is converted exactly to float32 and flattened in
       row-major order; blocks of ``blocksize`` elements run over the flat tensor (they cross
       rows), and a partial last block is its own block.
    2. ``absmax[b] = max |x|`` over the block, in float32.
    3. ``s = x * float32(1 / absmax[b])``: the float32 reciprocal, then a float32 multiply.
    4. The code is the nearest codebook entry, computed as the number of the 15 float32
       midpoints between neighbouring entries (in sorted order) that lie strictly below ``s``:
       a value exactly on a midpoint takes the LOWER entry.
    5. Zero always encodes as the codebook's zero code: an all-zero block stores absmax 0 and
       the zero code everywhere (``0 * inf`` would be NaN), and so do zeros in a block whose
       absmax is so small that its float32 reciprocal overflows (absmax below 2^-128, about
       2.9e-39: float32 or bfloat16 subnormals). In such a block every nonzero value scales to
       +-inf and takes the end code of its sign, which decodes to +-absmax (bitsandbytes' CUDA
       kernel does the same; its CPU path clamps the absmax to 1e-38 first).
    6. Packing: byte ``k = (code[2k] << 4) | code[2k+1]``; the first element is in the HIGH
       nibble; an odd count pads the last low nibble with the zero code.
    7. Decoding: ``y = float32(CODE[code] * absmax[b])``, then round-to-nearest-even into the
       output dtype.
    8. NaN and Inf inputs are refused with ValueError (bitsandbytes' backends disagree on them,
       and no checkpoint should hold them).

    Known differences, classified by the conformance tests: bitsandbytes' CUDA kernel writes
    code 0 in all-zero blocks; its CPU path divides (instead of multiplying by the reciprocal)
    in a partial last block and clamps absmax to at least 1e-38 before the reciprocal.
"""

from __future__ import annotations

import numpy as np

from qlora_ref.codebooks import codebook, zero_code
from qlora_ref.state import BLOCKSIZES, QUANT_TYPES, QuantState, dtype_name

__all__ = [
    "check_blocksize",
    "check_quant_type",
    "as_float32_flat",
    "sorted_midpoints",
    "encode_4bit",
    "decode_4bit",
    "pack_4bit",
    "unpack_4bit",
    "blockwise_absmax",
    "decode_packed_4bit",
    "check_packed",
]


#: Elements per chunk of the encoder's loop: 1 MiB of float32, small enough for the cache.
_CHUNK_ELEMENTS = 1 << 18


def check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    if int(blocksize) not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not allowed; use one of {BLOCKSIZES}")
    return int(blocksize)


def check_quant_type(quant_type) -> str:
    if not isinstance(quant_type, str) or quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {QUANT_TYPES}")
    return quant_type


def sorted_midpoints(codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (float32 midpoints between sorted neighbours, code of each sorted position)."""
    order = np.argsort(codebook, kind="stable")  # FP4 is stored by code, not by value
    v = codebook[order]
    midpoints = (v[:-1] + v[1:]) / np.float32(2.0)  # float32, as the formats compute them
    return midpoints, order


def blockwise_absmax(x_flat: np.ndarray, blocksize: int) -> np.ndarray:
    """Return ``max |x|`` of each block of a flat float32 array (the last block may be partial).

    Examples
    --------
    >>> blockwise_absmax(np.array([1, -3, 2, 0, 5], np.float32), 2).tolist()
    [3.0, 2.0, 5.0]
    """
    n = x_flat.size
    n_full = n // blocksize
    full = np.abs(x_flat[: n_full * blocksize].reshape(n_full, blocksize)).max(axis=1, initial=0)
    if n % blocksize:
        tail = np.abs(x_flat[n_full * blocksize :]).max(initial=0)
        full = np.append(full, np.float32(tail))
    return full.astype(np.float32)


def encode_4bit(x_flat: np.ndarray, absmax: np.ndarray, blocksize: int, quant_type: str = "nf4") -> np.ndarray:
    """Encode a flat float32 array to 4-bit codes given its per-block absmax.

    Parameters
    ----------
    x_flat : ndarray, shape (n,), float32
    absmax : ndarray, shape (ceil(n / blocksize),), float32
    blocksize : int
    quant_type : {"nf4", "fp4", "int4"}

    Returns
    -------
    ndarray, shape (n,), uint8
        Codes 0..15 (see Note: quantization semantics, steps 3 to 5).

    Examples
    --------
    >>> encode_4bit(np.array([1, -1, 0, 0.5], np.float32), np.array([1], np.float32), 64).tolist()
    [15, 0, 7, 12]
    """
    midpoints, order = sorted_midpoints(codebook(quant_type))
    order = order.astype(np.uint8)
    zero = zero_code(quant_type)
    n = x_flat.size
    with np.errstate(divide="ignore", over="ignore"):
        reciprocal = np.float32(1.0) / absmax  # (n_blocks,) float32; inf where absmax is 0 or tiny
    codes = np.empty(n, dtype=np.uint8)
    # Work through chunks of whole blocks so that the temporaries stay in the CPU cache (one
    # pass over memory instead of one per midpoint).
    chunk = max(_CHUNK_ELEMENTS // blocksize, 1) * blocksize
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        x = x_flat[start:stop]  # (m,)
        scale = np.repeat(reciprocal[start // blocksize : -(-stop // blocksize)], blocksize)[: stop - start]
        with np.errstate(over="ignore", invalid="ignore"):
            s = x * scale  # float32 multiply; NaN only for 0 * inf (fixed below)
        # Step 4, as written: the number of midpoints strictly below s (a tie takes the lower entry).
        position = np.zeros(stop - start, dtype=np.uint8)
        for m in midpoints:
            position += s > m
        c = order[position]  # sorted position -> code (FP4's codes are not sorted by value)
        c[x == 0] = zero  # step 5: zero is zero, whatever the block
        codes[start:stop] = c
    return codes


def pack_4bit(codes: np.ndarray, quant_type: str = "nf4") -> np.ndarray:
    """Pack 4-bit codes two per byte, the first in the high nibble.

    Parameters
    ----------
    codes : ndarray, shape (n,), uint8 in 0..15
    quant_type : str
        Decides the pad code of an odd count (the code of 0.0).

    Returns
    -------
    ndarray, shape ((n + 1) // 2, 1), uint8

    Examples
    --------
    >>> pack_4bit(np.array([15, 0, 7, 12], np.uint8)).ravel().tolist() == [0xF0, 0x7C]
    True
    >>> pack_4bit(np.array([1, 2, 3], np.uint8)).ravel().tolist() == [0x12, 0x37]
    True
    """
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(zero_code(quant_type)))
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8).reshape(-1, 1)


def unpack_4bit(packed: np.ndarray, n: int) -> np.ndarray:
    """Unpack ``n`` 4-bit codes from bytes (first code in the high nibble).

    Examples
    --------
    >>> unpack_4bit(np.array([[0x12], [0x37]], np.uint8), 3).tolist()
    [1, 2, 3]
    """
    flat = np.asarray(packed, dtype=np.uint8).reshape(-1)
    codes = np.empty(flat.size * 2, dtype=np.uint8)
    codes[0::2] = flat >> 4
    codes[1::2] = flat & 0x0F
    return codes[:n]


def as_float32_flat(x) -> tuple[np.ndarray, str]:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array, got {type(x).__name__}")
    name = dtype_name(x.dtype)  # TypeError for any other dtype
    if x.size == 0:
        raise ValueError("x is empty: there is nothing to quantize")
    if x.ndim == 0:
        raise ValueError("x is 0-d: bitsandbytes cannot store the shape () of a 4-bit state; "
                         "reshape it to (1,)")
    x32 = np.ascontiguousarray(x).astype(np.float32).reshape(-1)  # exact for all three dtypes
    finite = np.isfinite(x32)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"x holds {int((~finite).sum())} NaN or Inf values (first at flat index {bad}: "
            f"{x32[bad]}); 4-bit formats cannot store them"
        )
    return x32, name


def check_packed(packed, state: QuantState) -> np.ndarray:
    """Validate packed codes against a state; return them as a flat uint8 array.

    Raises
    ------
    TypeError
        If ``packed`` is not a uint8 NumPy array or ``state`` is not a QuantState.
    ValueError
        If its size does not match the state's shape, or the state's constants do not match
        its block count.
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8:
        raise TypeError("packed must be a uint8 NumPy array")
    expected = state.packed_nbytes
    if packed.size != expected or packed.ndim not in (1, 2) or (packed.ndim == 2 and packed.shape[1] != 1):
        raise ValueError(
            f"packed has shape {packed.shape}, but a state of shape {state.shape} needs "
            f"({expected}, 1) bytes"
        )
    n_blocks = state.n_blocks
    if state.absmax is not None:
        if state.absmax.shape != (n_blocks,):
            raise ValueError(f"absmax has shape {state.absmax.shape}, expected ({n_blocks},)")
    elif state.nested.codes.shape != (n_blocks,):
        raise ValueError(f"nested absmax codes have shape {state.nested.codes.shape}, expected ({n_blocks},)")
    if state.codebook.shape != (16,):
        raise ValueError(f"the code map must have 16 entries, got shape {state.codebook.shape}")
    return packed.reshape(-1)


def decode_4bit(codes: np.ndarray, absmax: np.ndarray, blocksize: int, codebook: np.ndarray) -> np.ndarray:
    """Decode codes to float32: ``float32(codebook[code] * absmax[block])``.

    Examples
    --------
    >>> decode_4bit(np.array([15, 0], np.uint8), np.array([2], np.float32), 64, codebook("nf4")).tolist()
    [2.0, -2.0]
    """
    n = codes.size
    n_full = n // blocksize
    values = codebook.astype(np.float32)[codes]  # (n,) float32
    out = np.empty(n, dtype=np.float32)
    # Multiply block by block through a (n_blocks, blocksize) view: no repeated absmax array.
    # An infinite absmax (a double-quantized one can overflow) times a zero code is NaN, as in
    # bitsandbytes.
    with np.errstate(invalid="ignore"):
        np.multiply(values[: n_full * blocksize].reshape(n_full, blocksize), absmax[:n_full, None],
                    out=out[: n_full * blocksize].reshape(n_full, blocksize))
        if n % blocksize:
            np.multiply(values[n_full * blocksize :], absmax[n_full], out=out[n_full * blocksize :])
    return out


def decode_packed_4bit(packed_flat: np.ndarray, n: int, absmax: np.ndarray, blocksize: int,
                       codebook: np.ndarray) -> np.ndarray:
    """Decode packed bytes straight to float32; the same values as ``decode_4bit(unpack_4bit(...))``.

    Each byte indexes a 256-entry table of value pairs ``(codebook[b >> 4], codebook[b & 15])``, so one
    gather writes both elements of a byte (first element from the high nibble), and the block
    scaling then runs in place: two passes over the output instead of four.

    Examples
    --------
    >>> decode_packed_4bit(np.array([0xF0], np.uint8), 2, np.array([2], np.float32), 64, codebook("nf4")).tolist()
    [2.0, -2.0]
    """
    byte = np.arange(256)
    pairs = np.stack([codebook[byte >> 4], codebook[byte & 0x0F]], axis=1).astype(np.float32)  # (256, 2)
    values = np.take(pairs, packed_flat, axis=0).reshape(-1)[:n]  # (n,) float32, a contiguous view
    n_full = n // blocksize
    with np.errstate(invalid="ignore"):  # inf absmax times a zero code is NaN, as in decode_4bit
        full = values[: n_full * blocksize].reshape(n_full, blocksize)  # (n_blocks, blocksize) view
        full *= absmax[:n_full, None]
        if n % blocksize:
            values[n_full * blocksize :] *= absmax[n_full]
    return values
