"""LoRA, QLoRA and DoRA in the oracle: every gradient against float64 central differences,
the identities (fresh adapters, merge/unmerge, merged forward), merging into 4 bits, bad input.

Note: finite-difference budget
    ``L(theta) = <G, y(theta)>`` is evaluated in float64. Its rounding error is at most
    ``gamma_K * L_abs`` with ``gamma_K = K u / (1 - K u)``, ``u = 2^-53``, ``K`` a (loose) count of
    the operations along any path (here: the number of operand elements, plus a margin), and
    ``L_abs`` the same computation on absolute values (every product and sum counted with its
    magnitude). The central difference uses the step actually realised in float64
    (``(theta + h) - theta``, exact by Sterbenz), so its rounding error is at most
    ``gamma_K (L_abs+ + L_abs-) / (h+ + h-)``. The analytic gradient's own error is at most
    ``gamma_K g_abs``, and for a function affine in the perturbed element with non-negative
    ``L_abs`` coefficients ``h g_abs <= L_abs+``, so ``2 gamma_K max(L_abs+-) / h`` covers both.
    LoRA, QLoRA and DoRA with a fixed norm are affine in each single element of x, A, B and m, so
    the central difference has no truncation error at all. DoRA with the norm in the graph is
    not: there the truncation error is estimated by Richardson, ``|D(2h) - D(h)| / 3``, and
    twice that is added.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from strategies import lora_problems
from tolerances import assert_bit_equal, assert_within

from qlora_ref import (
    dora_backward,
    dora_forward,
    dora_merge,
    dora_weight_norm,
    lora_backward,
    lora_forward,
    lora_init,
    lora_merge,
    lora_scaling,
    lora_unmerge,
    merge_error,
    merge_into_4bit,
    qlora_backward,
    qlora_base_weight,
    qlora_forward,
    quantize_4bit,
    unpack_4bit,
)
from qlora_ref.api import dequantize_4bit
from qlora_ref.codebooks import codebook
from qlora_ref.state import numpy_dtype

U = 2.0**-53
H = 2.0**-6  # the step; any step works for affine functions, a larger one rounds less


def _gamma(k: int) -> float:
    return k * U / (1 - k * U)


def _f64(p: dict) -> dict:
    return {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in p.items()}


def _abs(a):
    return None if a is None else np.abs(a)


def _central_differences(L, L_abs, args: list, k: int, h: float = H):
    """Central differences of the scalar ``L(*args)`` w.r.t. ``args[k]``, and their budget."""
    fd = np.zeros_like(args[k])
    budget = np.zeros_like(args[k])
    for i in np.ndindex(args[k].shape):
        plus, minus = [a.copy() for a in args], [a.copy() for a in args]
        plus[k][i] += h
        minus[k][i] -= h
        step = (plus[k][i] - args[k][i]) + (args[k][i] - minus[k][i])  # realised 2h, exact
        fd[i] = (L(*plus) - L(*minus)) / step
        budget[i] = 2.0 * max(L_abs(*plus), L_abs(*minus)) / (step / 2.0)
    return fd, budget


def _assert_gradient(name, analytic, fd, budget, k_ops):
    budget = _gamma(k_ops) * budget + U * np.abs(fd)
    worst = np.argmax(np.abs(analytic - fd) - budget)
    idx = np.unravel_index(worst, analytic.shape)
    assert np.all(np.abs(analytic - fd) <= budget), (
        f"{name}: analytic {analytic[idx]!r} vs central difference {fd[idx]!r} at {idx}: "
        f"|diff| {abs(analytic[idx] - fd[idx]):.3e} exceeds the budget {budget[idx]:.3e}"
    )


def _k_ops(p: dict) -> int:
    return sum(v.size for v in p.values() if isinstance(v, np.ndarray)) + 16


# ----------------------------------------------------------------------------- LoRA


@given(lora_problems())
@example({  # rank 1, one input row, no bias, no mask: the smallest layer
    "x": np.array([0.5]), "W": np.array([[2.0]]), "A": np.array([[-1.0]]), "B": np.array([[3.0]]),
    "m": np.array([1.0]), "bias": None, "mask": None, "grad_y": np.array([1.0]), "scaling": 2.0,
})
def test_lora_gradients_match_central_differences(p):
    q = _f64(p)
    s, b, d, G = q["scaling"], q["bias"], q["mask"], q["grad_y"]
    W = q["W"]

    def L(x, A, B):
        return float(np.sum(G * lora_forward(x, W, A, B, scaling=s, bias=b, dropout_mask=d)))

    def L_abs(x, A, B):
        y_abs = lora_forward(np.abs(x), np.abs(W), np.abs(A), np.abs(B), scaling=s, bias=_abs(b),
                             dropout_mask=_abs(d))
        return float(np.sum(np.abs(G) * y_abs))

    args = [q["x"], q["A"], q["B"]]
    grads = lora_backward(p["grad_y"], p["x"], p["W"], p["A"], p["B"], scaling=s, dropout_mask=p["mask"])
    for k, name in enumerate(["grad_x", "grad_A", "grad_B"]):
        assert grads[k].dtype == np.float64 and grads[k].shape == args[k].shape
        fd, budget = _central_differences(L, L_abs, args, k)
        _assert_gradient(name, grads[k], fd, budget, _k_ops(q))


@given(lora_problems(), st.sampled_from(["nf4", "fp4"]), st.booleans(), st.sampled_from([32, 64]),
       st.sampled_from(["bfloat16", "float16", "float32"]))
@settings(max_examples=20)
def test_qlora_gradients_match_central_differences(p, quant_type, double_quant, blocksize, compute_dtype):
    q = _f64(p)
    packed, state = quantize_4bit(p["W"].astype(np.float32), blocksize=blocksize, quant_type=quant_type,
                                  double_quant=double_quant)
    s, b, d, G = q["scaling"], q["bias"], q["mask"], q["grad_y"]
    # The base is the decoded weight rounded to the compute dtype, bit for bit (exact tier).
    W_c = qlora_base_weight(packed, state, compute_dtype=compute_dtype)
    assert_bit_equal(W_c.astype(numpy_dtype(compute_dtype)), dequantize_4bit(packed, state, dtype=compute_dtype),
                     "decoded base in the compute dtype")

    def L(x, A, B):
        y = qlora_forward(x, packed, state, A, B, scaling=s, compute_dtype=compute_dtype, bias=b, dropout_mask=d)
        return float(np.sum(G * y))

    def L_abs(x, A, B):
        y_abs = lora_forward(np.abs(x), np.abs(W_c), np.abs(A), np.abs(B), scaling=s, bias=_abs(b),
                             dropout_mask=_abs(d))
        return float(np.sum(np.abs(G) * y_abs))

    args = [q["x"], q["A"], q["B"]]
    grads = qlora_backward(p["grad_y"], p["x"], packed, state, p["A"], p["B"], scaling=s,
                           compute_dtype=compute_dtype, dropout_mask=p["mask"])
    for k, name in enumerate(["grad_x", "grad_A", "grad_B"]):
        fd, budget = _central_differences(L, L_abs, args, k)
        _assert_gradient(f"QLoRA {name}", grads[k], fd, budget, _k_ops(q))


# ----------------------------------------------------------------------------- DoRA


def _dora_abs_forward(x, W, A, B, m, n, s, bias, d):
    """``dora_forward``'s computation on magnitudes: a bound on every term it sums."""
    x_tilde = np.abs(x) if d is None else np.abs(d * x)
    c = np.abs(m) / n
    y = np.abs(x) @ np.abs(W).T + (c + 1.0) * (x_tilde @ np.abs(W).T)
    y = y + c * s * ((x_tilde @ np.abs(A).T) @ np.abs(B).T)
    return y if bias is None else y + np.abs(bias)


