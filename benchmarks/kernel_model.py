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
      one is bound by issue or by memory; only a GPU run measures the fraction. The product past
      16 rows (a GEMM) is bound by tensor cores, which this fraction does not describe: it has
      its own model (Note: the tensor-core model).

Note: the tensor-core model
    The fused 4-bit GEMM ``y = x W^T`` (``M`` rows, weight ``N x K``) and the layer's input
    gradient ``G W`` decode each weight tile in registers for every tile of ``BLOCK_M`` rows,
    then feed it to ``tl.dot``. Per multiprocessor and clock (the clock cancels again) the
    kernel needs at least

    - tensor clocks ``2 M' N K / tensor_flops_per_clock``: the multiply-adds at the dense bf16
      tensor-core rate (``M'`` is ``M`` rounded up to whole row tiles: padded rows cost too);
    - issue clocks ``per_item * N K * ceil(M / BLOCK_M) / 128``: ``per_item`` is the compiled
      main loop's thread-instructions per weight of one tile (the report's count for that case
      on sm_90: the decode, the loads, the shared-memory stores and the ``tl.dot`` instructions
      themselves), spent once per row tile;
    - memory clocks ``bytes / (bytes_per_clock * SMs)``: the packed weight, ``x`` and ``y``
      once (``bytes_per_item``; row tiles re-reading the weight are assumed to hit L2).

    Whole programs run on multiprocessors: with ``P`` programs (the launch's grid), ``c`` of
    them resident on a multiprocessor at once (the report's ``programs_per_sm``, from the
    compiled registers, shared memory and warps, capped at ``ceil(P / SMs)``), the launch runs
    in ``ceil(P / (SMs * c))`` waves of ``c`` programs, each program carrying ``1 / P`` of the
    tensor and issue clocks. Within a multiprocessor two bounds bracket the time:
    **overlapped** (the larger of its programs' tensor and issue clocks: one program's decode
    runs while another's tensor-core products run) and **serial** (their sum: no overlap). The
    compiled code decides which applies, and the **predicted** column follows it: a program's
    main loop waits for its own ``wgmma`` before decoding the next tile (the report's
    ``loop_dot_waits`` are all 0), so one program alone is serial, and two or more resident
    programs overlap (as would one whose waits leave products in flight). The dense bf16 GEMM
    it is compared with is an ideal one: the larger of its tensor clocks and its memory clocks
    (``2 N K + 2 M K + 2 M N`` bytes) spread evenly over all multiprocessors, which cuBLAS
    approaches but does not reach: the fraction is the fused kernel's against an ideal dense
    GEMM. What the model leaves out: latency, pipeline bubbles between two resident programs
    (perfect interleaving is assumed), the ``wgmma`` issue constraints, L2 misses, clocks
    lowered by power, and shared-memory bandwidth: a ``wgmma`` reading both operands from
    shared memory on a 64-wide weight tile reads about 128 bytes per tensor clock, as much as a
    multiprocessor's shared memory delivers (``docs/kernels.md``, the GEMM model).

    ``tensor_flops_per_clock = 4096`` dense bf16 floating-point operations per clock per
    multiprocessor on sm_90 (H100 and H200, the same GH100 multiprocessor): the NVIDIA H100
    Tensor Core GPU Architecture whitepaper gives 989.4 dense BF16 TFLOP/s for the H100 SXM5
    with 132 multiprocessors at 1830 MHz, ``989.4e12 / (132 * 1.83e9) = 4096``, twice the A100's
    per multiprocessor (A100 whitepaper: 312 TFLOP/s, 108 multiprocessors, 1410 MHz); the H200
    datasheet gives the same 989 TFLOP/s (1,979 with sparsity).

    The layer (``layer_prediction``): a QLoRA layer's forward and backward at ``T`` tokens is
    ``x W^T`` (fused GEMM) + ``G W`` (fused transposed GEMM), each as above, + the adapter's six products
    (``6 T r (K + N)`` operations, at the tensor rate, the same in both layers); the bf16-base
    LoRA layer replaces the two fused GEMMs with dense ones. The alternative the issue names,
    decoding the whole weight to bf16 twice per step and running dense GEMMs, is modelled too:
    two decodes (the decode kernel's own prediction) plus the dense layer.
"""

from __future__ import annotations

import math

__all__ = ["GPUS", "ISSUE_PER_CLOCK", "bytes_per_item", "predict", "BUDGETS", "budget", "TENSOR_FLOPS_PER_CLOCK",
           "gemm_clocks", "dense_gemm_clocks", "decode_clocks", "gemm_prediction", "layer_prediction"]

#: Thread-instructions one multiprocessor issues per clock (Note: the model's constants).
ISSUE_PER_CLOCK = 128
#: Datasheet bandwidth (bytes/s), multiprocessors, maximum SM clock (Hz) (Note: the model's constants).
GPUS = {
    "H100": dict(bandwidth=3.35e12, sms=132, clock_hz=1.98e9),
    "H200": dict(bandwidth=4.8e12, sms=132, clock_hz=1.98e9),
}
#: Dense bf16 tensor-core operations per clock per multiprocessor, sm_90 (Note: the tensor-core model).
TENSOR_FLOPS_PER_CLOCK = 4096
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


def _per_sm_clock(gpu: str) -> tuple:
    c = GPUS[gpu]
    return c["bandwidth"] / (c["sms"] * c["clock_hz"]), c["sms"]


def dense_gemm_clocks(M: int, N: int, K: int, gpu: str, itemsize: int = 2) -> dict:
    """Clocks of an ideal dense GEMM ``(M, K) @ (K, N)`` in a 2-byte dtype (Note: the tensor-core model).

    Examples
    --------
    >>> c = dense_gemm_clocks(2048, 4096, 14336, "H200")
    >>> c["bound"], round(c["clocks"])
    ('tensor', 444850)
    """
    bytes_per_clock, sms = _per_sm_clock(gpu)
    tensor = 2 * M * N * K / (TENSOR_FLOPS_PER_CLOCK * sms)
    memory = itemsize * (N * K + M * K + M * N) / (bytes_per_clock * sms)
    return dict(tensor=tensor, memory=memory, clocks=max(tensor, memory), bound="tensor" if tensor >= memory else "memory")


def gemm_clocks(row: dict, gpu: str) -> dict:
    """Clocks of a fused 4-bit GEMM report row (``matmul`` past 16 rows, or ``matmul_t``).

    Returns the whole kernel's ``tensor``, ``issue`` and ``memory`` clocks spread evenly over
    the multiprocessors (the ideal), the launch's ``programs`` (None without a grid),
    ``waves`` and resident ``programs_per_sm``, and three predictions that place whole
    programs on multiprocessors (Note: the tensor-core
    model): ``overlapped``, ``serial`` and ``predicted`` (overlapped when two or more programs
    share a multiprocessor, serial otherwise), each at least the memory clocks; ``bound`` names
    what limits ``predicted``.

    Examples
    --------
    >>> row = {"kind": "matmul", "rows": 2048, "shape": [4096, 14336], "per_item": 13.5,
    ...        "constexprs": {"BLOCK_M": 64}}
    >>> c = gemm_clocks(row, "H200")
    >>> c["bound"], round(c["issue"] / c["tensor"], 2)
    ('issue', 3.38)
    >>> two = gemm_clocks({**row, "per_item": 10.0, "constexprs": {"BLOCK_M": 256}, "grid": [64, 1, 8],
    ...                    "programs_per_sm": 2}, "H200")
    >>> two["waves"], two["programs_per_sm"], two["bound"], round(two["predicted"] / two["tensor"], 3)
    (2, 2, 'tensor', 1.031)
    """
    bytes_per_clock, sms = _per_sm_clock(gpu)
    N, K = row["shape"]
    M = row["rows"]
    tiles_m = -(-M // row["constexprs"]["BLOCK_M"])
    tensor = 2 * tiles_m * row["constexprs"]["BLOCK_M"] * N * K / TENSOR_FLOPS_PER_CLOCK  # padded rows count
    issue = row["per_item"] * N * K * tiles_m / ISSUE_PER_CLOCK
    memory = bytes_per_item(row) * N * K / (bytes_per_clock * sms)
    if "grid" in row:  # whole programs on multiprocessors, in waves
        programs = math.prod(row["grid"])
        per_sm = max(1, min(row.get("programs_per_sm", 1), -(-programs // sms)))
        waves = -(-programs // (sms * per_sm))
        slots = waves * per_sm  # program-times one multiprocessor spends
        t_p, i_p = tensor / programs, issue / programs
    else:  # the work spread evenly (no launch recorded)
        programs, per_sm, waves, slots = None, max(1, row.get("programs_per_sm", 1)), 1, 1
        t_p, i_p = tensor / sms, issue / sms
    overlapped = max(slots * max(t_p, i_p), memory)
    serial = max(slots * (t_p + i_p), memory)
    in_flight = any(n > 0 for n in row.get("loop_dot_waits", []))  # a program's own products overlap its decode
    predicted = overlapped if per_sm >= 2 or in_flight else serial
    parts = {"tensor": slots * t_p, "issue": slots * i_p, "memory": memory}
    bound = "memory" if predicted == memory else max(("tensor", "issue"), key=parts.get)
    return dict(tensor=tensor / sms, issue=issue / sms, memory=memory, tiles_m=tiles_m, programs=programs,
                waves=waves, programs_per_sm=per_sm, overlapped=overlapped, serial=serial, predicted=predicted,
                bound=bound)


def decode_clocks(row: dict, gpu: str) -> float:
    """Clocks of one full decode of a ``decode`` report row's weight: the larger of memory and issue."""
    bytes_per_clock, sms = _per_sm_clock(gpu)
    N, K = row["shape"]
    memory = bytes_per_item(row) * N * K / (bytes_per_clock * sms)
    issue = row["per_item"] * N * K / (ISSUE_PER_CLOCK * sms)
    return max(memory, issue)


def gemm_prediction(row: dict, gpu: str) -> dict:
    """Predicted fraction of an ideal dense bf16 GEMM's throughput for a fused GEMM report row.

    Examples
    --------
    >>> row = {"kind": "matmul", "rows": 2048, "shape": [4096, 14336], "per_item": 13.5,
    ...        "constexprs": {"BLOCK_M": 64}}
    >>> p = gemm_prediction(row, "H200")
    >>> round(p["overlapped"], 2), round(p["serial"], 2), p["predicted"] == p["serial"]
    (0.3, 0.23, True)
    """
    N, K = row["shape"]
    dense = dense_gemm_clocks(row["rows"], N, K, gpu)["clocks"]
    fused = gemm_clocks(row, gpu)
    return dict(overlapped=dense / fused["overlapped"], serial=dense / fused["serial"],
                predicted=dense / fused["predicted"], bound=fused["bound"], tiles_m=fused["tiles_m"])


def layer_prediction(forward: dict, backward: dict, decode: dict, gpu: str, rank: int = 16) -> dict:
    """Predicted time of a QLoRA layer's forward and backward over a bf16-base LoRA layer's.

    ``forward`` and ``backward`` are the report rows of the fused ``matmul`` and ``matmul_t``
    at the same token count; ``decode`` the decode row of the same weight. Returns the ratio for
    the fused path (overlapped and serial) and for the decode-twice-then-dense path.

    Examples
    --------
    >>> fwd = {"kind": "matmul", "rows": 512, "shape": [4096, 14336], "per_item": 13.5, "constexprs": {"BLOCK_M": 64}}
    >>> bwd = {"kind": "matmul_t", "rows": 512, "shape": [4096, 14336], "per_item": 8.34, "constexprs": {"BLOCK_M": 64}}
    >>> dec = {"kind": "decode", "shape": [4096, 14336], "per_item": 11.41, "blocksize": 64, "double_quant": True,
    ...        "dtype": "bfloat16"}
    >>> p = layer_prediction(fwd, bwd, dec, "H200")
    >>> round(p["fused_overlapped"], 2), round(p["decode_then_dense"], 2)
    (2.72, 1.54)
    """
    N, K = forward["shape"]
    T = forward["rows"]
    _, sms = _per_sm_clock(gpu)
    adapter = 6 * T * rank * (K + N) / (TENSOR_FLOPS_PER_CLOCK * sms)
    dense = 2 * dense_gemm_clocks(T, N, K, gpu)["clocks"] + adapter
    f, b = gemm_clocks(forward, gpu), gemm_clocks(backward, gpu)
    return dict(fused_overlapped=(f["overlapped"] + b["overlapped"] + adapter) / dense,
                fused_serial=(f["serial"] + b["serial"] + adapter) / dense,
                fused_predicted=(f["predicted"] + b["predicted"] + adapter) / dense,
                decode_then_dense=(2 * decode_clocks(decode, gpu) + dense) / dense)
