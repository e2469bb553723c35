"""Executable variants of the oracle's decoder: the rules other implementations really follow.

The "classified" tier (docs/tolerances.md) explains a difference only when a known alternative
rule, run by the oracle on the same input, reproduces the other implementation's bits exactly.
This module holds those rules for decoding, each a small NumPy function, and the *decoder
models* built from them: one model per code path of a real implementation, with that
implementation's own dispatch between its paths. A decoded tensor is explained by a model when
the model's output equals it bit for bit (NaN compares equal to NaN, whatever its payload), and
an implementation is explained when ONE model reproduces every tensor it decoded
(``qlora_ref.conformance.run``). Pairs with ``qlora_ref.blockwise.decode_4bit`` (the oracle's rule) and is
used by ``qlora_ref.conformance.classify.classify_decoded``.

Note: bitsandbytes CPU decode paths
    bitsandbytes 0.50 (``backends/cpu/ops.py``, ``dequantize_4bit``) picks one of three paths:

    1. A pure torch fallback when the last dimension is odd, or when the blocksize is at least
       2048 and torch reports the AVX-512 capability: the oracle's rule exactly, in float32,
       then cast (a 1-D shape stays 1-D).
    2. The native library's scalar loop: the oracle's values, except that FP4 code 8 is
       written as ``-(0 * absmax)``, -0.0 under a positive absmax (``fp4 negative zero``). Every even last dimension on a CPU without
       AVX-512; on an AVX-512 CPU, last dimensions that are not a multiple of 16.
    3. The native library's AVX-512 loop (the native library picks it by the CPU itself, no
       setting changes it), for last dimensions that are a multiple of 16. It views the tensor
       as ``(m, n)`` (a 1-D shape as ``(1, n)``, which is also the shape it returns) and

       - ``row-crossing absmax``: scales element ``(row, col)`` by
         ``absmax[row * (n // blocksize) + col // blocksize]`` instead of
         ``absmax[(row * n + col) // blocksize]``: wrong wherever a block crosses a row
         (``n`` not a multiple of the blocksize);
       - ``bf16 flush to zero``: into bfloat16 it converts with ``vcvtneps2bf16``, which
         flushes float32 subnormal products (magnitude below 2^-126) to zero of the same sign;
       - writes FP4 code 8 as +0.0, like the oracle.

    When torch reports less than AVX-512 on an AVX-512 CPU (``ATEN_CPU_CAPABILITY=avx2``),
    blocksizes of 2048 and more reach the AVX-512 loop too, with the same two rules: the model
    ``bitsandbytes cpu avx512, torch below avx512``.

    Measured on an AVX-512 + AVX512-BF16 CPU with bitsandbytes 0.50.2 on constructed inputs
    (with and without ``ATEN_CPU_CAPABILITY=avx2``); the scalar model is what the same version
    does on AVX2 CPUs (the behaviour this project's tests met there before these models).

Note: compiled torchao decode
    torchao's ``NF4Tensor.get_original_weight`` run eagerly rounds every step to the stored
    dtype D (``qlora_ref.torchao_nf4``, Note: torchao arithmetic): the oracle's rule exactly.
    Under ``torch.compile`` (inductor's C++ backend on CPU, by default, i.e.
    ``torch._inductor.config.emulate_precision_casts`` off) the whole decode is one fused kernel
    that keeps the intermediates in float32 and rounds once at the end:
    ``torchao_float32_intermediates``. For D = float32 the two agree; for bfloat16 and float16
    they differ in about a quarter of the values (on a (64, 256) normal weight: 3,972 and 4,229
    of 16,384, each by one unit of D). Measured with torch 2.13 and torchao 0.18 on CPU, with
    inductor's AVX-512, AVX2 and scalar kernels alike (the rule is per element, so the vector
    width cannot change it); with ``emulate_precision_casts`` on, the compiled decode equals the
    oracle. docs/findings.md has the reproduction.
"""

