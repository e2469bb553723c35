"""DoRA (weight-decomposed LoRA) as PEFT implements it: forward, backward, norm and merge, in float64.

DoRA (Liu et al. 2024) writes the adapted weight as a magnitude times a direction,
``W' = m * V / ||V||`` with ``V = W + s B A`` and the norm taken per output row, and trains the
magnitude ``m (out,)`` beside ``A`` and ``B``. Pairs with PEFT's ``use_dora=True`` on
``lora.Linear`` and ``lora.Linear4bit`` (the conformance comparators) and with
``qlora_ref.lora`` (the same layer with ``m = ||V||``, for which DoRA reduces to LoRA).

Note: DoRA as PEFT computes it (peft 0.21, ``DoraLinearLayer`` and ``DoraLinearVariant``)
    - The norm is ``n = ||W + s B A||`` over the input dimension, one value per output row
      (``torch.linalg.norm(weight + scaling * lora_weight, dim=1)`` on the ``(out, in)``
      weight; the paper's "column-wise" norm of its ``(in, out)`` convention).
    - ``m`` is initialised to that norm (``update_layer``), so a fresh DoRA layer equals the
      base, and a fresh LoRA layer with ``B = 0`` makes ``m = ||W||``.
    - The forward is written as a correction added to the base output, with ``c = m / n``::

          y = x W^T + bias + (c - 1) * ((d x) W^T) + c * s ((d x) A^T) B^T

      Without dropout (``d = 1``, PEFT's ``nn.Identity`` or eval mode, where PEFT reuses the
      base output minus its bias) this is ``y = c * (x V^T) + bias``: the bias is not scaled.
      With dropout, PEFT recomputes ``(d x) W^T`` for the correction, so the base term still
      sees the undropped ``x``.
    - The norm is detached from the graph (DoRA section 4.3: "treat ``||V + dV||_c`` as a
      constant"): it is evaluated at the current ``A``, ``B`` but no gradient flows through it.
      ``dora_backward(detach_norm=True)`` gives PEFT's gradients; ``detach_norm=False`` the full
      gradient of the same forward, for comparison.
"""

from __future__ import annotations

import numpy as np

from qlora_ref.lora import (
    check_adapter,
    check_bias,
    check_grad_y,
    check_input,
    check_mask,
    check_per_output,
    check_scaling,
)

__all__ = ["dora_weight_norm", "dora_forward", "dora_backward", "dora_merge"]


def _row_norm(V: np.ndarray) -> np.ndarray:
    n = np.sqrt(np.einsum("oi,oi->o", V, V))  # (out,)
    if not np.all(n > 0):
        row = int(np.flatnonzero(~(n > 0))[0])
        raise ValueError(f"row {row} of W + s B A has norm {n[row]}; DoRA's direction is undefined")
    return n


def _check_magnitude(m, out_features: int) -> np.ndarray:
    return check_per_output("the magnitude m", m, out_features)


def _check_norm(weight_norm, out_features: int):
    if weight_norm is None:
        return None
    n = check_per_output("weight_norm", weight_norm, out_features)
    if not np.all(n > 0):
        raise ValueError("weight_norm must be positive in every row")
    return n


def dora_weight_norm(W, A, B, *, scaling) -> np.ndarray:
    """Return ``||W + s B A||`` per output row: DoRA's norm, and ``m``'s initial value.

    Parameters
    ----------
    W : ndarray, shape (out, in), float
    A : ndarray, shape (r, in), float
    B : ndarray, shape (out, r), float
    scaling : real, >= 0

    Returns
    -------
    ndarray, shape (out,), float64

    Raises
    ------
    TypeError, ValueError
        As ``lora_forward``; ValueError also if a row of ``W + s B A`` is zero.

    Notes
    -----
    DoRA eq. 2 and section 4.1: ``||V||_c`` with ``V = W + s B A`` (Note: DoRA as PEFT computes
    it).

    Examples
    --------
    >>> dora_weight_norm(np.array([[3.0, 4.0], [0.0, 2.0]]), np.zeros((1, 2)), np.zeros((2, 1)), scaling=1.0).tolist()
    [5.0, 2.0]
    """
    W, A, B = check_adapter(W, A, B)
    s = check_scaling(scaling)
    return _row_norm(W + s * (B @ A))


