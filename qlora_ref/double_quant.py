"""Double quantization of the absmax constants, bitsandbytes' scheme (``"bnb"``).

The first level stores one float32 absmax per block of 64 weights: 0.5 bits per weight. Double
quantization (QLoRA section 3, "Double Quantization") subtracts their mean and quantizes the
result blockwise again, 256 constants per block, to 8-bit codes of the signed dynamic map, so a
weight pays ``8/64 + 32/(64*256)`` bits for its constants instead of ``32/64``.

Pairs with ``qlora_ref.blockwise`` (which calls it when ``double_quant`` is set) and
``qlora_ref.torchao_nf4`` (torchao's int8 linear alternative). Fast pair:
``qlora_gpu.double_quantize``.

Note: resolution of the nested level
    The dynamic map's resolution is relative to the nested block's largest ``|absmax - offset|``,
    so a block of small absmax next to an outlier block (in the same 256 constants) is decoded
    with an error of order ``gap * max|absmax - offset|``, which can exceed the absmax itself: the
    decoded absmax can even be negative, flipping the signs of that block's decoded weights. This
    is the format, not a defect of the oracle: bitsandbytes decodes the same state to the same
    values (for example an absmax of 1e6 among 255 absmax values of 0.01 to 300: the small ones
    decode to about -21.5).

Note: nested encoding rule
    Each constant takes the EXACT nearest entry of the dynamic map (distances compared in
    float64, where float32 differences are exact); an exact tie takes the lower entry. This is
    bitsandbytes' CUDA rule. Its CPU path (0.50) uses a 65536-entry lookup table instead, whose
    codes differ from the exact nearest for a fraction of a percent of constants: the conformance
    tests count those in the class ``approximate lookup table``.
"""

from __future__ import annotations

import numpy as np

from qlora_ref.codebooks import linspace_float32
from qlora_ref.state import NESTED_BLOCKSIZE, NestedAbsmax
from qlora_ref.torchao_nf4 import dequantize_scalers

__all__ = ["dynamic_map", "DYNAMIC_MAP", "double_quantize", "dequantize_absmax", "encode_nearest"]



def _build_dynamic_map() -> np.ndarray:
    # For i = 0..6: the 2^i midpoints of linspace(0.1, 1, 2^i + 1) (float32, torch's kernel),
    # scaled by float32(10^(i-6)) and by its negative; then 0 and 1.0. 127 + 127 + 2 values.
    values = []
    for i in range(7):
        edges = linspace_float32(0.1, 1.0, 2**i + 1)  # (2^i + 1,)
        means = (edges[:-1] + edges[1:]) / np.float32(2.0)  # (2^i,) float32 midpoints
        scale = np.float32(10.0 ** (i - 6))
        values.append(means * scale)
        values.append(-(means * scale))
    values.append(np.array([0.0, 1.0], dtype=np.float32))
    table = np.sort(np.concatenate(values).astype(np.float32))
    table.flags.writeable = False
    return table


#: The signed 8-bit dynamic map (256 sorted float32 values; index 127 is 0, the last is 1.0).
DYNAMIC_MAP = _build_dynamic_map()


def dynamic_map() -> np.ndarray:
    """Return the signed 8-bit dynamic quantization map bitsandbytes uses for nested absmax.

    Returns
    -------
    ndarray, shape (256,), float32
        Sorted: 127 negatives (the most negative is -0.99296874; there is no -1), 0 at index 127,
        128 positives ending at 1.0.

    Notes
    -----
    Dettmers (2016), "8-Bit Approximations for Parallelism in Deep Learning": a dynamic exponent
    (a run of leading zeros, ``10^(i-6)``) followed by a linear fraction whose resolution grows as
    the exponent shrinks, so relative precision is roughly even across six decades.

    Examples
    --------
    >>> m = dynamic_map()
    >>> m.shape, float(m[127]), float(m[-1]), float(m[0])
    ((256,), 0.0, 1.0, -0.992968738079071)
    """
    return DYNAMIC_MAP.copy()


