"""Implementations to check: registered providers and user code given as ``module:function``.

``qlora-ref check`` (``qlora_ref.conformance.run``) compares any number of implementations against the
oracle. This module turns what the user names on the command line into one small interface,
``Implementation``, whatever the implementation looks like underneath.

Note: the user protocol
    The smallest plug-in is one NumPy function. ``module:name`` names it (``module`` is an
    importable module or a path to a ``.py`` file; ``name`` is an attribute of it):

    - ``quantize(x, blocksize, quant_type)`` takes a NumPy array ``x`` (float32, float16 or
      ``ml_dtypes.bfloat16``, any shape) and returns ``(packed, absmax)``: ``packed`` holds the
      ``(n + 1) // 2`` bytes of the flattened codes (uint8, first element in the high nibble, any
      shape) and ``absmax`` the float32 ``(n_blocks,)`` constants; returning ``packed`` alone
      skips the absmax comparison. ``(packed, QuantState)`` is accepted too.
    - ``dequantize(packed, absmax, shape, blocksize, quant_type, dtype)`` returns the decoded
      array of ``shape`` in ``dtype`` (``"float32"``, ``"float16"`` or ``"bfloat16"``, the last as
      ``ml_dtypes.bfloat16``).

    ``module:quantize_name,dequantize_name`` names both; ``module:,dequantize_name`` only the
    decoder. Parameters are passed by name and only those the function declares. What each
    function supports is read from it, for the encoder and the decoder separately: attributes
    ``quant_types``, ``blocksizes`` and ``dtypes`` (input dtypes of ``quantize``, output dtypes
    of ``dequantize``) declare it; without them a function without ``quant_type`` is taken to
    implement NF4 only, one without ``blocksize`` block size 64 only. Unsupported cases are
    skipped and counted, never failed; a function may also raise ``NotImplementedError``.

    ``module:Name`` may also name a class (instantiated without arguments) or an object with
    ``quantize`` and/or ``dequantize`` methods in the same protocol, or a provider of the
    registry (``qlora_ref.conformance.providers``, Note: provider protocol), recognised by its
    ``available`` method. Optional ``lora_forward(x, W, A, B, *, scaling, bias, dropout_mask)``
    and ``lora_backward(grad_y, x, W, A, B, *, scaling, dropout_mask)`` methods (NumPy in,
    NumPy out) are checked on the LoRA vectors.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from qlora_ref.conformance.providers import PROVIDERS, load_provider
from qlora_ref.lora import lora_backward as oracle_lora_backward
from qlora_ref.lora import lora_forward as oracle_lora_forward
from qlora_ref.state import QuantState

__all__ = ["Implementation", "resolve", "registered"]


@dataclass
class Implementation:
    """One implementation under check, in a single shape.

    Attributes
    ----------
    name : str
        The label in the table.
    quantize : callable or None
        ``quantize(x, *, blocksize, quant_type, double_quant) -> (packed, state_or_absmax)``;
        ``state_or_absmax`` is a ``QuantState``, a float32 absmax array or None.
    dequantize : callable or None
        ``dequantize(packed, state, *, dtype) -> ndarray``.
    supports : callable
        ``supports(quant_type, double_quant, blocksize, dtype=None) -> bool`` for quantization
        (``dtype``: the input's).
    supports_decode : callable or None
        The same for decoding (``dtype``: the output's); None: as ``supports``.
    lora_forward, lora_backward : callable or None
        NumPy LoRA entry points, when the implementation has them.
    available : bool
    reason : str
        Why it is not available.
    describe : callable or None
        ``describe() -> dict``: versions and the code paths taken on this machine, when the
        provider can tell (printed by ``qlora-ref check``).
    """

    name: str
    quantize: Callable | None = None
    dequantize: Callable | None = None
    supports: Callable = lambda quant_type, double_quant, blocksize, dtype=None: True
    supports_decode: Callable | None = None
    lora_forward: Callable | None = None
    lora_backward: Callable | None = None
    available: bool = True
    reason: str = ""
    describe: Callable | None = None


def _accepted(fn) -> tuple[set, bool]:
    """Return (parameter names, accepts **kwargs) of a callable."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _call(fn, first_args: tuple, **kwargs):
    """Call ``fn(*first_args, **kwargs)`` passing only the keyword arguments it declares."""
    names, var_kw = _accepted(fn)
    return fn(*first_args, **{k: v for k, v in kwargs.items() if var_kw or k in names})


def _from_provider(provider, name: str) -> Implementation:
    try:
        ok, reason = provider.available()
    except Exception as exc:  # a provider that cannot tell is not available
        ok, reason = False, f"available() raised {type(exc).__name__}: {exc}"

    def quantize(x, *, blocksize, quant_type, double_quant):
        return provider.quantize(x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)

    def dequantize(packed, state, *, dtype):
        return provider.dequantize(packed, state, dtype=dtype)

    def supports(quant_type, double_quant, blocksize, dtype=None):
        return bool(provider.supports(quant_type, double_quant))

    decode_check = getattr(provider, "supports_decode", None)

    def supports_decode(quant_type, double_quant, blocksize, dtype=None):
        return bool(decode_check(quant_type, double_quant)) if decode_check else supports(quant_type, double_quant,
                                                                                          blocksize)

    lora_forward, lora_backward = getattr(provider, "lora_forward", None), getattr(provider, "lora_backward", None)
    if name == "oracle" and lora_forward is None:  # the oracle's own LoRA, checked on the LoRA vectors
        lora_forward, lora_backward = oracle_lora_forward, oracle_lora_backward
    return Implementation(
        name=name, quantize=quantize, dequantize=dequantize, supports=supports, supports_decode=supports_decode,
        lora_forward=lora_forward, lora_backward=lora_backward, available=bool(ok), reason=str(reason),
        describe=getattr(provider, "describe", None),
    )


def _declared_support(fn) -> Callable:
    """``supports(quant_type, double_quant, blocksize, dtype=None)`` of one user function.

    Declared by the function's attributes ``quant_types``, ``blocksizes`` and ``dtypes`` (any
    iterables), otherwise inferred from its signature (Note: the user protocol).
    """
    names, var_kw = _accepted(fn)
    quant_types = getattr(fn, "quant_types", None)
    if quant_types is None and not (var_kw or "quant_type" in names):
        quant_types = ("nf4",)
    blocksizes = getattr(fn, "blocksizes", None)
    if blocksizes is None and not (var_kw or "blocksize" in names):
        blocksizes = (64,)
    dtypes = getattr(fn, "dtypes", None)

    def supports(quant_type, double_quant, blocksize, dtype=None):
        if double_quant:  # the simple protocol has no double quantization
            return False
        return ((quant_types is None or quant_type in tuple(quant_types))
                and (blocksizes is None or int(blocksize) in tuple(int(b) for b in blocksizes))
                and (dtypes is None or dtype is None or str(dtype) in tuple(str(d) for d in dtypes)))

    return supports


def _from_functions(name: str, q, dq, lora_forward=None, lora_backward=None) -> Implementation:
    never = lambda quant_type, double_quant, blocksize, dtype=None: False  # noqa: E731

    def quantize(x, *, blocksize, quant_type, double_quant):
        out = _call(q, (x,), blocksize=blocksize, quant_type=quant_type)
        if isinstance(out, tuple):
            if len(out) != 2:
                raise ValueError(f"{name}: quantize returned {len(out)} values; expected (packed, absmax)")
            packed, second = out
        else:
            packed, second = out, None
        if second is not None and not isinstance(second, QuantState):
            second = np.asarray(second)
        return np.asarray(packed), second

    def dequantize(packed, state, *, dtype):
        if state.absmax is None:
            raise NotImplementedError("the simple protocol decodes float32 absmax only")
        return _call(dq, (np.asarray(packed).reshape(-1).copy(),), absmax=state.absmax.copy(),
                     shape=tuple(state.shape), blocksize=state.blocksize, quant_type=state.quant_type, dtype=dtype)

    return Implementation(name=name, quantize=quantize if q is not None else None,
                          dequantize=dequantize if dq is not None else None,
                          supports=_declared_support(q) if q is not None else never,
                          supports_decode=_declared_support(dq) if dq is not None else never,
                          lora_forward=lora_forward, lora_backward=lora_backward)


def _import(module_part: str):
    """Import ``module_part``: a dotted module name or a path to a ``.py`` file."""
    if module_part.endswith(".py") or "/" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise FileNotFoundError(f"no Python file {module_part}")
        module_name = f"qlora_check_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(module_part)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_part!r}: {exc}") from None


def resolve(spec: str) -> Implementation:
    """Turn a command-line name into an ``Implementation``.

    Parameters
    ----------
    spec : str
        A registered provider name (``oracle``, ``torch``, ``triton``, ``bnb``, ``torchao``) or
        ``module:name[,name]`` (see Note: the user protocol).

    Returns
    -------
    Implementation
        For a registered provider that cannot be imported: ``available=False`` with the reason.

    Raises
    ------
    ValueError
        If the spec is malformed, names nothing callable, or its module cannot be imported.
    FileNotFoundError
        If a ``.py`` path does not exist.

    Examples
    --------
    >>> resolve("oracle").name, resolve("qlora_ref.api:quantize_4bit").quantize is not None
    ('oracle', True)
    """
    if spec in PROVIDERS:
        try:
            return _from_provider(load_provider(spec), spec)
        except ImportError as exc:
            return Implementation(name=spec, available=False, reason=f"cannot import {PROVIDERS[spec]}: {exc}")
    if ":" not in spec:
        raise ValueError(f"{spec!r} is neither a registered provider {sorted(PROVIDERS)} nor module:function")
    module_part, _, names = spec.rpartition(":")
    module = _import(module_part)
    parts = names.split(",")
    if len(parts) > 2 or not any(parts):
        raise ValueError(f"{spec!r}: expected module:quantize, module:quantize,dequantize or module:,dequantize")
    objs = []
    for part in parts:
        if part and not hasattr(module, part):
            raise ValueError(f"{spec!r}: module {module.__name__} has no attribute {part!r}")
        objs.append(getattr(module, part) if part else None)
    label = f"{Path(module_part).stem}:{names}" if module_part.endswith(".py") else spec
    if len(objs) == 1 and not inspect.isfunction(objs[0]) and not inspect.isbuiltin(objs[0]):
        obj = objs[0]() if inspect.isclass(objs[0]) else objs[0]
        if hasattr(obj, "available") and hasattr(obj, "supports"):
            return _from_provider(obj, label)
        q, dq = getattr(obj, "quantize", None), getattr(obj, "dequantize", None)
        if q is None and dq is None:
            raise ValueError(f"{spec!r}: {type(obj).__name__} has neither quantize nor dequantize")
        return _from_functions(label, q, dq, getattr(obj, "lora_forward", None), getattr(obj, "lora_backward", None))
    for obj in objs:
        if obj is not None and not callable(obj):
            raise ValueError(f"{spec!r}: {obj!r} is not callable")
    return _from_functions(label, objs[0], objs[1] if len(objs) == 2 else None)


def registered() -> list:
    """Return an ``Implementation`` for every registered provider (unavailable ones included)."""
    return [resolve(name) for name in PROVIDERS]
