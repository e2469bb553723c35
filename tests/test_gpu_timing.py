"""The GPU timing of ``benchmarks/cuda_check.py`` and ``benchmarks/run_gpu.py`` (issue 13, item 5).

What can be checked without a GPU is checked here on CPU: the command lines, the refusal without
CUDA, the shape of ``cuda_check``'s JSON (its CPU dry run in Triton's interpreter), the judging of
the targets on fabricated timing records (the default configuration, never a sweep's best), the
read-only ceiling and the host time in the results records. The CUDA timer itself (graph capture,
head start, host time) is tested where CUDA exists, and skipped with the reason "needs CUDA".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from benchmarks import cuda_check, run_gpu
from benchmarks.ceilings import best_ceilings, measure_read, read_stream
from benchmarks.results import add_percentages, make_record
from benchmarks.timing import HEAD_START_MIN_S, Timing, sleep_cycles, summarize

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no CUDA")


# ----------------------------------------------------------------------------- command lines

def test_cuda_check_arguments():
    args = cuda_check.build_parser().parse_args(["--out", "o"])
    assert (args.quick, args.reps, args.no_graphs, args.shape, args.rows) == (False, 0, False, [4096, 14336],
                                                                             [1, 4, 16, 2048])
    args = cuda_check.build_parser().parse_args(["--out", "o", "--quick", "--reps", "5", "--no-graphs",
                                                 "--shape", "128", "256", "--rows", "1"])
    assert (args.quick, args.reps, args.no_graphs, args.shape, args.rows) == (True, 5, True, [128, 256], [1])
    with pytest.raises(SystemExit):
        cuda_check.build_parser().parse_args([])  # --out is required


def test_run_gpu_arguments_and_quick_shapes():
    from benchmarks.cases import SHAPES

    args = run_gpu.parse_args(["--out", "o", "--quick"])
    assert args.quick and not args.no_graphs
    assert run_gpu.shape_keys(args, SHAPES) == list(run_gpu.QUICK_SHAPES)
    assert "4096x14336" in run_gpu.QUICK_SHAPES and all(k in SHAPES for k in run_gpu.QUICK_SHAPES)
    assert run_gpu.shape_keys(run_gpu.parse_args(["--out", "o"]), SHAPES) == list(SHAPES)
    assert "4096x14336" in SHAPES  # the shape is in the full run too
    assert run_gpu.parse_args(["--out", "o", "--no-graphs"]).no_graphs


@no_cuda
def test_run_gpu_says_it_needs_cuda(tmp_path, capsys):
    assert run_gpu.main(["--out", str(tmp_path / "out")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@no_cuda
def test_cuda_check_quick_says_it_needs_cuda(tmp_path, capsys):
    assert cuda_check.main(["--out", str(tmp_path), "--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cuda_check_dry_run_needs_the_interpreter(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cuda_check.main(["--out", str(tmp_path), "--cpu-dry-run"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- judging

def _t(ms, **extra):
    return {"time_ms": ms, "time_ms_p20": ms, "time_ms_p80": ms, "host_ms": 2 * ms, "method": "graph", **extra}


def _fabricated(default_pct=70.0, best_pct=95.0, speedup=1.2, m1_pct=85.0, m16_pct=50.0, ours_m1=1.0, gemv=1.5):
    """Timing records shaped like ``time_kernels``'s: a sweep whose best meets what the default does not."""
    return {
        "decode": {"triton decode": _t(1.0, pct_of_copy=default_pct),
                   "triton decode rows=64 warps=8": _t(0.7, pct_of_copy=best_pct),
                   "bnb dequantize_4bit": _t(speedup), "speedup_vs_bnb": speedup,
                   "best_of_sweep": "triton decode rows=64 warps=8"},
        "matmul": {
            "1": {"triton fused (default)": _t(ours_m1, pct_of_ceiling=m1_pct),
                  "triton fused (32, 512, 2, False)": _t(0.5, pct_of_ceiling=99.0),
                  "bnb gemv_4bit": _t(gemv), "best_triton": "triton fused (32, 512, 2, False)"},
            "16": {"triton fused (default)": _t(2.0, pct_of_ceiling=m16_pct),
                   "triton fused (16, 64, 128, True)": _t(1.0, pct_of_ceiling=90.0)},
            "2048": {"triton fused (default)": _t(4.0, pct_of_ceiling=900.0),  # a GEMM: the read ceiling is moot
                     "triton fused (64, 128, 1, True)": _t(2.5),
                     "torch bf16 linear (dense W)": _t(2.0)},
        },
    }


def _verdicts(results):
    return {(v["target"], v["case"]): v for v in cuda_check.judge(results)}


