"""The NumPy oracle against bitsandbytes' CPU path, timed side by side in one run.

Run: ``python benchmarks/bench_oracle_cpu.py [--repeat 5] [--out oracle_cpu.json]``

Cases (NF4, block 64, double quantization, as a QLoRA base weight is stored):

1. quantize a 4096x4096 float32 matrix (bitsandbytes: ``quantize_4bit(...,
   compress_statistics=True)``);
2. dequantize that state to float32 and to bfloat16 (bitsandbytes: ``dequantize_4bit``; both
   sides reconstruct the double-quantized absmax first);
3. quantize and decode a 4096x11008 matrix (a 7B model's MLP), oracle only: seconds.

Targets (issue 2): the oracle quantizes at least as fast as bitsandbytes
(``t_bnb / t_oracle >= 1``) and dequantizes at least half as fast (``t_bnb / t_oracle >= 0.5``).

Check, then time: before timing, the oracle's packed bytes must equal bitsandbytes' (first-level
codes; the nested codes are classified with ``qlora_ref.conformance.classify``), and decoding bitsandbytes'
own state with the oracle must give its values bit for bit. Times are medians (with 20% and 80%
quantiles) of ``--repeat`` calls, oracle and bitsandbytes interleaved call by call. Rates:
elements/s, and GB/s from the bytes moved per element (written beside each case below), with a
NumPy copy of 256 MiB measured in the same run as the memory ceiling (bytes moved = 2 * nbytes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from qlora_gpu.state import tensor_to_numpy
from qlora_ref.api import dequantize_4bit, quantize_4bit
from qlora_ref.conformance.classify import classify_nested_codes
from qlora_ref.double_quant import double_quantize
from qlora_ref.formats.bnb import from_bnb_state_dict

BLOCKSIZE = 64
SHAPE = (4096, 4096)
LAYER_SHAPE = (4096, 11008)
# Bytes moved per element (NF4, block 64, double quantization: 0.5 B of codes, 1/64 B of absmax
# codes, 4/(64*256) B of nested absmax; the maps are negligible).
STORED_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
QUANTIZE_BYTES = 4 + STORED_BYTES  # read float32, write the stored form
DEQUANTIZE_BYTES = {"float32": STORED_BYTES + 4, "bfloat16": STORED_BYTES + 2}  # read stored, write output


def median_quantiles(samples: list) -> dict:
    s = np.asarray(samples, dtype=np.float64)
    return {"median_s": float(np.median(s)), "q20_s": float(np.quantile(s, 0.2)),
            "q80_s": float(np.quantile(s, 0.8)), "n": int(s.size)}


def time_interleaved(fns: dict, repeat: int) -> dict:
    """One untimed call of each, then ``repeat`` rounds calling each once in turn."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: median_quantiles(s) for name, s in samples.items()}


def copy_ceiling(repeat: int) -> dict:
    src = np.ones(256 * 2**20, dtype=np.uint8)
    dst = np.empty_like(src)
    t = time_interleaved({"copy": lambda: np.copyto(dst, src)}, repeat)["copy"]
    return {"nbytes": src.nbytes, "bytes_moved": 2 * src.nbytes, "time": t, "gbps": 2 * src.nbytes / t["median_s"] / 1e9}


def check(x: np.ndarray, F, torch) -> dict:
    """Check the oracle against bitsandbytes on the benchmark input (before anything is timed)."""
    p_b, s_b = F.quantize_4bit(torch.from_numpy(x), blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    packed, state = quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=True)
    if not np.array_equal(packed, tensor_to_numpy(p_b)):
        raise SystemExit("check failed: the oracle's packed bytes differ from bitsandbytes'")
    d = {"weight": tensor_to_numpy(p_b), **{"weight." + k: tensor_to_numpy(v) for k, v in s_b.as_dict(packed=True).items()}}
    packed_b, state_b = from_bnb_state_dict(d)
    absmax = tensor_to_numpy(F.quantize_4bit(torch.from_numpy(x), blocksize=BLOCKSIZE, quant_type="nf4")[1].absmax)
    nested = double_quantize(absmax, offset=state_b.nested.offset)
    nested_diff = classify_nested_codes(absmax - nested.offset, nested.codes, state_b.nested.codes)
    if nested_diff.unclassified:
        raise SystemExit(f"check failed: {nested_diff}")
    for name in DEQUANTIZE_BYTES:
        s_b.dtype = getattr(torch, name)
        ours = dequantize_4bit(packed_b, state_b, dtype=name)
        theirs = tensor_to_numpy(F.dequantize_4bit(p_b, s_b)).reshape(ours.shape)
        if ours.tobytes() != theirs.tobytes():
            raise SystemExit(f"check failed: decoding bitsandbytes' state to {name} differs")
    s_b.dtype = torch.float32
    return {"packed": "bit-identical", "decoded_float32_bfloat16": "bit-identical", "nested_codes": str(nested_diff)}


