"""Make the tables of ``docs/kernels.md`` from ``benchmarks/results/kernels.json``.

Run ``python docs/scripts/kernel_pages.py`` from the repository root after
``python -m benchmarks.kernel_report --all --out benchmarks/results/kernels.json``. Every number
is read from the report (compiled SASS counts) or computed from it by the performance model
(``benchmarks/kernel_model.py``); none is typed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REPORT = ROOT / "benchmarks" / "results" / "kernels.json"

sys.path.insert(0, str(ROOT))
from benchmarks.kernel_model import (  # noqa: E402
    GPUS,
    ISSUE_PER_CLOCK,
    TENSOR_FLOPS_PER_CLOCK,
    budget,
    bytes_per_item,
    dense_gemm_clocks,
    gemm_clocks,
    gemm_prediction,
    layer_prediction,
    predict,
)

RESULTS = ROOT / "benchmarks" / "results"


def _md_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def _widths(counts: dict) -> str:
    return " ".join(f"{n}x{w}B" for w, n in counts.items()) or "-"


def _constexprs(r: dict) -> str:
    c = r["constexprs"]
    if r["kind"] in ("matmul", "matmul_t"):
        keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "USE_DOT")
    elif r["kind"] == "double_quantize":
        keys = ("NESTED",)
    elif r["kind"] == "splitk_reduce":
        keys = ("SPLIT_K", "BLOCK")
    else:
        keys = ("ROWS",)
    return ", ".join(f"{k}={c[k]}" for k in keys if k in c) + f", warps={r['num_warps']}"


def _budget_cell(r: dict) -> str:
    b = budget(r)
    if b is None:
        return "-"
    return f"{b} ({'met' if r['per_item'] <= b else 'not met'})"


def _row(r: dict) -> list:
    gemm = (r["kind"] == "matmul" and r["rows"] > 16) or r["kind"] == "matmul_t"  # tensor cores: the GEMM model
    p = predict(r)
    spills = r["stack_bytes"] + r["local_bytes"] + r["spill_instructions"]
    return [r["case"], f"sm_{r['arch']}", _constexprs(r), r["registers"], "none" if not spills else
            f"{r['stack_bytes'] + r['local_bytes']} B", f"{r['shared_bytes'] / 1024:.1f}", r["loop_instructions"],
            f"{r['per_item']:.1f}", _budget_cell(r), _widths(r["loads"]), _widths(r["stores"]),
            r["loop_shuffles"], r["contractions"],
            *(["GEMM model"] * 2 if gemm else
              [f"{p[g]['fraction']:.0%} ({p[g]['bound']})" for g in ("H100", "H200")])]


HEADERS = ["case", "arch", "launch", "regs", "spills", "shared KB", "loop instr", "per item", "budget",
           "loads in loop", "stores in loop", "SHFL", "contractions", "model H100", "model H200"]


def _load() -> dict:
    return json.loads(REPORT.read_text())


def default_table() -> str:
    """The default configurations on both architectures (what CI compiles)."""
    doc = _load()
    rows = [_row(r) for r in doc["rows"] if r["default"]]
    head = (f"Triton {doc['triton']}, kernel sources `{doc['source_hash']}`, weight {doc['shape'][0]}x"
            f"{doc['shape'][1]} NF4 block 64 with double quantization unless the case says otherwise.\n\n")
    return head + _md_table(HEADERS, rows)


def all_table() -> str:
    """Every configuration the launchers can choose (and the benchmark sweep), sm_90 then sm_80."""
    doc = _load()
    if not doc["full"]:
        return "The committed report holds the default configurations only.\n"
    rows = [_row(r) for arch in (90, 80) for r in doc["rows"] if r["arch"] == arch and not r["default"]]
    return _md_table(HEADERS, rows)


def budget_summary() -> str:
    """Which budgets the default configurations meet on sm_90."""
    doc = _load()
    rows = []
    for r in doc["rows"]:
        if r["default"] and r["arch"] == 90 and budget(r) is not None:
            rows.append([r["case"], f"{r['per_item']:.1f}", budget(r), "met" if r["per_item"] <= budget(r) else "not met",
                         _widths(r["loads"]), _widths(r["stores"])])
    return _md_table(["case (sm_90)", "instructions per item", "budget", "verdict", "loads", "stores"], rows)


def model_constants() -> str:
    """The model's constants per GPU and the bytes per item of the default cases."""
    rows = []
    for gpu, c in GPUS.items():
        per_clock = c["bandwidth"] / (c["sms"] * c["clock_hz"])
        rows.append([gpu, f"{c['bandwidth'] / 1e12:.2f}", c["sms"], f"{c['clock_hz'] / 1e9:.2f}", f"{per_clock:.1f}",
                     ISSUE_PER_CLOCK])
    table = _md_table(["GPU", "datasheet TB/s", "multiprocessors", "max clock GHz", "bytes per clock per SM",
                       "thread-instructions per clock per SM"], rows)
    decode = bytes_per_item({"kind": "decode", "blocksize": 64, "double_quant": True, "dtype": "bfloat16"})
    product = bytes_per_item({"kind": "matmul", "rows": 1, "shape": [4096, 14336], "dtype": "bfloat16"})
    return table + (f"\nBytes per item (NF4, block 64, double quantization, bfloat16): decode {decode:.3f} per "
                    f"element, the one-row product {product:.3f} per weight of a 4096x14336 weight.\n")


