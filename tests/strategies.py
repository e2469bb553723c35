"""Hypothesis strategies shared by all tests (one place, so every test draws the same kinds of input).

Covers element counts that are not a multiple of the block, all-zero blocks, values exactly on
codebook midpoints times absmax, the largest and subnormal floats, irregular shapes; NaN and Inf
are drawn by ``non_finite_arrays`` for the tests that check they are refused.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from qlora_ref.codebooks import codebook
from qlora_ref.state import BLOCKSIZES

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}

blocksizes = st.sampled_from(BLOCKSIZES)
small_blocksizes = st.sampled_from(BLOCKSIZES[:4])
quant_types = st.sampled_from(["nf4", "fp4", "int4"])
bnb_quant_types = st.sampled_from(["nf4", "fp4"])
dtype_names = st.sampled_from(sorted(DTYPES))


@st.composite
def shapes(draw, max_elements: int = 3000):
    """Irregular shapes of 1 to 3 dimensions: odd counts, partial blocks, single elements."""
    ndim = draw(st.integers(1, 3))
    dims = []
    budget = max_elements
    for _ in range(ndim):
        d = draw(st.integers(1, max(1, min(budget, 257))))
        dims.append(d)
        budget = max(1, budget // d)
    return tuple(dims)


def _midpoint_values(quant_type: str) -> np.ndarray:
    table = np.sort(codebook(quant_type))
    return ((table[:-1] + table[1:]) / np.float32(2)).astype(np.float32)


@st.composite
def hard_arrays(draw, dtype_name: str | None = None, max_elements: int = 3000, blocksize: int | None = None):
    """Arrays mixing normal data with the hard cases.

    Per block, one of: standard normal at a random scale; all zeros; exact codebook midpoints
    times a power-of-two absmax (so ``x / absmax`` lands exactly on a midpoint); subnormals;
    values near the dtype's largest finite value; a single large outlier.
    """
    name = dtype_name or draw(dtype_names)
    dtype = DTYPES[name]
    shape = draw(shapes(max_elements))
    n = int(np.prod(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    bs = blocksize or draw(small_blocksizes)
    finfo = ml_dtypes.finfo(dtype) if name == "bfloat16" else np.finfo(dtype)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, bs):
        m = min(bs, n - start)
        kind = draw(st.sampled_from(["normal", "zeros", "midpoints", "subnormal", "huge", "outlier"]))
        if kind == "normal":
            block = rng.standard_normal(m) * np.float32(2.0 ** draw(st.integers(-20, 20)))
        elif kind == "zeros":
            block = np.zeros(m)
        elif kind == "midpoints":
            absmax = np.float32(2.0 ** draw(st.integers(-10, 10)))
            mids = _midpoint_values(draw(st.sampled_from(["nf4", "fp4", "int4"])))
            block = rng.choice(mids, m) * absmax
            block[rng.integers(m)] = absmax  # pin the block's absmax exactly
        elif kind == "subnormal":
            block = rng.standard_normal(m) * float(finfo.smallest_subnormal) * 8
        elif kind == "huge":
            block = rng.uniform(-1, 1, m) * float(finfo.max)
        else:
            block = rng.standard_normal(m) * 0.01
            block[rng.integers(m)] = 100.0
        out[start : start + m] = np.clip(block, -float(finfo.max), float(finfo.max))  # finite in dtype
    return out.astype(dtype).reshape(shape)


@st.composite
def non_finite_arrays(draw):
    """Arrays with at least one NaN, +Inf or -Inf somewhere."""
    x = draw(hard_arrays(max_elements=500))
    bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    flat = x.reshape(-1).copy()
    flat[draw(st.integers(0, flat.size - 1))] = bad
    return flat.reshape(x.shape)


# ----------------------------------------------------------------------------- LoRA layers

LORA_INPUT_DTYPES = {"float64": np.float64, **DTYPES}


@st.composite
def lora_problems(draw, max_features: int = 8, max_rank: int = 3, max_batch_dims: int = 2):
    """A LoRA layer, an input and an upstream gradient, as a dict of arrays.

    Keys: ``x (..., in)``, ``W (out, in)``, ``A (r, in)``, ``B (out, r)``, ``m (out,)`` (a DoRA
    magnitude), ``bias (out,)`` or None, ``mask (..., in)`` or None (entries 0 or 1/keep),
    ``grad_y (..., out)``, ``scaling`` (float). Rank 1 is drawn often, up to ``min(in, out)``;
    0 to ``max_batch_dims`` leading dimensions; every array in one drawn float dtype (float64,
    float32, float16 or bfloat16) with values of order 1.
    """
    in_features = draw(st.integers(1, max_features))
    out_features = draw(st.integers(1, max_features))
    r = draw(st.one_of(st.just(1), st.integers(1, min(in_features, out_features, max_rank))))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=max_batch_dims)))
    dtype = LORA_INPUT_DTYPES[draw(st.sampled_from(sorted(LORA_INPUT_DTYPES)))]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    keep = draw(st.sampled_from([0.5, 0.75, 0.9]))
    with_mask, with_bias = draw(st.booleans()), draw(st.booleans())
    return {
        "x": normal(*lead, in_features),
        "W": normal(out_features, in_features),
        "A": normal(r, in_features),
        "B": normal(out_features, r),
        "m": rng.uniform(0.5, 2.0, out_features).astype(dtype),
        "bias": normal(out_features) if with_bias else None,
        "mask": ((rng.random((*lead, in_features)) < keep) / keep).astype(dtype) if with_mask else None,
        "grad_y": normal(*lead, out_features),
        "scaling": draw(st.sampled_from([0.5, 1.0, 2.0, 16 / np.sqrt(8)])),
    }


# ------------------------------------------------------------------------------ torchao NF4


@st.composite
def torchao_arrays(draw, dtype_name: str | None = None):
    """Arrays torchao's ``to_nf4`` accepts: 1 or 2 dimensions, a multiple of 64 * 256 elements.

    Filled by repeating one ``hard_arrays`` draw (blocks of 64), so every hard case above occurs.
    """
    name = dtype_name or draw(dtype_names)
    k = draw(st.integers(1, 2))
    shape = draw(st.sampled_from([(64 * k, 256), (256, 64 * k), (128 * k, 128), (16384 * k,)]))
    pattern = draw(hard_arrays(name, max_elements=2000, blocksize=64)).reshape(-1)
    return np.resize(pattern, int(np.prod(shape))).reshape(shape)


# ------------------------------------------------------------------ quantization problems


@st.composite
def quantize_cases(draw, max_elements: int = 1500):
    """``(x, blocksize, quant_type, double_quant)``: a hard array and options for ``quantize_4bit``.

    Block sizes up to 512 often, any of them sometimes; the array's hard-case blocks follow the
    drawn block size (capped at 256 so that small arrays still mix several kinds).
    """
    blocksize = draw(st.sampled_from(BLOCKSIZES[:5]) | st.sampled_from(BLOCKSIZES))
    x = draw(hard_arrays(max_elements=max_elements, blocksize=min(blocksize, 256)))
    return x, blocksize, draw(quant_types), draw(st.booleans())


@st.composite
def absmax_arrays(draw, max_blocks: int = 700):
    """First-level absmax as quantization makes them: per-block ``max |x|`` of hard float32 data."""
    from qlora_ref.blockwise import blockwise_absmax

    x = draw(hard_arrays(dtype_name="float32", max_elements=max_blocks * 32, blocksize=32))
    return blockwise_absmax(x.reshape(-1), 32)
