"""Hypothesis properties of the oracle's own blockwise 4-bit quantization (no comparator).

Invariants, each over the shared hard inputs (odd counts, partial blocks, zero blocks, values on
codebook midpoints, subnormals, huge values, irregular shapes):

- codes are the nearest codebook entry, a value on a float32 midpoint taking the lower entry;
- per-element error at most half the local codebook gap times absmax (plus float32 roundings);
- the format is idempotent: quantizing the decoded values gives the same codes and absmax,
  with the exceptions the format forces (see ``test_idempotent``);
- packing round-trips; shapes and dtypes are as documented;
- double-quantized absmax within the dynamic map's resolution; storage accounting exact.
"""

import ml_dtypes
import numpy as np
from hypothesis import assume, example, given
from hypothesis import strategies as st
from strategies import blocksizes, hard_arrays, quant_types, small_blocksizes
from tolerances import assert_bit_equal

from qlora_ref.api import dequantize_4bit, quantize_4bit
from qlora_ref.blockwise import blockwise_absmax, decode_4bit, decode_packed_4bit, pack_4bit, unpack_4bit
from qlora_ref.codebooks import codebook, zero_code
from qlora_ref.double_quant import DYNAMIC_MAP, dequantize_absmax, double_quantize
from qlora_ref.state import INPUT_DTYPES

EPS32 = 2.0**-24  # float32 unit roundoff
TINY32 = 2.0**-149  # smallest float32 subnormal


@st.composite
def cases(draw, blocksize_strategy=blocksizes):
    """(x, blocksize, quant_type), the hard-case blocks aligned with the quantization blocks."""
    blocksize = draw(blocksize_strategy)
    x = draw(hard_arrays(blocksize=draw(st.sampled_from([blocksize, 32]))))
    return x, blocksize, draw(quant_types)


def nf4_midpoint_block(dtype=np.float32):
    # Every NF4 float32 midpoint times a power-of-two absmax: x / absmax is exactly a midpoint.
    v = np.sort(codebook("nf4"))
    mids = (v[:-1] + v[1:]) / np.float32(2)
    return (np.concatenate([mids, -mids, [1.0, 0.0]]) * np.float32(4.0)).astype(np.float32).astype(dtype)


def tiny_block():
    # absmax below 2^-128: the float32 reciprocal overflows (Note: quantization semantics, 5).
    return np.array([1e-45, -3e-45, 0.0, 2e-39], np.float32)


PINNED = [
    (nf4_midpoint_block(), 64, "nf4"),
    (nf4_midpoint_block(), 32, "fp4"),
    (np.zeros((3, 7), np.float16), 32, "nf4"),  # all-zero blocks, odd count
    (tiny_block(), 32, "nf4"),
    (np.array([65504.0, -65504.0, 1.0], np.float16), 32, "int4"),  # the largest float16
    (np.array([3.3895e38, 1e-40, -1.0], np.float32).astype(ml_dtypes.bfloat16), 64, "fp4"),
    (np.linspace(-1, 1, 4097, dtype=np.float32).reshape(17, 241), 4096, "nf4"),  # partial last block
]


def scaled_values(x32, blocksize):
    """The oracle's ``s = x * float32(1 / absmax)`` and the per-element absmax and reciprocal."""
    absmax = np.repeat(blockwise_absmax(x32, blocksize), blocksize)[: x32.size]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        reciprocal = np.float32(1) / absmax
        s = x32 * reciprocal
    return s, absmax, reciprocal


def pinned(**other_arguments):
    """Decorator: run the test on every ``PINNED`` case (with ``other_arguments``) as well."""

    def decorate(test):
        for case in PINNED:
            test = example(case=case, **other_arguments)(test)
        return test

    return decorate


