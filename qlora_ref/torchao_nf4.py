"""torchao's NF4 format (``NF4Tensor``, used by torchtune's QLoRA), reproduced bit for bit.

This is the ``"torchao"`` double-quantization scheme of ``qlora_ref.blockwise``: the whole format
differs from bitsandbytes', not only the nested level (docs/spec.md, section 6).
Pairs with ``qlora_ref.blockwise`` (``quantize_4bit(..., double_quant="torchao")`` and
``dequantize_4bit`` dispatch here) and ``qlora_ref.double_quant`` (bitsandbytes' scheme).
Comparator: ``torchao.quantization.quantize_.workflows.nf4.nf4_tensor.to_nf4`` (tests only).

Note: torchao arithmetic
    torchao keeps every intermediate in the input dtype D (float32, float16 or bfloat16), and
    torch evaluates each float16/bfloat16 operation in float32 and rounds the result once to D.
    The oracle does exactly that, one operation at a time (``_op``), so each step rounds where
    torch's does (for D = float32 the final rounding is the identity).

    Quantization of a tensor ``x`` of n elements, n a multiple of ``blocksize * scaler_blocksize``:

    1. ``table = D(TORCHAO_NF4_DECIMALS)``: the NF4 table rounded to 4 decimals, then to D.
    2. ``scaler[b] = max |x|`` over each block of ``blocksize`` flat elements (exact in D).
    3. ``mean = D(float32(sum(scaler)) / n_blocks)`` (torch's CPU mean sums in float32 and
       divides in float32 for half types). The float32 sum's rounding depends on torch's
       reduction order; the oracle rounds the exact sum once, which can land an ulp away for
       float32 input (pass ``mean=`` to reproduce a given file; ``tests`` count the class).
    4. ``v = D(scaler - mean)``; per block of ``scaler_blocksize`` values ``m = max |v|``;
       ``factor = D(D(1 / D(2 * m)) * 256)`` (torch evaluates ``256 / t`` as
       ``t.reciprocal() * 256``).
    5. ``q = int8(clamp(round_half_even(D(v * factor)), -128, 127))``; a NaN (``0 * inf`` when
       all scalers of a nested block equal the mean) becomes 0, as torch's cast does on x86.
    6. ``s = D(x / scaler)``; the code is the index of the smallest ``D(|s - table[k]|)``, the
       LOWER index on a tie (``argmin`` keeps the first minimum). An all-zero block has
       ``s = 0/0 = NaN`` and gets code 0 (NaN compares as the minimum at index 0), which decodes
       to ``-scaler``, not to zero.
    7. Packing as bitsandbytes: first element in the high nibble.

    Decoding: ``scaler = D(D(q / factor) + mean)``, ``y = D(table[code] * scaler)``, then a
    conversion to the requested output dtype.

    Degenerate inputs are reproduced, not refused: when the scalers' float32 sum overflows
    (values near the dtype's maximum) the mean is inf, every scaler code 0, and the tensor
    decodes to NaN everywhere, as in torchao (the NaN bit patterns are not part of the format;
    torch itself writes different ones on different code paths).

Note: nearest of two neighbours
    torchao compares ``s`` against all 16 entries. Only the two entries around ``s`` can win:
    any other entry is farther by at least one table gap (at least 0.0796), which exceeds two
    rounding steps of D at every magnitude up to 2, so its rounded distance is strictly larger.
    The oracle therefore computes the two neighbours' rounded distances only and keeps the
    lower index on a tie, which gives the same code with 2 passes instead of 16.
"""

from __future__ import annotations

import numpy as np

from qlora_ref.blockwise import (
    as_float32_flat,
    check_blocksize,
    check_packed,
    pack_4bit,
    unpack_4bit,
)
from qlora_ref.state import NestedAbsmax, QuantState, dtype_name, numpy_dtype

__all__ = [
    "TORCHAO_NF4_DECIMALS",
    "torchao_codebook",
    "quantize_torchao",
    "dequantize_scalers",
    "dequantize_torchao",
]

