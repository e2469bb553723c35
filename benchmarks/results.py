"""Results of a benchmark run: records with their rates, the machine, versions and date, as JSON.

Written by ``benchmarks/conftest.py`` (CPU, pytest) and ``benchmarks/run_gpu.py`` (GPU) in one
format, read by ``benchmarks.summary`` (``summary_table``, the text summary) and
``docs/scripts/benchmark_pages.py`` (the tables and figures of ``docs/benchmarks.md``).

Note: results format
    ``{"schema": 1, "kind": "cpu" | "gpu", "date", "machine", "versions", "bitsandbytes_paths",
    "options", "ceilings", "ceiling_measurements", "records", "skipped", "memory": {"stored",
    "layer"}, "wall_s"}``. A record is
    one provider on one case: ``op``, ``provider`` (a registry name, ``+compile`` when wrapped
    in ``torch.compile``, or a ``dense*`` baseline), ``shape``, ``dims``, the case's parameters
    (``dtype``, ``rows`` or ``tokens``), ``time_s`` (median, 20% and 80% quantiles, min, n),
    ``bytes_moved`` and ``flops`` (``benchmarks/cases.py``, Note: bytes and FLOPs of a case),
    ``gbps``, ``tflops``, ``pct_copy`` / ``pct_read`` (the product) / ``pct_matmul`` (percent of
    the ceilings of the same run), ``host_s`` (CUDA: the host's wall time per call, beside the
    device time ``time_s``, which also says ``method``, ``benchmarks/timing.py``), ``check``
    (what the comparison with the oracle found), and the ratios
    ``speedup_vs_bnb`` (bitsandbytes' median time / this one, same case, same run) and, for the
    layer, ``time_vs_lora`` (this median / the dense-base LoRA layer's).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

from qlora_ref.formats.safe_io import write_bytes_atomic

__all__ = ["environment", "bnb_paths", "make_record", "add_percentages", "add_ratios", "results_document", "write_results",
           "load_results", "SCHEMA"]

SCHEMA = 1
_PACKAGES = ("numpy", "scipy", "torch", "triton", "bitsandbytes", "torchao", "pytest-benchmark", "qlora-ref")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    except OSError:
        pass
    return []


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device) -> dict:
    """The machine, library versions and date of a run on ``device``."""
    import torch

    machine = {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
               "cpu_flags": _cpu_flags(), "torch_threads": torch.get_num_threads(),
               "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": str(device)}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory),
                       gpu_multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["qlora-ref commit"] = _git_commit()
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {"date": now.isoformat(), "machine": machine, "versions": versions}


def bnb_paths(device) -> dict:
    """Which bitsandbytes kernels this device runs for the ops the suite times (or why none)."""
    try:
        import bitsandbytes  # noqa: F401  (registers its ops)
        import torch
    except ImportError as exc:
        return {"available": False, "reason": str(exc)}
    key = "CUDA" if torch.device(device).type == "cuda" else "CPU"

    def path(op):
        own = torch._C._dispatch_has_kernel_for_dispatch_key(f"bitsandbytes::{op}", key)
        return f"{key} kernel" if own else "default (torch ops)"

    out = {op: path(op) for op in ("quantize_4bit", "dequantize_4bit", "quantize_blockwise", "dequantize_blockwise",
                                   "gemv_4bit", "gemm_4bit")}
    if key == "CPU":
        from bitsandbytes.functional import has_avx512bf16

        out["avx512"] = torch.backends.cpu.get_cpu_capability() == "AVX512"
        out["avx512bf16"] = bool(has_avx512bf16())
    return out


def make_record(case, timing, check: str) -> dict:
    """One record (Note: results format) from a case and its ``Timing``; ``results_document``
    adds the percentages of the run's ceilings and the ratios."""
    from benchmarks.cases import SHAPES

    t = timing.median_s
    record = {"op": case.op, "provider": case.label, "shape": case.shape_key, "dims": list(SHAPES[case.shape_key]),
              **case.params, "time_s": timing.as_dict(), "bytes_moved": case.bytes_moved, "flops": case.flops,
              "check": check}
    if getattr(timing, "host_median_s", None) is not None:
        record["host_s"] = timing.host_median_s
    if "compute_dtype" in case.extra:
        record["compute_dtype"] = case.extra["compute_dtype"]
    if case.bytes_moved:
        record["gbps"] = case.bytes_moved / t / 1e9
    if case.flops:
        record["tflops"] = case.flops / t / 1e12
    return record


