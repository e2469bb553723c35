"""Make the tables and figures of the results, speed and diagram pages.

Run ``python docs/scripts/practitioner_pages.py`` from the repository root: it writes
``docs/generated/paper_results.md``, ``docs/generated/speed_cpu.md`` and the figures
``docs/figures/packed_layout.png``, ``qlora_dataflow.png`` and ``memory_70b.png``. The paper's
figures are data below, each with the table or section it comes from; this project's figures are
read from ``docs/generated/quality.json`` (``python -m benchmarks.quality``), the newest
``benchmarks/results/cpu-*.json`` (``python -m benchmarks``) and the memory calculator.
``tests/test_docs.py`` regenerates the tables and checks they match.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent

#: Headline results of the QLoRA paper (Dettmers et al. 2023, arXiv 2305.14314), as published.
#: Table 2: mean zero-shot perplexity on Pile Common Crawl over OPT, BLOOM, LLaMA and Pythia
#: models of 125M to 13B parameters, quantized base, no fine-tuning (lower is better).
PAPER_TABLE2_PERPLEXITY = {"int4": 34.34, "fp4 (E2M1)": 31.07, "fp4 (E3M0)": 29.48, "nf4 + DQ": 27.41}
#: Table 4: mean 5-shot MMLU accuracy (%) of LLaMA 7B to 65B fine-tuned on Alpaca and FLAN v2
#: with adapters on a base in the given type (higher is better).
PAPER_TABLE4_MMLU = {"bf16": 53.0, "fp4": 52.2, "nf4 + DQ": 53.1}
#: Abstract: Guanaco 65B reaches this percentage of ChatGPT's score on the Vicuna benchmark
#: (judged by GPT-4), after this many hours of fine-tuning on one GPU.
PAPER_GUANACO = {"percent_of_chatgpt": 99.3, "hours_on_one_gpu": 24}


#: QLoRA-against-LoRA speed as others reported it: user reports in issue trackers, with their
#: setting as stated there. Not measurements of this project, and not controlled comparisons.
REPORTED_STEP_TIME = (
    dict(source="https://github.com/allenai/open-instruct/issues/109", date="2024-02",
         reported="QLoRA took about five times LoRA's time with the same LoRA config and batch size",
         setting="open-instruct fine-tuning scripts; GPU not stated in the report"),
    dict(source="https://github.com/hiyouga/LlamaFactory/issues/653", date="2023-08",
         reported="QLoRA trained 5 to 6 times slower than LoRA on the same data, 13B model; a larger "
                  "batch did not recover it",
         setting="LLaMA-Factory; the maintainer's reply: only some GPUs (A100, 3090, 4090) have fast "
                 "quantized paths"),
    dict(source="https://github.com/ml-explore/mlx-examples/issues/511", date="2024-03",
         reported="no significant speed difference between LoRA and QLoRA (tokens/s)",
         setting="MLX on Apple silicon, 0.5B and 2.7B models; the maintainer's reply: QLoRA's advantage "
                 "is memory, larger for larger models"),
)


def reported_speed_table() -> str:
    """What others reported about QLoRA against LoRA speed, with sources."""
    rows = [[f"[{r['source'].split('github.com/')[1]}]({r['source']}) ({r['date']})", r["reported"], r["setting"]]
            for r in REPORTED_STEP_TIME]
    return _md_table(["source", "reported", "setting, as stated"], rows)


def _md_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def _quality() -> dict:
    return json.loads((DOCS / "generated" / "quality.json").read_text())


def paper_results_table() -> str:
    """The paper's headline results beside what this project's small-scale experiment shows."""
    q = _quality()
    arms = q["arms"]

    def before(arm):
        return f"{arms[arm]['heldout_loss_before_mean']:.4f}"

    def after(arm):
        return f"{arms[arm]['heldout_loss_mean']:.4f} ± {arms[arm]['heldout_loss_std']:.4f}"

    t2 = PAPER_TABLE2_PERPLEXITY
    t4 = PAPER_TABLE4_MMLU
    loss_before = {arm: arms[arm]["heldout_loss_before_mean"] for arm in ("nf4-dq", "fp4", "int4")}
    loss, spread = ({arm: arms[arm][k] for arm in arms} for k in ("heldout_loss_mean", "heldout_loss_std"))

    # The verdicts follow from the numbers: a gap counts when it exceeds the seeds' spread.
    def behind(a, b):  # is arm a's loss above arm b's by more than their spreads?
        return loss[a] - loss[b] > spread[a] + spread[b]

    nf4_beats = [t for t in ("fp4", "int4") if loss_before["nf4-dq"] < loss_before[t]]
    first = ("yes" if len(nf4_beats) == 2 else "partly" if nf4_beats else "no") + ": before fine-tuning NF4 " + (
        "beats " + " and ".join(t.upper() for t in nf4_beats) if nf4_beats else "beats neither") + (
        "" if "int4" in nf4_beats else "; INT4 does not lose to NF4 here")
    second = ("yes: NF4 + DQ equals LoRA on bf16 within the seed spread" if not behind("nf4-dq", "lora-bf16")
              else "no: NF4 + DQ is behind LoRA on bf16 by more than the seed spread")
    paired = [a["heldout_loss"] - b["heldout_loss"]  # same seed, same data order: fp4 minus nf4-dq
              for a, b in zip(arms["fp4"]["runs"], arms["nf4-dq"]["runs"]) if a["seed"] == b["seed"]]
    second += "; FP4 " + ("behind NF4 + DQ by more than the spread" if behind("fp4", "nf4-dq") else
                          "behind NF4 + DQ for every seed (paired), by less than the spread"
                          if paired and min(paired) > 0 else "not behind NF4 + DQ")
    third = ("LoRA part yes; full fine-tuning no: the adapters trail it at this scale and step count"
             if behind("nf4-dq", "full") else "yes: within the seed spread of full fine-tuning")
    rows = [
        ["Base format, before fine-tuning: NF4 beats FP4 beats INT4",
         "Table 2 (perplexity, lower is better): " + ", ".join(f"{k} {v}" for k, v in t2.items()),
         f"held-out loss (nats/byte): int4 {before('int4')}, fp4 {before('fp4')}, nf4 + DQ {before('nf4-dq')}, "
         f"16-bit {before('base')}", first],
        ["After fine-tuning, NF4 + DQ matches a 16-bit base; FP4 falls behind",
         "Table 4 (MMLU %, higher is better): " + ", ".join(f"{k} {v}" for k, v in t4.items()),
         f"held-out loss: lora-bf16 {after('lora-bf16')}, nf4 + DQ {after('nf4-dq')}, fp4 {after('fp4')}", second],
        ["QLoRA replicates 16-bit LoRA and full fine-tuning",
         "Table 3 (GLUE, Super-NaturalInstructions) and section 4",
         f"held-out loss: full {after('full')}, nf4 + DQ {after('nf4-dq')}", third],
        ["Guanaco: a chatbot near ChatGPT from one GPU",
         f"Abstract: Guanaco 65B at {PAPER_GUANACO['percent_of_chatgpt']}% of ChatGPT on the Vicuna benchmark, "
         f"{PAPER_GUANACO['hours_on_one_gpu']} h on one GPU",
         "-", "not attempted: needs a 65B base, the OASST1 data and GPT-4 as judge"],
    ]
    text = _md_table(["claim", "the paper (Dettmers et al. 2023)", "this project (docs/generated/quality.json)",
                      "reproduced?"], rows)
    cfg = q["config"]
    text += (f"\nThis project's column: the [quality experiment](quality.md), size `{q['size']}` (d_model "
             f"{cfg['d_model']}, {cfg['n_layer']} layers, r = {cfg['rank']}, {cfg['finetune_steps']} fine-tuning "
             f"steps, seeds {', '.join(str(s) for s in cfg['seeds'])}), measured {q['date']}.\n")
    return text


def _newest_cpu_results() -> Path | None:
    files = sorted((ROOT / "benchmarks" / "results").glob("cpu-*.json"))
    return files[-1] if files else None


def speed_table() -> str:
    """QLoRA against LoRA step time from this project's own CPU measurements."""
    path = _newest_cpu_results()
    if path is None:
        return "_No CPU benchmark results yet (`python -m benchmarks`)._\n"
    doc = json.loads(path.read_text())
    layer = [r for r in doc["records"] if r["op"] == "layer"]
    rows = []
    for r in layer:
        provider = r["provider"]
        what = {"dense-lora": "LoRA on a dense base", "dense-full": "full fine-tuning of the layer"}.get(
            provider, f"QLoRA, NF4 + DQ base ({provider})")
        rows.append([r["shape"], r["tokens"], what, f"{1e3 * r['time_s']['median_s']:.1f}",
                     f"{r['time_vs_lora']:.2f}x", r["compute_dtype"]])
    m = doc["machine"]
    text = _md_table(["W (out x in)", "tokens", "layer", "forward + backward, median ms", "vs LoRA",
                      "compute dtype"], rows)
    text += (f"\nFrom `benchmarks/results/{path.name}`: {m['cpu']}, {m['cpu_count']} cores, torch CPU capability "
             f"{m['torch_cpu_capability']}, measured {doc['date'][:10]}; r = 16.\n")
    q = _quality()
    arms = q["arms"]
    rows = [[arm, f"{arms[arm]['wall_s_mean']:.1f}", f"{arms[arm]['wall_s_mean'] / arms['lora-bf16']['wall_s_mean']:.2f}x"]
            for arm in ("lora-bf16", "nf4", "nf4-dq", "fp4", "int4", "full")]
    text += "\n" + _md_table(["quality-experiment arm", "wall time per run, s (mean over seeds)", "vs lora-bf16"], rows)
    text += (f"\nFrom `docs/generated/quality.json`, measured {q['date']} on {q['machine'].get('platform', '')}: "
             "whole runs, evaluation included.\n")
    return text