from __future__ import annotations

import numpy as np

from qlora_ref.blockwise import blockwise_absmax, decode_4bit, encode_4bit, pack_4bit, sorted_midpoints, unpack_4bit
from qlora_ref.codebooks import codebook, normal_float_codebook
from qlora_ref.double_quant import DYNAMIC_MAP
from qlora_ref.state import QuantState, numpy_dtype

__all__ = [
    "DECODE_MODELS",
    "DECODE_RULES",
    "ORACLE",
    "decode_model",
    "row_crossing_absmax",
    "flush_subnormals_to_zero",
    "fp4_negative_zero",
    "same_bits",
    "probe_decode_model",
    "ENCODE_MODELS",
    "encode_model",
    "reproduced_blocks",
    "ENCODE_DEFECTS",
    "DECODE_DEFECTS",
    "encode_defect",
    "decode_defect",
    "diagnose_codes",
    "diagnose_absmax",
    "diagnose_decoded",
    "lookup_table_nested_codes",
    "torchao_float32_intermediates",
]

#: The model that is the oracle itself.
ORACLE = "oracle"
#: The rules, by the class name under which their differences are counted.
DECODE_RULES = ("row-crossing absmax", "bf16 flush to zero", "fp4 negative zero")
#: The decoder models and the rules each may apply (Note: bitsandbytes CPU decode paths).
DECODE_MODELS = {
    ORACLE: (),
    "bitsandbytes cpu scalar": ("fp4 negative zero",),
    "bitsandbytes cpu avx512": DECODE_RULES,
    "bitsandbytes cpu avx512, torch below avx512": DECODE_RULES,
}
_VECTOR_WIDTH = 16  # float32 lanes of one AVX-512 register: the vector loop's condition
_FALLBACK_BLOCKSIZE = 2048  # from here on bitsandbytes' AVX-512 dispatch takes the torch fallback


