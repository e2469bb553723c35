"""The decoder models of ``qlora_ref.variants`` on constructed inputs, on every machine.

The native paths of bitsandbytes (the AVX-512 loop, the scalar loop) are chosen by its native
library from the CPU, so no test can force them: each path is an executable model, tested here
on inputs built to reach it; ``tests/bnb_cpu.py`` asks which model this machine's library
follows, and the comparison tests use that answer. The Python switch of ``Linear4bit``'s CPU
repacking is forced both ways.
"""

import ml_dtypes
import numpy as np
import pytest

from qlora_ref.classify import UNCLASSIFIED, classify_decoded
from qlora_ref.codebooks import codebook
from qlora_ref.quantize import decode_4bit, dequantize_4bit, quantize_4bit, unpack_4bit
from qlora_ref.variants import (
    DECODE_MODELS,
    decode_model,
    flush_subnormals_to_zero,
    probe_decode_model,
    row_crossing_absmax,
    same_bits,
)
from tolerances import assert_bit_equal

AVX512 = "bitsandbytes cpu avx512"
SCALAR = "bitsandbytes cpu scalar"


def _state(shape, blocksize, quant_type="fp4", seed=0, tiny_blocks=False):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    codes = rng.integers(0, 16, n).astype(np.uint8)
    absmax = rng.uniform(0.5, 2.0, -(-n // blocksize)).astype(np.float32)
    if tiny_blocks:  # products below 2^-126 with a normal absmax
        absmax[1:] = np.float32(3e-38)
    return codes, absmax


@pytest.mark.parametrize("shape,blocksize", [((4, 96), 64), ((5, 32), 64), ((2, 3, 80), 32), ((3, 48), 128)])
def test_row_crossing_absmax_uses_the_row_index(shape, blocksize):
    codes, absmax = _state(shape, blocksize, "nf4")
    n = shape[-1]
    y = row_crossing_absmax(codes, absmax, shape, blocksize, codebook("nf4")).reshape(-1, n)  # (m, n)
    rows, cols = np.indices(y.shape)
    block = rows * (n // blocksize) + cols // blocksize  # bitsandbytes' AVX-512 index
    expected = codebook("nf4")[codes.reshape(y.shape)] * absmax[block]
    assert_bit_equal(y, expected.astype(np.float32), "row-crossing decode")
    right = decode_4bit(codes, absmax, blocksize, codebook("nf4")).reshape(y.shape)
    # It differs from the oracle exactly where a block crosses into a row.
    crossing = block != (rows * n + cols) // blocksize
    assert crossing.any() and np.array_equal(y != right, crossing & (y != right))
    assert np.array_equal(y[~crossing], right[~crossing])


def test_row_crossing_is_the_oracle_when_rows_hold_whole_blocks():
    codes, absmax = _state((6, 128), 64, "nf4")
    assert_bit_equal(row_crossing_absmax(codes, absmax, (6, 128), 64, codebook("nf4")),
                     decode_4bit(codes, absmax, 64, codebook("nf4")), "rows of whole blocks")


def test_flush_to_zero_keeps_the_sign_and_normals():
    y = np.array([1e-39, -1e-39, 2.0**-126, -(2.0**-126), 0.0, -0.0, 3.0], np.float32)
    out = flush_subnormals_to_zero(y)
    assert out.tolist() == [0.0, -0.0, 2.0**-126, -(2.0**-126), 0.0, -0.0, 3.0]
    assert np.signbit(out).tolist() == [False, True, False, True, False, True, False]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape,blocksize,path", [
    ((3, 41), 64, "fallback"),    # odd last dimension: bitsandbytes' torch fallback
    ((4, 96), 4096, "fallback"),  # blocksize >= 2048: the fallback on AVX-512 CPUs
    ((3, 34), 64, "scalar"),      # even, not a multiple of 16: the native scalar loop
    ((4, 48), 32, "vector"),      # a multiple of 16: the AVX-512 loop
    ((96,), 64, "vector"),        # 1-D: decoded as (1, n)
])
def test_avx512_model_dispatches_like_bitsandbytes(shape, blocksize, path, dtype):
    codes, absmax = _state(shape, blocksize, tiny_blocks=True)
    oracle = decode_model("oracle", codes, absmax, shape, blocksize, "fp4", dtype)
    y32 = decode_4bit(codes, absmax, blocksize, codebook("fp4"))
    model = decode_model(AVX512, codes, absmax, shape, blocksize, "fp4", dtype)
    assert model.shape == tuple(shape) and model.dtype == oracle.dtype
    if path == "fallback":
        assert_bit_equal(model, oracle, "fallback path")
    elif path == "scalar":
        negative = codes == 8
        assert np.all(np.signbit(model.reshape(-1)[negative].astype(np.float32)))
        assert_bit_equal(np.abs(model.astype(np.float32)), np.abs(oracle.astype(np.float32)), "scalar path")
    else:
        rc = row_crossing_absmax(codes, absmax, shape, blocksize, codebook("fp4"))
        flushed = flush_subnormals_to_zero(rc) if dtype == "bfloat16" else rc
        assert_bit_equal(model.reshape(-1), flushed.astype(oracle.dtype), "vector path")
        if dtype == "bfloat16":  # the flush is visible: subnormal products the oracle keeps
            keeps = (np.abs(y32) < np.finfo(np.float32).tiny) & (y32 != 0)
            assert keeps.any() and np.all(oracle.reshape(-1)[keeps].astype(np.float32) != 0)


def test_scalar_model_writes_fp4_code_8_as_negative_zero_on_every_native_shape():
    codes, absmax = _state((4, 96), 4096)
    y = decode_model(SCALAR, codes, absmax, (4, 96), 4096, "fp4", "float32").reshape(-1)
    assert np.all(np.signbit(y[codes == 8])) and (codes == 8).any()
    y_odd = decode_model(SCALAR, *_state((3, 41), 64), (3, 41), 64, "fp4", "float32")
    assert not np.any(np.signbit(y_odd.reshape(-1)) & (y_odd.reshape(-1) == 0))


@pytest.mark.parametrize("model", list(DECODE_MODELS))
def test_probe_names_the_model_a_decoder_follows(model):
    def dequantize(packed, state, *, dtype):
        codes = unpack_4bit(packed, state.numel)
        return decode_model(model, codes, state.absmax, state.shape, state.blocksize, state.quant_type, dtype)

    assert probe_decode_model(dequantize) == model


def test_probe_answers_none_for_an_unknown_decoder():
    def dequantize(packed, state, *, dtype):  # rounds through float16 first: no known model
        return dequantize_4bit(packed, state, dtype="float16").astype(np.float32).astype(
            ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)

    assert probe_decode_model(dequantize) is None


def test_classify_decoded_explains_a_whole_tensor_or_nothing():
    shape, blocksize = (4, 48), 32
    codes, absmax = _state(shape, blocksize, "nf4")
    y = decode_model("oracle", codes, absmax, shape, blocksize, "nf4", "float32")
    theirs = decode_model(AVX512, codes, absmax, shape, blocksize, "nf4", "float32")
    d = classify_decoded(codes, y, theirs, quant_type="nf4", absmax=absmax, blocksize=blocksize)
    assert d.unclassified == 0 and set(d.counts()) == {"row-crossing absmax"}
    assert AVX512 in d.models and "oracle" not in d.models and SCALAR not in d.models
    # One more changed value and no model reproduces the tensor: every difference is unexplained.
    theirs = theirs.copy()
    theirs[0, 0] = np.nextafter(theirs[0, 0], np.float32(np.inf))
    d = classify_decoded(codes, y, theirs, quant_type="nf4", absmax=absmax, blocksize=blocksize)
    assert d.models == () and set(d.classes) == {UNCLASSIFIED}


def test_nan_payloads_compare_as_nan():
    a = np.array([0xFFC0, 0x3F80], np.uint16).view(ml_dtypes.bfloat16)
    b = np.array([0xFFFF, 0x3F80], np.uint16).view(ml_dtypes.bfloat16)
    assert same_bits(a, b).all()
    assert not same_bits(np.array([0.0], np.float32), np.array([-0.0], np.float32)).any()


# -- bitsandbytes itself: asked, never assumed -------------------------------------------------


def test_bitsandbytes_follows_a_known_model():
    pytest.importorskip("bitsandbytes")
    from bnb_cpu import decode_model as bnb_decode_model

    assert bnb_decode_model() in DECODE_MODELS


def test_bitsandbytes_decodes_a_real_layer_shape_as_its_model():
    # A Llama MLP's down_proj with intermediate size 96: rows of 96 cross blocks of 64.
    pytest.importorskip("bitsandbytes")
    from bnb_cpu import bnb_decoded
    from qlora_gpu.comparators import BitsAndBytesProvider

    x = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    packed, state = quantize_4bit(x, blocksize=64, quant_type="nf4")
    theirs = BitsAndBytesProvider(device="cpu").dequantize(packed, state, dtype="bfloat16")
    codes = unpack_4bit(packed, x.size)
    assert_bit_equal(theirs, bnb_decoded(codes, state.absmax, x.shape, 64, "nf4", "bfloat16"), "bnb decode")


@pytest.mark.parametrize("enabled", [False, True])
def test_linear4bit_cpu_repacking_switch(enabled):
    """The repacking for CPU inference is pure Python: force it both ways on any machine.

    Switched on, the repacked layer's state dict no longer holds the weight that was loaded: the
    absmax is decoded, rounded to bfloat16 and double-quantized again (a checkpoint saved after
    one inference differs from the one loaded). Switched off, it is untouched.
    """
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    from bnb_cpu import cpu_repacking

    torch.manual_seed(0)
    with cpu_repacking(enabled):
        layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                  quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128, dtype=torch.bfloat16), requires_grad=False,
                                     blocksize=64, compress_statistics=True, quant_type="nf4")
    layer = layer.to("cpu").eval()
    assert layer.support_avx512bf16_for_cpu is enabled
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    if enabled:
        # What forward does first under these conditions (the matmul after it needs the CPU's
        # AVX512-BF16 kernel, so it is not run here).
        layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state)
        assert layer.weight.quant_state.packing_format_for_cpu
    else:
        with torch.no_grad():
            layer(torch.randn(3, 128, dtype=torch.bfloat16))
    after = layer.state_dict()
    changed = sorted(k for k in before if torch.is_tensor(before[k]) and not torch.equal(before[k], after[k]))
    if enabled:
        assert "weight.absmax" in changed, changed
    else:
        assert changed == []


def test_avx512_model_without_torch_avx512_takes_large_blocks_to_the_vector_loop():
    # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU: bitsandbytes' Python dispatch no longer sends
    # blocksizes >= 2048 to its fallback, and its native AVX-512 loop decodes them.
    shape, blocksize = (2, 2080), 2048
    codes, absmax = _state(shape, blocksize, tiny_blocks=True)
    absmax[1:] = [3e-38, 5e-38]
    below = decode_model("bitsandbytes cpu avx512, torch below avx512", codes, absmax, shape, blocksize, "fp4",
                         "bfloat16")
    rc = flush_subnormals_to_zero(row_crossing_absmax(codes, absmax, shape, blocksize, codebook("fp4")))
    assert_bit_equal(below.reshape(-1), rc.astype(below.dtype), "vector loop at blocksize 2048")
    default = decode_model(AVX512, codes, absmax, shape, blocksize, "fp4", "bfloat16")
    assert_bit_equal(default, decode_model("oracle", codes, absmax, shape, blocksize, "fp4", "bfloat16"), "fallback")
    assert not same_bits(below, default).all()
