"""Hostile checkpoint files: every problem is a clear error naming the tensor; nothing crashes;
nothing decodes to a weight other than what the file says.

Explicit cases first (the ones the issue lists, and bitsandbytes' CPU repacking hazard), then a
hypothesis fuzz test that mutates a valid file (header shapes, dtypes and offsets, tensors,
quant_state JSON fields, lengths, bytes) and checks each result: either the reader raises
``ValueError`` naming the file and the tensor (or, for damage to the file as a whole, the file
and the problem), or every weight it returns is bit-identical to what bitsandbytes itself decodes
from the same bytes.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_ref import quantize_4bit
from qlora_ref.formats.checkpoint import read_checkpoint, write_checkpoint
from qlora_ref.state import numpy_dtype

LAYERS = ("model.a", "model.b")


def _valid_tensors() -> dict:
    """Two 4-bit layers (NF4 bf16 with double quantization; FP4 float32 without, odd size) and a bias."""
    from qlora_ref.formats.bnb import to_bnb_state_dict

    rng = np.random.default_rng(0)
    a = rng.standard_normal((24, 40)).astype(numpy_dtype("bfloat16"))
    b = rng.standard_normal((7, 9)).astype(np.float32)
    out = {f"model.a.{k}": v for k, v in to_bnb_state_dict(*quantize_4bit(a, double_quant=True)).items()}
    out.update({f"model.b.{k}": v for k, v in to_bnb_state_dict(*quantize_4bit(b, blocksize=32, quant_type="fp4")).items()})
    out["model.b.bias"] = rng.standard_normal(7).astype(np.float32)
    return out


def _save(tmp_path, tensors, name="m.safetensors"):
    from safetensors.numpy import save_file

    path = tmp_path / name
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _qs_key(layer="model.a", qt="nf4"):
    return f"{layer}.weight.quant_state.bitsandbytes__{qt}"


def _with_json(tensors, layer="model.a", qt="nf4", **changes):
    key = _qs_key(layer, qt)
    meta = json.loads(tensors[key].tobytes())
    for k, v in changes.items():
        if v is _DELETE:
            meta.pop(k, None)
        else:
            meta[k] = v
    out = dict(tensors)
    out[key] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()
    return out


_DELETE = object()


def _error(tmp_path, tensors) -> str:
    path = _save(tmp_path, tensors)
    with pytest.raises(ValueError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


# ----------------------------------------------------------------------------- explicit cases


def test_valid_file_reads(tmp_path):
    ckpt = read_checkpoint(_save(tmp_path, _valid_tensors()))
    assert sorted(ckpt.layers) == list(LAYERS) and list(ckpt.tensors) == ["model.b.bias"]


def test_truncated_file(tmp_path):
    path = _save(tmp_path, _valid_tensors())
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"truncated|data ends at byte|not a valid safetensors") as info:
        read_checkpoint(path)
    assert "tensor 'model." in str(info.value), str(info.value)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="fewer than the 8 of the header length"):
        read_checkpoint(path)


def test_header_shape_disagrees_with_offsets(tmp_path):
    path = _save(tmp_path, _valid_tensors())
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["model.a.weight.absmax"]["shape"] = [16]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(ValueError, match=r"tensor 'model.a.weight.absmax': U8 of shape \[16\] needs 16 bytes"):
        read_checkpoint(path)


@pytest.mark.parametrize("change, pattern", [
    (dict(shape=[24, 41]), r"'model.a.weight' has shape \(480, 1\).*needs \(492, 1\)"),
    (dict(dtype="int8"), r"dtype 'int8' is not one of"),
    (dict(blocksize=128), r"'model.a.weight.absmax' has shape \(15,\), expected \(8,\)"),
    (dict(blocksize=100), r"blocksize 100 is not one of"),
    (dict(nested_offset=0.1), r"nested_offset 0.1 is not a float32 value"),
    (dict(nested_dtype="bfloat16"), r"repacking hazard"),
    (dict(quant_type="fp4"), r"JSON quant_type 'fp4' disagrees with the key"),
    (dict(extra=1), r"unknown JSON keys \['extra'\]"),
    (dict(shape=_DELETE), r"JSON lacks \['shape'\]"),
])
def test_json_that_disagrees(tmp_path, change, pattern):
    message = _error(tmp_path, _with_json(_valid_tensors(), **change))
    assert "4-bit layer 'model.a'" in message
    assert __import__("re").search(pattern, message), message


def test_missing_keys(tmp_path):
    for key in ("model.a.weight", "model.a.weight.absmax", "model.a.weight.quant_map", "model.a.weight.nested_absmax"):
        tensors = _valid_tensors()
        del tensors[key]
        message = _error(tmp_path, tensors)
        assert f"missing key '{key}'" in message or key in message, message
    tensors = _valid_tensors()
    del tensors[_qs_key()]
    message = _error(tmp_path, tensors)
    assert "model.a.weight" in message and "quant_state" in message, message


def test_absmax_of_the_wrong_length(tmp_path):
    tensors = _valid_tensors()
    tensors["model.b.weight.absmax"] = tensors["model.b.weight.absmax"][:-1].copy()
    message = _error(tmp_path, tensors)
    assert "'model.b.weight.absmax' has shape (1,), expected (2,)" in message, message


def test_unknown_quant_type(tmp_path):
    tensors = _valid_tensors()
    tensors[_qs_key(qt="int4")] = tensors.pop(_qs_key())
    message = _error(tmp_path, _with_json(tensors, qt="int4", quant_type="int4"))
    assert "'model.a.weight.quant_state.bitsandbytes__int4': unknown quant type" in message, message


def test_packed_size_does_not_match_shape(tmp_path):
    tensors = _valid_tensors()
    tensors["model.b.weight"] = tensors["model.b.weight"][:-1].copy()
    message = _error(tmp_path, tensors)
    assert "'model.b.weight' has shape (31, 1)" in message and "needs (32, 1)" in message, message


def test_unsupported_dtype_and_orphan_state(tmp_path):
    tensors = _valid_tensors()
    tensors["model.b.bias"] = tensors["model.b.bias"].astype(np.complex64)
    with pytest.raises(ValueError, match="tensor 'model.b.bias'"):
        read_checkpoint(_save(tmp_path, tensors))
    tensors = _valid_tensors()
    tensors["model.c.weight.absmax"] = np.ones(3, np.float32)
    message = _error(tmp_path, tensors)
    assert "tensor 'model.c.weight.absmax' belongs to a 4-bit weight" in message


def test_bitsandbytes_cpu_repacking_hazard_is_detected(tmp_path):
    """A state dict taken after bitsandbytes repacked the weight for its AVX-512-BF16 CPU kernel
    (reproduced by calling that repacking directly) is refused with the explanation."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    functional = pytest.importorskip("bitsandbytes.functional")
    if not hasattr(functional, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU repacking (_convert_weight_packed_for_cpu)")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128, dtype=torch.bfloat16), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4", blocksize=64)
    layer = layer.to("cpu")
    # What Linear4bit.forward does on such a CPU in eval mode without gradients:
    layer.weight.data, layer.weight.quant_state = functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state)
    save_file({f"lin.{k}": v for k, v in layer.state_dict().items()}, tmp_path / "h.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="repacking hazard"):
        read_checkpoint(tmp_path / "h.safetensors")


# ----------------------------------------------------------------------------- the fuzz test


def _bnb_reference(path):
    """What bitsandbytes decodes from a file: ``{layer: ndarray}``, or None if it cannot."""
    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import load_file
    from tolerances import as_numpy

    try:
        sd = load_file(str(path))
    except Exception:
        return None
    out = {}
    for layer in LAYERS:
        prefix = f"{layer}.weight."
        entries = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        try:
            qs = F.QuantState.from_dict(entries, device=torch.device("cpu"))
            with torch.compiler.set_stance("force_eager"):
                out[layer] = as_numpy(F.dequantize_4bit(sd[f"{layer}.weight"], qs))
        except Exception:
            out[layer] = None
    return out


_JSON_VALUES = {
    "quant_type": ["nf4", "fp4", "int4", "", 4],
    "blocksize": [32, 128, 4096, 63, "64", -64, True, 64.0],
    "dtype": ["float16", "float32", "bfloat16", "int8", ""],
    "shape": [[24, 40], [40, 24], [960], [24, 41], [], [0], [-24, -40], ["24", 40], [7, 9]],
    "nested_offset": [1e39, "1.0", 0.1, 0.0, -1.0, 2.5],
    "nested_blocksize": [128, 0, 256, "256"],
    "nested_dtype": ["bfloat16", "float16", "float32"],
}


@st.composite
def mutations(draw):
    """A (description, function from the valid tensors and file bytes to new file bytes) pair."""
    kind = draw(st.sampled_from(["truncate", "append", "flip", "header", "drop", "reshape", "retype", "json", "rename"]))
    if kind == "truncate":
        cut = draw(st.floats(0, 1, exclude_max=True))
        return kind, lambda t, data: data[: int(cut * len(data))]
    if kind == "append":
        extra = draw(st.binary(min_size=1, max_size=16))
        return kind, lambda t, data: data + extra
    if kind == "flip":
        where, bit = draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(0, 7))

        def flip(t, data):
            b = bytearray(data)
            b[int(where * len(b))] ^= 1 << bit
            return bytes(b)
        return f"flip bit {bit} at {where:.4f}", flip
    key = draw(st.sampled_from(sorted(_valid_tensors())))
    if kind == "header":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        value = draw(st.sampled_from({"dtype": ["F32", "F16", "U8", "I8", "BF16", "F64"],
                                      "shape": [[1], [2, 1], [], [3, 5]],
                                      "data_offsets": [[0, 4], [4, 8], [0, 0]]}[field]))

        def header(t, data):
            (n,) = struct.unpack("<Q", data[:8])
            h = json.loads(data[8:8 + n])
            h[key][field] = value
            text = json.dumps(h).encode()
            text += b" " * (-len(text) % 8)
            return struct.pack("<Q", len(text)) + text + data[8 + n:]
        return f"header {key} {field}={value}", header
    if kind == "drop":
        return f"drop {key}", lambda t, data: _bytes({k: v for k, v in t.items() if k != key})
    if kind == "reshape":
        delta = draw(st.sampled_from([-1, 1]))

        def reshape(t, data):
            a = t[key]
            n = max(a.shape[0] + delta, 0)
            new = np.resize(a, (n,) + a.shape[1:]).astype(a.dtype)
            return _bytes({**t, key: new})
        return f"reshape {key} by {delta}", reshape
    if kind == "retype":
        dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "uint8", "int8", "int32"]))
        return f"retype {key} to {dtype}", lambda t, data: _bytes({**t, key: t[key].astype(
            numpy_dtype(dtype) if dtype in ("float16", "bfloat16", "float32") else np.dtype(dtype))})
    if kind == "rename":
        new = draw(st.sampled_from(["__fp4", "__nf4", "__int4", ".extra", "_x"]))
        return f"rename {key} +{new}", lambda t, data: _bytes({(k.replace("__nf4", new).replace("__fp4", new)
                                                                 if k == key and "__" in k else (k + new if k == key else k)): v
                                                                for k, v in t.items()})
    layer = draw(st.sampled_from(LAYERS))
    field = draw(st.sampled_from(sorted(_JSON_VALUES) + ["<delete>", "<garbage>"]))
    qt = "nf4" if layer == "model.a" else "fp4"
    if field == "<garbage>":
        junk = draw(st.binary(min_size=0, max_size=24))
        return f"json of {layer} replaced by {junk!r}", lambda t, data: _bytes({**t, _qs_key(layer, qt): np.frombuffer(junk, np.uint8).copy()})
    if field == "<delete>":
        name = draw(st.sampled_from(sorted(_JSON_VALUES)))
        return f"json of {layer} without {name}", lambda t, data: _bytes(_with_json(t, layer, qt, **{name: _DELETE}))
    value = draw(st.sampled_from(_JSON_VALUES[field]))
    return f"json of {layer}: {field}={value!r}", lambda t, data: _bytes(_with_json(t, layer, qt, **{field: value}))


