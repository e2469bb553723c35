"""Bad input gets a clear TypeError or ValueError that names the problem.

Quantization (dtype, block size, empty, NaN/Inf, unknown options), decoding with a state that
does not match the packed data, double quantization, the torchao scheme, and bitsandbytes state
dicts that are damaged in every way a reader must catch (``qlora_ref.formats.bnb``).
"""

import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from strategies import non_finite_arrays

from qlora_ref.api import dequantize_4bit, quantize_4bit
from qlora_ref.conformance.classify import classify_codes, classify_packed
from qlora_ref.double_quant import double_quantize
from qlora_ref.formats.bnb import ARRAY_KEYS, from_bnb_state_dict, to_bnb_state_dict
from qlora_ref.state import QuantState
from qlora_ref.torchao_nf4 import quantize_torchao

X = np.random.default_rng(0).standard_normal((8, 33)).astype(np.float32)  # 264 elements, partial block


# --------------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("x", [X.astype(np.float64), X.astype(np.int32), np.array([True, False])],
                         ids=["float64", "int32", "bool"])
def test_wrong_dtype(x):
    with pytest.raises(TypeError, match="unsupported dtype"):
        quantize_4bit(x)


def test_not_an_array():
    with pytest.raises(TypeError, match="NumPy array"):
        quantize_4bit([1.0, 2.0])


@pytest.mark.parametrize("blocksize", [16, 100, 8192, 0, -64])
def test_disallowed_blocksize(blocksize):
    with pytest.raises(ValueError, match=f"blocksize {blocksize} is not allowed"):
        quantize_4bit(X, blocksize=blocksize)


@pytest.mark.parametrize("blocksize", [64.0, True, "64"])
def test_blocksize_not_an_int(blocksize):
    with pytest.raises(TypeError, match="blocksize must be an int"):
        quantize_4bit(X, blocksize=blocksize)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_empty_array(dtype):
    with pytest.raises(ValueError, match="empty"):
        quantize_4bit(np.zeros((0, 4), dtype))


@given(x=non_finite_arrays())
def test_nan_and_inf_are_refused(x):
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_4bit(x)


def test_unknown_options():
    with pytest.raises(ValueError, match="unknown quant_type 'nf8'"):
        quantize_4bit(X, quant_type="nf8")
    with pytest.raises(ValueError, match="double_quant must be"):
        quantize_4bit(X, double_quant="yes")
    with pytest.raises(ValueError, match="torchao scheme exists for quant_type='nf4' only"):
        quantize_4bit(np.zeros(64 * 256, np.float32), quant_type="fp4", double_quant="torchao")


# ----------------------------------------------------------------- decoding, mismatched state


@pytest.fixture(params=[False, True], ids=["plain", "double_quant"])
def quantized(request):
    return quantize_4bit(X, blocksize=32, double_quant=request.param)


def test_packed_size_does_not_match_the_state(quantized):
    packed, state = quantized
    for bad in (packed[:-1], np.concatenate([packed, packed[:1]]), packed.reshape(1, -1)):
        with pytest.raises(ValueError, match=r"packed has shape .* needs \(132, 1\) bytes"):
            dequantize_4bit(bad, state)


def test_packed_of_the_wrong_type(quantized):
    packed, state = quantized
    with pytest.raises(TypeError, match="packed must be a uint8 NumPy array"):
        dequantize_4bit(packed.astype(np.int16), state)
    with pytest.raises(TypeError, match="state must be a QuantState"):
        dequantize_4bit(packed, {"absmax": None})


def test_state_shape_does_not_match(quantized):
    packed, state = quantized
    with pytest.raises(ValueError, match="packed has shape"):
        dequantize_4bit(packed, dataclasses.replace(state, shape=(8, 34)))


