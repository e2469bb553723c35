"""``qlora-ref check``: exact for the oracle, every difference of real implementations named,
deliberately broken implementations caught in the right class.

The broken implementations below follow the user protocol (docs/conformance.md): plain NumPy
functions ``quantize(x, blocksize, quant_type) -> (packed, absmax)`` and ``dequantize(...)``,
loaded by the command line as ``test_check:<name>``.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from qlora_ref.api import quantize_4bit
from qlora_ref.blockwise import blockwise_absmax, decode_4bit, pack_4bit, unpack_4bit
from qlora_ref.cli import main
from qlora_ref.codebooks import codebook
from qlora_ref.conformance.implementations import resolve
from qlora_ref.conformance.providers import PROVIDERS
from qlora_ref.conformance.run import check_implementations, format_report

# ----------------------------------------------------------------------------- broken implementations


def _flat32(x):
    return np.asarray(x).astype(np.float32).reshape(-1)


def _encode_with(s, quant_type, side="left"):
    table = codebook(quant_type)
    order = np.argsort(table, kind="stable")
    v = table[order]
    midpoints = (v[:-1] + v[1:]) / np.float32(2)
    codes = order[np.searchsorted(midpoints, s, side=side)].astype(np.uint8)
    return codes


def swapped_nibbles(x, blocksize, quant_type):
    """The oracle's codes with the first element in the LOW nibble."""
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    return ((packed & 0x0F) << 4) | (packed >> 4), state.absmax


def ties_up(x, blocksize, quant_type):
    """A value exactly on a midpoint takes the UPPER entry."""
    x32 = _flat32(x)
    absmax = blockwise_absmax(x32, blocksize)
    with np.errstate(all="ignore"):
        s = x32 * np.repeat(np.float32(1) / absmax, blocksize)[: x32.size]
    codes = _encode_with(s, quant_type, side="right")
    codes[x32 == 0] = _encode_with(np.zeros(1, np.float32), quant_type)[0]
    return pack_4bit(codes, quant_type), absmax


def float64_scaling(x, blocksize, quant_type):
    """Scales by the float64 quotient ``x / absmax`` instead of the float32 reciprocal."""
    x32 = _flat32(x)
    absmax = blockwise_absmax(x32, blocksize)
    with np.errstate(all="ignore"):
        s = x32.astype(np.float64) / np.repeat(absmax.astype(np.float64), blocksize)[: x32.size]
    table = codebook(quant_type)
    order = np.argsort(table, kind="stable")
    v = table[order].astype(np.float64)
    midpoints = ((table[order][:-1] + table[order][1:]) / np.float32(2)).astype(np.float64)
    codes = order[np.searchsorted(midpoints, s, side="left")].astype(np.uint8)
    zero = int(np.flatnonzero(v == 0)[0])
    codes[(x32 == 0) | np.isnan(s)] = order[zero]
    return pack_4bit(codes, quant_type), absmax


def decode_with_rounded_table(packed, absmax, shape, blocksize, quant_type, dtype):
    """Decodes with the codebook rounded to 4 decimals (as printed in papers, and as torchao
    stores NF4): not bitsandbytes' table."""
    n = int(np.prod(shape))
    table = np.round(codebook(quant_type).astype(np.float64), 4).astype(np.float32)
    y = decode_4bit(unpack_4bit(packed, n), absmax, blocksize, table)
    out = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    return y.astype(out).reshape(shape)


def good_decode(packed, absmax, shape, blocksize, quant_type, dtype):
    """A correct decoder in the user protocol."""
    n = int(np.prod(shape))
    y = decode_4bit(unpack_4bit(packed, n), absmax, blocksize, codebook(quant_type))
    out = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    return y.astype(out).reshape(shape)


def nf4_only(x, blocksize):
    """No quant_type parameter: an NF4-only implementation; checked on NF4 cases only."""
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    return packed, state.absmax


def _totals(rows):
    classes = {}
    for r in rows:
        for k, v in r.classes.items():
            classes[k] = classes.get(k, 0) + v
    return sum(r.unexplained for r in rows), classes


def _check(spec, **kw):
    kw.setdefault("rounds", 1)
    return check_implementations([resolve(spec)], **kw)


# ----------------------------------------------------------------------------- the oracle


