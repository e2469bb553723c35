"""The ``qlora-ref`` command line: one subcommand per module listed in ``COMMANDS``.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit status. Modules that
need torch import it inside that callable, so the oracle's commands run without it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Modules that define subcommands, in the order ``--help`` lists them.
COMMANDS = (
    "qlora_ref.report",
    "qlora_ref.memory_cli",
    "qlora_ref.quality_cli",
    "qlora_ref.check",
    "qlora_ref.vectors",
    "qlora_ref.inspect_cli",
    "qlora_ref.bench_cli",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="qlora-ref",
        description="QLoRA reference: the NumPy oracle, conformance checks, memory and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"qlora-ref {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