@given(case=cases())
@pinned()
def test_codes_are_nearest_with_ties_to_the_lower_entry(case):
    x, blocksize, quant_type = case
    x32 = x.astype(np.float32).reshape(-1)
    packed, _ = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    codes = unpack_4bit(packed, x32.size)
    table = codebook(quant_type)
    s, _, _ = scaled_values(x32, blocksize)

    zero = x32 == 0
    assert np.all(codes[zero] == zero_code(quant_type)), "zero encodes as the zero code"
    infinite = ~zero & np.isinf(s)  # reciprocal overflowed: end codes by sign
    assert np.all(table[codes[infinite]] == np.sign(x32[infinite])), "overflowed reciprocal takes the end code"

    finite = ~zero & np.isfinite(s)
    s64, value = s[finite].astype(np.float64), table[codes[finite]].astype(np.float64)
    dist = np.abs(s64[:, None] - np.sort(table).astype(np.float64)[None, :])  # (k, 16)
    best = dist.min(axis=1)
    mine = np.abs(s64 - value)
    # float32 midpoints sit up to 3e-8 from the exact ones (the rule compares with float32
    # midpoints, as bitsandbytes does): within that band the other neighbour may win.
    v = np.sort(table)
    band = np.abs((v[:-1] + v[1:]) / np.float32(2) - (v[:-1].astype(np.float64) + v[1:]) / 2).max()
    assert np.all(mine <= best + 2 * band), f"not the nearest entry: worst excess {(mine - best).max():.3e}"
    # Exactly on a float32 midpoint: the lower entry.
    mids32 = ((v[:-1] + v[1:]) / np.float32(2)).astype(np.float64)
    on = np.isin(s64, mids32)
    if on.any():
        lower = v[np.searchsorted(mids32, s64[on])].astype(np.float64)
        assert np.all(value[on] == lower), "a value on a midpoint takes the lower entry"


@given(case=cases())
@pinned()
def test_error_at_most_half_the_local_gap_times_absmax(case):
    x, blocksize, quant_type = case
    x32 = x.astype(np.float32).reshape(-1)
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    y = dequantize_4bit(packed, state, dtype="float32").reshape(-1).astype(np.float64)
    s, absmax, reciprocal = scaled_values(x32, blocksize)
    ok = np.isfinite(s)  # blocks whose reciprocal overflowed have their own rule (test above)
    ok &= np.isfinite(reciprocal)
    values = np.unique(codebook(quant_type)).astype(np.float64)  # sorted, zeros merged
    t = np.clip(x32.astype(np.float64) / np.where(absmax > 0, absmax, 1), -1, 1)
    hi = np.clip(np.searchsorted(values, t, side="left"), 1, values.size - 1)
    half_gap = (values[hi] - values[hi - 1]) / 2  # the gap around x / absmax
    a = absmax.astype(np.float64)
    r = reciprocal.astype(np.float64)
    # Roundings: the reciprocal (relative 2^-24, or one subnormal step when it is subnormal),
    # the product s, the float32 midpoints (3e-8 off), and the decoded product.
    rel_s = EPS32 + np.where(r > 0, TINY32 / np.where(r > 0, r, 1), 0) + EPS32
    budget = a * (half_gap + 3e-8 + np.abs(t) * rel_s) + np.abs(y) * EPS32 + TINY32
    err = np.abs(x32.astype(np.float64) - y)
    excess = np.where(ok, err - budget, -1.0)
    worst = int(np.argmax(excess))
    assert excess[worst] <= 0, (
        f"error {err[worst]:.6e} at {worst} (x={x32[worst]!r}, y={y[worst]!r}, absmax={absmax[worst]!r}) "
        f"exceeds the budget {budget[worst]:.6e}"
    )


def _blocks_normal_in(dtype, absmax, quant_type):
    """Blocks whose nonzero decoded values are all normal numbers of ``dtype``."""
    table = np.abs(codebook(quant_type))
    smallest = table[table > 0].min()
    tiny = float(ml_dtypes.finfo(dtype).tiny) if dtype == ml_dtypes.bfloat16 else float(np.finfo(dtype).tiny)
    return absmax.astype(np.float64) * smallest >= tiny


