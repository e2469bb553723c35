"""The hostile-input fuzzer: mutate a real checkpoint, adapter folder, sharded index and golden-vector
folder, then run every reader on the result in a memory-capped, timed subprocess.

The files are made by the project's own writers (``write_checkpoint``, ``write_vectors``) and the
safetensors library. A mutation changes bytes, header fields, JSON values, sizes or paths (files
named inside other files pointing out of the folder, at symlinks, ``/dev/zero`` or a FIFO). Each
example runs, in a forked child with ``RLIMIT_AS`` set and a timeout:

- ``read_checkpoint`` and decoding every 4-bit layer (the oracle);
- ``qlora-ref inspect`` on the checkpoint and the adapter;
- ``read_adapter`` and ``match_adapter``;
- ``qlora-ref check oracle --vectors`` on the vector folder;
- ``qlora_gpu.QLoRALinear.from_bnb_state_dict`` on each layer's entries (the layer loader), when
  torch is installed.

and asserts, for each: a clear error (``ValueError``, ``TypeError`` or ``FileNotFoundError``
naming the file or folder; for the command line, exit status 2 and one line) or a correct result
(every decoded weight equal, bit for bit up to the sign of zero, to what bitsandbytes decodes
from the same file, when bitsandbytes is installed); the child's memory growth below a bound
proportional to the files; the child finished within the timeout; and no file outside the case
folder created, changed or removed (a secret file beside it keeps its bytes).

Profiles: the ``default`` hypothesis profile (CI, about 40 examples) and ``thorough``
(``HYPOTHESIS_PROFILE=thorough``, 1000 examples).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from qlora_ref import quantize_4bit
from qlora_ref.cli import main as cli_main
from qlora_ref.conformance.vector_cases import build_cases
from qlora_ref.conformance.vectors import write_vectors
from qlora_ref.formats.checkpoint import read_checkpoint, write_checkpoint
from qlora_ref.formats.peft import match_adapter, read_adapter
from qlora_ref.state import numpy_dtype

try:  # optional: the layer loader's modules, imported once here so that each child inherits them
    import safetensors.torch  # noqa: F401

    import qlora_gpu  # noqa: F401
except ImportError:  # pragma: no cover  (no torch: the layer loader reports "no torch")
    pass

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="needs Linux: fork, RLIMIT_AS and /proc/self/status")

#: Address space a child may add beyond what it inherits, and its time limit.
CAP_BYTES = 2 << 30
TIMEOUT_S = 60
#: Memory growth allowed: a constant (interpreter caches, NumPy scratch) plus a multiple of the
#: bytes of the files read.
GROWTH_BASE_BYTES = 96 << 20
GROWTH_PER_FILE_BYTE = 16

LAYERS = ("model.a", "model.b")
PREFIX = "base_model.model."
VECTOR_CASES = ("length3-nf4-float32",)


# ----------------------------------------------------------------------------- the pristine folder


def _make_pristine(root: Path) -> None:
    """checkpoint/ (one file), sharded/ (an index over two shards), adapter/, vectors/."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((24, 40)).astype(numpy_dtype("bfloat16"))
    b = rng.standard_normal((7, 9)).astype(np.float32)
    layers = {"model.a": quantize_4bit(a, double_quant=True),
              "model.b": quantize_4bit(b, blocksize=32, quant_type="fp4")}
    bias = {"model.b.bias": rng.standard_normal(7).astype(np.float32)}
    (root / "checkpoint").mkdir(parents=True)
    write_checkpoint(root / "checkpoint" / "model.safetensors", layers, bias)
    sharded = root / "sharded"
    sharded.mkdir()
    write_checkpoint(sharded / "model-1.safetensors", {"model.a": layers["model.a"]})
    write_checkpoint(sharded / "model-2.safetensors", {"model.b": layers["model.b"]}, bias)
    first = read_checkpoint(sharded / "model-1.safetensors").layers["model.a"]
    weight_map = {k: "model-1.safetensors" for k in first.keys}
    weight_map.update({k: "model-2.safetensors" for k in ("model.b.weight", "model.b.bias")})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": False, "use_dora": False,
         "rank_pattern": {}, "alpha_pattern": {}}))
    save_file({f"{PREFIX}model.a.lora_A.weight": rng.standard_normal((2, 40)).astype(np.float32),
               f"{PREFIX}model.a.lora_B.weight": rng.standard_normal((24, 2)).astype(np.float32)},
              str(adapter / "adapter_model.safetensors"))
    write_vectors(root / "vectors", [c for c in build_cases() if c.name in VECTOR_CASES])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    _make_pristine(root)
    return root


