"""Ceilings measured on the machine that runs the cases, in the same run: a copy, a read and a matmul.

A percentage of a ceiling is only meaningful against the same machine at the same moment, so every results file carries its own ceilings and every rate in it is divided by them.
Used by ``benchmarks/conftest.py`` (CPU, once per pytest session) and ``benchmarks/run_gpu.py``.

Note: the ceilings
    - copy: ``dst.copy_(src)`` of a large uint8 buffer (256 MiB on CPU, 1 GiB on CUDA, far
      beyond any cache); bytes moved = read + written = ``2 * nbytes``. It is the ceiling of
      every memory-bound case (decode, the small-batch product): a kernel that reads R bytes and
      writes W bytes needs at least ``(R + W) / copy_bandwidth``.
    - read: a read-only stream, ``sum`` over a large buffer of ones viewed as float32, int32 and
      uint8 (the fastest of the three: CPUs vectorize the float sum best), bytes moved = ``nbytes`` (the sum's output is a few bytes). It is the
      ceiling of the small-batch product, which reads its packed weight once and writes almost
      nothing: a pure read can reach a higher rate than a copy's (read plus written bytes per
      second), so judging the product against the copy bandwidth could flatter it.
    - matmul: ``a @ b`` of square matrices in the compute dtype (bf16 on CUDA, 8192; float32
      on CPU, 2048), ``2 n^3`` floating-point operations. It is the ceiling of the layer's
      forward and backward. On CPU a small bfloat16 matmul is measured as well, only to record
      how slow bfloat16 is on a CPU without AVX-512 BF16 (the reason the CPU layer cases compute
      in float32).

    Both are measured at the start and at the end of a run and the better of the two is the
    ceiling (``best_ceilings``): on a shared machine a single measurement can land in a busy
    moment, and a ceiling below what a case reached would read as more than 100%.
"""

from __future__ import annotations

import torch

from benchmarks.timing import Timing, time_cpu, time_cuda_interleaved

__all__ = ["measure_copy", "measure_read", "read_stream", "measure_matmul", "measure_ceilings", "best_ceilings",
           "COPY_BYTES", "MATMUL_SIZE"]

#: Bytes of the copied buffer, per device type.
COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}
#: (n, dtype) of the square matmul ceiling, per device type.
MATMUL_SIZE = {"cpu": (2048, torch.float32), "cuda": (8192, torch.bfloat16)}


def _time(fn, device: torch.device, repeat: int) -> Timing:
    if device.type == "cuda":
        return time_cuda_interleaved({"f": fn}, reps=repeat, warmup=2)["f"]
    return time_cpu(fn, repeat=repeat, warmup=1)


def measure_copy(device, nbytes: int | None = None, *, repeat: int = 7) -> dict:
    """Measure the bandwidth of a large device-to-device copy.

    Returns
    -------
    dict
        ``{"nbytes", "bytes_moved", "timing", "gbps"}`` with ``gbps = 2 * nbytes / median``
        (read plus written, Note: the ceilings).

    Examples
    --------
    >>> c = measure_copy("cpu", 2**20, repeat=2)
    >>> c["bytes_moved"] == 2 * 2**20 and c["gbps"] > 0
    True
    """
    device = torch.device(device)
    nbytes = int(nbytes or COPY_BYTES[device.type])
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = _time(lambda: dst.copy_(src), device, repeat)
    bytes_moved = 2 * nbytes  # read src + write dst
    return {"nbytes": nbytes, "bytes_moved": bytes_moved, "timing": timing.as_dict(),
            "gbps": bytes_moved / timing.median_s / 1e9}


