"""``matmul_4bit``: ``y = x W^T + bias`` with ``W`` stored blockwise in 4 bits.

Pairs with ``x @ qlora_ref.qlora.qlora_base_weight(packed, state, compute_dtype=x.dtype).T``
(the base term of the oracle's ``qlora_forward``): the weight is decoded, rounded to the dtype of
``x`` (the compute dtype), and multiplied with float32 accumulation; results are compared in
the derived tolerance tier. The fused Triton kernel with a single row multiplies the float32
decoded weight instead, unrounded (``qlora_gpu.kernels.matmul``, Note: the one-row product's
weights).

Public API
----------
``matmul_4bit(x, packed, state, *, bias=None, backend="auto", config=None)``
    ``x (..., K)`` float32/float16/bfloat16 (float64 on the torch backend), ``W (N, K)``;
    returns ``(..., N)`` in ``x.dtype``. With the Triton backend (and an even ``K``) the fused
    kernel of ``qlora_gpu.kernels.matmul`` reads the packed weight directly for any number of
    rows (CUDA cores for one row, tensor cores on row tiles of 16 to 256 otherwise) and no
    decoded weight is written to memory; otherwise the weight is decoded once (one-pass kernel
    on Triton) and multiplied with ``torch.nn.functional.linear``.
"""

from __future__ import annotations

import torch

from qlora_gpu.quantize import check_packed, dequantize_4bit, resolve_backend

__all__ = ["matmul_4bit", "matmul_4bit_t"]

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight_shape(fn: str, name: str, t, state, *, contracted_axis: int) -> tuple[int, int]:
    """Check the operand ``t`` against the 2-D weight ``(N, K)``; return ``(N, K)``.

    ``t``'s last dimension must be the weight's ``contracted_axis`` (1: ``x W^T``, 0: ``g W``).
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if len(state.shape) != 2:
        raise ValueError(f"{fn} needs a 2-D weight (N, K); the state has shape {state.shape}")
    N, K = state.shape
    size, label = (K, "K") if contracted_axis == 1 else (N, "N")
    if t.ndim < 1 or t.shape[-1] != size:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; its last dimension must be {label} = {size}")
    return N, K


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state, *, bias=None, backend: str = "auto",
                config=None) -> torch.Tensor:
    """Multiply by a 4-bit weight: ``y = x W^T + bias`` in ``x.dtype``.

    Parameters
    ----------
    x : Tensor, shape (..., K), float32, float16, bfloat16 (or float64, torch backend)
        Its dtype is the compute dtype: ``W`` is decoded and rounded to it.
    packed : Tensor, shape ((N * K + 1) // 2, 1), uint8
    state : QuantState
        Of a 2-D weight ``(N, K)``.
    bias : Tensor, shape (N,), optional
        Added in float32 before the final rounding (fused kernel) or by ``linear``.
    backend : {"auto", "torch", "triton"}
    config : qlora_gpu.kernels.matmul.MatmulConfig, optional
        Launch configuration of the fused kernel (a benchmark sweep's); rows then come in tiles
        of 16, or 64 past 16 rows. Without it the kernel's ``default_config`` and ``row_tile``
        choose for the GPU.

    Returns
    -------
    Tensor, shape (..., N), ``x.dtype``

    Raises
    ------
    TypeError
        If ``x`` is not a float tensor or ``packed``/``state`` have the wrong types.
    ValueError
        If the state is not 2-D or ``x``'s last dimension is not ``K``.

    Notes
    -----
    QLoRA eq. 5, base term: ``X doubleDequant(c1, c2, W_NF4)``, here transposed to torch's
    ``(out, in)`` weight layout.

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> packed, state = quantize_4bit(torch.eye(64), blocksize=64)
    >>> x = torch.randn(3, 64)
    >>> bool(torch.equal(matmul_4bit(x, packed, state), x))
    True
    """
    flat = check_packed(packed, state)
    N, K = _weight_shape("matmul_4bit", "x", x, state, contracted_axis=1)
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")
    backend = resolve_backend(backend, x.device)
    x2d = x.reshape(-1, K)  # (M, K)
    M = x2d.shape[0]
    if backend == "triton" and M > 0 and K % 2 == 0 and x.dtype in _FUSED_DTYPES:
        from qlora_gpu.kernels.matmul import matmul_4bit_triton  # optional: the kernels need Triton

        y = matmul_4bit_triton(x2d, flat, state, bias=bias, config=config)
        return y.reshape(*x.shape[:-1], N)
    W = dequantize_4bit(packed, state, dtype=x.dtype, backend=backend)  # (N, K) in x.dtype
    return torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))


def matmul_4bit_t(g: torch.Tensor, packed: torch.Tensor, state, *, backend: str = "auto") -> torch.Tensor:
    """Multiply by a 4-bit weight untransposed: ``g W``, the input gradient of ``x W^T``.

    Pairs with ``g @ qlora_ref.qlora.qlora_base_weight(packed, state, compute_dtype=g.dtype)``
    (the base term of the oracle's ``qlora_backward``): the weight is decoded and rounded to the
    dtype of ``g``, products accumulate in float32; compared in the derived tier.

    Parameters
    ----------
    g : Tensor, shape (..., N), float32, float16, bfloat16 (or float64, torch backend)
    packed : Tensor, shape ((N * K + 1) // 2, 1), uint8
    state : QuantState
        Of a 2-D weight ``(N, K)``.
    backend : {"auto", "torch", "triton"}
        With Triton, an even ``K`` that is a multiple of the block size, the fused kernel
        ``qlora_gpu.kernels.matmul.matmul_4bit_t_kernel`` reads the packed weight directly and no
        decoded weight is written; otherwise the weight is decoded once and multiplied.

    Returns
    -------
    Tensor, shape (..., K), ``g.dtype``

    Raises
    ------
    ValueError
        If the state is not 2-D or ``g``'s last dimension is not ``N``.

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> packed, state = quantize_4bit(torch.eye(64), blocksize=64)
    >>> g = torch.randn(3, 64)
    >>> bool(torch.equal(matmul_4bit_t(g, packed, state), g))
    True
    """
    flat = check_packed(packed, state)
    N, K = _weight_shape("matmul_4bit_t", "g", g, state, contracted_axis=0)
    backend = resolve_backend(backend, g.device)
    g2d = g.reshape(-1, N)  # (M, N)
    if (backend == "triton" and g2d.shape[0] > 0 and K % 2 == 0 and K % state.blocksize == 0
            and g.dtype in _FUSED_DTYPES):
        from qlora_gpu.kernels.matmul import matmul_4bit_t_triton  # optional: the kernels need Triton

        return matmul_4bit_t_triton(g2d, flat, state).reshape(*g.shape[:-1], K)
    W = dequantize_4bit(packed, state, dtype=g.dtype, backend=backend)  # (N, K) in g.dtype
    return g @ W
