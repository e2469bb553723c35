"""Hostile inputs, one test per row of the review's table: a clear error or a correct result, in
bounded memory and time, and no file outside the output touched.

The rows: header fields that size allocations (``nested_blocksize``, shapes beyond int64), paths
named inside files (vector manifests, sharded indexes), LoRA shapes that would broadcast, writes
over foreign folders and through symlinks, JSON of the wrong type or nested too deeply, regexes
that would hang, 0-d arrays, states with impossible fields, and command-line arguments. The
oracle and the fast path must refuse the same things with the same messages. The fuzzer that
mutates whole files and folders in a memory-capped subprocess is ``tests/test_hostile_fuzz.py``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from qlora_ref import quantize_4bit
from qlora_ref.conformance.vectors import load_case, read_manifest, write_vectors
from qlora_ref.double_quant import dequantize_absmax, double_quantize
from qlora_ref.formats.bnb import from_bnb_state_dict, to_bnb_state_dict
from qlora_ref.formats.checkpoint import read_checkpoint, read_header, write_checkpoint
from qlora_ref.formats.peft import check_pattern, read_adapter
from qlora_ref.state import BLOCKSIZES, NESTED_BLOCKSIZES, QuantState

QS = "weight.quant_state.bitsandbytes__nf4"


def _state_dict(shape=(64, 64), double_quant=True) -> dict:
    W = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return to_bnb_state_dict(*quantize_4bit(W, double_quant=double_quant))


def _with_json(d: dict, **changes) -> dict:
    meta = json.loads(d[QS].tobytes())
    meta.update(changes)
    return {**d, QS: np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()}


ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, module="qlora_ref.cli", timeout=120) -> subprocess.CompletedProcess:
    """Run ``qlora-ref`` (or ``python -m benchmarks...``: ``module``) in a subprocess."""
    code = f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def _assert_one_line_error(result, *patterns):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for pattern in patterns:
        assert pattern in lines[0], (pattern, lines[0])


# ----------------------------------------------------------------------------- sizes from the data


@pytest.mark.parametrize("nbs", [2**29, 2**33, 2**70, 1, 3, 0])
def test_nested_blocksize_from_a_file_is_one_of_the_allowed(nbs):
    d = _with_json(_state_dict(), nested_blocksize=nbs)
    with pytest.raises(ValueError, match=f"nested_blocksize {nbs}"):
        from_bnb_state_dict(d)


def test_nested_decode_allocates_o_n_blocks_whatever_the_nested_blocksize():
    """A state built in memory may carry any nested size; decoding never allocates by it."""
    absmax = np.random.default_rng(1).random(64).astype(np.float32) + 0.5
    small = double_quantize(absmax, blocksize=256)
    huge = double_quantize(absmax, blocksize=2**40)  # one nested block either way
    tracemalloc.start()
    decoded = dequantize_absmax(huge)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(decoded.view(np.uint32), dequantize_absmax(small).view(np.uint32))
    assert peak < 64 * 1024, f"decoding 64 constants allocated {peak} bytes"


def test_fast_path_nested_decode_is_bounded_too():
    torch = pytest.importorskip("torch")
    from qlora_gpu.quantize import dequantize_absmax as dequantize_absmax_torch
    from qlora_gpu.quantize import double_quantize as double_quantize_torch

    absmax = torch.rand(64) + 0.5
    small, huge = double_quantize_torch(absmax, blocksize=256), double_quantize_torch(absmax, blocksize=256)
    huge = type(huge)(codes=huge.codes, absmax=huge.absmax, codebook=huge.codebook, offset=huge.offset, blocksize=2**40)
    assert torch.equal(dequantize_absmax_torch(huge), dequantize_absmax_torch(small))


def test_shape_beyond_int64_is_refused_naming_the_file(tmp_path):
    d = _with_json(_state_dict(), shape=[4096, 2**52 + 1])
    path = tmp_path / "m.safetensors"
    save_file({f"proj.{k}": v for k, v in d.items()}, str(path))
    with pytest.raises(ValueError, match=r"m.safetensors.*'proj.weight' has shape \(2048, 1\)") as info:
        read_checkpoint(path)
    assert str(2**64 + 4096) not in str(info.value) or "needs" in str(info.value)


def test_header_shape_beyond_int64_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"x": np.zeros(4, np.float32)}, str(path))
    _rewrite_header(path, lambda h: h["x"].update(shape=[2**62, 2**62]))
    with pytest.raises(ValueError, match=r"tensor 'x': F32 of shape \[4611686018427387904, 4611686018427387904\]"):
        read_checkpoint(path)


def _rewrite_header(path, change):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


# ----------------------------------------------------------------------------- the same rules in both packages


BAD_FIELDS = [
    (dict(blocksize=0), ValueError, "blocksize 0 is not allowed"),
    (dict(blocksize=3), ValueError, "blocksize 3 is not allowed"),
    (dict(blocksize=64.0), TypeError, "blocksize must be an int"),
    (dict(blocksize=True), TypeError, "blocksize must be an int"),
    (dict(shape=()), ValueError, "must hold at least one size"),
    (dict(shape=(4, 0)), ValueError, "must hold at least one size"),
    (dict(shape=(4.0, 16)), TypeError, "must be a tuple of ints"),
    (dict(quant_type="nf8"), ValueError, "unknown quant_type 'nf8'"),
]


@pytest.mark.parametrize("change, error, message", BAD_FIELDS)
def test_oracle_and_fast_path_refuse_the_same_state_fields(change, error, message):
    fields = dict(shape=(4, 16), dtype="float32", blocksize=64, quant_type="nf4")
    fields.update(change)
    with pytest.raises(error, match=message) as ours:
        QuantState(**fields, codebook=np.zeros(16, np.float32), absmax=np.ones(1, np.float32))
    torch = pytest.importorskip("torch")
    from qlora_gpu.state import QuantState as TorchState

    fields["dtype"] = torch.float32
    with pytest.raises(error) as theirs:
        TorchState(**fields, codebook=torch.zeros(16), absmax=torch.ones(1))
    assert str(theirs.value) == str(ours.value)


@pytest.mark.parametrize("field, value", [
    ("nested_blocksize", 2**29), ("nested_blocksize", 2**70), ("nested_blocksize", 3), ("nested_blocksize", 128),
    ("dtype", [24, 40]), ("dtype", "int8"), ("blocksize", 64.0), ("blocksize", 3), ("shape", [4096, 2**52 + 1]),
    ("shape", []), ("quant_type", ["nf4"]), ("nested_offset", 1e39), ("nested_dtype", {}),
])
def test_oracle_and_fast_path_read_the_same_json_the_same_way(field, value):
    """Both readers accept the same quant-state JSON, or both refuse it naming the field."""
    torch = pytest.importorskip("torch")
    from qlora_gpu import state as torch_state
    from qlora_gpu.bnb_format import from_bnb_state_dict as from_bnb_torch
    from qlora_gpu.state import tensor_from_numpy

    assert torch_state.BLOCKSIZES == BLOCKSIZES and torch_state.NESTED_BLOCKSIZES == NESTED_BLOCKSIZES
    d = _with_json(_state_dict(), **{field: value})
    outcomes = []
    for reader, convert in ((from_bnb_state_dict, lambda a: a), (from_bnb_torch, tensor_from_numpy)):
        try:
            reader({k: convert(v) for k, v in d.items()})
            outcomes.append("accepted")
        except (ValueError, TypeError) as exc:
            named = field in str(exc) or "'weight" in str(exc)
            outcomes.append(f"{type(exc).__name__}, names the field or key: {named}")
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0] in ("accepted", "ValueError, names the field or key: True"), outcomes
    assert torch.is_tensor(tensor_from_numpy(d[QS]))


def test_zero_d_arrays_are_refused_by_both_quantizers():
    with pytest.raises(ValueError, match="0-d"):
        quantize_4bit(np.array(1.5, np.float32))
    torch = pytest.importorskip("torch")
    from qlora_gpu import quantize_4bit as quantize_torch

    with pytest.raises(ValueError, match="0-d"):
        quantize_torch(torch.tensor(1.5))


def test_fast_path_input_guards():
    torch = pytest.importorskip("torch")
    from qlora_gpu import QLoRALinear
    from qlora_gpu import quantize_4bit as quantize_torch

    W = torch.randn(8, 64, requires_grad=True)
    packed, state = quantize_torch(W)  # quantization detaches: no autograd error
    assert not packed.requires_grad and not state.absmax.requires_grad
    with pytest.raises(ValueError, match="meta tensor"):
        quantize_torch(torch.empty(8, 64, device="meta"))
    with pytest.raises(TypeError, match="blocksize must be an int"):
        quantize_torch(torch.randn(8, 64), blocksize=64.0)
    with pytest.raises(TypeError, match="blocksize must be an int"):
        QLoRALinear(64, 8, r=2, blocksize=64.0)


# ----------------------------------------------------------------------------- LoRA shapes never broadcast


def test_layer_loader_refuses_lora_shapes_that_would_broadcast():
    torch = pytest.importorskip("torch")
    from qlora_gpu import QLoRALinear

    layer = QLoRALinear(64, 16, r=4)
    d = layer.state_dict()
    good = QLoRALinear.from_bnb_state_dict(d, r=4)
    assert torch.equal(good.lora_A.weight, layer.lora_A.weight)
    for key, shape in (("lora_A.weight", (1, 64)), ("lora_B.weight", (16, 1)), ("bias", (1,))):
        bad = {**d, key: torch.ones(shape)}
        with pytest.raises(ValueError, match=rf"'{key}' has shape \({shape[0]},"):
            QLoRALinear.from_bnb_state_dict(bad, r=4)
    with pytest.raises(ValueError, match="only one of"):
        QLoRALinear.from_bnb_state_dict({k: v for k, v in d.items() if k != "lora_B.weight"}, r=4)


# ----------------------------------------------------------------------------- paths confined


@pytest.fixture
def vectors(tmp_path):
    from qlora_ref.conformance.vector_cases import build_cases

    cases = [c for c in build_cases() if c.name == "length3-nf4-float32"]
    root = tmp_path / "vectors"
    write_vectors(root, cases)
    return root


def _point_first_array_at(root, name):
    manifest = json.loads((root / "manifest.json").read_text())
    entry = next(iter(manifest["cases"][0]["arrays"].values()))
    entry["file"] = name
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.mark.parametrize("name, message", [
    ("../secret.bin", "must be a relative path inside the folder"),
    ("/etc/passwd", "must be a relative path inside the folder"),
    ("", "must be a relative path inside the folder"),
    ("link.bin", "is a symlink"),
    ("fifo.bin", "not a regular file"),
    ("device", "is a symlink"),
    ("missing.bin", "does not exist"),
])
def test_manifest_files_must_be_regular_files_inside_the_folder(vectors, name, message):
    secret = vectors.parent / "secret.bin"
    secret.write_bytes(b"\0" * 12)
    (vectors / "link.bin").symlink_to(secret)
    (vectors / "device").symlink_to("/dev/zero")
    os.mkfifo(vectors / "fifo.bin")
    manifest = _point_first_array_at(vectors, name)
    start = time.monotonic()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_case(read_manifest(vectors)["cases"][0], vectors)
    assert time.monotonic() - start < 5, "a special file blocked the reader"
    assert manifest["format_version"] == 1


def test_manifest_with_wrong_types_or_deep_nesting(vectors):
    text = (vectors / "manifest.json").read_text()
    manifest = json.loads(text)
    del manifest["cases"][0]["kind"]
    (vectors / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="'kind' None is not one of"):
        read_manifest(vectors)
    manifest["cases"][0]["kind"] = "quantize"
    manifest["cases"][0]["params"]["blocksize"] = 2**40
    (vectors / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"params\['blocksize'\]"):
        read_manifest(vectors)
    (vectors / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_manifest(vectors)


def test_sharded_index_is_confined(tmp_path):
    W = np.zeros((8, 64), np.float32)
    write_checkpoint(tmp_path / "outside.safetensors", {"p": quantize_4bit(W)})
    folder = tmp_path / "model"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    for name, message in ((str(tmp_path / "outside.safetensors"), "relative path inside the folder"),
                          ("../outside.safetensors", "relative path inside the folder"),
                          (7, "not a file name")):
        index.write_text(json.dumps({"weight_map": {"p.weight": name}}))
        with pytest.raises(ValueError, match=message):
            read_checkpoint(folder)
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    index.write_text(json.dumps({"weight_map": {"p.weight": "link.safetensors"}}))
    with pytest.raises(ValueError, match="is a symlink"):
        read_checkpoint(folder)
    index.write_text(json.dumps({"weight_map": [1, 2]}))
    with pytest.raises(ValueError, match="no 'weight_map' object"):
        read_checkpoint(folder)


def test_sharded_index_in_a_hugging_face_cache_snapshot(tmp_path):
    """The HF cache links every file of a snapshot into one blobs folder: that is accepted."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    write_checkpoint(blobs / "1111", {"p": quantize_4bit(np.ones((8, 64), np.float32))})
    (blobs / "2222").write_text(json.dumps({"weight_map": {"p.weight": "model-1.safetensors"}}))
    (snapshot / "model-1.safetensors").symlink_to(blobs / "1111")
    (snapshot / "model.safetensors.index.json").symlink_to(blobs / "2222")
    assert list(read_checkpoint(snapshot).layers) == ["p"]