def rates(n: int, bytes_per_element: float, t: dict, copy_gbps: float) -> dict:
    gbps = n * bytes_per_element / t["median_s"] / 1e9  # GB/s = elements * bytes/element / s
    return {"elements_per_s": n / t["median_s"], "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps}


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("numpy", "ml_dtypes", "torch", "bitsandbytes", "qlora-ref"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                        "python": sys.version.split()[0]}, "versions": versions}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per case and provider")
    parser.add_argument("--out", default="", help="write the results as JSON to this path")
    args = parser.parse_args(argv)

    import bitsandbytes.functional as F
    import torch

    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    n = x.size
    result = {**environment(), "torch_threads": torch.get_num_threads(), "blocksize": BLOCKSIZE}
    result["check"] = check(x, F, torch)
    result["ceiling_copy"] = copy_ceiling(args.repeat)
    copy_gbps = result["ceiling_copy"]["gbps"]

    records = []
    x_t = torch.from_numpy(x)
    t = time_interleaved({
        "oracle": lambda: quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=True),
        "bnb": lambda: F.quantize_4bit(x_t, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True),
    }, args.repeat)
    for provider, timing in t.items():
        records.append({"op": "quantize", "provider": provider, "shape": SHAPE, "dtype": "float32",
                        "time": timing, **rates(n, QUANTIZE_BYTES, timing, copy_gbps)})
    ratios = {"quantize": t["bnb"]["median_s"] / t["oracle"]["median_s"]}

    packed, state = quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=True)
    p_b, s_b = F.quantize_4bit(x_t, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    for out in DEQUANTIZE_BYTES:
        s_b.dtype = getattr(torch, out)
        t = time_interleaved({
            "oracle": lambda: dequantize_4bit(packed, state, dtype=out),
            "bnb": lambda: F.dequantize_4bit(p_b, s_b),
        }, args.repeat)
        for provider, timing in t.items():
            records.append({"op": f"dequantize->{out}", "provider": provider, "shape": SHAPE, "dtype": out,
                            "time": timing, **rates(n, DEQUANTIZE_BYTES[out], timing, copy_gbps)})
        ratios[f"dequantize->{out}"] = t["bnb"]["median_s"] / t["oracle"]["median_s"]

    layer = np.random.default_rng(1).standard_normal(LAYER_SHAPE).astype(np.float32)
    t0 = time.perf_counter()
    packed_l, state_l = quantize_4bit(layer, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=True)
    t1 = time.perf_counter()
    dequantize_4bit(packed_l, state_l, dtype="bfloat16")
    t2 = time.perf_counter()
    result["layer_4096x11008"] = {"quantize_s": t1 - t0, "dequantize_bfloat16_s": t2 - t1}

    targets = {"quantize": (ratios["quantize"], 1.0)}
    targets.update({op: (r, 0.5) for op, r in ratios.items() if op.startswith("dequantize")})
    result.update(records=records, ratios=ratios,
                  targets={op: {"ratio": r, "target": goal, "holds": r >= goal} for op, (r, goal) in targets.items()})

    print(f"{result['machine']['cpu']}, {result['machine']['cores']} cores; torch threads {result['torch_threads']}; "
          f"NumPy {result['versions']['numpy']}, bitsandbytes {result['versions']['bitsandbytes']}")
    print(f"check: {result['check']}")
    print(f"ceiling: NumPy copy of 256 MiB, {copy_gbps:.2f} GB/s (read + write)")
    print(f"{'op':<22}{'provider':<9}{'median ms':>10}{'q20-q80 ms':>16}{'Melem/s':>10}{'GB/s':>8}{'% copy':>8}")
    for r in records:
        tm = r["time"]
        spread = f"{1e3 * tm['q20_s']:.1f}-{1e3 * tm['q80_s']:.1f}"
        print(f"{r['op']:<22}{r['provider']:<9}{1e3 * tm['median_s']:>10.1f}{spread:>16}"
              f"{r['elements_per_s'] / 1e6:>10.1f}{r['gbps']:>8.2f}{r['pct_copy']:>8.1f}")
    for op, v in result["targets"].items():
        print(f"target {op}: t_bnb / t_oracle = {v['ratio']:.2f} (needs >= {v['target']}): "
              f"{'holds' if v['holds'] else 'DOES NOT HOLD'}")
    lay = result["layer_4096x11008"]
    print(f"4096x11008 NF4 + double quantization, oracle: quantize {lay['quantize_s']:.2f} s, "
          f"decode to bfloat16 {lay['dequantize_bfloat16_s']:.2f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"results written to {args.out}")
    return result


if __name__ == "__main__":
    main()