def test_constants_of_the_wrong_length(quantized):
    packed, state = quantized
    if state.absmax is not None:
        with pytest.raises(ValueError, match=r"absmax has shape \(8,\), expected \(9,\)"):
            dequantize_4bit(packed, dataclasses.replace(state, absmax=state.absmax[:-1]))
    else:
        nested = dataclasses.replace(state.nested, codes=state.nested.codes[:-1])
        with pytest.raises(ValueError, match=r"nested absmax codes have shape \(8,\), expected \(9,\)"):
            dequantize_4bit(packed, dataclasses.replace(state, nested=nested))
    with pytest.raises(ValueError, match="code map must have 16 entries"):
        dequantize_4bit(packed, dataclasses.replace(state, codebook=state.codebook[:8]))


def test_unsupported_output_dtype(quantized):
    packed, state = quantized
    with pytest.raises(TypeError, match="unsupported dtype"):
        dequantize_4bit(packed, state, dtype=np.float64)


def test_state_holds_exactly_one_form_of_absmax(quantized):
    _, state = quantized
    with pytest.raises(ValueError, match="exactly one of absmax and nested"):
        QuantState(shape=(2,), dtype="float32", blocksize=64, quant_type="nf4", codebook=state.codebook)


# ------------------------------------------------------------ double quantization, torchao


def test_double_quantize_bad_input():
    with pytest.raises(TypeError, match="float32"):
        double_quantize(np.ones(4, np.float64))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        double_quantize(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        double_quantize(np.array([1.0, np.nan], np.float32))


def test_torchao_scheme_bad_input():
    with pytest.raises(ValueError, match="multiple of blocksize"):
        quantize_torchao(np.zeros(64 * 255, np.float32))
    with pytest.raises(ValueError, match="scaler_blocksize must be positive"):
        quantize_torchao(np.zeros(64 * 256, np.float32), scaler_blocksize=0)
    with pytest.raises(TypeError, match="scaler_blocksize must be an int"):
        quantize_torchao(np.zeros(64 * 256, np.float32), scaler_blocksize=256.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_torchao(np.full(64 * 256, np.inf, np.float32))


def test_classifier_size_mismatch():
    codes = np.zeros(4, np.uint8)
    with pytest.raises(ValueError, match="elements"):
        classify_codes(np.zeros(5, np.float32), codes, codes, blocksize=64)
    with pytest.raises(ValueError, match="bytes"):
        classify_packed(np.zeros(5, np.float32), codes, codes, blocksize=64)


# --------------------------------------------------------------- bitsandbytes state dicts

QS = "weight.quant_state.bitsandbytes__nf4"


@pytest.fixture(params=[False, True], ids=["plain", "nested"])
def state_dict(request):
    packed, state = quantize_4bit(X, blocksize=64, double_quant=request.param)
    return to_bnb_state_dict(packed, state)


def with_json(d, text: str, key: str = QS) -> dict:
    d = {k: v for k, v in d.items() if not k.startswith("weight.quant_state.")}
    d[key] = np.frombuffer(text.encode("utf-8"), np.uint8).copy()
    return d


def meta(d) -> str:
    return bytes(d[QS]).decode()


def test_state_dict_round_trip_is_exact(state_dict):
    packed, state = from_bnb_state_dict(state_dict)
    again = to_bnb_state_dict(packed, state)
    assert list(again) == list(state_dict)
    for k, v in state_dict.items():
        assert again[k].dtype == v.dtype and again[k].shape == v.shape and again[k].tobytes() == v.tobytes(), k


@pytest.mark.parametrize("key", ["weight", "weight.absmax", "weight.quant_map"])
def test_missing_array(state_dict, key):
    d = dict(state_dict)
    del d[key]
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        from_bnb_state_dict(d)


@pytest.mark.parametrize("key", ARRAY_KEYS[3:])  # the nested absmax and its map
def test_missing_nested_array(key):
    d = to_bnb_state_dict(*quantize_4bit(X, blocksize=64, double_quant=True))
    del d[key]
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        from_bnb_state_dict(d)


def test_missing_json(state_dict):
    d = {k: v for k, v in state_dict.items() if k != QS}
    with pytest.raises(ValueError, match="no packed quant_state entry"):
        from_bnb_state_dict(d)


def test_unknown_quant_type_key(state_dict):
    d = with_json(state_dict, meta(state_dict).replace('"nf4"', '"int4"'), "weight.quant_state.bitsandbytes__int4")
    with pytest.raises(ValueError, match="bitsandbytes__int4'.*unknown quant type"):
        from_bnb_state_dict(d)


def test_two_json_entries(state_dict):
    d = dict(state_dict)
    d["weight.quant_state.bitsandbytes__fp4"] = d[QS]
    with pytest.raises(ValueError, match="more than one quant_state entry"):
        from_bnb_state_dict(d)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.replace('"quant_type": "nf4"', '"quant_type": "fp4"'), "quant_type 'fp4' disagrees with the key"),
    (lambda m: m.replace('"blocksize": 64', '"blocksize": 48'), "blocksize 48 is not one of"),
    (lambda m: m.replace('"dtype": "float32"', '"dtype": "float64"'), "dtype 'float64' is not one of"),
    (lambda m: m.replace('"shape": [8, 33]', '"shape": [8, -33]'), "must be a non-empty list of positive ints"),
    (lambda m: m.replace('"shape": [8, 33]', '"shape": []'), "must be a non-empty list of positive ints"),
    (lambda m: m[:-1] + ', "extra": 1}', "unknown JSON keys \\['extra'\\]"),
    (lambda m: m.replace('"blocksize": 64, ', ""), "JSON lacks \\['blocksize'\\]"),
    (lambda m: m[:10], "is not UTF-8 JSON"),
    (lambda m: "[1, 2]", "must hold a JSON object"),
])
def test_bad_json(state_dict, edit, message):
    with pytest.raises(ValueError, match=message):
        from_bnb_state_dict(with_json(state_dict, edit(meta(state_dict))))


