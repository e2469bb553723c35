"""The tolerance policy, in one place (see docs/tolerances.md).

Tiers:

- exact: codes, packed bytes, absmax, decoded values from equal codes: bit-for-bit equal.
- classified: codes against another implementation: every difference falls in a named class
  and is counted; no unclassified difference.
- derived: matmuls, reductions, LoRA forward and backward: the error against a float64 reference
  is at most twice the error of a plain baseline in the same dtype, plus a few ulp.
- statistical: round-trip error of quantization below measured mean + 7 sigma.

A failing assertion prints the largest difference, where it is, both values and the budget.
"""

from __future__ import annotations

import numpy as np


def as_numpy(a):
    """A NumPy array or a torch tensor as a NumPy array, bit for bit (bfloat16 included)."""
    if hasattr(a, "detach"):  # a torch tensor, so torch and qlora_gpu are installed
        from qlora_gpu.state import tensor_to_numpy  # lazily: these helpers also serve torch-free tests

        return tensor_to_numpy(a)
    return np.asarray(a)


def assert_bit_equal(actual, expected, what: str = "values") -> None:
    """Assert two arrays are bit-for-bit equal (same shape, dtype and bits; NaN bits included)."""
    a, e = as_numpy(actual), as_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != expected {e.dtype}"
    if a.ndim == 0:
        a, e = a.reshape(1), e.reshape(1)
    # Compare the bit patterns as unsigned integers of the element's width.
    uint = np.dtype(f"u{a.dtype.itemsize}")
    diff = a.view(uint) != e.view(uint)
    n = int(diff.sum())
    if n:
        idx = np.unravel_index(int(np.flatnonzero(diff)[0]), a.shape)
        raise AssertionError(
            f"{what}: {n} of {a.size} elements differ bitwise; first at {tuple(int(i) for i in idx)}: "
            f"{a[idx]!r} != expected {e[idx]!r} (budget: 0 differences)"
        )


def derived_budget(ref64, baseline, *, ulps: float = 4.0, dtype=None, scale=None) -> float:
    """Budget of the derived tier: 2x the baseline's max error against ``ref64`` plus a few ulp.

    ``baseline`` is the same computation done plainly in the low precision (for example a plain
    torch matmul in bfloat16); ``ulps`` units of that dtype's epsilon, scaled by the reference's
    largest magnitude, cover the final rounding of the result. ``scale`` replaces that magnitude
    for reductions whose result can cancel: pass the size of the terms (for ``x W^T``, the
    largest entry of ``|x| |W|^T``), since a different summation order errs in proportion to them.
    """
    r = np.asarray(as_numpy(ref64), dtype=np.float64)
    b = np.asarray(as_numpy(baseline), dtype=np.float64)
    import ml_dtypes  # its finfo knows bfloat16 as well as NumPy's dtypes

    eps = float(ml_dtypes.finfo(dtype if dtype is not None else np.float64).eps)
    if scale is None:
        scale = float(np.max(np.abs(r))) if r.size else 0.0
    if r.size == 0:
        return 0.0
    return 2.0 * float(np.max(np.abs(b - r))) + ulps * eps * scale


def assert_within(actual, ref64, budget: float, what: str = "values") -> None:
    """Assert ``max |actual - ref64| <= budget``, printing the worst element and the budget."""
    a = np.asarray(as_numpy(actual), dtype=np.float64)
    r = np.asarray(as_numpy(ref64), dtype=np.float64)
    assert a.shape == r.shape, f"{what}: shape {a.shape} != reference {r.shape}"
    if a.size == 0:
        return
    err = np.abs(a - r)
    if not np.all(np.isfinite(a) == np.isfinite(r)):
        bad = np.flatnonzero(np.isfinite(a) != np.isfinite(r))[0]
        idx = np.unravel_index(int(bad), a.shape)
        raise AssertionError(f"{what}: finiteness differs at {idx}: {a[idx]!r} vs reference {r[idx]!r}")
    err = np.where(np.isfinite(err), err, 0.0)
    worst = int(np.argmax(err))
    idx = np.unravel_index(worst, a.shape)
    if err.flat[worst] > budget:
        raise AssertionError(
            f"{what}: max |diff| {err.flat[worst]:.3e} at {tuple(int(i) for i in idx)} "
            f"(actual {a[idx]!r}, reference {r[idx]!r}) exceeds the budget {budget:.3e}"
        )


def assert_derived(actual, ref64, baseline, *, ulps: float = 4.0, dtype=None, what: str = "values",
                   scale=None) -> None:
    """The derived tier: error against ``ref64`` at most 2x ``baseline``'s error plus ``ulps``."""
    assert_within(actual, ref64, derived_budget(ref64, baseline, ulps=ulps, dtype=dtype, scale=scale), what)


def assert_bit_equal_or_both_nan(actual, expected, what: str = "values") -> None:
    """``assert_bit_equal``, except that a NaN matches any NaN: its payload and sign are runtime
    noise (torch's scalar and vector conversions to bfloat16 write different NaN bits), not
    part of any stored format. NaN positions must still agree exactly."""
    a, e = as_numpy(actual), as_numpy(expected)
    a_nan, e_nan = np.isnan(a.astype(np.float32)), np.isnan(e.astype(np.float32))
    if not np.array_equal(a_nan, e_nan):
        idx = np.unravel_index(int(np.flatnonzero(a_nan != e_nan)[0]), a.shape)
        raise AssertionError(f"{what}: NaN positions differ; first at {idx}: {a[idx]!r} vs expected {e[idx]!r}")
    assert_bit_equal(np.where(a_nan, 0, a).astype(a.dtype), np.where(e_nan, 0, e).astype(e.dtype), what)
