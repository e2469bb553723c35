"""Triton kernel: fused 4-bit matrix product, ``y = x W^T``, for any number of rows of ``x``.

The decode-time product of a QLoRA base layer: ``x (M, K)`` in the compute dtype against a
4-bit weight ``W (N, K)`` stored blockwise over its flat row-major layout. The kernel reads the
packed bytes and the (double-quantized) absmax directly, decodes each tile in registers, and
never writes the decoded weight to memory.

Pairs with ``qlora_gpu.matmul_4bit`` (which calls it) and, in the oracle, with
``x @ qlora_ref.dequantize_4bit(packed, state, dtype=compute_dtype).T`` (the base term of
``qlora_ref.qlora.qlora_forward``): with two or more rows the decoded weight is rounded to the
compute dtype before the product (tensor cores take it in that dtype), products are
accumulated in float32, and the result is rounded once. One row differs (Note: the one-row
product's weights). Tests hold both to the derived tolerance tier (the accumulation order
differs from any reference).

Design:
- grid ``(cdiv(N, BLOCK_N), SPLIT_K)``: each program owns ``BLOCK_N`` output features and a
  ``1 / SPLIT_K`` share of ``K``; ``SPLIT_K > 1`` writes float32 partials that
  ``splitk_reduce_kernel`` sums in a fixed order (deterministic, no atomics), adding the bias
  and rounding in the same launch, for the case ``N / BLOCK_N`` programs would not fill the GPU.
- each step loads a ``(BLOCK_N, BLOCK_K / 2)`` tile of packed bytes (rows are contiguous and
  the row length ``K / 2`` comes from the host, so loads are 16 bytes wide when it divides by
  16) and gathers each byte's two codebook values at once from a 256-entry table of float32
  pairs (``codebooks.pair_table``): one gather per two weights.
- absmax: when ``K`` is a multiple of the block size each row of the tile holds whole groups
  and one absmax per group is loaded and broadcast (``ALIGNED``); otherwise blocks cross rows
  and the absmax is gathered per byte. Double-quantized absmax is decoded in the same step,
  ``code[q] * nested_absmax + offset`` with two roundings (launched with
  ``enable_fp_fusion=False``, see ``qlora_gpu.kernels.quantize``, Note: exact arithmetic in
  the Triton kernels).
- two or more rows: ``tl.dot`` (tensor cores, ``BLOCK_M = 16`` up to 16 rows, row tiles of
  64 on a third grid axis beyond) on the even and the odd
  columns, ``x W^T = x_even W_even^T + x_odd W_odd^T``. One row: CUDA cores, the two halves
  interleaved back into column order and multiplied with a contiguous row of ``x`` by
  ``tl.fma`` into a ``(BLOCK_N, BLOCK_K)`` accumulator kept in the weight tile's layout, so
  nothing crosses threads inside the loop; one reduction over ``K`` after it.

Note: the one-row product's weights
    With one row the kernel multiplies ``x`` by the float32 decoded weight
    ``W32 = float32(CODE[c] * absmax)`` (bit for bit the oracle's ``dequantize_4bit(...,
    dtype=float32)``), without rounding it to the compute dtype first: that rounding and the
    conversion back cost about 2 of the 6 instructions per weight the budget allows
    (``docs/kernels.md``). The result differs from the decode-then-``linear`` path by at most
    ``sum_k |x_k| |W32 - W_c|_k`` with ``|W32 - W_c| <= ulp_c(W32) / 2`` per weight (half an
    ulp of the compute dtype, ``2^-9`` relative for bfloat16), and it is closer to the exact
    product of the stored weights. Its derived tier: error against ``x @ W32^T`` in float64 at
    most twice that of a plain torch float32 product with ``W32`` rounded once to the output
    dtype, plus a few ulp (``tests/test_gpu_kernels.py``).

Bytes moved (the ceiling the benchmark compares against): the packed weight and its constants
once, ``0.516 * N * K`` for NF4 block 64 with double quantization, plus ``x`` and ``y``
(``2 * M * (K + N)`` in bf16), which for ``M <= 16`` and a 4096x14336 weight is under 0.5%;
with many rows the product becomes compute-bound, and each 64-row tile decodes its weight
tile again (``cdiv(M, 64)`` reads of the packed weight, still under a tenth of a bf16 weight's
bytes per tile).
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from qlora_gpu import codebooks
from qlora_gpu.kernels.util import absmax_arguments, cast_rne, interpreting, launch_context

__all__ = ["matmul_4bit_kernel", "splitk_reduce_kernel", "matmul_4bit_t_kernel", "matmul_4bit_t_triton",
           "matmul_4bit_triton", "MatmulConfig", "default_config", "CONFIGS",
           "bytes_moved_matmul"]


@triton.jit
def _absmax_at(blk, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED: tl.constexpr):
    """float32 absmax of first-level blocks ``blk`` (decoded from 8 bits when ``NESTED``)."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + blk // NESTED, mask=mask, other=0.0)
        return tl.load(nested_code_ptr + q) * scale + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def matmul_4bit_kernel(
    x_ptr,  # (M, K) compute dtype, unit stride along K
    packed_ptr,  # (N * K / 2,) uint8, row-major W, first element of a byte in its high nibble
    pair_ptr,  # (256,) int64: the two float32 codebook values of each byte (``codebooks.pair_table``)
    absmax_ptr,  # (n_blocks,) float32, or uint8 codes when NESTED
    nested_absmax_ptr,  # float32 (unused without NESTED)
    nested_code_ptr,  # (256,) float32 (unused without NESTED)
    offset_ptr,  # () float32 (unused without NESTED)
    bias_ptr,  # (N,) any float dtype (unused without HAS_BIAS)
    out_ptr,  # (M, N) compute dtype, or (SPLIT_K, M, N) float32 partials when SPLIT_K > 1
    M, N, K,
    half_k,  # K // 2, bytes per row of W: from the host, so Triton sees when it divides by 16
    blocks_per_row,  # K // BLOCKSIZE (used when ALIGNED)
    stride_xm,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,  # nested block size, 0 without double quantization
    ALIGNED: tl.constexpr,  # K % BLOCKSIZE == 0
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for float32 (no TF32)
    DOT_IN_FP32: tl.constexpr,  # True only under the interpreter with bfloat16 inputs
    BITWISE: tl.constexpr,  # the interpreter's rounding (see ``cast_rne``)
):
    HALF_K: tl.constexpr = BLOCK_K // 2  # packed bytes per tile row
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of x this program multiplies
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_in = offs_n < N
    x_dtype = x_ptr.dtype.element_ty
    k_chunk = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = pid_k * k_chunk
    k_end = tl.minimum(k_start + k_chunk, K)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:  # one row of x: products accumulate in the weight tile's layout, reduced after the loop
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        j = k0 // 2 + tl.arange(0, HALF_K)  # (HALF_K,) byte column
        w_mask = n_in[:, None] & (j < half_k)[None, :]
        b = tl.load(packed_ptr + offs_n[:, None] * half_k + j[None, :], mask=w_mask, other=0)  # (BLOCK_N, HALF_K)
        pair = tl.load(pair_ptr + b.to(tl.int32))  # one gather per byte: two codebook values
        v_hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)  # even columns (high nibble)
        v_lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)  # odd columns
        if ALIGNED:
            # Each tile row holds G whole blocks (or lies inside one): one absmax per group.
            G: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K >= BLOCKSIZE else 1
            blk = offs_n[:, None] * blocks_per_row + k0 // BLOCKSIZE + tl.arange(0, G)[None, :]  # (BLOCK_N, G)
            g_mask = n_in[:, None] & ((k0 + tl.arange(0, G) * BLOCKSIZE) < K)[None, :]
            a = _absmax_at(blk, g_mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED)
            a = a[:, :, None]  # (BLOCK_N, G, 1), broadcast over the group's bytes
            w_hi = tl.reshape(tl.reshape(v_hi, (BLOCK_N, G, HALF_K // G)) * a, (BLOCK_N, HALF_K))
            w_lo = tl.reshape(tl.reshape(v_lo, (BLOCK_N, G, HALF_K // G)) * a, (BLOCK_N, HALF_K))
        else:
            blk = (offs_n[:, None] * K + 2 * j[None, :]) // BLOCKSIZE  # block of the even element
            a = _absmax_at(blk, w_mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED)
            w_hi = v_hi * a
            w_lo = v_lo * a
        if USE_DOT:
            w_hi = cast_rne(w_hi, x_dtype, BITWISE)  # tensor-core inputs: the weight rounded as the oracle does
            w_lo = cast_rne(w_lo, x_dtype, BITWISE)
            kk = k0 + 2 * tl.arange(0, HALF_K)  # (HALF_K,) even column index
            x_offs = offs_m[:, None, None] * stride_xm + kk[None, :, None] + tl.arange(0, 2)[None, None, :]
            x_mask = (offs_m < M)[:, None, None] & (kk < K)[None, :, None]
            x_even, x_odd = tl.split(tl.load(x_ptr + x_offs, mask=x_mask, other=0.0))  # (BLOCK_M, HALF_K) each
            if DOT_IN_FP32:  # interpreter only: its dot multiplies bf16 bit patterns as integers
                x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)  # exact, as are the products
                w_hi, w_lo = w_hi.to(tl.float32), w_lo.to(tl.float32)
            acc = tl.dot(x_even, tl.trans(w_hi), acc, input_precision=PRECISION)
            acc = tl.dot(x_odd, tl.trans(w_lo), acc, input_precision=PRECISION)
        else:
            k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) one contiguous row of x
            x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            w = tl.interleave(w_hi, w_lo)  # (BLOCK_N, BLOCK_K) float32, the oracle's float32 decode
            # A fused multiply-add written out: the sum's order and rounding are free in the
            # derived tier (Note: the one-row product's weights).
            acc2 = tl.fma(w, x[None, :], acc2)
    if not USE_DOT:
        acc = tl.sum(acc2, axis=1)[None, :]  # (1, BLOCK_N)
    out_mask = (offs_m < M)[:, None] & n_in[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], cast_rne(acc, out_ptr.dtype.element_ty, BITWISE),
                 mask=out_mask)
    else:
        tl.store(out_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=out_mask)


#: Outputs one program of ``splitk_reduce_kernel`` sums.
REDUCE_BLOCK = 1024


@triton.jit
def splitk_reduce_kernel(
    part_ptr,  # (SPLIT_K, M, N) float32 partial products
    bias_ptr,  # (N,) any float dtype (unused without HAS_BIAS)
    out_ptr,  # (M, N) compute dtype
    MN, N,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BITWISE: tl.constexpr,  # the interpreter's rounding (see ``cast_rne``)
    BLOCK: tl.constexpr,
):
    """Sum the split-K partials in a fixed order, add the bias, round once: one launch."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < MN
    acc = tl.load(part_ptr + offs, mask=inside, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=inside, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, cast_rne(acc, out_ptr.dtype.element_ty, BITWISE), mask=inside)


@triton.jit
def matmul_4bit_t_kernel(
    g_ptr,  # (M, N) compute dtype, unit stride along N: the gradient of y = x W^T
    packed_ptr,  # (N * K / 2,) uint8, row-major W
    pair_ptr,  # (256,) int64 (``codebooks.pair_table``)
    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,  # as ``matmul_4bit_kernel``
    out_ptr,  # (M, K) compute dtype: g W
    M, N, K,
    half_k,  # K // 2, from the host
    blocks_per_row,  # K // BLOCKSIZE (K is a multiple of BLOCKSIZE)
    stride_gm,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BITWISE: tl.constexpr,
):
    """``out (M, K) = g (M, N) @ W (N, K)``: each program owns ``BLOCK_K`` input features and
    ``BLOCK_M`` rows and walks ``N``; the weight tile is decoded exactly as in
    ``matmul_4bit_kernel`` (rounded to the compute dtype for the tensor cores)."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    G: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K >= BLOCKSIZE else 1  # blocks per tile row
    k0 = tl.program_id(0) * BLOCK_K
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = k0 // 2 + tl.arange(0, HALF_K)  # (HALF_K,) byte column
    g_dtype = g_ptr.dtype.element_ty
    acc_even = tl.zeros((BLOCK_M, HALF_K), dtype=tl.float32)
    acc_odd = tl.zeros((BLOCK_M, HALF_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_in = offs_n < N
        b = tl.load(packed_ptr + offs_n[:, None] * half_k + j[None, :], mask=n_in[:, None] & (j < half_k)[None, :],
                    other=0)  # (BLOCK_N, HALF_K)
        pair = tl.load(pair_ptr + b.to(tl.int32))
        v_hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        v_lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
        blk = offs_n[:, None] * blocks_per_row + k0 // BLOCKSIZE + tl.arange(0, G)[None, :]  # (BLOCK_N, G)
        g_mask = n_in[:, None] & ((k0 + tl.arange(0, G) * BLOCKSIZE) < K)[None, :]
        a = _absmax_at(blk, g_mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED)[:, :, None]
        w_hi = cast_rne(tl.reshape(tl.reshape(v_hi, (BLOCK_N, G, HALF_K // G)) * a, (BLOCK_N, HALF_K)), g_dtype, BITWISE)
        w_lo = cast_rne(tl.reshape(tl.reshape(v_lo, (BLOCK_N, G, HALF_K // G)) * a, (BLOCK_N, HALF_K)), g_dtype, BITWISE)
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], mask=(offs_m < M)[:, None] & n_in[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_N)
        if DOT_IN_FP32:  # interpreter only: its dot multiplies bf16 bit patterns as integers
            g, w_hi, w_lo = g.to(tl.float32), w_hi.to(tl.float32), w_lo.to(tl.float32)
        acc_even = tl.dot(g, w_hi, acc_even, input_precision=PRECISION)
        acc_odd = tl.dot(g, w_lo, acc_odd, input_precision=PRECISION)
    y = tl.interleave(acc_even, acc_odd)  # (BLOCK_M, BLOCK_K) in column order
    kk = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_m[:, None] * K + kk[None, :], cast_rne(y, out_ptr.dtype.element_ty, BITWISE),
             mask=(offs_m < M)[:, None] & (kk < K)[None, :])


def matmul_4bit_t_triton(g2d: torch.Tensor, flat: torch.Tensor, state) -> torch.Tensor:
    """Run ``matmul_4bit_t_kernel``: ``g2d (M, N) @ W (N, K)`` in ``g2d.dtype`` (the input
    gradient of ``x W^T``), without writing the decoded weight. Needs ``K % blocksize == 0``.

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> packed, state = quantize_4bit(torch.eye(64), blocksize=32)
    >>> g = torch.arange(128.0).reshape(2, 64)
    >>> bool((matmul_4bit_t_triton(g, packed.reshape(-1), state) == g).all())
    True
    """
    M, N = g2d.shape
    K = state.shape[1]
    if g2d.stride(1) != 1:
        g2d = g2d.contiguous()
    block_m = 16 if M <= 16 else 64
    block_k = 128
    out = torch.empty((M, K), dtype=g2d.dtype, device=g2d.device)
    absmax, nested_absmax, nested_code, offset, nested = absmax_arguments(state)
    dot_in_fp32 = interpreting() and g2d.dtype == torch.bfloat16
    with launch_context():
        matmul_4bit_t_kernel[(triton.cdiv(K, block_k), triton.cdiv(M, block_m))](
            g2d, flat, _pair_table(state.codebook), absmax, nested_absmax, nested_code, offset, out,
            M, N, K, K // 2, K // state.blocksize, g2d.stride(0),
            BLOCKSIZE=state.blocksize, NESTED=nested, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k,
            PRECISION="ieee" if g2d.dtype == torch.float32 or dot_in_fp32 else "tf32", DOT_IN_FP32=dot_in_fp32,
            BITWISE=interpreting(), num_warps=8 if block_m == 64 else 4, enable_fp_fusion=False,
        )
    return out


_PAIR_TABLES = {}  # id(code) -> (weak reference to code, its version, the pair table)


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """``codebooks.pair_table(code)``, built once per codebook tensor (and again if it changes in place)."""
    hit = _PAIR_TABLES.get(id(code))
    if hit is None or hit[0]() is not code or hit[1] != code._version:
        hit = (weakref.ref(code, lambda _, key=id(code): _PAIR_TABLES.pop(key, None)), code._version,
               codebooks.pair_table(code))
        _PAIR_TABLES[id(code)] = hit
    return hit[2]


class MatmulConfig(tuple):
    """Launch configuration ``(BLOCK_N, BLOCK_K, SPLIT_K, USE_DOT, num_warps)``."""

    __slots__ = ()

    def __new__(cls, block_n, block_k, split_k, use_dot, num_warps):
        return super().__new__(cls, (block_n, block_k, split_k, use_dot, num_warps))


#: Candidate configurations for a sweep on the GPU (``benchmarks.cuda_check`` times them): weight
#: tiles of at most 8192 weights (64 per thread at 4 warps) and tensor-core tiles at most 256
#: deep. The compiled code of larger tiles spills on sm_80 and sm_90, and the tensor-core
#: 64x512 tile needs more shared memory than an A100 block has (``benchmarks/kernel_report.py``).
CONFIGS = [
    MatmulConfig(bn, bk, sk, dot, w)
    for bn in (16, 32, 64)
    for bk in (128, 256, 512)
    for sk in (1, 2, 4)
    for dot in (False, True)
    for w in (4,)
    if bn * bk <= 8192 and not (dot and bk > 256)
]


def default_config(M: int, N: int, K: int) -> MatmulConfig:
    """A reasonable configuration before tuning: enough programs to fill a large GPU.

    One row of ``x`` takes CUDA cores with 16 output features per program: 256 programs for
    ``N = 4096``, about two per multiprocessor of an H100/H200, without splitting ``K``. More
    rows take tensor cores on 64x128 weight tiles (fewer instructions per weight, see
    ``docs/kernels.md``), and ``K`` is split until there are 256 programs; the partial sums are
    reduced by ``splitk_reduce_kernel`` (one launch, which also adds the bias and rounds).
    Past 16 rows the rows come in tiles of 64 with 8 warps (4 warps spill on sm_80).

    Examples
    --------
    >>> default_config(1, 4096, 14336)
    (16, 256, 1, False, 4)
    >>> default_config(4, 4096, 14336)
    (64, 128, 4, True, 4)
    >>> default_config(2048, 4096, 14336)  # training: 64-row tiles fill the GPU without a split
    (64, 128, 1, True, 8)
    """
    block_n, block_k = (16, 256) if M == 1 else (64, 128)
    programs = -(-N // block_n) * (1 if M <= 16 else -(-M // 64))  # row tiles of 64 past 16 rows
    split_k = 1
    while programs * split_k < 256 and K >= 2 * split_k * block_k * 4:
        split_k *= 2
    return MatmulConfig(block_n, block_k, split_k, M > 1, 4 if M <= 16 else 8)  # 64-row tiles: 8 warps (4 spill)


def bytes_moved_matmul(state, M: int, x_dtype: torch.dtype) -> int:
    """Bytes the fused product must move: packed weight and constants once, ``x`` and ``y``.

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> _, state = quantize_4bit(torch.zeros(1024, 4096), double_quant=True)
    >>> round(bytes_moved_matmul(state, 1, torch.bfloat16) / state.numel, 4)
    0.5186
    """
    N, K = state.shape
    itemsize = torch.empty((), dtype=x_dtype).element_size()
    return state.nbytes + itemsize * M * (K + N)


def matmul_4bit_triton(x2d: torch.Tensor, flat: torch.Tensor, state, bias=None, config=None) -> torch.Tensor:
    """Run ``matmul_4bit_kernel``: ``y (M, N) = x2d (M, K) @ W^T (+ bias)`` in ``x2d.dtype``.

    Called by ``qlora_gpu.matmul_4bit`` for even ``K``, which validates
    the inputs. ``config`` (a ``MatmulConfig``) overrides ``default_config``.

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> packed, state = quantize_4bit(torch.eye(32), blocksize=32)
    >>> x = torch.arange(32.0).reshape(1, 32)
    >>> bool((matmul_4bit_triton(x, packed.reshape(-1), state) == x).all())
    True
    """
    M, K = x2d.shape
    N = state.shape[0]
    block_n, block_k, split_k, use_dot, num_warps = config or default_config(M, N, K)
    use_dot = use_dot or M > 1  # the CUDA-core path takes one row (Note: the one-row product's weights)
    block_m = 1 if not use_dot else 16 if M <= 16 else 64
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if split_k == 1:
        out = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    else:
        out = torch.empty((split_k, M, N), dtype=torch.float32, device=x2d.device)
    absmax, nested_absmax, nested_code, offset, nested = absmax_arguments(state)
    grid = (triton.cdiv(N, block_n), split_k, triton.cdiv(M, block_m))
    dot_in_fp32 = use_dot and interpreting() and x2d.dtype == torch.bfloat16
    with launch_context():
        matmul_4bit_kernel[grid](
            x2d, flat, _pair_table(state.codebook), absmax, nested_absmax, nested_code, offset,
            bias if bias is not None else state.codebook, out, M, N, K, K // 2, K // state.blocksize, x2d.stride(0),
            BLOCKSIZE=state.blocksize, NESTED=nested, ALIGNED=(K % state.blocksize == 0),
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
            USE_DOT=use_dot, PRECISION="ieee" if x2d.dtype == torch.float32 or dot_in_fp32 else "tf32",
            DOT_IN_FP32=dot_in_fp32, BITWISE=interpreting(), num_warps=num_warps, enable_fp_fusion=False,
        )
    if split_k == 1:
        return out
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    with launch_context():
        splitk_reduce_kernel[(triton.cdiv(M * N, REDUCE_BLOCK),)](
            out, bias if bias is not None else state.codebook, y, M * N, N,
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BITWISE=interpreting(), BLOCK=REDUCE_BLOCK,
            num_warps=4, enable_fp_fusion=False,
        )
    return y