# ----------------------------------------------------------------------------- mutations

_HOSTILE_INTS = [0, -1, 1, 3, 2**29, 2**33, 2**52 + 1, 2**62, 2**64, 2**70]
_DEEP = "deep"  # stands for JSON nested 100,000 levels deep
_HOSTILE_VALUES = _HOSTILE_INTS + [None, True, "64", 64.0, [], {}, [1], {"a": 1}, _DEEP, [4096, 2**52 + 1], [0]]
_PATHS = ["../outside/secret.bin", "/etc/hostname", "", ".", "a/../../outside/secret.bin", "missing.bin",
          "link-out", "dev-zero", "fifo", 7, None, ["x"]]
_PATTERNS = ["(", "(.|.)*x", "(a+)+$", r"(\w+\s?)*$", "x" * 2000, ".*a.*b.*c.*d", "model.a", ".*"]


def _deep(depth=100_000) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def _dumps(value) -> str:
    return _deep() if value == _DEEP else json.dumps(value)


def _rewrite_safetensors_header(path: Path, change) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    text = change(header)
    raw = (text if isinstance(text, str) else json.dumps(header)).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _set_json_field(text: str, path: list, value) -> str:
    """Set ``path`` in a JSON document (creating dicts on the way) and dump it; _DEEP nests."""
    doc = json.loads(text)
    node = doc
    for key in path[:-1]:
        node = node[key] if isinstance(node, list) else node.setdefault(key, {})
    marker = "__DEEP__"
    node[path[-1]] = marker if value == _DEEP else value
    return json.dumps(doc).replace(f'"{marker}"', _deep()) if value == _DEEP else json.dumps(doc)


def _plant_specials(folder: Path, outside: Path) -> None:
    """Things a name inside a file may point at: a link out, a link to a device, a FIFO."""
    (folder / "link-out").symlink_to(outside / "secret.bin")
    (folder / "dev-zero").symlink_to("/dev/zero")
    os.mkfifo(folder / "fifo")


