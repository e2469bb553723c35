"""QLoRA on torch tensors: LoRA on a frozen 4-bit base, with an autograd function that keeps no
dense weight between forward and backward.

Fast pair of ``qlora_ref.qlora`` (``qlora_base_weight``, ``qlora_forward``, ``qlora_backward``):
the base weight is decoded exactly (``qlora_gpu.dequantize_4bit``) and rounded to the compute
dtype, as the oracle's Note: QLoRA rounding says; the rest follows ``qlora_gpu.lora``'s Note:
precision of the fast LoRA layer. Tests compare with the oracle in the derived tolerance tier.

Note: what autograd keeps
    ``QLoRAFunction`` saves the layer's input ``x``, the dropout mask (when there is one), the
    adapters ``A`` and ``B`` (parameters, not copies) and the packed 4-bit weight (a buffer of
    the module, not a copy). ``G W`` in the backward goes through ``matmul_4bit_t``: with the
    Triton backend the weight is decoded tile by tile in registers (as ``x W^T`` in the forward,
    ``matmul_4bit``), otherwise decoded once and dropped: activation memory per layer is the
    input (and the mask), never an ``(out, in)`` dense matrix. ``h = (d x) A^T`` is recomputed too (``r`` columns).

Public API
----------
``qlora_base_weight(packed, state, *, compute_dtype=torch.bfloat16, backend="auto")`` -> ``W_c``
``qlora_forward(x, packed, state, A, B, *, scaling, compute_dtype=torch.bfloat16, bias=None,
dropout_mask=None, backend="auto")`` -> ``y`` (no autograd)
``qlora_backward(grad_y, x, packed, state, A, B, *, scaling, compute_dtype=torch.bfloat16,
dropout_mask=None, backend="auto")`` -> ``(grad_x, grad_A, grad_B)``
``qlora_linear(...)``: same arguments as ``qlora_forward``, differentiable in ``x``, ``A``, ``B``
through ``QLoRAFunction``.
"""

from __future__ import annotations

import torch

from qlora_gpu.lora import adapter_backward, adapter_forward, check_adapter
from qlora_gpu.matmul import matmul_4bit, matmul_4bit_t
from qlora_gpu.quantize import check_packed, dequantize_4bit
from qlora_gpu.state import torch_dtype

__all__ = ["qlora_base_weight", "qlora_forward", "qlora_backward", "qlora_linear", "QLoRAFunction"]


