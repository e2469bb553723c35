"""How much memory a QLoRA fine-tune takes: stored tensors, adapters, optimizer, activations.

``qlora_ref.memory.model`` is the calculator (``FinetuneSetup`` -> ``estimate_memory``),
``qlora_ref.memory.activations`` the per-layer activation terms, ``qlora_ref.memory.shapes`` the
model shapes (``models.json`` beside it). The calculator's public names (its ``__all__``) are
re-exported here.
"""

from qlora_ref.memory.fit import RESERVE_BYTES, fit_verdict, largest_fits, parse_size
from qlora_ref.memory.model import *  # noqa: F403  (the calculator's public names, listed once)
from qlora_ref.memory.model import __all__ as _calculator_names

__all__ = [*_calculator_names, "RESERVE_BYTES", "parse_size", "fit_verdict", "largest_fits"]
