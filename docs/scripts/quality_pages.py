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
        "| arm | held-out loss (mean ± std) | perplexity | base weight rel. error | trainable parameters | stored bytes | wall time per run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, r in results["arms"].items():
        lines.append(
            f"| {arm} | {r['heldout_loss_mean']:.4f} ± {r['heldout_loss_std']:.4f} | {r['perplexity_mean']:.3f} "
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
    figure(results, DOCS / "figures" / "quality_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
