"""Timers of the benchmark suite: summaries of samples, a plain CPU timer, and CUDA events.

Used by ``benchmarks/ceilings.py`` (the copy and matmul ceilings), by the pytest-benchmark cases
on CPU (``summarize`` turns pytest-benchmark's samples into the suite's median and quantiles) and
by ``benchmarks/run_gpu.py`` (``time_cuda_interleaved``).

Note: how a time is taken
    CPU: each case is timed by pytest-benchmark (``benchmark.pedantic``, one call per round)
    after one untimed call that also serves the check against the oracle; the comparators of a
    case run next to each other in the same session (pytest runs a case's providers
    consecutively), and the suite reports medians with the 20% and 80% quantiles.
    GPU: every provider of a case is timed in the same loop, round after round, in an order
    rotated each round (so a slow drift of the clock or the temperature hits all of them
    alike). Before each timed call a buffer larger than the L2 cache is overwritten (the
    "flush"), so no provider finds its inputs in L2; CUDA events bracket the call alone, and the
    times are read after one synchronization at the end. Warm-up calls (compilation, autotuning,
    allocator growth) are not timed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Timing", "summarize", "time_cpu", "L2Flush", "time_cuda_interleaved"]


@dataclass(frozen=True)
class Timing:
    """The summary of one case's timed samples, in seconds.

    Attributes
    ----------
    median_s, q20_s, q80_s : float
        Median and the 20% / 80% quantiles of the samples.
    min_s : float
    n : int
        Number of samples.
    """

    median_s: float
    q20_s: float
    q80_s: float
    min_s: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(samples_s) -> Timing:
    """Summarize timed samples (seconds) as a ``Timing``.

    Raises
    ------
    ValueError
        If there are no samples.

    Examples
    --------
    >>> summarize([3.0, 1.0, 2.0, 4.0, 5.0])
    Timing(median_s=3.0, q20_s=1.8, q80_s=4.2, min_s=1.0, n=5)
    """
    s = np.asarray(list(samples_s), dtype=np.float64)
    if s.size == 0:
        raise ValueError("no samples to summarize")
    q20, q50, q80 = np.quantile(s, [0.2, 0.5, 0.8])
    return Timing(float(q50), float(q20), float(q80), float(s.min()), int(s.size))


def time_cpu(fn, *, repeat: int = 5, warmup: int = 1) -> Timing:
    """Time ``fn()`` with ``time.perf_counter``: ``warmup`` untimed calls, then ``repeat`` timed ones.

    Used for the ceilings on CPU (the cases themselves go through pytest-benchmark).

    Examples
    --------
    >>> time_cpu(lambda: sum(range(100)), repeat=3).n
    3
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return summarize(samples)


class L2Flush:
    """Overwrite a buffer larger than the GPU's L2 cache (see Note: how a time is taken).

    Parameters
    ----------
    device : torch.device or str
        A CUDA device.
    nbytes : int, optional
        Default: four times the device's L2 size, at least 256 MiB.
    """

    def __init__(self, device, nbytes: int | None = None):
        import torch

        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
        self.nbytes = int(nbytes or max(4 * l2, 256 * 2**20))
        self.buffer = torch.empty(self.nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def time_cuda_interleaved(fns: dict, *, reps: int = 30, warmup: int = 3, flush: L2Flush | None = None,
                          progress=None) -> dict:
    """Time several CUDA callables in one interleaved loop with CUDA events.

    Parameters
    ----------
    fns : dict of str -> callable
        The providers of one case; each call must only enqueue GPU work (and may return a value).
    reps : int
        Timed calls per provider.
    warmup : int
        Untimed calls per provider first.
    flush : L2Flush, optional
        Called (untimed) before every timed call.
    progress : callable, optional
        Called with a short text line after the loop.

    Returns
    -------
    dict of str -> Timing

    Notes
    -----
    Round ``i`` runs the providers in the order ``names[i % k:] + names[:i % k]``; each timed
    call is bracketed by two events and nothing else, and all events are read after one
    synchronization at the end (Note: how a time is taken).
    """
    import torch

    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    torch.cuda.synchronize()
    events = {name: [] for name in names}
    k = len(names)
    for i in range(reps):
        order = names[i % k:] + names[: i % k]
        for name in order:
            if flush is not None:
                flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    result = {name: summarize([s.elapsed_time(e) / 1e3 for s, e in pairs]) for name, pairs in events.items()}
    if progress is not None:
        progress("  " + ", ".join(f"{n} {t.median_s * 1e3:.3f} ms" for n, t in result.items()))
    return result