def _find(doc: dict, case: str, arch: int = 90):
    return next((r for r in doc["rows"] if r["case"] == case and r["arch"] == arch), None)


def _measured_layer(tokens: int, shape: str) -> str:
    """``time_vs_lora`` of the triton layer in the newest GPU results file, or why there is none."""
    files = sorted(RESULTS.glob("gpu-*.json"))
    if not files:
        return "not measured (no GPU run yet)"
    doc = json.loads(files[-1].read_text())
    for r in doc["records"]:
        if (r["op"], r["provider"], r["shape"], r.get("tokens")) == ("layer", "triton", shape, tokens) \
                and "time_vs_lora" in r:
            return f"{r['time_vs_lora']:.2f}x ({files[-1].name})"
    return f"not in {files[-1].name}"


def _measured_gemm(rows: int) -> str:
    """``fraction_of_dense`` from a committed ``cuda_check.json``, or why there is none."""
    path = RESULTS / "cuda_check.json"
    if not path.exists():
        return "not measured (no GPU run yet)"
    entry = json.loads(path.read_text()).get("timings", {}).get("matmul", {}).get(str(rows), {})
    return f"{entry['fraction_of_dense']:.0%} (cuda_check.json)" if "fraction_of_dense" in entry else "not measured"


def gemm_model() -> str:
    """The tensor-core model's predictions (issue 13, item 4) beside the measured column."""
    doc = _load()
    fwd, fwd512 = _find(doc, "matmul M=2048 bfloat16"), _find(doc, "matmul M=512 bfloat16")
    bwd512, dec = _find(doc, "matmul_t M=512 bfloat16"), _find(doc, "decode nf4 b64 dq -> bfloat16")
    if None in (fwd, fwd512, bwd512, dec):
        return "The committed report lacks the GEMM rows (run the report with `--all`).\n"
    N, K = fwd["shape"]
    rows = []
    for gpu in GPUS:
        for r in (fwd, fwd512, bwd512):
            c, d = gemm_clocks(r, gpu), dense_gemm_clocks(r["rows"], N, K, gpu)
            p = gemm_prediction(r, gpu)
            what = f"`x W^T`, {r['rows']} rows" if r["kind"] == "matmul" else f"`g W`, {r['rows']} rows"
            rows.append([gpu, what, r["constexprs"]["BLOCK_M"], f"{r['per_item']:.2f}", f"{c['tensor']:,.0f}",
                         f"{c['issue']:,.0f}", f"{c['memory']:,.0f}", f"{d['clocks']:,.0f}",
                         f"{c['programs']} / {c['programs_per_sm']} / {c['waves']}", c["bound"],
                         f"**{p['predicted']:.0%}**", f"{p['overlapped']:.0%}", f"{p['serial']:.0%}",
                         _measured_gemm(r["rows"]) if r is fwd else "-"])
    gemm = _md_table(["GPU", "product", "row tile", "instr per weight", "tensor clocks", "issue clocks",
                      "memory clocks", "dense GEMM clocks", "programs / per SM / waves", "bound", "predicted",
                      "overlapped", "serial", "measured"], rows)
    rows = []
    T = fwd512["rows"]
    for gpu in GPUS:
        p = layer_prediction(fwd512, bwd512, dec, gpu)
        rows.append([gpu, T, f"**{p['fused_predicted']:.2f}x**", f"{p['fused_overlapped']:.2f}x",
                     f"{p['fused_serial']:.2f}x", f"{p['decode_then_dense']:.2f}x", _measured_layer(T, f"{N}x{K}")])
    layer = _md_table(["GPU", "tokens", "fused GEMMs, predicted", "overlapped", "serial",
                       "two full decodes + dense GEMMs", "measured (run_gpu, triton vs dense-lora)"], rows)
    return (f"Model constants: {TENSOR_FLOPS_PER_CLOCK} dense bf16 tensor-core operations and {ISSUE_PER_CLOCK} "
            f"thread-instructions per clock per multiprocessor (sm_90). Instructions per weight are the sm_90 "
            f"main-loop counts of `{fwd['case']}`, `{fwd512['case']}` (forward), `{bwd512['case']}` (input "
            f"gradient) and `{dec['case']}` in the report above; clocks are per multiprocessor with the work "
            "spread evenly, the predictions place whole programs in waves.\n\n"
            "Fused 4-bit GEMMs against an ideal dense bf16 GEMM of the same shape (fraction of its throughput; "
            "target for `x W^T` at 2048 rows: at least 70%):\n\n"
            + gemm +
            "\nQLoRA layer forward and backward over a bf16-base LoRA layer, rank 16 (target at most 1.15x):\n\n"
            + layer)


GENERATED = {"kernels_gemm_model.md": gemm_model, "kernels_model.md": model_constants, "kernels_default.md": default_table, "kernels_all.md": all_table, "kernels_budgets.md": budget_summary}


def main() -> int:
    (DOCS / "generated").mkdir(exist_ok=True)
    for name, make in GENERATED.items():
        (DOCS / "generated" / name).write_text(make())
    return 0


if __name__ == "__main__":
    sys.exit(main())