@given(lora_problems())
def test_dora_gradients_with_peft_detached_norm_match_central_differences(p):
    """PEFT's gradients are those of the forward with the norm held at its current value."""
    q = _f64(p)
    s, b, d, G, W = q["scaling"], q["bias"], q["mask"], q["grad_y"], q["W"]
    n = dora_weight_norm(W, q["A"], q["B"], scaling=s)  # evaluated once, then a constant

    def L(x, A, B, m):
        y = dora_forward(x, W, A, B, m, scaling=s, bias=b, dropout_mask=d, weight_norm=n)
        return float(np.sum(G * y))

    def L_abs(x, A, B, m):
        return float(np.sum(np.abs(G) * _dora_abs_forward(x, W, A, B, m, n, s, b, d)))

    args = [q["x"], q["A"], q["B"], q["m"]]
    grads = dora_backward(p["grad_y"], p["x"], p["W"], p["A"], p["B"], p["m"], scaling=s,
                          dropout_mask=p["mask"], weight_norm=n)
    # Omitting weight_norm computes the same norm: the default is PEFT's detached gradient.
    for g, g_default in zip(grads, dora_backward(p["grad_y"], p["x"], p["W"], p["A"], p["B"], p["m"],
                                                 scaling=s, dropout_mask=p["mask"])):
        assert_bit_equal(g, g_default, "detached gradient with and without an explicit norm")
    for k, name in enumerate(["grad_x", "grad_A", "grad_B", "grad_m"]):
        fd, budget = _central_differences(L, L_abs, args, k)
        _assert_gradient(f"DoRA {name}", grads[k], fd, budget, _k_ops(q))


