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


BLOCK64_SETTINGS = (
    # (data, seed, double quantization): the settings under which a block-64 NF4 error is quoted
    ((1024, 1024), 0, False),
    ((1024, 1024), 0, True),
    ((4096, 4096), 0, False),
    ((4096, 4096), 0, True),
)


def block64_errors_table() -> str:
    """Every block-64 NF4 round-trip error the docs and ``qlora-ref report`` quote, side by side."""
    where = {
        ((1024, 1024), False): "NF4 page table; `qlora-ref report`, column \"no DQ\"",
        ((1024, 1024), True): "`qlora-ref report`, column \"DQ\"",
        ((4096, 4096), False): "double-quantization page, row 64 / no",
        ((4096, 4096), True): "double-quantization page, row 64 / yes",
    }
    rows = []
    for shape, seed, dq in BLOCK64_SETTINGS:
        x = _normal_matrix(*shape, seed=seed)
        err = round_trip_error(x, blocksize=64, quant_type="nf4", double_quant=dq)["mean_abs"]
        rows.append([f"{shape[0]}x{shape[1]}, one draw (NumPy seed {seed})", "yes" if dq else "no",
                     f"{err:.6f}", where[(shape, dq)]])
    published = PUBLISHED_MEAN_ABS_ERROR["nf4"][64]
    rows.append(["1024x1024, mean over 200 draws (torch)", "no", f"{published:.6f}",
                 "bitsandbytes' tests (the \"published\" figure)"])
    return _md_table(["standard-normal float32 data", "double quant", "mean abs error", "quoted on"], rows)


def code_use(blocksize: int, x: np.ndarray) -> np.ndarray:
    """Fraction of elements of ``x`` that get each NF4 code (16,), quantized with ``blocksize``."""
    packed, _ = quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    codes = np.concatenate([packed.ravel() >> 4, packed.ravel() & 0xF])
    return np.bincount(codes, minlength=16) / codes.size


def code_use_table() -> str:
    """How often each NF4 code is used on standard-normal data, block 64, and the entropy."""
    x = _normal_matrix()
    freq = code_use(64, x)
    table = codebook("nf4")
    rows = [[c, f"{float(v):+.4f}", f"{100 * f:.2f}%"] for c, (v, f) in enumerate(zip(table, freq))]
    entropy = float(-(freq * np.log2(freq)).sum())
    n_blocks = x.size // 64
    packed, _ = quantize_4bit(x, blocksize=64, quant_type="nf4")
    codes = np.stack([packed.ravel() >> 4, packed.ravel() & 0xF], axis=1).reshape(n_blocks, 64)
    ends = ((codes == 0) | (codes == 15)).sum(axis=1)  # the block's absmax element lands on -1 or +1
    text = _md_table(["code", "value", "share of elements"], rows)
    text += (
        f"\nOn 1024x1024 standard-normal data, block 64: code use ranges from {100 * freq.min():.1f}% "
        f"to {100 * freq.max():.1f}% (equal use would be {100 / 16:.2f}%), an entropy of "
        f"{entropy:.2f} bits out of 4. Every block uses -1 or +1 at least once (the element that set "
        f"the absmax lands there exactly), {ends.mean():.2f} times per block on average, and "
        f"{100 * np.mean(ends == 1):.1f}% of blocks exactly once.\n"
    )
    return text


def offset_line() -> str:
    """The offset reconstruction evaluated, beside bitsandbytes' literal."""
    delta = 1 - (1 / 32 + 1 / 30) / 2
    return (f"$$\\delta = 1 - \\tfrac{{1}}{{2}}\\left(\\tfrac{{1}}{{32}} + \\tfrac{{1}}{{30}}\\right) "
            f"= {delta:.8f}\\ldots$$\n\nwhich rounds to bitsandbytes' literal `{NF4_OFFSET}` "
            f"(`qlora_ref.codebooks.NF4_OFFSET`).\n")


