"""The cases of the golden vectors: inputs chosen to exercise every rule, outputs from the oracle.

``qlora_ref.conformance.vectors`` writes and reads them (format, manifest, files); this module decides what
they contain. Every case is a deterministic function of its name (the seed is the CRC-32 of the
name), so regenerating gives the same bytes.

Note: golden-vector cases
    - ``quantize``: an input array, its 4-bit codes, packed bytes, absmax and decoded output,
      and the same with bitsandbytes' double quantization (nested codes, nested absmax, offset,
      reconstructed absmax, decoded output). One per quant type (NF4, FP4), block size and
      dtype on normal data with an odd element count and a partial last block, plus the hard
      cases: ties on midpoints, all-zero blocks, tiny odd lengths, values within a few ulp of a
      midpoint (where reciprocal-then-multiply, division and float64 scaling disagree, in full
      and partial blocks), subnormals, the largest finite values.
    - ``double_quant``: first-level absmax values in, the nested state and the reconstructed
      absmax out (a constant input makes an all-zero nested block).
    - ``dequantize``: every byte value 0..255 under several absmax: each code in each nibble.
    - ``lora`` / ``qlora``: one layer's forward and backward. Inputs are bf16-representable
      values of a narrow exponent range, so every float64 product and sum of the reference is
      exact and any summation order reproduces it bit for bit (checked when generating).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from qlora_ref.api import dequantize_4bit, quantize_4bit
from qlora_ref.blockwise import unpack_4bit
from qlora_ref.codebooks import codebook
from qlora_ref.double_quant import dequantize_absmax, double_quantize
from qlora_ref.lora import lora_backward, lora_forward, lora_scaling
from qlora_ref.qlora import qlora_backward, qlora_base_weight, qlora_forward
from qlora_ref.state import BLOCKSIZES, QuantState, numpy_dtype

__all__ = ["Case", "build_cases", "case_rng"]

_DTYPES = ("float32", "float16", "bfloat16")
_QUANT_TYPES = ("nf4", "fp4")


@dataclass
class Case:
    """One golden-vector case: its parameters and its named arrays (inputs and expected outputs)."""

    name: str
    kind: str
    description: str
    params: dict
    arrays: dict
    tags: list = field(default_factory=list)


def case_rng(name: str) -> np.random.Generator:
    """Return the case's random generator, seeded by the CRC-32 of its name.

    Examples
    --------
    >>> float(case_rng("a").random()) == float(case_rng("a").random())
    True
    """
    return np.random.default_rng(zlib.crc32(name.encode("utf-8")))


# ----------------------------------------------------------------------------- quantize cases


def _sorted_midpoints(quant_type: str) -> np.ndarray:
    table = np.sort(codebook(quant_type))
    return (table[:-1] + table[1:]) / np.float32(2)  # float32, as the encoder computes them


def _step_ulps(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Move each nonzero value ``k`` units in the last place of its dtype away from zero."""
    uint = np.dtype(f"u{x.dtype.itemsize}")
    bits = x.view(uint).astype(np.int64) + k  # sign-magnitude: adding moves away from zero
    return bits.astype(uint).view(x.dtype)


def _codes(s, midpoints) -> np.ndarray:
    return np.searchsorted(midpoints, s, side="left")


def quantize_case(name, x, *, blocksize, quant_type, description, tags) -> Case:
    """Run the oracle on ``x`` with and without double quantization and collect every array.

    The double-quantized arrays are left out when the reconstructed absmax is not finite (values
    near float32's maximum: ``code * nested_absmax + offset`` overflows), and the case says so.
    """
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    arrays = {
        "input": x,
        "codes": unpack_4bit(packed, state.numel),
        "packed": packed.reshape(-1),
        "absmax": state.absmax,
        "decoded": dequantize_4bit(packed, state),
    }
    params = {
        "quant_type": quant_type, "blocksize": blocksize, "dtype": state.dtype,
        "shape": list(state.shape), "n_blocks": state.n_blocks,
    }
    packed_dq, state_dq = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, double_quant=True)
    assert np.array_equal(packed, packed_dq)  # double quantization never touches the codes
    nested = state_dq.nested
    with np.errstate(over="ignore"):
        absmax_dq = dequantize_absmax(nested)
    if not np.all(np.isfinite(absmax_dq)):
        params["note"] = "no double-quantized arrays: the reconstructed absmax overflows float32"
        return Case(name, "quantize", description, dict(params, double_quant=False), arrays, tags)
    with np.errstate(over="ignore"):  # a float16 decode may round past 65504 to inf, as bnb's does
        decoded_dq = dequantize_4bit(packed, state_dq)
    arrays.update(nested_codes=nested.codes, nested_absmax=nested.absmax, absmax_dq=absmax_dq,
                  decoded_dq=decoded_dq)
    params.update(double_quant=True, nested_blocksize=nested.blocksize,
                  nested_offset=_float32_json(nested.offset))
    return Case(name, "quantize", description, params, arrays, tags)