def dora_forward(x, W, A, B, m, *, scaling, bias=None, dropout_mask=None, weight_norm=None) -> np.ndarray:
    """Forward pass of a DoRA linear layer, PEFT's formula, in float64.

    Parameters
    ----------
    x : ndarray, shape (..., in), float
    W : ndarray, shape (out, in), float
        The frozen base weight (for QLoRA, ``qlora_base_weight(packed, state)``).
    A : ndarray, shape (r, in), float
    B : ndarray, shape (out, r), float
    m : ndarray, shape (out,), float
        The trained magnitude.
    scaling : real, >= 0
    bias : ndarray, shape (out,), optional
    dropout_mask : ndarray, shape (..., in), optional
        ``d``, already divided by the keep probability.
    weight_norm : ndarray, shape (out,), optional
        ``n``; computed as ``dora_weight_norm(W, A, B, scaling)`` when omitted. Passing it holds
        the norm fixed, which is what "detached" means for a finite-difference check.

    Returns
    -------
    y : ndarray, shape (..., out), float64

    Raises
    ------
    TypeError, ValueError
        As ``lora_forward``; also if ``m`` or ``weight_norm`` has the wrong shape, or a norm is
        zero.

    Notes
    -----
    With ``c = m / n`` (DoRA eq. 5, PEFT's correction form; Note: DoRA as PEFT computes it)::

        y = x W^T + bias + (c - 1) * ((d x) W^T) + c * s ((d x) A^T) B^T

    Examples
    --------
    >>> W = np.array([[3.0, 4.0]]); A = np.zeros((1, 2)); B = np.zeros((1, 1))
    >>> dora_forward(np.array([1.0, 1.0]), W, A, B, np.array([10.0]), scaling=1.0).tolist()
    [14.0]
    """
    W, A, B = check_adapter(W, A, B)
    s = check_scaling(scaling)
    out_features = W.shape[0]
    m = _check_magnitude(m, out_features)
    n = _check_norm(weight_norm, out_features)
    if n is None:
        n = _row_norm(W + s * (B @ A))
    x = check_input(x, W.shape[1])
    bias = check_bias(bias, out_features)
    d = check_mask(dropout_mask, x)
    x_tilde = x if d is None else d * x  # (..., in)
    c = m / n  # (out,)
    base = x @ W.T  # (..., out)
    base_tilde = base if d is None else x_tilde @ W.T  # (..., out): what the correction scales
    lora = s * ((x_tilde @ A.T) @ B.T)  # (..., out)
    y = base + (c - 1.0) * base_tilde + c * lora
    return y if bias is None else y + bias


