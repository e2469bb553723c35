"""One registry of implementations, shared by the tests, ``qlora-ref check`` and the benchmarks.

Each provider is named once and loaded lazily from ``"module:attribute"``, so the oracle never
imports torch or a comparator itself. The names are the same everywhere:

========== ========================================== ==================================================
name       what                                       where
========== ========================================== ==================================================
oracle     this package, NumPy                        ``qlora_ref.conformance.providers:OracleProvider``
torch      ``qlora_gpu``, plain torch backend         plug-in: ``qlora_gpu.providers:TorchProvider``
triton     ``qlora_gpu``, Triton kernels              plug-in: ``qlora_gpu.providers:TritonProvider``
bnb        bitsandbytes (comparator)                  ``...providers.comparators:BitsAndBytesProvider``
torchao    torchao ``NF4Tensor`` (comparator)         ``...providers.comparators:TorchaoProvider``
========== ========================================== ==================================================

Note: provider plug-ins
    Other packages add providers through the entry-point group ``qlora_ref.providers`` (name =
    ``"module:attribute"``); ``qlora_gpu`` registers ``torch`` and ``triton`` that way in
    ``pyproject.toml``, so this package never names the fast path in code: the dependency runs
    one way, ``qlora_gpu`` -> ``qlora_ref``. Plug-ins appear once the distribution that declares
    them is installed (``pip install -e .`` for a source checkout).

Note: provider protocol
    A provider is an object with

    - ``name`` (str) and ``available() -> (bool, reason)``: reason names what is missing;
    - ``quantize(x, *, blocksize, quant_type, double_quant) -> (packed, state)`` taking a NumPy
      array (float32, float16 or ml_dtypes.bfloat16) and returning NumPy ``packed`` uint8 bytes
      of shape ``((n + 1) // 2, 1)`` and a ``qlora_ref.QuantState`` (the common currency: plain
      arrays and metadata);
    - ``dequantize(packed, state, *, dtype) -> ndarray`` returning a NumPy array of
      ``state.shape`` in ``dtype`` (``"float32"``, ``"float16"`` or ``"bfloat16"``);
    - ``supports(quant_type, double_quant) -> bool``.

    Comparators are wrapped in ``qlora_ref.conformance.providers.comparators`` for tests, checks
    and benchmarks only; no function of the oracle or of the fast path calls them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from qlora_ref.api import dequantize_4bit, quantize_4bit

__all__ = ["PROVIDERS", "ENTRY_POINT_GROUP", "OracleProvider", "load_provider", "available_providers"]

#: The entry-point group through which other packages register providers (Note: provider plug-ins).
ENTRY_POINT_GROUP = "qlora_ref.providers"


def _registered() -> dict:
    plugins = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    builtin_first = {"oracle": f"{__name__}:OracleProvider"}
    comparators = {"bnb": f"{__name__}.comparators:BitsAndBytesProvider",
                   "torchao": f"{__name__}.comparators:TorchaoProvider"}
    clash = sorted(set(plugins) & (set(builtin_first) | set(comparators)))
    if clash:
        raise ValueError(f"entry points {clash} of group {ENTRY_POINT_GROUP!r} reuse built-in provider names")
    return {**builtin_first, **dict(sorted(plugins.items())), **comparators}


#: ``{name: "module:attribute"}`` of every provider, in report order: the oracle, plug-ins, comparators.
PROVIDERS = _registered()


class OracleProvider:
    """The oracle itself, behind the provider protocol."""

    name = "oracle"

    def available(self):
        return True, ""

    def supports(self, quant_type, double_quant):
        return True

    def quantize(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        return quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)

    def dequantize(self, packed, state, *, dtype=None):
        return dequantize_4bit(packed, state, dtype=dtype)


def load_provider(name: str):
    """Return an instance of the provider registered as ``name``.

    Raises
    ------
    ValueError
        If no provider has that name.
    ImportError
        If its module cannot be imported (torch or the comparator is not installed).

    Examples
    --------
    >>> load_provider("oracle").name
    'oracle'
    """
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; registered: {sorted(PROVIDERS)}")
    module_name, attr = PROVIDERS[name].split(":")
    return getattr(importlib.import_module(module_name), attr)()


def available_providers() -> dict:
    """Return ``{name: (available, reason)}`` for every registered provider."""
    result = {}
    for name in PROVIDERS:
        try:
            result[name] = load_provider(name).available()
        except ImportError as exc:
            result[name] = (False, f"cannot import: {exc}")
    return result
