"""Make the quality page's table and loss-curve figure from the experiment's saved JSON.

Run ``qlora-ref quality --out docs/generated/quality.json`` first (about 10 minutes on 2 CPU
cores), then ``python docs/scripts/quality_pages.py``. It writes
``docs/generated/quality_table.md`` and ``docs/figures/quality_curves.png``.
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
    for arm, r in results["arms"].items():
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


def _compare(results: dict, a: str, b: str) -> str:
    """One sentence comparing two arms: the difference of means against the seeds' spread."""
    ra, rb = results["arms"][a], results["arms"][b]
    diff = ra["heldout_loss_mean"] - rb["heldout_loss_mean"]
    spread = max(ra["heldout_loss_std"], rb["heldout_loss_std"], 1e-12)
    verdict = "within the seed-to-seed spread" if abs(diff) <= 2 * spread else (
        f"{'lower' if diff < 0 else 'higher'} by more than twice the seed-to-seed spread")
    return (f"`{a}` minus `{b}`: {diff:+.4f} nats per byte ({abs(diff) / spread:.1f} times the larger "
            f"seed standard deviation, {spread:.4f}): {verdict}.")


def quality_discussion(results: dict) -> str:
    """Generated comparisons: the orderings the paper predicts, tested against seed noise."""
    arms = results["arms"]
    ranked = sorted((a for a in arms if a != "base"), key=lambda a: arms[a]["heldout_loss_mean"])
    lines = ["Ranking by mean held-out loss, best first: " + ", ".join(f"`{a}`" for a in ranked) + ".", ""]
    pairs = [("nf4-dq", "fp4"), ("nf4-dq", "int4"), ("nf4-dq", "nf4"), ("nf4-dq", "lora-bf16"), ("nf4-dq", "full"),
             ("lora-bf16", "full")]
    for a, b in pairs:
        if a in arms and b in arms:
            lines.append(f"- {_compare(results, a, b)}")
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
    for arm, r in results["arms"].items():
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


def main(argv=None) -> int:
    results = json.loads(RESULTS.read_text())
    (DOCS / "generated" / "quality_table.md").write_text(quality_table(results))
    (DOCS / "generated" / "quality_discussion.md").write_text(quality_discussion(results))
    figure(results, DOCS / "figures" / "quality_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
