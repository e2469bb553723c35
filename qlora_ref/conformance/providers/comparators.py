"""bitsandbytes and torchao behind the provider protocol of ``qlora_ref.conformance.providers``.

Comparators, for the tests, ``qlora-ref check`` and the benchmarks only: no function of the
fast path or of the oracle calls them, and they use neither (only the oracle's state types and
its bitsandbytes state-dict reader and writer). Registered as ``bnb`` and ``torchao``. Each
converts the library's own state into a ``qlora_ref.QuantState`` exactly (bitsandbytes' through
its state-dict entries, ``qlora_ref.formats.bnb``, the layout both agree on; torchao's
``NF4Tensor`` fields into the oracle's ``"torchao"`` scheme), and back for decoding. Needs torch
and the library: the registry imports this module only when one of the two is asked for.

Note: known differences of the comparators (classified by the conformance tests)
    - bitsandbytes 0.50 on CPU encodes the nested (double-quantized) absmax through a
      65536-entry lookup table: a fraction of a percent of nested codes differ from the exact
      nearest entry the oracle takes (the oracle's Note: nested encoding rule).
    - bitsandbytes' CPU encoder gives FP4's two zero codes by the sign bit (a tiny negative
      value gets code 8, a tiny positive one code 0); the oracle's midpoint rule does the
      opposite. Both decode to a zero; bitsandbytes' CPU decoder without AVX-512 writes code 8
      as -0.0 although its quant_map holds +0.0.
    - bitsandbytes' CPU decode takes one of three paths by shape and by CPU, each an
      executable model of ``qlora_ref.conformance.variants`` (Note: bitsandbytes CPU decode paths):
      ``describe()`` says which one this machine's library follows.
    - torchao's mean of the scalers comes from torch's float32 reduction and can sit an ulp
      from the oracle's (``qlora_ref.torchao_nf4``, step 3).
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from qlora_ref.conformance.providers.torch_arrays import (
    default_device,
    to_numpy,
    to_torch,
    torch_dtype,
)
from qlora_ref.conformance.variants import probe_decode_model
from qlora_ref.formats.bnb import from_bnb_state_dict, to_bnb_state_dict
from qlora_ref.state import NestedAbsmax, QuantState

__all__ = ["BitsAndBytesProvider", "TorchaoProvider"]

_NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"


def _check_array(name, a):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")


class BitsAndBytesProvider:
    """bitsandbytes' ``quantize_4bit`` / ``dequantize_4bit`` (CPU, or CUDA when present).

    Examples
    --------
    >>> p = BitsAndBytesProvider(device="cpu")
    >>> p.supports("nf4", True), p.supports("int4", False)
    (True, False)
    """

    name = "bnb"

    def __init__(self, device=None):
        self.device = default_device(device)

    def available(self):
        """Whether bitsandbytes imports, and if not, what is missing."""
        try:
            import bitsandbytes.functional  # noqa: F401  (optional dependency: probed here)
        except ImportError as exc:
            return False, f"bitsandbytes is not installed ({exc})"
        return True, ""

    def describe(self) -> dict:
        """The versions and the CPU paths bitsandbytes takes on this machine (for ``qlora-ref check``).

        Returns
        -------
        dict
            ``version``; ``device``; ``torch cpu capability`` (what bitsandbytes' Python
            dispatch reads: with ``AVX512`` it sends blocksizes >= 2048 to its torch fallback);
            ``native avx512bf16`` (bitsandbytes' own probe: ``Linear4bit`` then repacks its weight
            on the first eval forward without grad); ``decode model``, the model of
            ``qlora_ref.conformance.variants`` its decode follows here (``variants.probe_decode_model``).
        """
        import bitsandbytes  # optional dependency, as in available()
        import bitsandbytes.functional as bnb_F  # optional dependency

        info = {"version": bitsandbytes.__version__, "torch": torch.__version__, "device": str(self.device)}
        if self.device.type == "cpu":
            info["torch cpu capability"] = torch.backends.cpu.get_cpu_capability()
            info["native avx512bf16"] = bool(bnb_F.has_avx512bf16())
            info["decode model"] = probe_decode_model(self.dequantize)
        return info

    def supports(self, quant_type, double_quant) -> bool:
        """NF4 and FP4, without or with bitsandbytes' own double quantization."""
        return quant_type in ("nf4", "fp4") and double_quant in (False, None, True, "bnb")

    def quantize(self, x, *, blocksize=64, quant_type="nf4", double_quant=False):
        """bitsandbytes' ``quantize_4bit`` on ``x``; its state converted to a ``qlora_ref.QuantState``.

        Raises
        ------
        ValueError
            If the quant type or scheme is not bitsandbytes'.
        """
        import bitsandbytes.functional as bnb_F  # optional dependency: available() reports it missing

        _check_array("x", x)
        if not self.supports(quant_type, double_quant):
            raise ValueError(f"bitsandbytes has no quant_type={quant_type!r}, double_quant={double_quant!r}")
        t = to_torch(x, self.device)
        packed, qs = bnb_F.quantize_4bit(t, blocksize=blocksize, compress_statistics=bool(double_quant),
                                         quant_type=quant_type)
        entries = {"weight": packed, **{f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}
        return from_bnb_state_dict({k: to_numpy(v) for k, v in entries.items()})

    def dequantize(self, packed, state, *, dtype=None):
        """bitsandbytes' ``dequantize_4bit`` of a state given as a ``qlora_ref.QuantState``."""
        import bitsandbytes.functional as bnb_F  # optional dependency: available() reports it missing

        _check_array("packed", packed)
        if not self.supports(state.quant_type, state.nested is not None):
            raise ValueError(f"bitsandbytes cannot decode quant_type={state.quant_type!r}")
        entries = {k: to_torch(v, self.device) for k, v in to_bnb_state_dict(packed, state).items()}
        qs = bnb_F.QuantState.from_dict({k: v for k, v in entries.items() if k != "weight"}, device=self.device)
        if dtype is not None:
            qs.dtype = torch_dtype(dtype)  # decode into it
        # bitsandbytes routes some shapes (an odd last dimension) through a torch.compile'd
        # fallback that recompiles for every new shape; eager mode computes the same values.
        with torch.compiler.set_stance("force_eager"):
            return to_numpy(bnb_F.dequantize_4bit(entries["weight"], qs))


class TorchaoProvider:
    """torchao's ``NF4Tensor`` (``to_nf4`` and ``get_original_weight``): the ``"torchao"`` scheme.

    Examples
    --------
    >>> p = TorchaoProvider(device="cpu")
    >>> p.supports("nf4", "torchao"), p.supports("nf4", True)
    (True, False)
    """

    name = "torchao"

    def __init__(self, device=None):
        self.device = default_device(device)

    def available(self):
        """Whether torchao's NF4 module imports, and if not, what is missing."""
        try:
            __import__(_NF4_MODULE)
        except ImportError as exc:
            return False, f"torchao is not installed ({exc})"
        return True, ""

    def supports(self, quant_type, double_quant) -> bool:
        """NF4 with torchao's own int8 double quantization only."""
        return quant_type == "nf4" and double_quant == "torchao"

    def quantize(self, x, *, blocksize=64, quant_type="nf4", double_quant="torchao"):
        """``to_nf4(x, blocksize, 256)``; its fields as a ``qlora_ref.QuantState`` (scheme ``"torchao"``).

        Raises
        ------
        ValueError
            If the options are not torchao's, or torchao refuses the shape (at most 2
            dimensions, a multiple of ``blocksize * 256`` elements).
        """
        _check_array("x", x)
        if not self.supports(quant_type, double_quant):
            raise ValueError(f"torchao has no quant_type={quant_type!r}, double_quant={double_quant!r}")
        nf4 = importlib.import_module(_NF4_MODULE)
        t = to_torch(x, self.device)
        if t.ndim > 2 or t.numel() % (blocksize * 256):
            raise ValueError(f"torchao's to_nf4 needs at most 2 dimensions and a multiple of {blocksize} * 256 "
                             f"elements; got shape {tuple(t.shape)}")
        q = nf4.to_nf4(t, blocksize, 256)
        nested = NestedAbsmax(scheme="torchao", codes=to_numpy(q.quantized_scalers),
                           absmax=to_numpy(q.quantization_factor), codebook=None,
                           offset=to_numpy(q.scaler_mean)[()], blocksize=q.scaler_block_size)
        state = QuantState(shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."), blocksize=q.block_size,
                         quant_type="nf4", codebook=to_numpy(q.nf4), nested=nested)
        return to_numpy(q.quantized_data).reshape(-1, 1), state

    def dequantize(self, packed, state, *, dtype=None):
        """Rebuild the ``NF4Tensor`` from the state and call ``get_original_weight``."""
        _check_array("packed", packed)
        if state.nested is None or state.nested.scheme != "torchao":
            raise ValueError("torchao decodes states of its own 'torchao' scheme only")
        nf4 = importlib.import_module(_NF4_MODULE)
        D = torch_dtype(state.dtype)
        shape = torch.Size(state.shape)
        strides = tuple(int(np.prod(state.shape[i + 1:], dtype=np.int64)) for i in range(len(state.shape)))
        meta = nf4.SubclassTensorArgs(shape, strides, 0, D, self.device, False)
        n = state.nested
        q = nf4.NF4Tensor(meta, state.blocksize, state.n_blocks, n.blocksize,
                          to_torch(np.asarray(n.codes), self.device),
                          to_torch(np.asarray(n.absmax), self.device),
                          to_torch(np.asarray(n.offset), self.device).reshape(()),
                          to_torch(packed.reshape(-1), self.device),
                          to_torch(np.asarray(state.codebook), self.device))
        y = q.get_original_weight()
        if dtype is not None:
            y = y.to(torch_dtype(dtype))
        return to_numpy(y)
