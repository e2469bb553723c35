"""The Triton kernels against the oracle: bit for bit for quantization and decoding, the derived
tolerance tier for the fused 4-bit matrix product.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set by ``conftest.py``), on small shapes and fewer hypothesis examples, since the interpreter
executes every program of the grid in NumPy. With CUDA the same tests run on the GPU.

Note: what the interpreter does not show
    The interpreter checks the kernels' logic and arithmetic (it is NumPy underneath), not
    GPU-only behaviour: the lowering of ``tl.math.div_rn`` and of the bf16 dot, FMA contraction
    (the launches pass ``enable_fp_fusion=False``; ``tests/test_kernel_report.py`` checks the
    PTX compiled for sm_80 and sm_90), denormal handling, and speed. Two of its own deviations
    are worked around in the kernels under the interpreter only and pinned here: it truncates
    float32 -> bf16 casts (``cast_rne`` rounds on the bits when the launcher passes
    ``BITWISE``; a GPU uses its native ``cvt.rn``, same bits for finite values), and its
    ``tl.dot`` multiplies bf16 bit patterns as integers (the kernel upcasts to float32).
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from strategies import absmax_arrays, quant_types, quantize_cases  # noqa: E402
from test_gpu_quantize import assert_states_equal  # noqa: E402
from tolerances import assert_bit_equal, assert_bit_equal_or_both_nan, assert_derived  # noqa: E402

import qlora_gpu as G  # noqa: E402
import qlora_ref as R  # noqa: E402
from qlora_gpu.kernels.dequantize import bytes_moved_dequantize  # noqa: E402
from qlora_gpu.kernels.matmul import MatmulConfig, bytes_moved_matmul, default_config  # noqa: E402
from qlora_gpu.state import NestedAbsmax, QuantState, tensor_from_numpy  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (conftest sets it without CUDA)")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
# The interpreter runs each program in NumPy: fewer examples, still every hard case class.
FEW = settings(max_examples=max(8, settings.default.max_examples // 2))
NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16}


@pytest.mark.parametrize("device", DEVICES)
@FEW
@given(case=quantize_cases(max_elements=1200))
@example(case=(np.array([1, -1, 0, 0.5], np.float32), 64, "nf4", True))
@example(case=(np.zeros(4097, np.float32), 4096, "fp4", True))  # one program spans a whole block
def test_quantize_kernel_matches_oracle(device, case):
    x, blocksize, quant_type, double_quant = case
    packed_ref, state_ref = R.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                            double_quant=double_quant)
    packed, state = G.quantize_4bit(tensor_from_numpy(x, device), blocksize=blocksize, quant_type=quant_type,
                                    double_quant=double_quant, backend="triton")
    assert_bit_equal(packed, packed_ref, "packed bytes")
    assert_states_equal(state, state_ref)


@pytest.mark.parametrize("device", DEVICES)
@FEW
@given(case=quantize_cases(max_elements=1200), out=st.sampled_from(["float32", "float16", "bfloat16"]))
def test_dequantize_kernel_matches_oracle(device, case, out):
    x, blocksize, quant_type, double_quant = case
    packed_ref, state_ref = R.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                            double_quant=double_quant)
    state = G.QuantState.from_oracle(state_ref, device)
    y = G.dequantize_4bit(tensor_from_numpy(packed_ref, device), state, dtype=out, backend="triton")
    # Double-quantized absmax of values near the float32 maximum can overflow (offset + code *
    # nested absmax), and 0 * inf is NaN: positions must agree, NaN payloads are runtime noise.
    assert_bit_equal_or_both_nan(y, R.dequantize_4bit(packed_ref, state_ref, dtype=out), f"decoded {out}")


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_kernel_rounds_bf16_ties_to_even(device):
    """Products on exact bf16 midpoints: 1 + 3 * 2^-8 rounds UP to even (truncation would not)."""
    absmax = np.float32(1.01171875)
    x = np.float32([absmax, -absmax, absmax * np.float32(0.5), 1e-3]).repeat(16)
    packed_ref, state_ref = R.quantize_4bit(x, blocksize=64)
    state = G.QuantState.from_oracle(state_ref, device)
    y = G.dequantize_4bit(tensor_from_numpy(packed_ref, device), state, dtype=torch.bfloat16, backend="triton")
    expected = R.dequantize_4bit(packed_ref, state_ref, dtype="bfloat16")
    assert float(expected[0]) == 1.015625
    assert_bit_equal(y, expected, "bf16 decode")


@pytest.mark.parametrize("device", DEVICES)
@FEW
@given(absmax=absmax_arrays(max_blocks=600))
@example(absmax=np.zeros(300, np.float32))
def test_double_quantize_kernel_matches_oracle(device, absmax):
    ref = R.double_quantize(absmax)
    nested = G.double_quantize(tensor_from_numpy(absmax, device), backend="triton")
    assert_bit_equal(nested.codes, ref.codes, "nested codes")
    assert_bit_equal(nested.absmax, ref.absmax, "nested absmax")


# ------------------------------------------------------------------------- fused product

CONFIGS = [
    None,  # default_config
    MatmulConfig(16, 32, 1, False, 4),  # BLOCK_K < blocksize: one absmax per tile row
    MatmulConfig(16, 64, 3, True, 4),  # tensor-core path, split K into 3 partial sums
    MatmulConfig(32, 256, 2, False, 4),  # several blocks per tile row
]


@st.composite
def matmul_cases(draw):
    M = draw(st.integers(1, 16) | st.just(1) | st.integers(17, 140))  # > 16: row tiles of 64 and 128
    N = draw(st.integers(1, 70))
    K = draw(st.integers(1, 160).map(lambda k: 2 * k) | st.integers(1, 99))  # odd K: fallback
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return dict(
        M=M, N=N, K=K, rng=rng,
        blocksize=draw(st.sampled_from([32, 64, 128])),
        quant_type=draw(quant_types),
        double_quant=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32])),
        bias=draw(st.booleans()),
        config=draw(st.sampled_from(CONFIGS)),
    )


@pytest.mark.parametrize("device", DEVICES)
@FEW
@given(case=matmul_cases())
@example(case=dict(M=1, N=48, K=256, rng=np.random.default_rng(0), blocksize=64, quant_type="nf4",
                   double_quant=True, dtype=torch.bfloat16, bias=False, config=None))
@example(case=dict(M=16, N=33, K=96, rng=np.random.default_rng(1), blocksize=64, quant_type="fp4",
                   double_quant=True, dtype=torch.bfloat16, bias=True, config=CONFIGS[2]))  # blocks cross rows
@example(case=dict(M=130, N=70, K=192, rng=np.random.default_rng(3), blocksize=64, quant_type="nf4",
                   double_quant=True, dtype=torch.bfloat16, bias=True, config=None))  # 128-row tiles, K past a tile
@example(case=dict(M=1030, N=70, K=256, rng=np.random.default_rng(4), blocksize=64, quant_type="nf4",
                   double_quant=True, dtype=torch.bfloat16, bias=False, config=None))  # 256-row tiles, EVEN_K
def test_fused_matmul_within_derived_tolerance(device, case):
    M, N, K, rng, dtype = case["M"], case["N"], case["K"], case["rng"], case["dtype"]
    W = rng.standard_normal((N, K)).astype(np.float32)
    packed_ref, state_ref = R.quantize_4bit(W, blocksize=case["blocksize"], quant_type=case["quant_type"],
                                            double_quant=case["double_quant"])
    x_np = rng.standard_normal((M, K)).astype(NP_DTYPES[dtype])
    bias_np = rng.standard_normal(N).astype(NP_DTYPES[dtype]) if case["bias"] else None
    W_c = R.dequantize_4bit(packed_ref, state_ref, dtype=NP_DTYPES[dtype])  # the oracle's rounded weight
    one_row = M == 1 and K % 2 == 0 and not (case["config"] or default_config(M, N, K))[3]
    if one_row:  # the one-row kernel multiplies the float32 decode, unrounded (its Note)
        W_c = R.dequantize_4bit(packed_ref, state_ref, dtype=np.float32)
    ref64 = x_np.astype(np.float64) @ W_c.astype(np.float64).T
    if bias_np is not None:
        ref64 = ref64 + bias_np.astype(np.float64)

    x, packed = tensor_from_numpy(x_np, device), tensor_from_numpy(packed_ref, device)
    bias = None if bias_np is None else tensor_from_numpy(bias_np, device)
    state = G.QuantState.from_oracle(state_ref, device)
    y = G.matmul_4bit(x, packed, state, bias=bias, backend="triton", config=case["config"])
    assert y.dtype == dtype and tuple(y.shape) == (M, N)
    if one_row:  # plain torch on the same float32 weights, rounded once to the output dtype
        baseline = torch.nn.functional.linear(x.float(), tensor_from_numpy(W_c, device),
                                              None if bias is None else bias.float()).to(dtype)
    else:
        baseline = torch.nn.functional.linear(x, tensor_from_numpy(W_c, device), bias)  # plain torch, same dtype
    # The kernel sums K in its own order: its error scales with the terms |x_k w_k|, not with a
    # result that may cancel, so the ulps are counted relative to max(|x| |W_c|^T).
    terms = np.abs(x_np.astype(np.float64)) @ np.abs(W_c.astype(np.float64)).T
    assert_derived(y, ref64, baseline, dtype=NP_DTYPES[dtype], what="matmul_4bit (triton)", scale=terms.max())
    if K % 2:  # not the fused kernel: decode kernel + linear, bit-identical to the torch backend
        assert_bit_equal(y, G.matmul_4bit(x, packed, state, bias=bias, backend="torch"), "fallback")


@pytest.mark.parametrize("device", DEVICES)
@FEW
@given(case=matmul_cases())
@example(case=dict(M=20, N=70, K=256, rng=np.random.default_rng(2), blocksize=64, quant_type="nf4",
                   double_quant=True, dtype=torch.bfloat16, bias=False, config=None))  # N past one tile
@example(case=dict(M=130, N=64, K=192, rng=np.random.default_rng(5), blocksize=64, quant_type="nf4",
                   double_quant=True, dtype=torch.bfloat16, bias=False, config=None))  # 128-row tiles, EVEN_N, K past a tile
@example(case=dict(M=1030, N=70, K=256, rng=np.random.default_rng(6), blocksize=64, quant_type="nf4",
                   double_quant=False, dtype=torch.float16, bias=False, config=None))  # 256-row tiles, N past a tile
def test_fused_transposed_matmul_within_derived_tolerance(device, case):
    """``g W`` (the layer's input gradient) against ``g @ W_c`` in float64, W_c the oracle's weight
    rounded to the compute dtype; fallback (K not a multiple of the block) bit-equal to torch's."""
    M, N, K, rng, dtype = case["M"], case["N"], case["K"], case["rng"], case["dtype"]
    W = rng.standard_normal((N, K)).astype(np.float32)
    packed_ref, state_ref = R.quantize_4bit(W, blocksize=case["blocksize"], quant_type=case["quant_type"],
                                            double_quant=case["double_quant"])
    g_np = rng.standard_normal((M, N)).astype(NP_DTYPES[dtype])
    W_c = R.dequantize_4bit(packed_ref, state_ref, dtype=NP_DTYPES[dtype])  # (N, K)
    ref64 = g_np.astype(np.float64) @ W_c.astype(np.float64)
    g, packed = tensor_from_numpy(g_np, device), tensor_from_numpy(packed_ref, device)
    state = G.QuantState.from_oracle(state_ref, device)
    y = G.matmul.matmul_4bit_t(g, packed, state, backend="triton")
    assert y.dtype == dtype and tuple(y.shape) == (M, K)
    baseline = g @ tensor_from_numpy(W_c, device)  # plain torch, same dtype
    terms = np.abs(g_np.astype(np.float64)) @ np.abs(W_c.astype(np.float64))
    assert_derived(y, ref64, baseline, dtype=NP_DTYPES[dtype], what="matmul_4bit_t (triton)", scale=terms.max())
    if K % 2 or K % case["blocksize"]:  # not the fused kernel: decode + matmul, as the torch backend
        assert_bit_equal(y, G.matmul.matmul_4bit_t(g, packed, state, backend="torch"), "fallback")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_matmul_takes_leading_dimensions(device):
    packed, state = G.quantize_4bit(torch.randn(24, 64, device=device), blocksize=32, double_quant=True)
    x = torch.randn(2, 3, 64, device=device)
    y = G.matmul_4bit(x, packed, state, backend="triton")
    assert torch.allclose(y, G.matmul_4bit(x, packed, state, backend="torch"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_matmul_takes_a_strided_bias(device):
    """A bias that is a view with a stride (every second value) is read as the view, not as memory."""
    packed, state = G.quantize_4bit(torch.randn(40, 128, device=device), blocksize=64, double_quant=True)
    x = torch.randn(20, 128, device=device, dtype=torch.bfloat16)
    bias = torch.randn(80, device=device, dtype=torch.bfloat16)[::2]
    y = G.matmul_4bit(x, packed, state, bias=bias, backend="triton")
    want = G.matmul_4bit(x, packed, state, bias=bias.contiguous(), backend="triton")
    assert_bit_equal(y, want, "strided bias")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_matmuls_with_64_bit_row_offsets(device, monkeypatch):
    """The 64-bit offsets that inputs past 2^31 elements get (``WIDE``) compute the same values."""
    from qlora_gpu.kernels import matmul as kernels

    packed, state = G.quantize_4bit(torch.randn(70, 256, device=device), blocksize=64, double_quant=True)
    x = torch.randn(130, 256, device=device, dtype=torch.bfloat16)
    g = torch.randn(130, 70, device=device, dtype=torch.bfloat16)
    narrow = (G.matmul_4bit(x, packed, state, backend="triton"), G.matmul.matmul_4bit_t(g, packed, state, backend="triton"))
    monkeypatch.setattr(kernels, "_wide", lambda *extents: True)
    wide = (G.matmul_4bit(x, packed, state, backend="triton"), G.matmul.matmul_4bit_t(g, packed, state, backend="triton"))
    assert_bit_equal(wide[0], narrow[0], "x W^T, 64-bit offsets")
    assert_bit_equal(wide[1], narrow[1], "g W, 64-bit offsets")


def test_default_config_fills_a_large_gpu():
    block_n, block_k, split_k, use_dot, _ = default_config(1, 4096, 14336)
    assert -(-4096 // block_n) * split_k >= 256 and not use_dot
    assert default_config(16, 4096, 4096)[3]  # 16 rows: tensor cores


def _empty_state(shape, blocksize=64, double_quant=True):
    """A state of the right sizes for the bytes-moved formulas (values irrelevant)."""
    n_blocks = -(-int(np.prod(shape)) // blocksize)
    common = dict(shape=shape, dtype=torch.bfloat16, blocksize=blocksize, quant_type="nf4", codebook=torch.zeros(16))
    if not double_quant:
        return QuantState(**common, absmax=torch.zeros(n_blocks))
    return QuantState(**common, nested=NestedAbsmax(codes=torch.zeros(n_blocks, dtype=torch.uint8),
                                                    absmax=torch.zeros(-(-n_blocks // 256)),
                                                    codebook=torch.zeros(256), offset=torch.tensor(0.0)))


def test_bytes_moved_are_the_documented_ceilings():
    """The byte counts of docs/kernels.md: one-pass NF4 -> bf16 decode moves 2.516 bytes per
    element; the small-batch product reads 0.516 bytes per weight (4.127 bits) plus its input
    and output."""
    state = _empty_state((4096, 14336))
    n = state.numel
    assert round(bytes_moved_dequantize(state, torch.bfloat16) / n, 3) == 2.516
    assert round(bytes_moved_dequantize(_empty_state((4096, 14336), double_quant=False), torch.bfloat16) / n, 4) == 2.5625
    assert round(state.bits_per_parameter, 3) == 4.127
    assert abs(bytes_moved_matmul(state, 1, torch.bfloat16) / n - 0.516) < 0.001


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no CUDA")
def test_cuda_check_says_it_needs_cuda(tmp_path, capsys):
    from benchmarks.cuda_check import main

    assert main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
