"""One 4-bit layer's entries in a bitsandbytes state dict (what transformers saves to safetensors).

Writes and reads the arrays and the packed JSON that ``bitsandbytes.nn.Linear4bit`` puts into a
state dict (docs/spec.md, section 5), as NumPy arrays, so that checkpoints can be read
and written without torch. Pairs with ``qlora_ref.state`` (the ``QuantState`` both directions
use) and ``qlora_ref.blockwise`` (which makes and decodes the states). Comparator:
``bitsandbytes.functional.QuantState.as_dict(packed=True)`` (tests only).

Note: bnb state-dict layout
    Keys are relative to the layer (a file prefixes them with the layer's name, such as
    ``model.layers.0.mlp.down_proj.``):

    - ``weight``: shape ``((n + 1) // 2, 1)``, uint8 (or another storage dtype over the same
      bytes, bitsandbytes' ``quant_storage``);
    - ``weight.absmax``: ``(n_blocks,)``, float32; uint8 codes when double quantized;
    - ``weight.quant_map``: ``(16,)``, float32, the codebook;
    - ``weight.nested_absmax``: ``(ceil(n_blocks / 256),)``, float32 (double quantized only);
    - ``weight.nested_quant_map``: ``(256,)``, float32 (double quantized only);
    - ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): ``(len,)``, uint8, UTF-8 JSON.

    The JSON is ``json.dumps`` of, in this order, ``quant_type``, ``blocksize``, ``dtype``,
    ``shape`` (a list) and, when nested, ``nested_blocksize``, ``nested_dtype`` (``"float32"``)
    and ``nested_offset`` (the float32 offset as the shortest float64 text, so it reads back
    exactly). The key ends in ``__fp4`` for FP4.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

from qlora_ref.blockwise import check_packed
from qlora_ref.codebooks import codebook
from qlora_ref.formats.safe_io import load_json
from qlora_ref.state import BLOCKSIZES, INPUT_DTYPES, NESTED_BLOCKSIZES, NestedAbsmax, QuantState

__all__ = [
    "to_bnb_state_dict",
    "from_bnb_state_dict",
    "BNB_QUANT_TYPES",
    "quant_state_key",
    "ARRAY_KEYS",
    "QUANT_STATE_STEM",
    "QUANT_STATE_PREFIX",
    "JSON_KEYS",
    "NESTED_JSON_KEYS",
]

#: Quant types bitsandbytes can store (INT4 is the oracle's comparison table only).
BNB_QUANT_TYPES = ("nf4", "fp4")
#: The keys of one layer's entries (Note: bnb state-dict layout), relative to the layer: the one
#: list of them in this project (the checkpoint reader and ``qlora_gpu.bnb_format`` use it too).
#: The packed weight and its arrays, in bitsandbytes' order:
ARRAY_KEYS = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
#: The packed JSON entry's key starts with this and ends in the quant type.
QUANT_STATE_STEM = "weight.quant_state."
QUANT_STATE_PREFIX = QUANT_STATE_STEM + "bitsandbytes__"
#: Fields of the packed JSON, in order, and those a double-quantized state adds.
JSON_KEYS = ("quant_type", "blocksize", "dtype", "shape")
NESTED_JSON_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")


def quant_state_key(quant_type: str) -> str:
    """Return the key of the packed JSON entry, relative to the layer.

    Examples
    --------
    >>> quant_state_key("nf4")
    'weight.quant_state.bitsandbytes__nf4'
    """
    if quant_type not in BNB_QUANT_TYPES:
        raise ValueError(f"bitsandbytes stores quant types {BNB_QUANT_TYPES}, not {quant_type!r}")
    return QUANT_STATE_PREFIX + quant_type


def _json_bytes(payload: dict) -> np.ndarray:
    # json.dumps with its default separators and float repr: bitsandbytes' own encoding.
    return np.frombuffer(json.dumps(payload).encode("utf-8"), dtype=np.uint8).copy()


def to_bnb_state_dict(packed, state: QuantState) -> dict:
    """Return one layer's bitsandbytes state-dict entries for a 4-bit weight.

    Parameters
    ----------
    packed : ndarray, shape ((n + 1) // 2, 1) or ((n + 1) // 2,), uint8
    state : QuantState
        ``quant_type`` ``"nf4"`` or ``"fp4"``; no double quantization or the ``"bnb"`` scheme.

    Returns
    -------
    dict of str to ndarray
        Keys relative to the layer, in bitsandbytes' order (see Note: bnb state-dict layout):
        ``weight`` (uint8, ((n + 1) // 2, 1)), ``weight.absmax``, ``weight.quant_map``, the two
        nested entries when double quantized, and the packed JSON. Arrays are copies.

    Raises
    ------
    TypeError
        If ``packed`` or ``state`` has the wrong type.
    ValueError
        If the quant type or double-quantization scheme has no bitsandbytes form, or the
        packed data does not match the state.

    Examples
    --------
    >>> from qlora_ref.api import quantize_4bit
    >>> packed, state = quantize_4bit(np.ones((4, 64), np.float32), double_quant=True)
    >>> d = to_bnb_state_dict(packed, state)
    >>> list(d)[:3], d["weight.absmax"].dtype
    (['weight', 'weight.absmax', 'weight.quant_map'], dtype('uint8'))
    >>> bytes(d["weight.quant_state.bitsandbytes__nf4"]).decode()  # doctest: +NORMALIZE_WHITESPACE
    '{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4, 64],
      "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 1.0}'
    """
    flat = check_packed(packed, state)
    key = quant_state_key(state.quant_type)
    nested = state.nested
    if nested is not None and nested.scheme != "bnb":
        raise ValueError(f"the {nested.scheme!r} double-quantization scheme has no bitsandbytes form")
    out = {"weight": flat.reshape(-1, 1).copy()}
    payload = {
        "quant_type": state.quant_type,
        "blocksize": int(state.blocksize),
        "dtype": state.dtype,
        "shape": [int(d) for d in state.shape],
    }
    if nested is None:
        out["weight.absmax"] = np.asarray(state.absmax, dtype=np.float32).copy()
        out["weight.quant_map"] = np.asarray(state.codebook, dtype=np.float32).copy()
    else:
        out["weight.absmax"] = np.asarray(nested.codes, dtype=np.uint8).copy()
        out["weight.quant_map"] = np.asarray(state.codebook, dtype=np.float32).copy()
        out["weight.nested_absmax"] = np.asarray(nested.absmax, dtype=np.float32).copy()
        out["weight.nested_quant_map"] = np.asarray(nested.codebook, dtype=np.float32).copy()
        payload.update(
            nested_blocksize=int(nested.blocksize),
            nested_dtype="float32",
            nested_offset=float(np.float32(nested.offset)),
        )
    out[key] = _json_bytes(payload)
    return out


def _array(d: Mapping, key: str, dtype, shape) -> np.ndarray:
    """Fetch ``d[key]`` and check it is a NumPy array of ``dtype`` and ``shape``."""
    if key not in d:
        raise ValueError(f"missing key {key!r}")
    a = d[key]
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{key!r} must be a NumPy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"{key!r} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.shape != shape:
        raise ValueError(f"{key!r} has shape {a.shape}, expected {shape}")
    return a


def _read_json(d: Mapping) -> tuple[str, dict]:
    qs_keys = [k for k in d if isinstance(k, str) and k.startswith("weight.quant_state.")]
    if not qs_keys:
        raise ValueError(f"missing key {QUANT_STATE_PREFIX}nf4 (or __fp4): no packed quant_state entry")
    if len(qs_keys) > 1:
        raise ValueError(f"more than one quant_state entry: {sorted(qs_keys)}")
    key = qs_keys[0]
    if not key.startswith(QUANT_STATE_PREFIX) or key[len(QUANT_STATE_PREFIX):] not in BNB_QUANT_TYPES:
        raise ValueError(f"{key!r}: unknown quant type; expected {QUANT_STATE_PREFIX}nf4 or {QUANT_STATE_PREFIX}fp4")
    raw = d[key]
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"{key!r} must be a 1-D uint8 array of UTF-8 JSON")
    try:
        meta = load_json(raw.tobytes(), f"{key!r}")
    except ValueError as exc:
        raise ValueError(f"{key!r} is not UTF-8 JSON: {str(exc).partition(': ')[2]}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key!r} must hold a JSON object, got {type(meta).__name__}")
    return key, meta


def _check_meta(key: str, meta: dict) -> bool:
    """Validate the JSON fields; return whether the state is nested."""
    missing = [k for k in JSON_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{key!r}: JSON lacks {missing}")
    unknown = sorted(set(meta) - set(JSON_KEYS) - set(NESTED_JSON_KEYS))
    if unknown:
        raise ValueError(f"{key!r}: unknown JSON keys {unknown}")
    if meta["quant_type"] != key[len(QUANT_STATE_PREFIX):]:
        raise ValueError(f"{key!r}: JSON quant_type {meta['quant_type']!r} disagrees with the key")
    bs = meta["blocksize"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs not in BLOCKSIZES:
        raise ValueError(f"{key!r}: blocksize {bs!r} is not one of {BLOCKSIZES}")
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in INPUT_DTYPES:
        raise ValueError(f"{key!r}: dtype {meta['dtype']!r} is not one of {sorted(INPUT_DTYPES)}")
    shape = meta["shape"]
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise ValueError(f"{key!r}: shape {shape!r} must be a non-empty list of positive ints")
    present = [k for k in NESTED_JSON_KEYS if k in meta]
    if present and len(present) != len(NESTED_JSON_KEYS):
        raise ValueError(f"{key!r}: JSON has {present} but not all of {list(NESTED_JSON_KEYS)}")
    if not present:
        return False
    nbs = meta["nested_blocksize"]
    if isinstance(nbs, bool) or not isinstance(nbs, int) or nbs <= 0:
        raise ValueError(f"{key!r}: nested_blocksize {nbs!r} must be a positive int")
    if nbs not in NESTED_BLOCKSIZES:
        raise ValueError(f"{key!r}: nested_blocksize {nbs} is not one of {NESTED_BLOCKSIZES} "
                         f"(bitsandbytes writes 256)")
    if meta["nested_dtype"] != "float32":
        raise ValueError(f"{key!r}: nested_dtype {meta['nested_dtype']!r} is not 'float32'")
    off = meta["nested_offset"]
    if isinstance(off, bool) or not isinstance(off, (int, float)) or not np.isfinite(off):
        raise ValueError(f"{key!r}: nested_offset {off!r} must be a finite number")
    if float(np.float32(off)) != float(off):
        raise ValueError(f"{key!r}: nested_offset {off!r} is not a float32 value (bitsandbytes writes one)")
    return True


def from_bnb_state_dict(d: Mapping, *, copy: bool = True) -> tuple[np.ndarray, QuantState]:
    """Read one layer's bitsandbytes state-dict entries back into packed codes and a state.

    Parameters
    ----------
    d : mapping of str to ndarray
        Keys relative to the layer (Note: bnb state-dict layout). Keys that do not start with
        ``weight`` (such as ``bias``) are ignored; any other ``weight.*`` key is an error.
        ``weight`` may use another storage dtype (bitsandbytes' ``quant_storage``): its bytes
        are read as uint8.
    copy : bool
        Copy the arrays (default). ``False`` keeps views of ``d``'s arrays, so a memory-mapped
        checkpoint is not read until it is decoded (``qlora_ref.formats.checkpoint``).

    Returns
    -------
    packed : ndarray, shape ((n + 1) // 2, 1), uint8
    state : QuantState
        ``codebook`` is the file's ``quant_map``; when nested, the nested map and offset are the
        file's (they are the authority when reading).

    Raises
    ------
    TypeError
        If ``d`` is not a mapping or an entry is not a NumPy array.
    ValueError
        Naming the key and the problem: a missing or unexpected key, JSON that is not valid or
        disagrees with the arrays (quant type, block size, dtype, shape, nesting), an array of
        the wrong dtype or shape (an absmax of the wrong length, a packed size that does not
        match the shape), a quant_map that is not the quant type's codebook, a negative or
        non-finite absmax or a nested offset that is not a float32 value.

    Examples
    --------
    >>> from qlora_ref.api import quantize_4bit
    >>> x = np.arange(-50, 50, dtype=np.float32).reshape(4, 25)
    >>> packed, state = quantize_4bit(x, blocksize=32, quant_type="fp4", double_quant=True)
    >>> packed2, state2 = from_bnb_state_dict(to_bnb_state_dict(packed, state))
    >>> bool((packed2 == packed).all()), state2.shape, state2.quant_type, float(state2.nested.offset)
    (True, (4, 25), 'fp4', 40.5)
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"expected a mapping of key to array, got {type(d).__name__}")
    key, meta = _read_json(d)
    nested = _check_meta(key, meta)
    for k in d:
        if isinstance(k, str) and k.startswith("weight") and k != key and k not in ARRAY_KEYS:
            raise ValueError(f"unexpected key {k!r} for a 4-bit weight")
        if isinstance(k, str) and k in ("weight.nested_absmax", "weight.nested_quant_map") and not nested:
            raise ValueError(f"{k!r} is present but the JSON in {key!r} has no nested_* fields")

    quant_type, blocksize = meta["quant_type"], meta["blocksize"]
    shape = tuple(meta["shape"])
    numel = math.prod(shape)  # exact: a product beyond int64 cannot wrap round to a small size
    n_blocks = -(-numel // blocksize)
    packed_nbytes = (numel + 1) // 2

    if "weight" not in d:
        raise ValueError("missing key 'weight'")
    w = d["weight"]
    if not isinstance(w, np.ndarray):
        raise TypeError(f"'weight' must be a NumPy array, got {type(w).__name__}")
    if w.ndim != 2 or w.shape[1] != 1 or w.nbytes != packed_nbytes:
        raise ValueError(
            f"'weight' has shape {w.shape} and {w.nbytes} bytes, but shape {list(shape)} in {key!r} "
            f"needs ({packed_nbytes}, 1) bytes of packed codes"
        )
    packed = np.ascontiguousarray(w).view(np.uint8).reshape(packed_nbytes, 1)
    if copy:
        packed = packed.copy()

    def own(a: np.ndarray) -> np.ndarray:
        return a.copy() if copy else a

    table = _array(d, "weight.quant_map", np.float32, (16,))
    expected = codebook(quant_type)
    if not np.array_equal(table.view(np.uint32), expected.view(np.uint32)):
        raise ValueError(f"'weight.quant_map' is not bitsandbytes' {quant_type} codebook")

    common = dict(shape=shape, dtype=meta["dtype"], blocksize=blocksize, quant_type=quant_type,
                  codebook=own(table))
    if not nested:
        absmax = _array(d, "weight.absmax", np.float32, (n_blocks,))
        if not (np.all(np.isfinite(absmax)) and np.all(absmax >= 0)):
            raise ValueError("'weight.absmax' holds negative, NaN or Inf values")
        return packed, QuantState(**common, absmax=own(absmax))

    nbs = meta["nested_blocksize"]
    nested_absmax = _array(d, "weight.nested_absmax", np.float32, (-(-n_blocks // nbs),))
    if not (np.all(np.isfinite(nested_absmax)) and np.all(nested_absmax >= 0)):
        raise ValueError("'weight.nested_absmax' holds negative, NaN or Inf values")
    nested_map = _array(d, "weight.nested_quant_map", np.float32, (256,))
    if not np.all(np.isfinite(nested_map)):
        raise ValueError("'weight.nested_quant_map' holds NaN or Inf values")
    codes = _array(d, "weight.absmax", np.uint8, (n_blocks,))
    state = QuantState(**common, nested=NestedAbsmax(
        scheme="bnb", codes=own(codes), absmax=own(nested_absmax), codebook=own(nested_map),
        offset=np.float32(meta["nested_offset"]), blocksize=nbs,
    ))
    return packed, state
