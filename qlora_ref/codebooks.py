"""The 4-bit codebooks: NF4 (normative table and its derivation), bitsandbytes' FP4, uniform INT4.

A codebook is a sorted float32 array of 16 values in [-1, 1]; a 4-bit code is an index into it.
Quantization scales a block by its absmax and picks the nearest entry (``qlora_ref.blockwise``).

Fast pairs: ``qlora_gpu`` imports these tables as data (``NF4_CODEBOOK`` and friends); it never
calls the functions here.

Note: NF4 provenance
    The normative table is the float32 table that bitsandbytes hard-codes and every NF4 checkpoint
    was written with. ``normal_float_codebook`` derives it from standard-normal quantiles
    (QLoRA paper, section 3, "4-bit NormalFloat"); followed through the same float32 pipeline the
    derivation reproduces the table bit for bit, while a float64 pipeline with a single final
    cast lands a few ulp away (``tests/test_codebooks.py`` pins both facts).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "NF4_CODEBOOK",
    "FP4_CODEBOOK",
    "INT4_CODEBOOK",
    "NF4_OFFSET",
    "nf4_codebook",
    "fp4_codebook",
    "int4_codebook",
    "normal_float_offset",
    "normal_float_codebook",
    "codebook",
    "zero_code",
]

# The normative NF4 table as float32 bit patterns (bitsandbytes' hard-coded table; QLoRA
# appendix E lists the same values in decimal). Bits, not decimals, so nothing is re-rounded.
_NF4_BITS = np.array(
    [
        0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0,
        0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
        0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A,
        0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000,
    ],
    dtype=np.uint32,
)
NF4_CODEBOOK = _NF4_BITS.view(np.float32)
NF4_CODEBOOK.flags.writeable = False

#: The offset bitsandbytes passes to its construction, as the literal it writes.
NF4_OFFSET = 0.9677083

# bitsandbytes' FP4: bit 3 is the sign, the low three bits select a magnitude from this list
# (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2), and everything is divided by the
# largest magnitude, 12, in float32. Indexed by code, not sorted.
_FP4_MAGNITUDE_BY_LOW_BITS = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=np.float32)
FP4_CODEBOOK = np.concatenate(
    [_FP4_MAGNITUDE_BY_LOW_BITS, -_FP4_MAGNITUDE_BY_LOW_BITS]
) / np.float32(12.0)
# Code 8 is "negative zero" by its bits; bitsandbytes' Python table and CPU decoder give +0.0
# (its CUDA decoder gives -0.0). The oracle follows the CPU path so decodes compare bit for bit.
FP4_CODEBOOK[8] = np.float32(0.0)
FP4_CODEBOOK.flags.writeable = False

# Symmetric uniform INT4 for comparison: code c decodes to (c - 7) / 7, so codes 0..14 span
# [-1, 1] in 15 even steps with zero at code 7. Code 15 (-8 in two's complement, which symmetric
# absmax quantization leaves out) repeats 1.0 to keep the table sorted. The encoder emits it only
# for a scaled value above 1, which needs an overflowed or subnormal float32 reciprocal (absmax
# below 2^-128 or above 2^126); it decodes to 1.0 like code 14.
INT4_CODEBOOK = np.append(
    (np.arange(15, dtype=np.float32) - np.float32(7.0)) / np.float32(7.0), np.float32(1.0)
).astype(np.float32)
INT4_CODEBOOK.flags.writeable = False


def nf4_codebook() -> np.ndarray:
    """Return the normative NF4 codebook.

    Returns
    -------
    ndarray, shape (16,), float32
        Sorted values, 7 negative, an exact zero at code 7, 8 positive; ends exactly -1 and +1.

    Notes
    -----
    Bit-identical with the table in bitsandbytes (and so with every NF4 checkpoint). See
    ``normal_float_codebook`` for its derivation. Fast pair: ``qlora_gpu`` reads ``NF4_CODEBOOK``.

    Examples
    --------
    >>> cb = nf4_codebook()
    >>> cb.dtype, cb.shape, float(cb[0]), float(cb[7]), float(cb[15])
    (dtype('float32'), (16,), -1.0, 0.0, 1.0)
    """
    return NF4_CODEBOOK.copy()


def fp4_codebook() -> np.ndarray:
    """Return bitsandbytes' FP4 codebook, indexed by code (not sorted).

    Returns
    -------
    ndarray, shape (16,), float32
        ``table[c]`` is the value of code ``c``; codes 8..15 are the negatives of 0..7, and code 8
        decodes to +0.0 as on bitsandbytes' CPU path.

    Examples
    --------
    >>> cb = fp4_codebook()
    >>> [float(v) for v in cb[:4]]
    [0.0, 0.0052083334885537624, 0.6666666865348816, 1.0]
    """
    return FP4_CODEBOOK.copy()


def int4_codebook() -> np.ndarray:
    """Return the symmetric uniform INT4 codebook used for comparison.

    Returns
    -------
    ndarray, shape (16,), float32
        ``(c - 7) / 7`` for codes 0..14; code 15 repeats 1.0 (the encoder emits it only for a
        scaled value above 1, from a block whose float32 reciprocal overflows or is subnormal;
        it decodes like code 14).

    Examples
    --------
    >>> cb = int4_codebook()
    >>> float(cb[7]), float(cb[14]), float(cb[0])
    (0.0, 1.0, -1.0)
    """
    return INT4_CODEBOOK.copy()


def codebook(quant_type: str) -> np.ndarray:
    """Return the codebook for ``quant_type`` in ``{"nf4", "fp4", "int4"}``, indexed by code.

    Raises
    ------
    ValueError
        If the quant type is unknown.

    Examples
    --------
    >>> codebook("nf4")[15]
    np.float32(1.0)
    """
    tables = {"nf4": NF4_CODEBOOK, "fp4": FP4_CODEBOOK, "int4": INT4_CODEBOOK}
    if not isinstance(quant_type, str) or quant_type not in tables:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {sorted(tables)}")
    return tables[quant_type].copy()


def zero_code(quant_type: str) -> int:
    """Return the code whose value is 0.0: the pad nibble of an odd element count.

    Examples
    --------
    >>> zero_code("nf4"), zero_code("fp4"), zero_code("int4")
    (7, 0, 7)
    """
    return int(np.flatnonzero(codebook(quant_type) == 0.0)[0])


def normal_float_offset(bits: int) -> float:
    """Return the outermost quantile ``p`` used to build a ``bits``-bit NormalFloat table.

    Notes
    -----
    A k-bit table covers the normal distribution with quantiles, but the end quantiles
    ``Phi^-1(0)`` and ``Phi^-1(1)`` are infinite, so the outermost point is pulled in. The QLoRA
    construction (paper, section 3) uses an asymmetric table with ``2^k`` values: ``2^(k-1)``
    positive quantiles and ``2^(k-1) - 1`` negative ones plus zero. A symmetric table of ``n``
    equal-probability bins would put its outermost centre at ``1 - 1/(2n)``; the two halves
    count ``n = 2^k`` and ``n = 2^k - 1`` bins, and the offset is the mean of the two:

        offset = 1 - (1/(2 * 2^k) + 1/(2 * (2^k - 1))) / 2

    For k = 4 that is ``1 - (1/32 + 1/30) / 2 = 0.96770833...``, which bitsandbytes writes as
    the literal ``0.9677083``. This rule is this project's reconstruction: it reproduces the
    literal, but neither the paper nor bitsandbytes documents where the offset comes from
    (docs/nf4.md, "The offset"). For ``bits != 4`` it is this project's extension, not a
    published format.

    Examples
    --------
    >>> round(normal_float_offset(4), 7)
    0.9677083
    """
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    n = 2**bits
    return 1.0 - (1.0 / (2 * n) + 1.0 / (2 * (n - 1))) / 2.0


def linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``linspace`` as torch's CPU kernel computes it (the pipeline bitsandbytes uses).

    The step is ``(end - start) / (steps - 1)`` in float32; the first half is
    ``start + step * i`` and the second half ``end - step * (steps - 1 - i)``, each one fused
    multiply-add. The product of a float32 step and a small integer is exact in float64 and so is
    the sum here, so float64 arithmetic followed by one cast to float32 is that FMA's rounding.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step32 = np.float32((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    head = np.float64(start32) + np.float64(step32) * i
    tail = np.float64(end32) - np.float64(step32) * (steps - 1 - i)
    return np.where(i < steps // 2, head, tail).astype(np.float32)


def normal_float_codebook(bits: int = 4, offset: float | None = None, *, pipeline: str = "float32") -> np.ndarray:
    """Build a NormalFloat codebook from standard-normal quantiles.

    Parameters
    ----------
    bits : int
        Bits per code, 2 to 8; the table has ``2**bits`` values. Only 4 is a published format
        (NF4); other widths are this project's extension of the construction.
    offset : float, optional
        The outermost quantile probability; defaults to ``normal_float_offset(bits)``, except for
        4 bits where the default is bitsandbytes' literal ``NF4_OFFSET``.
    pipeline : {"float32", "float64"}
        ``"float32"`` follows bitsandbytes: float32 quantile points (torch's linspace), ``ppf`` in
        float64, values rounded to float32, then divided by the maximum in float32.
        ``"float64"`` computes everything in float64 and casts once at the end.

    Returns
    -------
    ndarray, shape (2**bits,), float32
        Sorted: ``2**(bits-1) - 1`` negative values, an exact 0, ``2**(bits-1)`` positive values,
        ends exactly -1 and +1.

    Raises
    ------
    ValueError
        If ``bits`` is out of range, ``offset`` is not in (0.5, 1) or the pipeline is unknown.

    Notes
    -----
    QLoRA section 3: ``q_i = (Phi^-1(p_i) + Phi^-1(p_{i+1}))/2`` estimated by quantiles of
    ``N(0, 1)`` at evenly spaced probabilities between ``offset`` and 0.5 for each half, then
    normalised into [-1, 1] by dividing by ``Phi^-1(offset)``.

    Examples
    --------
    >>> bool((normal_float_codebook(4) == nf4_codebook()).all())
    True
    >>> normal_float_codebook(2)
    array([-1.        ,  0.        ,  0.43581823,  1.        ], dtype=float32)
    """
    # Imported here, not at the top, so that ``import qlora_ref`` does not pay for SciPy (about
    # 0.1 s; scipy.stats, which the same quantile once came from, took 1.1 s). ndtri is the
    # standard-normal quantile function, the values scipy.stats.norm.ppf returns.
    from scipy.special import ndtri

    if pipeline not in ("float32", "float64"):
        raise ValueError(f"pipeline must be 'float32' or 'float64', got {pipeline!r}")
    if offset is None:
        offset = NF4_OFFSET if bits == 4 else normal_float_offset(bits)
    else:
        normal_float_offset(bits)  # validates bits
    if not 0.5 < float(offset) < 1.0:
        raise ValueError(f"offset must lie in (0.5, 1), got {offset}")
    half = 2 ** (bits - 1)
    if pipeline == "float32":
        p_pos = linspace_float32(offset, 0.5, half + 1)[:-1]  # (half,)
        p_neg = linspace_float32(offset, 0.5, half)[:-1]  # (half - 1,)
        values = np.concatenate(
            [ndtri(p_pos.astype(np.float64)), [0.0], -ndtri(p_neg.astype(np.float64))]
        ).astype(np.float32)
        values.sort()
        return (values / values.max()).astype(np.float32)
    p_pos = np.linspace(offset, 0.5, half + 1)[:-1]
    p_neg = np.linspace(offset, 0.5, half)[:-1]
    values = np.concatenate([ndtri(p_pos), [0.0], -ndtri(p_neg)])
    values.sort()
    return (values / values.max()).astype(np.float32)