#: torchao's NF4 table as it writes it: the normative values rounded to 4 decimals (so not
#: bit-compatible with bitsandbytes' table), converted to the input dtype at run time.
TORCHAO_NF4_DECIMALS = (
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
)


def torchao_codebook(dtype="bfloat16") -> np.ndarray:
    """Return torchao's rounded NF4 table in ``dtype``.

    Parameters
    ----------
    dtype : {"float32", "float16", "bfloat16"} or a NumPy dtype

    Returns
    -------
    ndarray, shape (16,), ``dtype``
        ``TORCHAO_NF4_DECIMALS`` rounded to nearest even in ``dtype``.

    Examples
    --------
    >>> float(torchao_codebook("float32")[1]), float(torchao_codebook("bfloat16")[1])
    (-0.6962000131607056, -0.6953125)
    """
    return np.array(TORCHAO_NF4_DECIMALS, dtype=np.float64).astype(numpy_dtype(dtype))


def _op(result_f32: np.ndarray, D: np.dtype) -> np.ndarray:
    """Round a float32 result into D: one torch operation on D tensors (Note: torchao arithmetic)."""
    return np.asarray(result_f32, dtype=np.float32).astype(D)


def _f32(a) -> np.ndarray:
    return np.asarray(a).astype(np.float32)


def _check_scaler_blocksize(scaler_blocksize) -> int:
    if isinstance(scaler_blocksize, bool) or not isinstance(scaler_blocksize, (int, np.integer)):
        raise TypeError(f"scaler_blocksize must be an int, got {type(scaler_blocksize).__name__}")
    if scaler_blocksize <= 0:
        raise ValueError(f"scaler_blocksize must be positive, got {scaler_blocksize}")
    return int(scaler_blocksize)


def _mean_in_dtype(scalers: np.ndarray, D: np.dtype):
    """Step 3: ``D(float32(sum) / n)`` with the sum rounded once from its exact value."""
    with np.errstate(over="ignore"):  # a sum beyond the float32 range is inf, as torch's is
        total = np.float32(_f32(scalers).astype(np.float64).sum())
    return _op(total / np.float32(scalers.size), D)[()]


