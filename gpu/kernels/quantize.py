"""Triton kernels for blockwise 4-bit quantization and bitsandbytes' double quantization.

Fast pair of ``qlora_ref.api.quantize_4bit`` and ``qlora_ref.double_quant.double_quantize``
(through ``qlora_gpu.quantize_4bit(..., backend="triton")``): same bits. Runs on CUDA, and on
CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it without a GPU).

Two kernels, because double quantization needs the mean of ALL first-level absmax values
before any nested code can be written, a grid-wide dependency one pass cannot honour without a
grid barrier:

1. ``quantize_4bit_kernel``: absmax, codes and packing of ``ROWS`` blocks per program.
   Bytes moved per element: read ``e`` (the input element size: 4, 2 or 2), write 0.5 (packed)
   and ``4 / blocksize`` (float32 absmax). bf16 input, block 64: 2.5625 bytes per element.
2. ``double_quantize_kernel``: the nested level over the ``n / blocksize`` absmax values, after
   the float64 mean (one torch reduction; see ``qlora_gpu.quantize``, Note: the
   double-quantization offset). Per absmax value: read 4, write 1 (code) and ``4 / 256``;
   relative to the weight that is ``(4 + 1 + 4 / 256 + 4) / blocksize`` bytes per element with
   the mean's read (0.14 at block 64), and it leaves a float32 absmax behind only as scratch.

Note: exact arithmetic in the Triton kernels
    Every float32 operation here must round exactly as the oracle's NumPy: the reciprocal uses
    ``tl.math.div_rn`` (IEEE division; Triton's ``/`` may lower to an approximate division on
    CUDA), and every kernel (quantize, double quantize, decode, the fused product) is launched
    with ``enable_fp_fusion=False`` so that no multiply and add are contracted into one FMA: the
    double-quantized absmax ``code[q] * nested_absmax + offset`` rounds twice, as the oracle
    does. Where a fused multiply-add is allowed (the product's float32 accumulation, held to the
    derived tier) the kernel writes ``tl.fma``. ``benchmarks/kernel_report.py`` checks the
    compiled PTX of every launch for contractions the kernels did not write. Comparisons
    against the codebook midpoints are exact. The nested encoder compares in float64, where a
    midpoint of two float32 values is exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_gpu import codebooks
from qlora_gpu.kernels.util import launch_context

__all__ = ["quantize_4bit_kernel", "double_quantize_kernel", "quantize_4bit_triton", "double_quantize_triton"]

#: Elements one program of ``quantize_4bit_kernel`` covers (ROWS = this // blocksize, at least 1):
#: 32 per thread at 4 warps, so each thread stores its 16 packed bytes at once (2048 left a
#: register spill at block 512 on sm_80; ``benchmarks/kernel_report.py``).
TILE_ELEMENTS = 4096


@triton.jit
def quantize_4bit_kernel(
    x_ptr,  # (n,) float32 / float16, or int16 holding bfloat16 bits (BF16_BITS), the flat input
    enc_ptr,  # (65536,) int64, the encoder's lookup table (``codebooks.encode_table``)
    packed_ptr,  # ((n + 1) // 2,) uint8, output
    absmax_ptr,  # (n_blocks,) float32, output
    n,
    n_bytes,  # (n + 1) // 2, from the host so Triton sees when it divides by 16
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
    ZERO_CODE: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2  # packed bytes per block
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) block indices
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (ROWS, BLOCKSIZE)
    # Contiguous, coalesced load; elements past n read as 0, so they take the zero code, which
    # is exactly the pad nibble of an odd count, and never raise a block's absmax.
    if BF16_BITS:
        # bfloat16 is the high half of a float32: widen the bits (exact for subnormals too; the
        # interpreter's own bf16 -> f32 cast flushes bf16 subnormals to zero).
        bits = tl.load(x_ptr + offs, mask=offs < n, other=0).to(tl.uint16).to(tl.uint32) << 16
        x = bits.to(tl.float32, bitcast=True)
    else:
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)  # (ROWS,) float32
    reciprocal = tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), absmax)  # inf for a zero block
    s = x * reciprocal[:, None]
    # One lookup on the upper 16 bits of s gives a threshold and the two codes around it
    # (``codebooks.encode_table``, Note: the encoder's lookup table): the oracle's code exactly.
    entry = tl.load(enc_ptr + (s.to(tl.uint32, bitcast=True) >> 16).to(tl.int32))
    threshold = (entry & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    code = tl.where(s > threshold, (entry >> 40) & 0xFF, (entry >> 32) & 0xFF).to(tl.int32)
    code = tl.where(x == 0.0, ZERO_CODE, code)  # zero is zero, whatever the block's absmax (and 0 * inf)
    hi, lo = tl.split(tl.reshape(code, (ROWS, HALF, 2)))  # (ROWS, HALF) each: even and odd elements
    packed = ((hi << 4) | lo).to(tl.uint8)
    byte_offs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    tl.store(packed_ptr + byte_offs, packed, mask=byte_offs < n_bytes)
    tl.store(absmax_ptr + rows, absmax, mask=rows < n_blocks)


@triton.jit
def double_quantize_kernel(
    absmax_ptr,  # (m,) float32, first-level absmax
    offset_ptr,  # () float32
    mid_ptr,  # (255,) float64, midpoints of the dynamic map
    codes_ptr,  # (m,) uint8, output
    nested_absmax_ptr,  # (ceil(m / NESTED),) float32, output
    m,
    NESTED: tl.constexpr,
    ZERO_CODE: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    offs = block * NESTED + tl.arange(0, NESTED)
    inside = offs < m
    offset = tl.load(offset_ptr)
    v = tl.where(inside, tl.load(absmax_ptr + offs, mask=inside, other=0.0) - offset, 0.0)
    c = tl.max(tl.abs(v), axis=0)
    s = v * tl.math.div_rn(1.0, c)  # NaN where 0 * inf (an all-zero nested block)
    # Binary search: position = number of float64 midpoints strictly below s (8 steps, 255 entries).
    s64 = s.to(tl.float64)
    position = tl.zeros((NESTED,), dtype=tl.int32)
    for i in tl.static_range(8):
        probe = position + (128 >> i)  # candidate count; its last midpoint is probe - 1
        valid = probe <= 255
        mid = tl.load(mid_ptr + probe - 1, mask=valid, other=float("inf"))
        position = tl.where(valid & (mid < s64), probe, position)
    position = tl.where(s != s, ZERO_CODE, position)
    tl.store(codes_ptr + offs, position.to(tl.uint8), mask=inside)
    tl.store(nested_absmax_ptr + block, c)


def _rows(blocksize: int) -> int:
    return max(1, TILE_ELEMENTS // blocksize)


def quantize_4bit_triton(t: torch.Tensor, blocksize: int, quant_type: str):
    """Run ``quantize_4bit_kernel``; return ``(packed ((n+1)//2, 1) uint8, absmax (n_blocks,) float32)``.

    Inputs are validated by ``qlora_gpu.quantize_4bit``, which calls this for ``backend="triton"``.

    Examples
    --------
    >>> packed, absmax = quantize_4bit_triton(torch.tensor([1.0, -1.0, 0.0, 0.5]), 64, "nf4")
    >>> [hex(b) for b in packed.ravel().tolist()], absmax.tolist()
    (['0xf0', '0x7c'], [1.0])
    """
    x = t.reshape(-1).contiguous()
    bf16_bits = x.dtype == torch.bfloat16
    if bf16_bits:
        x = x.view(torch.int16)
    n = x.numel()
    n_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    rows = _rows(blocksize)
    grid = (triton.cdiv(n_blocks, rows),)
    with launch_context():
        quantize_4bit_kernel[grid](
            x, codebooks.encode_table(quant_type, x.device), packed, absmax, n, (n + 1) // 2, n_blocks,
            BLOCKSIZE=blocksize, ROWS=rows, ZERO_CODE=codebooks.ZERO_CODES[quant_type], BF16_BITS=bf16_bits,
            enable_fp_fusion=False,
        )
    return packed.reshape(-1, 1), absmax


def double_quantize_triton(absmax: torch.Tensor, offset: torch.Tensor, blocksize: int):
    """Run ``double_quantize_kernel``; return ``(codes (m,) uint8, nested_absmax float32)``.

    ``offset`` is a 0-d float32 tensor on the same device (read by the kernel, no host sync).

    Examples
    --------
    >>> codes, nested = double_quantize_triton(torch.tensor([1.0, 2.0, 3.0]), torch.tensor(2.0), 256)
    >>> codes.tolist(), nested.tolist()
    ([0, 127, 255], [1.0])
    """
    if blocksize & (blocksize - 1):
        raise ValueError(f"the triton backend needs a power-of-two nested blocksize, got {blocksize}")
    m = absmax.numel()
    n_nested = -(-m // blocksize)
    codes = torch.empty(m, dtype=torch.uint8, device=absmax.device)
    nested_absmax = torch.empty(n_nested, dtype=torch.float32, device=absmax.device)
    with launch_context():
        double_quantize_kernel[(n_nested,)](
            absmax.contiguous(), offset.reshape(()).to(torch.float32), codebooks.dynamic_midpoints(absmax.device),
            codes, nested_absmax, m,
            NESTED=blocksize, ZERO_CODE=codebooks.DYNAMIC_ZERO_CODE, enable_fp_fusion=False,
        )
    return codes, nested_absmax
