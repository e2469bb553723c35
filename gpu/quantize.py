"""Blockwise 4-bit quantization and decoding on torch tensors (NF4, FP4, INT4), two backends.

Fast pair of ``qlora_ref.blockwise`` and ``qlora_ref.double_quant``: same names, same
signatures on tensors, same bits. Every rounding decision is the oracle's Note: quantization
semantics and Note: nested encoding rule; this module does not restate them, it follows them.

Public API
----------
``quantize_4bit(t, *, blocksize=64, quant_type="nf4", double_quant=False, backend="auto")``
    -> ``(packed, state)``: ``packed`` uint8 of shape ``((n + 1) // 2, 1)`` on ``t``'s device,
    ``state`` a ``qlora_gpu.QuantState``. ``double_quant``: False or True/"bnb".
``dequantize_4bit(packed, state, *, dtype=None, backend="auto")``
    -> tensor of ``state.shape`` in ``dtype`` (default ``state.dtype``; float64 allowed).
``double_quantize(absmax, *, blocksize=256, offset=None)`` -> ``NestedAbsmax``;
``dequantize_absmax(nested)`` -> float32 absmax.
``pack_4bit``, ``unpack_4bit``: the nibble layout (first element in the high nibble).

Backends: ``"torch"`` (plain torch ops, any device), ``"triton"`` (the kernels of
``qlora_gpu.kernels.quantize`` and ``qlora_gpu.kernels.dequantize``: CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``), ``"auto"`` (Triton for CUDA tensors, torch otherwise).

Note: the double-quantization offset
    The oracle's offset is the float64 mean of the absmax, rounded once to float32. Here it is
    ``float32(sum(float64(absmax)) / n)`` computed by torch. Where the float64 sum is exact (any
    set of absmax whose exponents span less than about 29 binades, which is every real weight),
    the two agree bit for bit; otherwise the summation order could move the float64 mean by an
    ulp, which changes the float32 offset only if it sits within that ulp of a rounding tie.
"""

from __future__ import annotations

import os
import sys

import torch

from qlora_gpu import codebooks
from qlora_gpu.state import (
    BLOCKSIZES,
    DTYPES,
    QUANT_TYPES,
    NestedAbsmax,
    QuantState,
    torch_dtype,
)

__all__ = [
    "quantize_4bit",
    "dequantize_4bit",
    "double_quantize",
    "dequantize_absmax",
    "pack_4bit",
    "unpack_4bit",
    "resolve_backend",
]

_NESTED_BLOCKSIZE = 256


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return ``"torch"`` or ``"triton"`` for a requested backend and a tensor's device.

    Raises
    ------
    ValueError
        If the backend is unknown, or Triton is asked for on a CPU tensor without the
        interpreter (``TRITON_INTERPRET=1``).

    Examples
    --------
    >>> resolve_backend("auto", torch.device("cpu"))
    'torch'
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'torch' or 'triton'")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return backend


def _check_input(t, finite: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES.values():
        raise TypeError(f"t has dtype {t.dtype}; expected float32, float16 or bfloat16")
    if t.numel() == 0:
        raise ValueError("t is empty: there is nothing to quantize")
    if t.ndim == 0:
        raise ValueError("t is 0-d: bitsandbytes cannot store the shape () of a 4-bit state; reshape it to (1,)")
    if t.is_meta:
        raise ValueError("t is a meta tensor (no data): materialize it (e.g. module.to_empty(device=...) and "
                         "load its weights) before quantizing")
    t = t.detach()  # quantization is not differentiable; the codes never carry a gradient
    return _check_finite(t) if finite else t


def _check_finite(t: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite.reshape(-1))[0])
        raise ValueError(
            f"t holds {int((~finite).sum())} NaN or Inf values (first at flat index {bad}); "
            "4-bit formats cannot store them"
        )
    return t


def _check_options(blocksize, quant_type, double_quant) -> bool:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not allowed; use one of {BLOCKSIZES}")
    if not isinstance(quant_type, str) or quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {QUANT_TYPES}")
    if double_quant == "torchao":
        raise ValueError("qlora_gpu implements bitsandbytes' double quantization only (double_quant=True)")
    if double_quant not in (False, None, True, "bnb"):
        raise ValueError(f"double_quant must be False, True or 'bnb', got {double_quant!r}")
    return double_quant in (True, "bnb")