def encode_nearest(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Return the index of the nearest entry of a sorted ``codebook`` for each value.

    Exact: the midpoints between neighbours are computed in float64, where sums of two float32
    values are exact, and a value exactly on a midpoint takes the lower index. NaN takes the
    index of the codebook's zero (it arises only as ``0 * inf`` in an all-zero block).

    Parameters
    ----------
    values : ndarray, float32
    codebook : ndarray, shape (k,), float32, sorted ascending

    Returns
    -------
    ndarray of int64, same shape as ``values``

    Examples
    --------
    >>> encode_nearest(np.array([0.24, 0.25, 0.26], np.float32), np.array([0, 0.5, 1], np.float32))
    array([0, 0, 1])
    """
    t = codebook.astype(np.float64)
    midpoints = (t[:-1] + t[1:]) / 2.0
    idx = np.searchsorted(midpoints, values.astype(np.float64), side="left")
    nan = np.isnan(values)
    if nan.any():
        idx[nan] = int(np.flatnonzero(codebook == 0)[0])
    return idx


def _blockwise_scale(v: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``v`` (float32, flat) into blocks; return (per-block absmax, v * float32(1/absmax))."""
    n = v.size
    blocksize = min(blocksize, n)  # one block holds everything: pad to n, not to a size we were told
    n_blocks = -(-n // blocksize)
    padded = np.zeros(n_blocks * blocksize, dtype=np.float32)
    padded[:n] = v
    blocks = padded.reshape(n_blocks, blocksize)  # (n_blocks, blocksize); zero padding adds no max
    absmax = np.abs(blocks).max(axis=1)  # (n_blocks,) float32
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        reciprocal = np.float32(1.0) / absmax  # float32, inf for an all-zero block
        scaled = (blocks * reciprocal[:, None]).reshape(-1)[:n]
    return absmax, scaled


def double_quantize(absmax: np.ndarray, *, blocksize: int = NESTED_BLOCKSIZE, offset=None) -> NestedAbsmax:
    """Quantize first-level absmax constants to 8 bits, bitsandbytes' scheme.

    Parameters
    ----------
    absmax : ndarray, shape (n_blocks,), float32
        First-level constants.
    blocksize : int
        Constants per nested block (bitsandbytes: 256).
    offset : float32, optional
        The value subtracted first. Default: the mean of ``absmax`` computed in float64 and
        rounded once to float32. bitsandbytes computes it with torch's float32 reduction, which
        can land 1 to 2 ulp away; pass its offset to reproduce its codes exactly.

    Returns
    -------
    NestedAbsmax
        ``scheme="bnb"``, uint8 ``codes`` (n_blocks,), float32 nested ``absmax``
        (ceil(n_blocks / blocksize),), the dynamic map, the float32 offset.

    Raises
    ------
    TypeError
        If ``absmax`` is not a float32 array.
    ValueError
        If it is empty, not 1-D, not finite, or the block size is not positive.

    Notes
    -----
    ``v = absmax - offset`` (float32); per nested block ``c = max |v|``;
    ``code = nearest(DYNAMIC_MAP, v * float32(1 / c))`` (see Note: nested encoding rule).
    A nested block with ``c`` below 2^-128 (subnormal absmax) has an overflowing reciprocal: its
    nonzero ``v`` take the end entries, an error below ``2 c``, far below float32's normal range.

    Examples
    --------
    >>> a = np.array([1.0, 2.0, 3.0], np.float32)
    >>> nested = double_quantize(a)
    >>> float(nested.offset), nested.codes.tolist(), nested.absmax.tolist()
    (2.0, [0, 127, 255], [1.0])
    >>> dequantize_absmax(nested).tolist()
    [1.0070312023162842, 2.0, 3.0]
    """
    if not isinstance(absmax, np.ndarray) or absmax.dtype != np.float32:
        raise TypeError("absmax must be a float32 NumPy array")
    if absmax.ndim != 1 or absmax.size == 0:
        raise ValueError(f"absmax must be a non-empty 1-D array, got shape {absmax.shape}")
    if not np.all(np.isfinite(absmax)):
        raise ValueError("absmax contains NaN or Inf")
    if not isinstance(blocksize, (int, np.integer)) or blocksize <= 0:
        raise ValueError(f"nested blocksize must be a positive int, got {blocksize!r}")
    if offset is None:
        offset = np.float32(absmax.astype(np.float64).mean())
    offset = np.float32(offset)
    v = absmax - offset  # float32
    nested_absmax, scaled = _blockwise_scale(v, int(blocksize))
    codes = encode_nearest(scaled, DYNAMIC_MAP).astype(np.uint8)
    return NestedAbsmax(
        scheme="bnb", codes=codes, absmax=nested_absmax, codebook=DYNAMIC_MAP.copy(), offset=offset,
        blocksize=int(blocksize),
    )


def dequantize_absmax(nested: NestedAbsmax) -> np.ndarray:
    """Reconstruct the first-level absmax from its double-quantized form.

    Returns
    -------
    ndarray, shape (n_blocks,)
        bnb: float32 ``float32(code[q] * nested_absmax[i // 256]) + offset`` (two roundings, as
        bitsandbytes' dequantize does; fused GEMMs that use one FMA can differ by 1 ulp).
        torchao: the scalers in the input dtype (see ``qlora_ref.torchao_nf4``).

    Raises
    ------
    ValueError
        If the arrays do not fit together.
    """
    if nested.scheme == "torchao":
        return dequantize_scalers(nested)
    if nested.scheme != "bnb":
        raise ValueError(f"unknown double-quantization scheme {nested.scheme!r}")
    codes = np.asarray(nested.codes)
    n_nested = -(-codes.size // nested.blocksize)
    if nested.absmax.shape != (n_nested,):
        raise ValueError(
            f"nested absmax has shape {nested.absmax.shape}, expected ({n_nested},) for "
            f"{codes.size} codes in blocks of {nested.blocksize}"
        )
    if nested.codebook is None or nested.codebook.shape != (256,):
        raise ValueError("the nested code map must have 256 entries")
    table = nested.codebook.astype(np.float32)
    # One nested absmax per code, by index: O(n_blocks) whatever the nested block size says
    # (a repeated array would be sized by a header field; Note: sizes from the data).
    scale = nested.absmax.astype(np.float32)[np.arange(codes.size) // int(nested.blocksize)]
    with np.errstate(over="ignore"):  # a sum beyond float32's range is inf, as in bitsandbytes
        return (table[codes] * scale) + np.float32(nested.offset)
