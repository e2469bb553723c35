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
- grid ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``: each program owns ``BLOCK_N``
  output features of ``BLOCK_M`` rows and a ``1 / SPLIT_K`` share of ``K``; ``SPLIT_K > 1``
  writes float32 partials that ``splitk_reduce_kernel`` sums in a fixed order (deterministic,
  no atomics), adding the bias and rounding in the same launch, for the case where the other
  axes would not fill the GPU.
- each step loads a ``(BLOCK_N, BLOCK_K / 2)`` tile of packed bytes (rows are contiguous and
  the row length ``K / 2`` comes from the host, so loads are 16 bytes wide when it divides by
  16) and looks up each byte's two codebook values at once in a 256-entry table of float32
  pairs (``codebooks.pair_table``): one lookup per two weights. The tensor-core paths load the
  table once per program and look it up with ``tl.gather`` (on-chip, no global load per
  byte); the one-row path gathers from the L1-cached table in global memory.
- absmax: when ``K`` is a multiple of the block size each row of the tile holds whole groups
  and one absmax per group is loaded and broadcast (``ALIGNED``); otherwise blocks cross rows
  and the absmax is gathered per byte. Double-quantized absmax is decoded in the same step,
  ``code[q] * nested_absmax + offset`` with two roundings (launched with
  ``enable_fp_fusion=False``, see ``qlora_gpu.kernels.quantize``, Note: exact arithmetic in
  the Triton kernels).
- masks: rows of ``x`` past ``M`` and rows of ``W`` past ``N`` are read again from the last
  one (their results are never stored), so only ``K``, the sum's dimension, is masked, and
  not at all when the tiles divide it (``EVEN_K``).