def _check(x, packed, state, A, B, dropout_mask, scaling):
    check_packed(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"a QLoRA base weight is 2-D (out, in); the state has shape {state.shape}")
    out_features, in_features = state.shape
    check_adapter(in_features, out_features, A, B)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features = {in_features}")
    if dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(f"dropout_mask has shape {tuple(dropout_mask.shape)}, but x has shape {tuple(x.shape)}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not scaling >= 0:
        raise ValueError(f"scaling must be a real number >= 0, got {scaling!r}")


def qlora_base_weight(packed, state, *, compute_dtype=torch.bfloat16, backend: str = "auto") -> torch.Tensor:
    """Decode a 4-bit base weight into the compute dtype (fast pair of the oracle's).

    Parameters
    ----------
    packed : Tensor, shape ((out * in + 1) // 2, 1), uint8
    state : QuantState
        Of a 2-D ``(out, in)`` weight.
    compute_dtype : torch.dtype or str
        bfloat16, float16, float32 (or float64, exact, for gradcheck).
    backend : {"auto", "torch", "triton"}

    Returns
    -------
    Tensor, shape (out, in), ``compute_dtype``

    Raises
    ------
    TypeError, ValueError
        As ``dequantize_4bit``; ValueError if the state is not 2-D.

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> packed, state = quantize_4bit(torch.eye(8), blocksize=32)
    >>> qlora_base_weight(packed, state).dtype
    torch.bfloat16
    """
    check_packed(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"a QLoRA base weight is 2-D (out, in); the state has shape {state.shape}")
    return dequantize_4bit(packed, state, dtype=torch_dtype(compute_dtype), backend=backend)


def qlora_forward(x, packed, state, A, B, *, scaling: float, compute_dtype=torch.bfloat16, bias=None,
                  dropout_mask=None, backend: str = "auto") -> torch.Tensor:
    """Forward pass of a QLoRA layer (fast pair of ``qlora_ref.qlora.qlora_forward``).

    Parameters
    ----------
    x : Tensor, shape (..., in), float
    packed, state
        The 4-bit base weight ``(out, in)``.
    A : Tensor, shape (r, in); B : Tensor, shape (out, r)
        Adapters; ``A.dtype`` is the adapter dtype.
    scaling : float, >= 0
    compute_dtype : torch.dtype or str
        The base weight is decoded and rounded to it; ``x W^T`` runs in it.
    bias : Tensor, shape (out,), optional
    dropout_mask : Tensor, shape (..., in), optional
        Entries 0 or ``1 / (1 - p)``.
    backend : {"auto", "torch", "triton"}
        Triton uses the fused small-batch kernel for at most 16 rows.

    Returns
    -------
    Tensor, shape (..., out), ``x.dtype``

    Raises
    ------
    TypeError, ValueError
        If a tensor has the wrong kind or shape.

    Notes
    -----
    QLoRA eq. 5: ``y = x W_c^T + bias + s ((d x) A^T) B^T``,
    ``W_c = round_compute(decode(packed, state))``.

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> packed, state = quantize_4bit(torch.eye(4), blocksize=32)
    >>> A, B = torch.ones(1, 4), torch.zeros(4, 1)
    >>> qlora_forward(torch.ones(2, 4), packed, state, A, B, scaling=1.0).tolist()
    [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    """
    _check(x, packed, state, A, B, dropout_mask, scaling)
    cd = torch_dtype(compute_dtype)
    y_base = matmul_4bit(x.to(cd), packed, state, bias=None if bias is None else bias.to(cd), backend=backend)
    return adapter_forward(y_base, x, A, B, float(scaling), dropout_mask)


def qlora_backward(grad_y, x, packed, state, A, B, *, scaling: float, compute_dtype=torch.bfloat16,
                   dropout_mask=None, backend: str = "auto", needs=(True, True, True)):
    """Gradients of a QLoRA layer (fast pair of ``qlora_ref.qlora.qlora_backward``).

    Parameters
    ----------
    grad_y : Tensor, shape (..., out)
    x, packed, state, A, B, scaling, compute_dtype, dropout_mask, backend
        As in ``qlora_forward``.
    needs : tuple of 3 bools
        Which of ``(grad_x, grad_A, grad_B)`` to compute (the others are None); without
        ``grad_x`` the base weight is not decoded at all.

    Returns
    -------
    grad_x : Tensor, shape (..., in), ``x.dtype``
    grad_A : Tensor, shape (r, in), ``A.dtype``
    grad_B : Tensor, shape (out, r), ``B.dtype``

    Raises
    ------
    TypeError, ValueError
        As ``qlora_forward``, or if ``grad_y`` has the wrong shape.

    Notes
    -----
    ``grad_x = G W_c + s d * ((G B) A)``, ``grad_A = s (G B)^T (d x)``,
    ``grad_B = s G^T ((d x) A^T)``; the 4-bit codes get no gradient.

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> packed, state = quantize_4bit(torch.eye(4), blocksize=32)
    >>> gx, gA, gB = qlora_backward(torch.ones(4), torch.ones(4), packed, state, torch.ones(1, 4),
    ...                             torch.ones(4, 1), scaling=0.5, compute_dtype=torch.float32)
    >>> gx.tolist(), gB.flatten().tolist()
    ([3.0, 3.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0])
    """
    _check(x, packed, state, A, B, dropout_mask, scaling)
    out_features = state.shape[0]
    if tuple(grad_y.shape) != tuple(x.shape[:-1]) + (out_features,):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}; expected {tuple(x.shape[:-1]) + (out_features,)}")
    grad_x_base = None
    if needs[0]:
        cd = torch_dtype(compute_dtype)
        grad_x_base = matmul_4bit_t(grad_y.to(cd), packed, state, backend=backend)  # (..., in), W decoded in tiles
    return adapter_backward(grad_x_base, grad_y, x, A, B, float(scaling), dropout_mask, needs)


class QLoRAFunction(torch.autograd.Function):
    """Autograd function of a QLoRA layer; see Note: what autograd keeps.

    ``apply(x, A, B, bias, dropout_mask, packed, state, scaling, compute_dtype, backend)``;
    gradients flow to ``x``, ``A`` and ``B`` only (the bias and the 4-bit base are frozen).
    """

    @staticmethod
    def forward(ctx, x, A, B, bias, dropout_mask, packed, state, scaling, compute_dtype, backend):
        cd = torch_dtype(compute_dtype)
        y_base = matmul_4bit(x.to(cd), packed, state, bias=None if bias is None else bias.to(cd), backend=backend)
        y = adapter_forward(y_base, x, A, B, scaling, dropout_mask)
        ctx.save_for_backward(x, A, B, dropout_mask, packed)
        ctx.state, ctx.scaling, ctx.compute_dtype, ctx.backend = state, scaling, cd, backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, A, B, dropout_mask, packed = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        grad_x_base = None
        if needs[0]:
            grad_x_base = matmul_4bit_t(grad_y.to(ctx.compute_dtype), packed, ctx.state, backend=ctx.backend)
        grad_x, grad_A, grad_B = adapter_backward(grad_x_base, grad_y, x, A, B, ctx.scaling, dropout_mask, needs)
        return grad_x, grad_A, grad_B, None, None, None, None, None, None, None


def qlora_linear(x, packed, state, A, B, *, scaling: float, compute_dtype=torch.bfloat16, bias=None,
                 dropout_mask=None, backend: str = "auto") -> torch.Tensor:
    """Differentiable QLoRA layer: ``qlora_forward`` with ``qlora_backward`` as its gradient.

    Arguments and result as ``qlora_forward``; gradients reach ``x``, ``A`` and ``B``.

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> packed, state = quantize_4bit(torch.eye(4), blocksize=32)
    >>> A = torch.ones(1, 4, requires_grad=True); B = torch.ones(4, 1, requires_grad=True)
    >>> qlora_linear(torch.ones(4), packed, state, A, B, scaling=0.5).sum().backward()
    >>> A.grad.tolist()
    [[2.0, 2.0, 2.0, 2.0]]
    """
    _check(x, packed, state, A, B, dropout_mask, scaling)
    return QLoRAFunction.apply(x, A, B, bias, dropout_mask, packed, state, float(scaling), compute_dtype, backend)
