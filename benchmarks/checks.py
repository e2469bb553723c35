"""Check each benchmark case's output against the oracle before it is timed.

Pairs with ``benchmarks/cases.py`` (which calls these once per case, then times) and with the
tolerance policy of ``tests/tolerances.py`` (loaded from there, so there is one policy):

- quantize: packed codes bit for bit; the double-quantized absmax bit for bit, or every
  difference in a named class of ``qlora_ref.conformance.classify`` (bitsandbytes' CPU path encodes the
  nested codes through a lookup table; an offset may differ by the rounding of a float32 sum);
- decode: bit for bit against the oracle's ``dequantize_4bit`` of the provider's own state
  (so a decode is judged apart from its quantizer); torchao under ``torch.compile`` may differ
  where a named alternative rule says (``torchao_float32_intermediates``), and those elements
  are counted;
- product and layer: the derived tier: error against the oracle's float64 result at most twice
  the error of a plain torch computation in the same dtype, plus a few ulp.

Note: checked rows
    The oracle is NumPy on one core; checking a 8192x28672 weight whole would take longer than
    timing it. Blockwise formats allow an exact partial check: the first R rows of ``W`` (whole
    blocks, and whole nested blocks for torchao) depend only on their own constants, so the
    codes and decoded values of those rows are compared exactly, and the product and the layer
    are checked on the first R output features (the layer's ``grad_y`` is zero beyond them, so
    its ``grad_x`` needs only those rows of ``W``). R covers the whole weight up to
    ``CHECK_ELEMENTS`` elements (every CPU case) and about that many elements beyond. The
    absmax, nested absmax and offset are always compared whole.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

from qlora_ref.api import dequantize_4bit
from qlora_ref.blockwise import blockwise_absmax, encode_4bit, pack_4bit
from qlora_ref.conformance.classify import classify_nested_codes, classify_offset
from qlora_ref.conformance.variants import torchao_float32_intermediates
from qlora_ref.double_quant import double_quantize
from qlora_ref.state import NestedAbsmax, QuantState

__all__ = ["CHECK_ELEMENTS", "checked_rows", "slice_state", "OracleReference",
           "check_derived", "tolerances"]

#: Elements of ``W`` checked against the oracle at most, in whole rows (Note: checked rows).
CHECK_ELEMENTS = 2**24
_TORCHAO_GROUP = 64 * 256  # elements per nested block of torchao's format


def tolerances():
    """The project's tolerance module ``tests/tolerances.py`` (one policy for tests and benchmarks)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "tolerances.py"
    spec = importlib.util.spec_from_file_location("qlora_tolerances", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checked_rows(shape: tuple, scheme: str = "bnb", limit: int = CHECK_ELEMENTS) -> int:
    """Rows of a ``(rows, cols)`` weight that are checked (Note: checked rows).

    Examples
    --------
    >>> checked_rows((4096, 4096)), checked_rows((8192, 28672)), checked_rows((8192, 28672), "torchao")
    (4096, 585, 584)
    """
    rows, cols = shape
    if rows * cols <= limit:
        return rows
    step = 1 if scheme == "bnb" else _TORCHAO_GROUP // math.gcd(cols, _TORCHAO_GROUP)
    step = max(step, 64 // math.gcd(cols, 64))  # whole first-level blocks
    return max(step, (limit // cols) // step * step)


def slice_state(packed: np.ndarray, state: QuantState, rows: int) -> tuple[np.ndarray, QuantState]:
    """The packed codes and state of the first ``rows`` rows of a double-quantized 2-D weight.

    Exact when those rows hold whole blocks: each block's constants are its own, and nested
    block ``j`` covers blocks ``256 j .. 256 j + 255``.
    """
    if rows == state.shape[0]:
        return packed, state
    m = rows * state.shape[1]
    n_blocks = m // state.blocksize
    nested = state.nested
    n_nested = -(-n_blocks // nested.blocksize)
    sliced = NestedAbsmax(scheme=nested.scheme, codes=nested.codes[:n_blocks], absmax=nested.absmax[:n_nested],
                          codebook=nested.codebook, offset=nested.offset, blocksize=nested.blocksize)
    sub = QuantState(shape=(rows, state.shape[1]), dtype=state.dtype, blocksize=state.blocksize,
                     quant_type=state.quant_type, codebook=state.codebook, nested=sliced)
    return packed.reshape(-1)[: m // 2].reshape(-1, 1), sub


def _ulp(values: np.ndarray, dtype) -> np.ndarray:
    """One unit in the last place of ``dtype`` at each value's magnitude (normal numbers)."""
    import ml_dtypes

    info = ml_dtypes.finfo(dtype)
    _, exponent = np.frexp(np.abs(np.asarray(values, dtype=np.float64)))  # |v| = m 2^e, m in [0.5, 1)
    return np.maximum(float(info.eps) * np.ldexp(1.0, exponent - 1), float(info.smallest_subnormal))


def _equal_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    uint = np.dtype(f"u{a.dtype.itemsize}")
    return a.view(uint) == b.view(uint)


class OracleReference:
    """The oracle's answers for one bfloat16 weight ``W``, computed once and shared by every provider.

    Parameters
    ----------
    W : ndarray, shape (rows, cols), ``ml_dtypes.bfloat16`` (or float32 / float16)
    """

    def __init__(self, W: np.ndarray):
        self.W = W
        self.shape = tuple(W.shape)
        self._x32 = None
        self._absmax = None
        self._packed = {}

    @property
    def x32(self) -> np.ndarray:
        if self._x32 is None:
            self._x32 = np.asarray(self.W).astype(np.float32).reshape(-1)  # exact
        return self._x32

    @property
    def absmax(self) -> np.ndarray:
        """The float32 first-level absmax of the whole weight (block 64)."""
        if self._absmax is None:
            self._absmax = blockwise_absmax(self.x32, 64)
        return self._absmax

    def packed_prefix(self, rows: int) -> np.ndarray:
        """``quantize_4bit``'s packed codes of the first ``rows`` rows (bitsandbytes' format)."""
        if rows not in self._packed:
            m = rows * self.shape[1]
            codes = encode_4bit(self.x32[:m], self.absmax[: -(-m // 64)], 64, "nf4")
            self._packed[rows] = pack_4bit(codes, "nf4")
        return self._packed[rows]

    # -- quantize ---------------------------------------------------------------------------

    def check_quantize(self, packed: np.ndarray, state: QuantState) -> str:
        """Compare a provider's quantization of ``W`` with the oracle's; return what was found.

        Raises
        ------
        AssertionError
            On any difference that is not in a named class.
        """
        if state.nested.scheme == "torchao":
            return self._check_torchao(packed, state)
        T = tolerances()
        rows = checked_rows(self.shape)
        m = rows * self.shape[1]
        T.assert_bit_equal(np.asarray(packed).reshape(-1)[: (m + 1) // 2], self.packed_prefix(rows).reshape(-1),
                           f"packed codes of rows 0..{rows}")
        found = []
        ref_offset = double_quantize(self.absmax).offset  # the oracle's own offset
        offset = classify_offset(self.absmax, ref_offset, state.nested.offset)
        assert offset.unclassified == 0, str(offset)
        if offset.index.size:
            found.append(str(offset))
        # With the provider's offset, only the encoding of absmax - offset can differ.
        ref = double_quantize(self.absmax, offset=state.nested.offset)
        T.assert_bit_equal(state.nested.absmax, ref.absmax, "nested absmax")
        values = (self.absmax - np.float32(state.nested.offset)).astype(np.float32)
        codes = classify_nested_codes(values, ref.codes, state.nested.codes, blocksize=ref.blocksize)
        assert codes.unclassified == 0, str(codes)
        if codes.index.size:
            found.append(str(codes))
        where = "exact" if rows == self.shape[0] else f"exact on rows 0..{rows}"
        if found:
            where = f"packed codes and nested absmax {where}"
        return where + "".join(f"; {f}" for f in found)

    def _check_torchao(self, packed, state) -> str:
        from qlora_ref.torchao_nf4 import quantize_torchao

        T = tolerances()
        rows = checked_rows(self.shape, "torchao")
        found = []
        if rows == self.shape[0]:
            ref_packed, ref_state = quantize_torchao(self.W)
            own = ref_state.nested.offset
            if not _equal_bits(own, state.nested.offset):
                gap = abs(float(own) - float(state.nested.offset))
                assert gap <= _ulp(np.array([float(own)]), np.asarray(own).dtype)[0], (
                    f"scaler mean {state.nested.offset!r} is more than one ulp from the oracle's {own!r}")
                found.append("scaler mean 1 ulp from the oracle's (float32 reduction order, Note: torchao arithmetic)")
                ref_packed, ref_state = quantize_torchao(self.W, mean=state.nested.offset)
        else:  # the mean is global: pass the provider's, so that the prefix encodes as the whole does
            ref_packed, ref_state = quantize_torchao(self.W[:rows], mean=state.nested.offset)
        sub_packed, sub = slice_state(packed, state, rows)
        T.assert_bit_equal(sub_packed.reshape(-1), ref_packed.reshape(-1), f"packed codes of rows 0..{rows}")
        T.assert_bit_equal(sub.nested.codes, ref_state.nested.codes, "quantized scalers")
        T.assert_bit_equal(sub.nested.absmax, ref_state.nested.absmax, "quantization factors")
        where = "exact" if rows == self.shape[0] else f"exact on rows 0..{rows}"
        return where + "".join(f"; {f}" for f in found)

    # -- decode -----------------------------------------------------------------------------

    def check_decode(self, y: np.ndarray, packed: np.ndarray, state: QuantState, dtype: str, *,
                     compiled: bool = False) -> str:
        """Compare a provider's decoded weight with the oracle's decode of the provider's state.

        A compiled torchao provider is held to the rule ``float32 intermediates``
        (``torchao_float32_intermediates``): every element must equal the oracle's or that
        rule's value, and the elements where the two differ are counted.
        """
        T = tolerances()
        rows = checked_rows(self.shape, state.nested.scheme)
        sub_packed, sub = slice_state(packed, state, rows)
        ref = dequantize_4bit(sub_packed, sub, dtype=dtype)
        got = np.asarray(y)[:rows]
        where = "exact" if rows == self.shape[0] else f"exact on rows 0..{rows}"
        if not (compiled and state.nested.scheme == "torchao"):
            T.assert_bit_equal(got, ref, f"decoded rows 0..{rows}")
            return where
        differ = ~_equal_bits(got, ref)
        if not differ.any():
            return where
        other = torchao_float32_intermediates(sub_packed, sub, dtype)
        T.assert_bit_equal(got[differ], other[differ], "decoded elements that differ from the oracle")
        return f"{where} except {int(differ.sum())} of {differ.size}: float32 intermediates (torch.compile)"

    def weight(self, packed: np.ndarray, state: QuantState, dtype: str, rows: int, *,
               rule: str = "oracle") -> np.ndarray:
        """The first ``rows`` rows of the decoded weight rounded to ``dtype``, as float64.

        ``rule="float32 intermediates"`` decodes as ``torchao_float32_intermediates`` does.
        """
        sub_packed, sub = slice_state(packed, state, rows)
        if rule == "float32 intermediates":
            return torchao_float32_intermediates(sub_packed, sub, dtype).astype(np.float64)
        return dequantize_4bit(sub_packed, sub, dtype=dtype).astype(np.float64)


def check_derived(actual, ref64, baseline, *, dtype, scale, what: str) -> float:
    """The derived tier (``tests/tolerances.py``); returns the error as a fraction of the budget."""
    T = tolerances()
    budget = T.derived_budget(ref64, baseline, dtype=dtype, scale=scale)
    T.assert_within(actual, ref64, budget, what)
    a = np.asarray(T.as_numpy(actual), dtype=np.float64)
    err = float(np.max(np.abs(a - ref64))) if a.size else 0.0
    return err / budget if budget else 0.0