# -- figures ---------------------------------------------------------------------------------


def _figure_packed_layout(plt) -> None:
    """A 4-bit tensor as stored: the packed codes, one absmax code per block, nested blocks."""
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 42)
    ax.axis("off")

    def box(x, y, w, h, text, color, fs=8):
        ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="k", lw=0.8))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs)

    ax.text(0, 40, "W (out, in), flattened row-major, split into blocks of 64 elements", fontsize=9, weight="bold")
    for i in range(8):
        box(2 + 11.5 * i, 32, 11, 5, f"block {i}\n64 weights", "#cfe2ff" if i < 4 else "#e2f0d9")
    ax.text(96, 34.5, "...", fontsize=12)
    ax.text(0, 29, "packed: 2 codes per byte, first element in the high nibble (32 bytes per block)", fontsize=9)
    for i in range(16):
        box(2 + 5.75 * i, 23, 5.5, 4, "hi|lo", "#cfe2ff" if i < 8 else "#e2f0d9", fs=7)
    ax.text(0, 20, "absmax of each block -> minus the offset (mean of all absmax) -> 8-bit code in the dynamic map",
            fontsize=9)
    for i in range(8):
        box(2 + 11.5 * i, 14, 11, 4, f"code {i} (uint8)", "#fff2cc")
    ax.text(0, 10.5, "nested blocks: 256 absmax codes share one float32 nested absmax", fontsize=9)
    box(2, 4, 60, 4.5, "nested block 0: absmax codes 0..255 -> nested_absmax[0] (float32)", "#fce4d6")
    box(63, 4, 33, 4.5, "nested block 1: codes 256..511 ...", "#fce4d6")
    ax.text(0, 0.5, "per tensor: offset (float32), NF4 table (16 x float32), dynamic map (256 x float32)",
            fontsize=9)
    fig.tight_layout()
    fig.savefig(DOCS / "figures" / "packed_layout.png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def _figure_dataflow(plt) -> None:
    """The QLoRA layer's forward and backward data flow."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(10, 5))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 50)
    ax.axis("off")
    nodes = {
        "codes": (4, 38, "4-bit codes + constants\n(frozen, stored)", "#fce4d6"),
        "Wc": (30, 38, "W_c = round_cd(decode)\n(out, in), transient", "#fff2cc"),
        "x": (4, 22, "x (..., in)", "#cfe2ff"),
        "base": (56, 38, "x W_c^T (+ b)", "#e2f0d9"),
        "A": (30, 22, "h = (d * x) A^T\n(..., r)", "#e2f0d9"),
        "B": (56, 22, "s h B^T\n(..., out)", "#e2f0d9"),
        "y": (80, 30, "y = sum\n(..., out)", "#cfe2ff"),
    }
    for _, (x, y, text, color) in nodes.items():
        ax.add_patch(FancyBboxPatch((x, y), 18, 7, boxstyle="round,pad=0.4", facecolor=color, edgecolor="k"))
        ax.text(x + 9, y + 3.5, text, ha="center", va="center", fontsize=8)

    def arrow(a, b, color="k", style="-|>"):
        (xa, ya, *_), (xb, yb, *_) = nodes[a], nodes[b]
        ax.add_patch(FancyArrowPatch((xa + 18.5, ya + 3.5), (xb - 0.5, yb + 3.5), arrowstyle=style,
                                     mutation_scale=12, color=color))

    for a, b in (("codes", "Wc"), ("Wc", "base"), ("x", "A"), ("A", "B"), ("base", "y"), ("B", "y")):
        arrow(a, b)
    ax.add_patch(FancyArrowPatch((13, 29.5), (60, 38), arrowstyle="-|>", mutation_scale=12, connectionstyle="arc3,rad=-0.2"))
    ax.text(2, 14, "Backward, with G = dL/dy (..., out):", fontsize=9, weight="bold", color="C3")
    ax.text(2, 9.5, "dL/dB = s G^T h        dL/dA = s (G B)^T (d * x)      (the only parameter gradients)",
            fontsize=9, color="C3")
    ax.text(2, 5.5, "dL/dx = G W_c + s d * ((G B) A)     (W_c decoded again from the codes; no gradient for W)", fontsize=9,
            color="C3")
    ax.text(2, 1.5, "qlora_gpu saves x, A, B, d and the packed codes for backward, never a dense W.  round_cd: round to the compute dtype.",
            fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "figures" / "qlora_dataflow.png", dpi=110, metadata={"Software": None})
    plt.close(fig)


#: The fine-tune whose memory the 70B figure breaks down (stated, not the calculator's defaults).
MEMORY_70B = dict(model="llama-2-70b", setup=dict(rank=64, adapter_dtype="float32", lora_dropout=True,
                                                  batch_size=1, seq_len=512, gradient_checkpointing=True))


def memory_70b_caption() -> str:
    """The setting and totals of the 70B memory figure, from the calculator."""
    from qlora_ref.memory import FinetuneSetup, estimate_memory, format_bytes, model_shape

    b = estimate_memory(model_shape(MEMORY_70B["model"]), FinetuneSetup(**MEMORY_70B["setup"]))
    s = b.setup
    return (f"{MEMORY_70B['model']}, {s.quant_type} block {s.blocksize}, double quantization "
            f"{'on' if s.double_quant else 'off'}; LoRA r = {s.rank} on {s.target_modules} in {s.adapter_dtype}, "
            f"dropout {'on' if s.lora_dropout else 'off'}; {s.optimizer}; batch {s.batch_size} x {s.seq_len} tokens, "
            f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}. Total "
            f"{format_bytes(b.total_bytes)}, of which {format_bytes(b.resident_bytes)} stays on the GPU "
            "(the paged optimizer state can move to the CPU).\n")


def _figure_memory_70b(plt) -> None:
    from qlora_ref.memory import FinetuneSetup, estimate_memory, model_shape

    b = estimate_memory(model_shape(MEMORY_70B["model"]), FinetuneSetup(**MEMORY_70B["setup"]))
    items = sorted(b.items, key=lambda i: -i.nbytes)
    gib = np.array([i.nbytes for i in items]) / 2**30
    fig, ax = plt.subplots(figsize=(9, 4.5))
    y = np.arange(len(items))[::-1]
    colors = {c: f"C{k}" for k, c in enumerate(dict.fromkeys(i.category for i in items))}
    ax.barh(y, gib, color=[colors[i.category] for i in items])
    ax.set_yticks(y, [f"{i.name}{' (paged)' if i.paged else ''}" for i in items], fontsize=8)
    for yi, g in zip(y, gib):
        ax.text(g, yi, f" {g:.2f} GiB", va="center", fontsize=7)
    ax.set_xlabel("GiB")
    ax.set_title(f"What each byte of a {MEMORY_70B['model']} QLoRA fine-tune is (qlora_ref.memory)", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), fontsize=8, loc="lower right")
    ax.set_xlim(0, gib.max() * 1.25)
    fig.tight_layout()
    fig.savefig(DOCS / "figures" / "memory_70b.png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def figures() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _figure_packed_layout(plt)
    _figure_dataflow(plt)
    _figure_memory_70b(plt)


GENERATED = {
    "paper_results.md": paper_results_table,
    "speed_cpu.md": speed_table,
    "memory_70b_caption.md": memory_70b_caption,
    "speed_reported.md": reported_speed_table,
}


def main(argv=None) -> int:
    (DOCS / "generated").mkdir(exist_ok=True)
    (DOCS / "figures").mkdir(exist_ok=True)
    for name, make in GENERATED.items():
        (DOCS / "generated" / name).write_text(make())
    if "--no-figures" not in (argv or sys.argv[1:]):
        figures()
    return 0


if __name__ == "__main__":
    sys.exit(main())
