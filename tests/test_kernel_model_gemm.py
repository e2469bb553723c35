"""The tensor-core model of ``benchmarks/kernel_model.py`` (Note: the tensor-core model), issue 13 item 4.

A model, not a measurement: these tests check its arithmetic and that the docs show what it says
about the committed report (``benchmarks/results/kernels.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import kernel_model as km

ROOT = Path(__file__).resolve().parents[1]
ROW = {"kind": "matmul", "rows": 2048, "shape": [4096, 14336], "per_item": 13.5, "constexprs": {"BLOCK_M": 64}}


def test_tensor_rate_matches_the_whitepaper():
    """989.4 dense BF16 TFLOP/s, 132 multiprocessors, 1830 MHz (H100 SXM5 whitepaper)."""
    assert 989.4e12 / (132 * 1.83e9) == pytest.approx(km.TENSOR_FLOPS_PER_CLOCK, rel=1e-3)


def test_dense_gemm_is_tensor_bound_at_2048_rows():
    for gpu in km.GPUS:
        c = km.dense_gemm_clocks(2048, 4096, 14336, gpu)
        assert c["bound"] == "tensor"
        assert c["clocks"] == pytest.approx(2 * 2048 * 4096 * 14336 / (km.TENSOR_FLOPS_PER_CLOCK * 132))


def test_issue_time_scales_with_row_tiles():
    small = km.gemm_clocks(ROW, "H200")
    big = km.gemm_clocks({**ROW, "constexprs": {"BLOCK_M": 128}}, "H200")
    assert small["tiles_m"] == 32 and big["tiles_m"] == 16
    assert big["issue"] == pytest.approx(small["issue"] / 2) and big["tensor"] == small["tensor"]
    p = km.gemm_prediction(ROW, "H200")
    assert 0 < p["serial"] <= p["overlapped"] <= 1
    free = km.gemm_prediction({**ROW, "per_item": 0.0}, "H200")  # no decode cost: the dense GEMM's rate
    assert free["overlapped"] == pytest.approx(1.0)


def test_layer_prediction_bounds():
    fwd = {**ROW, "rows": 512}
    bwd = {**fwd, "kind": "matmul_t", "per_item": 0.0}
    dec = {"kind": "decode", "shape": [4096, 14336], "per_item": 0.0, "blocksize": 64, "double_quant": True,
           "dtype": "bfloat16"}
    p = km.layer_prediction({**fwd, "per_item": 0.0}, bwd, dec, "H200")
    assert p["fused_overlapped"] == pytest.approx(1.0)  # free decode: as fast as the dense layer
    assert p["decode_then_dense"] > 1.0  # two decodes still move the weight's bytes


def test_docs_fragment_is_made_from_the_committed_report():
    doc = json.loads((ROOT / "benchmarks" / "results" / "kernels.json").read_text())
    row = next(r for r in doc["rows"] if r["case"] == "matmul M=2048 bfloat16" and r["arch"] == 90)
    fragment = (ROOT / "docs" / "generated" / "kernels_gemm_model.md").read_text()
    for gpu in km.GPUS:
        assert f"{km.gemm_prediction(row, gpu)['overlapped']:.0%}" in fragment
    assert "generated/kernels_gemm_model.md" in (ROOT / "docs" / "kernels.md").read_text()