def test_oracle_is_exact_on_vectors_and_random_inputs():
    rows = _check("oracle")
    unexplained, classes = _totals(rows)
    assert unexplained == 0 and classes == {}, format_report(rows, [])
    groups = {r.group for r in rows}
    assert {"vectors nf4", "vectors fp4", "vectors lora", "random nf4", "random fp4", "random torchao scheme"} <= groups
    assert all(r.compared == r.exact > 0 for r in rows)


# ----------------------------------------------------------------------------- broken ones, caught


def test_swapped_nibbles_is_unexplained_and_diagnosed(capsys):
    rows = _check("test_check:swapped_nibbles", rounds=0)
    unexplained, _ = _totals(rows)
    assert unexplained > 0
    assert any("nibbles are swapped" in note for r in rows for note in r.notes)
    assert main(["check", "test_check:swapped_nibbles", "--rounds", "0"]) == 1
    assert "nibbles are swapped" in capsys.readouterr().out


def test_ties_up_is_unexplained():
    # No real implementation rounds ties upward: no model reproduces it.
    rows = _check("test_check:ties_up")
    unexplained, _ = _totals(rows)
    assert unexplained > 0, format_report(rows, [])
    assert main(["check", "test_check:ties_up", "--no-vectors", "--no-time"]) == 1


def test_float64_scaling_is_unexplained():
    """Exact float64 quotients instead of the float32 reciprocal: near midpoints, and where the
    float32 reciprocal of a subnormal absmax overflows, the codes follow no real implementation."""
    rows = _check("test_check:float64_scaling", rounds=0)
    assert _totals(rows)[0] > 0, format_report(rows, [])


def bnb_cpu_encoder(x, blocksize, quant_type):
    """bitsandbytes' CPU encoder rules (the oracle's model of them), in the user protocol."""
    from qlora_ref.conformance.variants import encode_model

    (codes,), absmax = encode_model("bitsandbytes cpu", x, blocksize, quant_type)
    return pack_4bit(codes, quant_type), absmax


def test_a_known_implementations_rules_are_explained_by_its_model():
    rows = _check("test_check:bnb_cpu_encoder")
    unexplained, classes = _totals(rows)
    assert unexplained == 0 and classes.get("absmax clamp 1e-38", 0) > 0, format_report(rows, [])


def test_rounded_table_decode_is_unexplained_but_a_correct_decoder_is_exact():
    bad = _check("test_check:,decode_with_rounded_table", rounds=0)
    assert _totals(bad)[0] > 0
    good = _check("test_check:,good_decode", rounds=0)
    assert _totals(good) == (0, {})
    assert sum(r.compared for r in good) > 100_000


def mixed_models(x, blocksize, quant_type):
    """bitsandbytes' CPU rules for FP4, its CUDA rules for NF4: each case is explained by some
    model, but no ONE model explains the implementation."""
    from qlora_ref.conformance.variants import encode_model

    model = "bitsandbytes cpu" if quant_type == "fp4" else "bitsandbytes cuda"
    codes, absmax = encode_model(model, x, blocksize, quant_type)
    return pack_4bit(codes[0], quant_type), absmax


def test_one_model_must_explain_the_whole_implementation(capsys):
    rows = _check("test_check:mixed_models", use_vectors=False)
    assert _totals(rows)[0] == 0  # case by case, every difference has a model
    assert main(["check", "test_check:mixed_models", "--no-vectors", "--no-time"]) == 1
    assert "no single model reproduces all its codes and absmax" in capsys.readouterr().out


def test_offset_tolerance_is_stated_in_ulps_and_catches_a_wrong_divisor():
    from qlora_ref.conformance.classify import classify_offset, offset_tolerance_ulp

    absmax = np.random.default_rng(0).uniform(0.5, 1.0, 8192).astype(np.float32)
    exact = np.float32(absmax.astype(np.float64).mean())
    assert offset_tolerance_ulp(absmax.size) == 14
    near = exact
    for _ in range(14):
        near = np.nextafter(near, np.float32(2))
    assert classify_offset(absmax, exact, near).counts() == {"offset ulp": 1}
    assert classify_offset(absmax, exact, np.nextafter(near, np.float32(2))).unclassified == 1
    wrong = np.float32(absmax.astype(np.float64).sum() / (absmax.size + 1))  # 2^11 ulps away
    d = classify_offset(absmax, exact, wrong)
    assert d.unclassified == 1 and d.diagnosis == "the offset is the sum divided by n + 1"