def quantize_torchao(x, *, blocksize: int = 64, scaler_blocksize: int = 256, mean=None):
    """Quantize to torchao's NF4 format (``to_nf4``), bit for bit.

    Parameters
    ----------
    x : ndarray, any shape, float32, float16 or bfloat16 (``ml_dtypes.bfloat16``)
        Its element count must be a multiple of ``blocksize * scaler_blocksize``. (torchao itself
        also refuses more than two dimensions; the format does not depend on the shape.)
    blocksize : int
        Elements per first-level block, one of bitsandbytes' block sizes (torchtune uses 64).
    scaler_blocksize : int
        Scalers per nested block (torchao's default 256).
    mean : scalar, optional
        The scaler mean to subtract, in the input dtype. Default: computed as in step 3 of Note:
        torchao arithmetic. Pass torchao's ``scaler_mean`` to reproduce its codes when torch's
        float32 reduction order lands an ulp away.

    Returns
    -------
    packed : ndarray, shape (n // 2, 1), uint8
        torchao's ``quantized_data`` (two codes per byte, first in the high nibble).
    state : QuantState
        ``codebook``: torchao's rounded table in the input dtype; ``nested``: a
        ``NestedAbsmax(scheme="torchao")`` with int8 ``codes`` (n_blocks,) =
        ``quantized_scalers``, ``absmax`` (n_blocks // scaler_blocksize,) = the
        ``quantization_factor`` in the input dtype, ``offset`` = ``scaler_mean`` in the input
        dtype, ``codebook=None``.

    Raises
    ------
    TypeError
        If ``x`` is not a NumPy array of a supported dtype, or a block size is not an int.
    ValueError
        If ``x`` is empty or holds NaN/Inf, the block size is not allowed, or the element count
        is not a multiple of ``blocksize * scaler_blocksize``.

    Notes
    -----
    QLoRA section 3 (NormalFloat and double quantization) as torchao implements it; every
    rounding step is listed in Note: torchao arithmetic.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    >>> packed, state = quantize_torchao(x)
    >>> packed.shape, state.nested.codes.dtype, state.nested.absmax.shape
    ((8192, 1), dtype('int8'), (1,))
    >>> y = dequantize_torchao(packed, state, dtype="float32")
    >>> bool(np.abs(y - x).max() < 0.5)
    True
    """
    blocksize = check_blocksize(blocksize)
    scaler_blocksize = _check_scaler_blocksize(scaler_blocksize)
    x32, name = as_float32_flat(x)  # (n,) float32, exact; refuses NaN/Inf and empty input
    D = numpy_dtype(name)
    n = x32.size
    if n % (blocksize * scaler_blocksize):
        raise ValueError(
            f"the torchao format needs an element count that is a multiple of blocksize * "
            f"scaler_blocksize = {blocksize} * {scaler_blocksize}; got {n} elements of shape {x.shape}"
        )
    n_blocks = n // blocksize
    blocks = x32.reshape(n_blocks, blocksize)  # (n_blocks, blocksize): exact copies of D values
    scalers = np.abs(blocks).max(axis=1).astype(D)  # step 2, (n_blocks,), exact in D

    # Steps 3 to 5: int8 linear double quantization of the scalers.
    mean_D = _mean_in_dtype(scalers, D) if mean is None else np.asarray(mean).astype(D)[()]
    v = _op(_f32(scalers) - np.float32(mean_D), D)  # (n_blocks,)
    v_blocks = _f32(v).reshape(-1, scaler_blocksize)  # (n_nested, scaler_blocksize)
    m = np.abs(v_blocks).max(axis=1)  # (n_nested,) exact in D
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        twice = _op(np.float32(2.0) * m, D)
        factor = _op(_f32(_op(np.float32(1.0) / _f32(twice), D)) * np.float32(256.0), D)
        scaled = _f32(_op(v_blocks * _f32(factor)[:, None], D))  # (n_nested, scaler_blocksize)
        q = np.clip(np.rint(scaled), -128, 127)
    q[np.isnan(q)] = 0
    codes8 = q.astype(np.int8).reshape(-1)  # (n_blocks,)

    # Step 6: nearest entry of the rounded table (Note: nearest of two neighbours).
    table = torchao_codebook(D)
    table32 = _f32(table)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = _f32(_op(blocks / _f32(scalers)[:, None], D)).reshape(-1)  # (n,)
    lo = np.clip(np.searchsorted(table32, s, side="right") - 1, 0, 14)
    d_lo = _f32(_op(np.abs(s - table32[lo]), D))
    d_hi = _f32(_op(np.abs(s - table32[lo + 1]), D))
    codes = np.where(d_hi < d_lo, lo + 1, lo).astype(np.uint8)
    codes[np.isnan(s)] = 0  # all-zero block: every distance is NaN, argmin gives index 0
    packed = pack_4bit(codes, "nf4")

    nested = NestedAbsmax(scheme="torchao", codes=codes8, absmax=factor, codebook=None, offset=mean_D,
                          blocksize=scaler_blocksize)
    state = QuantState(shape=tuple(int(d) for d in x.shape), dtype=name, blocksize=blocksize,
                       quant_type="nf4", codebook=table, nested=nested)
    return packed, state


