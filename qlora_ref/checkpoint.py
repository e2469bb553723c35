"""Safetensors checkpoints as transformers + bitsandbytes write them: read, decode, write.

A 4-bit linear layer ``L`` is stored as a handful of tensors (``L.weight``, ``L.weight.absmax``,
... and the packed JSON ``L.weight.quant_state.bitsandbytes__nf4``; shared spec formats.md,
section 5, and Note: bnb state-dict layout in ``qlora_ref.bnb_format``). This module finds every
such layer in a file (or a sharded folder), rebuilds its ``QuantState`` through
``qlora_ref.bnb_format.from_bnb_state_dict`` and decodes it with the oracle; it writes files
whose bytes equal what bitsandbytes' state dict gives when saved the same way. Reading and
writing go through the ``safetensors`` library's NumPy API (bfloat16 arrives as
``ml_dtypes.bfloat16``). Pairs with ``qlora_ref.adapters`` (PEFT adapters on top of a
checkpoint) and ``qlora-ref inspect``.

Note: hostile files
    Every problem is a ``ValueError`` that names the file, the tensor and what is wrong: a file
    the safetensors library refuses (truncated, header entries whose shape, dtype and offsets
    disagree; the header is then read once more only to name the offending tensor), a dtype the
    reader cannot represent, 4-bit entries without their quant_state JSON, and everything
    ``from_bnb_state_dict`` checks (missing keys, JSON that disagrees with the arrays, absmax of
    the wrong length, an unknown quant type, a packed size that does not match the shape).
    bitsandbytes' CPU repacking hazard (docs/findings.md: a ``state_dict()`` taken after an
    eval forward on an AVX-512-BF16 CPU re-quantizes the absmax through bfloat16 and writes
    ``nested_dtype "bfloat16"``) is refused with that explanation, and so is a layer saved in the
    repacked layout itself.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, which safetensors' NumPy API needs)
import numpy as np

from qlora_ref.bnb_format import from_bnb_state_dict, to_bnb_state_dict
from qlora_ref.quantize import dequantize_4bit
from qlora_ref.state import QuantState

__all__ = ["Layer4bit", "Checkpoint", "read_checkpoint", "write_checkpoint", "checkpoint_files", "SAFETENSORS_DTYPES"]

#: safetensors dtype names this reader turns into NumPy arrays (itemsize in bytes).
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
_QS_MARK = ".weight.quant_state."
_STATE_SUFFIXES = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
_HAZARD = (" -- this is bitsandbytes' CPU repacking hazard: the state dict was taken after an eval "
           "forward on an AVX-512-BF16 CPU, which re-quantized the absmax through bfloat16 "
           "(docs/findings.md); save the model before running it")
_REPACKED = (" -- this looks like bitsandbytes' repacked CPU layout (packed weight (N, K/2), absmax (K/blocksize, "
             "N) in bfloat16), which Linear4bit switches to on the first eval forward on an AVX512-BF16 CPU; "
             "its state_dict() converts back, so save through state_dict() (docs/findings.md)")


@dataclass(frozen=True)
class Layer4bit:
    """One 4-bit weight of a checkpoint.

    Attributes
    ----------
    name : str
        The layer's name (the key prefix before ``.weight``; ``""`` for a bare layer).
    packed : ndarray, shape ((n + 1) // 2, 1), uint8
    state : QuantState
    storage_dtype : numpy dtype
        The dtype ``L.weight`` was stored in (bitsandbytes' ``quant_storage``; uint8 by default).
    keys : tuple of str
        The file keys that belong to this weight.
    stored_bytes : int
        Bytes of those tensors in the file, the JSON included.
    """

    name: str
    packed: np.ndarray
    state: QuantState
    storage_dtype: np.dtype
    keys: tuple
    stored_bytes: int

    def weight(self, dtype=None) -> np.ndarray:
        """Decode the weight with the oracle (``dequantize_4bit``), in ``dtype`` or the state's."""
        return dequantize_4bit(self.packed, self.state, dtype=dtype)

    @property
    def bits_per_parameter(self) -> float:
        """Stored bits per weight, every tensor of the layer and its JSON included."""
        return 8.0 * self.stored_bytes / self.state.numel


@dataclass
class Checkpoint:
    """A read checkpoint: its 4-bit layers and its other tensors.

    Attributes
    ----------
    path : Path
    files : list of Path
        The safetensors files read (several for a sharded folder).
    layers : dict of str to Layer4bit
    tensors : dict of str to ndarray
        Every tensor that is not part of a 4-bit weight (biases, norms, embeddings).
    metadata : dict of str to str
        The ``__metadata__`` of the (first) file.
    """

    path: Path
    files: list
    layers: dict
    tensors: dict
    metadata: dict = field(default_factory=dict)

    def weight(self, key: str, dtype=None) -> np.ndarray:
        """Return tensor ``key``: decoded by the oracle when it is a 4-bit ``L.weight``.

        Raises
        ------
        KeyError
            If the checkpoint has no such tensor.
        """
        if key.endswith("weight"):
            layer = key[: -len("weight")].rstrip(".")
            if layer in self.layers:
                return self.layers[layer].weight(dtype)
        if key not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        return self.tensors[key]


def checkpoint_files(path) -> list:
    """Return the safetensors files of a checkpoint: a file, or a folder (sharded or not).

    A folder is read through ``model.safetensors.index.json`` when present, else its single
    ``model.safetensors`` (or its only ``*.safetensors`` file).

    Raises
    ------
    FileNotFoundError
        If there is no such file or folder, or the folder holds no checkpoint.
    ValueError
        If the index is not valid JSON with a ``weight_map``, or a folder holds several files
        and no index.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({exc})") from None
        return [path / name for name in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    found = sorted(p for p in path.glob("*.safetensors") if p.name != "adapter_model.safetensors")
    if len(found) == 1:
        return found
    if not found:
        raise FileNotFoundError(f"{path}: no model.safetensors (or index) in the folder")
    raise ValueError(f"{path}: {len(found)} safetensors files and no model.safetensors.index.json")


def _diagnose_header(path: Path) -> str:
    """Name what is wrong in a header the safetensors library refused (for the message only)."""
    data = path.read_bytes()
    if len(data) < 8:
        return f"the file has {len(data)} bytes, fewer than the 8 of the header length"
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        return f"the header claims {n} bytes but the file holds {len(data) - 8} after the length"
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"the header is not JSON ({exc})"
    body = len(data) - 8 - n
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)),
                     key=lambda kv: tuple(kv[1].get("data_offsets") or (0, 0)))
    for key, entry in entries:
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            continue
        try:
            nbytes = int(np.prod(shape, dtype=np.int64)) * SAFETENSORS_DTYPES[dtype]
            start, end = (int(o) for o in offsets)
        except (TypeError, ValueError):
            return f"tensor {key!r}: malformed shape {shape!r} or data_offsets {offsets!r}"
        if end - start != nbytes:
            return (f"tensor {key!r}: {dtype} of shape {list(shape)} needs {nbytes} bytes, but its data_offsets "
                    f"[{start}, {end}] hold {end - start}")
        if end > body:
            return f"tensor {key!r}: data ends at byte {end} but the file holds {body} bytes of data (truncated?)"
    ends = [int(v["data_offsets"][1]) for _, v in entries if isinstance(v.get("data_offsets"), list)]
    if ends and max(ends) < body:
        return f"the file holds {body - max(ends)} bytes after the last tensor"
    return "the safetensors library refused the header"


def _read_file(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {}
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if dtype not in SAFETENSORS_DTYPES:
                    raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}, which this reader does not support")
                tensors[key] = f.get_tensor(key)
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a valid safetensors file: {_diagnose_header(path)} ({exc})") from None
    return metadata, tensors


def _split(key: str) -> tuple[str, str] | None:
    """Return ``(layer, relative key)`` if ``key`` looks like part of a 4-bit weight, else None."""
    for rel in ("weight",) + _STATE_SUFFIXES:
        if key == rel:
            return "", rel
        if key.endswith("." + rel):
            return key[: -len(rel) - 1], rel
    if key.startswith("weight.quant_state."):
        return "", key
    if _QS_MARK in key:
        layer, _, rest = key.partition(_QS_MARK)
        return layer, "weight.quant_state." + rest
    return None


def _group(path: Path, tensors: dict) -> tuple[dict, dict]:
    """Split keys into 4-bit layers (``{layer: {relative key: array}}``) and other tensors.

    A layer is 4-bit when it has a ``weight.quant_state.*`` entry; then ``weight`` and the
    state's arrays are its own. State arrays without that entry are an error.
    """
    split = {key: _split(key) for key in tensors}
    quantized = {s[0] for s in split.values() if s is not None and s[1].startswith("weight.quant_state.")}
    layers: dict = {name: {} for name in sorted(quantized)}
    plain = {}
    for key, a in tensors.items():
        s = split[key]
        if s is not None and s[0] in quantized:
            layers[s[0]][s[1]] = a
        elif s is not None and s[1] in _STATE_SUFFIXES:
            prefix = f"{s[0]}." if s[0] else ""
            raise ValueError(f"{path}: tensor {key!r} belongs to a 4-bit weight, but there is no "
                             f"{prefix}weight.quant_state.bitsandbytes__nf4 (or __fp4) entry for it")
        else:
            plain[key] = a
    return layers, plain


def read_checkpoint(path) -> Checkpoint:
    """Read a transformers + bitsandbytes safetensors checkpoint with the oracle.

    Parameters
    ----------
    path : str or Path
        A ``.safetensors`` file or a folder (``model.safetensors`` or a sharded index).

    Returns
    -------
    Checkpoint
        Every 4-bit layer rebuilt (``Layer4bit``) and every other tensor as a NumPy array.

    Raises
    ------
    FileNotFoundError
        If there is no checkpoint at ``path``.
    ValueError
        Naming the file, the tensor and the problem (see Note: hostile files).

    Examples
    --------
    >>> import tempfile, os
    >>> from qlora_ref import quantize_4bit
    >>> W = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = os.path.join(d, "model.safetensors")
    ...     write_checkpoint(p, {"proj": quantize_4bit(W, double_quant=True)}, {"proj.bias": np.zeros(8, np.float32)})
    ...     ckpt = read_checkpoint(d)
    >>> sorted(ckpt.layers), ckpt.layers["proj"].state.double_quant, list(ckpt.tensors)
    (['proj'], True, ['proj.bias'])
    >>> bool(np.abs(ckpt.weight("proj.weight") - W).max() < 0.5)
    True
    """
    files = checkpoint_files(path)
    tensors, metadata = {}, {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{path}: the index names {file.name}, which does not exist")
        meta, part = _read_file(file)
        metadata = metadata or meta
        duplicate = sorted(set(part) & set(tensors))
        if duplicate:
            raise ValueError(f"{file}: tensor {duplicate[0]!r} is also in another shard")
        tensors.update(part)
    groups, plain = _group(Path(path), tensors)
    layers = {}
    for name, entries in sorted(groups.items()):
        full = (lambda rel: f"{name}.{rel}") if name else (lambda rel: rel)
        try:
            packed, state = from_bnb_state_dict(entries)
        except (ValueError, TypeError) as exc:
            message = str(exc).replace("'weight", f"'{name}.weight") if name else str(exc)
            if "nested_dtype 'bfloat16'" in message:
                message += _HAZARD
            w, a = entries.get("weight"), entries.get("absmax")
            if w is not None and a is not None and w.ndim == 2 and w.shape[1] > 1 and a.ndim == 2:
                message += _REPACKED
            raise ValueError(f"{path}: 4-bit layer {name!r}: {message}") from None
        storage = entries["weight"].dtype
        keys = tuple(sorted(full(k) for k in entries))
        stored = sum(int(a.nbytes) for a in entries.values())
        layers[name] = Layer4bit(name, packed, state, storage, keys, stored)
    return Checkpoint(Path(path), files, layers, plain, metadata)


def write_checkpoint(path, layers, tensors=None, *, metadata=None) -> None:
    """Write 4-bit layers and plain tensors to one safetensors file, as transformers does.

    Parameters
    ----------
    path : str or Path
        The file to write.
    layers : mapping of str to (packed, QuantState) or Layer4bit
        The 4-bit weights by layer name; a ``Layer4bit`` keeps its storage dtype.
    tensors : mapping of str to ndarray, optional
        Other tensors, written as they are.
    metadata : dict of str to str, optional
        The file's ``__metadata__``; default ``{"format": "pt"}`` (what transformers writes).

    Raises
    ------
    ValueError
        If a key would be written twice, or a state has no bitsandbytes form.

    Notes
    -----
    The entries of each layer are ``to_bnb_state_dict``'s, prefixed with ``layer.``; the
    safetensors library orders tensors itself, so a file written here from the state read out
    of a bitsandbytes checkpoint is byte-identical to it (``tests/test_checkpoint.py``).
    """
    from safetensors.numpy import save_file

    out = {}
    for name, value in layers.items():
        if isinstance(value, Layer4bit):
            packed, state, storage = value.packed, value.state, value.storage_dtype
        else:
            (packed, state), storage = value, np.dtype(np.uint8)
        for rel, a in to_bnb_state_dict(packed, state).items():
            if rel == "weight" and storage != np.uint8:
                a = a.reshape(-1).view(storage).reshape(-1, 1)  # quant_storage: the same bytes
            key = f"{name}.{rel}" if name else rel
            if key in out:
                raise ValueError(f"key {key!r} would be written twice")
            out[key] = np.ascontiguousarray(a)
    for key, a in (tensors or {}).items():
        if key in out:
            raise ValueError(f"key {key!r} is both a 4-bit entry and a plain tensor")
        out[key] = np.ascontiguousarray(a)
    save_file(out, str(path), metadata={"format": "pt"} if metadata is None else dict(metadata))
