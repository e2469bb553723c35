"""``qlora-ref check``: check implementations against the oracle, and name every difference.

Runs each implementation (``qlora_ref.implementations``: the registered providers and user code
given as ``module:function``) on the shipped golden vectors (``qlora_ref.vectors``) and on fresh
random inputs, compares what it produces with the oracle's results, and sorts each differing
value into a named class (``qlora_ref.classify``) or counts it as unexplained.

Note: what check compares
    For a quantization case with input ``x``:

    1. ``quantize(x)`` without double quantization: the packed codes (classified per code) and
       the float32 absmax (classified per block).
    2. With bitsandbytes' double quantization, when the implementation supports it: the codes
       must equal its own codes of step 1; its offset is classified against the oracle's mean
       of its own absmax; its nested codes and nested absmax are compared with the oracle's
       encoding of its own absmax with its own offset, so that each difference is counted once,
       where it arises.
    3. ``dequantize`` of the oracle's state (with and without double quantization): decoded
       values, bit for bit (``fp4 negative zero`` is the only class).

    torchao's scheme (``double_quant="torchao"``) is compared on random inputs whose size it
    accepts; its mean may differ within a float32 sum's rounding (``offset ulp``), after which
    everything must be equal bit for bit. LoRA cases (for implementations with ``lora_forward`` /
    ``lora_backward``) are equal when bit-identical, ``derived tolerance`` when within the
    manifest's budget, unexplained beyond it.

    Exit status: 1 when any difference is unexplained (with ``--strict``: any difference at all),
    2 on a usage error, 0 otherwise.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from qlora_ref.classify import (
    UNCLASSIFIED,
    Differences,
    classify_absmax,
    classify_decoded,
    classify_nested_codes,
    classify_offset,
    classify_packed,
)
from qlora_ref.double_quant import DYNAMIC_MAP, double_quantize
from qlora_ref.quantize import blockwise_absmax, dequantize_4bit, unpack_4bit
from qlora_ref.state import BLOCKSIZES, QuantState, numpy_dtype
from qlora_ref.vector_cases import quantize_case
from qlora_ref.vectors import case_state, load_case, read_manifest

__all__ = ["Row", "check_implementations", "format_report", "random_inputs", "register"]

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
    _keys: set = field(default_factory=set, repr=False)

    def add(self, diff: Differences, where: str) -> None:
        """Count one comparison's differences by class."""
        self.compared += diff.compared
        self.exact += diff.compared - diff.index.size
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
                "unexplained": self.unexplained, "skipped": self.skipped, "notes": list(self.notes)}


def _exact(what: str, expected, actual) -> Differences:
    """Bitwise comparison with no classes: every difference is unexplained."""
    e, a = np.asarray(expected).reshape(-1), np.asarray(actual).reshape(-1)
    uint = np.dtype(f"u{e.dtype.itemsize}")
    index = np.flatnonzero(e.view(uint) != a.astype(e.dtype).view(uint))
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


