"""``qlora-ref quality``: the NF4 / FP4 / INT4 / LoRA / full fine-tuning comparison.

The experiment itself needs torch and lives in ``qlora_gpu.quality``; this module only parses
arguments, runs it, prints the table and saves the JSON that ``docs/scripts/quality_pages.py``
turns into the docs page.
"""

from __future__ import annotations

import importlib

from qlora_ref.tables import format_table


def summary_table(results: dict) -> str:
    """Format the per-arm summary of an experiment's results as a text table."""
    rows = []
    for arm, r in results["arms"].items():
        rows.append([
            arm,
            f"{r['heldout_loss_before_mean']:.4f}",
            f"{r['heldout_loss_mean']:.4f}",
            f"{r['heldout_loss_std']:.4f}",
            f"{r['perplexity_mean']:.3f}",
            f"{r['base_weight_error']:.4f}",
            r["trainable_parameters"],
            r["stored_bytes"],
            f"{r['wall_s_mean']:.1f}",
        ])
    return format_table(
        ["arm", "loss before", "held-out loss", "std", "perplexity", "base rel. error", "trainable", "stored bytes", "wall s"],
        rows,
        title=f"Fine-tuning on held-out prose, size {results['size']}, seeds {list(results['config']['seeds'])}",
    )


def _run(args) -> int:
    quality = importlib.import_module("qlora_gpu.quality")  # needs torch
    arms = args.arms.split(",") if args.arms else quality.ARMS
    results = quality.run_experiment(args.size, arms=arms, progress=None if args.quiet else print,
                                     threads=args.threads)
    if args.out:
        print(f"saved {quality.save_results(results, args.out)}")
    print(summary_table(results))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quality", help="fine-tune a small LM with a 4-bit base (NF4/FP4/INT4) vs LoRA and full fine-tuning",
    )
    p.add_argument("--size", default="default", choices=["tiny", "default", "large"],
                   help="tiny: seconds (smoke test); default: about 10 minutes on 2 CPU cores; large: a GPU")
    p.add_argument("--arms", default="", help="comma-separated subset of arms (default: all)")
    p.add_argument("--out", default="", help="write the results as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.set_defaults(func=_run)