# ----------------------------------------------------------------------------- headers and JSON of the wrong type


@pytest.mark.parametrize("header, message", [
    (b"[1, 2]", "does not start with '{'"),
    (b"7", "does not start with '{'"),
    (b"null", "does not start with '{'"),
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
    (b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": {"a": 0}}}', "malformed data_offsets"),
    (b'{"x": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', r"dtype \['F32'\] is not a string"),
    (b'{"x": [0, 4]}', "the header entry is a list"),
    (b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"a": 1}}',
     "__metadata__ must be an object of strings"),
])
def test_headers_of_the_wrong_type_are_clear_errors(tmp_path, header, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(ValueError, match=message) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_a_huge_bad_file_is_diagnosed_from_its_header_alone(tmp_path):
    """A header that claims more bytes than the file holds is refused after reading 8 bytes."""
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 2**40))
        f.truncate(1 << 30)  # a sparse 1 GiB file: reading it whole would show in the peak
    tracemalloc.start()
    with pytest.raises(ValueError, match="the header claims 1099511627776 bytes"):
        read_header(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, f"diagnosing the header allocated {peak} bytes"


def test_quant_state_json_nested_too_deeply():
    d = _state_dict(double_quant=False)
    d[QS] = np.frombuffer(b"[" * 100_000, np.uint8).copy()
    with pytest.raises(ValueError, match="is not UTF-8 JSON"):
        from_bnb_state_dict(d)
    pytest.importorskip("torch")
    from qlora_gpu.bnb_format import from_bnb_state_dict as from_bnb_torch
    from qlora_gpu.state import tensor_from_numpy

    with pytest.raises(ValueError, match="is not UTF-8 JSON"):
        from_bnb_torch({k: tensor_from_numpy(v) for k, v in d.items()})


# ----------------------------------------------------------------------------- adapter configs


def _adapter(path, **config):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    cfg.update(config)
    (path / "adapter_config.json").write_text(json.dumps(cfg) if isinstance(cfg, dict) else cfg)
    rng = np.random.default_rng(0)
    save_file({"base_model.model.m.proj.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
               "base_model.model.m.proj.lora_B.weight": rng.standard_normal((4, 2)).astype(np.float32)},
              str(path / "adapter_model.safetensors"))
    return path


@pytest.mark.parametrize("pattern, message", [
    ("(", "is not a valid regular expression"),
    ("(.|.)*x", "alternation inside a repeat"),
    ("(a+)+b", "repeat inside a repeat"),
    (r"(a)\1", "back-references are refused"),
    (".*a.*b.*c", "3 unbounded repeats"),
    ("x" * 600, "at most 512 are read"),
])
def test_pathological_rank_patterns_are_refused_quickly(tmp_path, pattern, message):
    path = _adapter(tmp_path / "a", rank_pattern={pattern: 2})
    start = time.monotonic()
    with pytest.raises(ValueError, match=message):
        read_adapter(path)
    assert time.monotonic() - start < 5


def test_patterns_keep_peft_semantics(tmp_path):
    """``re.match(rf"(.*\\.)?({pattern})$", module)``, PEFT's rule, on patterns we accept."""
    import re

    modules = ["m.proj", "model.layers.0.q_proj", "q_proj", "xq_proj", "a.b.c.v_proj.x"]
    patterns = ["proj", "q_proj", r"layers\.0\.q_proj", ".*_proj", "q_proj|v_proj", "m\\..*", "layers.[0-9]+.q_proj"]
    for pattern in patterns:
        compiled = check_pattern(pattern, "test")
        for module in modules:
            suffixes = [module] + [module[i + 1:] for i, ch in enumerate(module) if ch == "."]
            ours = any(compiled.fullmatch(s) for s in suffixes)
            assert ours == bool(re.match(rf"(.*\.)?({pattern})$", module)), (pattern, module)
    adapter = read_adapter(_adapter(tmp_path / "b", r=8, rank_pattern={r"m\.proj": 2}, alpha_pattern={"proj": 6}))
    assert adapter.layers["m.proj"].r == 2 and adapter.layers["m.proj"].alpha == 6


def test_adapter_config_of_the_wrong_type(tmp_path):
    path = _adapter(tmp_path / "a")
    (path / "adapter_config.json").write_text("[" * 100_000)
    with pytest.raises(ValueError, match="adapter_config.json: not JSON"):
        read_adapter(path)
    (path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "rank_pattern": {"m.proj": "2"}}))
    with pytest.raises(ValueError, match="rank_pattern value '2'"):
        read_adapter(path)


