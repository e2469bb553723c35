"""The ``"torchao"`` scheme against torchao 0.18's ``NF4Tensor`` on CPU, bit for bit.

Stored tensors (``quantized_data``, ``quantized_scalers``, ``quantization_factor``,
``scaler_mean``, ``nf4``) and decoded weights, for bfloat16, float16 and float32 inputs.

Known class: ``offset ulp`` for the scaler mean of float32 inputs. torch sums the scalers in
float32 in its own reduction order (threads and vector width decide it), the oracle rounds the
exact sum once; the two can land an ulp apart. Where they do, the difference is classified by
``qlora_ref.conformance.classify.classify_offset`` and the rest is checked with torchao's mean passed in.
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from strategies import torchao_arrays
from tolerances import assert_bit_equal, assert_bit_equal_or_both_nan

from qlora_ref.api import dequantize_4bit, quantize_4bit
from qlora_ref.conformance.classify import classify_offset
from qlora_ref.state import NestedAbsmax, QuantState
from qlora_ref.torchao_nf4 import dequantize_torchao, quantize_torchao, torchao_codebook

torch = pytest.importorskip("torch")
from qlora_gpu.state import tensor_from_numpy, tensor_to_numpy  # noqa: E402

nf4_tensor = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def torchao_state(nf4) -> tuple:
    """torchao's stored tensors as the oracle's (packed, QuantState)."""
    nested = NestedAbsmax(
        scheme="torchao", codes=tensor_to_numpy(nf4.quantized_scalers), absmax=tensor_to_numpy(nf4.quantization_factor),
        codebook=None, offset=tensor_to_numpy(nf4.scaler_mean)[()], blocksize=nf4.scaler_block_size,
    )
    name = str(nf4.dtype).replace("torch.", "")
    state = QuantState(shape=tuple(nf4.shape), dtype=name, blocksize=nf4.block_size, quant_type="nf4",
                       codebook=tensor_to_numpy(nf4.nf4), nested=nested)
    return tensor_to_numpy(nf4.quantized_data).reshape(-1, 1), state


def check_against_torchao(x: np.ndarray) -> None:
    nf4 = nf4_tensor.to_nf4(tensor_from_numpy(x))
    packed, state = quantize_torchao(x)
    theirs_mean = tensor_to_numpy(nf4.scaler_mean)[()]
    if state.nested.offset.tobytes() != theirs_mean.tobytes():
        scalers = np.abs(x.astype(np.float32).reshape(-1, 64)).max(axis=1)
        diff = classify_offset(scalers, state.nested.offset, theirs_mean)
        assert diff.unclassified == 0, f"scaler mean {state.nested.offset!r} vs torchao {theirs_mean!r}: {diff}"
        packed, state = quantize_torchao(x, mean=theirs_mean)

    assert_bit_equal(state.codebook, tensor_to_numpy(nf4.nf4), "nf4 table")
    assert_bit_equal(state.nested.offset, theirs_mean, "scaler_mean")
    assert_bit_equal(state.nested.absmax, tensor_to_numpy(nf4.quantization_factor), "quantization_factor")
    assert_bit_equal(state.nested.codes, tensor_to_numpy(nf4.quantized_scalers), "quantized_scalers")
    assert_bit_equal(packed.reshape(-1), tensor_to_numpy(nf4.quantized_data), "quantized_data")

    # Decoded values: NaN only where the scaler sum overflowed (see Note: torchao arithmetic).
    assert_bit_equal_or_both_nan(dequantize_torchao(packed, state), tensor_to_numpy(nf4.get_original_weight()),
                                 "get_original_weight")
    for name, torch_dtype in TORCH_DTYPES.items():
        assert_bit_equal_or_both_nan(dequantize_torchao(packed, state, dtype=name), tensor_to_numpy(nf4.to(torch_dtype)),
                         f"decoded to {name}")


def constant(dtype, value, shape=(64, 256)):
    return np.full(shape, value, dtype=np.float32).astype(dtype)


def ties(dtype):
    # Values on a coarse grid: x / absmax and the distances to the rounded table tie often.
    rng = np.random.default_rng(7)
    return (np.round(rng.standard_normal((64, 256)) * 4) / 4).astype(np.float32).astype(dtype)


def zero_blocks(dtype):
    x = np.random.default_rng(3).standard_normal((128, 256)).astype(np.float32)
    x[0, :64] = 0.0
    x[5, 64:] = 0.0
    return x.astype(dtype)


@given(x=torchao_arrays())
@example(x=constant(ml_dtypes.bfloat16, 0.0))  # every scaler 0: factor inf, codes 0, decodes to -0.0
@example(x=constant(np.float32, 1.0))  # every scaler equals the mean: 0 * inf in the nested level
@example(x=ties(ml_dtypes.bfloat16))
@example(x=ties(np.float16))
@example(x=zero_blocks(np.float32))  # an all-zero block encodes to code 0 and decodes to -scaler
@example(x=zero_blocks(ml_dtypes.bfloat16))
def test_torchao_scheme_reproduces_nf4tensor(x):
    check_against_torchao(x)


@pytest.mark.parametrize("dtype", sorted(NUMPY_DTYPES))
def test_standard_normal_layers(dtype):
    x = (np.random.default_rng(0).standard_normal((256, 512)) * 0.02).astype(np.float32)
    check_against_torchao(x.astype(NUMPY_DTYPES[dtype]))


@given(x=torchao_arrays())
def test_decoding_torchao_own_state(x):
    nf4 = nf4_tensor.to_nf4(tensor_from_numpy(x))
    packed, state = torchao_state(nf4)
    expected = tensor_to_numpy(nf4.get_original_weight())
    assert_bit_equal_or_both_nan(dequantize_torchao(packed, state), expected, "decode torchao's state")
    assert_bit_equal_or_both_nan(dequantize_4bit(packed, state), expected, "dequantize_4bit dispatch")


def test_quantize_4bit_dispatches_to_the_torchao_scheme():
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(ml_dtypes.bfloat16)
    packed, state = quantize_4bit(x, double_quant="torchao")
    packed2, state2 = quantize_torchao(x)
    assert_bit_equal(packed, packed2, "packed")
    assert state.nested.scheme == "torchao"
    assert_bit_equal(state.codebook, torchao_codebook("bfloat16"), "table")
    assert_bit_equal(dequantize_4bit(packed, state, dtype="float32"),
                     dequantize_torchao(packed, state, dtype="float32"), "decode")


def test_element_count_must_fill_scaler_blocks():
    x = np.zeros((64, 255), np.float32)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        quantize_torchao(x)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        quantize_4bit(x, double_quant="torchao")