def read_stream(buffer: torch.Tensor) -> dict:
    """Callables that read ``buffer`` once and write a scalar: ``{"sum float32", "sum int32", "sum uint8"}``.

    The 4-byte views need a byte count divisible by 4 (otherwise only the uint8 sum is offered).
    A buffer of ones read as float32 holds finite values (``0x01010101``), never NaN.

    Examples
    --------
    >>> sorted(read_stream(torch.ones(64, dtype=torch.uint8)))
    ['sum float32', 'sum int32', 'sum uint8']
    >>> int(read_stream(torch.ones(64, dtype=torch.uint8))["sum uint8"]())
    64
    """
    flat = buffer.reshape(-1).view(torch.uint8)
    out = {}
    if flat.numel() % 4 == 0:
        as_float32, as_int32 = flat.view(torch.float32), flat.view(torch.int32)
        out["sum float32"] = lambda: as_float32.sum()
        out["sum int32"] = lambda: as_int32.sum()
    out["sum uint8"] = lambda: flat.sum()
    return out


def measure_read(device, nbytes: int | None = None, *, repeat: int = 7) -> dict:
    """Measure a read-only stream over ``nbytes`` (Note: the ceilings).

    Returns
    -------
    dict
        ``{"nbytes", "bytes_moved", "timing", "gbps", "how"}`` with ``gbps = nbytes / median``
        of the fastest sum (``how`` names it).

    Examples
    --------
    >>> r = measure_read("cpu", 2**20, repeat=2)
    >>> r["bytes_moved"] == 2**20 and r["gbps"] > 0 and r["how"].startswith("sum ")
    True
    """
    device = torch.device(device)
    nbytes = int(nbytes or COPY_BYTES[device.type])
    buffer = torch.ones(nbytes, dtype=torch.uint8, device=device)
    fns = read_stream(buffer)
    if device.type == "cuda":
        timed = time_cuda_interleaved(fns, reps=repeat, warmup=2)
    else:
        timed = {name: time_cpu(fn, repeat=repeat, warmup=1) for name, fn in fns.items()}
    how = min(timed, key=lambda k: timed[k].median_s)
    timing = timed[how]
    return {"nbytes": nbytes, "bytes_moved": nbytes, "timing": timing.as_dict(), "gbps": nbytes / timing.median_s / 1e9,
            "how": how}


def measure_matmul(device, n: int | None = None, dtype=None, *, repeat: int = 5) -> dict:
    """Measure the rate of a square matmul ``(n, n) @ (n, n)`` in ``dtype``.

    Returns
    -------
    dict
        ``{"n", "dtype", "flops", "timing", "tflops"}`` with ``flops = 2 n^3``.

    Examples
    --------
    >>> m = measure_matmul("cpu", 64, torch.float32, repeat=2)
    >>> m["flops"] == 2 * 64**3 and m["dtype"] == "float32"
    True
    """
    device = torch.device(device)
    default_n, default_dtype = MATMUL_SIZE[device.type]
    n, dtype = int(n or default_n), dtype or default_dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    timing = _time(lambda: a @ b, device, repeat)
    flops = 2 * n**3  # n^2 outputs, n multiply-adds each
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops": flops, "timing": timing.as_dict(),
            "tflops": flops / timing.median_s / 1e12}


def measure_ceilings(device) -> dict:
    """All ceilings of a device (Note: the ceilings): ``{"copy": ..., "matmul": ..., ...}``."""
    device = torch.device(device)
    ceilings = {"copy": measure_copy(device), "read": measure_read(device), "matmul": measure_matmul(device)}
    if device.type == "cpu":
        ceilings["matmul_bfloat16"] = measure_matmul(device, 256, torch.bfloat16, repeat=3)
    return ceilings


def best_ceilings(*measured: dict) -> dict:
    """The best of several ``measure_ceilings`` results, ceiling by ceiling (highest rate).

    Examples
    --------
    >>> a = {"copy": {"gbps": 1.0}, "matmul": {"tflops": 3.0}}
    >>> b = {"copy": {"gbps": 2.0}, "matmul": {"tflops": 1.0}}
    >>> c = best_ceilings(a, b)
    >>> c["copy"]["gbps"], c["matmul"]["tflops"]
    (2.0, 3.0)
    """
    best = {}
    for name in measured[0]:
        rate = "gbps" if "gbps" in measured[0][name] else "tflops"
        best[name] = max((m[name] for m in measured if name in m), key=lambda c: c[rate])
    return best