# ----------------------------------------------------------------------------- writes never destroy


def test_vectors_out_refuses_a_foreign_folder_and_symlinks(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _assert_one_line_error(_cli("vectors", "--out", str(foreign)), "not empty", "--force")
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(os.listdir(foreign)) == ["notes.txt"]

    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("precious")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "manifest.json").symlink_to(elsewhere)
    _assert_one_line_error(_cli("vectors", "--out", str(linked)), "not empty")
    assert elsewhere.read_text() == "precious"

    _assert_one_line_error(_cli("vectors", "--out", ""), "empty")
    _assert_one_line_error(_cli("vectors", "--out", str(tmp_path / "x"), "--dir", str(tmp_path)), "one of the two")
    assert not (tmp_path / "x").exists()


def test_vectors_force_replaces_a_symlink_without_following_it(tmp_path):
    from qlora_ref.conformance.vector_cases import build_cases

    cases = [c for c in build_cases() if c.name == "length3-nf4-float32"]
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").symlink_to(elsewhere)
    write_vectors(out, cases, force=True)
    assert elsewhere.read_text() == "precious"
    assert not (out / "manifest.json").is_symlink() and read_manifest(out)["cases"][0]["name"] == cases[0].name
    write_vectors(out, cases)  # our own vectors: rewritten in place without --force
    assert not [p for p in out.rglob("*.tmp")], "a temporary file was left behind"