def test_json_that_is_not_utf8(state_dict):
    d = dict(state_dict)
    d[QS] = np.array([0xFF, 0xFE, 0x7B], np.uint8)
    with pytest.raises(ValueError, match="is not UTF-8 JSON"):
        from_bnb_state_dict(d)


def test_json_shape_disagrees_with_the_packed_size(state_dict):
    d = with_json(state_dict, meta(state_dict).replace('"shape": [8, 33]', '"shape": [8, 35]'))
    with pytest.raises(ValueError, match=r"'weight' has shape \(132, 1\).*needs \(140, 1\) bytes"):
        from_bnb_state_dict(d)


def test_json_blocksize_disagrees_with_the_absmax_length(state_dict):
    d = edited(state_dict, blocksize=32)  # 264 elements: 9 blocks of 32, but 5 absmax stored
    with pytest.raises(ValueError, match=r"'weight.absmax' has shape \(5,\), expected \(9,\)"):
        from_bnb_state_dict(d)


def test_absmax_of_the_wrong_length_or_dtype(state_dict):
    nested = "weight.nested_absmax" in state_dict
    d = dict(state_dict)
    d["weight.absmax"] = d["weight.absmax"][:-1]
    with pytest.raises(ValueError, match=r"'weight.absmax' has shape \(4,\), expected \(5,\)"):
        from_bnb_state_dict(d)
    d = dict(state_dict)
    d["weight.absmax"] = d["weight.absmax"].astype(np.float16)
    expected = "uint8" if nested else "float32"
    with pytest.raises(ValueError, match=f"'weight.absmax' has dtype float16, expected {expected}"):
        from_bnb_state_dict(d)


def edited(d, drop=(), **changes) -> dict:
    """``d`` with its JSON fields changed (``changes``) or removed (``drop``), order kept."""
    fields = {k: v for k, v in json.loads(meta(d)).items() if k not in drop}
    fields.update(changes)
    return with_json(d, json.dumps(fields))


