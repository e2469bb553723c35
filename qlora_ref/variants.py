"""Executable variants of the oracle's decoder: the rules other implementations really follow.

The "classified" tier (docs/tolerances.md) explains a difference only when a known alternative
rule, run by the oracle on the same input, reproduces the other implementation's bits exactly.
This module holds those rules for decoding, each a small NumPy function, and the *decoder
models* built from them: one model per code path of a real implementation, with that
implementation's own dispatch between its paths. A decoded tensor is explained by a model when
the model's output equals it bit for bit (NaN compares equal to NaN, whatever its payload), and
an implementation is explained when ONE model reproduces every tensor it decoded
(``qlora_ref.check``). Pairs with ``qlora_ref.quantize.decode_4bit`` (the oracle's rule) and is
used by ``qlora_ref.classify.classify_decoded``.

Note: bitsandbytes CPU decode paths
    bitsandbytes 0.50 (``backends/cpu/ops.py``, ``dequantize_4bit``) picks one of three paths:

    1. A pure torch fallback when the last dimension is odd, or when the blocksize is at least
       2048 and torch reports the AVX-512 capability: the oracle's rule exactly, in float32,
       then cast (a 1-D shape stays 1-D).
    2. The native library's scalar loop: the oracle's values, except that FP4 code 8 is
       written as -0.0 (``fp4 negative zero``). Every even last dimension on a CPU without
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

    Measured on an AVX-512 + AVX512-BF16 CPU with bitsandbytes 0.50.2 on constructed inputs;
    the scalar model is what the same version does on AVX2 CPUs.
"""

from __future__ import annotations

import numpy as np

from qlora_ref.codebooks import codebook
from qlora_ref.quantize import decode_4bit
from qlora_ref.state import numpy_dtype

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
    """Write FP4 code 8 (sign bit set, magnitude 0) as -0.0.

    Examples
    --------
    >>> fp4_negative_zero(np.zeros(2, np.float32), np.array([8, 0], np.uint8)).tolist()
    [-0.0, 0.0]
    """
    y = np.array(y32, dtype=np.float32)
    y[np.asarray(codes).reshape(-1) == 8] = np.float32(-0.0)
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
    shape, and float32-subnormal products, decoded into bfloat16 and float32.

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
    >>> from qlora_ref.quantize import dequantize_4bit
    >>> probe_decode_model(dequantize_4bit)
    'oracle'
    """
    from qlora_ref.quantize import pack_4bit
    from qlora_ref.state import QuantState

    rng = np.random.default_rng(0)
    candidates = list(DECODE_MODELS)
    for shape, blocksize in (((3, 34), 64), ((4, 48), 32), ((96,), 64), ((2, 3, 80), 64)):
        n = int(np.prod(shape))
        codes = rng.integers(0, 16, n).astype(np.uint8)
        n_blocks = -(-n // blocksize)
        # a normal first block, then absmax so small that most products are float32 subnormals
        absmax = np.concatenate([rng.uniform(0.5, 2, 1), rng.uniform(1e-37, 1e-36, n_blocks - 1)]).astype(np.float32)
        state = QuantState(shape=shape, dtype="float32", blocksize=blocksize, quant_type="fp4",
                           code=codebook("fp4"), absmax=absmax)
        packed = pack_4bit(codes, "fp4").reshape(-1, 1)
        for dtype in ("bfloat16", "float32"):
            y = np.asarray(dequantize(packed, state, dtype=dtype))
            candidates = [m for m in candidates
                          if same_bits(decode_model(m, codes, absmax, shape, blocksize, "fp4", dtype), y).all()]
    return candidates[0] if candidates else None
