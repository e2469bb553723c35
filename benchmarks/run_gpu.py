"""The whole GPU benchmark as one command: ``python -m benchmarks.run_gpu --out DIR``.

Runs every case of ``benchmarks/cases.py`` on CUDA (all shapes, decode dtypes, 1/4/16-row
products, the layer at 512 to 4096 tokens, memory), each provider checked against the oracle
first, then all providers of a case timed together with CUDA events, the L2 cache flushed
before every timed call and the provider order rotated each round (Note: how a time is taken,
``benchmarks/timing.py``); medians with 20%/80% quantiles. Host launch gaps are kept out of the
device time: each call is replayed from a CUDA graph where it can be captured (``--no-graphs``
turns that off) and always follows a ``torch.cuda._sleep`` head start; the host's wall time per
call is recorded beside it (``host_s``), and ``time_s.method`` says which way a call was timed.
Warm-up calls come first, so compilation is never timed. The small-batch product is judged
against a read-only stream (the ``read`` ceiling, ``pct_read``), the memory-bound cases against
the copy. Every provider runs its default configuration (no sweep here: the sweep is
``benchmarks/cuda_check.py``'s, and it is never what a target is judged on). It leaves in ``DIR``:

- ``gpu-<date>.json``: the results (``benchmarks/results.py``, Note: results format);
- ``benchmarks.md`` and ``bench_*.png``: the tables and figures ``docs/scripts/benchmark_pages.py``
  makes from that file (copy the JSON to ``benchmarks/results/`` and rerun that script to
  update ``docs/benchmarks.md``).

Then the FSDP2 case (``benchmarks/fsdp.py``): a QLoRA training step of llama-2-70b's shapes (2
layers) sharded over every visible GPU, step time and peak memory per rank, in
``DIR/fsdp-<date>.json`` (``--no-fsdp`` skips it).

Budget: ``--quick`` (the shapes ``QUICK_SHAPES``, 4096x14336 first, 512 and 4096 tokens, 10
timed rounds, no FSDP case) is meant to finish in under 5 minutes on one H100 or H200; the
results record the wall time (``wall_s``). The oracle's checks run on the host CPU; compiled
torchao runs at the first shape only unless ``--compile-all``. Without CUDA it exits with
status 2 and says so; ``--device cpu`` runs the same machinery on the CPU as a dry run (for
testing the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The shapes of ``--quick``: the shape of the issue's targets, and the irregular one.
QUICK_SHAPES = ("4096x14336", "1823x781")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the results JSON, tables and figures")
    p.add_argument("--shapes", default="", help="comma-separated shape keys (default: all)")
    p.add_argument("--quick", action="store_true",
                   help=f"shapes {', '.join(QUICK_SHAPES)} (unless --shapes), 512 and 4096 tokens, 10 timed rounds, "
                        "no FSDP case: under 5 minutes on one H100/H200")
    p.add_argument("--no-graphs", action="store_true", help="never capture CUDA graphs (head start only)")
    p.add_argument("--reps", type=int, default=0, help="timed rounds per provider (default 20, quick 10)")
    p.add_argument("--compile-all", action="store_true", help="compiled variants at every shape (slow to compile)")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile variants")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu is a dry run of the machinery")
    p.add_argument("--no-fsdp", action="store_true", help="skip the FSDP2 training-step case")
    return p.parse_args(argv)


def shape_keys(args, known) -> list:
    """The shapes to run: ``--shapes``, else ``QUICK_SHAPES`` for ``--quick``, else all of ``known``.

    Examples
    --------
    >>> known = {"4096x4096": 0, "4096x14336": 0, "1823x781": 0}
    >>> shape_keys(parse_args(["--out", "o", "--quick"]), known)
    ['4096x14336', '1823x781']
    >>> shape_keys(parse_args(["--out", "o"]), known)
    ['4096x4096', '4096x14336', '1823x781']
    >>> shape_keys(parse_args(["--out", "o", "--quick", "--shapes", "4096x4096"]), known)
    ['4096x4096']
    """
    if args.shapes:
        return args.shapes.split(",")
    return list(QUICK_SHAPES) if args.quick else list(known)


class Runner:
    """Checks, times and records the cases of one device (see the module docstring)."""

    def __init__(self, args):
        import torch

        from benchmarks.cases import Workspace
        from benchmarks.timing import L2Flush

        self.args = args
        self.device = torch.device(args.device)
        self.ws = Workspace(self.device)
        self.flush = L2Flush(self.device) if self.device.type == "cuda" else None
        self.reps = args.reps or (10 if args.quick else 20)
        self.records, self.skipped = [], []
        self.memory = {"stored": [], "layer": [], "stored_skipped": []}
        self.start = time.perf_counter()
        self.ceilings = None

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {text}", flush=True)

    def time(self, fns: dict) -> dict:
        from benchmarks.timing import time_cpu, time_cuda_interleaved

        if self.device.type == "cuda":
            try:
                return time_cuda_interleaved(fns, reps=self.reps, warmup=2, flush=self.flush,
                                             graphs=not self.args.no_graphs)
            except Exception as exc:  # one provider failing while timed: time the others apart
                self.say(f"interleaved timing failed ({type(exc).__name__}: {str(exc)[:120]}); timing one by one")
                out = {}
                for name, fn in fns.items():
                    try:
                        out.update(time_cuda_interleaved({name: fn}, reps=self.reps, warmup=2, flush=self.flush,
                                                         graphs=not self.args.no_graphs))
                    except Exception as inner:
                        self.skipped.append({"op": "timing", "provider": name, "shape": "",
                                             "reason": f"failed: {type(inner).__name__}: {str(inner)[:300]}"})
                return out
        return {name: time_cpu(fn, repeat=3, warmup=0) for name, fn in fns.items()}

    def group(self, cases: list) -> None:
        """Check every provider of one case, then time those that passed, interleaved."""
        from benchmarks.results import make_record

        ready = {}
        for case in cases:
            if case.skip:
                self.skipped.append({"op": case.op, "provider": case.label, "shape": case.shape_key, **case.params,
                                     "reason": case.skip})
                continue
            try:
                check = case.check()
            except Exception as exc:  # recorded and not timed: a wrong answer (or none) has no speed
                what = "check against the oracle failed" if isinstance(exc, AssertionError) else "failed"
                reason = f"{what}: {type(exc).__name__}: {str(exc)[:300]}"
                self.skipped.append({"op": case.op, "provider": case.label, "shape": case.shape_key, **case.params,
                                     "reason": reason})
                self.say(f"{case.group} {case.label}: {reason[:200]}")
                continue
            ready[case.label] = (case, check)
        if not ready:
            return
        timings = self.time({label: case.fn for label, (case, _) in ready.items()})
        for label, (case, check) in ready.items():
            if label in timings:
                self.records.append(make_record(case, timings[label], check))
        first = next(iter(ready.values()))[0]
        self.say(f"{first.group}: " + ", ".join(
            f"{label} {t.median_s * 1e3:.3f} ms" + (f" (host {t.host_median_s * 1e3:.3f} ms, {t.method})"
                                                    if t.host_median_s is not None else "")
            for label, t in timings.items()))

    def guarded(self, what: str, fn) -> None:
        """Run a measurement; an exception is recorded (and printed) instead of ending the run."""
        try:
            fn()
        except Exception as exc:
            reason = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            self.skipped.append({"op": "memory", "provider": what, "shape": "", "reason": reason})
            self.say(f"{what}: {reason[:200]}")

    def providers(self, op: str, index: int) -> list:
        from benchmarks.cases import PROVIDERS

        labels = list(PROVIDERS[op])
        if self.args.no_compile or (index > 0 and not self.args.compile_all):
            dropped = [p for p in labels if p.endswith("+compile")]
            labels = [p for p in labels if p not in dropped]
            for label in dropped:
                self.skipped.append({"op": op, "provider": label, "shape": "*",
                                     "reason": "compiled variants run at the first shape only (--compile-all)"})
        return labels

    def run(self) -> dict:
        import torch

        from benchmarks import cases
        from benchmarks.ceilings import measure_ceilings
        from benchmarks.checks import CHECK_ELEMENTS
        from benchmarks.memory_model import layer_memory, stored_format_rows
        from benchmarks.results import results_document

        self.ceilings = measure_ceilings(self.device)
        c = self.ceilings
        self.say(f"ceilings: copy {c['copy']['gbps']:.4g} GB/s, read {c['read']['gbps']:.4g} GB/s, "
                 f"{c['matmul']['dtype']} matmul "
                 f"{c['matmul']['tflops']:.4g} TFLOP/s")
        keys = shape_keys(self.args, cases.SHAPES)
        tokens = (512, 4096) if self.args.quick else cases.LAYER_TOKENS
        for index, key in enumerate(keys):
            if key not in cases.SHAPES:
                raise SystemExit(f"unknown shape {key!r}; known: {', '.join(cases.SHAPES)}")
            ws = self.ws
            self.say(f"shape {key}")
            self.group([cases.make_quantize(ws, p, key) for p in self.providers("quantize", index)])
            for dtype in cases.DECODE_DTYPES:
                self.group([cases.make_decode(ws, p, key, dtype) for p in self.providers("decode", index)])
            for rows in cases.MATMUL_ROWS:
                self.group([cases.make_matmul(ws, p, key, rows) for p in self.providers("matmul", index)])
            for t in tokens:
                layer_cases = [cases.make_layer(ws, p, key, t) for p in self.providers("layer", index)]
                self.group(layer_cases)
                if t in (tokens[0], tokens[-1]):
                    for case in layer_cases:
                        if not case.skip:
                            self.guarded(f"layer memory {key} {case.label} {t}",
                                         lambda case=case: self.memory["layer"].append(layer_memory(case, ws)))
                del layer_cases
            def stored(key=key):
                rows, skipped = stored_format_rows(ws.weight(key), key, oracle_limit=CHECK_ELEMENTS)
                self.memory["stored"].extend(rows)
                self.memory["stored_skipped"].extend({"shape": key, "what": w, "reason": r} for w, r in skipped)

            self.guarded(f"stored bytes {key}", stored)
            ws.release(key)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        kind = "gpu" if self.device.type == "cuda" else "cpu-dry-run"
        ceilings = [self.ceilings, measure_ceilings(self.device)]  # start and end: the best is the ceiling
        return results_document(kind, self.device, ceilings, self.records, self.skipped, self.memory,
                                time.perf_counter() - self.start,
                                options={"runner": "benchmarks.run_gpu", "reps": self.reps, "quick": self.args.quick,
                                         "graphs": not self.args.no_graphs,
                                         "shapes": keys, "compile_all": self.args.compile_all,
                                         "no_compile": self.args.no_compile})


def _pages_module():
    path = ROOT / "docs" / "scripts" / "benchmark_pages.py"
    spec = importlib.util.spec_from_file_location("benchmark_pages", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks.run_gpu: needs a CUDA GPU, and torch.cuda.is_available() is False on this machine "
              f"(torch {torch.__version__}); nothing was run. The CPU suite is `pytest benchmarks/ --quick` "
              "or `python -m benchmarks`.", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.results import write_results

    doc = Runner(args).run()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = write_results(doc, out / f"{'gpu' if doc['kind'] == 'gpu' else 'dry-run'}-{stamp}.json")
    print(f"results: {path}")
    written = _pages_module().render_folder(path, out)
    print("tables and figures:", ", ".join(str(p.name) for p in written))
    failed = [s for s in doc["skipped"] if s["reason"].startswith("check against the oracle failed")]
    if failed:
        print(f"{len(failed)} provider(s) failed their check and were not timed (see 'skipped')", file=sys.stderr)
    fsdp_status = 0
    if args.device.startswith("cuda") and not args.no_fsdp and not args.quick:
        from benchmarks.fsdp import main as fsdp_main

        fsdp_status = fsdp_main(["--out", str(out)])  # spawns one process per GPU
    print(f"done in {doc['wall_s']:.0f} s")
    return 1 if failed or fsdp_status else 0


if __name__ == "__main__":
    sys.exit(main())