def _bytes(tensors) -> bytes:
    from safetensors.numpy import save

    return save(tensors, metadata={"format": "pt"})


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          deadline=None)
@given(mutation=mutations())
def test_fuzzed_files_fail_clearly_or_decode_as_bitsandbytes_does(tmp_path, mutation):
    pytest.importorskip("bitsandbytes")
    what, mutate = mutation
    tensors = _valid_tensors()
    path = tmp_path / "fuzz.safetensors"
    data = mutate(tensors, _bytes(tensors))
    path.write_bytes(data)
    try:
        ckpt = read_checkpoint(path)
    except ValueError as exc:
        message = str(exc)
        assert str(path) in message, f"{what}: the error does not name the file: {message}"
        named = any(name in message for name in (*LAYERS, "tensor '", "the header", "the file"))
        assert named, f"{what}: the error names neither a tensor nor the file's problem: {message}"
        return
    # Accepted: every 4-bit weight must be what bitsandbytes decodes from the same bytes.
    reference = _bnb_reference(path)
    assert reference is not None, f"{what}: read by the oracle but not loadable by safetensors.torch"
    for layer, decoded in ((name, ckpt.layers[name].weight()) for name in ckpt.layers):
        theirs = reference.get(layer)
        assert theirs is not None, f"{what}: {layer} read by the oracle, refused by bitsandbytes"
        if ckpt.layers[layer].state.quant_type == "fp4":  # code 8: -0.0 in bnb's C++ CPU decoder
            from qlora_ref.blockwise import unpack_4bit
            from qlora_ref.conformance.classify import classify_decoded

            codes = unpack_4bit(ckpt.layers[layer].packed, ckpt.layers[layer].state.numel)
            diff = classify_decoded(codes, decoded, theirs.reshape(decoded.shape), quant_type="fp4")
            assert diff.unclassified == 0, f"{what}: {layer}: {diff}"
        else:
            assert decoded.dtype == theirs.dtype and np.array_equal(
                decoded.reshape(-1).view(np.uint16 if decoded.itemsize == 2 else np.uint32),
                theirs.reshape(-1).view(np.uint16 if theirs.itemsize == 2 else np.uint32)), f"{what}: {layer} decodes differently"


def test_writer_refuses_duplicate_keys(tmp_path):
    W = np.ones((4, 64), np.float32)
    with pytest.raises(ValueError, match="written twice|both a 4-bit entry"):
        write_checkpoint(tmp_path / "x.safetensors", {"a": quantize_4bit(W)}, {"a.weight": W})