def row_crossing_absmax(codes, absmax, shape, blocksize: int, table) -> np.ndarray:
    """Decode with bitsandbytes' AVX-512 absmax index ``row * (n // blocksize) + col // blocksize``.

    Parameters
    ----------
    codes : ndarray, n elements, uint8
    absmax : ndarray, shape (n_blocks,), float32
    shape : tuple of int
        Viewed as ``(m, n)`` with ``n = shape[-1]`` (a 1-D shape as ``(1, n)``).
    blocksize : int
    table : ndarray, shape (16,), float32

    Returns
    -------
    ndarray, shape (prod(shape),), float32

    Examples
    --------
    >>> y = row_crossing_absmax(np.full(4, 15, np.uint8), np.array([1, 2], np.float32), (2, 2), 3,
    ...                         codebook("nf4"))
    >>> y.tolist()   # the oracle gives [1, 1, 1, 2]: the second row starts in block 0
    [1.0, 1.0, 1.0, 1.0]
    """
    n = int(shape[-1]) if len(shape) else 1
    m = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    values = np.asarray(table, dtype=np.float32)[np.asarray(codes).reshape(m, n)]  # (m, n)
    block = np.arange(m)[:, None] * (n // blocksize) + np.arange(n)[None, :] // blocksize  # (m, n)
    with np.errstate(invalid="ignore"):
        return (values * np.asarray(absmax, dtype=np.float32)[block]).reshape(-1)


def flush_subnormals_to_zero(y32: np.ndarray) -> np.ndarray:
    """Replace float32 subnormals (0 < |y| < 2^-126) by a zero of the same sign.

    Examples
    --------
    >>> flush_subnormals_to_zero(np.array([1e-39, -1e-39, 1.0], np.float32)).tolist()
    [0.0, -0.0, 1.0]
    """
    y = np.array(y32, dtype=np.float32)
    small = np.abs(y) < np.finfo(np.float32).tiny
    y[small] = np.copysign(np.float32(0), y[small])
    return y


def fp4_negative_zero(y32: np.ndarray, codes) -> np.ndarray:
    """Decode FP4 code 8 (sign bit set, magnitude 0) as ``-(0 * absmax)``: the oracle's value negated.

    bitsandbytes' scalar loop applies the sign bit after the product, so code 8 is -0.0 under a
    positive absmax and +0.0 under a negative one (a double-quantized absmax can be negative).

    Examples
    --------
    >>> fp4_negative_zero(np.array([0.0, -0.0, 0.0], np.float32), np.array([8, 8, 0], np.uint8)).tolist()
    [-0.0, 0.0, 0.0]
    """
    y = np.array(y32, dtype=np.float32)
    eight = np.asarray(codes).reshape(-1) == 8
    y[eight] = -y[eight]
    return y


def decode_model(model: str, codes, absmax, shape, blocksize: int, quant_type: str, dtype) -> np.ndarray:
    """Decode as a model of ``DECODE_MODELS`` does, with that implementation's dispatch.

    Parameters
    ----------
    model : str
        A key of ``DECODE_MODELS``.
    codes : ndarray, n elements, uint8
    absmax : ndarray, shape (n_blocks,), float32
    shape : tuple of int
    blocksize : int
    quant_type : {"nf4", "fp4", "int4"}
    dtype : str or NumPy dtype
        The output dtype.

    Returns
    -------
    ndarray of ``shape`` and ``dtype``

    Raises
    ------
    KeyError
        If the model is unknown.

    Examples
    --------
    >>> codes, absmax = np.full(32, 15, np.uint8), np.array([1, 2], np.float32)
    >>> decode_model("bitsandbytes cpu avx512", codes, absmax, (2, 16), 24, "nf4", "float32")[1, 15]
    np.float32(1.0)
    >>> decode_model("oracle", codes, absmax, (2, 16), 24, "nf4", "float32")[1, 15]
    np.float32(2.0)
    """
    rules = DECODE_MODELS[model]
    shape = tuple(int(s) for s in shape)
    table = codebook(quant_type)
    codes = np.asarray(codes).reshape(-1)
    absmax = np.asarray(absmax, dtype=np.float32).reshape(-1)
    out = numpy_dtype(dtype)
    n = shape[-1] if shape else 1
    native = n % 2 == 0 and model != ORACLE
    if model == "bitsandbytes cpu avx512" and blocksize >= _FALLBACK_BLOCKSIZE:
        native = False
    vector = native and "row-crossing absmax" in rules and n % _VECTOR_WIDTH == 0
    if vector:
        y = row_crossing_absmax(codes, absmax, shape, blocksize, table)
        if out == numpy_dtype("bfloat16"):
            y = flush_subnormals_to_zero(y)
    else:
        y = decode_4bit(codes, absmax, blocksize, table)
        if native and quant_type == "fp4":
            y = fp4_negative_zero(y, codes)
    with np.errstate(over="ignore"):
        return y.astype(out).reshape(shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: the same bits, or both NaN (a NaN's payload and sign carry no value).

    Examples
    --------
    >>> a = np.array([np.nan, 0.0, 1.0], np.float32)
    >>> same_bits(a, np.array([-np.nan, -0.0, 1.0], np.float32)).tolist()
    [True, False, True]
    """
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    uint = np.dtype(f"u{a.dtype.itemsize}")
    equal = a.view(uint) == b.astype(a.dtype).view(uint)
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        equal |= np.isnan(a32) & np.isnan(b32)
    return equal


def probe_decode_model(dequantize) -> str | None:
    """Ask which decoder model an implementation's decode follows, on constructed FP4 states.

    The states reach every path of Note: bitsandbytes CPU decode paths: an even last
    dimension that is not a multiple of 16, one that is with blocks crossing rows, a 1-D
    shape, a blocksize of 2048, and float32-subnormal products, decoded into bfloat16 and
    float32.

    Parameters
    ----------
    dequantize : callable
        ``dequantize(packed, state, *, dtype) -> ndarray`` (the provider protocol).

    Returns
    -------
    str or None
        The first model of ``DECODE_MODELS`` that reproduces every decoded value, or None.

    Examples
    --------
    >>> from qlora_ref.api import dequantize_4bit
    >>> probe_decode_model(dequantize_4bit)
    'oracle'
    """

    rng = np.random.default_rng(0)
    candidates = list(DECODE_MODELS)
    for shape, blocksize in (((3, 34), 64), ((4, 48), 32), ((96,), 64), ((2, 3, 80), 64), ((2, 2080), 2048)):
        n = int(np.prod(shape))
        codes = rng.integers(0, 16, n).astype(np.uint8)
        n_blocks = -(-n // blocksize)
        # a normal first block, then absmax so small that most products are float32 subnormals
        absmax = np.concatenate([rng.uniform(0.5, 2, 1), rng.uniform(1e-37, 1e-36, n_blocks - 1)]).astype(np.float32)
        state = QuantState(shape=shape, dtype="float32", blocksize=blocksize, quant_type="fp4",
                           codebook=codebook("fp4"), absmax=absmax)
        packed = pack_4bit(codes, "fp4").reshape(-1, 1)
        for dtype in ("bfloat16", "float32"):
            y = np.asarray(dequantize(packed, state, dtype=dtype))
            candidates = [m for m in candidates
                          if same_bits(decode_model(m, codes, absmax, shape, blocksize, "fp4", dtype), y).all()]
    return candidates[0] if candidates else None


# ----------------------------------------------------------------------------- encoding

#: The encoder models and the rules each applies (Note: encoder models).
ENCODE_MODELS = {
    ORACLE: (),
    "bitsandbytes cpu": ("absmax clamp 1e-38", "partial block division"),
    "bitsandbytes cuda": ("all-zero block", "cuda fp4 thresholds", "approximate reciprocal"),
}
_CLAMP = np.float32(1e-38)
#: bitsandbytes' CUDA FP4 encoder compares |x| strictly against these decimal literals (as
#: float32) to pick the magnitude codes 0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011.
CUDA_FP4_THRESHOLDS = np.array(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], dtype=np.float32
)
_CUDA_FP4_MAGNITUDE_CODES = np.array([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], dtype=np.uint8)


def _nearest_codes(s: np.ndarray, quant_type: str) -> np.ndarray:
    """The oracle's rule on scaled float32 values: midpoints strictly below, ties to the lower entry."""

    midpoints, order = sorted_midpoints(codebook(quant_type))
    return order[np.searchsorted(midpoints, s, side="left")].astype(np.uint8)


def encode_model(model: str, x, blocksize: int, quant_type: str) -> tuple[list, np.ndarray]:
    """Encode as a model of ``ENCODE_MODELS`` does.

    Note: encoder models
        - ``oracle``: ``qlora_ref.blockwise`` (Note: quantization semantics).
        - ``bitsandbytes cpu`` (0.50, every CPU): the absmax is clamped to at least 1e-38
          before its reciprocal (``absmax clamp 1e-38``; the clamped value is also what a
          partial last block stores), and a partial last block is scaled by a float32
          division ``x / absmax`` (``partial block division``).
        - ``bitsandbytes cuda``: an all-zero block gets code 0 (``all-zero block``), FP4 is
          encoded by a tree of strict comparisons against truncated decimal thresholds with the
          sign from ``x < 0`` (``cuda fp4 thresholds``), and fast math may put the reciprocal
          one float32 ulp off (``approximate reciprocal``): each block may use the correct
          reciprocal or either neighbour, so the model has three candidates per block.

    Parameters
    ----------
    model : str
    x : ndarray, any shape, float32, float16 or bfloat16
    blocksize : int
    quant_type : {"nf4", "fp4", "int4"}

    Returns
    -------
    candidates : list of ndarray, each shape (n,), uint8
        A block is reproduced when the other implementation's codes of that block equal the
        block of ANY candidate (one candidate unless the model leaves a per-block choice).
    absmax : ndarray, shape (n_blocks,), float32
        The absmax the model stores.

    Examples
    --------
    >>> x = np.array([1e-39, -2e-39, 0.5], np.float32)     # a block of tiny values
    >>> [c.tolist() for c in encode_model("bitsandbytes cpu", x, 2, "nf4")[0]]   # scaled by 1/1e-38
    [[8, 5, 15]]
    >>> [c.tolist() for c in encode_model("oracle", x, 2, "nf4")[0]]   # 1/2e-39 overflows: end codes
    [[15, 0, 15]]
    """

    rules = ENCODE_MODELS[model]
    x32 = np.asarray(x).astype(np.float32).reshape(-1)
    n = x32.size
    absmax = blockwise_absmax(x32, blocksize)  # (n_blocks,)
    if model == ORACLE:
        return [encode_4bit(x32, absmax, blocksize, quant_type)], absmax
    block = np.arange(n) // blocksize  # (n,) block of each element
    a = absmax[block]
    zero = codebook(quant_type)
    zero_code = int(np.flatnonzero(zero == 0)[0])
    stored = absmax.copy()
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        if "absmax clamp 1e-38" in rules:
            clamped = np.maximum(a, _CLAMP)
            partial = block == n // blocksize  # elements of a partial last block (none if n % blocksize == 0)
            s = np.where(partial, x32 / clamped, x32 * (np.float32(1) / clamped))
            if n % blocksize:
                stored[-1] = max(stored[-1], _CLAMP)
            codes = _nearest_codes(s, quant_type)
            codes[x32 == 0] = zero_code
            return [codes], stored
        reciprocals = [np.float32(1) / a]
        if "approximate reciprocal" in rules:
            reciprocals += [np.nextafter(reciprocals[0], np.float32(np.inf)),
                            np.nextafter(reciprocals[0], np.float32(-np.inf))]
        candidates = []
        for r in reciprocals:
            s = x32 * r
            if "cuda fp4 thresholds" in rules and quant_type == "fp4":
                magnitude = _CUDA_FP4_MAGNITUDE_CODES[np.searchsorted(CUDA_FP4_THRESHOLDS, np.abs(s), side="left")]
                codes = magnitude | np.where(s < 0, np.uint8(8), np.uint8(0))
            else:
                codes = _nearest_codes(s, quant_type)
                codes[x32 == 0] = zero_code
            if "all-zero block" in rules:
                codes[a == 0] = 0
            candidates.append(codes.astype(np.uint8))
    return candidates, stored


def reproduced_blocks(model: str, x, other_codes, blocksize: int, quant_type: str) -> np.ndarray:
    """Per block: does the model reproduce the other implementation's codes of that block exactly?

    Returns
    -------
    ndarray, shape (n_blocks,), bool

    Examples
    --------
    >>> x = np.zeros(4, np.float32)
    >>> reproduced_blocks("bitsandbytes cuda", x, np.zeros(4, np.uint8), 2, "nf4").tolist()
    [True, True]
    """
    other = np.asarray(other_codes).reshape(-1)
    n = other.size
    n_blocks = -(-n // blocksize)
    ok = np.zeros(n_blocks, dtype=bool)
    pad = n_blocks * blocksize - n
    for codes in encode_model(model, x, blocksize, quant_type)[0]:
        same = np.concatenate([codes == other, np.ones(pad, dtype=bool)]).reshape(n_blocks, blocksize)
        ok |= same.all(axis=1)
    return ok


# ----------------------------------------------------------------------------- diagnoses
#
# Known DEFECTS: rules no real implementation follows, but that broken ones do. They never
# explain a difference; when one reproduces an unexplained tensor exactly, check names it.


def _table_defect(name: str, quant_type: str) -> np.ndarray | None:

    if name == "codebook rounded to 4 decimals":
        return np.round(codebook(quant_type).astype(np.float64), 4).astype(np.float32)
    if name == "NF4 codebook from a float64 pipeline" and quant_type == "nf4":
        return normal_float_codebook(4, pipeline="float64")
    return None


#: Encoder defects: name -> what goes wrong.
ENCODE_DEFECTS = {
    "ties to the upper code": "a value exactly on a midpoint takes the upper entry",
    "scaling by float32 division": "x / absmax instead of x * float32(1 / absmax)",
    "scaling in float64": "the float64 quotient x / absmax instead of float32 arithmetic",
    "NF4 codebook from a float64 pipeline": "NF4 values computed in float64 (off by up to a few ulp)",
    "codebook rounded to 4 decimals": "the codebook as printed in papers",
}
#: Decoder defects: name -> what goes wrong.
DECODE_DEFECTS = {
    "product rounded once from float64": "the float64 product rounded straight to the output dtype (no float32 step)",
    "bfloat16 by truncation": "float32 to bfloat16 by dropping the low 16 bits",
    "NF4 codebook from a float64 pipeline": "NF4 values computed in float64 (off by up to a few ulp)",
    "codebook rounded to 4 decimals": "the codebook as printed in papers",
}


def encode_defect(name: str, x, blocksize: int, quant_type: str) -> np.ndarray | None:
    """Codes as an encoder with the defect ``name`` of ``ENCODE_DEFECTS`` gives them (None if n/a).

    Examples
    --------
    >>> t = codebook("nf4")
    >>> x = np.array([(t[14] + t[15]) / np.float32(2), 1.0], np.float32)   # a midpoint, exactly
    >>> encode_defect("ties to the upper code", x, 64, "nf4").tolist(), encode_model("oracle", x, 64, "nf4")[0][0].tolist()
    ([15, 15], [14, 15])
    """

    x32 = np.asarray(x).astype(np.float32).reshape(-1)
    absmax = blockwise_absmax(x32, blocksize)
    a = absmax[np.arange(x32.size) // blocksize]
    table = _table_defect(name, quant_type)
    if name in ("NF4 codebook from a float64 pipeline", "codebook rounded to 4 decimals") and table is None:
        return None
    table = codebook(quant_type) if table is None else table
    midpoints, order = sorted_midpoints(table)
    side = "right" if name == "ties to the upper code" else "left"
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        if name == "scaling by float32 division":
            s = x32 / a
        elif name == "scaling in float64":
            s = x32.astype(np.float64) / a.astype(np.float64)
            midpoints = midpoints.astype(np.float64)
        else:
            s = x32 * (np.float32(1) / a)
        codes = order[np.searchsorted(midpoints, s, side=side)].astype(np.uint8)
    codes[x32 == 0] = int(np.flatnonzero(table == 0)[0])
    return codes


def diagnose_codes(x, other_codes, blocksize: int, quant_type: str) -> str | None:
    """Name the defect that reproduces unexplained codes exactly, if one does.

    Examples
    --------
    >>> x = np.array([0.0, 0.5, 1.0], np.float32)
    >>> diagnose_codes(x, np.array([0, 12, 15], np.uint8), 64, "nf4")
    'zeros encoded as code 0 (the zero code is 7)'
    """
    x32 = np.asarray(x).astype(np.float32).reshape(-1)
    other = np.asarray(other_codes).reshape(-1)
    for name, what in ENCODE_DEFECTS.items():
        codes = encode_defect(name, x32, blocksize, quant_type)
        if codes is not None and np.array_equal(codes, other):
            return f"codes follow the defect {name!r}: {what}"
    oracle = encode_model(ORACLE, x32, blocksize, quant_type)[0][0]
    differ = oracle != other
    zeros = x32 == 0
    if differ.any() and not (differ & ~zeros).any() and np.unique(other[zeros & differ]).size == 1:
        zero = int(np.flatnonzero(codebook(quant_type) == 0)[0])
        return f"zeros encoded as code {int(other[zeros & differ][0])} (the zero code is {zero})"
    return None


def diagnose_absmax(x, other_absmax, blocksize: int) -> str | None:
    """Name the defect that reproduces an unexplained absmax exactly, if one does.

    Examples
    --------
    >>> x = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    >>> diagnose_absmax(x, np.array([3.0, 4.0], np.float32), 2)
    'absmax over blocksize + 1 elements: an off-by-one block boundary'
    """
    x32 = np.abs(np.asarray(x).astype(np.float32).reshape(-1))
    other = np.asarray(other_absmax, dtype=np.float32).reshape(-1)
    starts = np.arange(other.size) * blocksize
    wide = np.array([x32[s:s + blocksize + 1].max(initial=0) for s in starts], dtype=np.float32)
    if same_bits(wide, other).all():
        return "absmax over blocksize + 1 elements: an off-by-one block boundary"
    return None


def decode_defect(name: str, codes, absmax, shape, blocksize: int, quant_type: str, dtype) -> np.ndarray | None:
    """Values as a decoder with the defect ``name`` of ``DECODE_DEFECTS`` gives them (None if n/a).

    Examples
    --------
    >>> y = decode_defect("bfloat16 by truncation", np.array([13], np.uint8), np.array([1.0], np.float32),
    ...                   (1,), 64, "nf4", "bfloat16")
    >>> float(y[0]), float(decode_model("oracle", np.array([13], np.uint8), np.array([1.0], np.float32),
    ...                                 (1,), 64, "nf4", "bfloat16")[0])
    (0.5625, 0.5625)
    """
    out = numpy_dtype(dtype)
    codes = np.asarray(codes).reshape(-1)
    absmax = np.asarray(absmax, dtype=np.float32).reshape(-1)
    table = _table_defect(name, quant_type)
    if name in ("NF4 codebook from a float64 pipeline", "codebook rounded to 4 decimals"):
        if table is None:
            return None
        return decode_4bit(codes, absmax, blocksize, table).astype(out).reshape(shape)
    block = np.arange(codes.size) // blocksize
    if name == "product rounded once from float64":
        y = codebook(quant_type).astype(np.float64)[codes] * absmax.astype(np.float64)[block]
        if out == np.float32 or out == np.float64:
            return None
        if out == numpy_dtype("bfloat16"):
            return None  # ml_dtypes rounds float64 to bfloat16 through float32: no second path
        with np.errstate(over="ignore"):
            return y.astype(out).reshape(shape)
    if name == "bfloat16 by truncation":
        if out != numpy_dtype("bfloat16"):
            return None
        y32 = decode_4bit(codes, absmax, blocksize, codebook(quant_type))
        return (y32.view(np.uint32) >> 16).astype(np.uint16).view(out).reshape(shape)
    raise KeyError(name)


def diagnose_decoded(codes, absmax, shape, blocksize: int, quant_type: str, dtype, other) -> str | None:
    """Name the decoder defect that reproduces unexplained decoded values exactly, if one does."""
    for name, what in DECODE_DEFECTS.items():
        y = decode_defect(name, codes, absmax, shape, blocksize, quant_type, dtype)
        if y is not None and same_bits(y, other).all():
            return f"decoded values follow the defect {name!r}: {what}"
    return None


# ----------------------------------------------------------------------------- nested codes

#: bitsandbytes 0.50's CPU lookup table for the nested 8-bit codes: 65536 cells over [-1, 1].
_LUT_STEPS = 65535


def lookup_table_nested_codes(values, blocksize: int = 256, codebook=None) -> np.ndarray:
    """Nested 8-bit codes as bitsandbytes 0.50's CPU path finds them: through a lookup table.

    ``s = values * float32(1 / c)`` with ``c`` the nested block's absmax; the cell is
    ``round(float32((s + 1) * 32767.5))`` (0 to 65535) and the table holds, per cell, the entry
    of the map nearest to the cell's point ``cell / 32767.5 - 1``. Reproduced bnb 0.50.2's
    nested codes exactly on 102,400 random values and on 300 hypothesis hard inputs (normal
    nested blocks); it differs from the exact nearest entry for about 0.3% of codes.

    Parameters
    ----------
    values : ndarray, shape (n,), float32
        ``absmax - offset``.
    blocksize : int
    codebook : ndarray, shape (256,), float32, optional
        The sorted map; default the signed dynamic map.

    Returns
    -------
    ndarray, shape (n,), uint8

    Examples
    --------
    >>> lookup_table_nested_codes(np.array([1.0, -0.5, 0.0], np.float32)).tolist()
    [255, 35, 131]
    """

    t = np.asarray(DYNAMIC_MAP if codebook is None else codebook, dtype=np.float64)
    lut = np.searchsorted((t[:-1] + t[1:]) / 2, np.arange(_LUT_STEPS + 1) / (_LUT_STEPS / 2.0) - 1.0, side="left")
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    n_nested = -(-v.size // blocksize)
    padded = np.zeros(n_nested * blocksize, np.float32)
    padded[: v.size] = np.abs(v)
    c = padded.reshape(n_nested, blocksize).max(axis=1)[np.arange(v.size) // blocksize]  # (n,)
    with np.errstate(all="ignore"):
        s = v * (np.float32(1) / c)
        cell = np.round(((s + np.float32(1)) * np.float32(_LUT_STEPS / 2.0)).astype(np.float64))
    cell = np.clip(np.where(np.isfinite(cell), cell, 0), 0, _LUT_STEPS).astype(np.int64)
    return lut[cell].astype(np.uint8)


def torchao_float32_intermediates(packed, state: QuantState, dtype) -> np.ndarray:
    """torchao's NF4 decode as ``torch.compile`` computes it: float32 throughout, one final rounding.

    The rule of Note: compiled torchao decode. The format (``qlora_ref.torchao_nf4``) rounds
    ``scaler = D(D(q / factor) + mean)`` and ``y = D(table[code] * scaler)`` step by step in the
    stored dtype D; this computes ``q / factor + mean`` and ``table[code] * scaler`` in float32,
    then rounds once to D and converts to ``dtype``. A named alternative rule for checking, not a
    format.

    Parameters
    ----------
    packed : ndarray, uint8, two codes per byte
    state : QuantState
        Of the ``"torchao"`` scheme (``quantize_torchao``).
    dtype : {"float32", "float16", "bfloat16"} or a NumPy dtype

    Returns
    -------
    ndarray, ``state.shape``, ``dtype``

    Examples
    --------
    >>> from qlora_ref.api import dequantize_4bit
    >>> from qlora_ref.torchao_nf4 import quantize_torchao
    >>> x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float16)
    >>> packed, state = quantize_torchao(x)
    >>> other = torchao_float32_intermediates(packed, state, "float16")
    >>> 0 < int(np.sum(other != dequantize_4bit(packed, state, dtype="float16"))) < x.size // 2
    True
    """
    nested = state.nested
    if nested is None or nested.scheme != "torchao":
        raise ValueError("the compiled torchao rule decodes states of the 'torchao' scheme only")
    codes = unpack_4bit(np.asarray(packed).reshape(-1), state.numel).astype(np.int64)  # (n,)
    q = np.asarray(nested.codes).astype(np.float32).reshape(-1, nested.blocksize)  # (n_nested, scaler blocksize)
    factor = np.asarray(nested.absmax).astype(np.float32)  # (n_nested,)
    scaler = (q / factor[:, None]).reshape(-1) + np.asarray(nested.offset).astype(np.float32)  # (n_blocks,)
    table = np.asarray(state.codebook).astype(np.float32)
    y = (table[codes].reshape(-1, state.blocksize) * scaler[:, None]).reshape(state.shape)  # float32
    return y.astype(numpy_dtype(state.dtype)).astype(numpy_dtype(dtype))
