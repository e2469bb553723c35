"""Make the memory table of docs/fsdp.md from the calculator (``qlora-ref memory --gpus N``).

Run ``python docs/scripts/fsdp_tables.py`` to rewrite ``docs/generated/fsdp_memory.md``;
``tests/test_docs.py`` checks that the committed file equals what this makes.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
from pathlib import Path

from qlora_ref.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]

#: (setup, arguments of qlora-ref memory): Llama-2-70B with the QLoRA paper's recipe.
SETUPS = [
    ("one 80 GB GPU", ("--model", "llama-2-70b", "--gpu", "80GB")),
    ("2 x 24 GB, FSDP", ("--model", "llama-2-70b", "--gpus", "2", "--gpu", "24GB")),
    ("2 x 24 GB, FSDP with CPU offload", ("--model", "llama-2-70b", "--gpus", "2", "--cpu-offload", "--gpu", "24GB")),
    ("8 x 80 GB, FSDP", ("--model", "llama-2-70b", "--gpus", "8", "--gpu", "80GB")),
]


def memory(*args: str) -> dict:
    """Run ``qlora-ref memory ARGS --json`` and return its breakdown."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli_main(["memory", *args, "--json"])
    if status:
        raise RuntimeError(f"qlora-ref memory {' '.join(args)} failed with status {status}")
    return json.loads(out.getvalue())


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _bytes(data: dict, *, names=()) -> int:
    """Bytes of the items whose names start with one of ``names``."""
    return sum(i["nbytes"] for i in data["items"] if i["name"].startswith(tuple(names)))


def fsdp_memory() -> str:
    headers = ["setup", "sharded state per GPU", "of which 4-bit weights and constants", "kept in",
               "gathered units (FSDP)", "peak on each GPU (paged state not counted)", "fits, margin", "batches of 512 tokens that fit",
               "command"]
    rows = []
    for label, args in SETUPS:
        d = memory(*args)
        fit = d["fit"]
        state = [i for i in d["items"] if i["category"] in ("weights", "adapters", "gradients", "optimizer")
                 and not i["name"].startswith("FSDP:")]
        best = [f for f in fit["largest_fits"] if f["gradient_checkpointing"] and f["seq_len"] == 512]
        margin = fit["margin_bytes"]
        rows.append([
            label,
            gib(sum(i["nbytes"] for i in state)),
            gib(_bytes(d, names=("linear weights",))),
            "CPU RAM" if all(i["where"] == "cpu" for i in state) else "GPU",
            gib(_bytes(d, names=("FSDP:",))),
            gib(fit["peak_bytes"]),
            f"{'yes' if fit['fits'] else 'no'} ({'+' if margin >= 0 else '-'}{gib(abs(margin))})",
            str(best[0]["batch_size"]) if best else "0",
            f"`qlora-ref memory {shlex.join(args)}`",
        ])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


GENERATED = {"fsdp_memory.md": fsdp_memory}

if __name__ == "__main__":
    for name, make in GENERATED.items():
        (ROOT / "docs" / "generated" / name).write_text(make())
        print(f"wrote docs/generated/{name}")
