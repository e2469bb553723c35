"""The comparisons of ``qlora-ref check``: one implementation's results against the oracle's.

Each function compares what an implementation (``qlora_ref.conformance.implementations.Implementation``)
produces for one case with the expected arrays, sorts every differing value into a class of
``qlora_ref.conformance.classify`` (or one of the two defined here) and counts it in a ``Row``.
``qlora_ref.conformance.run`` runs them over the golden vectors and random inputs and prints the rows.

Note: what check compares
    For a quantization case with input ``x``:

    1. ``quantize(x)`` without double quantization: the packed codes (classified per code) and
       the float32 absmax (classified per block).
    2. With bitsandbytes' double quantization, when the implementation supports it: the codes
       must equal its own codes of step 1; its offset is classified against the oracle's mean
       of its own absmax; its nested codes and nested absmax are compared with the oracle's
       encoding of its own absmax with its own offset, so that each difference is counted once,
       where it arises. An implementation that refuses to double-quantize absmax whose float32
       sum overflows is right to (``offset sum overflow``).
    3. ``dequantize`` of the oracle's state (with and without double quantization): decoded
       values, bit for bit or reproduced exactly by one decoder model of ``qlora_ref.conformance.variants``
       (``classify_decoded``); the models that reproduce each tensor are kept per row, and an
       implementation is explained only when one model reproduces all of them.

    Everywhere NaN compares equal to NaN whatever its payload (``variants.same_bits``).

    torchao's scheme (``double_quant="torchao"``) is compared on inputs whose size it accepts;
    its mean may differ within a float32 sum's rounding (``offset ulp``), after which everything
    must be equal bit for bit. LoRA cases (for implementations with ``lora_forward`` /
    ``lora_backward``) are equal when bit-identical, ``derived tolerance`` when within the
    manifest's budget, unexplained beyond it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from qlora_ref.api import dequantize_4bit
from qlora_ref.blockwise import unpack_4bit
from qlora_ref.conformance.classify import (
    UNCLASSIFIED,
    Differences,
    classify_absmax,
    classify_decoded,
    classify_nested_codes,
    classify_offset,
    classify_packed,
)
from qlora_ref.conformance.variants import same_bits
from qlora_ref.conformance.vectors import case_state
from qlora_ref.double_quant import DYNAMIC_MAP, dequantize_absmax, double_quantize
from qlora_ref.state import QuantState, dtype_name, numpy_dtype
from qlora_ref.torchao_nf4 import quantize_torchao

__all__ = ["Row", "DERIVED", "check_quantize", "check_dequantize", "check_lora", "check_torchao"]

#: Notes kept per row (the first ones: where the unexplained differences start).
MAX_NOTES = 4
#: Class of a LoRA output inside the manifest's derived budget without being bit-identical.
DERIVED = "derived tolerance"


@dataclass
class Row:
    """What one implementation did on one group of cases.

    Attributes
    ----------
    impl, group : str
    cases : int
        Cases run.
    compared : int
        Values compared (codes, absmax, nested codes and absmax, offsets, decoded values).
    exact : int
        Values bit-identical with the oracle.
    classes : Counter
        Differences per named class.
    unexplained : int
        Differences no class explains.
    skipped : int
        Cases the implementation does not support.
    notes : list of str
        What went wrong where, for the unexplained differences and errors.
    decode_models, encode_models : set of str or None
        The decoder (encoder) models of ``qlora_ref.conformance.variants`` that reproduce every decoded
        tensor (every tensor of codes and absmax) of the row; None when there was none.
    diagnoses : list of str
        The known defects (``qlora_ref.conformance.variants``) that reproduce unexplained differences
        exactly, each once.
    """

    impl: str
    group: str
    cases: int = 0
    compared: int = 0
    exact: int = 0
    classes: Counter = field(default_factory=Counter)
    unexplained: int = 0
    skipped: int = 0
    notes: list = field(default_factory=list)
    decode_models: set | None = None
    encode_models: set | None = None
    diagnoses: list = field(default_factory=list)
    _keys: set = field(default_factory=set, repr=False)

    def add(self, diff: Differences, where: str) -> None:
        """Count one comparison's differences by class."""
        self.compared += diff.compared
        self.exact += diff.compared - diff.index.size
        if diff.diagnosis and diff.diagnosis not in self.diagnoses:
            self.diagnoses.append(diff.diagnosis)
        if diff.models is not None:
            models = set(diff.models)
            kind = "decode_models" if diff.what == "decoded" else "encode_models"
            seen = getattr(self, kind)
            setattr(self, kind, models if seen is None else seen & models)
        for name, n in diff.counts().items():
            if name == UNCLASSIFIED:
                self.unexplained += n
                first = int(diff.index[diff.classes == UNCLASSIFIED][0])
                self.note(f"{where}: {n} unexplained {diff.what} differences (first at {first})")
            else:
                self.classes[name] += n

    def fail(self, where: str, n: int, message: str) -> None:
        """Count ``n`` values as unexplained because the implementation failed to produce them."""
        self.compared += n
        self.unexplained += n
        self.note(f"{where}: {message}")

    def note(self, text: str, key: str = "") -> None:
        """Keep a note; at most ``MAX_NOTES`` per row, and one per ``key`` when given."""
        if key:
            if key in self._keys:
                return
            self._keys.add(key)
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)
        elif len(self.notes) == MAX_NOTES:
            self.notes.append("... (more notes left out)")

    def as_dict(self) -> dict:
        return {"impl": self.impl, "group": self.group, "cases": self.cases, "compared": self.compared,
                "exact": self.exact, "classes": dict(sorted(self.classes.items())),
                "unexplained": self.unexplained, "skipped": self.skipped, "notes": list(self.notes),
                "decode_models": None if self.decode_models is None else sorted(self.decode_models),
                "encode_models": None if self.encode_models is None else sorted(self.encode_models),
                "diagnoses": list(self.diagnoses)}