def add_percentages(records: list, ceilings: dict) -> list:
    """Add ``pct_copy`` (memory-bound cases), ``pct_read`` (the product, against the read-only
    stream when the run measured one) and ``pct_matmul`` (the layer) of the run's ceilings.

    Examples
    --------
    >>> rs = add_percentages([{"op": "matmul", "gbps": 3.0}], {"copy": {"gbps": 4.0}, "read": {"gbps": 6.0}})
    >>> rs[0]["pct_copy"], rs[0]["pct_read"]
    (75.0, 50.0)
    """
    for r in records:
        if "gbps" in r:
            r["pct_copy"] = 100.0 * r["gbps"] / ceilings["copy"]["gbps"]
            if r["op"] == "matmul" and "read" in ceilings:  # the product reads: judged against a read stream
                r["pct_read"] = 100.0 * r["gbps"] / ceilings["read"]["gbps"]
        if r["op"] == "layer" and "tflops" in r:
            r["pct_matmul"] = 100.0 * r["tflops"] / ceilings["matmul"]["tflops"]
    return records


def _case_key(r: dict) -> tuple:
    return (r["op"], r["shape"], r.get("dtype"), r.get("rows"), r.get("tokens"))


def add_ratios(records: list) -> list:
    """Add ``speedup_vs_bnb`` and ``time_vs_lora`` to records measured in the same run.

    Examples
    --------
    >>> rs = [{"op": "decode", "shape": "s", "provider": "bnb", "time_s": {"median_s": 2.0}},
    ...       {"op": "decode", "shape": "s", "provider": "torch", "time_s": {"median_s": 1.0}}]
    >>> [r["speedup_vs_bnb"] for r in add_ratios(rs)]
    [1.0, 2.0]
    """
    by_case = {}
    for r in records:
        by_case.setdefault(_case_key(r), {})[r["provider"]] = r["time_s"]["median_s"]
    for r in records:
        times = by_case[_case_key(r)]
        if "bnb" in times:
            r["speedup_vs_bnb"] = times["bnb"] / r["time_s"]["median_s"]
        if r["op"] == "layer" and "dense-lora" in times:
            r["time_vs_lora"] = r["time_s"]["median_s"] / times["dense-lora"]
    return records


def results_document(kind: str, device, ceilings: list, records: list, skipped: list, memory: dict,
                     wall_s: float, options: dict | None = None) -> dict:
    """Assemble a results document (Note: results format); ``ceilings`` are the measurements of
    the run (start and end), of which the best is the ceiling (``benchmarks.ceilings.best_ceilings``)."""
    from benchmarks.ceilings import best_ceilings

    best = best_ceilings(*ceilings)
    return {"schema": SCHEMA, "kind": kind, **environment(device), "bitsandbytes_paths": bnb_paths(device),
            "options": options or {}, "ceilings": best, "ceiling_measurements": ceilings,
            "records": add_ratios(add_percentages(records, best)), "skipped": skipped, "memory": memory,
            "wall_s": wall_s}


def write_results(doc: dict, path) -> Path:
    """Write a results document as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode())  # temp file + rename
    return path


def load_results(path) -> dict:
    """Read a results document, refusing another schema.

    Raises
    ------
    ValueError
        If the file is not a results document of this schema.
    """
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a benchmark results file of schema {SCHEMA}")
    return doc
