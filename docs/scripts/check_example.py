"""Make the generated parts of docs/conformance.md: the golden-vector case table and the worked
``qlora-ref check`` example, by running the code (nothing is typed by hand).

Run ``python docs/scripts/check_example.py`` from the repository root. It writes
``docs/generated/vector_cases.md`` and ``docs/generated/check_example.md``;
``tests/test_check.py`` regenerates both and checks they match.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from collections import OrderedDict
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent

#: The worked example: each command is run in-process and its output pasted below it.
COMMANDS = (
    "qlora-ref check oracle docs/scripts/my_nf4.py:quantize,dequantize --no-time",
    "qlora-ref check docs/scripts/my_nf4.py:quantize_low_first --rounds 0 --no-time",
)


def _family(name: str) -> str:
    """Case family: the name without quant type, block size and dtype."""
    name = re.sub(r"-(nf4|fp4)\b", "-{type}", name)
    name = re.sub(r"-b\d+\b", "-b{block}", name)
    name = re.sub(r"-(float32|float16|bfloat16)\b", "-{dtype}", name)
    return re.sub(r"^length\d+", "length{n}", name)


def vector_cases() -> str:
    """A table of the shipped cases, grouped by family, from the manifest."""
    from qlora_ref.conformance.vectors import read_manifest

    families: OrderedDict = OrderedDict()
    for case in read_manifest()["cases"]:
        f = families.setdefault(_family(case["name"]), {"kind": case["kind"], "n": 0, "arrays": set(),
                                                        "description": case["description"]})
        f["n"] += 1
        f["arrays"].update(case["arrays"])
    lines = ["| case names | kind | cases | arrays | what it exercises |", "|---|---|---|---|---|"]
    for family, f in families.items():
        arrays = ", ".join(f"`{a}`" for a in sorted(f["arrays"]))
        description = re.sub(r"(float32|float16|bfloat16) inputs|, (float32|float16|bfloat16), shape \(\d+, \d+\)", "",
                             f["description"]).replace("|", "/")
        lines.append(f"| `{family}` | {f['kind']} | {f['n']} | {arrays} | {description} |")
    return "\n".join(lines) + "\n"


def check_example() -> str:
    """Run each command of ``COMMANDS`` and return them with their output, as markdown."""
    from qlora_ref.cli import main

    parts = []
    for command in COMMANDS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(shlex.split(command)[1:])
        parts.append(f"```console\n$ {command}\n{out.getvalue().rstrip()}\n$ echo $?\n{status}\n```\n")
    return "\n".join(parts)


GENERATED = {"vector_cases.md": vector_cases, "check_example.md": check_example}


def main() -> int:
    if Path.cwd().resolve() != ROOT:
        print(f"run from the repository root ({ROOT})", file=sys.stderr)
        return 2
    for name, make in GENERATED.items():
        (DOCS / "generated" / name).write_text(make())
        print(f"wrote docs/generated/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