def _float32_json(value) -> dict:
    v = np.float32(value)
    return {"value": float(v), "bits": f"0x{int(np.array(v).view(np.uint32)):08x}"}


def _normal_blocks(rng, n, blocksize) -> np.ndarray:
    """Standard normal data, each block at its own power-of-two-ish scale (2^-4 .. 2^4)."""
    n_blocks = -(-n // blocksize)
    scale = np.repeat(2.0 ** rng.uniform(-4, 4, n_blocks), blocksize)[:n]
    return rng.standard_normal(n) * scale


def _main_shape(blocksize: int) -> tuple:
    # Three rows (blocks cross rows), an odd column count: an odd element count, so a partial
    # last block and a padded last byte, with at least two full blocks at every block size.
    cols = (max(2 * blocksize, 1024) + blocksize // 2) // 3 | 1
    return (3, cols)


def _main_cases():
    for quant_type in _QUANT_TYPES:
        for blocksize in BLOCKSIZES:
            for dtype in _DTYPES:
                name = f"quantize-{quant_type}-b{blocksize}-{dtype}"
                shape = _main_shape(blocksize)
                x = _normal_blocks(case_rng(name), int(np.prod(shape)), blocksize)
                yield quantize_case(
                    name, x.reshape(shape).astype(numpy_dtype(dtype)), blocksize=blocksize,
                    quant_type=quant_type, tags=["normal", "odd-length", "partial-block"],
                    description="normal data at per-block scales, three rows crossed by blocks: an odd "
                                "count (a padded last byte) and a partial last block",
                )


def _ties(rng, quant_type, dtype, blocksize, n_blocks):
    """Blocks of values exactly on midpoints once scaled, so a tie rule decides the code.

    Even blocks: power-of-two absmax (the reciprocal is exact). Odd blocks: an arbitrary absmax
    and values found within a few ulp of ``midpoint * absmax`` whose float32 product with the
    reciprocal rounds exactly onto the midpoint.
    """
    D = numpy_dtype(dtype)
    mids = _sorted_midpoints(quant_type)
    blocks = []
    for b in range(n_blocks * 8):
        if len(blocks) == n_blocks:
            break
        if b % 2 == 0:
            absmax = np.float32(2.0 ** rng.integers(-6, 6))
            values = (mids * absmax).astype(D)
            exact = values.astype(np.float32) * (np.float32(1) / absmax) == mids
        else:
            absmax = np.float32(np.float32(rng.uniform(0.5, 2.0)).astype(D))
            centre = (mids * absmax).astype(D)
            values = np.concatenate([_step_ulps(centre, np.int64(k)) for k in range(-4, 5)])
            exact = values.astype(np.float32) * (np.float32(1) / absmax) == np.tile(mids, 9)
        values = values[exact]
        if values.size == 0:
            continue
        block = rng.choice(values, blocksize).astype(D)
        block[rng.integers(blocksize)] = D.type(absmax)
        blocks.append(block)
    if not blocks:
        return None
    return np.concatenate(blocks)


def _near_midpoint(rng, quant_type, dtype, blocksize, n_blocks):
    """Blocks of values within a few ulp of ``midpoint * absmax`` where the scaling rule matters.

    Only values for which ``x * float32(1/absmax)``, ``float32(x / absmax)`` and the exact
    quotient do not all give the same code are kept.
    """
    D = numpy_dtype(dtype)
    mids = _sorted_midpoints(quant_type)
    mids64 = mids.astype(np.float64)
    blocks = []
    for _ in range(n_blocks * 40):
        if len(blocks) == n_blocks:
            break
        absmax = np.float32(np.float32(rng.uniform(0.5, 2.0)).astype(D))
        centre = (np.concatenate([mids, -mids]) * absmax).astype(D)
        values = np.concatenate([_step_ulps(centre, np.int64(k)) for k in range(-8, 9)])
        x32 = values.astype(np.float32)
        with np.errstate(all="ignore"):
            by_reciprocal = _codes(x32 * (np.float32(1) / absmax), mids)
            by_division = _codes(x32 / absmax, mids)
            exact = _codes(x32.astype(np.float64) / np.float64(absmax), mids64)
        keep = (np.abs(x32) < absmax) & ((by_reciprocal != by_division) | (by_reciprocal != exact))
        if keep.sum() == 0:
            continue
        block = rng.choice(values[keep], blocksize).astype(D)
        block[rng.integers(blocksize)] = D.type(absmax)
        blocks.append(block)
    if len(blocks) < n_blocks:
        return None
    return np.concatenate(blocks)


def _zero_blocks(rng, dtype, blocksize):
    """Alternating all-zero blocks, normal blocks and normal blocks with scattered zeros."""
    n = 7 * blocksize + 5
    x = _normal_blocks(rng, n, blocksize)
    for b in range(0, 7, 2):
        x[b * blocksize:(b + 1) * blocksize] = 0.0
    x[blocksize + rng.integers(0, blocksize, 10)] = 0.0  # zeros inside a normal block
    x[7 * blocksize:] = 0.0  # an all-zero partial last block
    return x.astype(numpy_dtype(dtype))


def _subnormals(rng, dtype, blocksize):
    """Blocks of subnormal values of the dtype, one with zeros, one mixing normal and tiny."""
    D = numpy_dtype(dtype)
    finfo = ml_dtypes.finfo(D)
    tiny = float(finfo.smallest_subnormal)
    blocks = [
        rng.integers(-200, 200, blocksize) * tiny,  # absmax itself subnormal
        rng.integers(-3, 4, blocksize) * tiny,  # a few distinct subnormals and zeros
        np.where(rng.random(blocksize) < 0.5, rng.standard_normal(blocksize), rng.standard_normal(blocksize) * tiny * 50),
    ]
    return np.concatenate(blocks).astype(D)


def _largest(rng, dtype, blocksize):
    """Values near the largest finite value of the dtype (float32's reciprocal is subnormal)."""
    D = numpy_dtype(dtype)
    big = float(ml_dtypes.finfo(D).max)
    blocks = [
        rng.uniform(-1, 1, blocksize) * big,
        np.full(blocksize, big) * np.where(rng.random(blocksize) < 0.5, -1, 1),
        rng.standard_normal(blocksize),
    ]
    x = np.concatenate(blocks)
    x[rng.integers(blocksize)] = big  # pin the first block's absmax at the maximum
    return x.astype(D)


def _hard_cases():
    bs = 64
    for quant_type in _QUANT_TYPES:
        for dtype in _DTYPES:
            D = numpy_dtype(dtype)
            name = f"ties-{quant_type}-{dtype}"
            x = _ties(case_rng(name), quant_type, dtype, bs, 6)
            if x is not None:
                yield quantize_case(name, x, blocksize=bs, quant_type=quant_type, tags=["ties"],
                                    description="values that scale exactly onto a midpoint: a tie takes the LOWER code")
            name = f"near-midpoint-{quant_type}-{dtype}"
            x = _near_midpoint(case_rng(name), quant_type, dtype, bs, 5)
            if x is not None:
                x = x[: 4 * bs + 37]  # four full blocks and a partial one
                yield quantize_case(name, x, blocksize=bs, quant_type=quant_type,
                                    tags=["near-midpoint", "partial-block"],
                                    description="values a few ulp from midpoint*absmax: reciprocal-then-multiply, "
                                                "division and float64 scaling give different codes; the last "
                                                "block is partial")
            name = f"zero-blocks-{quant_type}-{dtype}"
            yield quantize_case(name, _zero_blocks(case_rng(name), dtype, bs), blocksize=bs,
                                quant_type=quant_type, tags=["zero-blocks", "partial-block"],
                                description="all-zero blocks (absmax 0, the zero code) between normal blocks")
            name = f"subnormal-{quant_type}-{dtype}"
            yield quantize_case(name, _subnormals(case_rng(name), dtype, bs), blocksize=bs,
                                quant_type=quant_type, tags=["subnormal"],
                                description="subnormal values of the dtype; where absmax is subnormal in "
                                            "float32 its reciprocal overflows to inf")
            name = f"largest-{quant_type}-{dtype}"
            yield quantize_case(name, _largest(case_rng(name), dtype, bs), blocksize=bs,
                                quant_type=quant_type, tags=["largest"],
                                description="values up to the dtype's largest finite value (float32: the "
                                            "reciprocal is subnormal, and double quantization overflows)")
            for n in (1, 3, 65):
                name = f"length{n}-{quant_type}-{dtype}"
                x = (case_rng(name).standard_normal(n)).astype(D)
                yield quantize_case(name, x, blocksize=bs, quant_type=quant_type,
                                    tags=["odd-length", "partial-block"],
                                    description="1, 3 or 65 elements: a padded last byte, a partial block")


def _path_cases():
    """Shapes that reach every decode path of bitsandbytes' CPU backend (``qlora_ref.conformance.variants``,
    Note: bitsandbytes CPU decode paths): last dimensions that are a multiple of 16 with blocks
    crossing rows (2-D and 3-D, blocksizes 32 to 2048), an even one that is not, and blocks of
    a normal absmax whose products are float32 subnormals."""
    shapes = (("rows16", (40, 48), 32), ("rows16-3d", (2, 3, 80), 64), ("even34", (5, 34), 64),
              ("rows16-b2048", (2, 2080), 2048))
    for quant_type in _QUANT_TYPES:
        for dtype in _DTYPES:
            for family, shape, bs in shapes:
                name = f"{family}-{quant_type}-b{bs}-{dtype}"
                rng = case_rng(name)
                n = int(np.prod(shape))
                x = _normal_blocks(rng, n, bs)
                tiny = np.repeat(rng.random(-(-n // bs)) < 0.3, bs)[:n]  # some blocks around 1e-37
                x[tiny] = rng.standard_normal(int(tiny.sum())) * 1e-37
                yield quantize_case(name, x.reshape(shape).astype(numpy_dtype(dtype)), blocksize=bs,
                                    quant_type=quant_type, tags=["paths"],
                                    description=f"shape {shape}: a decode path of bitsandbytes' CPU backend; "
                                                "some blocks with a normal absmax and subnormal products")


# ----------------------------------------------------------------------------- other kinds


def _double_quant_cases():
    specs = {
        "double-quant-typical": lambda rng: np.abs(rng.standard_normal((700, 64))).max(axis=1),
        "double-quant-spread": lambda rng: 2.0 ** rng.uniform(-12, 6, 600),
        "double-quant-constant": lambda rng: np.full(300, 0.75),
    }
    notes = {
        "double-quant-typical": "absmax of 700 blocks of 64 normal values: 2 full nested blocks and a partial one",
        "double-quant-spread": "absmax over 18 binades: most land near the offset",
        "double-quant-constant": "all equal: absmax - offset is 0, an all-zero nested block (the zero code)",
    }
    for name, make in specs.items():
        absmax = make(case_rng(name)).astype(np.float32)
        nested = double_quantize(absmax)
        arrays = {"input": absmax, "nested_codes": nested.codes, "nested_absmax": nested.absmax,
                  "absmax_dq": dequantize_absmax(nested)}
        params = {"n": int(absmax.size), "nested_blocksize": nested.blocksize,
                  "nested_offset": _float32_json(nested.offset)}
        yield Case(name, "double_quant", notes[name], params, arrays, ["double-quant"])


def _dequantize_cases():
    for quant_type in _QUANT_TYPES:
        for dtype in _DTYPES:
            name = f"dequantize-all-codes-{quant_type}-{dtype}"
            packed = np.tile(np.arange(256, dtype=np.uint8), 4)  # (1024,): every code pair
            absmax = np.array([1.0, 0.3, 7.5, 2.0 ** -20], dtype=np.float32)[:, None].repeat(4, 1).ravel()
            state = QuantState(shape=(packed.size * 2,), dtype=dtype, blocksize=128, quant_type=quant_type,
                               codebook=codebook(quant_type), absmax=absmax)
            arrays = {"packed": packed, "absmax": absmax, "decoded": dequantize_4bit(packed, state)}
            params = {"quant_type": quant_type, "blocksize": 128, "dtype": dtype,
                      "shape": [packed.size * 2], "n_blocks": int(absmax.size)}
            yield Case(name, "dequantize", "every byte 0..255 (each code in each nibble) under four absmax values",
                       params, arrays, ["decode"])


def _exact_values(rng, shape, lo=-4, hi=1) -> np.ndarray:
    """Random bf16-representable values ``+-(1 + k/128) * 2^e``, ``e`` in [lo, hi]: few bits."""
    mantissa = 1.0 + rng.integers(0, 128, shape) / 128.0
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    return sign * mantissa * 2.0 ** rng.integers(lo, hi + 1, shape)


def _lora_reference(x, W, A, B, G, s, b, d):
    """Forward and backward from the oracle, float64: ``(y, grad_x, grad_A, grad_B)``."""
    y = lora_forward(x, W, A, B, scaling=s, bias=b, dropout_mask=d)
    return (y,) + tuple(lora_backward(G, x, W, A, B, scaling=s, dropout_mask=d))


def _lora_plain(x, W, A, B, G, s, b, d, *, dtype, wide=np.float64):
    """The same formulas, every product and sum rounded to ``dtype`` (``wide`` for none).

    With ``dtype=None`` this is the extended-precision check of exactness; with a low dtype it
    is the plain baseline of the derived tolerance tier (each matmul rounded once, as a plain
    framework does in that dtype).
    """
    def r(a):
        return a.astype(wide) if dtype is None else a.astype(dtype).astype(wide)

    x, W, A, B, G = (a.astype(wide) for a in (x, W, A, B, G))
    s = wide(s)
    xt = x if d is None else r(d.astype(wide) * x)
    y = r(x @ W.T)
    if b is not None:
        y = r(y + b.astype(wide))
    y = r(y + r(s * r(r(xt @ A.T) @ B.T)))
    X, G2 = xt.reshape(-1, xt.shape[-1]), G.reshape(-1, G.shape[-1])
    GB = r(G2 @ B)
    gA = r(s * r(GB.T @ X))
    gB = r(s * r(G2.T @ r(X @ A.T)))
    gxt = r(s * r(GB @ A)).reshape(x.shape)
    if d is not None:
        gxt = r(d.astype(wide) * gxt)
    gx = r(r(G @ W) + gxt)
    return y, gx, gA, gB


def _derived_budget(ref, baseline, dtype) -> float:
    """``2 max|baseline - ref| + 4 eps(dtype) max|ref|``: the derived tier (docs/tolerances.md).

    Rounded to 4 significant digits so the manifest's text does not depend on the last bit.
    """
    eps = float(ml_dtypes.finfo(numpy_dtype(dtype)).eps)
    budget = 2.0 * float(np.max(np.abs(baseline - ref))) + 4.0 * eps * float(np.max(np.abs(ref)))
    return float(f"{budget:.4g}")


_OUTPUTS = ("y", "grad_x", "grad_A", "grad_B")


def _lora_case(name, *, dtype, r, alpha, rslora, dropout, bias, quant=None) -> Case:
    rng = case_rng(name)
    D = numpy_dtype(dtype)
    out_f, in_f, tokens = 48, 64, (2, 3)
    x = _exact_values(rng, tokens + (in_f,)).astype(D)
    A = _exact_values(rng, (r, in_f), -6, -2).astype(D)
    B = _exact_values(rng, (out_f, r), -6, -2).astype(D)
    G = _exact_values(rng, tokens + (out_f,)).astype(D)
    b = _exact_values(rng, (out_f,)).astype(D) if bias else None
    d = ((rng.random(x.shape) >= 0.5) * 2.0).astype(D) if dropout else None  # p = 0.5: 0 or 2
    s = lora_scaling(alpha, r, rslora=rslora)
    params = {"dtype": dtype, "r": r, "alpha": alpha, "use_rslora": rslora, "scaling": s,
              "in_features": in_f, "out_features": out_f, "dropout_p": 0.5 if dropout else 0.0}
    arrays = {"x": x}
    if quant is None:
        kind = "lora"
        arrays["W"] = W = _exact_values(rng, (out_f, in_f)).astype(D)
    else:
        kind = "qlora"
        quant_type, blocksize, compute = quant
        W32 = (rng.standard_normal((out_f, in_f)) * 0.5).astype(np.float32)
        packed, state = quantize_4bit(W32, blocksize=blocksize, quant_type=quant_type, double_quant=True)
        W = qlora_base_weight(packed, state, compute_dtype=compute).astype(numpy_dtype(compute))
        arrays.update(packed=packed.reshape(-1), nested_codes=state.nested.codes,
                      nested_absmax=state.nested.absmax, W_c=W)
        params.update(quant_type=quant_type, blocksize=blocksize, compute_dtype=compute, weight_dtype=state.dtype,
                      shape=[out_f, in_f], n_blocks=state.n_blocks,
                      nested_blocksize=state.nested.blocksize,
                      nested_offset=_float32_json(state.nested.offset))
    arrays.update(A=A, B=B, grad_y=G)
    if b is not None:
        arrays["bias"] = b
    if d is not None:
        arrays["dropout_mask"] = d
    refs = _lora_reference(x, W, A, B, G, s, b, d)
    if quant is not None:  # the QLoRA entry points must give the same on the 4-bit base
        q = (qlora_forward(x, packed, state, A, B, scaling=s, compute_dtype=compute, bias=b, dropout_mask=d),)
        q += tuple(qlora_backward(G, x, packed, state, A, B, scaling=s, compute_dtype=compute, dropout_mask=d))
        assert all(np.array_equal(u, v) for u, v in zip(refs, q)), name
    if np.finfo(np.longdouble).nmant > np.finfo(np.float64).nmant:  # x86: 64-bit significand
        for out, ref, wide in zip(_OUTPUTS, refs, _lora_plain(x, W, A, B, G, s, b, d, dtype=None, wide=np.longdouble)):
            if not np.array_equal(ref, wide):
                raise AssertionError(f"{name}: the float64 {out} is not exact; choose other inputs")
    plain = _lora_plain(x, W, A, B, G, s, b, d, dtype=D)
    params["budgets"] = {out: _derived_budget(ref, p, dtype) for out, ref, p in zip(_OUTPUTS, refs, plain)}
    arrays.update(zip(_OUTPUTS, refs))
    what = f"QLoRA on a double-quantized 4-bit {quant[0].upper()} base" if quant else "LoRA"
    description = (f"{what}, r={r}, alpha={alpha}{', rsLoRA' if rslora else ''}"
                   f"{', dropout p=0.5' if dropout else ''}{', bias' if bias else ''}: forward and backward")
    return Case(name, kind, description, params, arrays, [kind, "forward", "backward"])


def _lora_cases():
    yield _lora_case("lora-float32", dtype="float32", r=4, alpha=8, rslora=False, dropout=False, bias=True)
    yield _lora_case("lora-bfloat16-rslora-dropout", dtype="bfloat16", r=4, alpha=16, rslora=True,
                     dropout=True, bias=False)
    yield _lora_case("lora-float16-dropout", dtype="float16", r=8, alpha=12, rslora=False, dropout=True, bias=True)
    yield _lora_case("qlora-nf4-b64-bfloat16", dtype="bfloat16", r=8, alpha=16, rslora=False, dropout=True,
                     bias=True, quant=("nf4", 64, "bfloat16"))
    yield _lora_case("qlora-nf4-b64-float32", dtype="float32", r=4, alpha=8, rslora=True, dropout=False,
                     bias=False, quant=("nf4", 64, "float32"))
    yield _lora_case("qlora-fp4-b128-float16", dtype="float16", r=4, alpha=4, rslora=False, dropout=False,
                     bias=True, quant=("fp4", 128, "float16"))


def build_cases() -> list:
    """Return every golden-vector case, in manifest order.

    Returns
    -------
    list of Case
        Deterministic: the same inputs and outputs on every run (see Note: golden-vector cases).
    """
    cases = []
    for make in (_main_cases, _hard_cases, _path_cases, _double_quant_cases, _dequantize_cases, _lora_cases):
        cases.extend(make())
    return cases
