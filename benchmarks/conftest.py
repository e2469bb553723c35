"""pytest set-up of the benchmark suite: options, the shared workspace, ceilings, and the results file.

Run ``pytest benchmarks/`` (the normal ``pytest`` run collects ``tests/`` only). Options:

``--quick`` (or ``QLORA_BENCH_QUICK=1``)
    Only the shapes 4096x4096 and the irregular 1823x781, and the layer at 512 tokens: a CPU
    run of a few minutes. Without it every shape of ``benchmarks/cases.py`` runs.
``--bench-out PATH``
    Write the results (Note: results format in ``benchmarks/results.py``) to ``PATH``.
``--bench-device {cpu,cuda}``
    Default: cuda when available. On CUDA the timed call synchronizes; the GPU script
    (``python -m benchmarks.run_gpu``) is the better GPU timer (events, L2 flush, interleaving).

Each case is checked against the oracle, timed by pytest-benchmark (Note: how a time is taken
in ``benchmarks/timing.py``), and written as one progress line.
"""

from __future__ import annotations

import math
import os
import time

import pytest

from benchmarks import cases
from benchmarks.results import make_record, results_document, write_results
from benchmarks.timing import summarize

#: Aim for about this many seconds of timed calls per case, within the round limits; a case
#: whose checked call took longer than SLOW_S runs MIN_ROUNDS-ish rounds without another warm call.
TARGET_S, MIN_ROUNDS, MAX_ROUNDS, SLOW_S = 1.0, 3, 25, 1.0


def pytest_addoption(parser):
    group = parser.getgroup("qlora-ref benchmarks")
    group.addoption("--quick", action="store_true", default=os.environ.get("QLORA_BENCH_QUICK") == "1",
                    help="small shapes and 512 tokens only (a CPU run of a few minutes)")
    group.addoption("--bench-out", default=os.environ.get("QLORA_BENCH_OUT", ""),
                    help="write the results JSON to this path")
    group.addoption("--bench-device", default="", choices=["", "cpu", "cuda"], help="device (default: cuda if available)")


def _quick(config) -> bool:
    return bool(config.getoption("--quick"))


def pytest_generate_tests(metafunc):
    quick = _quick(metafunc.config)
    if "shape_key" in metafunc.fixturenames:
        keys = cases.QUICK_SHAPES if quick else tuple(cases.SHAPES)
        metafunc.parametrize("shape_key", keys)
    if "tokens" in metafunc.fixturenames:
        metafunc.parametrize("tokens", cases.QUICK_LAYER_TOKENS if quick else cases.LAYER_TOKENS)


class Run:
    """What a session measured: records, skips, memory; written at the end of the session."""

    def __init__(self, device, config):
        self.device, self.config = device, config
        self.records, self.skipped = [], []
        self.memory = {"stored": [], "layer": []}
        self.ceilings = None
        self.start = time.perf_counter()
        self.reporter = config.pluginmanager.get_plugin("terminalreporter")
        self.capture = config.pluginmanager.get_plugin("capturemanager")

    def say(self, text: str) -> None:
        """A progress line, shown at once even while pytest captures output."""
        if self.reporter is None:
            return
        line = f"[{time.perf_counter() - self.start:6.0f} s] {text}"
        if self.capture is not None:
            with self.capture.global_and_fixture_disabled():
                self.reporter.write_line(line)
        else:
            self.reporter.write_line(line)

    def skip(self, case, reason: str) -> None:
        self.skipped.append({"op": case.op, "provider": case.label, "shape": case.shape_key, **case.params,
                             "reason": reason})
        pytest.skip(reason)


@pytest.fixture(scope="session")
def bench_device(pytestconfig):
    import torch

    name = pytestconfig.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.exit("--bench-device cuda: no CUDA device is available", returncode=2)
    return torch.device(name)


@pytest.fixture(scope="session")
def bench_run(request, bench_device):
    run = Run(bench_device, request.config)
    request.config._qlora_bench_run = run
    return run


@pytest.fixture(scope="session")
def workspace(bench_device):
    return cases.Workspace(bench_device)


@pytest.fixture(scope="session")
def ceilings(bench_run, bench_device):
    """The copy and matmul ceilings of this machine, measured once at the start of the session."""
    from benchmarks.ceilings import measure_ceilings

    bench_run.ceilings = measure_ceilings(bench_device)
    c = bench_run.ceilings
    bench_run.say(f"ceilings: copy {c['copy']['gbps']:.1f} GB/s, {c['matmul']['dtype']} matmul "
                  f"{c['matmul']['tflops'] * 1e3:.1f} GFLOP/s")
    return bench_run.ceilings


def _sync(device):
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


@pytest.fixture
def run_case(benchmark, bench_run, ceilings, bench_device):
    """Check a case against the oracle, time it with pytest-benchmark, record it."""

    def run(case):
        if case.skip:
            bench_run.skip(case, case.skip)
        t0 = time.perf_counter()
        check = case.check()  # one call compared with the oracle; also the warm-up (and compilation)
        check_s = time.perf_counter() - t0
        fn = case.fn
        if bench_device.type == "cuda":
            def fn(f=case.fn):
                f()
                _sync(bench_device)
        if check_s < SLOW_S:  # a cached check (the layer's) or a fast case: one warm call sizes the rounds
            t0 = time.perf_counter()
            fn()
            check_s = time.perf_counter() - t0
        rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_S / max(check_s, 1e-6))))
        benchmark.group = case.group
        benchmark.extra_info.update(provider=case.label, shape=case.shape_key, **case.params, check=check,
                                    bytes_moved=case.bytes_moved, flops=case.flops)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
        if benchmark.disabled or benchmark.stats is None:
            return None
        record = make_record(case, summarize(benchmark.stats.stats.data), check)
        bench_run.records.append(record)
        rate = f"{record['gbps']:.2f} GB/s" if case.op != "layer" else f"{record['tflops'] * 1e3:.1f} GFLOP/s"
        bench_run.say(f"{case.group} {case.label}: {record['time_s']['median_s'] * 1e3:.2f} ms, {rate} ({check})")
        return record

    return run


def pytest_sessionfinish(session, exitstatus):
    run = getattr(session.config, "_qlora_bench_run", None)
    out = session.config.getoption("--bench-out")
    if run is None or not out or run.ceilings is None:
        return
    from benchmarks.ceilings import measure_ceilings

    run.say("measuring the ceilings again")
    kind = "gpu" if run.device.type == "cuda" else "cpu"
    measured = [run.ceilings, measure_ceilings(run.device)]  # start and end: the best is the ceiling
    options = {"quick": _quick(session.config), "runner": "pytest-benchmark"}
    doc = results_document(kind, run.device, measured, run.records, run.skipped, run.memory,
                           time.perf_counter() - run.start, options=options)
    path = write_results(doc, out)
    if run.reporter is not None:
        run.reporter.write_line(f"results written to {path}")
