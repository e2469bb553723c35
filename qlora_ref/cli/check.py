"""``qlora-ref check``: the command line of the conformance run (``qlora_ref.conformance.run``).

Exit status: 1 when any difference is unexplained (with ``--strict``: any difference at all),
2 on a usage error, 0 otherwise.
"""

from __future__ import annotations

import json
import time

from qlora_ref.cli.args import int_in
from qlora_ref.conformance.implementations import resolve
from qlora_ref.conformance.providers import PROVIDERS
from qlora_ref.conformance.run import check_implementations, format_report

__all__ = ["register"]


def _run(args) -> int:
    names = args.impl or list(PROVIDERS)
    impls = [resolve(name) for name in names]
    start = time.perf_counter()
    rows = check_implementations(impls, vectors_root=args.vectors, use_vectors=not args.no_vectors,
                                 seed=args.seed, rounds=args.rounds, per_case=args.per_case)
    elapsed_s = time.perf_counter() - start
    unexplained = sum(r.unexplained for r in rows)
    explained = sum(sum(r.classes.values()) for r in rows)
    if args.json:
        print(json.dumps({
            "format_version": 1,
            "implementations": {i.name: {"available": i.available, "reason": i.reason} for i in impls},
            "rows": [r.as_dict() for r in rows],
            "unexplained": unexplained,
            "explained": explained,
            "elapsed_s": round(elapsed_s, 3),
        }, indent=2, sort_keys=True))
    else:
        print(format_report(rows, impls, elapsed_s=None if args.no_time else elapsed_s))
    if unexplained or (args.strict and explained):
        return 1
    return 0


def register(subparsers) -> None:
    """Add ``qlora-ref check``."""
    p = subparsers.add_parser(
        "check", help="check implementations against the oracle on the golden vectors and random inputs",
        description="Check 4-bit quantization implementations against the oracle. IMPL is a registered "
                    "provider (oracle, torch, triton, bnb, torchao) or module:quantize[,dequantize] "
                    "(docs/conformance.md); default: every registered provider that is installed. Exit "
                    "status 1 when a difference is unexplained.")
    p.add_argument("impl", nargs="*", metavar="IMPL", help="implementations to check (default: all registered)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 on any difference, classified or not")
    p.add_argument("--per-case", action="store_true", help="one row per case instead of per group")
    p.add_argument("--vectors", metavar="DIR", default=None, help="golden-vector folder (default: the shipped set)")
    p.add_argument("--no-vectors", action="store_true", help="skip the golden vectors")
    p.add_argument("--seed", type=int_in(0), default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--rounds", type=int_in(0, 10000), default=1,
                   help="random inputs per quant type and dtype (default 1; 0 for none)")
    p.add_argument("--no-time", action="store_true", help="leave the elapsed time out (for reproducible output)")
    p.set_defaults(func=_run)