@given(lora_problems(max_features=6))
@settings(max_examples=20)
def test_dora_full_gradients_match_central_differences(p):
    """``detach_norm=False``: the norm's own gradient included; checked with Richardson's estimate."""
    q = _f64(p)
    s, b, d, G, W = q["scaling"], q["bias"], q["mask"], q["grad_y"], q["W"]

    def L(x, A, B, m):
        return float(np.sum(G * dora_forward(x, W, A, B, m, scaling=s, bias=b, dropout_mask=d)))

    def L_abs(x, A, B, m):
        n = dora_weight_norm(W, A, B, scaling=s)
        return float(np.sum(np.abs(G) * _dora_abs_forward(x, W, A, B, m, n, s, b, d)))

    args = [q["x"], q["A"], q["B"], q["m"]]
    full = dora_backward(p["grad_y"], p["x"], p["W"], p["A"], p["B"], p["m"], scaling=s,
                         dropout_mask=p["mask"], detach_norm=False)
    detached = dora_backward(p["grad_y"], p["x"], p["W"], p["A"], p["B"], p["m"], scaling=s,
                             dropout_mask=p["mask"])
    # The norm's gradient changes only grad_A and grad_B.
    assert_bit_equal(full[0], detached[0], "grad_x with and without the norm's gradient")
    assert_bit_equal(full[3], detached[3], "grad_m with and without the norm's gradient")
    h = 2.0**-12
    for k, name in enumerate(["grad_x", "grad_A", "grad_B", "grad_m"]):
        fd, budget = _central_differences(L, L_abs, args, k, h)
        fd2, budget2 = _central_differences(L, L_abs, args, k, 2 * h)
        truncation = 2.0 * np.abs(fd2 - fd) / 3.0  # Richardson: D(h) - f' ~ (D(2h) - D(h)) / 3
        rounding = _gamma(_k_ops(q)) * (budget + budget2)  # fd2's rounding enters the estimate
        err = np.abs(full[k] - fd)
        assert np.all(err <= rounding + truncation + U * np.abs(fd)), (
            f"DoRA full {name}: max |analytic - fd| {err.max():.3e}, budget "
            f"{(rounding + truncation).max():.3e}"
        )


def test_dora_detached_gradient_differs_from_full():
    """PEFT's choice matters: with a trained B the dropped term is not small."""
    rng = np.random.default_rng(0)
    W, A, B = rng.standard_normal((6, 5)), rng.standard_normal((2, 5)), rng.standard_normal((6, 2))
    x, G, m = rng.standard_normal((4, 5)), rng.standard_normal((4, 6)), rng.uniform(0.5, 2, 6)
    _, gA, gB, _ = dora_backward(G, x, W, A, B, m, scaling=1.0)
    _, gA_full, gB_full, _ = dora_backward(G, x, W, A, B, m, scaling=1.0, detach_norm=False)
    assert np.linalg.norm(gA - gA_full) > 1e-3 * np.linalg.norm(gA_full)
    assert np.linalg.norm(gB - gB_full) > 1e-3 * np.linalg.norm(gB_full)


# ----------------------------------------------------------------------------- identities


