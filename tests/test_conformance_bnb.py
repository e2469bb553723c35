"""The oracle against bitsandbytes 0.50 on CPU: codes, absmax, double quantization, decoding, files.

Tier "exact" where the two must agree bit for bit (packed bytes and absmax on ordinary data,
the nested absmax, decoding the same state, the state-dict entries), tier "classified" where
bitsandbytes' CPU path follows another rule: every difference must fall in a class of
``qlora_ref.conformance.classify`` (see its Note: difference classes) and is counted. Classes met here:

- ``absmax clamp 1e-38``: blocks whose absmax is below 1e-38 (bfloat16 subnormals): bnb scales
  by the clamped absmax and stores it clamped for a partial last block.
- ``partial block division``: bnb divides in a partial last block (rare: the quotient and the
  product by the reciprocal round apart only near midpoints).
- ``approximate lookup table``: nested codes from bnb's CPU lookup table.
- ``subnormal nested absmax``: nested codes of a nested block whose absmax is subnormal.
- ``all-zero nested block``: nested codes where every absmax of a nested block equals the offset.
- ``offset ulp``: bnb's float32 mean of the absmax against the oracle's correctly rounded one.
- ``offset sum overflow``: bnb's float32 sum of huge absmax values overflows, its offset is inf
  and its nested state is unusable (``from_bnb_state_dict`` refuses it).
- decoded values: explained only when the decoder model of ``qlora_ref.conformance.variants`` that this
  machine's bitsandbytes follows (asked by ``tests/bnb_cpu.py``, never assumed) reproduces them
  exactly: ``fp4 negative zero`` (its native scalar loop), ``row-crossing absmax`` and ``bf16
  flush to zero`` (its AVX-512 loop, on CPUs that have one).

Known bnb limitation worked around in ``bnb_decode``: ``dequantize_4bit`` transposes its output
when the packed tensor has one row, which fails for a 3-D shape of one or two elements.
"""

import collections

import ml_dtypes
import numpy as np
import pytest
from bnb_cpu import decode_model as bnb_decode_model
from hypothesis import example, given
from strategies import DTYPES, blocksizes, bnb_quant_types, hard_arrays
from tolerances import assert_bit_equal

from qlora_ref.api import dequantize_4bit, quantize_4bit
from qlora_ref.blockwise import unpack_4bit
from qlora_ref.conformance.classify import (
    UNCLASSIFIED,
    classify_absmax,
    classify_decoded,
    classify_nested_codes,
    classify_offset,
    classify_packed,
)
from qlora_ref.conformance.variants import DECODE_MODELS
from qlora_ref.double_quant import dequantize_absmax, double_quantize
from qlora_ref.formats.bnb import from_bnb_state_dict, to_bnb_state_dict
from qlora_ref.state import BLOCKSIZES

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

from qlora_gpu.state import tensor_from_numpy, tensor_to_numpy  # noqa: E402

OUTPUT_DTYPES = ("float32", "float16", "bfloat16")


@pytest.fixture(autouse=True, scope="module")
def eager_bitsandbytes():
    # bnb wraps its Python fallbacks in torch.compile, which recompiles for every new shape
    # (seconds each); the eager functions compute the same thing. Restored after this module.
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_state_dict(packed_t, qs) -> dict:
    """bitsandbytes' own layer entries (what Linear4bit writes), keys relative to the layer."""
    d = {"weight": tensor_to_numpy(packed_t)}
    d.update({"weight." + k: tensor_to_numpy(v) for k, v in qs.as_dict(packed=True).items()})
    return d


def bnb_decode(packed_t, qs, dtype: str) -> np.ndarray:
    saved = qs.dtype, qs.shape
    qs.dtype = getattr(torch, dtype)
    if packed_t.shape[0] == 1 and len(qs.shape) > 2:  # see the module docstring
        qs.shape = torch.Size([int(np.prod(qs.shape))])
    try:
        return tensor_to_numpy(F.dequantize_4bit(packed_t, qs))
    finally:
        qs.dtype, qs.shape = saved


def assert_classified(diff, x=None) -> None:
    if diff.unclassified:
        bad = diff.index[diff.classes == UNCLASSIFIED][:5]
        where = f"; x at those positions: {np.asarray(x).reshape(-1)[np.minimum(bad, x.size - 1)]!r}" if x is not None else ""
        raise AssertionError(f"{diff}; unclassified at flat positions {bad.tolist()}{where}")


def assert_same_state_dict(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs), f"keys {list(ours)} != bitsandbytes' {list(theirs)}"
    for k in theirs:
        assert_bit_equal(ours[k], theirs[k], k)


