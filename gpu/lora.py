"""LoRA forward and closed-form backward on torch tensors, in mixed precision.

Fast pair of ``qlora_ref.lora`` (``lora_scaling``, ``lora_forward``, ``lora_backward``): the
same equations (see the oracle's Note: LoRA layer), computed in the dtypes a real layer uses
instead of float64; tests compare them in the derived tolerance tier. ``qlora_gpu.qlora`` builds
the 4-bit layer on these two functions.

Note: precision of the fast LoRA layer
    Three dtypes meet in a layer, as in PEFT on bitsandbytes:

    - the compute dtype ``W.dtype`` of the base product: ``x`` is cast to it and
      ``x W^T + bias`` runs in it (float32 accumulation inside the matmul);
    - the adapter dtype ``A.dtype`` (float32 by default, as PEFT keeps adapters): the adapter's
      input ``d * x`` is cast to it and ``s ((d x) A^T) B^T`` runs in it;
    - the output is ``base + adapter`` in the wider of the two, then cast to ``x.dtype``.

    The backward mirrors it: ``G W`` in the compute dtype, ``s G`` and the adapter gradients in
    the adapter dtype; the two parts of ``grad_x`` are each cast to ``x.dtype`` and summed in it
    (where autograd would accumulate them). ``h = (d x) A^T`` is recomputed in the
    backward rather than saved.

Public API
----------
``lora_scaling(alpha, r, *, rslora=False)`` -> float
``lora_forward(x, W, A, B, *, scaling, bias=None, dropout_mask=None)`` -> ``y``
``lora_backward(grad_y, x, W, A, B, *, scaling, dropout_mask=None)`` -> ``(grad_x, grad_A, grad_B)``
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["lora_scaling", "lora_forward", "lora_backward", "check_adapter"]


def lora_scaling(alpha, r: int, *, rslora: bool = False) -> float:
    """Return ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (fast pair of the oracle's).

    Raises
    ------
    TypeError
        If ``alpha`` is not a real number or ``r`` not an int.
    ValueError
        If ``alpha`` is negative or not finite, or ``r < 1``.

    Examples
    --------
    >>> lora_scaling(16, 8), lora_scaling(16, 64, rslora=True)
    (2.0, 2.0)
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r < 1:
        raise ValueError(f"the adapter rank r must be >= 1, got {r}")
    return float(alpha) / (math.sqrt(r) if rslora else r)


def check_adapter(in_features: int, out_features: int, A: torch.Tensor, B: torch.Tensor) -> None:
    """Check ``A (r, in)`` and ``B (out, r)`` with ``1 <= r <= min(in, out)``.

    Raises
    ------
    TypeError
        If ``A`` or ``B`` is not a floating-point tensor.
    ValueError
        If a shape does not fit.
    """
    for name, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if A.ndim != 2 or A.shape[1] != in_features:
        raise ValueError(f"A has shape {tuple(A.shape)}; expected (r, {in_features})")
    r = A.shape[0]
    if tuple(B.shape) != (out_features, r):
        raise ValueError(f"B has shape {tuple(B.shape)}; expected ({out_features}, {r})")
    if not 1 <= r <= min(in_features, out_features):
        raise ValueError(f"rank r = {r} must lie in 1..min(in, out) = {min(in_features, out_features)}")


def _check_x(x, in_features: int, dropout_mask) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features = {in_features}")
    if dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(f"dropout_mask has shape {tuple(dropout_mask.shape)}, but x has shape {tuple(x.shape)}")


def adapter_input(x: torch.Tensor, A: torch.Tensor, dropout_mask) -> torch.Tensor:
    """``d * x`` in the adapter dtype: the input of ``A``."""
    x_tilde = x.to(A.dtype)
    return x_tilde if dropout_mask is None else x_tilde * dropout_mask.to(A.dtype)


def adapter_forward(y_base: torch.Tensor, x: torch.Tensor, A, B, scaling: float, dropout_mask) -> torch.Tensor:
    """Add ``s ((d x) A^T) B^T`` (adapter dtype) to the base output; cast to ``x.dtype``."""
    h = F.linear(adapter_input(x, A, dropout_mask), A)  # (..., r)
    y_adapter = F.linear(h, B) * scaling  # (..., out)
    wide = torch.promote_types(y_base.dtype, y_adapter.dtype)
    return (y_base.to(wide) + y_adapter).to(x.dtype)


def adapter_backward(grad_x_base, grad_y, x, A, B, scaling: float, dropout_mask, needs=(True, True, True)):
    """The adapter's share of the backward (see Note: precision of the fast LoRA layer).

    ``grad_x_base`` is ``G W`` from the base product (or None); returns
    ``(grad_x, grad_A, grad_B)`` with None where ``needs`` is False.
    """
    in_features, out_features = A.shape[1], B.shape[0]
    x_tilde = adapter_input(x, A, dropout_mask).reshape(-1, in_features)  # (N, in)
    sG = (grad_y.to(A.dtype) * scaling).reshape(-1, out_features)  # (N, out)
    GB = sG @ B.to(A.dtype)  # (N, r)
    grad_A = GB.T @ x_tilde if needs[1] else None  # (r, in)
    grad_B = sG.T @ (x_tilde @ A.T) if needs[2] else None  # (out, r)
    grad_x = None
    if needs[0]:
        grad_x_tilde = (GB @ A).reshape(x.shape)  # (..., in)
        if dropout_mask is not None:
            grad_x_tilde = grad_x_tilde * dropout_mask.to(A.dtype)
        # Each branch's gradient is cast to x.dtype and summed there, as autograd accumulates.
        grad_x = grad_x_base.to(x.dtype) + grad_x_tilde.to(x.dtype)
    return grad_x, (None if grad_A is None else grad_A.to(A.dtype)), (None if grad_B is None else grad_B.to(B.dtype))


def lora_forward(x, W, A, B, *, scaling: float, bias=None, dropout_mask=None) -> torch.Tensor:
    """Forward pass of a LoRA linear layer (fast pair of ``qlora_ref.lora.lora_forward``).

    Parameters
    ----------
    x : Tensor, shape (..., in), float
    W : Tensor, shape (out, in)
        The frozen base weight; its dtype is the compute dtype.
    A : Tensor, shape (r, in)
        Its dtype is the adapter dtype.
    B : Tensor, shape (out, r)
    scaling : float
    bias : Tensor, shape (out,), optional
    dropout_mask : Tensor, shape (..., in), optional
        Entries 0 or ``1 / (1 - p)``, applied to the adapter's input only.

    Returns
    -------
    Tensor, shape (..., out), ``x.dtype``

    Raises
    ------
    TypeError, ValueError
        If a tensor has the wrong kind or shape.

    Notes
    -----
    ``y = x W^T + bias + s ((d x) A^T) B^T`` (LoRA section 4.1), in the dtypes of Note:
    precision of the fast LoRA layer.

    Examples
    --------
    >>> W = torch.eye(2); A = torch.tensor([[1.0, 0.0]]); B = torch.tensor([[0.0], [1.0]])
    >>> lora_forward(torch.tensor([3.0, 5.0]), W, A, B, scaling=2.0).tolist()
    [3.0, 11.0]
    """
    out_features, in_features = W.shape
    check_adapter(in_features, out_features, A, B)
    _check_x(x, in_features, dropout_mask)
    y_base = F.linear(x.to(W.dtype), W, None if bias is None else bias.to(W.dtype))
    return adapter_forward(y_base, x, A, B, scaling, dropout_mask)


def lora_backward(grad_y, x, W, A, B, *, scaling: float, dropout_mask=None):
    """Closed-form gradients of a LoRA layer (fast pair of ``qlora_ref.lora.lora_backward``).

    Parameters
    ----------
    grad_y : Tensor, shape (..., out)
    x, W, A, B, scaling, dropout_mask
        As in ``lora_forward``.

    Returns
    -------
    grad_x : Tensor, shape (..., in), ``x.dtype``
    grad_A : Tensor, shape (r, in), ``A.dtype``
    grad_B : Tensor, shape (out, r), ``B.dtype``

    Raises
    ------
    TypeError, ValueError
        As ``lora_forward``, or if ``grad_y`` has the wrong shape.

    Notes
    -----
    ``grad_x = G W + s d * ((G B) A)``, ``grad_A = s (G B)^T (d x)``,
    ``grad_B = s G^T ((d x) A^T)``; ``W`` gets no gradient (derivation in the oracle).

    Examples
    --------
    >>> W = torch.eye(2); A = torch.tensor([[1.0, 0.0]]); B = torch.tensor([[0.0], [1.0]])
    >>> gx, gA, gB = lora_backward(torch.ones(2), torch.tensor([3.0, 5.0]), W, A, B, scaling=2.0)
    >>> gx.tolist(), gA.tolist(), gB.tolist()
    ([3.0, 1.0], [[6.0, 10.0]], [[6.0], [6.0]])
    """
    out_features, in_features = W.shape
    check_adapter(in_features, out_features, A, B)
    _check_x(x, in_features, dropout_mask)
    if tuple(grad_y.shape) != tuple(x.shape[:-1]) + (out_features,):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}; expected {tuple(x.shape[:-1]) + (out_features,)}")
    grad_x_base = grad_y.to(W.dtype) @ W  # (..., in), compute dtype
    return adapter_backward(grad_x_base, grad_y, x, A, B, scaling, dropout_mask)