def dequantize_scalers(nested: NestedAbsmax) -> np.ndarray:
    """Reconstruct torchao's first-level scalers from their int8 codes.

    Parameters
    ----------
    nested : NestedAbsmax
        ``scheme="torchao"``: int8 ``codes`` (n_blocks,), factors ``absmax``
        (n_blocks // blocksize,) and ``offset`` (the mean) in the input dtype D.

    Returns
    -------
    ndarray, shape (n_blocks,), D
        ``D(D(code / factor) + mean)``, torchao's ``NF4Tensor.dequantize_scalers``.

    Raises
    ------
    ValueError
        If the scheme is not ``"torchao"`` or the arrays do not fit together.
    TypeError
        If the codes are not int8 or the factors are not float32/float16/bfloat16.

    Examples
    --------
    >>> from qlora_ref.state import NestedAbsmax
    >>> nested = NestedAbsmax("torchao", np.array([-128, 0, 64, 127], np.int8),
    ...                       np.array([128.0], np.float32), None, np.float32(1.0), blocksize=4)
    >>> dequantize_scalers(nested).tolist()
    [0.0, 1.0, 1.5, 1.9921875]
    """
    if nested.scheme != "torchao":
        raise ValueError(f"dequantize_scalers decodes the 'torchao' scheme, got {nested.scheme!r}")
    codes = np.asarray(nested.codes)
    if codes.dtype != np.int8 or codes.ndim != 1:
        raise TypeError(f"torchao scaler codes must be a 1-D int8 array, got {codes.dtype} of shape {codes.shape}")
    D = numpy_dtype(dtype_name(nested.absmax.dtype))  # TypeError for another dtype
    if codes.size % nested.blocksize:
        raise ValueError(f"{codes.size} scaler codes do not fill blocks of {nested.blocksize}")
    n_nested = codes.size // nested.blocksize
    if nested.absmax.shape != (n_nested,):
        raise ValueError(f"quantization factors have shape {nested.absmax.shape}, expected ({n_nested},)")
    q = codes.astype(np.float32).reshape(n_nested, nested.blocksize)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = _op(q / _f32(nested.absmax)[:, None], D).reshape(-1)  # (n_blocks,)
    return _op(_f32(ratio) + np.float32(_f32(nested.offset)), D)


def dequantize_torchao(packed, state: QuantState, *, dtype=None) -> np.ndarray:
    """Decode torchao's NF4 format, bit for bit with ``NF4Tensor.get_original_weight``.

    Parameters
    ----------
    packed : ndarray, shape (n // 2, 1) or (n // 2,), uint8
    state : QuantState
        As made by ``quantize_torchao`` (its ``nested.scheme`` is ``"torchao"``).
    dtype : {"float32", "float16", "bfloat16"} or a NumPy dtype, optional
        Output dtype; default ``state.dtype``. The values are computed in ``state.dtype`` and
        then converted, as ``nf4_tensor.to(dtype)`` does.

    Returns
    -------
    ndarray of ``state.shape`` and ``dtype``
        ``D(table[code] * D(D(q / factor) + mean))`` converted to ``dtype``.

    Raises
    ------
    TypeError
        If ``packed`` or ``state`` has the wrong type, or a dtype is unsupported.
    ValueError
        If the packed data, the table and the scalers do not fit the state.

    Examples
    --------
    >>> import ml_dtypes
    >>> x = np.linspace(-1, 1, 64 * 256).astype(ml_dtypes.bfloat16)
    >>> packed, state = quantize_torchao(x)
    >>> dequantize_torchao(packed, state).dtype, dequantize_torchao(packed, state, dtype="float32").dtype
    (dtype(bfloat16), dtype('float32'))
    """
    flat = check_packed(packed, state)
    if state.nested is None or state.nested.scheme != "torchao":
        raise ValueError("dequantize_torchao needs a state made by the 'torchao' scheme")
    D = numpy_dtype(state.dtype)
    out_dtype = numpy_dtype(state.dtype if dtype is None else dtype)
    if state.codebook.dtype != D or state.nested.absmax.dtype != D:
        raise ValueError(
            f"the table ({state.codebook.dtype}) and factors ({state.nested.absmax.dtype}) of a torchao "
            f"state must be in its dtype {state.dtype}"
        )
    if state.numel % state.blocksize:
        raise ValueError(f"{state.numel} elements do not fill blocks of {state.blocksize}")
    scalers = _f32(dequantize_scalers(state.nested))  # (n_blocks,)
    codes = unpack_4bit(flat, state.numel).reshape(-1, state.blocksize)  # (n_blocks, blocksize)
    values = _f32(state.codebook)[codes]
    y = _op(values * scalers[:, None], D)  # (n_blocks, blocksize) in D
    return y.astype(out_dtype).reshape(state.shape)
