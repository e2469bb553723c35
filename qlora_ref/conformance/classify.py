"""Name every difference between the oracle's 4-bit state and another implementation's.

The "classified" tolerance tier (docs/tolerances.md): a difference is explained only when an
executable variant of the oracle, a known rule of a real implementation run on the same input,
reproduces the other implementation's bits exactly. The variants are grouped into *models*
(``qlora_ref.conformance.variants``: one per real implementation and path, e.g. bitsandbytes' CPU encoder,
its AVX-512 decoder); a tensor of codes or decoded values is explained when ONE model reproduces
all of it, and ``qlora-ref check`` then asks that one model explain every tensor of an
implementation. Differences are counted under the rule of the model that decides them; anything
no model reproduces is ``"unclassified"`` (a bug in one of the two). NumPy only.

Used by the conformance tests against bitsandbytes and by ``qlora-ref check``; pairs with
``qlora_ref.blockwise`` and ``qlora_ref.double_quant`` (the rules the oracle itself follows).

Note: difference classes
    4-bit codes and absmax (``classify_codes``, ``classify_absmax``), the rules of the encoder
    models (``qlora_ref.conformance.variants``, Note: encoder models):

    - ``absmax clamp 1e-38`` and ``partial block division``: bitsandbytes' CPU encoder scales
      by ``max(absmax, 1e-38)`` (and stores that clamped value for a partial last block), and
      divides in a partial last block instead of multiplying by the reciprocal.
    - ``all-zero block``, ``cuda fp4 thresholds``, ``approximate reciprocal``: bitsandbytes'
      CUDA encoder writes code 0 in all-zero blocks, encodes FP4 by decimal thresholds, and its
      fast-math reciprocal may be one ulp off in a block.

    No model rounds ties upward or pads the odd nibble with anything but the zero code: such
    differences are unexplained.

    Nested absmax codes (``classify_nested_codes``):

    - ``all-zero nested block``: the nested block's absmax is 0, every code decodes to 0.
    - ``subnormal nested absmax``: the nested block's absmax is a float32 subnormal (below
      2^-126), where the two sides' arithmetic parts ways (the oracle's reciprocal overflows
      below 2^-128; bitsandbytes' C++ path divides, and may flush subnormals). Every code then
      decodes to within ``2 * absmax < 2^-125`` of any other, far below float32's normal range.
    - ``tie on a midpoint``: the scaled value is exactly a midpoint of the dynamic map and the
      other implementation took the upper entry (bitsandbytes' CUDA binary search lets exact
      float32 ties go either way).
    - ``approximate lookup table``: the code bitsandbytes 0.50's CPU path finds through its
      65536-cell lookup table (``variants.lookup_table_nested_codes``, run on the same values),
      a neighbour of the exact nearest entry for a fraction of a percent of codes.

    The offset (``classify_offset``): ``offset ulp``, a float32 mean within
    ``offset_tolerance_ulp(n)`` ulps of the correctly rounded one (the rounding of a float32
    tree sum: torch's reduction order differs from the oracle's exact mean), and ``offset sum overflow``, an infinite offset from a float32
    sum that overflowed (bitsandbytes then stores a broken state; the oracle's mean is finite).

    Decoded values (``classify_decoded``) are explained by whole decoder models, not per
    element: a model of ``qlora_ref.conformance.variants`` (bitsandbytes' scalar or AVX-512 CPU decode, with
    its dispatch) must reproduce every value of the tensor. Its rules name the differences:
    ``fp4 negative zero`` (FP4 code 8 decoded as -0.0: bitsandbytes' scalar C++ loop, and its
    CUDA kernel), ``row-crossing absmax`` and ``bf16 flush to zero`` (its AVX-512 loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qlora_ref.blockwise import blockwise_absmax, unpack_4bit
from qlora_ref.codebooks import codebook
from qlora_ref.conformance.variants import (
    CUDA_FP4_THRESHOLDS,
    DECODE_MODELS,
    ENCODE_MODELS,
    ORACLE,
    decode_model,
    diagnose_absmax,
    diagnose_codes,
    diagnose_decoded,
    encode_model,
    fp4_negative_zero,
    lookup_table_nested_codes,
    reproduced_blocks,
    same_bits,
)
from qlora_ref.double_quant import DYNAMIC_MAP

__all__ = [
    "Differences",
    "UNCLASSIFIED",
    "CUDA_FP4_THRESHOLDS",
    "LUT_CELL",
    "classify_codes",
    "classify_packed",
    "classify_absmax",
    "classify_nested_codes",
    "classify_offset",
    "classify_decoded",
    "offset_tolerance_ulp",
]

UNCLASSIFIED = "unclassified"
#: Resolution of bitsandbytes' CPU lookup table for the nested 8-bit codes: [-1, 1] in 65536 cells.
LUT_CELL = 2.0 / 65536
_CLAMP = np.float32(1e-38)


@dataclass(frozen=True)
class Differences:
    """The differing positions of one comparison and the class of each.

    Attributes
    ----------
    what : str
        What was compared ("codes", "absmax", "nested codes", ...).
    compared : int
        Number of elements compared.
    index : ndarray, shape (k,), int64
        Flat positions that differ.
    classes : ndarray, shape (k,), str
        The class of each difference (``UNCLASSIFIED`` when no rule explains it).
    models : tuple of str or None
        For comparisons explained by whole models (codes, absmax, decoded values): the models of
        ``qlora_ref.conformance.variants`` that reproduce the other implementation's values exactly.
    diagnosis : str or None
        For unexplained differences: the known defect (``qlora_ref.conformance.variants``) that reproduces
        them exactly, when one does.
    """

    what: str
    compared: int
    index: np.ndarray
    classes: np.ndarray
    models: tuple | None = None
    diagnosis: str | None = None

    def counts(self) -> dict:
        """Return ``{class: number of differences}``, classes sorted by name."""
        names, n = np.unique(self.classes.astype(str), return_counts=True)
        return {str(k): int(v) for k, v in zip(names, n)}

    @property
    def unclassified(self) -> int:
        """Number of differences that no class explains."""
        return int(np.sum(self.classes == UNCLASSIFIED))

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {v}" for k, v in self.counts().items()) or "none"
        return f"{self.what}: {self.index.size} of {self.compared} differ ({parts})"


def _result(what, compared, index, classes, models=None, diagnosis=None) -> Differences:
    return Differences(what, int(compared), np.asarray(index, dtype=np.int64),
                       np.asarray(classes, dtype=object).astype(str) if len(classes) else np.array([], dtype=str),
                       models=models, diagnosis=diagnosis)


def classify_codes(x, codes, other_codes, *, blocksize: int, quant_type: str = "nf4", models=None) -> Differences:
    """Explain where another implementation's 4-bit codes differ from the oracle's, by models.

    The codes are explained only when one encoder model of ``qlora_ref.conformance.variants`` (a real
    implementation's rules, Note: encoder models) run on the same input reproduces every block
    of ``other_codes`` exactly; each differing code is then counted under the rule of that
    model that decides it. Otherwise every difference is ``"unclassified"``.

    Parameters
    ----------
    x : ndarray, any shape, float32, float16 or bfloat16
        The quantized input.
    codes, other_codes : ndarray, shape (n,), uint8
        The oracle's codes (``quantize.encode_4bit``) and the other implementation's, unpacked.
    blocksize : int
    quant_type : {"nf4", "fp4", "int4"}
    models : sequence of str, optional
        The models to try; default all of ``qlora_ref.conformance.variants.ENCODE_MODELS``.

    Returns
    -------
    Differences
        ``what="codes"``; ``models`` lists the models that reproduce ``other_codes``.

    Raises
    ------
    ValueError
        If the arrays do not have ``x.size`` elements.

    Examples
    --------
    >>> x = np.array([0.0, 0.0, 1.0, 0.5], np.float32)
    >>> codes = np.array([7, 7, 15, 12], np.uint8)      # the oracle: zero code in a zero block
    >>> other = np.array([0, 0, 15, 12], np.uint8)      # CUDA: code 0 there
    >>> d = classify_codes(x, codes, other, blocksize=2)
    >>> str(d), d.models
    ('codes: 2 of 4 differ (all-zero block: 2)', ('bitsandbytes cuda',))
    """

    x32 = np.asarray(x).astype(np.float32).reshape(-1)
    codes = np.asarray(codes).reshape(-1)
    other = np.asarray(other_codes).reshape(-1)
    if codes.size != x32.size or other.size != x32.size:
        raise ValueError(f"codes have {codes.size} and {other.size} elements, x has {x32.size}")
    index = np.flatnonzero(codes != other)
    reproducing = []
    for model in (ENCODE_MODELS if models is None else models):
        if model == ORACLE:
            if index.size == 0:
                reproducing.append(model)
        elif reproduced_blocks(model, x32, other, blocksize, quant_type).all():
            reproducing.append(model)
    classes = np.full(index.size, UNCLASSIFIED, dtype=object)
    if reproducing:
        rules = ENCODE_MODELS[reproducing[0]]
        absmax = blockwise_absmax(x32, blocksize)[index // blocksize]  # (k,) float32, per difference
        partial = (x32.size % blocksize != 0) & (index >= (x32.size // blocksize) * blocksize)
        for rule, where in (("approximate reciprocal", True), ("cuda fp4 thresholds", quant_type == "fp4"),
                            ("partial block division", partial), ("absmax clamp 1e-38", absmax < _CLAMP),
                            ("all-zero block", absmax == 0)):
            if rule in rules:  # later rules are the narrower ones and win
                classes[np.broadcast_to(where, index.shape)] = rule
    diagnosis = None
    if index.size and not reproducing:

        diagnosis = diagnose_codes(x32, other, blocksize, quant_type)
    return _result("codes", x32.size, index, classes, models=tuple(reproducing), diagnosis=diagnosis)


def classify_packed(x, packed, other_packed, *, blocksize: int, quant_type: str = "nf4") -> Differences:
    """Classify differences between two packed byte arrays of the same input.

    The codes are unpacked and explained by ``classify_codes``; for an odd element count a
    differing pad nibble (the low nibble of the last byte, the zero code in the format and in
    every implementation known) is an unexplained difference at position ``n``.

    Examples
    --------
    >>> x = np.array([1.0, -1.0, 0.5], np.float32)
    >>> str(classify_packed(x, np.array([[0xF0], [0xC7]], np.uint8), np.array([[0xF0], [0xC0]], np.uint8),
    ...                     blocksize=64))
    'codes: 1 of 3 differ (unclassified: 1)'
    """
    n = int(np.asarray(x).size)
    a = np.asarray(packed, dtype=np.uint8).reshape(-1)
    b = np.asarray(other_packed, dtype=np.uint8).reshape(-1)
    if a.size != (n + 1) // 2 or b.size != (n + 1) // 2:
        raise ValueError(f"packed arrays hold {a.size} and {b.size} bytes, {n} elements need {(n + 1) // 2}")
    result = classify_codes(x, unpack_4bit(a, n), unpack_4bit(b, n), blocksize=blocksize, quant_type=quant_type)
    if n % 2 and (a[-1] & 0x0F) != (b[-1] & 0x0F):
        zero = int(np.flatnonzero(codebook(quant_type) == 0)[0])
        return _result(result.what, n, np.append(result.index, n), list(result.classes) + [UNCLASSIFIED],
                       models=(), diagnosis=result.diagnosis if result.index.size else
                       f"the pad nibble of an odd count is {b[-1] & 0x0F}, the zero code is {zero}")
    return result


def classify_absmax(x, absmax, other_absmax, *, blocksize: int) -> Differences:
    """Explain where another implementation's float32 absmax differs from the oracle's, by models.

    Explained when an encoder model of ``qlora_ref.conformance.variants`` stores exactly ``other_absmax``
    (bitsandbytes' CPU path stores the clamped 1e-38 for a partial last block).

    Examples
    --------
    >>> x = np.array([1.0, 2.0, 1e-39], np.float32)   # a partial last block with a tiny absmax
    >>> ours = np.array([2.0, 1e-39], np.float32)
    >>> d = classify_absmax(x, ours, np.array([2.0, 1e-38], np.float32), blocksize=2)
    >>> str(d), d.models
    ('absmax: 1 of 2 differ (absmax clamp 1e-38: 1)', ('bitsandbytes cpu',))
    """

    a = np.asarray(absmax, dtype=np.float32).reshape(-1)
    b = np.asarray(other_absmax, dtype=np.float32).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"absmax shapes differ: {a.shape} and {b.shape}")
    index = np.flatnonzero(~same_bits(a, b))
    reproducing = [m for m in ENCODE_MODELS if same_bits(encode_model(m, x, blocksize, "nf4")[1], b).all()]
    name = "absmax clamp 1e-38" if reproducing else UNCLASSIFIED
    diagnosis = None
    if index.size and not reproducing:

        diagnosis = diagnose_absmax(x, b, blocksize)
    return _result("absmax", a.size, index, [name] * index.size, models=tuple(reproducing), diagnosis=diagnosis)


def classify_nested_codes(values, codes, other_codes, *, blocksize: int = 256, codebook=None) -> Differences:
    """Classify where another implementation's nested (8-bit) absmax codes differ from the oracle's.

    Parameters
    ----------
    values : ndarray, shape (n_blocks,), float32
        ``absmax - offset`` with the offset both sides used (pass the other's offset to the
        oracle's ``double_quantize`` first, so that only the encoding differs).
    codes, other_codes : ndarray, shape (n_blocks,), uint8
    blocksize : int
        Constants per nested block.
    codebook : ndarray, shape (256,), float32, optional
        The map the codes index; default the dynamic map.

    Examples
    --------
    >>> from qlora_ref.double_quant import DYNAMIC_MAP
    >>> mid = (np.float64(DYNAMIC_MAP[200]) + np.float64(DYNAMIC_MAP[201])) / 2
    >>> v = np.array([1.0, np.float32(mid + 1e-6)], np.float32)
    >>> str(classify_nested_codes(v, np.array([255, 201], np.uint8), np.array([255, 200], np.uint8)))
    'nested codes: 1 of 2 differ (approximate lookup table: 1)'
    """
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    a = np.asarray(codes).reshape(-1).astype(np.int64)
    b = np.asarray(other_codes).reshape(-1).astype(np.int64)
    t = np.asarray(DYNAMIC_MAP if codebook is None else codebook, dtype=np.float64)
    index = np.flatnonzero(a != b)
    n_nested = -(-v.size // blocksize)
    padded = np.zeros(n_nested * blocksize, dtype=np.float64)
    padded[: v.size] = np.abs(v)
    c = padded.reshape(n_nested, blocksize).max(axis=1)[index // blocksize]  # nested absmax
    ai, bi = a[index], b[index]
    midpoint = (t[np.minimum(ai, bi)] + t[np.maximum(ai, bi)]) / 2.0
    classes = np.full(index.size, UNCLASSIFIED, dtype=object)
    classes[c == 0] = "all-zero nested block"
    classes[(c > 0) & (c < float(np.finfo(np.float32).tiny))] = "subnormal nested absmax"
    rest = classes == UNCLASSIFIED
    adjacent = np.abs(ai - bi) == 1
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled32 = (v[index] * (np.float32(1) / c.astype(np.float32))).astype(np.float64)  # the oracle's s
    classes[rest & adjacent & (scaled32 == midpoint) & (bi > ai)] = "tie on a midpoint"
    rest = classes == UNCLASSIFIED
    if codebook is None:  # bitsandbytes' CPU lookup table, run on the same values (qlora_ref.conformance.variants)

        lut = lookup_table_nested_codes(v, blocksize)[index].astype(np.int64)
        classes[rest & (lut == bi)] = "approximate lookup table"
    return _result("nested codes", v.size, index, classes)


def offset_tolerance_ulp(n_blocks: int) -> int:
    """Float32 ulps an offset (a float32 mean of ``n_blocks`` absmax) may sit from the oracle's.

    A pairwise (tree) float32 sum of n non-negative values is within ``ceil(log2 n) * u * sum``
    of the exact sum (Higham, "Accuracy and Stability of Numerical Algorithms", section 4.2,
    ``u = 2**-24``); ``u * mean`` is below one ulp of the mean, so the sum's error is at most
    ``ceil(log2 n)`` ulps of the mean, plus half an ulp for the division and half for the
    oracle's own rounding (its float64 sum's error is far below a float32 ulp). torch's float32 ``mean`` (bitsandbytes' offset,
    torchao's scaler mean) reduces in such a tree: measured at most 2 ulps from the correctly
    rounded mean for 3 to 4,000,000 values (standard-normal and uniform absmax).

    Examples
    --------
    >>> offset_tolerance_ulp(1), offset_tolerance_ulp(8192)
    (1, 14)
    """
    return int(np.ceil(np.log2(max(int(n_blocks), 1)))) + 1


def _ulps_apart(a: np.float32, b: np.float32) -> int:
    """Distance in float32 steps between two finite float32 values (across zero too)."""
    ia, ib = (int(np.float32(v).view(np.int32)) for v in (a, b))
    ia, ib = (i if i >= 0 else -(i & 0x7FFFFFFF) for i in (ia, ib))
    return abs(ia - ib)


def classify_offset(absmax, offset, other_offset) -> Differences:
    """Classify a differing float32 double-quantization offset (the mean of the absmax).

    Parameters
    ----------
    absmax : ndarray, shape (n_blocks,), float32
        The first-level absmax both offsets are the mean of.
    offset, other_offset : float32 scalars
        The oracle's (the float64 mean rounded to float32: correctly rounded unless the float64
        sum itself rounds, as for ``[2**60, 2**36, 254 x 1.0]``) and the other implementation's.

    Returns
    -------
    Differences
        ``what="offset"``, one element; the class is ``offset ulp`` when the other offset is
        within ``offset_tolerance_ulp(n_blocks)`` float32 ulps of the oracle's (a float32 tree
        reduction's rounding), ``offset sum overflow`` when it is infinite because the float32
        sum overflowed (the exact sum exceeds the float32 maximum); otherwise unexplained, with
        a diagnosis when it is the sum divided by ``n + 1`` or ``n - 1``.

    Examples
    --------
    >>> a = np.array([1.0, 2.0, 4.5], np.float32)
    >>> str(classify_offset(a, np.float32(2.5), np.nextafter(np.float32(2.5), np.float32(3))))
    'offset: 1 of 1 differ (offset ulp: 1)'
    >>> classify_offset(a, np.float32(2.5), np.float32(7.5 / 4)).diagnosis
    'the offset is the sum divided by n + 1'
    """
    a = np.asarray(absmax, dtype=np.float32).reshape(-1).astype(np.float64)
    ours = np.float32(offset)
    other = np.float32(other_offset)
    if ours.view(np.uint32) == other.view(np.uint32):
        return _result("offset", 1, [], [])
    total = float(np.abs(a).sum())
    if not np.isfinite(other):
        overflow = total > float(np.finfo(np.float32).max)
        return _result("offset", 1, [0], ["offset sum overflow" if overflow else UNCLASSIFIED])
    diagnosis = None
    for k, label in ((1, "n + 1"), (-1, "n - 1")):
        if a.size + k > 0 and np.float32(total / (a.size + k)).view(np.uint32) == other.view(np.uint32):
            diagnosis = f"the offset is the sum divided by {label}"
    if diagnosis is None and np.isfinite(ours) and _ulps_apart(ours, other) <= offset_tolerance_ulp(a.size):
        return _result("offset", 1, [0], ["offset ulp"])
    result = _result("offset", 1, [0], [UNCLASSIFIED])
    return Differences(result.what, result.compared, result.index, result.classes, diagnosis=diagnosis)


def classify_decoded(codes, y, other_y, *, quant_type: str = "nf4", absmax=None, blocksize=None,
                     models=None) -> Differences:
    """Explain where another implementation's decoded values differ from the oracle's, by models.

    The differences are explained only when a decoder model of ``qlora_ref.conformance.variants`` (a real
    implementation's rules with its own dispatch, Note: bitsandbytes CPU decode paths), run on
    the same codes and absmax, reproduces ``other_y`` bit for bit; each differing value is then
    counted under the rule of that model that changed it. NaN equals NaN whatever its payload.

    Parameters
    ----------
    codes : ndarray, shape (n,), uint8
        The codes both decoded.
    y, other_y : ndarray, n elements, the same float dtype
        The oracle's values (in the state's shape: the models' dispatch reads it) and the other's.
    quant_type : {"nf4", "fp4", "int4"}
    absmax : ndarray, shape (n_blocks,), float32, optional
        The absmax both decoded with; without it only the rules that need no absmax are tried.
    blocksize : int, optional
        Needed with ``absmax``.
    models : sequence of str, optional
        The models to try; default all of ``qlora_ref.conformance.variants.DECODE_MODELS``.

    Returns
    -------
    Differences
        ``what="decoded"``; ``models`` lists the models that reproduce ``other_y`` exactly
        (``"oracle"`` among them when nothing differs).

    Examples
    --------
    >>> y = np.array([0.0, 1.0], np.float32)
    >>> d = classify_decoded(np.array([8, 3], np.uint8), y, np.array([-0.0, 1.0], np.float32), quant_type="fp4")
    >>> str(d), d.models
    ('decoded: 1 of 2 differ (fp4 negative zero: 1)', ('bitsandbytes cpu scalar',))
    """

    y = np.asarray(y)
    other = np.asarray(other_y).reshape(-1)
    if y.dtype != other.dtype or y.size != other.size:
        raise ValueError(f"decoded arrays differ in dtype or size: {y.dtype}/{y.size} and {other.dtype}/{other.size}")
    c = np.asarray(codes).reshape(-1)
    index = np.flatnonzero(~same_bits(y, other))
    reproducing = []
    for model in (DECODE_MODELS if models is None else models):
        if model == ORACLE:
            candidate = y
        elif absmax is not None:
            candidate = decode_model(model, c, absmax, y.shape, int(blocksize), quant_type, y.dtype)
        elif DECODE_MODELS[model] == ("fp4 negative zero",):  # the one rule that needs no absmax
            native = (y.shape[-1] if y.ndim else 1) % 2 == 0 and quant_type == "fp4"
            candidate = fp4_negative_zero(y.astype(np.float32), c).astype(y.dtype) if native else y
        else:
            continue
        if same_bits(candidate, other).all():
            reproducing.append(model)
    classes = np.full(index.size, UNCLASSIFIED, dtype=object)
    if reproducing and index.size:
        a, b = y.reshape(-1)[index].astype(np.float32), other[index].astype(np.float32)
        both_zero = (a == 0) & (b == 0)
        classes[:] = "row-crossing absmax"
        classes[(np.abs(a) < np.finfo(np.float32).tiny) & (b == 0)] = "bf16 flush to zero"
        if quant_type == "fp4":
            classes[both_zero & (c[index] == 8)] = "fp4 negative zero"
    diagnosis = None
    if index.size and not reproducing and absmax is not None:

        diagnosis = diagnose_decoded(c, absmax, y.shape, int(blocksize), quant_type, y.dtype, other)
    return Differences("decoded", y.size, index, classes.astype(str) if index.size else np.array([], dtype=str),
                       models=tuple(reproducing), diagnosis=diagnosis)