@given(lora_problems(), st.sampled_from(["kaiming", "gaussian"]))
def test_fresh_adapters_leave_the_output_equal_to_the_base(p, scheme):
    q = _f64(p)
    out_features, in_features = q["W"].shape
    A, B = lora_init(in_features, out_features, q["A"].shape[0], rng=np.random.default_rng(1), scheme=scheme)
    base = q["x"] @ q["W"].T + (0.0 if q["bias"] is None else q["bias"])
    y = lora_forward(q["x"], q["W"], A, B, scaling=q["scaling"], bias=q["bias"], dropout_mask=q["mask"])
    assert_bit_equal(y, base, "LoRA output with B = 0")
    # DoRA initialises m to the norm, so c = m / n = 1 exactly and the correction vanishes.
    if np.all(np.linalg.norm(q["W"], axis=1) > 0):
        m = dora_weight_norm(q["W"], A, B, scaling=q["scaling"])
        y = dora_forward(q["x"], q["W"], A, B, m, scaling=q["scaling"], bias=q["bias"], dropout_mask=q["mask"])
        assert_bit_equal(y, base, "DoRA output with B = 0 and m = ||W||")
    # QLoRA: the base is the decoded 4-bit weight.
    packed, state = quantize_4bit(p["W"].astype(np.float32), blocksize=32, double_quant=True)
    y = qlora_forward(q["x"], packed, state, A, B, scaling=q["scaling"], bias=q["bias"], compute_dtype="float32")
    W_c = qlora_base_weight(packed, state, compute_dtype="float32")
    assert_bit_equal(y, q["x"] @ W_c.T + (0.0 if q["bias"] is None else q["bias"]), "QLoRA output with B = 0")


@given(lora_problems())
def test_unmerge_of_merge_returns_the_base(p):
    q = _f64(p)
    M = lora_merge(q["W"], q["A"], q["B"], q["scaling"])
    back = lora_unmerge(M, q["A"], q["B"], q["scaling"])
    # lora_unmerge's Notes: |back - W| <= u (|M| + |W|) (1 + u), element by element.
    bound = U * (np.abs(M) + np.abs(q["W"])) * (1 + U)
    err = np.abs(back - q["W"])
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3e}"


@given(lora_problems())
def test_forward_equals_the_dense_forward_with_the_merged_weight(p):
    q = _f64(p)
    s, b = q["scaling"], q["bias"]
    y = lora_forward(q["x"], q["W"], q["A"], q["B"], scaling=s, bias=b)
    dense = q["x"] @ lora_merge(q["W"], q["A"], q["B"], s).T + (0.0 if b is None else b)
    # Both round the same real number; each errs by at most gamma_K times the magnitudes' sum.
    magnitudes = lora_forward(np.abs(q["x"]), np.abs(q["W"]), np.abs(q["A"]), np.abs(q["B"]), scaling=s,
                              bias=_abs(b))
    assert_within(y, dense, 2 * _gamma(_k_ops(q)) * float(magnitudes.max()), "LoRA vs merged dense forward")
    if np.all(np.linalg.norm(q["W"] + s * q["B"] @ q["A"], axis=1) > 1e-3):
        y = dora_forward(q["x"], q["W"], q["A"], q["B"], q["m"], scaling=s, bias=b)
        dense = q["x"] @ dora_merge(q["W"], q["A"], q["B"], q["m"], scaling=s).T + (0.0 if b is None else b)
        n = dora_weight_norm(q["W"], q["A"], q["B"], scaling=s)
        bound = _dora_abs_forward(q["x"], q["W"], q["A"], q["B"], q["m"], n, s, b, None).max()
        assert_within(y, dense, 2 * _gamma(_k_ops(q)) * float(bound), "DoRA vs merged dense forward")


def test_results_are_float64_for_every_input_dtype():
    rng = np.random.default_rng(0)
    for dtype in ["float16", "bfloat16", "float32", "float64"]:
        dt = np.float64 if dtype == "float64" else numpy_dtype(dtype)
        x, W = rng.standard_normal((2, 4)).astype(dt), rng.standard_normal((3, 4)).astype(dt)
        A, B = rng.standard_normal((2, 4)).astype(dt), rng.standard_normal((3, 2)).astype(dt)
        assert lora_forward(x, W, A, B, scaling=1.0).dtype == np.float64
        assert all(g.dtype == np.float64 for g in lora_backward(np.ones((2, 3), dt), x, W, A, B, scaling=1.0))
        assert lora_init(4, 3, 2, rng=rng, dtype=dt)[0].dtype == dt


