"""Will it fit? The calculator's peak against a GPU's memory, and the largest batch that fits.

Pairs with ``qlora_ref.memory.model`` (``estimate_memory``: the peak of one training step on
each GPU; Note: the peak of a training step) and ``qlora_ref.cli.memory`` (``qlora-ref memory
--gpu 24GB``, which prints what this module returns).

Note: GPU sizes and the reserve
    A card sold as "24 GB" or "80 GB" holds about that many GiB (an RTX 4090 reports 24,564 MiB,
    an A100 80GB 81,920 MiB), so ``parse_size`` reads "GB" as GiB; "GiB", "MiB", "MB" and plain
    bytes are read as written. Not all of it is for tensors: the CUDA context (the driver's and
    the runtime's state, the loaded kernels of torch, cuBLAS and bitsandbytes) and the caching
    allocator's unused cached blocks and fragmentation take their share before and during
    training. ``RESERVE_BYTES`` sets that share apart. It is a choice, not a measurement made
    here: the context is commonly 0.3 to 0.6 GiB with CUDA's lazy kernel loading, and the
    allocator's overhead depends on the workload; the reserve is an option (``--reserve``) so
    that a user who measured their own can use it.
"""

from __future__ import annotations

import re
from dataclasses import replace

from qlora_ref.memory.model import FinetuneSetup, ModelShape, estimate_memory

__all__ = ["RESERVE_BYTES", "SEQ_LENS", "BATCH_SIZES", "parse_size", "fit_verdict", "largest_fits"]

#: Bytes of a GPU set apart for the CUDA context and the caching allocator (Note: GPU sizes and the reserve).
RESERVE_BYTES = 2**30
#: Sequence lengths and micro-batch sizes the fit sweep tries.
SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": 2**30, "gib": 2**30,
          "tb": 2**40, "tib": 2**40}


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from a size such as ``"24GB"``, ``"80 GiB"``, ``"512MiB"`` or ``"1000000"``.

    "GB" and "TB" are read as GiB and TiB, as GPU memory is labelled (Note: GPU sizes and the
    reserve); "MB" and "kB" as written (10^6, 10^3).

    Raises
    ------
    ValueError
        If ``text`` is not a non-negative number with one of those units.

    Examples
    --------
    >>> parse_size("24GB") == 24 * 2**30, parse_size("1.5 GiB"), parse_size("512MiB")
    (True, 1610612736, 536870912)
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string such as '24GB', got {type(text).__name__}")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{what} {text!r} is not a size: write a number and a unit, such as 24GB, 80GiB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def fit_verdict(model: ModelShape, setup: FinetuneSetup, gpu_bytes: int, *, reserve_bytes: int = RESERVE_BYTES) -> dict:
    """Whether one training step of ``setup`` fits each GPU of ``gpu_bytes``, and by how much.

    The peak that must fit is ``resident_bytes`` (paged optimizer state can move to CPU RAM
    when the GPU runs short), plus ``reserve_bytes``.

    Returns
    -------
    dict
        ``fits`` (bool), ``peak_bytes``, ``resident_bytes``, ``paged_bytes``, ``cpu_bytes``,
        ``gpu_bytes``, ``reserve_bytes``, ``usable_bytes``, ``margin_bytes`` (negative when it
        does not fit), ``peak_phase``.

    Examples
    --------
    >>> from qlora_ref.memory import model_shape
    >>> fit_verdict(model_shape("llama-2-70b"), FinetuneSetup(), 24 * 2**30)["fits"]
    False
    """
    for value, what in ((gpu_bytes, "gpu_bytes"), (reserve_bytes, "reserve_bytes")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    breakdown = estimate_memory(model, setup)
    usable = gpu_bytes - reserve_bytes
    return {
        "fits": breakdown.resident_bytes <= usable,
        "peak_bytes": breakdown.total_bytes,
        "resident_bytes": breakdown.resident_bytes,
        "paged_bytes": breakdown.total_bytes - breakdown.resident_bytes,
        "cpu_bytes": breakdown.cpu_bytes,
        "gpu_bytes": gpu_bytes,
        "reserve_bytes": reserve_bytes,
        "usable_bytes": usable,
        "margin_bytes": usable - breakdown.resident_bytes,
        "peak_phase": breakdown.peak_phase,
    }


def largest_fits(model: ModelShape, setup: FinetuneSetup, gpu_bytes: int, *, reserve_bytes: int = RESERVE_BYTES,
                 seq_lens=SEQ_LENS, batch_sizes=BATCH_SIZES) -> list:
    """For each sequence length, with checkpointing on and off, the largest micro-batch that fits.

    Memory grows with the batch, so the sweep stops at the first batch that does not fit.

    Returns
    -------
    list of dict
        ``{"gradient_checkpointing", "seq_len", "batch_size" (0 if not even one fits),
        "tokens", "resident_bytes", "margin_bytes"}``, checkpointing on first.

    Examples
    --------
    >>> from qlora_ref.memory import model_shape
    >>> rows = largest_fits(model_shape("llama-2-7b"), FinetuneSetup(), 24 * 2**30, seq_lens=(2048,))
    >>> [(r["gradient_checkpointing"], r["batch_size"]) for r in rows]
    [(True, 8), (False, 1)]
    """
    rows = []
    for checkpointing in (True, False):
        for seq_len in seq_lens:
            best = None
            for batch in batch_sizes:
                trial = replace(setup, batch_size=batch, seq_len=seq_len, gradient_checkpointing=checkpointing)
                verdict = fit_verdict(model, trial, gpu_bytes, reserve_bytes=reserve_bytes)
                if not verdict["fits"]:
                    break
                best = (batch, verdict)
            batch, verdict = best if best else (0, None)
            rows.append({"gradient_checkpointing": checkpointing, "seq_len": seq_len, "batch_size": batch,
                         "tokens": batch * seq_len,
                         "resident_bytes": verdict["resident_bytes"] if verdict else None,
                         "margin_bytes": verdict["margin_bytes"] if verdict else None})
    return rows