def _exact(what: str, expected, actual) -> Differences:
    """Bitwise comparison with no classes: every difference is unexplained."""
    e, a = np.asarray(expected).reshape(-1), np.asarray(actual).reshape(-1)
    index = np.flatnonzero(~same_bits(e, a.astype(e.dtype)))
    return Differences(what, e.size, index, np.full(index.size, UNCLASSIFIED, dtype=object).astype(str))


def _as_uint8(packed, n: int, where: str, row: Row):
    p = np.asarray(packed)
    if p.dtype != np.uint8 and p.nbytes == (n + 1) // 2:
        p = np.ascontiguousarray(p).view(np.uint8)  # another storage dtype over the same bytes
    if p.dtype != np.uint8 or p.size != (n + 1) // 2:
        row.fail(where, n, f"packed is {p.dtype} with {p.size} elements; expected {(n + 1) // 2} uint8 bytes")
        return None
    return p.reshape(-1)


def _diagnose_nibbles(expected: np.ndarray, packed: np.ndarray, n: int) -> str | None:
    """Say so when swapping the two nibbles of each byte removes nearly all differences."""
    want = unpack_4bit(expected, n)
    swapped = ((packed & 0x0F) << 4) | (packed >> 4)
    before = int(np.sum(unpack_4bit(packed, n) != want))
    after = int(np.sum(unpack_4bit(swapped, n) != want))
    if before and after <= before // 10:
        return ("the nibbles are swapped: the FIRST element of each pair belongs in the HIGH nibble "
                f"({before} codes differ, {after} with the nibbles swapped)")
    return None


def _absmax_of(second):
    if isinstance(second, QuantState):
        return second.absmax
    return second