def dora_backward(grad_y, x, W, A, B, m, *, scaling, dropout_mask=None, weight_norm=None,
                  detach_norm: bool = True):
    """Gradients of a DoRA linear layer: PEFT's (norm detached) by default, or the full ones.

    Parameters
    ----------
    grad_y : ndarray, shape (..., out), float
    x, W, A, B, m, scaling, dropout_mask, weight_norm
        As in ``dora_forward`` (the bias enters none of the gradients).
    detach_norm : bool, default True
        True: PEFT's choice, ``n`` is a constant. False: the gradient also flows through
        ``n = ||W + s B A||`` (then ``weight_norm`` must be omitted).

    Returns
    -------
    grad_x : ndarray, shape (..., in), float64
    grad_A : ndarray, shape (r, in), float64
    grad_B : ndarray, shape (out, r), float64
    grad_m : ndarray, shape (out,), float64

    Raises
    ------
    TypeError, ValueError
        As ``dora_forward``; also for a wrong ``grad_y`` shape, or ``weight_norm`` given with
        ``detach_norm=False``.

    Notes
    -----
    Flatten the leading dimensions (``X (N, in)``, ``G (N, out)``, ``X~ = D * X``) and write
    ``G_c = G * c`` (each column scaled by ``c = m / n``). With ``n`` constant, ``y`` is linear
    in each of ``x``, ``A``, ``B``, ``m``, and as for LoRA (``lora_backward``)::

        grad_X = G W + D * ((G * (c - 1)) W + s (G_c B) A)
        grad_A = s (G_c B)^T X~
        grad_B = s G_c^T (X~ A^T)
        grad_m = sum_N (G * (X~ V^T)) / n,     V = W + s B A

    since ``dy/dc = X~ W^T + s X~ A^T B^T = X~ V^T``. Without detaching, ``c`` also depends on
    ``A`` and ``B`` through ``n``: with ``q = sum_N G * (X~ V^T)`` (out,),
    ``grad_n = -q m / n^2`` and ``dn/dV = V / n`` (row by row), so ``grad_V = (grad_n / n) V``
    adds ``s B^T grad_V`` to ``grad_A`` and ``s grad_V A^T`` to ``grad_B``; ``grad_m`` and
    ``grad_X`` do not change. PEFT (and the paper's section 4.3) drop that term to save memory.

    Examples
    --------
    >>> W = np.array([[3.0, 4.0]]); A = np.zeros((1, 2)); B = np.zeros((1, 1))
    >>> gx, gA, gB, gm = dora_backward(np.array([1.0]), np.array([1.0, 1.0]), W, A, B, np.array([10.0]), scaling=1.0)
    >>> gx.tolist(), gm.tolist()
    ([6.0, 8.0], [1.4])
    """
    W, A, B = check_adapter(W, A, B)
    s = check_scaling(scaling)
    out_features, in_features = W.shape
    m = _check_magnitude(m, out_features)
    n = _check_norm(weight_norm, out_features)
    if n is not None and not detach_norm:
        raise ValueError("weight_norm is a constant only when detach_norm=True; omit it for the full gradient")
    V = W + s * (B @ A)  # (out, in)
    if n is None:
        n = _row_norm(V)
    x = check_input(x, in_features)
    G = check_grad_y(grad_y, x, out_features)
    d = check_mask(dropout_mask, x)
    x_tilde = x if d is None else d * x
    c = m / n  # (out,)

    X = x_tilde.reshape(-1, in_features)  # (N, in)
    G2 = G.reshape(-1, out_features)  # (N, out)
    Gc = G2 * c  # (N, out)
    GcB = Gc @ B  # (N, r)
    grad_A = s * (GcB.T @ X)  # (r, in)
    grad_B = s * (Gc.T @ (X @ A.T))  # (out, r)
    q = np.einsum("no,no->o", G2, X @ V.T)  # (out,): dL/dc
    grad_m = q / n
    if not detach_norm:
        grad_V = ((-q * m / n**2) / n)[:, None] * V  # (out, in): through n = ||V|| only
        grad_A = grad_A + s * (B.T @ grad_V)
        grad_B = grad_B + s * (grad_V @ A.T)
    grad_x_tilde = (G * (c - 1.0)) @ W + s * (((G * c) @ B) @ A)  # (..., in): w.r.t. X~
    grad_x = G @ W + (grad_x_tilde if d is None else d * grad_x_tilde)  # (..., in)
    return grad_x, grad_A, grad_B, grad_m


def dora_merge(W, A, B, m, *, scaling) -> np.ndarray:
    """Return the merged DoRA weight ``(m / n)[:, None] * (W + s B A)``, in float64.

    Parameters
    ----------
    W, A, B, m, scaling
        As in ``dora_forward``.

    Returns
    -------
    ndarray, shape (out, in), float64

    Raises
    ------
    TypeError, ValueError
        As ``dora_forward``.

    Notes
    -----
    PEFT's ``merge``: ``dora_factor = m / n`` with the norm of the unmerged weight; without
    dropout ``dora_forward(x) = x W'^T + bias``.

    Examples
    --------
    >>> dora_merge(np.array([[3.0, 4.0]]), np.zeros((1, 2)), np.zeros((1, 1)), np.array([10.0]), scaling=1.0).tolist()
    [[6.0, 8.0]]
    """
    W, A, B = check_adapter(W, A, B)
    s = check_scaling(scaling)
    m = _check_magnitude(m, W.shape[0])
    V = W + s * (B @ A)  # (out, in)
    return (m / _row_norm(V))[:, None] * V