def test_strict_fails_on_classified_differences(capsys):
    assert main(["check", "test_check:bnb_cpu_encoder", "--no-vectors", "--no-time"]) == 0
    assert main(["check", "test_check:bnb_cpu_encoder", "--no-vectors", "--strict"]) == 1
    capsys.readouterr()


def test_nf4_only_function_is_checked_on_nf4_only():
    rows = _check("test_check:nf4_only", rounds=0)
    assert {r.group for r in rows if r.cases} == {"vectors nf4"}
    assert _totals(rows) == (0, {})
    skipped = {r.group: r.skipped for r in rows if r.skipped}
    assert set(skipped) == {"vectors fp4"} and skipped["vectors fp4"] > 0, skipped  # counted, not failed


def nf4_only_decode(packed, absmax, shape, blocksize, dtype):
    """A correct decoder without a quant_type parameter: NF4 only (the protocol allows it)."""
    return good_decode(packed, absmax, shape, blocksize, "nf4", dtype)


def block64_only_decode(packed, absmax, shape, quant_type, dtype):
    """A correct decoder without a blocksize parameter: block size 64 only."""
    return good_decode(packed, absmax, shape, 64, quant_type, dtype)


def declared_quantize(x, blocksize, quant_type):
    """A correct encoder that declares what it supports: NF4, blocks of 64 and 128, float32 input."""
    if quant_type != "nf4" or blocksize not in (64, 128) or x.dtype != np.float32:
        raise AssertionError("called on a case it declared unsupported")
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    return packed, state.absmax


declared_quantize.quant_types = ("nf4",)
declared_quantize.blocksizes = (64, 128)
declared_quantize.dtypes = ("float32",)


@pytest.mark.parametrize("spec", ["test_check:ties_up,nf4_only_decode", "test_check:good_decode_all,block64_only_decode",
                                  "test_check:declared_quantize"])
def test_restricted_correct_implementations_pass(spec, capsys):
    # The encoder and the decoder declare their support separately: a restricted decoder is
    # never run on what only the encoder supports (ties_up is wrong, so only its decoder is
    # asked about here: its codes are checked elsewhere).
    if spec.startswith("test_check:ties_up"):
        spec = "test_check:,nf4_only_decode"
    rows = _check(spec)
    assert _totals(rows)[0] == 0, format_report(rows, [])
    assert sum(r.skipped for r in rows) > 0 and sum(r.cases for r in rows) > 0
    assert main(["check", spec, "--no-time"]) == 0
    assert "not supported, skipped" in capsys.readouterr().out


def good_decode_all(x, blocksize, quant_type):
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    return packed, state.absmax


