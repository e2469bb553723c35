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

    Device time without the host's launch gaps: events measure from the moment the GPU reaches
    the start event, so if the GPU is idle while the host is still enqueueing the call, the
    host's launch time is counted as device time (a kernel of a few microseconds can read as
    twice as slow). Two remedies, both applied where they can be:

    - the call is captured once in a CUDA graph (``torch.cuda.CUDAGraph``) after the warm-up,
      and the graph is replayed in the timed region: one launch for all of the call's kernels,
      no host gaps between them (``method: "graph"``). A call that cannot be captured (a host
      synchronization, a CPU-side branch on device values, an allocation the capture refuses) is
      called directly (``method: "sleep"``);
    - before the start event the GPU is given a head start, ``torch.cuda._sleep(cycles)``, a
      spin of about twice the call's measured host enqueue time (at least 50 microseconds), so
      that the start event, the call and the end event are all enqueued before the GPU reaches
      them.

    Host time is reported separately (``host_median_s``): the wall time per call measured on the
    host, ``fn(); torch.cuda.synchronize()``, after the device timings. It is what a caller
    waits, launches and Python included; the device time is what the kernels take.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

__all__ = ["Timing", "summarize", "time_cpu", "L2Flush", "time_cuda_interleaved", "sleep_cycles",
           "HEAD_START_MIN_S"]

#: The shortest head start given to the GPU before a timed call (Note: how a time is taken).
HEAD_START_MIN_S = 50e-6


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
    host_median_s : float or None
        CUDA only: the median wall time per call on the host (``fn(); synchronize()``), launches
        included (Note: how a time is taken); None on CPU, where the time is a wall time already.
    method : str or None
        CUDA only: ``"graph"`` (the call replayed from a CUDA graph) or ``"sleep"`` (called
        directly after a head start); None on CPU.
    """

    median_s: float
    q20_s: float
    q80_s: float
    min_s: float
    n: int
    host_median_s: float | None = field(default=None, repr=False)
    method: str | None = field(default=None, repr=False)

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


def sleep_cycles(host_s: float, cycles_per_s: float, *, factor: float = 2.0,
                 minimum_s: float = HEAD_START_MIN_S) -> int:
    """Cycles of ``torch.cuda._sleep`` that cover ``factor`` times a host enqueue time ``host_s``.

    Examples
    --------
    >>> sleep_cycles(1e-4, 1.5e9)
    300000
    >>> sleep_cycles(1e-6, 1.5e9)  # never less than HEAD_START_MIN_S
    75000
    """
    return int(max(factor * host_s, minimum_s) * cycles_per_s)


def _sleep_rate() -> float:
    """Cycles per second of ``torch.cuda._sleep`` on the current device (timed with events)."""
    import torch

    cycles = 2_000_000
    torch.cuda._sleep(cycles // 10)  # warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def _capture(fn):
    """A CUDA graph of ``fn()`` (after its warm-up), or None when it cannot be captured."""
    import torch

    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - not capturable: timed by a direct call instead
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001, S110 - the capture failed already; nothing more to report
            pass
        return None
    return graph


def _host_enqueue_s(fn, calls: int = 3) -> float:
    """Median wall time of enqueueing ``fn()`` (no synchronization inside), on the host."""
    import torch

    samples = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return float(np.median(samples))


def _host_wall_s(fn, calls: int) -> float:
    """Median wall time per call, ``fn(); synchronize()``, measured on the host."""
    import torch

    samples = []
    torch.cuda.synchronize()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def time_cuda_interleaved(fns: dict, *, reps: int = 30, warmup: int = 3, flush: L2Flush | None = None,
                          progress=None, graphs: bool = True, host_calls: int = 5) -> dict:
    """Time several CUDA callables in one interleaved loop with CUDA events.

    Parameters
    ----------
    fns : dict of str -> callable
        The providers of one case; each call must only enqueue GPU work (and may return a value).
    reps : int
        Timed calls per provider.
    warmup : int
        Untimed calls per provider first (compilation and autotuning stay outside the timings).
    flush : L2Flush, optional
        Called (untimed) before every timed call.
    progress : callable, optional
        Called with a short text line after the loop.
    graphs : bool
        Capture each call in a CUDA graph where it can be captured (Note: how a time is taken).
    host_calls : int
        Calls timed on the host afterwards for ``host_median_s``.

    Returns
    -------
    dict of str -> Timing
        Device times, with ``host_median_s`` and ``method`` set.

    Notes
    -----
    Round ``i`` runs the providers in the order ``names[i % k:] + names[:i % k]``; each timed
    call is preceded by the flush and a head start (``torch.cuda._sleep``) and bracketed by two
    events, and all events are read after one synchronization at the end.
    """
    import torch

    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    torch.cuda.synchronize()
    rate = _sleep_rate()
    graph = {name: _capture(fns[name]) if graphs else None for name in names}
    call = {name: (graph[name].replay if graph[name] is not None else fns[name]) for name in names}
    head = {name: sleep_cycles(_host_enqueue_s(call[name]), rate) for name in names}
    events = {name: [] for name in names}
    k = len(names)
    for i in range(reps):
        order = names[i % k:] + names[: i % k]
        for name in order:
            if flush is not None:
                flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(head[name])
            start.record()
            call[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    result = {}
    for name, pairs in events.items():
        device = summarize([s.elapsed_time(e) / 1e3 for s, e in pairs])
        result[name] = replace(device, host_median_s=_host_wall_s(fns[name], host_calls),
                               method="graph" if graph[name] is not None else "sleep")
    del graph, call
    if progress is not None:
        progress("  " + ", ".join(f"{n} {t.median_s * 1e3:.3f} ms (host {t.host_median_s * 1e3:.3f} ms, {t.method})"
                                  for n, t in result.items()))
    return result