def check_quantize(impl, x, params, arrays, row: Row, name: str) -> None:
    """Steps 1 and 2 of Note: what check compares."""
    qt, bs = params["quant_type"], params["blocksize"]
    n = x.size
    packed_i = absmax_i = None
    dtype = dtype_name(x.dtype)
    if not impl.supports(qt, False, bs, dtype=dtype):
        row.skipped += 1
    else:
        packed_raw, second = impl.quantize(x, blocksize=bs, quant_type=qt, double_quant=False)
        packed_i = _as_uint8(packed_raw, n, f"{name} quantize", row)
        if packed_i is not None:
            diff = classify_packed(x, arrays["packed"], packed_i, blocksize=bs, quant_type=qt)
            row.add(diff, f"{name} codes")
            hint = _diagnose_nibbles(arrays["packed"], packed_i, n) if diff.unclassified else None
            if hint and hint.split(" (")[0] not in row.diagnoses:
                row.diagnoses.append(hint.split(" (")[0])
                row.note(f"{name}: {hint}", key="nibbles")
        absmax_i = _absmax_of(second)
        if absmax_i is not None:
            absmax_i = np.asarray(absmax_i)
            if absmax_i.shape != arrays["absmax"].shape or absmax_i.dtype != np.float32:
                row.fail(f"{name} absmax", arrays["absmax"].size,
                         f"absmax is {absmax_i.dtype} {absmax_i.shape}, expected float32 {arrays['absmax'].shape}")
                absmax_i = None
            else:
                row.add(classify_absmax(x, arrays["absmax"], absmax_i, blocksize=bs), f"{name} absmax")
    if not impl.supports(qt, True, bs, dtype=dtype):
        return
    try:
        packed_dq, state = impl.quantize(x, blocksize=bs, quant_type=qt, double_quant=True)
    except NotImplementedError:
        return
    except Exception as exc:  # only the double-quantized values are lost, not the whole case
        base = absmax_i if absmax_i is not None else arrays["absmax"]
        if float(np.sum(base.astype(np.float64))) > float(np.finfo(np.float32).max):
            # Refusing is right here: a float32 mean of these absmax overflows (bitsandbytes
            # would store an infinite offset), so there is no valid state to return.
            row.add(Differences("offset", 1, np.array([0]), np.array(["offset sum overflow"])), f"{name} offset")
            row.note(f"{name}: double quantization refused ({type(exc).__name__}); the float32 sum of the "
                     "absmax overflows", key="refused")
            return
        row.fail(f"{name} double quant", arrays["absmax"].size + 1, f"raised {type(exc).__name__}: {str(exc)[:200]}")
        return
    packed_dq = _as_uint8(packed_dq, n, f"{name} quantize (double quant)", row)
    if packed_dq is not None:
        reference = packed_i if packed_i is not None else arrays["packed"]
        row.add(_exact("codes (double quant)", reference, packed_dq), f"{name} codes with double quantization")
    nested = getattr(state, "nested", None)
    if nested is None or nested.scheme != "bnb":
        row.fail(f"{name} double quant", arrays["absmax"].size, "no bnb nested state returned for double_quant=True")
        return
    base = absmax_i if absmax_i is not None else arrays["absmax"]
    offset_i = np.float32(nested.offset)
    diff = classify_offset(base, double_quantize(base).offset, offset_i)
    row.add(diff, f"{name} offset")
    if not np.isfinite(offset_i):
        row.note(f"{name}: offset {offset_i}: nested state not compared")
        return
    ref = double_quantize(base, offset=offset_i)  # the oracle's encoding of its absmax and offset
    if int(nested.blocksize) != ref.blocksize:  # the file says so even where the values agree
        diagnosis = f"its nested blocksize is {nested.blocksize}, the format's is {ref.blocksize}"
        if diagnosis not in row.diagnoses:
            row.diagnoses.append(diagnosis)
        row.fail(f"{name} nested", ref.codes.size, diagnosis)
        return
    codes_i, absmax2_i = np.asarray(nested.codes), np.asarray(nested.absmax)
    if codes_i.shape != ref.codes.shape or absmax2_i.shape != ref.absmax.shape:
        row.fail(f"{name} nested", ref.codes.size, f"nested arrays have shapes {codes_i.shape} and "
                 f"{absmax2_i.shape}, expected {ref.codes.shape} and {ref.absmax.shape}")
        return
    row.add(classify_nested_codes(base - offset_i, ref.codes, codes_i, blocksize=ref.blocksize), f"{name} nested codes")
    row.add(_exact("nested absmax", ref.absmax, absmax2_i.astype(np.float32)), f"{name} nested absmax")
    if nested.codebook is not None:
        row.add(_exact("nested map", DYNAMIC_MAP, np.asarray(nested.codebook, dtype=np.float32)), f"{name} nested map")


def check_dequantize(impl, case, arrays, row: Row, name: str) -> None:
    """Step 3 of Note: what check compares: decode the oracle's states."""
    p = case["params"]
    qt, bs, dtype = p["quant_type"], p["blocksize"], p["dtype"]
    runs = [(False, "decoded")]
    if "decoded_dq" in arrays:
        runs.append((True, "decoded_dq"))
    codes = arrays["codes"] if "codes" in arrays else unpack_4bit(arrays["packed"], int(np.prod(p["shape"])))
    supports = impl.supports_decode or impl.supports
    for dq, key in runs:
        if not supports(qt, dq, bs, dtype=dtype):
            if not dq:
                row.skipped += 1
            continue
        packed, state = case_state(case, arrays, double_quant=dq)
        y = np.asarray(impl.dequantize(packed, state, dtype=dtype))
        expected = arrays[key]
        if y.size != expected.size or y.dtype != expected.dtype:
            row.fail(f"{name} {key}", expected.size, f"returned {y.dtype} {y.shape}, expected {expected.dtype} {expected.shape}")
            continue
        if y.shape != expected.shape:  # the values are compared; the shape is only reported
            row.note(f"{name} {key}: returned shape {y.shape} for {expected.shape}", key="shape")
        absmax = state.absmax if state.absmax is not None else dequantize_absmax(state.nested)
        row.add(classify_decoded(codes, expected, y.reshape(expected.shape), quant_type=qt, absmax=absmax,
                                 blocksize=bs), f"{name} {key}")