# ----------------------------------------------------------------------------- initialisation


def test_lora_scaling():
    assert lora_scaling(32, 16) == 2.0
    assert lora_scaling(16, 8, rslora=True) == 16 / math.sqrt(8)
    assert lora_scaling(0, 4) == 0.0


def test_kaiming_init_has_torchs_bound_and_a_uniform_spread():
    in_features, r = 4096, 8
    A, B = lora_init(in_features, 16, r, rng=np.random.default_rng(0))
    bound = 1 / math.sqrt(in_features)  # gain sqrt(2 / (1 + 5)) times sqrt(3 / fan_in)
    assert np.abs(A).max() <= bound and (B == 0).all()
    # Statistical tier: U(-b, b) has variance b^2 / 3; the sample variance of N = 32768 draws
    # has standard error b^2 * sqrt(4/45 / N) (fourth central moment b^4 / 5): 7 sigma.
    N = A.size
    assert abs(A.var() - bound**2 / 3) <= 7 * bound**2 * math.sqrt(4 / 45 / N)
    assert np.abs(A).max() > bound * (1 - 7 / N)  # the max of N uniforms reaches the bound


def test_gaussian_init_has_std_one_over_r():
    r = 4
    A, _ = lora_init(8192, 8, r, rng=np.random.default_rng(0), scheme="gaussian")
    # The sample std of N normal draws has standard error sigma / sqrt(2N): 7 sigma.
    assert abs(A.std() - 1 / r) <= 7 * (1 / r) / math.sqrt(2 * A.size)


def test_init_is_reproducible_from_the_generator():
    a1, _ = lora_init(10, 6, 3, rng=np.random.default_rng(5))
    a2, _ = lora_init(10, 6, 3, rng=np.random.default_rng(5))
    assert_bit_equal(a1, a2, "A from the same seed")


# ----------------------------------------------------------------------------- merging into 4 bits


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_merging_a_zero_update_into_4bit_changes_nothing(quant_type):
    W = np.random.default_rng(0).standard_normal((24, 40)).astype(np.float32)
    packed, state = quantize_4bit(W, blocksize=64, quant_type=quant_type)
    p2, s2 = merge_into_4bit(packed, state, np.ones((2, 40)), np.zeros((24, 2)), 1.0)
    assert_bit_equal(s2.absmax, state.absmax, "absmax after merging B = 0")
    assert_bit_equal(dequantize_4bit(p2, s2), dequantize_4bit(packed, state), "weights after merging B = 0")
    # Codes are equal but for one class: FP4's code 8 (sign bit, zero magnitude) decodes to 0.0
    # and 0.0 re-encodes to code 0.
    old, new = unpack_4bit(packed, state.numel), unpack_4bit(p2, state.numel)
    differ = old != new
    assert np.all((old[differ] == 8) & (new[differ] == 0) & (quant_type == "fp4")), \
        f"{int(differ.sum())} codes changed outside the class 'FP4 -0 to +0'"
    report = merge_error(packed, state, np.ones((2, 40)), np.zeros((24, 2)), 1.0)
    assert report["max_abs"] == 0.0 and report["codes_changed"] == 0.0
    assert math.isnan(report["relative_to_update"])


def test_merging_into_the_torchao_scheme_keeps_the_scheme():
    """torchao's NF4 scheme quantizes in the layer's dtype: the merge re-quantizes from it."""
    import ml_dtypes

    W = np.random.default_rng(0).standard_normal((128, 128)).astype(ml_dtypes.bfloat16)  # 64 * 256 blocks
    packed, state = quantize_4bit(W, blocksize=64, double_quant="torchao")
    p2, s2 = merge_into_4bit(packed, state, np.ones((2, 128)), np.zeros((128, 2)), 1.0)
    assert (s2.dtype, s2.nested.scheme) == ("bfloat16", "torchao")
    assert_bit_equal(dequantize_4bit(p2, s2), dequantize_4bit(packed, state), "torchao weights after B = 0")
    report = merge_error(packed, state, np.full((2, 128), 0.1), np.full((128, 2), 0.1), 1.0)
    # The update, 0.02 everywhere, is below half of NF4's smallest step (0.04 absmax) in every block.
    assert report["codes_changed"] == 0.0