#: Tensor shapes for the per-tensor overhead of double quantization (small to a 7B model's layer).
OVERHEAD_SHAPES = ((128, 256), (1024, 1024), (4096, 4096))


def dq_bits_table() -> str:
    """Why examples print more than 4.127 bits: the per-tensor maps and offset, quantified."""
    rows = []
    for shape in OVERHEAD_SHAPES:
        x = _normal_matrix(*shape)
        packed, state = quantize_4bit(x, blocksize=64, double_quant=True)
        nested = state.nested
        per_tensor_bytes = state.codebook.nbytes + nested.codebook.nbytes + np.asarray(nested.offset).nbytes
        per_block_bits = 8.0 * (state.packed_nbytes + nested.codes.nbytes + nested.absmax.nbytes) / state.numel
        rows.append([
            f"{shape[0]}x{shape[1]}", f"{state.numel:,}", f"{per_block_bits:.4f}", per_tensor_bytes,
            f"{8.0 * per_tensor_bytes / state.numel:.4f}", f"{state.bits_per_parameter:.4f}",
        ])
    limit = 4 + 8 / 64 + 32 / (64 * 256)
    text = _md_table(["tensor", "parameters", "codes + constants, bits / param",
                      "per-tensor bytes (two maps, offset)", "their bits / param", "total bits / param"], rows)
    text += (f"\nThe limit for a large tensor is $4 + 8/64 + 32/(64 \\cdot 256) = {limit:.4f}$; "
             "the per-tensor bytes add $8 \\cdot \\text{bytes} / \\text{parameters}$ on top.\n")
    return text


def _first_changed_significant_digit(a: str, b: str) -> int:
    """1-based index of the first significant digit in which two decimal strings differ."""
    da, db = (s.replace(".", "").lstrip("0") for s in (a, b))
    return next(i + 1 for i, (p, q) in enumerate(zip(da, db)) if p != q)


def dq_cost_sentence() -> str:
    """Where double quantization moves the mean error, in significant digits, per block size."""
    x = _normal_matrix(4096, 4096)
    ordinal = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth"}
    parts = []
    for blocksize in (32, 64, 128, 256):
        a, b = (f"{round_trip_error(x, blocksize=blocksize, quant_type='nf4', double_quant=dq)['mean_abs']:.6f}"
                for dq in (False, True))
        parts.append(f"block {blocksize}: {a} -> {b}, the {ordinal[_first_changed_significant_digit(a, b)]} "
                     "significant digit")
    return "Double quantization moves the mean round-trip error by " + "; ".join(parts) + ".\n"


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
    ax.set_xlabel("dequantized - original (block 64, no double quantization, 512x1024 N(0,1) data, seed 0)")
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "figures" / "error_histograms.png", dpi=110, metadata={"Software": None})
    plt.close(fig)

    # Figure 3: how often each NF4 code is used, by block size, against equal use.
    x = _normal_matrix()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.27
    for i, blocksize in enumerate((64, 256, 4096)):
        ax.bar(np.arange(16) + (i - 1) * width, 100 * code_use(blocksize, x), width, label=f"block {blocksize}")
    ax.axhline(100 / 16, color="k", ls="--", lw=1, label="equal use (1/16)")
    ax.set_xticks(range(16))
    ax.set_xlabel("NF4 code (0 = -1, 7 = 0, 15 = +1)")
    ax.set_ylabel("% of elements")
    ax.set_title("NF4 code use on standard-normal data (1024x1024)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "figures" / "nf4_code_use.png", dpi=110, metadata={"Software": None})
    plt.close(fig)


GENERATED = {
    "nf4_table.md": nf4_table,
    "round_trip_errors.md": round_trip_table,
    "double_quant.md": double_quant_table,
    "nf4_code_use.md": code_use_table,
    "nf4_offset.md": offset_line,
    "block64_errors.md": block64_errors_table,
    "dq_bits.md": dq_bits_table,
    "dq_cost.md": dq_cost_sentence,
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