def compare_with_bnb(x: np.ndarray, blocksize: int, quant_type: str) -> collections.Counter:
    """Run every comparison for one input; return the counts of the difference classes."""
    counts = collections.Counter()
    t = tensor_from_numpy(x)
    p0, s0 = F.quantize_4bit(t, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    p1, s1 = F.quantize_4bit(t, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    assert_bit_equal(tensor_to_numpy(p1), tensor_to_numpy(p0), "bnb packed with and without double quantization")

    # First level: packed bytes and absmax.
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    diffs = [classify_packed(x, packed, tensor_to_numpy(p0), blocksize=blocksize, quant_type=quant_type),
             classify_absmax(x, state.absmax, tensor_to_numpy(s0.absmax), blocksize=blocksize)]

    # Double quantization of bnb's own first-level absmax: the offset, then (given bnb's
    # offset, to isolate the encoding) the nested absmax exactly and the nested codes classified.
    absmax = tensor_to_numpy(s0.absmax)
    theirs_offset = tensor_to_numpy(s1.offset)[()]
    diffs.append(classify_offset(absmax, double_quantize(absmax).offset, theirs_offset))
    states = [(p0, s0)]
    if np.isfinite(theirs_offset):
        nested = double_quantize(absmax, offset=theirs_offset)
        assert_bit_equal(nested.absmax, tensor_to_numpy(s1.state2.absmax), "nested absmax")
        diffs.append(classify_nested_codes(absmax - nested.offset, nested.codes, tensor_to_numpy(s1.absmax)))
        states.append((p1, s1))

    # bitsandbytes' own states: the file entries round-trip, and decode bit for bit.
    for p, qs in states:
        theirs = bnb_state_dict(p, qs)
        packed_b, state_b = from_bnb_state_dict(theirs)
        assert_same_state_dict(to_bnb_state_dict(packed_b, state_b), theirs)
        codes = unpack_4bit(packed_b, x.size)
        absmax_b = state_b.absmax if state_b.absmax is not None else dequantize_absmax(state_b.nested)
        for dtype in OUTPUT_DTYPES:
            y = dequantize_4bit(packed_b, state_b, dtype=dtype)
            diff = classify_decoded(codes, y, bnb_decode(p, qs, dtype).reshape(y.shape), quant_type=quant_type,
                                    absmax=absmax_b, blocksize=blocksize)
            # The model this machine's bitsandbytes follows (asked, not assumed) reproduces it.
            assert bnb_decode_model() in diff.models, (str(diff), diff.models, bnb_decode_model())
            diffs.append(diff)

    for diff in diffs[:2]:  # the first level: bitsandbytes' CPU encoder model reproduces it
        assert "bitsandbytes cpu" in diff.models, (str(diff), diff.models)
    for diff in diffs:
        assert_classified(diff, x if diff.what == "codes" else None)
        counts.update({(diff.what, name): n for name, n in diff.counts().items()})
    return counts


def float32_subnormals():
    # Absmax values of a few subnormal steps: the nested absmax is subnormal too.
    return (np.random.default_rng(1).standard_normal((256, 1)) * 1.2e-44).astype(np.float32)


def subnormal_partial_block():
    # bfloat16 subnormals: absmax far below 1e-38, in a full block and in a partial last block.
    x = (np.random.default_rng(1).standard_normal(100) * 1e-39).astype(np.float32)
    return x.astype(ml_dtypes.bfloat16)


@given(x=hard_arrays(), blocksize=blocksizes, quant_type=bnb_quant_types)
@example(x=subnormal_partial_block(), blocksize=64, quant_type="nf4")
@example(x=float32_subnormals(), blocksize=64, quant_type="nf4")
@example(x=np.zeros((3, 5), np.float16), blocksize=32, quant_type="fp4")
@example(x=np.full(64, 3.0e38, np.float32), blocksize=32, quant_type="nf4")  # absmax sum overflows
@example(x=np.array([[[0.5]]], ml_dtypes.bfloat16), blocksize=64, quant_type="nf4")  # one element, 3-D
def test_matches_bnb_on_hard_inputs(x, blocksize, quant_type):
    compare_with_bnb(x, blocksize, quant_type)


def test_pinned_classes_occur():
    # The named classes are real: each pinned input shows its class (and nothing unclassified).
    counts = compare_with_bnb(subnormal_partial_block(), 64, "nf4")
    assert counts[("codes", "absmax clamp 1e-38")] > 0 and counts[("absmax", "absmax clamp 1e-38")] == 1
    counts = compare_with_bnb(np.full(64, 3.0e38, np.float32), 32, "nf4")
    assert counts[("offset", "offset sum overflow")] == 1
    counts = compare_with_bnb(float32_subnormals(), 64, "nf4")
    assert counts[("nested codes", "subnormal nested absmax")] > 0
    # An even last dimension that is not a multiple of 16: the native scalar loop on every CPU.
    x = np.random.default_rng(0).standard_normal((64, 30)).astype(np.float32)
    counts = compare_with_bnb(x, 64, "fp4")
    assert counts[("decoded", "fp4 negative zero")] > 0
    # A multiple of 16 with blocks crossing rows: the AVX-512 loop where the CPU has one.
    x = np.random.default_rng(0).standard_normal((40, 48)).astype(np.float32)
    counts = compare_with_bnb(x, 32, "nf4")
    row_crossing = "row-crossing absmax" in DECODE_MODELS[bnb_decode_model()]
    assert (counts[("decoded", "row-crossing absmax")] > 0) == row_crossing, (bnb_decode_model(), counts)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_layers_every_blocksize(dtype, quant_type, capsys):
    """Standard-normal layers, one even and one irregular, at every block size: counted classes."""
    rng = np.random.default_rng(0)
    layers = [rng.standard_normal((256, 1024)), rng.standard_normal((67, 301)) * 0.02]
    counts = collections.Counter()
    for x in layers:
        for blocksize in BLOCKSIZES:
            counts += compare_with_bnb(x.astype(np.float32).astype(DTYPES[dtype]), blocksize, quant_type)
    with capsys.disabled():
        print(f"\n[bnb {quant_type} {dtype}] " + ", ".join(f"{w}/{c}: {n}" for (w, c), n in sorted(counts.items())))
    # On ordinary data the first level differs only by the division in a partial last block;
    # the absmax is bit-identical.
    assert {name for what, name in counts if what in ("codes", "absmax")} <= {"partial block division"}, counts
    if dtype == "float32" and quant_type == "nf4":
        # docs/spec.md, section 4.5: bnb's CPU lookup table moves a fraction of a percent of codes.
        assert counts[("nested codes", "approximate lookup table")] > 0
