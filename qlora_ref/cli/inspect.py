"""``qlora-ref inspect``: what a 4-bit checkpoint (and a PEFT adapter on it) holds.

Reads with ``qlora_ref.formats.checkpoint`` and ``qlora_ref.formats.peft`` (so every validation of those
readers applies) and prints one table of the 4-bit weights (name, shape, quant type, block size,
double quantization, stored bytes, bits per parameter) and, with an adapter, one of its LoRA
layers (rank, alpha, scaling, DoRA, the base weight it adapts). It warns about layers that
carry signs of bitsandbytes' re-quantization (``layer_warnings``).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from qlora_ref.formats.checkpoint import read_checkpoint
from qlora_ref.formats.peft import match_adapter, read_adapter
from qlora_ref.text_table import format_table

__all__ = ["inspect_checkpoint", "inspect_adapter", "layer_warnings", "register"]


def inspect_checkpoint(ckpt) -> tuple[list, list]:
    """Return ``(headers, rows)`` of a checkpoint's 4-bit weights, sorted by name (numbers as numbers).

    Examples
    --------
    >>> import tempfile, os, numpy as np
    >>> from qlora_ref import quantize_4bit
    >>> from qlora_ref.formats.checkpoint import read_checkpoint, write_checkpoint
    >>> W = np.zeros((64, 256), np.float32)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write_checkpoint(os.path.join(d, "m.safetensors"), {"proj": quantize_4bit(W, double_quant=True)})
    ...     headers, rows = inspect_checkpoint(read_checkpoint(os.path.join(d, "m.safetensors")))
    >>> rows[0][:5]
    ['proj', '64x256', 'nf4', 64, 'yes']
    """
    headers = ["4-bit weight", "shape", "type", "block", "double quant", "stored bytes", "bits/param"]
    rows = []
    for name, layer in sorted(ckpt.layers.items()):
        s = layer.state
        rows.append([name or "(root)", "x".join(str(d) for d in s.shape), s.quant_type, s.blocksize,
                     "yes" if s.double_quant else "no", layer.stored_bytes, float(layer.bits_per_parameter)])
    return headers, rows


def layer_warnings(layer) -> list:
    """Warnings about one 4-bit layer of a checkpoint: signs that bitsandbytes re-quantized it.

    A double-quantized layer whose offset and nested absmax are all exactly bfloat16 values was
    re-quantized from bfloat16 absmax: bitsandbytes' CPU repacking (docs/findings.md) decodes the
    absmax, rounds it to bfloat16 and double-quantizes it again when a ``state_dict()`` is taken
    after an eval forward on an AVX512-BF16 CPU; the weights then differ from the ones loaded.
    (A float32 offset is bfloat16-exact by chance about once in 65536 layers.)

    Returns
    -------
    list of str

    Examples
    --------
    >>> import numpy as np
    >>> from dataclasses import replace
    >>> from qlora_ref import quantize_4bit
    >>> from qlora_ref.formats.checkpoint import Layer4bit
    >>> packed, state = quantize_4bit(np.linspace(-1, 1, 4096, dtype=np.float32), double_quant=True)
    >>> layer = Layer4bit("proj", packed, state, np.dtype(np.uint8), (), 0)
    >>> layer_warnings(layer)
    []
    >>> nested = replace(state.nested, offset=np.float32(0.5), absmax=np.full(1, 0.25, np.float32))
    >>> layer_warnings(Layer4bit("proj", packed, replace(state, nested=nested), np.dtype(np.uint8), (), 0))[0][:60]
    'proj: the offset and nested absmax are all exactly bfloat16 '
    """

    nested = layer.state.nested
    if nested is None or nested.scheme != "bnb":
        return []
    values = np.append(np.asarray(nested.absmax, np.float32).reshape(-1), np.float32(nested.offset))
    bf16 = values.astype(ml_dtypes.bfloat16).astype(np.float32)
    if np.array_equal(values, bf16):
        return [f"{layer.name or '(root)'}: the offset and nested absmax are all exactly bfloat16 values: a sign "
                "that bitsandbytes re-quantized this layer's absmax through bfloat16 (its CPU repacking after an "
                "eval forward on an AVX512-BF16 CPU); the weights may differ from the ones quantized"]
    return []


def inspect_adapter(adapter, ckpt=None) -> tuple[list, list]:
    """Return ``(headers, rows)`` of an adapter's LoRA layers; the base column needs ``ckpt``."""

    bases = match_adapter(adapter, ckpt) if ckpt is not None else {}
    headers = ["LoRA module", "rank", "alpha", "scaling", "DoRA", "in", "out", "base"]
    rows = []
    for module, layer in sorted(adapter.layers.items()):
        rows.append([module, layer.r, float(layer.alpha), float(layer.scaling), "yes" if layer.use_dora else "no",
                     layer.A.shape[1], layer.B.shape[0], bases.get(module, "-")])
    return headers, rows