# ----------------------------------------------------------------------------- the command line


def test_command_line_user_errors_are_one_line_exit_2(tmp_path):
    cases = [
        (("report", "--size", "40000"), "out of range"),
        (("check", "--rounds", "-1"), "out of range"),
        (("inspect", str(tmp_path / "nothing")), "no checkpoint"),
        (("vectors", "--force"), "--force only applies to --out"),
    ]
    for args, message in cases:
        _assert_one_line_error(_cli(*args), message)


def test_benchmark_scripts_check_arguments_before_work(tmp_path):
    """``python -m benchmarks`` and ``python -m benchmarks.quality``: the same one-line errors."""
    unwritable = tmp_path / "missing" / "results.json"
    (tmp_path / "junk.json").write_text(json.dumps({"a": 1}))
    for module, args, message in [
        ("benchmarks.summary", ("--out", str(unwritable)), "does not exist"),
        ("benchmarks.summary", ("--summary", str(tmp_path)), "not a regular file"),
        ("benchmarks.summary", ("--summary", str(tmp_path / "junk.json")), "not a results file"),
    ]:
        _assert_one_line_error(_cli(*args, module=module), message)
    pytest.importorskip("torch")
    for args, message in [(("--threads", "0"), "out of range"), (("--out", str(unwritable)), "does not exist")]:
        _assert_one_line_error(_cli(*args, module="benchmarks.quality"), message)