@given(case=cases(small_blocksizes), double_quant=st.booleans())
@pinned(double_quant=False)
@pinned(double_quant=True)
def test_idempotent(case, double_quant):
    """``quantize(dequantize(q)) == q``, exactly, within what the format can promise.

    - float32 decoding: codes and absmax reproduce exactly, except where a codebook holds a
      value twice: FP4 code 8 (a second zero, produced for tiny positive values) decodes to 0
      and re-encodes as code 0; INT4 codes 14 and 15 both decode to 1.0 and re-encode as
      either (compared as one here).
    - decoding to the input dtype (float16/bfloat16): the same, in blocks whose decoded values
      are normal numbers of that dtype; in subnormal blocks the rounding of the decoded values
      is too coarse to keep the codes.
    - double quantization: the 4-bit codes reproduce and the new first-level absmax equals the
      decoded one, in blocks whose decoded absmax is positive (a decoded absmax can be 0 for an
      all-zero block, or even negative: see Note: resolution of the nested level in
      ``qlora_ref.double_quant``); the nested level does not (it is re-derived with a new mean).
    """
    x, blocksize, quant_type = case
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    codes = unpack_4bit(packed, x.size)
    absmax = state.absmax if state.absmax is not None else dequantize_absmax(state.nested)
    # A double-quantized absmax near the float32 maximum can reconstruct as inf (the format's
    # float32 add overflows): its block decodes to inf/NaN, which cannot be quantized again.
    assume(np.all(np.isfinite(absmax)))
    expected = codes.copy()
    if quant_type == "fp4":
        expected[expected == 8] = 0
    first_level = blockwise_absmax(x.astype(np.float32).reshape(-1), blocksize)
    kept_blocks = (absmax > 0) & (first_level > 0)
    per_element = np.repeat(absmax, blocksize)[: x.size]
    for out in ("float32", state.dtype):
        y = dequantize_4bit(packed, state, dtype=out)
        if not np.all(np.isfinite(y.astype(np.float32))):
            # A decoded value beyond the output dtype's range (float16's 65504) rounds to inf,
            # which no 4-bit format can quantize again.
            continue
        packed2, state2 = quantize_4bit(y, blocksize=blocksize, quant_type=quant_type)
        codes2 = unpack_4bit(packed2, x.size)
        if out == "float32":
            assert_bit_equal(state2.absmax[kept_blocks], absmax[kept_blocks].astype(np.float32),
                             "absmax after a round trip")
        keep = np.repeat(kept_blocks, blocksize)[: x.size] & _blocks_normal_in(INPUT_DTYPES[out], per_element, quant_type)
        keep |= np.repeat(first_level == 0, blocksize)[: x.size]  # all-zero blocks stay zero codes
        if quant_type == "int4":
            codes2, expected = np.minimum(codes2, 14), np.minimum(expected, 14)
        assert_bit_equal(codes2[keep], expected[keep], f"codes after a round trip through {out}")