def test_json_output(capsys):
    assert main(["check", "oracle", "test_check:bnb_cpu_encoder", "--json", "--no-vectors"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unexplained"] == 0 and out["explained"] > 0
    assert {r["impl"] for r in out["rows"]} == {"oracle", "test_check:bnb_cpu_encoder"}
    assert out["implementations"]["oracle"]["available"] is True
    assert out["implementations"]["test_check:bnb_cpu_encoder"]["encode_model"] == "bitsandbytes cpu"
    assert set(out["machine"]) >= {"cpu features", "implementations", "python", "numpy"}


def test_bad_specs_are_usage_errors(capsys):
    assert main(["check", "no_such_provider"]) == 2
    assert main(["check", "test_check:no_such_function"]) == 2
    assert main(["check", "test_check:a,b,c"]) == 2
    assert main(["check", "no_such_module_anywhere:quantize"]) == 2
    err = capsys.readouterr().err
    assert "neither a registered provider" in err and "no attribute" in err


def quantize_that_crashes(x, blocksize, quant_type):
    raise RuntimeError("kaput")


def test_crash_counts_against_the_implementation():
    rows = check_implementations([resolve("test_check:quantize_that_crashes")], rounds=0)
    assert _totals(rows)[0] > 0
    assert any("RuntimeError: kaput" in n for r in rows for n in r.notes)


# ----------------------------------------------------------------------------- real implementations


class BitsAndBytesViaTorch:
    """bitsandbytes' functional API behind the provider protocol (test-side glue: the states are
    taken field by field, so a broken state such as an infinite offset reaches the checker)."""

    def __init__(self):
        self.torch = pytest.importorskip("torch")
        self.F = pytest.importorskip("bitsandbytes.functional")

    def available(self):
        return True, ""

    def supports(self, quant_type, double_quant):
        return quant_type in ("nf4", "fp4") and double_quant in (False, True)

    def _t(self, x):
        torch = self.torch
        if x.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(x).copy())

    def quantize(self, x, *, blocksize, quant_type, double_quant):
        from qlora_ref.state import NestedAbsmax, QuantState, dtype_name

        with self.torch.compiler.set_stance("force_eager"):
            packed, qs = self.F.quantize_4bit(self._t(x), blocksize=blocksize, quant_type=quant_type,
                                              compress_statistics=bool(double_quant))
        common = dict(shape=tuple(x.shape), dtype=dtype_name(x.dtype), blocksize=blocksize,
                      quant_type=quant_type, codebook=qs.code.numpy().copy())
        if double_quant:
            s2 = qs.state2
            nested = NestedAbsmax("bnb", qs.absmax.numpy().copy(), s2.absmax.numpy().copy(), s2.code.numpy().copy(),
                                  np.float32(qs.offset.item()), s2.blocksize)
            return packed.numpy(), QuantState(**common, nested=nested)
        return packed.numpy(), QuantState(**common, absmax=qs.absmax.numpy().copy())

    def dequantize(self, packed, state, *, dtype):
        torch, F = self.torch, self.F
        kw = dict(shape=torch.Size(state.shape), blocksize=state.blocksize, code=torch.from_numpy(state.codebook.copy()),
                  quant_type=state.quant_type, dtype=getattr(torch, dtype))
        if state.nested is None:
            qs = F.QuantState(absmax=torch.from_numpy(state.absmax.copy()), **kw)
        else:
            n = state.nested
            s2 = F.QuantState(absmax=torch.from_numpy(n.absmax.copy()), code=torch.from_numpy(n.codebook.copy()),
                              blocksize=n.blocksize, dtype=torch.float32)
            qs = F.QuantState(absmax=torch.from_numpy(n.codes.copy()), offset=torch.tensor(float(n.offset)),
                              state2=s2, **kw)
        with torch.compiler.set_stance("force_eager"):  # bnb compiles its odd-shape CPU fallback
            y = F.dequantize_4bit(torch.from_numpy(np.asarray(packed).reshape(-1, 1).copy()), qs)
        from qlora_gpu.state import tensor_to_numpy  # torch is there: the class asked for it

        return tensor_to_numpy(y)


def test_bitsandbytes_cpu_has_only_named_differences():
    """bitsandbytes 0.50 on CPU: every difference from the oracle falls in a named class."""
    rows = _check("test_check:BitsAndBytesViaTorch")
    unexplained, classes = _totals(rows)
    assert unexplained == 0, format_report(rows, [])
    # The CPU path's known rules all show up on the vectors (docs/spec.md, sections 3 and 4).
    for name in ("partial block division", "absmax clamp 1e-38", "all-zero nested block", "offset sum overflow"):
        assert classes.get(name, 0) > 0, (name, classes)


@pytest.mark.parametrize("name", [n for n in PROVIDERS if n != "oracle"])
def test_registered_provider_has_no_unexplained_differences(name):
    impl = resolve(name)
    if not impl.available:
        pytest.skip(f"provider {name!r} not available: {impl.reason}")
    # Triton runs in its CPU interpreter here: the golden vectors only, to keep the file fast.
    rows = check_implementations([impl], rounds=0 if name == "triton" else 1)
    assert rows, f"no case ran for {name}"
    assert _totals(rows)[0] == 0, format_report(rows, [impl])


def test_docs_generated_parts_are_current(monkeypatch):
    """docs/conformance.md includes the output of real runs (docs/scripts/check_example.py)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    spec = importlib.util.spec_from_file_location("check_example", root / "docs" / "scripts" / "check_example.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name, make in script.GENERATED.items():
        committed = (root / "docs" / "generated" / name).read_text()
        assert committed == make(), f"docs/generated/{name} is stale: run python docs/scripts/check_example.py"
