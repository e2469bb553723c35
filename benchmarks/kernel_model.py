"""A performance MODEL of the compiled kernels (not a measurement): bytes against instructions.

Reads the rows of ``benchmarks/kernel_report.py`` (main-loop SASS instructions per element or
weight) and predicts, per GPU, what fraction of the memory ceiling a kernel can reach at best:

    time per item >= max(bytes_per_item / bytes_per_clock, instructions_per_item / issue_per_clock)

per multiprocessor, so the clock cancels out of the fraction:

    predicted fraction of the copy ceiling = min(1, (bytes_per_item / bytes_per_clock)
                                                    / (instructions_per_item / issue_per_clock))

Note: the model's constants
    - ``issue_per_clock = 128`` thread-instructions per clock per multiprocessor: 4 schedulers,
      each issuing one warp instruction (32 threads) per clock on sm_80 and sm_90 (NVIDIA A100
      and H100 architecture whitepapers, "SM architecture").
    - ``bytes_per_clock`` = datasheet HBM bandwidth / (multiprocessors * maximum SM clock):
      H100 SXM5 3.35 TB/s, H200 4.8 TB/s (NVIDIA product datasheets), 132 multiprocessors and a
      1.98 GHz maximum boost clock for both (NVIDIA H100/H200 specifications). A device copy
      reaches about 90% of the datasheet bandwidth, so a measured copy replaces this figure
      when a GPU run exists (``benchmarks/run_gpu.py`` measures one).
    - What it leaves out: latency, occupancy, L1 hit rates of the 16-entry table gathers,
      instruction mix (one pipe can saturate before issue does), set-up outside the main loop.
      It is an upper bound on the fraction reachable, useful to rank kernels and to say whether
      one is bound by issue or by memory; only a GPU run measures the fraction. It does not
      describe tensor-core throughput: the product past 16 rows (a GEMM) is left unmodelled.
"""

from __future__ import annotations

__all__ = ["GPUS", "ISSUE_PER_CLOCK", "bytes_per_item", "predict", "BUDGETS", "budget"]

#: Thread-instructions one multiprocessor issues per clock (Note: the model's constants).
ISSUE_PER_CLOCK = 128
#: Datasheet bandwidth (bytes/s), multiprocessors, maximum SM clock (Hz) (Note: the model's constants).
GPUS = {
    "H100": dict(bandwidth=3.35e12, sms=132, clock_hz=1.98e9),
    "H200": dict(bandwidth=4.8e12, sms=132, clock_hz=1.98e9),
}
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}

#: Main-loop SASS instructions per element (weight for the product) on sm_90 that each kernel
#: kind may spend (issue 13): at these counts the model puts the kernel at the memory ceiling
#: or close to it on an H200.
BUDGETS = {"decode": 12, "quantize": 40, "matmul M=1": 6, "matmul M>1": 8}


def budget(row: dict):
    """The budget of a report row (instructions per item), or None when the kind has none.

    Examples
    --------
    >>> budget({"kind": "matmul", "rows": 1}), budget({"kind": "matmul", "rows": 4})
    (6, 8)
    >>> budget({"kind": "matmul", "rows": 2048}) is None
    True
    """
    if row["kind"] in ("matmul", "matmul_t"):
        if row["rows"] > 16 or row["kind"] == "matmul_t":  # a GEMM: bound by tensor cores, which this model does not describe
            return None
        return BUDGETS["matmul M=1" if row["rows"] == 1 else "matmul M>1"]
    return BUDGETS.get(row["kind"])


def bytes_per_item(row: dict) -> float:
    """Bytes a kernel must move per element (per weight for the product) of a report row.

    Decode: ``0.5`` packed, the absmax (one uint8 code per block and one float32 per 256
    blocks when double quantized, one float32 per block otherwise), the output. Quantize: the
    input, ``0.5`` packed, one float32 absmax per block. Double quantization, per absmax value:
    read 4, write 1 code and 4 per 256. Product: the packed weight and absmax as decode reads
    them, plus ``x`` and ``y`` once (``itemsize * M * (K + N) / (N * K)``). Split-K reduction,
    per output: ``4 * SPLIT_K`` read, the output written.

    Examples
    --------
    >>> round(bytes_per_item({"kind": "decode", "blocksize": 64, "double_quant": True, "dtype": "bfloat16"}), 3)
    2.516
    """
    bs = row.get("blocksize", 64)
    absmax = (1 / bs + 4 / (bs * 256)) if row.get("double_quant", True) else 4 / bs
    size = _ITEMSIZE[row.get("dtype", "bfloat16")]
    if row["kind"] == "decode":
        return 0.5 + absmax + size
    if row["kind"] == "quantize":
        return size + 0.5 + 4 / bs
    if row["kind"] == "double_quantize":
        return 4 + 1 + 4 / 256
    if row["kind"] == "splitk_reduce":  # per output: the float32 partials read, the result written
        return 4 * row["constexprs"]["SPLIT_K"] + size
    N, K = row["shape"]
    return 0.5 + absmax + size * row["rows"] * (K + N) / (N * K)


def predict(row: dict) -> dict:
    """Predicted fraction of the copy ceiling per GPU, and the bound (``memory`` or ``issue``).

    Examples
    --------
    >>> p = predict({"kind": "decode", "blocksize": 64, "double_quant": True, "dtype": "bfloat16",
    ...              "per_item": 18.5})
    >>> p["H100"]["bound"], p["H200"]["bound"], round(p["H200"]["fraction"], 2)
    ('memory', 'issue', 0.95)
    """
    out = {}
    for gpu, c in GPUS.items():
        bytes_per_clock = c["bandwidth"] / (c["sms"] * c["clock_hz"])
        memory_clocks = bytes_per_item(row) / bytes_per_clock
        issue_clocks = row["per_item"] / ISSUE_PER_CLOCK
        out[gpu] = dict(fraction=min(1.0, memory_clocks / issue_clocks),
                        bound="memory" if memory_clocks >= issue_clocks else "issue")
    return out