def _is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def _run(args) -> int:

    path = Path(args.path)
    adapter_path = Path(args.adapter) if args.adapter else None
    ckpt = None
    if _is_adapter(path) and adapter_path is None and not (path / "model.safetensors").is_file():
        adapter_path = path
    else:
        ckpt = read_checkpoint(path)
    adapter = read_adapter(adapter_path) if adapter_path is not None else None
    tables = []
    if ckpt is not None:
        headers, rows = inspect_checkpoint(ckpt)
        numel = sum(layer.state.numel for layer in ckpt.layers.values())
        stored = sum(layer.stored_bytes for layer in ckpt.layers.values())
        other = sum(int(a.nbytes) for a in ckpt.tensors.values())
        summary = (f"{len(ckpt.layers)} 4-bit weights, {numel} parameters in {stored} bytes"
                   + (f" ({8 * stored / numel:.3f} bits/param)" if numel else "")
                   + f"; {len(ckpt.tensors)} other tensors in {other} bytes")
        if not ckpt.layers:
            summary = (f"no 4-bit weights: {path} holds {len(ckpt.tensors)} other tensors in {other} bytes "
                       "(a 16-bit checkpoint, or not a QLoRA one)")
        tables.append(("checkpoint", headers, rows, summary))
    if adapter is not None:
        headers, rows = inspect_adapter(adapter, ckpt)
        c = adapter.config
        summary = (f"{len(adapter.layers)} adapted modules; r={c.get('r')}, lora_alpha={c.get('lora_alpha')}, "
                   f"use_rslora={bool(c.get('use_rslora', False))}, use_dora={bool(c.get('use_dora', False))}")
        tables.append(("adapter", headers, rows, summary))
    warnings = [w for layer in (ckpt.layers.values() if ckpt is not None else ()) for w in layer_warnings(layer)]
    status = 1 if ckpt is not None and not ckpt.layers else 0  # nothing 4-bit to inspect
    if args.json:
        result = {kind: {"rows": [dict(zip(h, r)) for r in rows], "summary": summary}
                  for kind, h, rows, summary in tables}
        result["warnings"] = warnings
        print(json.dumps(result, indent=2))
        return status
    out = []
    for kind, headers, rows, summary in tables:
        title = f"{'Checkpoint ' + str(path) if kind == 'checkpoint' else 'Adapter ' + str(adapter_path)}"
        text_rows = [[f"{c:.4g}" if isinstance(c, float) else c for c in row] for row in rows]
        out += ([format_table(headers, text_rows, title=title)] if rows else [title]) + [summary, ""]
    out += [f"warning: {w}" for w in warnings]
    print("\n".join(out).rstrip())
    return status


def register(subparsers) -> None:
    """Add ``qlora-ref inspect``."""
    p = subparsers.add_parser("inspect", help="list the 4-bit weights of a checkpoint and the LoRA layers of an adapter",
                              description="PATH: a safetensors file, a checkpoint folder (sharded or not) or a PEFT "
                                          "adapter folder.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT adapter folder to match against the checkpoint")
    p.add_argument("--json", action="store_true", help="print the tables as JSON")
    p.set_defaults(func=_run)
