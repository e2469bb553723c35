"""Triton kernel: one-pass decode of blockwise 4-bit weights, double-quantized absmax included.

Fast pair of ``qlora_ref.api.dequantize_4bit`` (through
``qlora_gpu.dequantize_4bit(..., backend="triton")``): the same bits for NF4, FP4 and INT4, with
or without bitsandbytes' double quantization, into float32, float16, bfloat16 (or float64).

Design: one program decodes ``ROWS`` whole quantization blocks, a ``(ROWS, blocksize / 2)``
tile of packed bytes. Each row's absmax is loaded once (decoded from its 8-bit code, the nested
absmax and the offset when double quantized: the nested level never exists in memory as float32,
unlike bitsandbytes, which decodes it in a separate pass first), each byte's two nibbles index
the 16-entry code table (an L1-resident gather), and the two decoded halves are interleaved so
the output is written once, contiguously.

Bytes moved per element (NF4, block 64, double quantization, bf16 output):
``0.5`` packed + ``1/64`` absmax codes + ``4/(64*256)`` nested absmax + ``2`` written
``= 2.516``; float16 the same; float32 output ``4.516``; without double quantization the absmax
costs ``4/64`` instead (2.5625 for bf16). bitsandbytes moves 2.766 for bf16 in three launches.

See ``qlora_gpu.kernels.quantize``, Note: exact arithmetic in the Triton kernels: the absmax is
``float32(code[q] * nested_absmax) + offset`` with two roundings (``enable_fp_fusion=False``),
then ``float32(CODE[c] * absmax)``, then one round-to-nearest-even cast to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_gpu.kernels.util import absmax_arguments, cast_rne, interpreting, launch_context

__all__ = ["dequantize_4bit_kernel", "dequantize_4bit_triton", "bytes_moved_dequantize"]

#: Packed bytes one program decodes (ROWS = this // (blocksize / 2), at least 1): with 4 warps,
#: 16 bytes per thread, so each thread loads its bytes with one 16-byte load and its 32 outputs
#: amortize the set-up (the absmax decode, the index arithmetic).
TILE_BYTES = 2048


@triton.jit
def dequantize_4bit_kernel(
    packed_ptr,  # ((n + 1) // 2,) uint8
    code_ptr,  # (16,) float32, the codebook
    absmax_ptr,  # (n_blocks,) float32, or uint8 codes when NESTED
    nested_absmax_ptr,  # (ceil(n_blocks / NESTED),) float32 (unused without NESTED)
    nested_code_ptr,  # (256,) float32, the dynamic map (unused without NESTED)
    offset_ptr,  # () float32 (unused without NESTED)
    out_ptr,  # (2 * n_bytes,) output dtype: the last element is padding when n is odd
    n_bytes,  # (n + 1) // 2, passed from the host so Triton sees when it divides by 16
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,  # nested block size, 0 without double quantization
    ROWS: tl.constexpr,
    BITWISE: tl.constexpr,  # the interpreter's rounding (see ``cast_rne``)
):
    HALF: tl.constexpr = BLOCKSIZE // 2  # bytes per block
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) block indices
    row_in = rows < n_blocks
    byte_offs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF)
    b = tl.load(packed_ptr + byte_offs, mask=byte_offs < n_bytes, other=0)
    if NESTED:
        q = tl.load(absmax_ptr + rows, mask=row_in, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + rows // NESTED, mask=row_in, other=0.0)
        absmax = tl.load(nested_code_ptr + q) * scale + tl.load(offset_ptr)  # two roundings
    else:
        absmax = tl.load(absmax_ptr + rows, mask=row_in, other=0.0)
    hi = tl.load(code_ptr + (b >> 4).to(tl.int32)) * absmax[:, None]  # even elements, float32
    lo = tl.load(code_ptr + (b & 0x0F).to(tl.int32)) * absmax[:, None]  # odd elements
    y = tl.interleave(hi, lo)  # (ROWS, BLOCKSIZE) in element order
    out_offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + out_offs, cast_rne(y, out_ptr.dtype.element_ty, BITWISE), mask=out_offs < 2 * n_bytes)


def bytes_moved_dequantize(state, out_dtype: torch.dtype) -> int:
    """Bytes the decode kernel must read and write for ``state`` (the bandwidth formula).

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> _, state = quantize_4bit(torch.zeros(1024, 4096), double_quant=True)
    >>> round(bytes_moved_dequantize(state, torch.bfloat16) / state.numel, 3)
    2.516
    """
    n = state.numel
    read = state.packed_nbytes + state.codebook.numel() * 4
    if state.nested is None:
        read += state.absmax.numel() * 4
    else:
        nest = state.nested
        read += nest.codes.numel() + nest.absmax.numel() * 4 + nest.codebook.numel() * 4 + 4
    return read + n * torch.empty((), dtype=out_dtype).element_size()


def dequantize_4bit_triton(flat: torch.Tensor, state, out_dtype: torch.dtype, *, rows: int | None = None,
                           num_warps: int = 4) -> torch.Tensor:
    """Run ``dequantize_4bit_kernel``; return the flat decoded tensor ``(n,)`` in ``out_dtype``.

    Inputs are validated by ``qlora_gpu.dequantize_4bit``, which calls this for
    ``backend="triton"``. ``rows`` and ``num_warps`` override the launch configuration (the
    benchmark sweeps them).

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> packed, state = quantize_4bit(torch.tensor([1.0, -1.0, 0.0, 0.5]))
    >>> dequantize_4bit_triton(packed.reshape(-1), state, torch.float32).tolist()
    [1.0, -1.0, 0.0, 0.44070982933044434]
    """
    n = state.numel
    n_bytes = (n + 1) // 2
    out = torch.empty(2 * n_bytes, dtype=out_dtype, device=flat.device)  # whole bytes: no odd tail mask
    rows = rows or max(1, TILE_BYTES // (state.blocksize // 2))
    grid = (triton.cdiv(state.n_blocks, rows),)
    absmax, nested_absmax, nested_code, offset, nested = absmax_arguments(state)
    with launch_context():
        dequantize_4bit_kernel[grid](
            flat, state.codebook, absmax, nested_absmax, nested_code, offset, out, n_bytes, state.n_blocks,
            BLOCKSIZE=state.blocksize, NESTED=nested, ROWS=rows, BITWISE=interpreting(), num_warps=num_warps,
            enable_fp_fusion=False,
        )
    return out[:n]
