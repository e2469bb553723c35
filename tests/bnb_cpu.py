"""bitsandbytes on this machine's CPU: ask which path it takes, and force the Python switches.

bitsandbytes 0.50 behaves differently by CPU (``qlora_ref.conformance.variants``, Note: bitsandbytes CPU
decode paths). Tests never assume one machine:

- the native decode is chosen by the native library from the CPU itself, so a test asks which
  decoder model this machine's library follows (``decode_model``) and compares bitsandbytes
  with the oracle running THAT model; the models themselves are tested on constructed inputs
  everywhere (``tests/test_variants.py``);
- ``Linear4bit``'s in-place repacking for CPU inference is pure Python behind
  ``has_avx512bf16()``, read once per layer into ``support_avx512bf16_for_cpu``: tests that need
  a layer's files unchanged switch it off (``no_cpu_repacking``), and the test of the defect
  switches it on (``cpu_repacking(True)``), on every machine.
"""

import contextlib
import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def decode_model() -> str:
    """The model of ``qlora_ref.conformance.variants.DECODE_MODELS`` bitsandbytes' CPU decode follows here."""
    from qlora_ref.conformance.providers.comparators import BitsAndBytesProvider
    from qlora_ref.conformance.variants import probe_decode_model

    model = probe_decode_model(BitsAndBytesProvider(device="cpu").dequantize)
    assert model is not None, "bitsandbytes' CPU decode follows no known model on this machine"
    return model


def bnb_decoded(codes, absmax, shape, blocksize: int, quant_type: str, dtype) -> np.ndarray:
    """The oracle's decode as this machine's bitsandbytes does it (``decode_model``)."""
    from qlora_ref.conformance.variants import decode_model as run_model

    return run_model(decode_model(), codes, absmax, tuple(shape), blocksize, quant_type, dtype)


@contextlib.contextmanager
def cpu_repacking(enabled: bool):
    """Make ``Linear4bit`` layers created inside the block repack (or not) for CPU inference."""
    import bitsandbytes.nn.modules as modules

    saved = modules.has_avx512bf16
    modules.has_avx512bf16 = lambda: enabled
    try:
        yield
    finally:
        modules.has_avx512bf16 = saved


def no_cpu_repacking(model):
    """Switch the CPU repacking off in every ``Linear4bit`` of an existing model; returns it."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model
