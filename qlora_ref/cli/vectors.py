"""``qlora-ref vectors``: regenerate the golden vectors, or list a vector folder.

The vectors themselves (their format, writer and reader) live in ``qlora_ref.conformance.vectors``.
"""

from __future__ import annotations

import math
from pathlib import Path

from qlora_ref.conformance.vectors import (
    ARRAY_DTYPES,
    FORMAT_VERSION,
    read_manifest,
    write_vectors,
)
from qlora_ref.text_table import format_table

__all__ = ["register"]


def _run(args) -> int:
    if args.out is not None and args.dir is not None:
        raise ValueError("--out writes vectors and --dir lists them: give one of the two")
    if args.force and args.out is None:
        raise ValueError("--force only applies to --out")
    if args.out is not None:
        manifest = write_vectors(args.out, force=args.force)
        root = Path(args.out)
        nbytes = sum(p.stat().st_size for p in root.rglob("*.bin"))
        print(f"wrote {len(manifest['cases'])} cases ({nbytes / 1e6:.2f} MB of arrays) and "
              f"manifest.json (format_version {FORMAT_VERSION}) to {root}")
        return 0
    manifest = read_manifest(args.dir)
    rows = []
    for case in manifest["cases"]:
        nbytes = sum(math.prod(e["shape"]) * ARRAY_DTYPES[e["dtype"]].itemsize
                     for e in case["arrays"].values())
        rows.append([case["name"], case["kind"], len(case["arrays"]), nbytes])
    print(format_table(["case", "kind", "arrays", "bytes"], rows,
                       title=f"Golden vectors in {manifest['root']} (format_version {manifest['format_version']})"))
    return 0


def register(subparsers) -> None:
    """Add ``qlora-ref vectors``: regenerate the golden vectors (``--out DIR``) or list them."""
    p = subparsers.add_parser("vectors", help="regenerate the golden vectors (--out DIR) or list the shipped ones")
    p.add_argument("--out", metavar="DIR", help="write the vectors and manifest.json into DIR")
    p.add_argument("--dir", metavar="DIR", default=None, help="list the vectors in DIR (default: the shipped set)")
    p.add_argument("--force", action="store_true",
                   help="with --out: write into a non-empty folder that holds no golden vectors")
    p.set_defaults(func=_run)
