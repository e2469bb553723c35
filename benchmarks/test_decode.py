"""Decode the stored NF4 weight to bfloat16, float16 and float32, every provider, side by side.

Checked first: bit for bit against the oracle's decode of the provider's own state. Bytes
moved: the stored format read plus ``N K`` output elements written; the percentage is of the
copy bandwidth measured in the same run.
"""

import pytest

from benchmarks import cases


@pytest.mark.parametrize("provider", cases.PROVIDERS["decode"])
@pytest.mark.parametrize("dtype", cases.DECODE_DTYPES)
def test_decode(run_case, workspace, shape_key, dtype, provider):
    run_case(cases.make_decode(workspace, provider, shape_key, dtype))
