"""Make the generated tables and figures of the NF4 and double-quantization pages from the oracle.

Run ``python docs/scripts/quantization_pages.py`` from the repository root: it writes
``docs/generated/*.md`` (included by the pages) and ``docs/figures/*.png``. Nothing in those files
is typed by hand; ``tests/test_docs.py`` regenerates the tables and checks they match.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.stats import norm

from qlora_ref import codebook, dequantize_4bit, normal_float_codebook, quantize_4bit
from qlora_ref.cli.report import PUBLISHED_MEAN_ABS_ERROR, round_trip_error
from qlora_ref.codebooks import NF4_OFFSET
from qlora_ref.double_quant import dequantize_absmax
from qlora_ref.state import BLOCKSIZES

DOCS = Path(__file__).resolve().parents[1]
SEED = 0


def _normal_matrix(rows=1024, cols=1024, seed=SEED) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def _md_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def nf4_table() -> str:
    """The normative table, its bits, and how far a float64 derivation lands from it."""
    table = codebook("nf4")
    f32 = normal_float_codebook(4, pipeline="float32")
    f64 = normal_float_codebook(4, pipeline="float64")
    ulp = f64.view(np.int32).astype(np.int64) - table.view(np.int32).astype(np.int64)
    rows = [
        [c, f"{float(v):.10f}", f"`0x{int(b):08x}`", "yes" if a == v else "no", int(u)]
        for c, (v, b, a, u) in enumerate(zip(table, table.view(np.uint32), f32, ulp))
    ]
    return _md_table(["code", "value", "float32 bits", "float32 pipeline equal", "float64 pipeline, ulp away"], rows)


def round_trip_table() -> str:
    """Mean |x - deq| on 1024x1024 standard-normal data per type and block size."""
    x = _normal_matrix()
    rows = []
    for blocksize in BLOCKSIZES:
        row = [blocksize]
        for quant_type in ("nf4", "fp4", "int4"):
            err = round_trip_error(x, blocksize=blocksize, quant_type=quant_type)["mean_abs"]
            published = PUBLISHED_MEAN_ABS_ERROR.get(quant_type, {}).get(blocksize)
            row.append(f"{err:.6f}" + (f" ({published:.6f})" if published else ""))
        rows.append(row)
    return _md_table(["block", "NF4 (published)", "FP4 (published)", "INT4"], rows)


def double_quant_table() -> str:
    """Bits per parameter and the accuracy cost of double quantization, 4096x4096 NF4."""
    x = _normal_matrix(4096, 4096)
    x64 = x.astype(np.float64)
    rows = []
    for blocksize in (32, 64, 128, 256):
        for dq in (False, True):
            packed, state = quantize_4bit(x, blocksize=blocksize, double_quant=dq)
            y = dequantize_4bit(packed, state).astype(np.float64)
            if dq:
                _, plain = quantize_4bit(x, blocksize=blocksize)
                rel = np.abs(dequantize_absmax(state.nested) / plain.absmax - 1.0)
                absmax_err = f"{rel.mean():.2e} / {rel.max():.2e}"
            else:
                absmax_err = "0 (float32)"
            rows.append([
                blocksize, "yes" if dq else "no", f"{state.bits_per_parameter:.4f}",
                f"{np.abs(x64 - y).mean():.6f}", absmax_err,
            ])
    return _md_table(["block", "double quant", "bits / parameter", "mean abs error", "absmax rel. error mean / max"], rows)


def figures() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Figure 1: the codebooks in units of standard deviations against the normal density.
    z = np.linspace(-2.5, 2.5, 500)
    fig, axes = plt.subplots(3, 1, figsize=(8, 6), sharex=True)
    scale = norm.ppf(NF4_OFFSET)  # NF4's +1 sits at this many standard deviations
    for ax, quant_type in zip(axes, ("nf4", "fp4", "int4")):
        values = np.sort(codebook(quant_type)) * scale
        ax.plot(z, norm.pdf(z), color="0.6")
        ax.vlines(values, 0, norm.pdf(values), color="C0")
        ax.plot(values, norm.pdf(values), "o", color="C0", ms=4)
        ax.set_ylabel(quant_type.upper())
    axes[-1].set_xlabel("value x absmax scale, in standard deviations (NF4's +1 = Phi^-1(offset))")
    fig.suptitle("4-bit codebooks against the standard normal density")
    fig.tight_layout()
    fig.savefig(DOCS / "figures" / "codebooks.png", dpi=110, metadata={"Software": None})
    plt.close(fig)

    # Figure 2: histograms of the round-trip error, block 64, standard-normal data.
    x = _normal_matrix(512, 1024)
    fig, ax = plt.subplots(figsize=(8, 4))
    for quant_type in ("nf4", "fp4", "int4"):
        packed, state = quantize_4bit(x, blocksize=64, quant_type=quant_type)
        err = (dequantize_4bit(packed, state) - x).ravel()
        ax.hist(err, bins=200, range=(-0.4, 0.4), histtype="step", label=f"{quant_type.upper()} (mean |e| {np.abs(err).mean():.4f})")
    ax.set_xlabel("dequantized - original (block 64, N(0,1) data)")
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "figures" / "error_histograms.png", dpi=110, metadata={"Software": None})
    plt.close(fig)


GENERATED = {
    "nf4_table.md": nf4_table,
    "round_trip_errors.md": round_trip_table,
    "double_quant.md": double_quant_table,
}


def main(argv=None) -> int:
    (DOCS / "generated").mkdir(exist_ok=True)
    (DOCS / "figures").mkdir(exist_ok=True)
    for name, make in GENERATED.items():
        (DOCS / "generated" / name).write_text(make())
    if "--no-figures" not in (argv or sys.argv[1:]):
        figures()
    return 0


if __name__ == "__main__":
    sys.exit(main())
