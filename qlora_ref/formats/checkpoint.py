"""Safetensors checkpoints as transformers + bitsandbytes write them: read, decode, write.

A 4-bit linear layer ``L`` is stored as a handful of tensors (``L.weight``, ``L.weight.absmax``,
... and the packed JSON ``L.weight.quant_state.bitsandbytes__nf4``; docs/spec.md,
section 5, and Note: bnb state-dict layout in ``qlora_ref.formats.bnb``). This module finds every
such layer in a file (or a sharded folder), rebuilds its ``QuantState`` through
``qlora_ref.formats.bnb.from_bnb_state_dict`` and decodes it with the oracle; it writes files
whose bytes equal what bitsandbytes' state dict gives when saved the same way. Reading and
writing go through the ``safetensors`` library's NumPy API (bfloat16 arrives as
``ml_dtypes.bfloat16``). Pairs with ``qlora_ref.formats.peft`` (PEFT adapters on top of a
checkpoint) and ``qlora-ref inspect``.

Note: hostile files
    Every problem is a ``ValueError`` that names the file, the tensor and what is wrong: a header
    that is not a JSON object or whose entries are malformed (``read_header``: shape, dtype and
    offsets that disagree, overlap, leave gaps or run past the end; a file the safetensors
    library refuses is refused too), a dtype the reader cannot represent, 4-bit entries without
    their quant_state JSON, and everything ``from_bnb_state_dict`` checks (missing keys, JSON
    that disagrees with the arrays, absmax of the wrong length, an unknown quant type or nested
    block size, a packed size that does not match the shape, computed exactly in Python ints).
    bitsandbytes' CPU repacking hazard (docs/spec.md, section 5.3: a ``state_dict()`` taken after an
    eval forward on an AVX-512-BF16 CPU re-quantizes the absmax through bfloat16 and writes
    ``nested_dtype "bfloat16"``) is refused with that explanation, and so is a layer saved in the repacked layout itself
    (docs/findings.md). A sharded index may only name
    regular files inside its folder (Note: hostile paths in ``qlora_ref.formats.safe_io``).

Note: streaming reads
    A file is opened by reading its 8-byte length and its header only (the data size comes from
    ``stat``); each tensor is then a read-only NumPy array over a memory map of the file, so
    listing the layers of a checkpoint (``qlora-ref inspect``) reads the small arrays it checks
    (absmax, maps, JSON) and never the packed weights. Decoding a layer reads its bytes then.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qlora_ref.api import dequantize_4bit
from qlora_ref.formats.bnb import (
    ARRAY_KEYS,
    QUANT_STATE_STEM,
    from_bnb_state_dict,
    to_bnb_state_dict,
)
from qlora_ref.formats.safe_io import confined_file, load_json, read_json_file
from qlora_ref.state import QuantState

__all__ = ["Layer4bit", "Checkpoint", "read_checkpoint", "read_header", "read_safetensors", "write_checkpoint",
           "checkpoint_files", "SAFETENSORS_DTYPES"]

#: safetensors dtype names this reader turns into NumPy arrays (itemsize in bytes).
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
_QS_MARK = "." + QUANT_STATE_STEM
_STATE_SUFFIXES = ARRAY_KEYS[1:]  # the entries beside the packed weight
_HAZARD = (" -- this is bitsandbytes' CPU repacking hazard: the state dict was taken after an eval "
           "forward on an AVX-512-BF16 CPU, which re-quantized the absmax through bfloat16 "
           "(docs/spec.md, section 5.3); save the model before running it")
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
        Every tensor that is not part of a 4-bit weight (biases, norms, embeddings): read-only
        arrays mapped from the file (Note: streaming reads).
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
        If the index is not valid JSON with a ``weight_map`` of file names, names a shard
        outside the folder, through a symlink or that is not a regular file (Note: hostile
        paths in ``qlora_ref.formats.safe_io``), or a folder holds several files and no index.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        content = read_json_file(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: not a safetensors index: no 'weight_map' object")
        for key, name in weight_map.items():
            if not isinstance(name, str):
                raise ValueError(f"{index}: weight_map[{key!r}] is {name!r}, not a file name")
        # The Hugging Face cache links each file of a snapshot into one blobs folder.
        blobs = index.resolve().parent if index.is_symlink() else None
        files = []
        for name in sorted(set(weight_map.values())):
            shard, _ = confined_file(path, name, what=f"{index}: shard", links_into=blobs)
            files.append(shard)
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    found = sorted(p for p in path.glob("*.safetensors") if p.name != "adapter_model.safetensors")
    if len(found) == 1:
        return found
    if not found:
        raise FileNotFoundError(f"{path}: no model.safetensors (or index) in the folder")
    raise ValueError(f"{path}: {len(found)} safetensors files and no model.safetensors.index.json")


#: Largest header the reader parses (the safetensors library's own limit).
MAX_HEADER_BYTES = 100_000_000


def _check_entry(key, entry) -> tuple[str, tuple, int, int]:
    """Validate one header entry; return ``(dtype, shape, start, end)`` or a message (ValueError)."""
    if not isinstance(entry, dict):
        raise ValueError(f"tensor {key!r}: the header entry is a {type(entry).__name__}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise ValueError(f"tensor {key!r}: dtype {dtype!r} is not a string")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ValueError(f"tensor {key!r}: malformed shape {shape!r} (a list of ints >= 0)")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise ValueError(f"tensor {key!r}: malformed data_offsets {offsets!r} (two ints >= 0)")
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {key!r} has dtype {dtype}, which this reader does not support")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]  # exact: Python ints do not wrap
    start, end = offsets
    if end - start != nbytes:
        raise ValueError(f"tensor {key!r}: {dtype} of shape {list(shape)} needs {nbytes} bytes, but its "
                         f"data_offsets [{start}, {end}] hold {end - start}")
    return dtype, tuple(shape), start, end


def read_header(path) -> tuple[dict, dict, int]:
    """Read and validate a safetensors file's header without reading its tensors.

    Only ``8 + header length`` bytes are read; the data size comes from ``stat``.

    Returns
    -------
    metadata : dict of str to str
    entries : dict of str to (dtype name, shape, start, end)
        Offsets relative to the data, which starts at byte ``data_start``.
    data_start : int

    Raises
    ------
    ValueError
        Naming the file and what is wrong: fewer than 8 bytes, a header length beyond the file
        or the limit, a header that is not a JSON object, an entry whose dtype, shape and
        offsets are malformed or disagree, tensors that overlap, leave gaps, or end beyond (or
        before) the end of the file.
    """
    path = Path(path)
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise ValueError(f"{path}: cannot stat the file ({exc.strerror})") from None
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path}: not a regular file")

    def bad(problem):
        return ValueError(f"{path}: not a valid safetensors file: {problem}")

    with open(path, "rb") as f:
        if size < 8:
            raise bad(f"the file has {size} bytes, fewer than the 8 of the header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise bad(f"the header claims {n} bytes, more than the {MAX_HEADER_BYTES} allowed")
        if 8 + n > size:
            raise bad(f"the header claims {n} bytes but the file holds {size - 8} after the length")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise bad("the header does not start with '{' (it must be a JSON object)")
    try:
        header = load_json(raw, "the header")
    except ValueError as exc:
        raise bad(f"{exc}") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must be an object of strings")
    entries = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            entries[key] = _check_entry(key, entry)
        except ValueError as exc:
            raise bad(str(exc)) from None
    body = size - 8 - n
    position = 0
    for key, (dtype, shape, start, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if start != position:
            raise bad(f"tensor {key!r}: data starts at byte {start}, but the previous tensor ends at {position} "
                      f"(tensors must be contiguous, without overlap)")
        if end > body:
            raise bad(f"tensor {key!r}: data ends at byte {end} but the file holds {body} bytes of data (truncated?)")
        position = end
    if position != body:
        raise bad(f"the file holds {body - position} bytes after the last tensor")
    return dict(metadata), entries, 8 + n


def read_safetensors(path) -> tuple[dict, dict]:
    """Read one safetensors file as ``(metadata, tensors)``: its string metadata, and read-only
    NumPy arrays by key, mapped over the file and read on use (see Note: streaming reads).

    The header is validated here (``read_header``) and again by the safetensors library, so a
    file either reader refuses is refused; no tensor is copied.

    Raises
    ------
    ValueError
        If the file is not a valid safetensors container (the reason names the file and tensor).
    """
    path = Path(path)
    metadata, entries, data_start = read_header(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            list(f.keys())
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a valid safetensors file: the safetensors library refused it ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the file ({exc})") from None
    size = os.stat(path).st_size
    mapped = None
    if size > data_start:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the mapping outlives the fd
    tensors = {}
    for key, (dtype, shape, start, end) in entries.items():
        np_dtype = _numpy_dtype(dtype)
        if end == start:
            tensors[key] = np.empty(shape, dtype=np_dtype)
        else:
            flat = np.frombuffer(mapped, dtype=np.uint8, count=end - start, offset=data_start + start)
            tensors[key] = flat.view(np_dtype).reshape(shape)  # read-only, read from the file on use
    return metadata, tensors


def _numpy_dtype(name: str) -> np.dtype:
    if name == "BF16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"BOOL": "?", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "U32": "<u4",
                     "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8"}[name])


def _split(key: str) -> tuple[str, str] | None:
    """Return ``(layer, relative key)`` if ``key`` looks like part of a 4-bit weight, else None."""
    for rel in ARRAY_KEYS:
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
        meta, part = read_safetensors(file)
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
            packed, state = from_bnb_state_dict(entries, copy=False)  # stays a view of the file
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
    # A temporary file beside the target, renamed over it: a failed write leaves no half file.
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(out, str(tmp), metadata={"format": "pt"} if metadata is None else dict(metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