- two or more rows: ``tl.dot`` (tensor cores). The decoded tile is rounded to the compute
  dtype and put back in column order (``tl.interleave`` of the even and odd columns), so one
  dot takes a contiguous ``(BLOCK_M, BLOCK_K)`` tile of ``x``. Up to 16 rows: ``BLOCK_M = 16``
  and ``K`` split across programs. Past 16 rows (training) each program multiplies
  ``row_tile(M)`` rows (64, 128 or 256 on sm_90) by the weight tile it decoded, and is
  compiled for at most 128 registers per thread so that two programs share a multiprocessor:
  the decode of one runs while the other's tensor-core products run (``docs/kernels.md``, the
  GEMM model). One row: CUDA cores, the two halves interleaved back into column order and
  multiplied with a contiguous row of ``x`` by ``tl.fma`` into a ``(BLOCK_N, BLOCK_K)``
  accumulator kept in the weight tile's layout, so nothing crosses threads inside the loop;
  one reduction over ``K`` after it.

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
with many rows the product becomes compute-bound, and each row tile decodes its weight tile
again (``cdiv(M, row_tile(M))`` reads of the packed weight, mostly from L2, each under a tenth
of a bf16 weight's bytes).
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from qlora_gpu import codebooks
from qlora_gpu.kernels.util import absmax_arguments, capability, cast_rne, interpreting, launch_context

__all__ = ["matmul_4bit_kernel", "splitk_reduce_kernel", "matmul_4bit_t_kernel", "matmul_4bit_t_triton",
           "matmul_4bit_triton", "MatmulConfig", "default_config", "CONFIGS",
           "bytes_moved_matmul", "row_tile", "F32_TILE"]


@triton.jit
def _absmax_at(blk, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED: tl.constexpr):
    """float32 absmax of first-level blocks ``blk`` (decoded from 8 bits when ``NESTED``);
    ``mask`` None when every block is inside the tensor."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=None if mask is None else 0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + blk // NESTED, mask=mask, other=None if mask is None else 0.0)
        return tl.load(nested_code_ptr + q) * scale + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=None if mask is None else 0.0)


@triton.jit
def _halves(pair):
    """The two float32 codebook values packed in each int64 of the pair table:
    ``(high nibble, low nibble)``, i.e. the even and the odd columns."""
    v_hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    v_lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    return v_hi, v_lo


@triton.jit
def _pairs_of(b, table, BLOCK_N: tl.constexpr, HALF_K: tl.constexpr):
    """Each packed byte's two codebook values (``_halves``), looked up in ``table``, the
    256-entry pair table held by the program (``codebooks.pair_table``): a gather from on-chip
    memory (``tl.gather``) instead of a load from global memory per byte."""
    return _halves(tl.reshape(tl.gather(table, tl.reshape(b.to(tl.int32), (BLOCK_N * HALF_K,)), 0),
                              (BLOCK_N, HALF_K)))


@triton.jit
def _times_group_absmax(v, a, BLOCK_N: tl.constexpr, G: tl.constexpr, HALF_K: tl.constexpr):
    """``v (BLOCK_N, HALF_K) * a (BLOCK_N, G)``, each absmax broadcast over its group's bytes."""
    return tl.reshape(tl.reshape(v, (BLOCK_N, G, HALF_K // G)) * a[:, :, None], (BLOCK_N, HALF_K))


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
    EVEN_K: tl.constexpr,  # K % (SPLIT_K * BLOCK_K) == 0: no tile reaches past K, nothing to mask
    WIDE: tl.constexpr,  # offsets into x or the output reach 2^31 (64-bit row offsets)
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
    if WIDE:  # offsets into x or the output reach 2^31: compute them in 64 bits
        offs_m = offs_m.to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    # Rows of x past M and rows of W past N are read again from the last one (their results are
    # never stored): the loads need no mask. Only K, the sum's dimension, is masked (not EVEN_K).
    rows_x = tl.minimum(offs_m, M - 1)
    rows_w = tl.minimum(offs_n, N - 1)
    x_dtype = x_ptr.dtype.element_ty
    if SPLIT_K == 1:  # the whole of K (bounds the compiler can see)
        k_start = 0
        k_end = K
    else:
        k_chunk = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
        k_start = pid_k * k_chunk
        k_end = tl.minimum(k_start + k_chunk, K)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        table = tl.load(pair_ptr + tl.arange(0, 256))  # the pair table, held for the whole loop
    else:  # one row of x: products accumulate in the weight tile's layout, reduced after the loop
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        j = k0 // 2 + tl.arange(0, HALF_K)  # (HALF_K,) byte column
        if EVEN_K:
            b = tl.load(packed_ptr + rows_w[:, None] * half_k + j[None, :])  # (BLOCK_N, HALF_K)
        else:
            b = tl.load(packed_ptr + rows_w[:, None] * half_k + j[None, :], mask=(j < half_k)[None, :], other=0)
        if USE_DOT:
            v_hi, v_lo = _pairs_of(b, table, BLOCK_N, HALF_K)
        else:  # one gather per byte from the (L1-cached) table in global memory
            v_hi, v_lo = _halves(tl.load(pair_ptr + b.to(tl.int32)))
        if ALIGNED:
            # Each tile row holds G whole blocks (or lies inside one): one absmax per group.
            G: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K >= BLOCKSIZE else 1
            blk = rows_w[:, None] * blocks_per_row + k0 // BLOCKSIZE + tl.arange(0, G)[None, :]  # (BLOCK_N, G)
            if EVEN_K:
                a = _absmax_at(blk, None, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED)
            else:
                a = _absmax_at(blk, ((k0 + tl.arange(0, G) * BLOCKSIZE) < K)[None, :], absmax_ptr,
                               nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED)
            w_hi = _times_group_absmax(v_hi, a, BLOCK_N, G, HALF_K)
            w_lo = _times_group_absmax(v_lo, a, BLOCK_N, G, HALF_K)
        else:
            blk = (rows_w[:, None] * K + 2 * j[None, :]) // BLOCKSIZE  # block of the even element
            a = _absmax_at(blk, (j < half_k)[None, :], absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                           NESTED)
            w_hi = v_hi * a
            w_lo = v_lo * a
        if USE_DOT:
            # Tensor-core input: the weight rounded as the oracle does, back in column order, so
            # one dot takes a contiguous (BLOCK_M, BLOCK_K) tile of x.
            w = tl.interleave(cast_rne(w_hi, x_dtype, BITWISE), cast_rne(w_lo, x_dtype, BITWISE))
            k = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                x = tl.load(x_ptr + rows_x[:, None] * stride_xm + k[None, :])  # (BLOCK_M, BLOCK_K)
            else:
                x = tl.load(x_ptr + rows_x[:, None] * stride_xm + k[None, :], mask=(k < K)[None, :], other=0.0)
            if DOT_IN_FP32:  # interpreter only: its dot multiplies bf16 bit patterns as integers
                x, w = x.to(tl.float32), w.to(tl.float32)  # exact, as are the products
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        else:
            k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) one contiguous row of x
            x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            w = tl.interleave(w_hi, w_lo)  # (BLOCK_N, BLOCK_K) float32, the oracle's float32 decode
            # A fused multiply-add written out: the sum's order and rounding are free in the
            # derived tier (Note: the one-row product's weights).
            acc2 = tl.fma(w, x[None, :], acc2)
    if not USE_DOT:
        acc = tl.sum(acc2, axis=1)[None, :]  # (1, BLOCK_N)
    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows_w).to(tl.float32)[None, :]
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
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no weight tile reaches past N, nothing to mask
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no tile reaches past K
    WIDE: tl.constexpr,  # offsets into g or the output reach 2^31 (64-bit row offsets)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BITWISE: tl.constexpr,
):
    """``out (M, K) = g (M, N) @ W (N, K)``: each program owns ``BLOCK_K`` input features and
    ``BLOCK_M`` rows and walks ``N``; the weight tile is decoded exactly as in
    ``matmul_4bit_kernel`` (rounded to the compute dtype for the tensor cores, back in column
    order). Rows of ``g`` past ``M`` and columns of ``W`` past ``K`` are read again from the
    last one and never stored; rows of ``W`` past ``N`` (the sum's dimension) are masked unless
    ``EVEN_N``."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    G: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K >= BLOCKSIZE else 1  # blocks per tile row
    k0 = tl.program_id(0) * BLOCK_K
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    if WIDE:  # offsets into g or the output reach 2^31: compute them in 64 bits
        offs_m = offs_m.to(tl.int64)
    rows_g = tl.minimum(offs_m, M - 1)
    j = k0 // 2 + tl.arange(0, HALF_K)  # (HALF_K,) byte column
    blk_col = k0 // BLOCKSIZE + tl.arange(0, G)  # (G,) block column
    if not EVEN_K:  # columns past K: read again from the last one, never stored
        j = tl.minimum(j, half_k - 1)
        blk_col = tl.minimum(blk_col, blocks_per_row - 1)
    g_dtype = g_ptr.dtype.element_ty
    table = tl.load(pair_ptr + tl.arange(0, 256))  # the pair table, held for the whole loop
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        if EVEN_N:
            b = tl.load(packed_ptr + offs_n[:, None] * half_k + j[None, :])  # (BLOCK_N, HALF_K)
        else:
            b = tl.load(packed_ptr + offs_n[:, None] * half_k + j[None, :], mask=(offs_n < N)[:, None], other=0)
        v_hi, v_lo = _pairs_of(b, table, BLOCK_N, HALF_K)
        blk = offs_n[:, None] * blocks_per_row + blk_col[None, :]  # (BLOCK_N, G)
        if EVEN_N:
            a = _absmax_at(blk, None, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED)
        else:
            a = _absmax_at(blk, (offs_n < N)[:, None], absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                           NESTED)
        w = tl.interleave(cast_rne(_times_group_absmax(v_hi, a, BLOCK_N, G, HALF_K), g_dtype, BITWISE),
                          cast_rne(_times_group_absmax(v_lo, a, BLOCK_N, G, HALF_K), g_dtype, BITWISE))
        if EVEN_N:
            g = tl.load(g_ptr + rows_g[:, None] * stride_gm + offs_n[None, :])  # (BLOCK_M, BLOCK_N)
        else:
            g = tl.load(g_ptr + rows_g[:, None] * stride_gm + offs_n[None, :], mask=(offs_n < N)[None, :], other=0.0)
        if DOT_IN_FP32:  # interpreter only: its dot multiplies bf16 bit patterns as integers
            g, w = g.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    kk = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_m[:, None] * K + kk[None, :], cast_rne(acc, out_ptr.dtype.element_ty, BITWISE),
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
    cap = capability(g2d.device)
    if g2d.dtype == torch.float32:
        block_m, block_n, block_k = F32_TILE
    else:
        block_m, block_n = row_tile(M, cap), 64
        block_k = 64 if block_m == 256 else 128  # 256-row tiles: 64 columns keep a thread under 128 registers
    out = torch.empty((M, K), dtype=g2d.dtype, device=g2d.device)
    absmax, nested_absmax, nested_code, offset, nested = absmax_arguments(state)
    dot_in_fp32 = interpreting() and g2d.dtype == torch.bfloat16
    with launch_context():
        matmul_4bit_t_kernel[(triton.cdiv(K, block_k), triton.cdiv(M, block_m))](
            g2d, flat, _pair_table(state.codebook), absmax, nested_absmax, nested_code, offset, out,
            M, N, K, K // 2, K // state.blocksize, g2d.stride(0),
            BLOCKSIZE=state.blocksize, NESTED=nested, EVEN_N=(N % block_n == 0), EVEN_K=(K % block_k == 0),
            WIDE=_wide(M * g2d.stride(0), M * K), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            PRECISION="ieee" if g2d.dtype == torch.float32 or dot_in_fp32 else "tf32", DOT_IN_FP32=dot_in_fp32,
            BITWISE=interpreting(), num_warps=8 if block_m >= 64 else 4, enable_fp_fusion=False,
            **_gemm_options(block_m, cap),
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
#: deep (and of at most 4096 weights when deeper than 128). The compiled code of larger tiles
#: spills on sm_80 or sm_90, and the tensor-core 64x512 tile needs more shared memory than an
#: A100 block has (``benchmarks/kernel_report.py``).
CONFIGS = [
    MatmulConfig(bn, bk, sk, dot, w)
    for bn in (16, 32, 64)
    for bk in (128, 256, 512)
    for sk in (1, 2, 4)
    for dot in (False, True)
    for w in (4,)
    if bn * bk <= 8192 and not (dot and (bk > 256 or bk > 128 and bn * bk > 4096))
]


def _wide(*extents: int) -> bool:
    """Whether element offsets up to these extents (plus a tile) need 64 bits: the kernels
    compute row offsets in 32 bits otherwise, which is cheaper in the main loop.

    Examples
    --------
    >>> _wide(2048 * 14336, 2048 * 4096), _wide(150_000 * 14336)
    (False, True)
    """
    return max(extents) + 2**20 >= 2**31


#: Rows, columns of the weight and depth of a float32 tile: its dots run on CUDA cores in full
#: precision (no TF32), and larger tiles spill (``benchmarks/kernel_report.py``).
F32_TILE = (16, 32, 64)


def row_tile(M: int, cap: tuple = (9, 0)) -> int:
    """Rows of ``x`` (or ``g``) one tensor-core program multiplies on a GPU of compute
    capability ``cap``: the weight tile it decodes serves that many rows, so larger tiles spend
    fewer decode instructions per product. sm_90 (H100/H200) takes up to 256 (its ``wgmma``
    keeps the accumulator within 128 registers per thread); other GPUs 64: beyond it their
    ``mma.sync`` code spills (sm_80, sm_120), and sm_100's tensor-core code has not been
    studied here (``docs/kernels.md``).

    Examples
    --------
    >>> [row_tile(m) for m in (2, 16, 17, 64, 65, 512, 1024, 1025, 2048)]
    [16, 16, 64, 64, 128, 128, 128, 256, 256]
    >>> row_tile(2048, (8, 0)), row_tile(2048, (12, 0))
    (64, 64)
    """
    if M <= 16:
        return 16
    if cap[0] != 9 or M <= 64:
        return 64
    return 128 if M <= 1024 else 256


def _gemm_options(block_m: int, cap: tuple) -> dict:
    """Compiler options of a default tensor-core launch past 64 rows on sm_90: two stages of software
    pipelining and at most 128 registers per thread, so that two programs of 8 warps fit on one
    multiprocessor (65,536 registers) and one decodes while the other's tensor-core products
    run (``docs/kernels.md``, the GEMM model). Nothing under the interpreter, which has no
    compiler, nor elsewhere (Triton's defaults)."""
    if block_m <= 64 or cap[0] != 9 or interpreting():
        return {}
    return dict(num_stages=2, maxnreg=128)


def default_config(M: int, N: int, K: int, cap: tuple = (9, 0), dtype=None) -> MatmulConfig:
    """A reasonable configuration before tuning: enough programs to fill a large GPU.

    One row of ``x`` takes CUDA cores with 16 output features per program: 256 programs for
    ``N = 4096``, about two per multiprocessor of an H100/H200, without splitting ``K``. Two to
    16 rows take tensor cores on 64x128 weight tiles (fewer instructions per weight, see
    ``docs/kernels.md``), and ``K`` is split until there are 256 programs; the partial sums are
    reduced by ``splitk_reduce_kernel`` (one launch, which also adds the bias and rounds).
    Past 16 rows (training) each program multiplies ``row_tile(M)`` rows by a 64-row weight
    tile with 8 warps, 128 columns deep, or 64 deep for 256-row tiles (a thread stays under the
    128 registers that let two programs share a multiprocessor).

    Examples
    --------
    >>> default_config(1, 4096, 14336)
    (16, 256, 1, False, 4)
    >>> default_config(4, 4096, 14336)
    (64, 128, 4, True, 4)
    >>> default_config(512, 4096, 14336)  # 128-row tiles: 256 programs, no split
    (64, 128, 1, True, 8)
    >>> default_config(2048, 4096, 14336)  # 256-row tiles
    (64, 64, 1, True, 8)
    >>> default_config(2048, 4096, 14336, dtype=torch.float32)
    (32, 64, 1, True, 4)
    """
    if M > 16 and dtype != torch.float32:
        return MatmulConfig(64, 64 if row_tile(M, cap) == 256 else 128, 1, True, 8)
    block_m, block_n, block_k = (1, 16, 256) if M == 1 else F32_TILE if dtype == torch.float32 else (16, 64, 128)
    programs = -(-N // block_n) * -(-M // block_m)
    split_k = 1
    while programs * split_k < 256 and K >= 2 * split_k * block_k * 4:
        split_k *= 2
    return MatmulConfig(block_n, block_k, split_k, M > 1, 4)


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
    the inputs. ``config`` (a ``MatmulConfig``) overrides ``default_config``; with it the rows
    come in tiles of 16 (up to 16 rows) or 64 and Triton's default compiler options apply (the
    benchmark sweep's tiles), whereas the default configuration takes ``row_tile(M)`` rows.

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
    cap = capability(x2d.device)
    block_n, block_k, split_k, use_dot, num_warps = config or default_config(M, N, K, cap, x2d.dtype)
    use_dot = use_dot or M > 1  # the CUDA-core path takes one row (Note: the one-row product's weights)
    if not use_dot:
        block_m = 1
    elif x2d.dtype == torch.float32:
        block_m = F32_TILE[0]
    elif config is not None:  # a sweep's tile
        block_m = 16 if M <= 16 else 64
    else:
        block_m = row_tile(M, cap)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
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
            EVEN_K=(K % (split_k * block_k) == 0), WIDE=_wide(M * x2d.stride(0), split_k * M * N),
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, SPLIT_K=split_k, USE_DOT=use_dot,
            PRECISION="ieee" if x2d.dtype == torch.float32 or dot_in_fp32 else "tf32",
            DOT_IN_FP32=dot_in_fp32, BITWISE=interpreting(), num_warps=num_warps, enable_fp_fusion=False,
            **_gemm_options(block_m, cap),
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
