"""The ``qlora-ref`` command line: one subcommand per module of this package.

User errors (``ValueError``, ``TypeError``, and ``OSError`` such as a missing or unreadable
file) and bad arguments print one line, ``qlora-ref COMMAND: error: ...``, and exit with status
2; a traceback means a bug. Each command module defines ``register(subparsers)``, which adds its
parser and sets ``func``
to a callable taking the parsed arguments and returning an exit status. Every command runs
with the oracle alone (NumPy and SciPy); implementations that need torch reach ``check``
through the provider registry's plug-in point (``qlora_ref.conformance.providers``).
"""

from __future__ import annotations

import argparse
import os
import sys

from qlora_ref.cli import check, inspect, memory, report, vectors
from qlora_ref.cli.args import ArgumentParser, one_line

__all__ = ["build_parser", "main", "COMMANDS"]

#: Command modules, in the order ``--help`` lists them.
COMMANDS = (report, memory, check, vectors, inspect)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    parser = ArgumentParser(
        prog="qlora-ref",
        description="QLoRA reference: the NumPy oracle, conformance checks, checkpoints and memory.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # The reader went away (``qlora-ref memory --json | head``): stop quietly, as a tool
        # killed by SIGPIPE would, and keep Python from complaining again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13
    except (ValueError, TypeError, OSError) as exc:  # user errors (bad input, a file problem): no traceback
        print(f"qlora-ref {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