@given(st.sampled_from(["nf4", "fp4"]), st.booleans(), st.sampled_from([32, 64, 128]),
       st.sampled_from(["float32", "bfloat16"]), st.floats(1e-3, 1.0), st.integers(0, 2**32 - 1))
@settings(max_examples=20)
def test_merge_into_4bit_keeps_the_format_and_errs_by_at_most_half_a_step(quant_type, double_quant, blocksize,
                                                                          dtype, update_scale, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((16, 48)).astype(numpy_dtype(dtype))
    packed, state = quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    A = rng.standard_normal((4, 48))
    B = rng.standard_normal((16, 4)) * update_scale
    p2, s2 = merge_into_4bit(packed, state, A, B, 0.5)
    assert (s2.shape, s2.dtype, s2.blocksize, s2.quant_type, s2.double_quant) == \
        (state.shape, state.dtype, state.blocksize, state.quant_type, state.double_quant)
    exact = lora_merge(qlora_base_weight(packed, state, compute_dtype="float32"), A, B, 0.5)
    merged = qlora_base_weight(p2, s2, compute_dtype="float32")
    # Each element lies within half the widest codebook gap of its block's stored absmax, plus,
    # with double quantization, the gap between the stored and the true absmax; plus the
    # float32 rounding of the sum before quantizing and of the decode (one float32 ulp each).
    table = np.sort(codebook(quant_type)).astype(np.float64)
    half_step = np.max(np.diff(table)) / 2
    flat = exact.astype(np.float32).astype(np.float64).ravel()
    n_blocks = -(-flat.size // blocksize)
    true_absmax = np.array([np.abs(flat[i * blocksize:(i + 1) * blocksize]).max() for i in range(n_blocks)])
    stored = np.array([np.abs(merged.ravel()[i * blocksize:(i + 1) * blocksize]).max() for i in range(n_blocks)])
    per_block = half_step * np.maximum(stored, true_absmax) + np.abs(true_absmax - stored) \
        + 2 * np.finfo(np.float32).eps * true_absmax
    bound = np.repeat(per_block, blocksize)[: flat.size].reshape(exact.shape)
    err = np.abs(merged - exact)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3e}"
    report = merge_error(packed, state, A, B, 0.5)
    assert report["max_abs"] == float(err.max())
    assert 0 <= report["mean_abs"] <= report["max_abs"]
    code_values = codebook(quant_type)
    values_changed = code_values[unpack_4bit(packed, state.numel)] != code_values[unpack_4bit(p2, state.numel)]
    assert report["codes_changed"] == values_changed.mean()


# ----------------------------------------------------------------------------- bad input


def _layer():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 5)), rng.standard_normal((4, 5)), rng.standard_normal((2, 5)), \
        rng.standard_normal((4, 2))


