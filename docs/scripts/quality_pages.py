"""Make the quality page's table and loss-curve figure from the experiment's saved JSON.

Run ``python -m benchmarks.quality --out docs/generated/quality.json`` first, from a source
checkout (about 10 minutes on 2 CPU cores), then ``python docs/scripts/quality_pages.py``. It
writes ``docs/generated/quality_table.md`` and ``docs/figures/quality_curves.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
RESULTS = DOCS / "generated" / "quality.json"


def quality_table(results: dict) -> str:
    """Markdown table: one row per arm, from the saved results."""
    lines = [
        "| arm | held-out loss before fine-tuning | held-out loss after (mean ± std) | perplexity after "
        "| base weight rel. error | trainable parameters | stored bytes | wall time per run (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in _ordered(results):
        r = results["arms"][arm]
        lines.append(
            f"| {arm} | {r['heldout_loss_before_mean']:.4f} | {r['heldout_loss_mean']:.4f} ± {r['heldout_loss_std']:.4f} "
            f"| {r['perplexity_mean']:.3f} "
            f"| {r['base_weight_error']:.4f} | {r['trainable_parameters']:,} | {r['stored_bytes']:,} "
            f"| {r['wall_s_mean']:.1f} |"
        )
    cfg = results["config"]
    lines.append("")
    lines.append(
        f"Size `{results['size']}`: d_model {cfg['d_model']}, {cfg['n_layer']} layers, seq {cfg['seq_len']}, "
        f"batch {cfg['batch_size']}; {cfg['pretrain_steps']} pretraining steps, {cfg['finetune_steps']} "
        f"fine-tuning steps, seeds {cfg['seeds']}; r = {cfg['rank']}, alpha = {cfg['alpha']}, dropout "
        f"{cfg['dropout']}, lr {cfg['lr']}. Measured {results['date']} on {results['machine']['platform']}, "
        f"torch {results['machine']['torch']}; total {results['total_wall_s'] / 60:.1f} minutes."
    )
    return "\n".join(lines) + "\n"


ARM_ORDER = ("base", "full", "lora-bf16", "nf4-dq", "nf4", "fp4", "int4")


def _ordered(results: dict) -> list:
    return [a for a in ARM_ORDER if a in results["arms"]] + [a for a in results["arms"] if a not in ARM_ORDER]


def _paired(results: dict, a: str, b: str, key) -> list:
    """Per-seed differences ``a - b`` of ``key(run)``: the arms share data order and seeds."""
    runs_b = {r["seed"]: r for r in results["arms"][b]["runs"]}
    return [key(r) - key(runs_b[r["seed"]]) for r in results["arms"][a]["runs"] if r["seed"] in runs_b]


def _compare(results: dict, a: str, b: str, *, before: bool = False) -> str:
    """One sentence comparing two arms by paired per-seed differences of held-out loss."""
    key = (lambda r: r["curve"][0][1]) if before else (lambda r: r["heldout_loss"])
    d = _paired(results, a, b, key)
    mean = sum(d) / len(d)
    if len(d) > 1:
        sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5
        same_sign = all(x < 0 for x in d) or all(x > 0 for x in d)
        verdict = (f"`{a}` {'lower' if mean < 0 else 'higher'} for every seed" if same_sign
                   else "the sign changes between seeds")
        spread = f", per-seed differences {', '.join(f'{x:+.4f}' for x in d)} (std {sd:.4f}): {verdict}"
    else:
        spread = ""
    return f"`{a}` minus `{b}`{' before fine-tuning' if before else ''}: {mean:+.4f} nats per byte{spread}."


def quality_discussion(results: dict) -> str:
    """Generated comparisons: the orderings the paper predicts, as paired per-seed differences."""
    arms = results["arms"]
    ranked = sorted((a for a in arms if a != "base"), key=lambda a: arms[a]["heldout_loss_mean"])
    lines = ["Ranking by mean held-out loss after fine-tuning, best first: "
             + ", ".join(f"`{a}`" for a in ranked) + ".", "",
             "Paired comparisons (every arm sees the same seeds, so differences are taken seed by seed):", ""]
    after = [("nf4-dq", "fp4"), ("nf4-dq", "int4"), ("nf4-dq", "nf4"), ("nf4-dq", "lora-bf16"),
             ("nf4-dq", "full"), ("lora-bf16", "full")]
    lines += [f"- {_compare(results, a, b)}" for a, b in after if a in arms and b in arms]
    lines += ["", "What the base format costs before any training (the quantized model, adapters still zero):", ""]
    lines += [f"- {_compare(results, a, 'base', before=True)}" for a in ("lora-bf16", "nf4-dq", "nf4", "fp4", "int4")
              if a in arms and "base" in arms]
    if "base" in arms and "nf4-dq" in arms:
        gain = arms["base"]["heldout_loss_mean"] - arms["nf4-dq"]["heldout_loss_mean"]
        lines.append(f"- Fine-tuning `nf4-dq` lowers the held-out loss by {gain:.4f} from the base model's "
                     f"{arms['base']['heldout_loss_mean']:.4f}.")
    return "\n".join(lines) + "\n"


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm in _ordered(results):
        r = results["arms"][arm]
        if arm == "base":
            ax.axhline(r["heldout_loss_mean"], color="0.5", ls=":", label="base (no fine-tuning)")
            continue
        steps = [s for s, _ in r["runs"][0]["curve"]]
        mean = [sum(run["curve"][i][1] for run in r["runs"]) / len(r["runs"]) for i in range(len(steps))]
        ax.plot(steps, mean, label=arm)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out loss (nats per byte), mean over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def _results() -> dict:
    return json.loads(RESULTS.read_text())


#: Tables made from the committed JSON (tests/test_docs.py checks they are current).
GENERATED = {
    "quality_table.md": lambda: quality_table(_results()),
    "quality_discussion.md": lambda: quality_discussion(_results()),
}


def main(argv=None) -> int:
    for name, make in GENERATED.items():
        (DOCS / "generated" / name).write_text(make())
    figure(_results(), DOCS / "figures" / "quality_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
