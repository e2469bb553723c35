"""``python -m benchmarks``: run the benchmark suite and print a summary table.

The suite (this folder of the source checkout: pytest-benchmark cases that check each provider
against the oracle, then time it) needs torch and the comparators; this module only runs it with
pytest in a child process and reads the results file it writes (``benchmarks/results.py``,
Note: results format), so it imports nothing beyond the standard library and ``qlora_ref``. ``--summary FILE`` prints the table of an existing results file
without running anything (the committed CPU results, or a GPU run's
``python -m benchmarks.run_gpu --out DIR``).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from qlora_ref.cli.args import ArgumentParser, one_line, writable_file
from qlora_ref.formats.safe_io import read_json_file
from qlora_ref.text_table import format_table

__all__ = ["summary_table", "evaluate_targets", "targets_table", "TARGETS", "find_suite", "main"]


def _params(r: dict) -> str:
    for name in ("dtype", "rows", "tokens"):
        if name in r:
            return f"{name}={r[name]}"
    return ""


def summary_table(doc: dict) -> str:
    """Format a results document as a text table: one row per provider and case, in run order.

    Columns: the case, median and 20-80% quantile times, the rate (GB/s, or GFLOP/s for the
    layer), its percentage of the ceiling measured in the same run, and the speed against
    bitsandbytes in the same run (its median time over this one: above 1 is faster).

    Examples
    --------
    >>> doc = {"kind": "cpu", "date": "2025-01-01", "machine": {"cpu": "x"}, "ceilings": {},
    ...        "records": [{"op": "decode", "shape": "4096x4096", "dtype": "bfloat16", "provider": "bnb",
    ...                     "time_s": {"median_s": 0.05, "q20_s": 0.049, "q80_s": 0.052}, "gbps": 0.8,
    ...                     "pct_copy": 9.5, "speedup_vs_bnb": 1.0, "check": "exact"}]}
    >>> print(summary_table(doc).splitlines()[-1])
    decode  4096x4096  dtype=bfloat16  bnb           50.00  49.00-52.00  0.80 GB/s       9.5%  1.00x  exact
    """
    rows = []
    for r in doc["records"]:
        t = r["time_s"]
        if r["op"] == "layer":
            rate, pct = f"{r['tflops'] * 1e3:.1f} GFLOP/s", r.get("pct_matmul")
        else:
            rate, pct = f"{r['gbps']:.2f} GB/s", r.get("pct_copy")
        ratio = r.get("speedup_vs_bnb")
        rows.append([r["op"], r["shape"], _params(r), r["provider"], f"{t['median_s'] * 1e3:.2f}",
                     f"{t['q20_s'] * 1e3:.2f}-{t['q80_s'] * 1e3:.2f}", rate,
                     "" if pct is None else f"{pct:.1f}%", "" if ratio is None else f"{ratio:.2f}x",
                     r["check"].split(";")[0][:48]])
    title = f"{doc['kind'].upper()} benchmarks, {doc['date']}, {doc['machine'].get('gpu') or doc['machine'].get('cpu')}"
    headers = ["op", "shape", "case", "provider", "median ms", "q20-q80 ms", "rate", "% ceiling", "x bnb", "check"]
    return format_table(headers, rows, title=title)


#: The targets of the benchmark issue: (kind, description, op, provider, selector, value, goal).
#: ``value`` names a record field (or ``memory``: measured / modelled bytes of the layer step);
#: ``goal`` is ``(">=", x)`` or ``("<=", x)``.
TARGETS = (
    ("cpu", "oracle quantizes NF4 + double quantization at least as fast as bitsandbytes' CPU path",
     "quantize", "oracle", {}, "speedup_vs_bnb", (">=", 1.0)),
    ("cpu", "qlora_gpu torch backend quantizes at least 5x faster than bitsandbytes' CPU path",
     "quantize", "torch", {}, "speedup_vs_bnb", (">=", 5.0)),
    ("cpu", "qlora_gpu torch backend decodes at least as fast as bitsandbytes' CPU kernel",
     "decode", "torch", {}, "speedup_vs_bnb", (">=", 1.0)),
    ("gpu", "one-pass decode (Triton) at 90% or more of the measured copy bandwidth",
     "decode", "triton", {"dtype": "bfloat16"}, "pct_copy", (">=", 90.0)),
    ("gpu", "one-pass decode (Triton) at least 1.5x faster than bitsandbytes",
     "decode", "triton", {}, "speedup_vs_bnb", (">=", 1.5)),
    ("gpu", "small-batch product (Triton) at 80% or more of the read-only stream ceiling",
     "matmul", "triton", {}, "pct_read", (">=", 80.0)),  # benchmarks/ceilings.py, Note: the ceilings
    ("gpu", "small-batch product (Triton) faster than bitsandbytes",
     "matmul", "triton", {}, "speedup_vs_bnb", (">=", 1.0)),
    ("gpu", "QLoRA layer forward+backward (Triton) at most 1.10x the time of LoRA on a bf16 base",
     "layer", "triton", {}, "time_vs_lora", ("<=", 1.10)),
    ("gpu", "QLoRA layer (Triton) step memory within 5% of the formula",
     "memory", "triton", {}, "memory", ("<=", 1.05)),
)


def _values(doc: dict, op: str, provider: str, selector: dict, field: str) -> list:
    """``(case, value)`` pairs of the records (or layer memory entries) a target looks at."""
    if op == "memory":
        out = []
        for m in doc.get("memory", {}).get("layer", []):
            if m["provider"] == provider and "cuda" in m:
                ratio = m["cuda"]["added"] / m["formula"]["added"]
                out.append((f"{m['shape']} tokens={m['tokens']}", max(ratio, 1 / ratio) if ratio > 0 else float("inf")))
        return out
    out = []
    for r in doc["records"]:
        if r["op"] == op and r["provider"] == provider and all(r.get(k) == v for k, v in selector.items()):
            if field in r:
                out.append((f"{r['shape']} {_params(r)}".strip(), r[field]))
    return out


def evaluate_targets(doc: dict) -> list:
    """Evaluate the targets of ``TARGETS`` that apply to a results document.

    Returns
    -------
    list of dict
        ``target``, ``met`` (True, False, or None when nothing was measured), ``worst`` (the
        case and value furthest from the goal), ``cases`` (how many were measured) and
        ``goal`` (text).

    Examples
    --------
    >>> doc = {"kind": "cpu", "records": [{"op": "quantize", "provider": "oracle", "shape": "s",
    ...                                    "speedup_vs_bnb": 1.3}]}
    >>> [(t["met"], t["worst"]) for t in evaluate_targets(doc)][0]
    (True, ('s', 1.3))
    """
    kind = "gpu" if doc["kind"] == "gpu" else "cpu"
    out = []
    for target_kind, text, op, provider, selector, field, (sense, goal) in TARGETS:
        if target_kind != kind:
            continue
        values = _values(doc, op, provider, selector, field)
        if not values:
            out.append({"target": text, "met": None, "worst": None, "cases": 0, "goal": f"{sense} {goal}"})
            continue
        worst = min(values, key=lambda cv: cv[1]) if sense == ">=" else max(values, key=lambda cv: cv[1])
        met = worst[1] >= goal if sense == ">=" else worst[1] <= goal
        out.append({"target": text, "met": bool(met), "worst": worst, "cases": len(values), "goal": f"{sense} {goal}"})
    return out


def targets_table(doc: dict) -> str:
    """The targets as a text table (``evaluate_targets``)."""
    rows = []
    for t in evaluate_targets(doc):
        state = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        worst = "" if t["worst"] is None else f"{t['worst'][1]:.3g} ({t['worst'][0]})"
        rows.append([t["target"], t["goal"], worst, t["cases"], state])
    return format_table(["target", "goal", "worst case", "cases", "status"], rows, title="Targets")


def find_suite() -> Path:
    """The ``benchmarks/`` folder of the source checkout this package runs from.

    Raises
    ------
    FileNotFoundError
        If the package is not run from a checkout that holds ``benchmarks/conftest.py``.
    """
    suite = Path(__file__).resolve().parent
    if not (suite / "conftest.py").is_file():
        raise FileNotFoundError(f"no benchmark suite at {suite}: the suite runs from a source checkout")
    return suite


def _run(args) -> int:
    if args.summary:
        doc = read_json_file(args.summary)
        try:
            text = summary_table(doc) + "\n\n" + targets_table(doc)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"{args.summary}: not a results file of python -m benchmarks (no {exc})") from None
        print(text)
        return 0
    suite = find_suite()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qlora-bench-")) / "results.json"
    command = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
               "--benchmark-columns=median,iqr,rounds", f"--bench-out={out}"]
    if not args.full:
        command.append("--quick")
    if args.device:
        command.append(f"--bench-device={args.device}")
    if args.k:
        command += ["-k", args.k]
    print("running:", " ".join(command), flush=True)
    status = subprocess.run(command, cwd=suite.parent).returncode
    if not out.is_file():
        print(f"python -m benchmarks: the suite wrote no results (pytest exit status {status})", file=sys.stderr)
        return status or 1
    doc = read_json_file(out)
    print()
    print(summary_table(doc))
    print()
    print(targets_table(doc))
    print(f"\nresults: {out}")
    return status


def main(argv=None) -> int:
    """``python -m benchmarks``: run the suite (quick CPU run by default) and print a summary."""
    p = ArgumentParser(prog="python -m benchmarks",
                                description="Run the benchmark suite (quick CPU run by default) and print a summary.")
    p.add_argument("--full", action="store_true", help="every shape (4096x4096 up to 8192x28672) and 512-4096 tokens")
    p.add_argument("--device", default="", choices=["", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("-k", default="", help="pytest -k expression selecting cases (e.g. 'decode and bnb')")
    p.add_argument("--out", type=writable_file, default="",
                   help="write the results JSON here (default: a temporary folder; checked writable first)")
    p.add_argument("--summary", default="", metavar="FILE", help="print the summary of a results file and exit")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, TypeError, OSError) as exc:  # user errors: one line, exit 2 (as qlora-ref)
        print(f"python -m benchmarks: error: {one_line(exc)}", file=sys.stderr)
        return 2
