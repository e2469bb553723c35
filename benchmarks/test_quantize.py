"""Quantize a bfloat16 weight to NF4 with double quantization, every provider, side by side.

Checked first: packed codes and constants against the oracle (``benchmarks/checks.py``).
Bytes moved: the bfloat16 weight read plus the stored format written (Note: bytes and FLOPs of a
case, ``benchmarks/cases.py``).
"""

import pytest

from benchmarks import cases


@pytest.mark.parametrize("provider", cases.PROVIDERS["quantize"])
def test_quantize(run_case, workspace, shape_key, provider):
    run_case(cases.make_quantize(workspace, provider, shape_key))