def pack_4bit(codes: torch.Tensor, quant_type: str = "nf4") -> torch.Tensor:
    """Pack 4-bit codes two per byte, the first in the high nibble.

    Fast pair of ``qlora_ref.blockwise.pack_4bit``.

    Parameters
    ----------
    codes : Tensor, shape (n,), uint8 (or any integer dtype) in 0..15
    quant_type : str
        Decides the pad code of an odd count (the code of 0.0).

    Returns
    -------
    Tensor, shape ((n + 1) // 2, 1), uint8

    Examples
    --------
    >>> pack_4bit(torch.tensor([1, 2, 3], dtype=torch.uint8)).ravel().tolist() == [0x12, 0x37]
    True
    """
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        pad = torch.full((1,), codebooks.ZERO_CODES[quant_type], dtype=torch.uint8, device=codes.device)
        codes = torch.cat([codes, pad])
    return ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Unpack ``n`` 4-bit codes (uint8) from bytes, the first code in the high nibble.

    Fast pair of ``qlora_ref.blockwise.unpack_4bit``.

    Examples
    --------
    >>> unpack_4bit(torch.tensor([[0x12], [0x37]], dtype=torch.uint8), 3).tolist()
    [1, 2, 3]
    """
    flat = packed.reshape(-1)
    codes = torch.empty(2 * flat.numel(), dtype=torch.uint8, device=flat.device)
    torch.bitwise_right_shift(flat, 4, out=codes[0::2])
    torch.bitwise_and(flat, 0x0F, out=codes[1::2])
    return codes[:n]


def _blocks(x_flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """View a flat tensor as (n_blocks, blocksize), zero-padding the partial last block."""
    pad = -x_flat.numel() % blocksize
    if pad:
        x_flat = torch.nn.functional.pad(x_flat, (0, pad))
    return x_flat.reshape(-1, blocksize)


#: Elements per step of the CPU loops (whole blocks): small enough that the intermediates of a
#: step stay in the cache and torch runs each op without a thread hand-off, which on a few
#: shared cores costs more than the op. Measured on 2 shared AVX2 cores at 4096x4096: 2^17 to
#: 2^19 are alike, 2^15 and below lose to the per-op overhead, one step (no loop) to memory
#: traffic and page faults. On other devices a step is large (few launches), bounded only to
#: cap the scratch memory (about 23 bytes per element of a step).
_CPU_QUANTIZE_STEP = 1 << 18
_CPU_DECODE_STEP = 1 << 18
_DEVICE_STEP = 1 << 26


def _step(device: torch.device, elements: int, blocksize: int, total: int) -> int:
    if device.type != "cpu":
        elements = _DEVICE_STEP
    return max(elements // blocksize, 1) * blocksize


class _Scratch:
    """Buffers of one step, reused across steps: a fresh large tensor per op costs page faults
    (on CPU more than the op itself)."""

    def __init__(self, m: int, device: torch.device):
        self.x = torch.empty(m, dtype=torch.float32, device=device)  # the step's input as float32
        self.s = torch.empty(m, dtype=torch.float32, device=device)  # |x|, then the scaled values
        self.index = torch.empty(m, dtype=torch.int32, device=device)
        self.entry = torch.empty(m, dtype=torch.int64, device=device)
        self.above = torch.empty(m, dtype=torch.bool, device=device)
        self.codes = torch.empty(m, dtype=torch.uint8, device=device)
        self.high = torch.empty(m // 2, dtype=torch.uint8, device=device)


def _encode(s: torch.Tensor, table: torch.Tensor, scratch: _Scratch | None = None) -> torch.Tensor:
    """Codes (uint8) of scaled values ``s`` (flat float32): Note: the encoder's lookup table."""
    m = s.numel()
    if scratch is None:
        scratch = _Scratch(m, s.device)
    high = 1 if sys.byteorder == "little" else 0
    index = scratch.index[:m]
    index.copy_(s.view(torch.uint16)[high::2])  # the upper 16 bits of each float32
    entry = torch.index_select(table, 0, index, out=scratch.entry[:m])  # (m,) int64
    above = torch.gt(s, entry.view(torch.float32)[0::2], out=scratch.above[:m])  # NaN compares False
    as_bytes = entry.view(torch.uint8).view(-1, 8)
    return torch.where(above, as_bytes[:, 5], as_bytes[:, 4], out=scratch.codes[:m])