def test_targets_are_judged_on_the_default_configuration_not_the_sweep():
    v = _verdicts(_fabricated())
    assert v[("decode_pct_of_copy", "triton decode")]["met"] is False  # 70% default, though the sweep reached 95%
    assert v[("decode_pct_of_copy", "triton decode")]["measured"] == 70.0
    assert v[("decode_speedup_vs_bnb", "triton decode")]["met"] is False  # 1.2 < 1.5
    assert v[("matmul_pct_of_read_ceiling", "M=1 triton fused (default)")]["met"] is True  # 85 >= 80
    assert v[("matmul_pct_of_read_ceiling", "M=16 triton fused (default)")]["met"] is False  # 50, sweep 90
    speed = v[("matmul_M1_speedup_vs_gemv_4bit", "M=1 triton fused (default)")]
    assert speed["met"] is True and speed["measured"] == pytest.approx(1.5)
    gemm = v[("gemm_fraction_of_dense", "M=2048 triton fused (default)")]
    assert gemm["met"] is False and gemm["measured"] == pytest.approx(0.5)  # 2.0 / 4.0; the sweep's 0.8 is not judged
    assert ("matmul_pct_of_read_ceiling", "M=2048 triton fused (default)") not in v
    assert {x["required"] for x in v.values()} <= set(cuda_check.TARGETS.values())


def test_targets_met_and_not_measured():
    v = _verdicts(_fabricated(default_pct=92.0, speedup=1.6, gemv=0.9))
    assert v[("decode_pct_of_copy", "triton decode")]["met"] is True
    assert v[("decode_speedup_vs_bnb", "triton decode")]["met"] is True
    assert v[("matmul_M1_speedup_vs_gemv_4bit", "M=1 triton fused (default)")]["met"] is False
    results = _fabricated()
    del results["matmul"]["1"]["bnb gemv_4bit"]  # a comparator that failed: not measured, not "met"
    del results["decode"]["triton decode"]  # our default failed: never judged on the sweep instead
    v = _verdicts(results)
    assert v[("matmul_M1_speedup_vs_gemv_4bit", "M=1 triton fused (default)")]["met"] is None
    assert v[("decode_pct_of_copy", "triton decode")]["met"] is None
    assert v[("decode_speedup_vs_bnb", "triton decode")]["met"] is None
    assert [v["target"] for v in cuda_check.judge({"decode": {}, "matmul": {}})] == [
        "decode_pct_of_copy", "decode_speedup_vs_bnb"]


# ----------------------------------------------------------------------------- ceilings and records

def test_read_ceiling_on_cpu():
    r = measure_read("cpu", 2**16, repeat=2)
    assert r["bytes_moved"] == r["nbytes"] == 2**16 and r["gbps"] > 0
    assert set(read_stream(torch.ones(6, dtype=torch.uint8))) == {"sum uint8"}  # 6 bytes: no 4-byte view
    assert int(read_stream(torch.ones(8, dtype=torch.uint8))["sum int32"]()) == 2 * 0x01010101
    best = best_ceilings({"copy": {"gbps": 1.0}, "read": {"gbps": 5.0}}, {"copy": {"gbps": 2.0}, "read": {"gbps": 4.0}})
    assert (best["copy"]["gbps"], best["read"]["gbps"]) == (2.0, 5.0)


def test_product_judged_against_the_read_stream():
    records = [{"op": "matmul", "gbps": 2.0}, {"op": "decode", "gbps": 2.0}]
    add_percentages(records, {"copy": {"gbps": 4.0}, "read": {"gbps": 8.0}})
    assert records[0]["pct_read"] == 25.0 and records[0]["pct_copy"] == 50.0
    assert "pct_read" not in records[1]
    old = [{"op": "matmul", "gbps": 2.0}]
    add_percentages(old, {"copy": {"gbps": 4.0}})  # a results file from before the read ceiling
    assert "pct_read" not in old[0]


def test_records_keep_host_time_apart_from_device_time():
    from benchmarks.cases import Case

    case = Case("matmul", "triton", "4096x4096", {"rows": 1}, bytes_moved=10**6, flops=10**6)
    device = Timing(1e-3, 9e-4, 1.1e-3, 8e-4, 10, host_median_s=1.5e-3, method="graph")
    r = make_record(case, device, "ok")
    assert r["time_s"]["median_s"] == 1e-3 and r["host_s"] == 1.5e-3 and r["time_s"]["method"] == "graph"
    assert r["gbps"] == pytest.approx(1.0)  # rates from the device time
    assert "host_s" not in make_record(case, summarize([1e-3]), "ok")  # CPU: a wall time already
    assert repr(device) == "Timing(median_s=0.001, q20_s=0.0009, q80_s=0.0011, min_s=0.0008, n=10)"


