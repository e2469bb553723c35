"""LoRA in float64: scaling, PEFT's initialisation, forward, closed-form backward, merge, unmerge.

The mathematical reference for every LoRA implementation of this project (fast pairs:
``qlora_gpu.lora_forward`` / ``qlora_gpu.lora_backward``) and the oracle the PEFT conformance tests
feed with PEFT's own weights. ``qlora_ref.qlora`` adds the 4-bit base, ``qlora_ref.dora`` DoRA.

Note: LoRA layer (Hu et al. 2021, section 4.1; PEFT's ``lora.Linear``)
    For ``x (..., in)``, a frozen ``W (out, in)``, ``A (r, in)``, ``B (out, r)``, scaling ``s``
    and an optional dropout mask ``d`` (same shape as ``x``, entries 0 or ``1 / (1 - p)``)::

        y = x W^T + bias + s * ((d * x) A^T) B^T

    Dropout acts on the adapter's input only, as in PEFT: ``base(x) + s * B(A(dropout(x)))``.

Note: float64 results
    Every array argument may be float16, bfloat16 (``ml_dtypes``), float32 or float64; each is
    converted exactly to float64 and every result is float64, whatever the inputs were. The
    oracle does no low-precision arithmetic: a caller mirroring a bf16 model passes bf16 arrays
    and compares the low-precision implementation against these float64 results (the "derived"
    tolerance tier).
"""

from __future__ import annotations

import math
import numbers

import ml_dtypes
import numpy as np

__all__ = [
    "lora_scaling",
    "lora_init",
    "lora_forward",
    "lora_backward",
    "lora_merge",
    "lora_unmerge",
    "LORA_INIT_SCHEMES",
]

#: Initialisation schemes of ``lora_init`` (PEFT's ``init_lora_weights=True`` and ``"gaussian"``).
LORA_INIT_SCHEMES = ("kaiming", "gaussian")

_FLOAT_DTYPES = (
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.float32),
    np.dtype(np.float64),
)


# ----------------------------------------------------------------------------- input checks
# Shared with qlora_ref.qlora and qlora_ref.dora (private to the package).


def float64(name: str, a) -> np.ndarray:
    """Return ``a`` converted exactly to float64; TypeError unless a float NumPy array."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {a.dtype}; expected float16, bfloat16, float32 or float64"
        )
    return a.astype(np.float64)


def check_scaling(scaling) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    s = float(scaling)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"scaling must be finite and >= 0 (alpha >= 0), got {scaling!r}")
    return s


def check_adapter(W, A, B) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check ``W (out, in)``, ``A (r, in)``, ``B (out, r)`` with ``1 <= r <= min(in, out)``."""
    W, A, B = float64("W", W), float64("A", A), float64("B", B)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {W.shape}")
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"A (r, in) and B (out, r) must be 2-D, got shapes {A.shape} and {B.shape}")
    out_features, in_features = W.shape
    r = A.shape[0]
    if A.shape[1] != in_features:
        raise ValueError(f"A has shape {A.shape} but W {W.shape} needs A of shape (r, {in_features})")
    if B.shape != (out_features, r):
        raise ValueError(
            f"B has shape {B.shape} but W {W.shape} and A {A.shape} need B of shape ({out_features}, {r})"
        )
    check_rank(r, in_features, out_features)
    return W, A, B


def check_rank(r: int, in_features: int, out_features: int) -> None:
    if r == 0:
        raise ValueError("the adapter rank r is 0 (A has no rows); LoRA needs r >= 1")
    if r > min(in_features, out_features):
        raise ValueError(
            f"rank r = {r} is larger than min(in, out) = {min(in_features, out_features)}: "
            "B @ A could not have that rank"
        )


def check_input(x, in_features: int) -> np.ndarray:
    x = float64("x", x)
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {x.shape}; its last dimension must be in_features = {in_features}")
    return x


def check_grad_y(grad_y, x: np.ndarray, out_features: int) -> np.ndarray:
    grad_y = float64("grad_y", grad_y)
    if grad_y.shape != x.shape[:-1] + (out_features,):
        raise ValueError(
            f"grad_y has shape {grad_y.shape}; x of shape {x.shape} and out_features = "
            f"{out_features} need {x.shape[:-1] + (out_features,)}"
        )
    return grad_y


def check_per_output(name: str, value, out_features: int) -> np.ndarray:
    """A float64 vector of one value per output feature (bias, DoRA magnitude or norm)."""
    value = float64(name, value)
    if value.shape != (out_features,):
        raise ValueError(f"{name} has shape {value.shape}, expected ({out_features},)")
    return value


