"""The small-batch 4-bit product ``y = x W^T`` (1, 4, 16 rows), every provider and a dense baseline.

Checked first: the derived tier against the oracle's float64 product. Its ceiling is the time
to read the packed weight once (bytes moved: stored format + ``x`` + ``y``, over the copy
bandwidth); FLOPs ``2 M N K``.
"""

import pytest

from benchmarks import cases


@pytest.mark.parametrize("provider", cases.PROVIDERS["matmul"])
@pytest.mark.parametrize("rows", cases.MATMUL_ROWS)
def test_matmul(run_case, workspace, shape_key, rows, provider):
    run_case(cases.make_matmul(workspace, provider, shape_key, rows))