def test_check_vectors_on_a_hostile_manifest_is_one_line(vectors):
    _point_first_array_at(vectors, "/dev/zero")
    _assert_one_line_error(_cli("check", "oracle", "--vectors", str(vectors), "--rounds", "0"),
                           "relative path inside the folder")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux: /proc/self/clear_refs and VmHWM")
def test_inspect_reads_headers_and_small_arrays_only(tmp_path):
    """Listing a checkpoint maps its tensors: the peak stays far below the file's size."""
    n_out, n_in, blocksize = 8192, 16384, 4096  # 134M weights: 64 MiB of packed codes
    numel = n_out * n_in
    packed = np.random.default_rng(0).integers(0, 256, size=(numel // 2, 1), dtype=np.uint8)
    state = QuantState(shape=(n_out, n_in), dtype="bfloat16", blocksize=blocksize, quant_type="nf4",
                       codebook=quantize_4bit(np.ones(2, np.float32))[1].codebook,
                       absmax=np.ones(math.ceil(numel / blocksize), np.float32))
    path = tmp_path / "big.safetensors"
    write_checkpoint(path, {"proj": (packed, state)})
    del packed
    size = path.stat().st_size
    # The child imports everything, resets its peak RSS (Linux: clear_refs 5), runs inspect, and
    # reports its peak minus its RSS before: import-time peaks cannot hide the growth.
    probe = ("import sys\n"
             "from qlora_ref.cli import main\n"
             "def kib(f):\n"
             "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(f + ':'))\n"
             "open('/proc/self/clear_refs', 'w').write('5')\n"
             "before = kib('VmRSS')\n"
             "status = main(sys.argv[1:])\n"
             "print('GROWTH', (kib('VmHWM') - before) * 1024)\n"
             "sys.exit(status)\n")
    result = subprocess.run([sys.executable, "-c", probe, "inspect", str(path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.split("GROWTH")[-1])
    print(f"inspect of a {size / 2**20:.0f} MiB file: peak RSS grew by {growth / 2**20:.1f} MiB")
    assert growth < size / 8, f"inspect grew by {growth} bytes for a {size}-byte file"
    assert "8192x16384" in result.stdout


def test_write_checkpoint_replaces_a_symlink_and_leaves_no_temporary_file(tmp_path):
    elsewhere = tmp_path / "elsewhere.bin"
    elsewhere.write_bytes(b"precious")
    target = tmp_path / "model.safetensors"
    target.symlink_to(elsewhere)
    write_checkpoint(target, {"p": quantize_4bit(np.ones((8, 64), np.float32))})
    assert elsewhere.read_bytes() == b"precious" and not target.is_symlink()
    assert list(read_checkpoint(target).layers) == ["p"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.bin", "model.safetensors"]
