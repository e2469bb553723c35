"""QLoRA in the oracle: LoRA on a 4-bit base weight, and what merging adapters into it costs.

The base weight is stored as blockwise 4-bit codes (``qlora_ref.blockwise``) and frozen; the
adapters ``A``, ``B`` train in higher precision (QLoRA, Dettmers et al. 2023, section 3, eq. 5).
Forward and backward are ``qlora_ref.lora``'s with the decoded base (see Note: QLoRA rounding).
Fast pairs: ``qlora_gpu.qlora_forward`` / ``qlora_gpu.qlora_backward``; comparators in tests:
PEFT's ``lora.Linear4bit`` on bitsandbytes' ``Linear4bit``.

Note: QLoRA rounding
    Where the oracle rounds, and where it does not:

    1. Decoding (exact semantics of ``dequantize_4bit``): the absmax is reconstructed in float32
       (with double quantization ``float32(code2 * absmax2)``, then ``+ offset`` as a separate
       float32 add), each weight is ``float32(CODE[q] * absmax)``.
    2. That float32 weight is rounded to nearest even into ``compute_dtype`` (bfloat16 through
       ``ml_dtypes``, float16, or float32, where it is exact): this is what bitsandbytes does
       before its matmul (``dequantize_4bit(..., A.dtype)`` then ``linear``), and it is the only
       rounding the 4-bit path adds to a LoRA layer.
    3. Everything else is float64: ``x``, ``A``, ``B``, the bias and the mask are used as given
       (converted exactly), and the matmuls and sums run in float64 on the rounded weight.
       A caller mirroring a bf16 model passes bf16 ``x``.

    A real bf16 implementation differs from these results by (a) the matmul: exact products of
    bf16 operands accumulated in float32 (tensor cores, and torch's CPU kernels), about
    ``K * 2^-24 * sum_k |x_k w_k|`` for a reduction of length ``K``, then the output rounded to
    bf16 (half a unit in the last place, ``2^-9`` relative); (b) the adapter path, where
    ``x A^T``, ``(x A^T) B^T``, the product by ``s`` and the sum with the base output each round
    to the adapter's or the output's dtype; (c) the same two effects in the backward's
    ``grad_y @ W``. The conformance tests bound all of it with the derived tolerance tier.

Note: merging into a 4-bit base
    ``merge_into_4bit`` decodes the base exactly (float32), adds ``s B A`` in float64, rounds
    the sum to float32 once (the precision quantization works in) and re-quantizes it with the
    same quant type, block size and double quantization; the new state keeps the old one's
    ``dtype``. The re-quantization error is of the order of half a codebook step times each
    block's absmax, usually far larger than ``s B A`` itself, which is why PEFT warns that a
    merged 4-bit model can generate differently. ``merge_error`` measures it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qlora_ref.api import dequantize_4bit, quantize_4bit
from qlora_ref.blockwise import check_packed, unpack_4bit
from qlora_ref.lora import lora_backward, lora_delta, lora_forward
from qlora_ref.state import QuantState, dtype_name, numpy_dtype

__all__ = ["qlora_base_weight", "qlora_forward", "qlora_backward", "merge_into_4bit", "merge_error"]


def qlora_base_weight(packed, state: QuantState, *, compute_dtype="bfloat16") -> np.ndarray:
    """Decode a 4-bit base weight and round it to the compute dtype, returned as float64.

    Parameters
    ----------
    packed : ndarray, shape ((out * in + 1) // 2, 1), uint8
    state : QuantState
        Of a 2-D ``(out, in)`` weight.
    compute_dtype : {"bfloat16", "float16", "float32"} or a NumPy dtype

    Returns
    -------
    ndarray, shape (out, in), float64
        Every value exactly representable in ``compute_dtype`` (Note: QLoRA rounding, steps 1-2).

    Raises
    ------
    TypeError
        If ``packed`` or ``state`` has the wrong type, or ``compute_dtype`` is unsupported.
    ValueError
        If the state is not of a 2-D weight or does not match ``packed``.

    Examples
    --------
    >>> from qlora_ref import quantize_4bit
    >>> packed, state = quantize_4bit(np.array([[1.0, -0.3], [0.2, 0.9]], np.float32))
    >>> qlora_base_weight(packed, state, compute_dtype="float32").dtype
    dtype('float64')
    """
    check_packed(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"a QLoRA base weight is 2-D (out, in); the state has shape {state.shape}")
    name = dtype_name(compute_dtype)  # TypeError for float64 and anything else
    # dequantize_4bit decodes in float32 and rounds to nearest even into the requested dtype.
    return dequantize_4bit(packed, state, dtype=name).astype(np.float64)


def qlora_forward(x, packed, state, A, B, *, scaling, compute_dtype="bfloat16", bias=None,
                  dropout_mask=None) -> np.ndarray:
    """Forward pass of a QLoRA layer: LoRA on the decoded, compute-dtype-rounded 4-bit base.

    Parameters
    ----------
    x : ndarray, shape (..., in), float
    packed, state
        The 4-bit base weight ``(out, in)`` (``quantize_4bit``'s outputs).
    A : ndarray, shape (r, in), float
    B : ndarray, shape (out, r), float
    scaling : real, >= 0
    compute_dtype : {"bfloat16", "float16", "float32"}
        The dtype the decoded base is rounded to before the matmul.
    bias : ndarray, shape (out,), optional
    dropout_mask : ndarray, shape (..., in), optional
        As in ``lora_forward``.

    Returns
    -------
    y : ndarray, shape (..., out), float64

    Raises
    ------
    TypeError, ValueError
        As ``qlora_base_weight`` and ``lora_forward``.

    Notes
    -----
    QLoRA eq. 5: ``Y = X doubleDequant(c1, c2, W_NF4) + X L1 L2``; in this project's notation
    ``y = x W_c^T + bias + s ((d x) A^T) B^T`` with ``W_c = round_compute(decode(packed, state))``
    (Note: QLoRA rounding).

    Examples
    --------
    >>> from qlora_ref import quantize_4bit, lora_init
    >>> W = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    >>> packed, state = quantize_4bit(W, blocksize=32, double_quant=True)
    >>> A, B = lora_init(16, 8, 2, rng=np.random.default_rng(1))
    >>> x = np.ones((3, 16))
    >>> y = qlora_forward(x, packed, state, A, B, scaling=2.0)
    >>> y.shape, bool(np.allclose(y, x @ qlora_base_weight(packed, state).T))  # B = 0: the base
    ((3, 8), True)
    """
    W_c = qlora_base_weight(packed, state, compute_dtype=compute_dtype)  # (out, in) float64
    return lora_forward(x, W_c, A, B, scaling=scaling, bias=bias, dropout_mask=dropout_mask)


def qlora_backward(grad_y, x, packed, state, A, B, *, scaling, compute_dtype="bfloat16",
                   dropout_mask=None):
    """Gradients of a QLoRA layer: the 4-bit base is a constant; the input still gets a gradient.

    Parameters
    ----------
    grad_y : ndarray, shape (..., out), float
    x, packed, state, A, B, scaling, compute_dtype, dropout_mask
        As in ``qlora_forward``.

    Returns
    -------
    grad_x : ndarray, shape (..., in), float64
    grad_A : ndarray, shape (r, in), float64
    grad_B : ndarray, shape (out, r), float64

    Raises
    ------
    TypeError, ValueError
        As ``qlora_forward``; also if ``grad_y`` has the wrong shape.

    Notes
    -----
    ``lora_backward`` with ``W = W_c``: ``grad_x = G W_c + s d * ((G B) A)``,
    ``grad_A = s (G B)^T (d x)``, ``grad_B = s G^T ((d x) A^T)``. The 4-bit codes are not
    parameters (QLoRA section 3: gradients flow through the frozen 4-bit weights into the
    adapters), so no gradient is formed for them; ``G W_c`` reuses the same decoded, rounded
    weight as the forward, as bitsandbytes' ``MatMul4Bit.backward`` does.

    Examples
    --------
    >>> from qlora_ref import quantize_4bit
    >>> W = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    >>> packed, state = quantize_4bit(W, blocksize=32)
    >>> A, B = np.ones((1, 6)), np.ones((4, 1))
    >>> gx, gA, gB = qlora_backward(np.ones(4), np.ones(6), packed, state, A, B, scaling=0.5)
    >>> gx.shape, gA.tolist(), gB.tolist()
    ((6,), [[2.0, 2.0, 2.0, 2.0, 2.0, 2.0]], [[3.0], [3.0], [3.0], [3.0]])
    """
    W_c = qlora_base_weight(packed, state, compute_dtype=compute_dtype)
    return lora_backward(grad_y, x, W_c, A, B, scaling=scaling, dropout_mask=dropout_mask)


def _exact_merged(packed, state, A, B, scaling) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(W + s B A, s B A)`` in float64, ``W`` the exactly (float32) decoded base."""
    W = qlora_base_weight(packed, state, compute_dtype="float32")  # (out, in)
    W, delta = lora_delta(W, A, B, scaling)  # checks shapes, rank and scaling
    return W + delta, delta


def merge_into_4bit(packed, state: QuantState, A, B, scaling):
    """Merge an adapter into a 4-bit base: decode, add ``s B A``, re-quantize (lossy).

    Parameters
    ----------
    packed, state
        The 4-bit base weight ``(out, in)``.
    A : ndarray, shape (r, in), float
    B : ndarray, shape (out, r), float
    scaling : real, >= 0

    Returns
    -------
    packed : ndarray, shape ((out * in + 1) // 2, 1), uint8
    state : QuantState
        Same shape, dtype, quant type, block size and double quantization as the input state.

    Raises
    ------
    TypeError, ValueError
        As ``qlora_forward``; ``quantize_4bit``'s errors if the merged weight cannot be stored
        (for example an Inf after overflow).

    Notes
    -----
    ``Q(W + s B A)`` with ``W`` the exactly decoded base (Note: merging into a 4-bit base).
    With ``B = 0`` and no double quantization it returns the same absmax and weights: a decoded
    block re-encodes to itself (the same bytes for NF4; FP4's code 8, a zero with the sign bit
    set, comes back as code 0).

    Examples
    --------
    >>> from qlora_ref import quantize_4bit
    >>> W = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    >>> packed, state = quantize_4bit(W, blocksize=64)
    >>> A, B = np.zeros((2, 16)), np.zeros((8, 2))
    >>> p2, s2 = merge_into_4bit(packed, state, A, B, 1.0)
    >>> bool((p2 == packed).all()), bool((s2.absmax == state.absmax).all())
    (True, True)
    """
    merged, _ = _exact_merged(packed, state, A, B, scaling)  # (out, in) float64
    if state.nested is not None and state.nested.scheme == "torchao":
        # torchao's scheme divides in the input dtype: quantize from the layer's own dtype.
        x = merged.astype(numpy_dtype(state.dtype))  # (out, in), one rounding from float64
        return quantize_4bit(x, blocksize=state.blocksize, quant_type=state.quant_type,
                             double_quant="torchao")
    double_quant = "bnb" if state.nested is not None else False
    new_packed, new_state = quantize_4bit(merged.astype(np.float32), blocksize=state.blocksize,
                                          quant_type=state.quant_type, double_quant=double_quant)
    return new_packed, dataclasses.replace(new_state, dtype=state.dtype)


def merge_error(packed, state: QuantState, A, B, scaling) -> dict:
    """Measure what merging an adapter into a 4-bit base costs, against the exact merged weight.

    Parameters
    ----------
    packed, state, A, B, scaling
        As in ``merge_into_4bit``.

    Returns
    -------
    dict with float values
        ``E = decode(merge_into_4bit(...)) - (decode(packed, state) + s B A)``, all in float64:

        - ``max_abs``, ``mean_abs``, ``rms``: of ``E``;
        - ``relative``: ``||E||_F / ||W + s B A||_F``;
        - ``update_rms``: the RMS of ``s B A``, the thing being merged;
        - ``relative_to_update``: ``||E||_F / ||s B A||_F`` (NaN when the update is zero): above
          about 1, merging replaces the adapter's contribution by noise of larger size;
        - ``codes_changed``: the fraction of weights whose code now names a different codebook
          value (FP4's two zeros count as one value).

    Raises
    ------
    TypeError, ValueError
        As ``merge_into_4bit``.

    Notes
    -----
    The re-quantization error does not vanish as the update shrinks: most weights keep their
    code, but the small update is lost inside a quantization step, so ``relative_to_update``
    grows as ``||s B A||`` falls (Note: merging into a 4-bit base).

    Examples
    --------
    >>> from qlora_ref import quantize_4bit, lora_init
    >>> rng = np.random.default_rng(0)
    >>> packed, state = quantize_4bit(rng.standard_normal((64, 64)).astype(np.float32))
    >>> A, _ = lora_init(64, 64, 4, rng=rng)
    >>> B = rng.standard_normal((64, 4)) * 0.01
    >>> report = merge_error(packed, state, A, B, 2.0)
    >>> sorted(report)
    ['codes_changed', 'max_abs', 'mean_abs', 'relative', 'relative_to_update', 'rms', 'update_rms']
    >>> bool(report["relative_to_update"] > 0.5)
    True
    """
    exact, update = _exact_merged(packed, state, A, B, scaling)  # (out, in) float64 each
    new_packed, new_state = merge_into_4bit(packed, state, A, B, scaling)
    merged_4bit = qlora_base_weight(new_packed, new_state, compute_dtype="float32")
    E = merged_4bit - exact  # (out, in)
    exact_norm = float(np.linalg.norm(exact))
    update_norm = float(np.linalg.norm(update))
    error_norm = float(np.linalg.norm(E))
    n = state.numel
    # Compare codebook values, not code numbers: FP4's two zeros (codes 0 and 8) are one value.
    old_values = state.codebook[unpack_4bit(packed, n)]
    new_values = new_state.codebook[unpack_4bit(new_packed, n)]
    changed = int((old_values != new_values).sum())
    return {
        "max_abs": float(np.abs(E).max()),
        "mean_abs": float(np.abs(E).mean()),
        "rms": error_norm / math.sqrt(n),
        "relative": error_norm / exact_norm if exact_norm > 0 else 0.0,
        "update_rms": update_norm / math.sqrt(n),
        "relative_to_update": error_norm / update_norm if update_norm > 0 else float("nan"),
        "codes_changed": changed / n,
    }
