"""``qlora-ref check`` against deliberately broken implementations: each must fail (exit 1) with
the right diagnosis, and restricted correct ones must pass.

Each broken implementation below is the oracle with ONE defect of a kind met in real code (the
issue that asked for this lists them), written in the user protocol (docs/conformance.md) or as a
provider when the defect is in double quantization. The diagnosis each must get is the known
defect of ``qlora_ref.conformance.variants`` that reproduces its differences exactly; none of them may be
explained by a model of a real implementation.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from qlora_ref.api import quantize_4bit
from qlora_ref.blockwise import blockwise_absmax, decode_4bit, encode_4bit, pack_4bit, unpack_4bit
from qlora_ref.cli import main
from qlora_ref.codebooks import codebook, normal_float_codebook
from qlora_ref.conformance.implementations import resolve
from qlora_ref.double_quant import double_quantize
from qlora_ref.state import numpy_dtype

OUT = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _flat(x):
    return np.asarray(x).astype(np.float32).reshape(-1)


def _encode_with_table(x, blocksize, quant_type, table):
    x32 = _flat(x)
    absmax = blockwise_absmax(x32, blocksize)
    order = np.argsort(table, kind="stable")
    v = table[order]
    midpoints = (v[:-1] + v[1:]) / np.float32(2)
    with np.errstate(all="ignore"):
        s = x32 * np.repeat(np.float32(1) / absmax, blocksize)[: x32.size]
    codes = order[np.searchsorted(midpoints, s, side="left")].astype(np.uint8)
    codes[x32 == 0] = int(np.flatnonzero(table == 0)[0])
    return pack_4bit(codes, quant_type), absmax


# ----------------------------------------------------------------------------- encoders


def float64_nf4_table(x, blocksize):
    """NF4 only, with the table computed in float64 from the normal quantiles."""
    return _encode_with_table(x, blocksize, "nf4", normal_float_codebook(4, pipeline="float64"))


def four_decimal_table(x, blocksize):
    """NF4 only, with the table rounded to 4 decimals (as printed in papers)."""
    table = np.round(codebook("nf4").astype(np.float64), 4).astype(np.float32)
    return _encode_with_table(x, blocksize, "nf4", table)


def ties_up(x, blocksize, quant_type):
    """A value exactly on a midpoint takes the upper entry."""
    from qlora_ref.conformance.variants import encode_defect

    codes = encode_defect("ties to the upper code", x, blocksize, quant_type)
    return pack_4bit(codes, quant_type), blockwise_absmax(_flat(x), blocksize)


def division_scaling(x, blocksize, quant_type):
    """Scales by a float32 division ``x / absmax``."""
    x32 = _flat(x)
    absmax = blockwise_absmax(x32, blocksize)
    with np.errstate(all="ignore"):
        s = x32 / np.repeat(absmax, blocksize)[: x32.size]
    table = codebook(quant_type)
    order = np.argsort(table, kind="stable")
    midpoints = (table[order][:-1] + table[order][1:]) / np.float32(2)
    codes = order[np.searchsorted(midpoints, s, side="left")].astype(np.uint8)
    codes[x32 == 0] = int(np.flatnonzero(table == 0)[0])
    return pack_4bit(codes, quant_type), absmax


def float64_scaling(x, blocksize, quant_type):
    """Scales by the float64 quotient."""
    x32 = _flat(x)
    absmax = blockwise_absmax(x32, blocksize)
    with np.errstate(all="ignore"):
        s = x32.astype(np.float64) / np.repeat(absmax.astype(np.float64), blocksize)[: x32.size]
    table = codebook(quant_type)
    order = np.argsort(table, kind="stable")
    midpoints = ((table[order][:-1] + table[order][1:]) / np.float32(2)).astype(np.float64)
    codes = order[np.searchsorted(midpoints, s, side="left")].astype(np.uint8)
    codes[x32 == 0] = int(np.flatnonzero(table == 0)[0])
    return pack_4bit(codes, quant_type), absmax


def off_by_one_blocks(x, blocksize, quant_type):
    """The absmax of block b runs over ``blocksize + 1`` elements (an inclusive end)."""
    x32 = _flat(x)
    starts = np.arange(0, x32.size, blocksize)
    absmax = np.array([np.abs(x32[s:s + blocksize + 1]).max() for s in starts], np.float32)
    return pack_4bit(encode_4bit(x32, absmax, blocksize, quant_type), quant_type), absmax


def swapped_nibbles(x, blocksize, quant_type):
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    return ((packed & 0x0F) << 4) | (packed >> 4), state.absmax


def wrong_zero_code(x, blocksize):
    """NF4 only: zero encoded as code 0 (which decodes to -absmax)."""
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    codes = unpack_4bit(packed, state.numel)
    codes[_flat(x) == 0] = 0
    return pack_4bit(codes, "nf4"), state.absmax


def wrong_pad_nibble(x, blocksize, quant_type):
    """The unused low nibble of an odd count is 0xF instead of the zero code."""
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    packed = packed.reshape(-1).copy()
    if state.numel % 2:
        packed[-1] |= 0x0F
    return packed, state.absmax


# ----------------------------------------------------------------------------- decoders


def double_rounding_fp16(packed, absmax, shape, blocksize, quant_type, dtype):
    """The float64 product rounded straight to the output dtype (no float32 step)."""
    n = int(np.prod(shape))
    codes = unpack_4bit(packed, n)
    y = codebook(quant_type).astype(np.float64)[codes] * np.repeat(absmax.astype(np.float64), blocksize)[:n]
    if dtype == "bfloat16":  # ml_dtypes rounds float64 to bfloat16 through float32: keep it right
        y = y.astype(np.float32)
    return y.astype(OUT[dtype]).reshape(shape)


def truncating_bf16(packed, absmax, shape, blocksize, quant_type, dtype):
    """float32 to bfloat16 by dropping the low 16 bits."""
    n = int(np.prod(shape))
    y = decode_4bit(unpack_4bit(packed, n), absmax, blocksize, codebook(quant_type))
    if dtype == "bfloat16":
        return (y.view(np.uint32) >> 16).astype(np.uint16).view(ml_dtypes.bfloat16).reshape(shape)
    return y.astype(OUT[dtype]).reshape(shape)


def four_decimal_decode(packed, absmax, shape, blocksize, quant_type, dtype):
    n = int(np.prod(shape))
    table = np.round(codebook(quant_type).astype(np.float64), 4).astype(np.float32)
    return decode_4bit(unpack_4bit(packed, n), absmax, blocksize, table).astype(OUT[dtype]).reshape(shape)


# ----------------------------------------------------------------------------- double quantization


class _OracleWithNested:
    """The oracle as a provider, with a defect in its double quantization (subclasses)."""

    def available(self):
        return True, ""

    def supports(self, quant_type, double_quant):
        return quant_type in ("nf4", "fp4") and double_quant in (False, True)

    def nested(self, absmax):
        raise NotImplementedError

    def quantize(self, x, *, blocksize, quant_type, double_quant):
        packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        if not double_quant:
            return packed, state
        from dataclasses import replace

        return packed, replace(state, absmax=None, nested=self.nested(state.absmax))

    def dequantize(self, packed, state, *, dtype):
        from qlora_ref.api import dequantize_4bit

        return dequantize_4bit(packed, state, dtype=dtype)


class OffsetDividedByNPlusOne(_OracleWithNested):
    def nested(self, absmax):
        offset = np.float32(absmax.astype(np.float64).sum() / (absmax.size + 1))
        return double_quantize(absmax, offset=offset)


class NestedBlocksize128(_OracleWithNested):
    def nested(self, absmax):
        return double_quantize(absmax, blocksize=128)


# ----------------------------------------------------------------------------- the verdicts

BROKEN = [
    # (spec, what check must say, check options)
    ("test_check_broken:float64_nf4_table", "'NF4 codebook from a float64 pipeline'", []),
    ("test_check_broken:four_decimal_table", "'codebook rounded to 4 decimals'", []),
    ("test_check_broken:ties_up", "'ties to the upper code'", []),
    ("test_check_broken:division_scaling", "'scaling by float32 division'", []),
    ("test_check_broken:float64_scaling", "'scaling in float64'", []),
    ("test_check_broken:off_by_one_blocks", "an off-by-one block boundary", []),
    ("test_check_broken:swapped_nibbles", "the nibbles are swapped", []),
    ("test_check_broken:wrong_zero_code", "zeros encoded as code 0 (the zero code is 7)", []),
    ("test_check_broken:wrong_pad_nibble", "the pad nibble of an odd count is 15", []),
    ("test_check_broken:,double_rounding_fp16", "'product rounded once from float64'", ["--rounds", "1"]),
    ("test_check_broken:,truncating_bf16", "'bfloat16 by truncation'", []),
    ("test_check_broken:,four_decimal_decode", "'codebook rounded to 4 decimals'", []),
    ("test_check_broken:OffsetDividedByNPlusOne", "the offset is the sum divided by n + 1", []),
    ("test_check_broken:NestedBlocksize128", "its nested blocksize is 128, the format's is 256", []),
]


@pytest.mark.parametrize("spec,diagnosis,options", BROKEN, ids=[b[0].split(":")[1].strip(",") for b in BROKEN])
def test_broken_implementation_fails_with_its_diagnosis(spec, diagnosis, options, capsys):
    # The golden vectors alone, except where an option adds the random inputs.
    assert main(["check", spec, "--rounds", "0", "--no-time", *options]) == 1
    out = capsys.readouterr().out
    assert diagnosis in out, out[-3000:]


def test_a_wrong_offset_is_caught_at_any_size():
    # 8192 blocks: the old tolerance, (n - 1) * 2^-24 relative, let an n + 1 divisor pass.
    x = np.random.default_rng(0).standard_normal(8192 * 64).astype(np.float32)
    from qlora_ref.conformance.compare import Row, check_quantize
    from qlora_ref.conformance.vector_cases import quantize_case

    case = quantize_case("big", x, blocksize=64, quant_type="nf4", description="", tags=[])
    row = Row("n+1", "big")
    check_quantize(resolve("test_check_broken:OffsetDividedByNPlusOne"), x, case.params, case.arrays, row, "big")
    assert row.unexplained >= 1 and "the offset is the sum divided by n + 1" in row.diagnoses


def test_inputs_reach_every_shape_kind_and_blocksize():
    from qlora_ref.conformance.run import SHAPE_KINDS, random_inputs

    shapes = [x.shape for _, _, x in random_inputs(rounds=len(SHAPE_KINDS))]
    blocks = {b for _, b, _ in random_inputs(rounds=len(SHAPE_KINDS))}
    assert {len(s) for s in shapes} == {1, 2, 3}
    assert any(s[-1] % 2 for s in shapes) and any(s[-1] % 16 == 0 for s in shapes)
    assert any(s[-1] % 2 == 0 and s[-1] % 16 for s in shapes)
    assert len(blocks) >= 6 and max(blocks) >= 2048
    # Subnormal products with a normal absmax occur.
    tiny = np.finfo(np.float32).tiny
    found = False
    for quant_type, blocksize, x in random_inputs(rounds=2):
        packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        y = decode_4bit(unpack_4bit(packed, x.size), state.absmax, blocksize, codebook(quant_type))
        block_normal = np.repeat(state.absmax >= tiny, blocksize)[: x.size]
        found |= bool(np.any(block_normal & (np.abs(y) < tiny) & (y != 0)))
    assert found
    assert numpy_dtype("bfloat16") in {x.dtype for _, _, x in random_inputs()}
