"""``qlora-ref report``: the NF4 codebook and a table of round-trip errors, from the oracle.

Errors are measured on one draw of standard-normal data (1024x1024, as bitsandbytes' own tests
do) for each quant type and block size, without and with double quantization. The published
expectations (``PUBLISHED_MEAN_ABS_ERROR`` below: bitsandbytes' tests, a mean over 200 draws,
*without* double quantization) sit beside the column measured in the same setting.
"""

from __future__ import annotations

import numpy as np

from qlora_ref.api import dequantize_4bit, quantize_4bit
from qlora_ref.cli.args import int_in
from qlora_ref.codebooks import nf4_codebook
from qlora_ref.state import BLOCKSIZES
from qlora_ref.text_table import format_table

#: Published mean |x - dequantize(quantize(x))| on 1024x1024 standard-normal float32 data
#: (bitsandbytes' tests; see docs/spec.md, section 3.7), by quant type and block size.
PUBLISHED_MEAN_ABS_ERROR = {
    "nf4": dict(zip(BLOCKSIZES, (0.067746, 0.072798, 0.076831, 0.080337, 0.083547, 0.086610, 0.089592, 0.092547))),
    "fp4": dict(zip(BLOCKSIZES, (0.088925, 0.096543, 0.102969, 0.108684, 0.114115, 0.119333, 0.124556, 0.129536))),
}


def round_trip_error(x: np.ndarray, *, blocksize: int, quant_type: str, double_quant=False) -> dict:
    """Return mean and max absolute round-trip error of ``x`` through 4-bit quantization.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    >>> err = round_trip_error(x, blocksize=64, quant_type="nf4")
    >>> 0.05 < err["mean_abs"] < 0.1
    True
    """
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    y = dequantize_4bit(packed, state, dtype="float32")
    err = np.abs(x.astype(np.float64) - y.astype(np.float64))
    return {"mean_abs": float(err.mean()), "max_abs": float(err.max()), "bits_per_parameter": state.bits_per_parameter}


def report(seed: int = 0, size: int = 1024) -> str:
    """Return the codebook and round-trip error report as text."""
    cb = nf4_codebook()
    lines = [
        format_table(
            ["code", "value", "float32 bits"],
            [[i, f"{float(v):+.10f}", f"0x{int(b):08x}"] for i, (v, b) in enumerate(zip(cb, cb.view(np.uint32)))],
            title="NF4 codebook (normative float32 table)",
        ),
        "",
    ]
    x = np.random.default_rng(seed).standard_normal((size, size)).astype(np.float32)
    rows = []
    for quant_type in ("nf4", "fp4", "int4"):
        for blocksize in BLOCKSIZES:
            plain = round_trip_error(x, blocksize=blocksize, quant_type=quant_type, double_quant=False)
            nested = round_trip_error(x, blocksize=blocksize, quant_type=quant_type, double_quant=True)
            published = PUBLISHED_MEAN_ABS_ERROR.get(quant_type, {}).get(blocksize)
            rows.append([
                quant_type, blocksize, f"{plain['mean_abs']:.6f}",
                f"{published:.6f}" if published else "-", f"{nested['mean_abs']:.6f}",
                f"{nested['max_abs']:.4f}", f"{nested['bits_per_parameter']:.4f}",
            ])
    lines.append(format_table(
        ["type", "block", "mean |err| no DQ", "published (no DQ)", "mean |err| DQ", "max |err| DQ",
         "bits/param DQ"], rows,
        title=f"Round trip of {size}x{size} standard-normal float32 data, one draw (seed {seed}); "
              "published: bitsandbytes' tests, mean over 200 draws, no double quantization",
    ))
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="print the NF4 codebook and a round-trip error table")
    p.add_argument("--seed", type=int_in(0), default=0)
    p.add_argument("--size", type=int_in(1, 8192), default=1024,
                   help="rows and columns of the test matrix (1 to 8192)")
    p.set_defaults(func=lambda args: print(report(args.seed, args.size)))