def test_json_nesting_disagrees_with_the_arrays(state_dict):
    if "weight.nested_absmax" in state_dict:
        nested_fields = ("nested_blocksize", "nested_dtype", "nested_offset")
        with pytest.raises(ValueError, match="'weight.nested_absmax' is present but the JSON .* has no nested"):
            from_bnb_state_dict(edited(state_dict, drop=nested_fields))
        with pytest.raises(ValueError, match="but not all of"):
            from_bnb_state_dict(edited(state_dict, drop=("nested_dtype",)))
        with pytest.raises(ValueError, match="nested_offset 0.1 is not a float32 value"):
            from_bnb_state_dict(edited(state_dict, nested_offset=0.1))
        with pytest.raises(ValueError, match="nested_offset inf must be a finite number"):
            from_bnb_state_dict(edited(state_dict, nested_offset=float("inf")))
        with pytest.raises(ValueError, match="nested_dtype 'float16' is not 'float32'"):
            from_bnb_state_dict(edited(state_dict, nested_dtype="float16"))
        with pytest.raises(ValueError, match="nested_blocksize 1 is not one of"):  # sizes come from the data
            from_bnb_state_dict(edited(state_dict, nested_blocksize=1))
        short = {**state_dict, "weight.nested_absmax": state_dict["weight.nested_absmax"][:0]}
        with pytest.raises(ValueError, match=r"'weight.nested_absmax' has shape \(0,\), expected \(1,\)"):
            from_bnb_state_dict(short)
    else:
        d = edited(state_dict, nested_blocksize=256, nested_dtype="float32", nested_offset=1.0)
        with pytest.raises(ValueError, match="missing key 'weight.nested_absmax'"):
            from_bnb_state_dict(d)


def test_quant_map_must_be_the_codebook(state_dict):
    d = dict(state_dict)
    d["weight.quant_map"] = d["weight.quant_map"][::-1].copy()
    with pytest.raises(ValueError, match="'weight.quant_map' is not bitsandbytes' nf4 codebook"):
        from_bnb_state_dict(d)


def test_negative_or_nan_constants(state_dict):
    key = "weight.nested_absmax" if "weight.nested_absmax" in state_dict else "weight.absmax"
    d = dict(state_dict)
    d[key] = d[key].copy()
    d[key][0] = -1.0
    with pytest.raises(ValueError, match=f"'{key}' holds negative, NaN or Inf values"):
        from_bnb_state_dict(d)


def test_unexpected_entries(state_dict):
    d = dict(state_dict)
    d["weight.SCB"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="unexpected key 'weight.SCB'"):
        from_bnb_state_dict(d)
    d = dict(state_dict)
    d["weight.absmax"] = d["weight.absmax"].tolist()
    with pytest.raises(TypeError, match="'weight.absmax' must be a NumPy array"):
        from_bnb_state_dict(d)
    with pytest.raises(TypeError, match="mapping"):
        from_bnb_state_dict([("weight", np.zeros(1))])


def test_bias_is_ignored_and_storage_dtype_is_read_as_bytes(state_dict):
    d = dict(state_dict)
    d["bias"] = np.zeros(8, np.float32)
    d["weight"] = d["weight"].reshape(-1).view(np.float16).reshape(-1, 1)  # quant_storage=float16
    packed, state = from_bnb_state_dict(d)
    assert packed.dtype == np.uint8 and packed.tobytes() == state_dict["weight"].tobytes()


def test_writer_refuses_states_without_a_bnb_form():
    packed, state = quantize_4bit(X, blocksize=64, quant_type="int4")
    with pytest.raises(ValueError, match="not 'int4'"):
        to_bnb_state_dict(packed, state)
    packed, state = quantize_4bit(np.zeros(64 * 256, np.float32), double_quant="torchao")
    with pytest.raises(ValueError, match="'torchao' double-quantization scheme has no bitsandbytes form"):
        to_bnb_state_dict(packed, state)