@given(codes=st.lists(st.integers(0, 15), min_size=1, max_size=301), quant_type=quant_types)
@example(codes=[1], quant_type="fp4")
def test_packing_round_trips(codes, quant_type):
    codes = np.array(codes, np.uint8)
    packed = pack_4bit(codes, quant_type)
    assert packed.dtype == np.uint8 and packed.shape == ((codes.size + 1) // 2, 1)
    assert_bit_equal(unpack_4bit(packed, codes.size), codes, "unpacked codes")
    assert packed[0, 0] >> 4 == codes[0], "first element in the high nibble"
    if codes.size % 2:
        assert packed[-1, 0] & 0x0F == zero_code(quant_type), "odd count padded with the zero code"


@given(case=cases(), double_quant=st.booleans())
def test_the_fast_decoder_equals_the_definition(case, double_quant):
    """``dequantize_4bit`` runs ``decode_packed_4bit``; it equals ``decode_4bit(unpack_4bit(...))``."""
    x, blocksize, quant_type = case
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    absmax = state.absmax if state.absmax is not None else dequantize_absmax(state.nested)
    definition = decode_4bit(unpack_4bit(packed, state.numel), absmax, blocksize, state.codebook)
    fast = decode_packed_4bit(packed.reshape(-1), state.numel, absmax, blocksize, state.codebook)
    assert_bit_equal(fast, definition, "decode_packed_4bit vs decode_4bit")


@given(case=cases(), double_quant=st.booleans())
@pinned(double_quant=True)
def test_shapes_and_dtypes(case, double_quant):
    x, blocksize, quant_type = case
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    n, n_blocks = x.size, -(-x.size // blocksize)
    assert packed.dtype == np.uint8 and packed.shape == ((n + 1) // 2, 1)
    assert state.shape == x.shape and state.n_blocks == n_blocks and state.blocksize == blocksize
    assert INPUT_DTYPES[state.dtype] == x.dtype
    if double_quant:
        nested = state.nested
        assert nested.codes.dtype == np.uint8 and nested.codes.shape == (n_blocks,)
        assert nested.absmax.dtype == np.float32 and nested.absmax.shape == (-(-n_blocks // 256),)
        assert nested.offset.dtype == np.float32
    else:
        assert state.absmax.dtype == np.float32 and state.absmax.shape == (n_blocks,)
    assert dequantize_4bit(packed, state).dtype == x.dtype
    for name, dtype in INPUT_DTYPES.items():
        y = dequantize_4bit(packed, state, dtype=name)
        assert y.shape == x.shape and y.dtype == dtype


@given(case=cases())
@pinned()
def test_double_quantized_absmax_within_the_dynamic_maps_resolution(case):
    x, blocksize, quant_type = case
    absmax32 = blockwise_absmax(x.astype(np.float32).reshape(-1), blocksize)
    nested = double_quantize(absmax32)
    absmax = absmax32.astype(np.float64)
    decoded = dequantize_absmax(nested).astype(np.float64)
    c = np.repeat(nested.absmax, 256)[: absmax.size].astype(np.float64)  # nested absmax per value
    table = DYNAMIC_MAP.astype(np.float64)
    q = nested.codes.astype(np.int64)
    # Half the larger gap next to the chosen entry bounds |v / c - map[q]| for the nearest entry.
    gaps = np.diff(table)
    half_gap = np.maximum(gaps[np.clip(q - 1, 0, 254)], gaps[np.clip(q, 0, 254)]) / 2
    off = abs(float(nested.offset))
    # Roundings: v = absmax - offset, the reciprocal and product in the scaling, the decoded
    # product and the final add (float32 each).
    budget = c * half_gap + 4 * EPS32 * (absmax + off + c) + TINY32
    # A subnormal nested absmax (below 2^-126): the float32 reciprocal overflows below 2^-128 and
    # the scaled values saturate to the end codes (the "subnormal nested absmax" class of
    # qlora_ref.conformance.classify); every code then decodes within 2 * c of any value in the block.
    budget = np.where(c < float(np.finfo(np.float32).tiny), np.maximum(budget, 2 * c + TINY32), budget)
    # The format's float32 add overflows to inf only where the exact sum is beyond float32.
    exact = table[q] * c + float(nested.offset)
    overflow = ~np.isfinite(decoded)
    assert np.all(np.abs(exact[overflow]) >= float(np.finfo(np.float32).max) * (1 - 2.0**-22)), "inf without overflow"
    err = np.where(overflow, 0.0, np.abs(decoded - absmax))
    worst = int(np.argmax(err - budget))
    assert err[worst] <= budget[worst], (
        f"absmax {absmax[worst]!r} decoded as {decoded[worst]!r}: error {err[worst]:.3e} > budget {budget[worst]:.3e}"
    )


def test_storage_accounting_is_exact():
    x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    packed, state = quantize_4bit(x, blocksize=64, double_quant=True)
    n = x.size
    n_blocks, n_nested = n // 64, n // 64 // 256
    # packed codes, uint8 absmax codes, float32 nested absmax, the float32 offset, the 16-entry
    # codebook and the 256-entry dynamic map (Note: storage accounting in qlora_ref.state).
    assert state.nbytes == n // 2 + n_blocks + 4 * n_nested + 4 + 4 * 16 + 4 * 256
    assert abs(state.bits_per_parameter - (4 + 8 / 64 + 32 / (64 * 256))) < 8 * (4 + 64 + 1024) / n + 1e-12
    _, plain = quantize_4bit(x, blocksize=64)
    assert plain.nbytes == n // 2 + 4 * n_blocks + 4 * 16