BAD_CALLS = {
    "A with the wrong in_features": (lambda x, W, A, B: lora_forward(x, W, A[:, :3], B, scaling=1.0), ValueError, "A has shape"),
    "B with the wrong rank": (lambda x, W, A, B: lora_forward(x, W, A, B[:, :1], scaling=1.0), ValueError, "B has shape"),
    "x with the wrong last dimension": (lambda x, W, A, B: lora_forward(x[:, :4], W, A, B, scaling=1.0), ValueError, "in_features"),
    "rank 0": (lambda x, W, A, B: lora_forward(x, W, A[:0], B[:, :0], scaling=1.0), ValueError, "rank r is 0"),
    "rank above min(in, out)": (lambda x, W, A, B: lora_forward(x, W[:1], A, B[:1], scaling=1.0), ValueError, "larger than min"),
    "negative alpha": (lambda x, W, A, B: lora_scaling(-1.0, 4), ValueError, "alpha"),
    "negative scaling": (lambda x, W, A, B: lora_forward(x, W, A, B, scaling=-0.5), ValueError, "scaling"),
    "NaN scaling": (lambda x, W, A, B: lora_forward(x, W, A, B, scaling=float("nan")), ValueError, "scaling"),
    "mask of the wrong shape": (lambda x, W, A, B: lora_forward(x, W, A, B, scaling=1.0, dropout_mask=np.ones((2, 4))), ValueError, "dropout_mask"),
    "mask of the wrong shape, backward": (lambda x, W, A, B: lora_backward(np.ones((2, 4)), x, W, A, B, scaling=1.0, dropout_mask=np.ones(5)), ValueError, "dropout_mask"),
    "grad_y of the wrong shape": (lambda x, W, A, B: lora_backward(np.ones((2, 3)), x, W, A, B, scaling=1.0), ValueError, "grad_y"),
    "bias of the wrong shape": (lambda x, W, A, B: lora_forward(x, W, A, B, scaling=1.0, bias=np.ones(5)), ValueError, "bias"),
    "integer x": (lambda x, W, A, B: lora_forward(np.ones((2, 5), int), W, A, B, scaling=1.0), TypeError, "x has dtype"),
    "a list for W": (lambda x, W, A, B: lora_forward(x, W.tolist(), A, B, scaling=1.0), TypeError, "W must be a NumPy array"),
    "string scaling": (lambda x, W, A, B: lora_forward(x, W, A, B, scaling="2"), TypeError, "scaling"),
    "rank 0 in lora_scaling": (lambda x, W, A, B: lora_scaling(8, 0), ValueError, "rank r is 0"),
    "rank above min(in, out) in lora_init": (lambda x, W, A, B: lora_init(5, 2, 3, rng=np.random.default_rng()), ValueError, "larger than min"),
    "a seed instead of a Generator": (lambda x, W, A, B: lora_init(5, 4, 2, rng=0), TypeError, "Generator"),
    "unknown dtype name in lora_init": (lambda x, W, A, B: lora_init(5, 4, 2, rng=np.random.default_rng(), dtype="foo"), TypeError, "dtype 'foo'"),
    "unknown init scheme": (lambda x, W, A, B: lora_init(5, 4, 2, rng=np.random.default_rng(), scheme="pissa"), ValueError, "unknown scheme"),
    "merge with mismatched B": (lambda x, W, A, B: lora_merge(W, A, B.T, 1.0), ValueError, "B has shape"),
    "DoRA magnitude of the wrong shape": (lambda x, W, A, B: dora_forward(x, W, A, B, np.ones(3), scaling=1.0), ValueError, "magnitude"),
    "DoRA norm given with detach_norm=False": (lambda x, W, A, B: dora_backward(np.ones((2, 4)), x, W, A, B, np.ones(4), scaling=1.0, weight_norm=np.ones(4), detach_norm=False), ValueError, "detach_norm"),
    "DoRA zero row": (lambda x, W, A, B: dora_forward(x, np.zeros_like(W), A, np.zeros_like(B), np.ones(4), scaling=1.0), ValueError, "norm"),
    "DoRA mask of the wrong shape": (lambda x, W, A, B: dora_forward(x, W, A, B, np.ones(4), scaling=1.0, dropout_mask=np.ones((1, 5))), ValueError, "dropout_mask"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_refused_clearly(case):
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call(*_layer())


def test_qlora_bad_input_is_refused_clearly():
    x, W, A, B = _layer()
    packed, state = quantize_4bit(W.astype(np.float32), blocksize=32)
    with pytest.raises(TypeError, match="unsupported dtype"):
        qlora_forward(x, packed, state, A, B, scaling=1.0, compute_dtype="float64")
    packed3, state3 = quantize_4bit(np.ones((2, 2, 5), np.float32), blocksize=32)
    with pytest.raises(ValueError, match="2-D"):
        qlora_forward(x, packed3, state3, A, B[:2], scaling=1.0)
    with pytest.raises(ValueError, match="packed has shape"):
        qlora_backward(np.ones((2, 4)), x, packed[:-1], state, A, B, scaling=1.0)
    with pytest.raises(ValueError, match="larger than min"):
        merge_into_4bit(packed, state, np.ones((5, 5)), np.ones((4, 5)), 1.0)
