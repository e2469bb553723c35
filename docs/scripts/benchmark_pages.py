"""Make the tables and figures of ``docs/benchmarks.md`` from the benchmark results JSON.

Run ``python docs/scripts/benchmark_pages.py`` from the repository root: it reads the newest
``benchmarks/results/cpu-*.json`` and ``benchmarks/results/gpu-*.json`` (Note: results format,
``benchmarks/results.py``) and writes ``docs/generated/bench_cpu.md``, ``bench_gpu.md`` (included
by the page) and ``docs/figures/bench_*.png``. Nothing in them is typed by hand: every number is
read from a results file. ``benchmarks/run_gpu.py`` calls ``render_folder`` to leave the same
tables and figures beside a GPU run's JSON.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
OP_ORDER = ("quantize", "decode", "matmul", "layer")
PROVIDER_ORDER = ("oracle", "torch", "triton", "bnb", "torchao", "torchao+compile", "dense", "dense-lora", "dense-full")

sys.path.insert(0, str(ROOT))
from benchmarks.summary import evaluate_targets  # noqa: E402


def _md_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def newest(kind: str) -> Path | None:
    """The newest results file of a kind (``cpu`` or ``gpu``) in ``benchmarks/results``, or None."""
    files = sorted(RESULTS.glob(f"{kind}-*.json"))
    return files[-1] if files else None


def _providers(records) -> list:
    seen = {r["provider"] for r in records}
    return [p for p in PROVIDER_ORDER if p in seen] + sorted(seen - set(PROVIDER_ORDER))


def _shapes(doc) -> list:
    keys = []
    for r in doc["records"]:
        if r["shape"] not in keys:
            keys.append(r["shape"])
    return keys


def _pct(p: float) -> str:
    return f"{p:.2g}%" if p < 10 else f"{p:.0f}%"


def _cell(r: dict, op: str) -> str:
    """One provider's entry: median ms, then the rate and the ratios that apply."""
    parts = [f"**{_ms(r['time_s']['median_s'])}** ms"]
    if op == "layer":
        parts.append(f"{_pct(r['pct_matmul'])} mm")
        if "time_vs_lora" in r:
            parts.append(f"{r['time_vs_lora']:.2f}x LoRA")
    else:
        parts.append(f"{r['gbps']:.3g} GB/s, {_pct(r['pct_copy'])} copy")
    if "speedup_vs_bnb" in r and r["provider"] != "bnb":
        parts.append(f"{r['speedup_vs_bnb']:.2f}x bnb")
    return "<br>".join(parts)


def op_table(doc: dict, op: str) -> str:
    """Rows: shape and case parameter; columns: providers (median, rate, ratios)."""
    records = [r for r in doc["records"] if r["op"] == op]
    if not records:
        return "_No records._\n"
    providers = _providers(records)
    param = {"quantize": None, "decode": "dtype", "matmul": "rows", "layer": "tokens"}[op]
    rows = {}
    for r in records:
        key = (r["shape"], r.get(param) if param else "")
        rows.setdefault(key, {})[r["provider"]] = r
    shape_order = _shapes(doc)
    out = []
    for (shape, value), by in sorted(rows.items(), key=lambda kv: shape_order.index(kv[0][0])):  # stable: run order
        out.append([shape] + ([value] if param else []) + [_cell(by[p], op) if p in by else "-" for p in providers])
    headers = ["shape"] + ([param] if param else []) + providers
    return _md_table(headers, out)


def _measurements(doc: dict, name: str, rate: str, scale: float) -> str:
    return " and ".join(f"{m[name][rate] * scale:.3g}" for m in doc.get("ceiling_measurements", [doc["ceilings"]]))


def machine_table(doc: dict) -> str:
    m, v, c = doc["machine"], doc["versions"], doc["ceilings"]
    rows = [["date", doc["date"]], ["machine", m.get("gpu") or m["cpu"]],
            ["CPU", f"{m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}, "
                    f"capability {m['torch_cpu_capability']}"],
            ["versions", ", ".join(f"{k} {val}" for k, val in v.items() if val)],
            ["copy ceiling", f"{c['copy']['gbps']:.3g} GB/s ({c['copy']['nbytes'] // 2**20} MiB copied, read + write; "
                             f"{_measurements(doc, 'copy', 'gbps', 1)} GB/s at the start and end of the run)"],
            ["matmul ceiling", f"{c['matmul']['tflops'] * 1e3:.4g} GFLOP/s ({c['matmul']['dtype']}, n = {c['matmul']['n']}; "
                               f"{_measurements(doc, 'matmul', 'tflops', 1e3)} GFLOP/s at the start and end)"]]
    if "matmul_bfloat16" in c:
        b = c["matmul_bfloat16"]
        rows.append(["bfloat16 matmul", f"{b['tflops'] * 1e3:.3g} GFLOP/s (n = {b['n']}): why the CPU layer cases compute in float32"])
    paths = doc.get("bitsandbytes_paths", {})
    if paths:
        rows.append(["bitsandbytes ran", ", ".join(f"{k}: {val}" for k, val in paths.items())])
    rows.append(["run", f"{doc['wall_s']:.0f} s, options {json.dumps(doc.get('options', {}))}"])
    return _md_table(["", ""], rows)