def _pack_into(codes: torch.Tensor, out: torch.Tensor, scratch: _Scratch | None = None) -> None:
    even = codes[0::2] << 4 if scratch is None else torch.bitwise_left_shift(
        codes[0::2], 4, out=scratch.high[: codes.numel() // 2])
    torch.bitwise_or(even, codes[1::2], out=out)


def _quantize_torch(t: torch.Tensor, blocksize: int, quant_type: str):
    n = t.numel()
    x = t.reshape(-1)
    table = codebooks.encode_table(quant_type, t.device)
    zero = codebooks.ZERO_CODES[quant_type]
    n_full = n // blocksize * blocksize
    full = x[:n_full].view(-1, blocksize)  # (n_full_blocks, blocksize): the partial block apart
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=t.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=t.device)
    step = _step(t.device, _CPU_QUANTIZE_STEP, blocksize, n_full)
    scratch = _Scratch(min(step, n_full), t.device) if n_full else None
    for start in range(0, n_full, step):  # absmax, scale, encode and pack, a step at a time
        stop = min(start + step, n_full)
        rows = slice(start // blocksize, stop // blocksize)
        xf = scratch.x[: stop - start].view(-1, blocksize)
        xf.copy_(full[rows])  # exact conversion to float32
        magnitude = torch.abs(xf, out=scratch.s[: stop - start].view(-1, blocksize))
        torch.amax(magnitude, dim=1, out=absmax[rows])
        s = torch.mul(xf, torch.reciprocal(absmax[rows])[:, None], out=magnitude).view(-1)  # float32 multiply
        _pack_into(_encode(s, table, scratch), packed[start // 2 : stop // 2], scratch)
    if n_full < n:
        absmax[-1] = x[n_full:].abs().amax()
    if not bool(torch.isfinite(absmax).all()):  # max |x| propagates NaN and Inf: no separate pass
        _check_finite(t)
    # float32 1/absmax (IEEE division); inf for a zero block (and for absmax below 2^-128)
    reciprocal = torch.reciprocal(absmax)
    # Step 5: a zero scales to +-0, which the table sends to the zero code, except where the
    # reciprocal is inf (0 * inf = NaN): fix those blocks only.
    bad = torch.nonzero(torch.isinf(reciprocal[: n_full // blocksize])).reshape(-1)
    if bad.numel():
        rows = full[bad]
        codes = _encode((rows * reciprocal[bad, None]).view(-1), table)
        codes = torch.where(rows.reshape(-1) == 0, zero, codes).to(torch.uint8)
        packed[: n_full // 2].view(-1, blocksize // 2)[bad] = ((codes[0::2] << 4) | codes[1::2]).view(
            -1, blocksize // 2)
    if n_full < n:  # the partial last block; an odd count pads the low nibble with the zero code
        tail = x[n_full:]
        codes = _encode(tail.to(torch.float32) * reciprocal[-1], table)
        codes = torch.where(tail == 0, zero, codes).to(torch.uint8)
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_full((1,), zero)])
        _pack_into(codes, packed[n_full // 2 :])
    return packed.reshape(-1, 1), absmax


def double_quantize(absmax: torch.Tensor, *, blocksize: int = _NESTED_BLOCKSIZE, offset=None,
                    backend: str = "auto") -> NestedAbsmax:
    """Quantize first-level absmax constants to 8 bits, bitsandbytes' scheme.

    Fast pair of ``qlora_ref.double_quant.double_quantize`` (bit-identical; see Note: the
    double-quantization offset).

    Parameters
    ----------
    absmax : Tensor, shape (n_blocks,), float32
    blocksize : int
        Constants per nested block (bitsandbytes: 256).
    offset : float or 0-d Tensor, optional
        Subtracted first; default ``float32(mean(float64(absmax)))``.
    backend : {"auto", "torch", "triton"}

    Returns
    -------
    NestedAbsmax
        uint8 ``codes`` (n_blocks,), float32 ``absmax`` (ceil(n_blocks / blocksize),), the
        dynamic map, the float32 ``offset`` as a 0-d tensor.

    Raises
    ------
    TypeError
        If ``absmax`` is not a float32 tensor.
    ValueError
        If it is empty, not 1-D or not finite, or the block size is not positive.

    Notes
    -----
    ``v = absmax - offset``; per nested block ``c = max |v|``;
    ``code = nearest(DYNAMIC_MAP, v * float32(1 / c))``, exact nearest, ties to the lower entry.

    Examples
    --------
    >>> nested = double_quantize(torch.tensor([1.0, 2.0, 3.0]))
    >>> nested.offset.item(), nested.codes.tolist(), nested.absmax.tolist()
    (2.0, [0, 127, 255], [1.0])
    """
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise TypeError("absmax must be a float32 tensor")
    if absmax.ndim != 1 or absmax.numel() == 0:
        raise ValueError(f"absmax must be a non-empty 1-D tensor, got shape {tuple(absmax.shape)}")
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("absmax contains NaN or Inf")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"nested blocksize must be a positive int, got {blocksize!r}")
    if offset is None:
        offset = (absmax.to(torch.float64).sum() / absmax.numel()).to(torch.float32)
    offset = torch.as_tensor(offset, dtype=torch.float32, device=absmax.device).reshape(())
    if resolve_backend(backend, absmax.device) == "triton":
        from qlora_gpu.kernels.quantize import double_quantize_triton  # optional: the kernels need Triton

        codes, nested_absmax = double_quantize_triton(absmax, offset, blocksize)
    else:
        # (n_nested, blocksize) float32; padding is 0. One block when blocksize >= n: pad to n only.
        v = _blocks(absmax - offset, min(blocksize, absmax.numel()))
        nested_absmax = v.abs().amax(dim=1)  # (n_nested,)
        s = v * torch.reciprocal(nested_absmax)[:, None]  # float32; NaN where 0 * inf
        position = torch.searchsorted(codebooks.dynamic_midpoints(absmax.device), s.to(torch.float64).contiguous(),
                                      right=False)
        position = torch.where(torch.isnan(s), codebooks.DYNAMIC_ZERO_CODE, position)
        codes = position.reshape(-1)[: absmax.numel()].to(torch.uint8)
    return NestedAbsmax(codes=codes, absmax=nested_absmax, codebook=codebooks.dynamic_map(absmax.device).clone(),
                        offset=offset, blocksize=blocksize)


def dequantize_absmax(nested: NestedAbsmax) -> torch.Tensor:
    """Reconstruct the float32 absmax from its double-quantized form.

    Fast pair of ``qlora_ref.double_quant.dequantize_absmax``: ``float32(code[q] *
    nested_absmax[i // blocksize]) + offset``, two roundings (no fused multiply-add).

    Examples
    --------
    >>> dequantize_absmax(double_quantize(torch.tensor([1.0, 2.0, 3.0]))).tolist()
    [1.0070312023162842, 2.0, 3.0]
    """
    codes = nested.codes.to(torch.int64)
    n = codes.numel()
    if nested.blocksize > n:  # one nested block: never pad to a size a header field chose
        return nested.codebook.to(torch.float32)[codes] * nested.absmax[:1] + nested.offset
    values = _blocks(nested.codebook.to(torch.float32)[codes], nested.blocksize)  # (n_nested, bs)
    scaled = (values * nested.absmax[:, None]).reshape(-1)[:n]
    return scaled + nested.offset


def quantize_4bit(t: torch.Tensor, *, blocksize: int = 64, quant_type: str = "nf4", double_quant=False,
                  backend: str = "auto"):
    """Quantize a tensor blockwise to 4 bits, bit-identical with the oracle and bitsandbytes.

    Fast pair of ``qlora_ref.api.quantize_4bit``.

    Parameters
    ----------
    t : Tensor, any shape, float32, float16 or bfloat16, any device
    blocksize : int
        One of 32, 64, 128, 256, 512, 1024, 2048, 4096.
    quant_type : {"nf4", "fp4", "int4"}
    double_quant : bool or "bnb"
        Double-quantize the absmax with bitsandbytes' scheme.
    backend : {"auto", "torch", "triton"}

    Returns
    -------
    packed : Tensor, shape ((n + 1) // 2, 1), uint8
    state : QuantState

    Raises
    ------
    TypeError
        If ``t`` is not a tensor of a supported dtype.
    ValueError
        If ``t`` is empty or holds NaN/Inf, or an option is unknown.

    Notes
    -----
    QLoRA section 3: ``X_4bit = round_nearest(X / absmax(X))`` per block.

    Examples
    --------
    >>> packed, state = quantize_4bit(torch.tensor([1.0, -1.0, 0.0, 0.5]))
    >>> [hex(b) for b in packed.ravel().tolist()], state.absmax.tolist()
    (['0xf0', '0x7c'], [1.0])
    """
    nested_on = _check_options(blocksize, quant_type, double_quant)
    t = _check_input(t, finite=False)
    if resolve_backend(backend, t.device) == "triton":
        from qlora_gpu.kernels.quantize import quantize_4bit_triton  # optional: the kernels need Triton

        packed, absmax = quantize_4bit_triton(_check_finite(t), blocksize, quant_type)
    else:
        packed, absmax = _quantize_torch(t, blocksize, quant_type)
    common = dict(shape=tuple(t.shape), dtype=t.dtype, blocksize=blocksize, quant_type=quant_type,
                  codebook=codebooks.codebook(quant_type, t.device).clone())  # own copy: safetensors refuses shared memory
    if nested_on:
        return packed, QuantState(**common, nested=double_quantize(absmax, backend=backend))
    return packed, QuantState(**common, absmax=absmax)


def check_packed(packed, state: QuantState) -> torch.Tensor:
    """Validate packed codes against a state; return them as a flat uint8 tensor.

    Raises
    ------
    TypeError
        If ``packed`` is not a uint8 tensor or ``state`` is not a ``qlora_gpu.QuantState``.
    ValueError
        If sizes do not match the state.
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a qlora_gpu.QuantState, got {type(state).__name__}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be a uint8 tensor")
    expected = state.packed_nbytes
    if packed.numel() != expected or packed.ndim not in (1, 2) or (packed.ndim == 2 and packed.shape[1] != 1):
        raise ValueError(f"packed has shape {tuple(packed.shape)}, but a state of shape {state.shape} "
                         f"needs ({expected}, 1) bytes")
    codes = state.absmax if state.absmax is not None else state.nested.codes
    if codes.shape != (state.n_blocks,):
        raise ValueError(f"absmax has shape {tuple(codes.shape)}, expected ({state.n_blocks},)")
    if state.codebook.shape != (16,):
        raise ValueError(f"the code map must have 16 entries, got shape {tuple(state.codebook.shape)}")
    return packed.reshape(-1)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, *, dtype=None, backend: str = "auto") -> torch.Tensor:
    """Decode a blockwise 4-bit tensor.

    Fast pair of ``qlora_ref.api.dequantize_4bit``.

    Parameters
    ----------
    packed : Tensor, shape ((n + 1) // 2, 1) or ((n + 1) // 2,), uint8
    state : QuantState
    dtype : torch.dtype or str, optional
        float32, float16, bfloat16 (or float64, exact from float32); default ``state.dtype``.
    backend : {"auto", "torch", "triton"}

    Returns
    -------
    Tensor of ``state.shape`` and ``dtype``
        ``float32(CODE[code] * absmax)`` rounded to nearest even into ``dtype``.

    Raises
    ------
    TypeError
        If ``packed`` or ``state`` has the wrong type, or ``dtype`` is unsupported.
    ValueError
        If the packed data and the state do not match.

    Examples
    --------
    >>> packed, state = quantize_4bit(torch.linspace(-1, 1, 6).reshape(2, 3), blocksize=32)
    >>> dequantize_4bit(packed, state, dtype=torch.bfloat16).dtype
    torch.bfloat16
    """
    flat = check_packed(packed, state)
    out_dtype = torch_dtype(state.dtype if dtype is None else dtype)
    if resolve_backend(backend, flat.device) == "triton":
        from qlora_gpu.kernels.dequantize import dequantize_4bit_triton  # optional: the kernels need Triton

        return dequantize_4bit_triton(flat, state, out_dtype).reshape(state.shape)
    absmax = state.absmax if state.absmax is not None else dequantize_absmax(state.nested)
    return _dequantize_torch(flat, codebooks.pair_table(state.codebook), absmax.to(torch.float32), state.numel,
                             state.blocksize, out_dtype).reshape(state.shape)


def _dequantize_torch(flat, pairs, absmax, n, blocksize, out_dtype):
    """One gather of value pairs per byte, a float32 multiply, one rounding into ``out_dtype``."""
    out = torch.empty(n, dtype=out_dtype, device=flat.device)
    # float64 output: multiply in float32 first (step 7), then widen exactly.
    work = out if out_dtype != torch.float64 else torch.empty(n, dtype=torch.float32, device=flat.device)
    n_full = n // blocksize * blocksize
    step = _step(flat.device, _CPU_DECODE_STEP, blocksize, n_full)
    scratch = torch.empty(min(step, n_full) // 2, dtype=torch.int64, device=flat.device)
    index = torch.empty(min(step, n_full) // 2, dtype=torch.int32, device=flat.device)
    for start in range(0, n_full, step):
        stop = min(start + step, n_full)
        byte_index = index[: (stop - start) // 2]
        byte_index.copy_(flat[start // 2 : stop // 2])
        values = torch.index_select(pairs, 0, byte_index, out=scratch[: (stop - start) // 2])
        # float32 product, rounded once into the output's dtype by the out= cast
        torch.mul(values.view(torch.float32).view(-1, blocksize), absmax[start // blocksize : stop // blocksize, None],
                  out=work[start:stop].view(-1, blocksize))
    if n_full < n:  # the partial last block
        values = pairs.index_select(0, flat[n_full // 2 :].to(torch.int32)).view(torch.float32)[: n - n_full]
        torch.mul(values, absmax[-1:], out=work[n_full:])
    if work is not out:
        out.copy_(work)
    return out