def _prefer_ties(diff: Differences, x, blocksize: int, quant_type: str, packed) -> Differences:
    """Name a difference ``tie on a midpoint`` when ``x / absmax`` IS a midpoint, exactly.

    ``classify_codes`` tries ``partial block division`` and ``approximate reciprocal`` before
    ``tie on a midpoint``, and either rule can also move an exact midpoint to the upper entry;
    but where the exact quotient is the midpoint (not only its float32 rounding) the tie is the
    narrower explanation (with a power-of-two absmax the reciprocal is exact even under fast
    math, and so is the division), so it takes precedence here. A product that merely rounds
    onto a midpoint stays with the scaling classes: the tie there is an artefact of rounding.
    """
    from qlora_ref.quantize import _sorted_midpoints
    from qlora_ref.codebooks import codebook

    relabel = np.flatnonzero(np.isin(diff.classes, ["approximate reciprocal", "partial block division"]))
    if relabel.size == 0:
        return diff
    index = diff.index[relabel]
    x32 = np.asarray(x).astype(np.float32).reshape(-1)
    absmax = blockwise_absmax(x32, blocksize)[index // blocksize]
    with np.errstate(divide="ignore", invalid="ignore"):
        s = x32[index] * (np.float32(1) / absmax)
        exact = x32[index].astype(np.float64) / absmax.astype(np.float64)  # float64 decides equality exactly
    midpoints, order = _sorted_midpoints(codebook(quant_type))
    position = np.searchsorted(midpoints, s, side="left")
    nearest = midpoints[np.minimum(position, midpoints.size - 1)]
    on_midpoint = (position < midpoints.size) & (nearest == s) & (exact == nearest.astype(np.float64))
    upper = order[np.minimum(position + 1, order.size - 1)]
    got = unpack_4bit(packed, x32.size)[index]
    classes = diff.classes.astype(object)  # object: a longer class name must not be truncated
    classes[relabel[on_midpoint & (upper == got)]] = "tie on a midpoint"
    return Differences(diff.what, diff.compared, diff.index, classes.astype(str))


#: Class of a code in a block whose float32 reciprocal overflows, encoded from the exact quotient.
RECIPROCAL_OVERFLOW = "reciprocal overflow"


def _overflowed_reciprocal(diff: Differences, x, blocksize: int, quant_type: str, packed) -> Differences:
    """Name ``reciprocal overflow`` the unclassified codes of blocks whose ``1 / absmax`` is inf.

    Below ``absmax ~ 2.9e-39`` (subnormal) the float32 reciprocal is infinite and the format's
    rule sends every nonzero value to an end code; implementations disagree there
    (bitsandbytes' CPU path clamps absmax to 1e-38, CUDA's fast math flushes subnormals), and
    one that divides exactly gives the nearest code. A difference in such a block is this class
    when the other code is the nearest entry to the exact quotient ``x / absmax``.
    """
    from qlora_ref.quantize import _sorted_midpoints
    from qlora_ref.codebooks import codebook

    pending = np.flatnonzero(diff.classes == UNCLASSIFIED)
    pending = pending[diff.index[pending] < np.asarray(x).size]  # not the pad nibble
    if pending.size == 0:
        return diff
    index = diff.index[pending]
    x32 = np.asarray(x).astype(np.float32).reshape(-1)
    absmax = blockwise_absmax(x32, blocksize)[index // blocksize]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        overflow = np.isinf(np.float32(1) / absmax) & (absmax > 0)
        exact = x32[index].astype(np.float64) / absmax.astype(np.float64)
    midpoints, order = _sorted_midpoints(codebook(quant_type))
    nearest = order[np.searchsorted(midpoints.astype(np.float64), exact, side="left")]
    got = unpack_4bit(packed, x32.size)[index]
    classes = diff.classes.astype(object)  # object: a longer class name must not be truncated
    classes[pending[overflow & (nearest == got)]] = RECIPROCAL_OVERFLOW
    return Differences(diff.what, diff.compared, diff.index, classes.astype(str))


def _absmax_of(second):
    if isinstance(second, QuantState):
        return second.absmax
    return second


def _check_quantize(impl, x, params, arrays, row: Row, name: str) -> None:
    """Steps 1 and 2 of Note: what check compares."""
    qt, bs = params["quant_type"], params["blocksize"]
    n = x.size
    packed_i = absmax_i = None
    if impl.supports(qt, False, bs):
        packed_raw, second = impl.quantize(x, blocksize=bs, quant_type=qt, double_quant=False)
        packed_i = _as_uint8(packed_raw, n, f"{name} quantize", row)
        if packed_i is not None:
            diff = classify_packed(x, arrays["packed"], packed_i, blocksize=bs, quant_type=qt)
            diff = _overflowed_reciprocal(_prefer_ties(diff, x, bs, qt, packed_i), x, bs, qt, packed_i)
            row.add(diff, f"{name} codes")
            hint = _diagnose_nibbles(arrays["packed"], packed_i, n) if diff.unclassified else None
            if hint:
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
    if not impl.supports(qt, True, bs):
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
    codes_i, absmax2_i = np.asarray(nested.codes), np.asarray(nested.absmax)
    if codes_i.shape != ref.codes.shape or absmax2_i.shape != ref.absmax.shape:
        row.fail(f"{name} nested", ref.codes.size, f"nested arrays have shapes {codes_i.shape} and "
                 f"{absmax2_i.shape}, expected {ref.codes.shape} and {ref.absmax.shape}")
        return
    row.add(classify_nested_codes(base - offset_i, ref.codes, codes_i, blocksize=ref.blocksize), f"{name} nested codes")
    row.add(_exact("nested absmax", ref.absmax, absmax2_i.astype(np.float32)), f"{name} nested absmax")
    if nested.code is not None:
        row.add(_exact("nested map", DYNAMIC_MAP, np.asarray(nested.code, dtype=np.float32)), f"{name} nested map")


def _check_dequantize(impl, case, arrays, row: Row, name: str) -> None:
    """Step 3 of Note: what check compares: decode the oracle's states."""
    p = case["params"]
    qt, bs, dtype = p["quant_type"], p["blocksize"], p["dtype"]
    runs = [(False, "decoded")]
    if "decoded_dq" in arrays:
        runs.append((True, "decoded_dq"))
    codes = arrays["codes"] if "codes" in arrays else unpack_4bit(arrays["packed"], int(np.prod(p["shape"])))
    for dq, key in runs:
        if not impl.supports(qt, dq, bs):
            continue
        packed, state = case_state(case, arrays, double_quant=dq)
        y = np.asarray(impl.dequantize(packed, state, dtype=dtype))
        expected = arrays[key]
        if y.size != expected.size or y.dtype != expected.dtype:
            row.fail(f"{name} {key}", expected.size, f"returned {y.dtype} {y.shape}, expected {expected.dtype} {expected.shape}")
            continue
        if y.shape != expected.shape:  # the values are compared; the shape is only reported
            row.note(f"{name} {key}: returned shape {y.shape} for {expected.shape}", key="shape")
        row.add(classify_decoded(codes, expected, y.reshape(expected.shape), quant_type=qt), f"{name} {key}")


def _check_lora(impl, case, arrays, row: Row, name: str) -> None:
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


def _group(case) -> str:
    p = case["params"]
    if case["kind"] in ("lora", "qlora"):
        return "vectors lora"
    return f"vectors {p['quant_type']}"


def _run_case(impl, case, arrays, row: Row) -> None:
    """One case under one implementation; an exception is a failure unless NotImplementedError."""
    name = case["name"]
    n = int(np.prod(case["params"].get("shape", [0]))) or int(arrays[next(iter(arrays))].size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                if case["kind"] == "quantize" and impl.quantize is not None:
                    _check_quantize(impl, arrays["input"], case["params"], arrays, row, name)
                if case["kind"] in ("quantize", "dequantize") and impl.dequantize is not None:
                    _check_dequantize(impl, case, arrays, row, name)
                if case["kind"] in ("lora", "qlora"):
                    _check_lora(impl, case, arrays, row, name)
        row.cases += 1
    except NotImplementedError:
        row.skipped += 1
    except Exception as exc:  # any crash on valid input counts against the implementation
        row.cases += 1
        row.fail(name, n, f"raised {type(exc).__name__}: {str(exc)[:200]}")


def _applies(impl, case) -> bool:
    p = case["params"]
    if case["kind"] in ("lora", "qlora"):
        return impl.lora_forward is not None or impl.lora_backward is not None
    if case["kind"] not in ("quantize", "dequantize"):
        return False
    wanted = impl.quantize is not None or impl.dequantize is not None
    return wanted and (impl.supports(p["quant_type"], False, p["blocksize"])
                       or impl.supports(p["quant_type"], True, p["blocksize"]))


# ----------------------------------------------------------------------------- random inputs


def random_inputs(seed: int = 0, rounds: int = 1, max_elements: int = 40_000):
    """Yield ``(quant_type, blocksize, x)`` random hard inputs for both quant types and all dtypes.

    Each block of an input is one of: normal data at a random scale, all zeros, exact codebook
    midpoints times a power-of-two absmax, subnormals, a single outlier. Element counts are odd
    (a padded byte) and rarely a multiple of the block size.

    Examples
    --------
    >>> [(q, x.dtype.name) for q, b, x in random_inputs(rounds=1)][:2]
    [('nf4', 'float32'), ('nf4', 'float16')]
    """
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        for quant_type in ("nf4", "fp4"):
            for dtype in ("float32", "float16", "bfloat16"):
                blocksize = int(rng.choice(BLOCKSIZES[:5]))
                n = int(rng.integers(blocksize * 3, max_elements)) | 1
                yield quant_type, blocksize, _hard_blocks(rng, n, blocksize, quant_type).astype(numpy_dtype(dtype))


def _hard_blocks(rng, n: int, blocksize: int, quant_type: str) -> np.ndarray:
    from qlora_ref.codebooks import codebook

    table = np.sort(codebook(quant_type))
    midpoints = (table[:-1] + table[1:]) / np.float32(2)
    x = np.empty(n, dtype=np.float64)
    for start in range(0, n, blocksize):
        m = min(blocksize, n - start)
        kind = rng.choice(["normal", "normal", "normal", "zeros", "midpoints", "subnormal", "outlier"])
        if kind == "normal":
            block = rng.standard_normal(m) * 2.0 ** rng.uniform(-8, 8)
        elif kind == "zeros":
            block = np.zeros(m)
        elif kind == "midpoints":
            absmax = 2.0 ** int(rng.integers(-6, 6))
            block = rng.choice(midpoints, m).astype(np.float64) * absmax
            block[rng.integers(m)] = absmax
        elif kind == "subnormal":
            block = rng.integers(-100, 100, m) * 1.4e-45
        else:
            block = rng.standard_normal(m) * 0.01
            block[rng.integers(m)] = 50.0
        x[start:start + m] = block
    return x.astype(np.float32)


def _random_cases(seed: int, rounds: int):
    """Random inputs as manifest-like cases, with the oracle's results as the expected arrays."""
    for i, (quant_type, blocksize, x) in enumerate(random_inputs(seed, rounds)):
        c = quantize_case(f"random-{i}-{quant_type}-b{blocksize}-{x.dtype.name}", x, blocksize=blocksize,
                          quant_type=quant_type, description="", tags=[])
        yield {"name": c.name, "kind": "quantize", "params": c.params}, c.arrays


def _torchao_inputs(seed: int):
    rng = np.random.default_rng(seed + 1)
    for dtype in ("bfloat16", "float32"):
        x = rng.standard_normal((64, 512)) * 0.02
        x[rng.integers(0, 64, 3)] = 0.0  # a few all-zero rows: all-zero blocks
        yield x.astype(numpy_dtype(dtype))


def _check_torchao(impl, x, row: Row, name: str) -> None:
    """The torchao scheme: after a mean within a float32 sum's rounding, everything is exact."""
    from qlora_ref.torchao_scheme import quantize_torchao

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


# ----------------------------------------------------------------------------- the run


def check_implementations(impls, *, vectors_root=None, use_vectors: bool = True, seed: int = 0, rounds: int = 1,
                          per_case: bool = False) -> list:
    """Check implementations on the golden vectors and on random inputs.

    Parameters
    ----------
    impls : list of qlora_ref.implementations.Implementation
        Unavailable ones are skipped (their reason is reported by ``format_report``).
    vectors_root : str or Path, optional
        A golden-vector folder; default the shipped set.
    use_vectors : bool
        Run the golden vectors.
    seed, rounds : int
        The random inputs: ``rounds`` inputs per quant type and dtype (0 for none).
    per_case : bool
        One row per case instead of one per group.

    Returns
    -------
    list of Row
        One per implementation and group (or case), in run order.

    Examples
    --------
    >>> from qlora_ref.implementations import resolve
    >>> rows = check_implementations([resolve("oracle")], rounds=0)
    >>> sum(r.unexplained for r in rows), sum(sum(r.classes.values()) for r in rows), rows[0].compared > 0
    (0, 0, True)
    """
    rows: dict = {}

    def row_for(impl, group):
        key = (impl.name, group)
        if key not in rows:
            rows[key] = Row(impl.name, group)
        return rows[key]

    manifest = read_manifest(vectors_root) if use_vectors else {"cases": [], "root": None}
    vector_cases = [c for c in manifest["cases"] if c["kind"] in ("quantize", "dequantize", "lora", "qlora")]
    loaded = {}
    for impl in impls:
        if not impl.available:
            continue
        for case in vector_cases:
            if not _applies(impl, case):
                continue
            if case["name"] not in loaded:
                loaded[case["name"]] = load_case(case, manifest["root"])
            _run_case(impl, case, loaded[case["name"]], row_for(impl, case["name"] if per_case else _group(case)))
    with np.errstate(all="ignore"):  # subnormal blocks overflow the reciprocal, by design
        random_cases = list(_random_cases(seed, rounds)) if rounds else []
    for impl in impls:
        if not impl.available:
            continue
        for case, arrays in random_cases:
            if _applies(impl, case):
                p = case["params"]
                _run_case(impl, case, arrays, row_for(impl, case["name"] if per_case else f"random {p['quant_type']}"))
        if rounds and impl.quantize is not None and impl.supports("nf4", "torchao", 64):
            for i, x in enumerate(_torchao_inputs(seed)):
                name = f"random-torchao-{i}-{x.dtype.name}"
                row = row_for(impl, name if per_case else "random torchao scheme")
                try:
                    with warnings.catch_warnings(), np.errstate(all="ignore"):
                        warnings.simplefilter("ignore")
                        _check_torchao(impl, x, row, name)
                    row.cases += 1
                except NotImplementedError:
                    row.skipped += 1
                except Exception as exc:
                    row.cases += 1
                    row.fail(name, x.size, f"raised {type(exc).__name__}: {str(exc)[:200]}")
    order = {impl.name: i for i, impl in enumerate(impls)}
    return sorted(rows.values(), key=lambda r: order[r.impl])  # stable: groups keep their run order


def format_report(rows, impls, *, elapsed_s: float | None = None) -> str:
    """Format the rows as one table, then the unavailable implementations and the notes."""
    from qlora_ref.tables import format_table

    class_names = sorted({name for r in rows for name in r.classes})
    headers = ["implementation", "cases", "compared", "exact"] + class_names + ["unexplained"]
    table_rows = []
    for r in rows:
        label = f"{r.impl}: {r.group}"
        table_rows.append([label, r.cases, r.compared, r.exact] + [r.classes.get(c, 0) for c in class_names]
                          + [r.unexplained])
    lines = [format_table(headers, table_rows, title="qlora-ref check: implementations against the oracle")]
    skipped = [r for r in rows if r.skipped]
    for r in skipped:
        lines.append(f"{r.impl}: {r.group}: {r.skipped} case(s) not supported, skipped")
    for impl in impls:
        if not impl.available:
            lines.append(f"{impl.name}: not checked ({impl.reason})")
    total = sum(r.unexplained for r in rows)
    explained = sum(sum(r.classes.values()) for r in rows)
    for r in rows:
        for note in r.notes:
            lines.append(f"  {r.impl}: {note}")
    summary = (f"{total} unexplained difference(s)" if total else "no unexplained differences") + \
              f"; {explained} explained by a named class"
    if elapsed_s is not None:
        summary += f" ({elapsed_s:.1f} s)"
    lines.append(summary)
    return "\n".join(lines)


def _default_names() -> list:
    from qlora_ref.registry import PROVIDERS

    return list(PROVIDERS)


def _run(args) -> int:
    from qlora_ref.implementations import resolve

    names = args.impl or _default_names()
    impls = [resolve(name) for name in names]
    start = time.perf_counter()
    rows = check_implementations(impls, vectors_root=args.vectors, use_vectors=not args.no_vectors,
                                 seed=args.seed, rounds=args.rounds, per_case=args.per_case)
    elapsed_s = time.perf_counter() - start
    unexplained = sum(r.unexplained for r in rows)
    explained = sum(sum(r.classes.values()) for r in rows)
    if args.json:
        print(json.dumps({
            "format_version": 1,
            "implementations": {i.name: {"available": i.available, "reason": i.reason} for i in impls},
            "rows": [r.as_dict() for r in rows],
            "unexplained": unexplained,
            "explained": explained,
            "elapsed_s": round(elapsed_s, 3),
        }, indent=2, sort_keys=True))
    else:
        print(format_report(rows, impls, elapsed_s=None if args.no_time else elapsed_s))
    if unexplained or (args.strict and explained):
        return 1
    return 0


def register(subparsers) -> None:
    """Add ``qlora-ref check``."""
    p = subparsers.add_parser(
        "check", help="check implementations against the oracle on the golden vectors and random inputs",
        description="Check 4-bit quantization implementations against the oracle. IMPL is a registered "
                    "provider (oracle, torch, triton, bnb, torchao) or module:quantize[,dequantize] "
                    "(docs/conformance.md); default: every registered provider that is installed. Exit "
                    "status 1 when a difference is unexplained.")
    p.add_argument("impl", nargs="*", metavar="IMPL", help="implementations to check (default: all registered)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 on any difference, classified or not")
    p.add_argument("--per-case", action="store_true", help="one row per case instead of per group")
    p.add_argument("--vectors", metavar="DIR", default=None, help="golden-vector folder (default: the shipped set)")
    p.add_argument("--no-vectors", action="store_true", help="skip the golden vectors")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--rounds", type=int, default=1, help="random inputs per quant type and dtype (default 1; 0 for none)")
    p.add_argument("--no-time", action="store_true", help="leave the elapsed time out (for reproducible output)")
    p.set_defaults(func=_run)
