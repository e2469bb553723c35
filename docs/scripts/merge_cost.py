"""What merging a LoRA adapter into a 4-bit base costs: a table made by the oracle.

Run ``python docs/scripts/merge_cost.py`` from the repository root: it prints the table and
writes ``docs/generated/merge_cost.md`` (included by ``docs/lora.md``). Nothing in it is typed by
hand.

Set-up: a 512x512 weight with standard deviation 0.02 (the scale of a pretrained transformer's
linear layers) quantized with block 64; an adapter of rank 16 with alpha 32 (``s = 2``), ``A``
from PEFT's Kaiming-uniform initialisation and ``B`` Gaussian, scaled so that the update
``s B A`` has a chosen RMS relative to the weight's. ``merge_error`` decodes the base, adds the
update, re-quantizes with the same format, and compares with the exact merged weight.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from qlora_ref import dequantize_4bit, lora_init, merge_error, quantize_4bit

DOCS = Path(__file__).resolve().parents[1]
SEED = 0
SHAPE = (512, 512)  # (out, in)
WEIGHT_STD = 0.02
RANK, ALPHA = 16, 32
BLOCKSIZE = 64
UPDATE_RATIOS = (0.001, 0.01, 0.1)  # RMS of s B A over RMS of W


def _md_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def _adapter(rng, ratio: float, w_rms: float):
    """A (r, in), B (out, r) and s with RMS(s B A) = ratio * w_rms exactly."""
    out_features, in_features = SHAPE
    A, _ = lora_init(in_features, out_features, RANK, rng=rng)
    B = rng.standard_normal((out_features, RANK))
    s = ALPHA / RANK
    update_rms = float(np.sqrt(np.mean((s * (B @ A)) ** 2)))
    return A, B * (ratio * w_rms / update_rms), s


def merge_cost_table() -> str:
    """Error of merging into NF4 / FP4, with and without double quantization, per update size."""
    rng = np.random.default_rng(SEED)
    W = (rng.standard_normal(SHAPE) * WEIGHT_STD).astype(np.float32)  # (out, in)
    rows = []
    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            packed, state = quantize_4bit(W, blocksize=BLOCKSIZE, quant_type=quant_type, double_quant=double_quant)
            W4 = dequantize_4bit(packed, state).astype(np.float64)
            w_rms = float(np.sqrt(np.mean(W4**2)))
            first = float(np.sqrt(np.mean((W4 - W.astype(np.float64)) ** 2))) / w_rms
            for ratio in UPDATE_RATIOS:
                A, B, s = _adapter(np.random.default_rng(SEED + 1), ratio, w_rms)
                report = merge_error(packed, state, A, B, s)
                rows.append([
                    quant_type.upper(), "yes" if double_quant else "no", f"{ratio:g}",
                    f"{first:.4f}", f"{report['rms'] / w_rms:.4f}", f"{report['relative_to_update']:.2f}",
                    f"{report['max_abs'] / w_rms:.3f}", f"{100 * report['codes_changed']:.1f}%",
                ])
    headers = [
        "type", "double quant", "update RMS / W RMS", "quantizing W: error RMS / W RMS",
        "merging: error RMS / W RMS", "merging: error / update (Frobenius)", "merging: max error / W RMS",
        "codes changed",
    ]
    return _md_table(headers, rows)


GENERATED = {"merge_cost.md": merge_cost_table}


def main(argv=None) -> int:
    (DOCS / "generated").mkdir(exist_ok=True)
    for name, make in GENERATED.items():
        text = make()
        (DOCS / "generated" / name).write_text(text)
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