def check_lora(impl, case, arrays, row: Row, name: str) -> None:
    p = case["params"]
    W = arrays["W"] if "W" in arrays else arrays["W_c"]
    common = dict(scaling=p["scaling"], dropout_mask=arrays.get("dropout_mask"))
    outputs = {}
    if impl.lora_forward is not None:
        outputs["y"] = impl.lora_forward(arrays["x"], W, arrays["A"], arrays["B"], bias=arrays.get("bias"), **common)
    if impl.lora_backward is not None:
        grads = impl.lora_backward(arrays["grad_y"], arrays["x"], W, arrays["A"], arrays["B"], **common)
        outputs.update(zip(("grad_x", "grad_A", "grad_B"), grads))
    for key, got in outputs.items():
        ref = arrays[key]
        got64 = np.asarray(got).astype(np.float64)
        if got64.shape != ref.shape:
            row.fail(f"{name} {key}", ref.size, f"shape {got64.shape}, expected {ref.shape}")
            continue
        err = np.abs(got64 - ref)
        equal = got64 == ref
        within = ~equal & (err <= p["budgets"][key])
        bad = ~equal & ~within
        classes = np.where(within, DERIVED, UNCLASSIFIED)
        index = np.flatnonzero(~equal)
        row.add(Differences(key, ref.size, index, classes.reshape(-1)[index].astype(str)), f"{name} {key}")
        if bad.any():
            row.note(f"{name} {key}: max error {err.max():.3e} exceeds the budget {p['budgets'][key]:.3e}")


def check_torchao(impl, x, row: Row, name: str) -> None:
    """The torchao scheme: after a mean within a float32 sum's rounding, everything is exact."""

    packed_i, state_i = impl.quantize(x, blocksize=64, quant_type="nf4", double_quant="torchao")
    packed_o, state_o = quantize_torchao(x, blocksize=64)
    nested_i = getattr(state_i, "nested", None)
    if nested_i is None or nested_i.scheme != "torchao":
        row.fail(name, x.size, "no torchao nested state returned for double_quant='torchao'")
        return
    D = numpy_dtype(state_o.dtype)
    mean_o, mean_i = state_o.nested.offset, np.asarray(nested_i.offset).astype(D)[()]
    if np.asarray(mean_o).view(f"u{D.itemsize}") != np.asarray(mean_i).view(f"u{D.itemsize}"):
        scalers = np.abs(x.astype(np.float32).reshape(-1, 64)).max(axis=1)
        exact_mean = float(scalers.astype(np.float64).mean())
        bound = (scalers.size - 1) * 2.0**-24 * exact_mean + 2 * 2.0**-24 * exact_mean
        lo, hi = np.float32(exact_mean - bound).astype(D), np.float32(exact_mean + bound).astype(D)
        ok = float(lo) <= float(mean_i) <= float(hi)
        row.add(Differences("mean", 1, np.array([0]), np.array(["offset ulp" if ok else UNCLASSIFIED])), f"{name} mean")
        packed_o, state_o = quantize_torchao(x, blocksize=64, mean=mean_i)
    else:
        row.add(_exact("mean", np.atleast_1d(mean_o), np.atleast_1d(mean_i)), f"{name} mean")
    p = _as_uint8(packed_i, x.size, f"{name} quantize", row)
    if p is not None:
        row.add(_exact("codes", packed_o, p), f"{name} codes")
    row.add(_exact("scaler codes", state_o.nested.codes, np.asarray(nested_i.codes).astype(np.int8)), f"{name} scaler codes")
    row.add(_exact("factors", state_o.nested.absmax, np.asarray(nested_i.absmax).astype(D)), f"{name} factors")
    if impl.dequantize is not None:
        y = np.asarray(impl.dequantize(packed_o, state_o, dtype=state_o.dtype))
        row.add(_exact("decoded", dequantize_4bit(packed_o, state_o), y), f"{name} decoded")
