"""The registry's providers made by qlora_gpu: the fast path (``torch``, ``triton``) bit for bit
against the oracle, the comparators (``bnb``, ``torchao``) converting their libraries' states
exactly (decoding them gives the library's own values) with their differences classified."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bnb_cpu import bnb_decoded  # noqa: E402
from tolerances import assert_bit_equal, assert_bit_equal_or_both_nan  # noqa: E402

import qlora_ref as R  # noqa: E402
from qlora_ref.conformance.providers import PROVIDERS, available_providers, load_provider  # noqa: E402
from qlora_ref.double_quant import dequantize_absmax  # noqa: E402
from qlora_ref.state import numpy_dtype  # noqa: E402
from qlora_ref.torchao_nf4 import quantize_torchao  # noqa: E402

RNG = np.random.default_rng(7)
X = (RNG.standard_normal((40, 96)) * RNG.uniform(0.1, 3, (40, 1))).astype(np.float32)
X[3, :64] = 0  # an all-zero block


def provider_or_skip(name):
    p = load_provider(name)
    ok, reason = p.available()
    if not ok:
        pytest.skip(reason)
    return p


def test_every_registered_provider_loads_and_says_whether_it_is_available():
    status = available_providers()
    assert set(status) == set(PROVIDERS)
    for name, (ok, reason) in status.items():
        assert isinstance(ok, bool) and (ok or reason), name
        assert load_provider(name).name == name


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False), ("int4", "bnb")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_providers_are_the_oracle(name, quant_type, double_quant, dtype):
    p = provider_or_skip(name)
    x = X.astype(numpy_dtype(dtype))
    packed, state = p.quantize(x, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    packed_ref, state_ref = R.quantize_4bit(x, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    assert_bit_equal(packed, packed_ref, "packed")
    assert state.dtype == dtype and state.nbytes == state_ref.nbytes
    for out in ("float32", "bfloat16"):
        assert_bit_equal_or_both_nan(p.dequantize(packed_ref, state_ref, dtype=out),
                                     R.dequantize_4bit(packed_ref, state_ref, dtype=out), out)
    assert not p.supports("nf4", "torchao")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_provider(quant_type, double_quant):
    p = provider_or_skip("bnb")
    packed, state = p.quantize(X, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    packed_ref, state_ref = R.quantize_4bit(X, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    codes, codes_ref = R.unpack_4bit(packed, X.size), R.unpack_4bit(packed_ref, X.size)
    differ = codes != codes_ref
    if quant_type == "nf4":
        assert not differ.any()
    else:  # FP4's two zeros, chosen by sign (bitsandbytes) or by the midpoint rule (oracle)
        assert set(codes[differ].tolist()) <= {0, 8} and set(codes_ref[differ].tolist()) <= {0, 8}
    if double_quant:
        n = state.nested
        wrong = n.codes != state_ref.nested.codes
        # Its CPU lookup table (65536 entries): rare misses, always to a neighbouring code.
        assert wrong.mean() < 0.01 and np.all(np.abs(n.codes[wrong].astype(int) - state_ref.nested.codes[wrong]) == 1)
    else:
        assert_bit_equal(state.absmax, state_ref.absmax, "absmax")
    # The converted state decodes, in the oracle running the model this machine's bitsandbytes
    # follows (tests/bnb_cpu.py), to bitsandbytes' own values.
    theirs = p.dequantize(packed, state, dtype="float32")
    absmax = state.absmax if state.absmax is not None else dequantize_absmax(state.nested)
    ours = bnb_decoded(R.unpack_4bit(packed, X.size), absmax, X.shape, 64, quant_type, "float32")
    assert_bit_equal(theirs.reshape(ours.shape), ours, "bitsandbytes decode")
    with pytest.raises(ValueError, match="int4"):
        p.quantize(X, quant_type="int4")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torchao_provider_is_the_oracles_torchao_scheme(dtype):
    p = provider_or_skip("torchao")
    x = np.resize(X, (64, 512)).astype(numpy_dtype(dtype))
    packed, state = p.quantize(x, blocksize=64, double_quant="torchao")
    # Given torchao's mean (its float32 reduction order), the oracle reproduces every field.
    packed_ref, state_ref = quantize_torchao(x, blocksize=64, mean=state.nested.offset)
    assert_bit_equal(packed, packed_ref, "packed")
    assert_bit_equal(state.nested.codes, state_ref.nested.codes, "int8 scalers")
    assert_bit_equal(state.nested.absmax, state_ref.nested.absmax, "factors")
    assert_bit_equal(state.codebook, state_ref.codebook, "rounded table")
    assert_bit_equal(p.dequantize(packed, state), R.dequantize_4bit(packed_ref, state_ref), "decode")
    with pytest.raises(ValueError, match="multiple"):
        p.quantize(X, double_quant="torchao")