def check_bias(bias, out_features: int):
    return None if bias is None else check_per_output("bias", bias, out_features)


def check_mask(dropout_mask, x: np.ndarray):
    """Return the mask ``d`` as float64 (None stays None); it must have ``x``'s shape."""
    if dropout_mask is None:
        return None
    d = float64("dropout_mask", dropout_mask)
    if d.shape != x.shape:
        raise ValueError(f"dropout_mask has shape {d.shape}, but x has shape {x.shape}; they must match")
    return d


def _nonnegative_int(name: str, value) -> int:
    # 0 passes here: the callers name what a zero means (r = 0 is refused by check_rank).
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


# ----------------------------------------------------------------------------- public API


def lora_scaling(alpha, r, *, rslora: bool = False) -> float:
    """Return the adapter scaling ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    Parameters
    ----------
    alpha : real, >= 0
        ``lora_alpha``.
    r : int, >= 1
        The adapter rank.
    rslora : bool
        Rank-stabilised LoRA (Kalajdzievski 2023), PEFT's ``use_rslora``.

    Returns
    -------
    float

    Raises
    ------
    TypeError
        If ``alpha`` is not a real number or ``r`` is not an int.
    ValueError
        If ``alpha`` is negative or not finite, or ``r < 1``.

    Notes
    -----
    LoRA section 4.1 scales ``B A x`` by ``alpha / r`` so that changing ``r`` needs no new
    learning rate; rsLoRA shows ``alpha / sqrt(r)`` keeps the adapter's output from collapsing as
    ``r`` grows.

    Examples
    --------
    >>> lora_scaling(16, 8), lora_scaling(16, 64, rslora=True)
    (2.0, 2.0)
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    if not math.isfinite(float(alpha)) or alpha < 0:
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    r = _nonnegative_int("r", r)
    if r == 0:
        raise ValueError("the adapter rank r is 0; LoRA needs r >= 1")
    return float(alpha) / (math.sqrt(r) if rslora else r)


def lora_init(in_features, out_features, r, *, rng, scheme: str = "kaiming", dtype=np.float64):
    """Initialise ``A (r, in)`` and ``B (out, r)`` as PEFT does: random ``A``, zero ``B``.

    Parameters
    ----------
    in_features, out_features, r : int
        ``1 <= r <= min(in_features, out_features)``.
    rng : numpy.random.Generator
        The only source of randomness, so results are reproducible.
    scheme : {"kaiming", "gaussian"}
        ``"kaiming"`` (PEFT's default, ``init_lora_weights=True``): torch's
        ``kaiming_uniform_(A, a=sqrt(5))`` on the ``(r, in)`` tensor, i.e. fan-in ``in``, gain
        ``sqrt(2 / (1 + a^2)) = sqrt(1/3)`` and bound ``gain * sqrt(3 / in) = 1 / sqrt(in)``:
        ``A ~ U(-1/sqrt(in), 1/sqrt(in))``. ``"gaussian"``: ``A ~ N(0, (1/r)^2)``.
    dtype : float dtype, default float64
        dtype of the returned arrays (values are drawn in float64, then rounded once).

    Returns
    -------
    A : ndarray, shape (r, in_features), ``dtype``
    B : ndarray, shape (out_features, r), ``dtype``; all zeros, so ``B @ A = 0`` and a fresh
        adapter leaves the layer's output unchanged.

    Raises
    ------
    TypeError
        If a size is not an int, ``rng`` is not a Generator or ``dtype`` is not a float dtype.
    ValueError
        If a size is 0 or ``r > min(in_features, out_features)``, or ``scheme`` is unknown.

    Notes
    -----
    The bound matches torch's ``nn.Linear`` default, which PEFT reuses for ``A`` (LoRA section
    4.1: "random Gaussian initialization for A and zero for B"). NumPy's stream differs from
    torch's, so only the distribution, not the values, matches PEFT.

    Examples
    --------
    >>> A, B = lora_init(16, 8, 4, rng=np.random.default_rng(0))
    >>> A.shape, B.shape, bool(np.abs(A).max() <= 1 / np.sqrt(16)), bool((B == 0).all())
    ((4, 16), (8, 4), True, True)
    """
    in_features = _nonnegative_int("in_features", in_features)
    out_features = _nonnegative_int("out_features", out_features)
    r = _nonnegative_int("r", r)
    if in_features == 0 or out_features == 0:
        raise ValueError(f"in_features and out_features must be >= 1, got {in_features} and {out_features}")
    check_rank(r, in_features, out_features)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    try:
        out_dtype = np.dtype(dtype)
    except TypeError:
        out_dtype = None
    if out_dtype is None or out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype {dtype!r} is not float16, bfloat16, float32 or float64")
    if scheme == "kaiming":
        bound = 1.0 / math.sqrt(in_features)  # gain sqrt(1/3) (a = sqrt(5)) times sqrt(3 / fan_in)
        A = rng.uniform(-bound, bound, size=(r, in_features))
    elif scheme == "gaussian":
        A = rng.normal(0.0, 1.0 / r, size=(r, in_features))
    else:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {LORA_INIT_SCHEMES}")
    B = np.zeros((out_features, r))
    return A.astype(out_dtype), B.astype(out_dtype)


def lora_forward(x, W, A, B, *, scaling, bias=None, dropout_mask=None) -> np.ndarray:
    """Forward pass of a LoRA linear layer, in float64.

    Parameters
    ----------
    x : ndarray, shape (..., in), float
        Any number of leading dimensions (batch, sequence, ...).
    W : ndarray, shape (out, in), float
        The frozen base weight.
    A : ndarray, shape (r, in), float
    B : ndarray, shape (out, r), float
    scaling : real, >= 0
        ``s`` from ``lora_scaling``.
    bias : ndarray, shape (out,), optional
        The base layer's bias.
    dropout_mask : ndarray, shape (..., in), optional
        ``d``: the dropout mask already divided by the keep probability (entries 0 or
        ``1 / (1 - p)``), applied to the adapter's input only.

    Returns
    -------
    y : ndarray, shape (..., out), float64

    Raises
    ------
    TypeError
        If an array is not a float NumPy array or ``scaling`` is not a real number.
    ValueError
        If shapes do not fit, ``r`` is 0 or above ``min(in, out)``, ``scaling`` is negative, or
        the mask's shape differs from ``x``'s.

    Notes
    -----
    ``y = x W^T + bias + s ((d x) A^T) B^T`` (see Note: LoRA layer). The adapter is applied as
    two thin products, never as the dense ``B A``, as real implementations do.

    Examples
    --------
    >>> W = np.eye(2); A = np.array([[1.0, 0.0]]); B = np.array([[0.0], [1.0]])
    >>> lora_forward(np.array([3.0, 5.0]), W, A, B, scaling=2.0).tolist()
    [3.0, 11.0]
    """
    W, A, B = check_adapter(W, A, B)
    s = check_scaling(scaling)
    x = check_input(x, W.shape[1])
    bias = check_bias(bias, W.shape[0])
    d = check_mask(dropout_mask, x)
    x_tilde = x if d is None else d * x  # (..., in): the adapter's input
    y = x @ W.T  # (..., out)
    if bias is not None:
        y = y + bias
    h = x_tilde @ A.T  # (..., r)
    return y + s * (h @ B.T)


def lora_backward(grad_y, x, W, A, B, *, scaling, dropout_mask=None):
    """Closed-form gradients of a LoRA linear layer; the frozen ``W`` gets none.

    Parameters
    ----------
    grad_y : ndarray, shape (..., out), float
        ``G = dL/dy`` for the forward's output.
    x, W, A, B, scaling, dropout_mask
        As in ``lora_forward`` (the bias does not enter any of these gradients).

    Returns
    -------
    grad_x : ndarray, shape (..., in), float64
    grad_A : ndarray, shape (r, in), float64
    grad_B : ndarray, shape (out, r), float64

    Raises
    ------
    TypeError, ValueError
        As ``lora_forward``; also if ``grad_y``'s shape is not ``x.shape[:-1] + (out,)``.

    Notes
    -----
    Flatten the leading dimensions: ``X (N, in)``, ``G (N, out)``, ``X~ = D * X``, ``H = X~ A^T``
    ``(N, r)``, so ``Y = X W^T + 1 bias^T + s H B^T``. With ``<P, Q> = sum_ij P_ij Q_ij``::

        dL = <G, dY> = <G, dX W^T> + s <G, (D * dX) A^T B^T> + s <G, X~ dA^T B^T> + s <G, H dB^T>

    and moving each differential to the right of the inner product (``<P, Q R> = <P R^T, Q>``
    and ``<P, Q R> = <Q^T P, R>``)::

        grad_X = G W + s D * ((G B) A)        (N, in)
        grad_A = s (G B)^T X~                  (r, in)
        grad_B = s G^T H = s G^T (X~ A^T)      (out, r)

    ``W`` appears in ``grad_X`` but receives no gradient itself: it is frozen, while the input
    gradient must flow through the whole layer (base included) to the layers before it.
    ``G B`` is computed once, ``(N, r)``, so no ``(out, in)`` matrix is ever formed.

    Examples
    --------
    >>> W = np.eye(2); A = np.array([[1.0, 0.0]]); B = np.array([[0.0], [1.0]])
    >>> gx, gA, gB = lora_backward(np.array([1.0, 1.0]), np.array([3.0, 5.0]), W, A, B, scaling=2.0)
    >>> gx.tolist(), gA.tolist(), gB.tolist()
    ([3.0, 1.0], [[6.0, 10.0]], [[6.0], [6.0]])
    """
    W, A, B = check_adapter(W, A, B)
    s = check_scaling(scaling)
    x = check_input(x, W.shape[1])
    G = check_grad_y(grad_y, x, W.shape[0])
    d = check_mask(dropout_mask, x)
    x_tilde = x if d is None else d * x
    in_features = W.shape[1]
    X = x_tilde.reshape(-1, in_features)  # (N, in): X~, leading dims flattened
    G2 = G.reshape(-1, W.shape[0])  # (N, out)
    GB = G2 @ B  # (N, r)
    H = X @ A.T  # (N, r)
    grad_A = s * (GB.T @ X)  # (r, in)
    grad_B = s * (G2.T @ H)  # (out, r)
    grad_x_tilde = s * (GB @ A).reshape(x.shape)  # (..., in): gradient w.r.t. X~
    if d is not None:
        grad_x_tilde = d * grad_x_tilde
    grad_x = G @ W + grad_x_tilde  # (..., in)
    return grad_x, grad_A, grad_B


def lora_delta(W, A, B, scaling):
    """Return ``(W, s * B @ A)`` in float64 after checking the adapter: the update LoRA adds to ``W``."""
    W, A, B = check_adapter(W, A, B)
    s = check_scaling(scaling)
    return W, s * (B @ A)  # (out, in)


def lora_merge(W, A, B, scaling) -> np.ndarray:
    """Return the merged weight ``W + s B A``, in float64.

    Parameters
    ----------
    W : ndarray, shape (out, in), float
    A : ndarray, shape (r, in), float
    B : ndarray, shape (out, r), float
    scaling : real, >= 0

    Returns
    -------
    ndarray, shape (out, in), float64

    Raises
    ------
    TypeError, ValueError
        As ``lora_forward``.

    Notes
    -----
    ``x W'^T = x W^T + s (x A^T) B^T`` for ``W' = W + s B A`` (LoRA section 4.1: no inference
    latency). In float64 the two sides agree to a few units of 2^-53 of their terms.

    Examples
    --------
    >>> lora_merge(np.zeros((2, 2)), np.array([[1.0, 2.0]]), np.array([[1.0], [0.0]]), 0.5).tolist()
    [[0.5, 1.0], [0.0, 0.0]]
    """
    W, delta = lora_delta(W, A, B, scaling)
    return W + delta


def lora_unmerge(W_merged, A, B, scaling) -> np.ndarray:
    """Return ``W' - s B A``: the base weight back from a merged one, in float64.

    Parameters
    ----------
    W_merged : ndarray, shape (out, in), float
    A, B, scaling
        As in ``lora_merge``.

    Returns
    -------
    ndarray, shape (out, in), float64

    Raises
    ------
    TypeError, ValueError
        As ``lora_forward``.

    Notes
    -----
    ``s B A`` is computed exactly as ``lora_merge`` computes it (same operands, same product), call
    it ``D``. With ``M = fl(W + D)`` and unit roundoff ``u = 2^-53``,
    ``M - D = W + e`` with ``|e| <= u |M|``, and one more rounding gives, element by element,
    ``|unmerge(merge(W)) - W| <= u (|M| + |W|) (1 + u)``: not bit-exact when ``D`` has bits below
    ``W``'s last place.

    Examples
    --------
    >>> W = np.array([[1.0, 2.0]]); A = np.array([[0.25, 0.5]]); B = np.array([[4.0]])
    >>> lora_unmerge(lora_merge(W, A, B, 2.0), A, B, 2.0).tolist()
    [[1.0, 2.0]]
    """
    W_merged, delta = lora_delta(W_merged, A, B, scaling)
    return W_merged - delta