def test_head_start_covers_the_host_enqueue():
    assert sleep_cycles(0.0, 1e9) == int(HEAD_START_MIN_S * 1e9)
    assert sleep_cycles(1e-3, 1e9) == 2_000_000
    assert sleep_cycles(1e-3, 1e9, factor=3.0) == 3_000_000


# ----------------------------------------------------------------------------- the dry run's JSON

def test_cuda_check_dry_run_json(tmp_path):
    """The whole script on CPU (interpreter, tiny weight): every key a GPU run writes, host times
    beside device times, the read-stream ceiling, the verdicts, the quick budget."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cuda_check", "--cpu-dry-run", "--quick", "--out",
                           str(tmp_path), "--shape", "128", "256", "--rows", "1", "16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "cuda_check.json").read_text())
    assert {"date", "machine", "versions", "tests", "oracle_check", "timings", "case_errors", "targets", "options",
            "wall_s", "quick_budget_s", "quick_within_budget"} <= set(doc)
    assert doc["options"]["quick"] and doc["quick_budget_s"] == cuda_check.QUICK_BUDGET_S
    t = doc["timings"]
    for entry in (t["copy"], t["decode"]["triton decode"], t["quantize"]["triton quantize"]):
        assert {"time_ms", "time_ms_p20", "time_ms_p80", "host_ms", "method"} <= set(entry)
    assert not any(" rows=" in k for k in t["decode"])  # --quick: no sweep
    assert set(t["matmul"]) == {"1", "16"}
    for entry in t["matmul"].values():
        assert entry["ceiling"].startswith("read ceiling") and entry["ceiling_ms"] > 0
        assert entry["triton fused (default)"]["pct_of_ceiling"] > 0
        assert entry["copy_ceiling_ms"] > 0 and entry["bytes"] > 0
    targets = {(v["target"], v["case"]) for v in doc["targets"]}
    assert ("matmul_M1_speedup_vs_gemv_4bit", "M=1 triton fused (default)") in targets
    assert ("decode_pct_of_copy", "triton decode") in targets
    text = (tmp_path / "cuda_check.txt").read_text()
    assert "host_ms" in text and "issue 4's targets" in text


# ----------------------------------------------------------------------------- CUDA

@needs_cuda
def test_cuda_timer_uses_graphs_and_reports_host_time():
    from benchmarks.timing import L2Flush, time_cuda_interleaved

    a = torch.randn(1 << 20, device="cuda")
    out = time_cuda_interleaved({"capturable": lambda: a.mul(2.0).add_(1.0),
                                 "host sync": lambda: a.sum().item()},  # .item() cannot be captured
                                reps=5, warmup=2, flush=L2Flush("cuda"))
    assert out["capturable"].method == "graph" and out["host sync"].method == "sleep"
    for t in out.values():
        assert t.n == 5 and t.median_s > 0 and t.host_median_s > 0
    plain = time_cuda_interleaved({"f": lambda: a.mul(2.0)}, reps=3, warmup=1, graphs=False)["f"]
    assert plain.method == "sleep"


@needs_cuda
def test_cuda_read_ceiling():
    r = measure_read("cuda", 2**26, repeat=3)
    assert r["gbps"] > 0 and r["timing"]["method"] in ("graph", "sleep")


def test_the_runners_derived_check_runs():
    """Every provider of ``run_gpu`` is checked before it is timed; a broken check (as when
    ``tests/tolerances.py`` renamed a helper) would drop every provider from a GPU run."""
    import numpy as np

    from benchmarks.checks import check_derived

    ref = np.linspace(-1.0, 1.0, 64)
    actual = torch.tensor(ref, dtype=torch.float32)
    fraction = check_derived(actual, ref, ref.astype(np.float32), dtype=np.float32, scale=None, what="values")
    assert 0.0 <= fraction <= 1.0


def test_run_gpu_targets_judge_the_product_against_the_read_stream():
    """``benchmarks.summary``'s GPU target for the product reads ``pct_read`` (not ``pct_copy``)."""
    from benchmarks.summary import evaluate_targets

    record = {"op": "matmul", "provider": "triton", "shape": "4096x14336", "rows": 1, "gbps": 3.0}
    doc = {"kind": "gpu", "records": add_percentages([record], {"copy": {"gbps": 3.2}, "read": {"gbps": 4.0}})}
    target = next(t for t in evaluate_targets(doc) if "read-only stream" in t["target"])
    assert target["met"] is False and target["worst"][1] == pytest.approx(75.0)  # 94% of the copy would pass