def targets_md(doc: dict) -> str:
    rows = []
    for t in evaluate_targets(doc):
        state = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        worst = "" if t["worst"] is None else f"{t['worst'][1]:.3g} ({t['worst'][0]})"
        rows.append([t["target"], t["goal"].replace(">=", "≥").replace("<=", "≤"), worst, t["cases"], state])
    return _md_table(["target", "goal", "worst case", "cases", "status"], rows)


def stored_table(doc: dict) -> str:
    stored = doc.get("memory", {}).get("stored", [])
    if not stored:
        return "_No records._\n"
    rows = []
    for s in stored:
        equal = "yes" if s["nbytes"] == s["formula_nbytes"] else f"**no** ({s['formula_nbytes']})"
        rows.append([s["shape"], s["provider"], s["quant_type"], s["scheme"], s["nbytes"], f"{s['bits_per_parameter']:.4f}",
                     equal, ", ".join(f"{k} {v}" for k, v in s["buffers"].items())])
    return _md_table(["shape", "provider", "type", "double quant", "bytes", "bits / parameter", "= formula",
                      "buffers (bytes)"], rows)


def layer_memory_table(doc: dict) -> str:
    layer = doc.get("memory", {}).get("layer", [])
    if not layer:
        return "_No records._\n"
    rows = []
    for m in layer:
        f = m["formula"]
        row = [m["shape"], m["provider"], m["tokens"], m["saved_bytes"], f["saved"], f"{m['saved_bytes'] / f['saved']:.2f}"]
        if "cuda" in m:
            row += [m["cuda"]["added"], f["added"], f"{m['cuda']['added'] / f['added']:.3f}"]
        rows.append(row)
    headers = ["shape", "provider", "tokens", "saved (hooks)", "saved (formula)", "ratio"]
    if any("cuda" in m for m in layer):
        headers += ["step allocates (CUDA)", "formula", "ratio"]
        rows = [r + [""] * (len(headers) - len(r)) for r in rows]
    return _md_table(headers, rows)


def _cases(n: int) -> str:
    return f"{n} case" if n == 1 else f"{n} cases"


def _check_summary(texts: list) -> str:
    """One line for the checks of one op and provider: exact ones, derived ones, the rest."""
    derived = [float(m.group(1)) for t in texts for m in [re.search(r"([0-9.]+) of (the )?budget", t)] if m]
    if derived and len(derived) == len(texts):
        return f"derived tier in {_cases(len(texts))}; largest error {max(derived):.2f} of the budget"
    if all(t.startswith("exact") and ";" not in t and "except" not in t for t in texts):
        return f"bit for bit in {_cases(len(texts))}"
    return "<br>".join(dict.fromkeys(texts))


def checks_table(doc: dict) -> str:
    """What the comparison with the oracle found, per op and provider, and every case not run."""
    found = {}
    for r in doc["records"]:
        found.setdefault((r["op"], r["provider"]), []).append(r["check"])
    rows = [[op, provider, _check_summary(texts)] for (op, provider), texts in found.items()]
    skipped = {}
    for s in doc.get("skipped", []):
        skipped.setdefault((s["op"], s["provider"], s["reason"]), []).append(s["shape"])
    for (op, provider, reason), shapes in skipped.items():
        where = ", ".join(sorted(set(s for s in shapes if s)))
        rows.append([op, provider, f"not run at {where}: {reason}" if where else reason])
    rows.sort(key=lambda row: (OP_ORDER.index(row[0]) if row[0] in OP_ORDER else 9,
                               PROVIDER_ORDER.index(row[1]) if row[1] in PROVIDER_ORDER else 99))
    return _md_table(["case", "provider", "check against the oracle"], rows)