@st.composite
def mutations(draw):
    """(description, function of the case folder and the outside folder)."""
    target = draw(st.sampled_from(["checkpoint", "sharded", "adapter", "vectors"]))
    kind = draw(st.sampled_from(["bytes", "header", "quant_state", "json", "path"]))
    if kind == "bytes":
        name = {"checkpoint": "checkpoint/model.safetensors", "sharded": "sharded/model-1.safetensors",
                "adapter": "adapter/adapter_model.safetensors", "vectors": "vectors/manifest.json"}[target]
        how = draw(st.sampled_from(["truncate", "flip", "append", "empty"]))
        where, bit = draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(0, 7))
        extra = draw(st.binary(min_size=1, max_size=16))

        def mutate_bytes(case, outside):
            p = case / name
            data = bytearray(p.read_bytes())
            if how == "truncate":
                data = data[: int(where * len(data))]
            elif how == "flip":
                data[int(where * len(data))] ^= 1 << bit
            elif how == "append":
                data += extra
            else:
                data = bytearray()
            p.write_bytes(bytes(data))
        return f"{how} {name} at {where:.3f}/{bit}", mutate_bytes
    if kind == "header" and target in ("checkpoint", "sharded", "adapter"):
        name = {"checkpoint": "checkpoint/model.safetensors", "sharded": "sharded/model-2.safetensors",
                "adapter": "adapter/adapter_model.safetensors"}[target]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "<entry>", "<header>", "__metadata__"]))
        value = draw(st.sampled_from(_HOSTILE_VALUES + [["F32"], "F64", "U8", [2**62, 2**62], [0, 2**62],
                                                        {"start": 0}, [1, 0]]))
        index = draw(st.integers(0, 20))

        def mutate_header(case, outside):
            def change(h):
                keys = sorted(k for k in h if k != "__metadata__")
                key = keys[index % len(keys)]
                if field == "<header>":
                    return _dumps(value)
                if field == "__metadata__":
                    h["__metadata__"] = value
                elif field == "<entry>":
                    h[key] = value
                else:
                    h[key][field] = value
                return json.dumps(h) if value != _DEEP else json.dumps(h).replace('"deep"', _deep())
            _rewrite_safetensors_header(case / name, change)
        return f"header of {name}: {field} <- {str(value)[:40]} (entry {index})", mutate_header
    if kind == "quant_state" and target in ("checkpoint", "sharded"):
        layer = draw(st.sampled_from(LAYERS))
        field = draw(st.sampled_from(["nested_blocksize", "blocksize", "shape", "dtype", "quant_type",
                                      "nested_offset", "nested_dtype", "<document>"]))
        value = draw(st.sampled_from(_HOSTILE_VALUES + ["float16", "nf4", "fp4", [24, 40], [7, 9], [960], 128, 256]))
        name = "checkpoint/model.safetensors" if target == "checkpoint" else (
            "sharded/model-1.safetensors" if layer == "model.a" else "sharded/model-2.safetensors")

        def mutate_quant_state(case, outside):
            from safetensors.numpy import load_file

            tensors = load_file(str(case / name))
            key = next(k for k in tensors if k.startswith(f"{layer}.weight.quant_state."))
            text = tensors[key].tobytes().decode()
            new = _dumps(value) if field == "<document>" else _set_json_field(text, [field], value)
            tensors[key] = np.frombuffer(new.encode(), np.uint8).copy()
            save_file(tensors, str(case / name), metadata={"format": "pt"})
        return f"quant state of {layer} in {name}: {field} <- {str(value)[:40]}", mutate_quant_state
    if target == "adapter" and kind in ("json", "quant_state", "header", "path"):
        field = draw(st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_dora", "<document>"]))
        if field in ("rank_pattern", "alpha_pattern"):
            value = {draw(st.sampled_from(_PATTERNS)): draw(st.sampled_from([2, 4, "2", None, -1]))}
        else:
            value = draw(st.sampled_from(_HOSTILE_VALUES + [2, 4, 8]))

        def mutate_config(case, outside):
            p = case / "adapter" / "adapter_config.json"
            p.write_text(_dumps(value) if field == "<document>" else _set_json_field(p.read_text(), [field], value))
        return f"adapter_config.json: {field} <- {str(value)[:60]}", mutate_config
    if target == "sharded":
        value = draw(st.sampled_from(_PATHS + [_DEEP, [1, 2], None]))
        which = draw(st.sampled_from(["one", "all", "<weight_map>"]))

        def mutate_index(case, outside):
            folder = case / "sharded"
            _plant_specials(folder, outside)
            p = folder / "model.safetensors.index.json"
            doc = json.loads(p.read_text())
            if which == "<weight_map>":
                p.write_text(_set_json_field(p.read_text(), ["weight_map"], value))
                return
            for i, key in enumerate(sorted(doc["weight_map"])):
                if which == "all" or i == 0:
                    doc["weight_map"][key] = "__V__"
            p.write_text(json.dumps(doc).replace('"__V__"', _dumps(value)))
        return f"index: {which} <- {str(value)[:40]}", mutate_index
    if target == "vectors":
        field = draw(st.sampled_from(["file", "shape", "dtype", "sha256", "kind", "params", "<document>",
                                      "blocksize", "cases"]))
        pool = _PATHS + _HOSTILE_VALUES if field == "file" else _HOSTILE_VALUES + ["uint8", "float64"]
        value = draw(st.sampled_from(pool))

        def mutate_manifest(case, outside):
            folder = case / "vectors"
            _plant_specials(folder, outside)
            p = folder / "manifest.json"
            doc = json.loads(p.read_text())
            c = doc["cases"][0]
            entry = next(iter(c["arrays"].values()))
            if field == "<document>":
                p.write_text(_dumps(value))
                return
            if field in ("file", "shape", "dtype", "sha256"):
                entry[field] = "__V__"
            elif field == "kind":
                c.pop("kind") if value is None else c.__setitem__("kind", "__V__")
            elif field == "blocksize":
                c["params"]["blocksize"] = "__V__"
            else:
                (c if field == "params" else doc)[field] = "__V__"
            p.write_text(json.dumps(doc).replace('"__V__"', _dumps(value)))
        return f"manifest: {field} <- {str(value)[:40]}", mutate_manifest
    # checkpoint + json/path: rename a key so it is orphaned or unknown
    suffix = draw(st.sampled_from([".extra", "x", "__int4", ""]))

    def mutate_keys(case, outside):
        from safetensors.numpy import load_file

        p = case / "checkpoint" / "model.safetensors"
        tensors = load_file(str(p))
        key = sorted(tensors)[len(suffix) % len(tensors)]
        tensors[key.replace("__nf4", suffix) if "__nf4" in key else key + suffix] = tensors.pop(key)
        save_file(tensors, str(p), metadata={"format": "pt"})
    return f"rename a checkpoint key with {suffix!r}", mutate_keys


# ----------------------------------------------------------------------------- the child


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _digest(a: np.ndarray) -> str:
    a = np.asarray(a, dtype=np.float32) + np.float32(0)  # -0.0 -> +0.0: bitsandbytes' CPU decoder signs zeros
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _outcome(fn):
    try:
        return {"ok": fn()}
    except (ValueError, TypeError, FileNotFoundError) as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    except BaseException as exc:  # noqa: BLE001  (reported to the parent as a failure)
        return {"crash": type(exc).__name__, "message": str(exc)[:500], "trace": traceback.format_exc()[-2000:]}


def _cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = cli_main(list(args))
        except SystemExit as exc:  # argparse
            status = exc.code
    lines = err.getvalue().strip().splitlines()
    if status not in (0, 1) and (status != 2 or len(lines) != 1):
        raise AssertionError(f"exit {status}, stderr {err.getvalue()[-500:]!r}")
    return {"status": status, "stderr": lines[0] if lines else ""}


def _layer_loader(checkpoint_path):
    """Load each 4-bit layer as a user would: safetensors.torch, then ``QLoRALinear.from_bnb_state_dict``."""
    try:
        import torch
        from safetensors.torch import load_file

        from qlora_gpu import QLoRALinear
        from qlora_gpu.state import tensor_to_numpy
    except ImportError:  # optional: the layer loader needs torch
        return "no torch"
    try:
        sd = load_file(str(checkpoint_path))
    except Exception:  # noqa: BLE001  (the safetensors library refuses the file: nothing to load)
        return "safetensors refuses the file"
    out = {}
    for name in sorted({k.split(".weight")[0] for k in sd if ".weight.quant_state." in k}):
        d = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        loaded = QLoRALinear.from_bnb_state_dict(d, r=1)
        with torch.no_grad():
            state = loaded.quant_state  # decode in the state's dtype, as bitsandbytes does
            out[name] = _digest(tensor_to_numpy(loaded.dequantized_weight(state.dtype)))
    return out


def _run_readers(case: Path) -> dict:
    def checkpoint(path):
        ckpt = read_checkpoint(path)
        return {name: _digest(layer.weight()) for name, layer in ckpt.layers.items()}  # in the state dtype, as bnb

    def adapter():
        a = read_adapter(case / "adapter")
        return sorted(match_adapter(a, read_checkpoint(case / "checkpoint")).items())

    return {
        "read_checkpoint": _outcome(lambda: checkpoint(case / "checkpoint")),
        "read_sharded": _outcome(lambda: checkpoint(case / "sharded")),
        "inspect": _outcome(lambda: _cli("inspect", str(case / "checkpoint"))),
        "inspect_sharded": _outcome(lambda: _cli("inspect", str(case / "sharded"))),
        "inspect_adapter": _outcome(lambda: _cli("inspect", str(case / "checkpoint"),
                                                 "--adapter", str(case / "adapter"))),
        "read_adapter": _outcome(adapter),
        "check_vectors": _outcome(lambda: _cli("check", "oracle", "--vectors", str(case / "vectors"), "--rounds", "0",
                                               "--no-time")),
        "layer_loader": _outcome(lambda: _layer_loader(case / "checkpoint" / "model.safetensors")),
    }


def run_capped(case: Path, work=None, timeout_s: float = TIMEOUT_S) -> dict:
    """Fork; the child caps its address space, resets its peak RSS, runs the readers (or ``work()``)
    and reports their outcomes and its memory growth as JSON through a pipe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read_fd)
            vm_kib = _status_kib("VmSize")
            resource.setrlimit(resource.RLIMIT_AS, (vm_kib * 1024 + CAP_BYTES, vm_kib * 1024 + CAP_BYTES))
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM: the peak below is this child's own
            start_kib = _status_kib("VmRSS")
            results = _run_readers(case) if work is None else {"work": _outcome(work)}
            results["_growth_bytes"] = (_status_kib("VmHWM") - start_kib) * 1024
            payload = json.dumps(results).encode()
        except BaseException:  # noqa: BLE001
            payload = json.dumps({"_child_failed": traceback.format_exc()}).encode()
        with os.fdopen(write_fd, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(write_fd)
    chunks, deadline = [], time.monotonic() + timeout_s
    with os.fdopen(read_fd, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"_timeout": True}
            ready, _, _ = select.select([f], [], [], left)
            if ready:
                chunk = os.read(f.fileno(), 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"_killed": status}
    return json.loads(b"".join(chunks))


# ----------------------------------------------------------------------------- the reference and the checks


def _bnb_decode(path: Path) -> dict | None:
    """What bitsandbytes decodes from a checkpoint (file or folder): ``{layer: digest}``, None if unavailable."""
    try:
        import bitsandbytes.functional as F
        import torch
        from safetensors.torch import load_file

        from qlora_gpu.state import tensor_to_numpy
    except ImportError:  # optional comparator
        return None
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    sd = {}
    try:
        for f in files:
            sd.update(load_file(str(f)))
    except Exception:  # noqa: BLE001  (the safetensors library refuses the file: bitsandbytes cannot read it)
        return {layer: None for layer in LAYERS}
    out = {}
    for layer in LAYERS:
        prefix = f"{layer}.weight."
        entries = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        try:
            qs = F.QuantState.from_dict(entries, device=torch.device("cpu"))
            with torch.compiler.set_stance("force_eager"):
                out[layer] = _digest(tensor_to_numpy(F.dequantize_4bit(sd[f"{layer}.weight"], qs).float()))
        except Exception:  # noqa: BLE001  (bitsandbytes refuses: no reference for this layer)
            out[layer] = None
    return out


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` (links not followed) with its type, size and content digest."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = os.lstat(p)
            digest = None
            if os.path.isfile(p) and not os.path.islink(p):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            snap[str(p.relative_to(root))] = (st_.st_mode, st_.st_size, digest)
    return snap


def _check(what: str, case: Path, results: dict, reference: dict | None) -> None:
    assert "_timeout" not in results, f"{what}: the readers ran past {TIMEOUT_S} s"
    assert "_killed" not in results, f"{what}: the child died (status {results.get('_killed')}): memory cap or crash"
    assert "_child_failed" not in results, f"{what}: {results['_child_failed']}"
    files_bytes = sum(p.stat().st_size for p in case.rglob("*") if p.is_file() and not p.is_symlink())
    bound = GROWTH_BASE_BYTES + GROWTH_PER_FILE_BYTE * files_bytes
    assert results["_growth_bytes"] < bound, f"{what}: memory grew by {results['_growth_bytes']} > {bound} bytes"
    for op, outcome in results.items():
        if op.startswith("_"):
            continue
        assert "crash" not in outcome, (
            f"{what}: {op} raised {outcome['crash']}: {outcome['message']}\n{outcome['trace']}")
        if "error" in outcome:
            message = outcome["message"]
            if op == "layer_loader":  # a state dict in memory: the error names the key
                assert "'weight" in message or "'bias'" in message or "linear layer" in message, (
                    f"{what}: {op}: the error names no key: {message}")
            else:
                assert str(case) in message, f"{what}: {op}: the error names no file: {message}"
            continue
        value = outcome["ok"]
        if isinstance(value, dict) and "status" in value:  # a command line: exit 0/1, or 2 with one line
            if value["status"] == 2:
                assert value["stderr"].startswith("qlora-ref"), (what, op, value)
            continue
        if op in ("read_checkpoint", "layer_loader") and reference is not None and isinstance(value, dict):
            for layer, digest in value.items():
                theirs = reference.get(layer)
                assert theirs is not None, f"{what}: {op}: {layer} accepted, but bitsandbytes refuses it"
                assert digest == theirs, f"{what}: {op}: {layer} decodes differently from bitsandbytes"


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(mutation=mutations())
def test_hostile_files_fail_clearly_or_read_correctly_in_bounded_memory(pristine, tmp_path_factory, mutation):
    what, mutate = mutation
    sandbox = tmp_path_factory.mktemp("sandbox")
    outside, case = sandbox / "outside", sandbox / "case"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"secret" * 2)
    shutil.copytree(pristine, case)
    mutate(case, outside)
    before = _snapshot(sandbox)
    results = run_capped(case)
    after = _snapshot(sandbox)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"{what}: the readers touched {changed}"
    reference = None
    if "ok" in results.get("read_checkpoint", {}) or "ok" in results.get("layer_loader", {}):
        reference = _bnb_decode(case / "checkpoint" / "model.safetensors")
    _check(what, case, results, reference)
    shutil.rmtree(sandbox, ignore_errors=True)


def test_the_pristine_folder_reads_and_matches_bitsandbytes(pristine, tmp_path):
    """The unmutated folder: every reader succeeds, and the decode equals bitsandbytes'."""
    case = tmp_path / "case"
    shutil.copytree(pristine, case)
    results = run_capped(case)
    for op, outcome in results.items():
        if not op.startswith("_"):
            assert "ok" in outcome, (op, outcome)
    assert results["check_vectors"]["ok"]["status"] == 0
    reference = _bnb_decode(case / "checkpoint" / "model.safetensors")
    print(f"pristine folder: every reader ran in {results['_growth_bytes'] / 2**20:.1f} MiB of growth")
    _check("pristine", case, results, reference)
    if reference is not None:
        assert results["read_checkpoint"]["ok"] == reference


def test_the_harness_catches_unbounded_memory_and_hangs(tmp_path):
    """What main did with ``nested_blocksize`` 2^29 (a repeat sized by a header field) and with a
    FIFO named in a manifest (a read that never ends) is caught by the cap and the timeout."""
    results = run_capped(tmp_path, work=lambda: float(np.repeat(np.ones(1, np.float32), 2**29).sum()))
    outcome = results["work"]
    over = "crash" in outcome or results["_growth_bytes"] > GROWTH_BASE_BYTES
    assert over, f"a 2 GiB allocation went unnoticed: {results}"
    os.mkfifo(tmp_path / "fifo")
    assert run_capped(tmp_path, work=lambda: open(tmp_path / "fifo", "rb").read(), timeout_s=2) == {"_timeout": True}