def document_md(doc: dict, kind: str, figure_prefix: str = "figures/") -> str:
    """All tables of one results document, as markdown with level-3 headings."""
    parts = [f"### Machine and ceilings\n\n{machine_table(doc)}", f"### Targets\n\n{targets_md(doc)}"]
    titles = {"quantize": "Quantize (bfloat16 to NF4 + double quantization)",
              "decode": "Decode (NF4 + double quantization to dtype)",
              "matmul": "Small-batch product y = x W^T",
              "layer": "One layer, forward + backward (r = 16)"}
    for op in OP_ORDER:
        parts.append(f"### {titles[op]}\n\n{op_table(doc, op)}")
    parts.append(f"### Stored bytes of every format\n\n{stored_table(doc)}")
    parts.append(f"### Memory of one layer's forward and backward\n\n{layer_memory_table(doc)}")
    parts.append(f"### What the checks found\n\n{checks_table(doc)}")
    parts.append(f"![decode and product rates]({figure_prefix}bench_{kind}_rates.png)\n\n"
                 f"![layer times]({figure_prefix}bench_{kind}_layer.png)\n")
    return "\n".join(parts)


def missing_md(kind: str) -> str:
    return (f"_No {kind.upper()} results yet: the {kind.upper()} figures are still to be measured "
            f"(`benchmarks/results/{kind}-*.json` is absent)._\n")


def _color(provider: str) -> str:
    """One colour per provider in every figure."""
    i = PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)
    return f"C{i % 10}"


def figures(doc: dict, kind: str, folder: Path) -> list:
    """Two figures: decode/product rates against the copy ceiling, and layer times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    shape = _shapes(doc)[0]
    copy = doc["ceilings"]["copy"]["gbps"]

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, op, param in ((axes[0], "decode", "dtype"), (axes[1], "matmul", "rows")):
        records = [r for r in doc["records"] if r["op"] == op and r["shape"] == shape]
        providers = _providers(records)
        values = list(dict.fromkeys(r[param] for r in records))  # run order
        width = 0.8 / max(len(providers), 1)
        for i, p in enumerate(providers):
            ys = [next((r["gbps"] for r in records if r["provider"] == p and r[param] == v), 0) for v in values]
            ax.bar([j + i * width for j in range(len(values))], ys, width, label=p, color=_color(p))
        ax.axhline(copy, color="k", ls="--", lw=1, label="copy ceiling")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(values))], [f"{param} {v}" for v in values])
        ax.set_ylabel("GB/s (bytes that must move / time)")
        ax.set_yscale("log")
        ax.set_title(f"{op}, {shape}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / f"bench_{kind}_rates.png"
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    written.append(path)

    records = [r for r in doc["records"] if r["op"] == "layer"]
    groups = list(dict.fromkeys((r["shape"], r["tokens"]) for r in records))  # run order
    providers = _providers(records)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) + 2), 4))
    width = 0.8 / max(len(providers), 1)
    for i, p in enumerate(providers):
        ys = []
        for g in groups:
            by = {r["provider"]: r for r in records if (r["shape"], r["tokens"]) == g}
            ys.append(by[p]["time_vs_lora"] if p in by and "time_vs_lora" in by[p] else 0)
        ax.bar([j + i * width for j in range(len(groups))], ys, width, label=p, color=_color(p))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{s}\n{t} tokens" for s, t in groups],
                  fontsize=8)
    dtype = next((r.get("compute_dtype") for r in records if r.get("compute_dtype")), "")
    ax.set_ylabel("time / LoRA on a dense base")
    ax.set_title(f"one layer forward + backward, r = 16, compute dtype {dtype}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / f"bench_{kind}_layer.png"
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    written.append(path)
    return written


def generated(kind: str) -> str:
    """The markdown of ``docs/generated/bench_<kind>.md`` from the newest results file."""
    path = newest(kind)
    if path is None:
        return missing_md(kind)
    doc = json.loads(path.read_text())
    return f"Results file: `benchmarks/results/{path.name}`.\n\n" + document_md(doc, kind)


GENERATED = {"bench_cpu.md": lambda: generated("cpu"), "bench_gpu.md": lambda: generated("gpu")}


def render_folder(results_path, out_dir) -> list:
    """Write ``benchmarks.md`` and the figures of one results file into ``out_dir``."""
    doc = json.loads(Path(results_path).read_text())
    kind = "gpu" if doc["kind"] == "gpu" else "cpu"
    out_dir = Path(out_dir)
    written = figures(doc, kind, out_dir)
    md = out_dir / "benchmarks.md"
    md.write_text(f"Results file: `{Path(results_path).name}`.\n\n" + document_md(doc, kind, figure_prefix=""))
    return [md] + written


def main(argv=None) -> int:
    (DOCS / "generated").mkdir(exist_ok=True)
    for name, make in GENERATED.items():
        (DOCS / "generated" / name).write_text(make())
    if "--no-figures" not in (argv if argv is not None else sys.argv[1:]):
        for kind in ("cpu", "gpu"):
            path = newest(kind)
            if path is not None:
                figures(json.loads(path.read_text()), kind, DOCS / "figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
