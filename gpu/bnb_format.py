"""One 4-bit layer's entries in a bitsandbytes state dict, on torch tensors.

Fast pair of ``qlora_ref.formats.bnb`` (same keys, same bytes; see its Note: bnb state-dict
layout): what ``bitsandbytes.nn.Linear4bit`` and Hugging Face transformers write to safetensors,
so a ``QLoRALinear`` saves and loads real checkpoints. Written from the format's description;
tests compare the bytes with the oracle and with bitsandbytes' own
``QuantState.as_dict(packed=True)``.

Public API
----------
``to_bnb_state_dict(packed, state)`` -> ``{key: Tensor}``, keys relative to the layer
    (``weight``, ``weight.absmax``, ``weight.quant_map``, [``weight.nested_absmax``,
    ``weight.nested_quant_map``,] ``weight.quant_state.bitsandbytes__nf4``).
``from_bnb_state_dict(d, device=None)`` -> ``(packed, state)``; validates every entry.
``pack_json(payload)`` / ``unpack_json(tensor)``: the JSON entry as a uint8 tensor.

INT4 (this project's comparison table) has no bitsandbytes form; it is written with the key
``weight.quant_state.bitsandbytes__int4`` so that a model with INT4 layers can be saved and
reloaded by ``qlora_gpu``, but bitsandbytes cannot read such an entry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from qlora_gpu import codebooks
from qlora_gpu.state import BLOCKSIZES, DTYPES, NESTED_BLOCKSIZES, NestedAbsmax, QuantState, dtype_name
from qlora_ref.formats.bnb import ARRAY_KEYS, JSON_KEYS, NESTED_JSON_KEYS, QUANT_STATE_PREFIX

__all__ = ["to_bnb_state_dict", "from_bnb_state_dict", "pack_json", "unpack_json", "quant_state_key"]

#: The entries beside the JSON one, named from the oracle's ``ARRAY_KEYS`` (the one list of them).
_, ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP = ARRAY_KEYS  # the names of the one key list


def quant_state_key(quant_type: str) -> str:
    """Return the key of the packed JSON entry, relative to the layer.

    Examples
    --------
    >>> quant_state_key("fp4")
    'weight.quant_state.bitsandbytes__fp4'
    """
    if quant_type not in codebooks.CODEBOOKS:
        raise ValueError(f"unknown quant_type {quant_type!r}")
    return QUANT_STATE_PREFIX + quant_type


def pack_json(payload: dict) -> torch.Tensor:
    """Encode a dict as bitsandbytes does: ``json.dumps`` (default separators), UTF-8, uint8.

    Examples
    --------
    >>> bytes(pack_json({"a": 1, "b": [2, 3]}).tolist())
    b'{"a": 1, "b": [2, 3]}'
    """
    return torch.tensor(list(json.dumps(payload).encode("utf-8")), dtype=torch.uint8)


def unpack_json(t: torch.Tensor) -> dict:
    """Decode a uint8 tensor of UTF-8 JSON into a dict.

    Raises
    ------
    ValueError
        If it is not a 1-D uint8 tensor holding a JSON object.

    Examples
    --------
    >>> unpack_json(pack_json({"quant_type": "nf4"}))
    {'quant_type': 'nf4'}
    """
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.ndim != 1:
        raise ValueError("the quant_state entry must be a 1-D uint8 tensor of UTF-8 JSON")
    try:
        meta = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the quant_state entry is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise ValueError("the quant_state entry is not UTF-8 JSON: nested too deeply") from None
    if not isinstance(meta, dict):
        raise ValueError(f"the quant_state entry must hold a JSON object, got {type(meta).__name__}")
    return meta


def to_bnb_state_dict(packed: torch.Tensor, state: QuantState) -> dict:
    """Return one layer's bitsandbytes state-dict entries (fast pair of the oracle's).

    Parameters
    ----------
    packed : Tensor, shape ((n + 1) // 2, 1), uint8
    state : QuantState

    Returns
    -------
    dict of str to Tensor
        In bitsandbytes' order; tensors share memory with the inputs (``weight``, absmax,
        maps), except the JSON entry, which is new.

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> packed, state = quantize_4bit(torch.ones(4, 64), double_quant=True)
    >>> d = to_bnb_state_dict(packed, state)
    >>> list(d)[:3], d[ABSMAX].dtype
    (['weight', 'weight.absmax', 'weight.quant_map'], torch.uint8)
    >>> bytes(d["weight.quant_state.bitsandbytes__nf4"].tolist()).decode()  # doctest: +NORMALIZE_WHITESPACE
    '{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4, 64],
      "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 1.0}'
    """
    payload = {"quant_type": state.quant_type, "blocksize": int(state.blocksize), "dtype": dtype_name(state.dtype),
               "shape": [int(d) for d in state.shape]}
    out = {"weight": packed.reshape(-1, 1)}
    if state.nested is None:
        out[ABSMAX] = state.absmax
        out[QUANT_MAP] = state.codebook
    else:
        nest = state.nested
        out[ABSMAX] = nest.codes
        out[QUANT_MAP] = state.codebook
        out[NESTED_ABSMAX] = nest.absmax
        out[NESTED_QUANT_MAP] = nest.codebook
        # float() of the float32 offset: json writes the shortest float64 text, exact on reading.
        payload.update(nested_blocksize=int(nest.blocksize), nested_dtype="float32",
                       nested_offset=float(nest.offset.item()))
    out[quant_state_key(state.quant_type)] = pack_json(payload)
    return out


def _tensor(d: Mapping, key: str, dtype, shape) -> torch.Tensor:
    if key not in d:
        raise ValueError(f"missing key {key!r}")
    t = d[key]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{key!r} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{key!r} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _read_meta(d: Mapping) -> tuple[str, dict, bool]:
    keys = [k for k in d if isinstance(k, str) and k.startswith("weight.quant_state.")]
    if len(keys) != 1:
        raise ValueError(f"expected exactly one '{QUANT_STATE_PREFIX}<quant_type>' entry, found {sorted(keys)}")
    key = keys[0]
    if key[len(QUANT_STATE_PREFIX):] not in codebooks.CODEBOOKS or not key.startswith(QUANT_STATE_PREFIX):
        raise ValueError(f"{key!r}: unknown quant type")
    try:
        meta = unpack_json(d[key])
    except ValueError as exc:
        raise ValueError(f"{key!r}: {exc}") from None
    missing = [k for k in JSON_KEYS if k not in meta]
    unknown = sorted(set(meta) - set(JSON_KEYS) - set(NESTED_JSON_KEYS))
    if missing or unknown:
        raise ValueError(f"{key!r}: JSON lacks {missing} or has unknown keys {unknown}")
    if meta["quant_type"] != key[len(QUANT_STATE_PREFIX):]:
        raise ValueError(f"{key!r}: JSON quant_type {meta['quant_type']!r} disagrees with the key")
    bs = meta["blocksize"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs not in BLOCKSIZES:  # 64.0: refused, as the oracle
        raise ValueError(f"{key!r}: blocksize {bs!r} is not one of {BLOCKSIZES}")
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in DTYPES:
        raise ValueError(f"{key!r}: dtype {meta['dtype']!r} is not one of {sorted(DTYPES)}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"{key!r}: shape {shape!r} must be a non-empty list of positive ints")
    present = [k for k in NESTED_JSON_KEYS if k in meta]
    if present and len(present) != len(NESTED_JSON_KEYS):
        raise ValueError(f"{key!r}: JSON has {present} but not all of {list(NESTED_JSON_KEYS)}")
    if present:
        nbs, off = meta["nested_blocksize"], meta["nested_offset"]
        if isinstance(nbs, bool) or not isinstance(nbs, int) or nbs <= 0:
            raise ValueError(f"{key!r}: nested_blocksize {nbs!r} must be a positive int")
        if nbs not in NESTED_BLOCKSIZES:
            raise ValueError(f"{key!r}: nested_blocksize {nbs} is not one of {NESTED_BLOCKSIZES} "
                             f"(bitsandbytes writes 256)")
        if meta["nested_dtype"] != "float32":
            raise ValueError(f"{key!r}: nested_dtype {meta['nested_dtype']!r} is not 'float32'")
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
            raise ValueError(f"{key!r}: nested_offset {off!r} must be a finite number")
        if torch.tensor(off, dtype=torch.float32).item() != float(off):
            raise ValueError(f"{key!r}: nested_offset {off!r} is not a float32 value")
    return key, meta, bool(present)


def from_bnb_state_dict(d: Mapping, device=None) -> tuple[torch.Tensor, QuantState]:
    """Read one layer's bitsandbytes entries back into packed codes and a state.

    Fast pair of ``qlora_ref.formats.bnb.from_bnb_state_dict``.

    Parameters
    ----------
    d : mapping of str to Tensor
        Keys relative to the layer; keys not starting with ``weight`` (``bias``, ``lora_A...``)
        are ignored. ``weight`` may use another storage dtype over the same bytes.
    device : torch.device, optional
        Where the returned tensors live (default: where they are).

    Returns
    -------
    packed : Tensor, shape ((n + 1) // 2, 1), uint8
    state : QuantState
        ``codebook``, and when nested the map and offset, are the file's.

    Raises
    ------
    TypeError
        If an entry is not a tensor.
    ValueError
        Naming the key: a missing or unexpected key, JSON that disagrees with the arrays, an
        array of the wrong dtype or shape, a quant_map that is not the quant type's codebook,
        non-finite or negative constants.

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> packed, state = quantize_4bit(torch.arange(-50.0, 50.0).reshape(4, 25), blocksize=32, double_quant=True)
    >>> packed2, state2 = from_bnb_state_dict(to_bnb_state_dict(packed, state))
    >>> bool(torch.equal(packed2, packed)), state2.shape, state2.nested.offset.item()
    (True, (4, 25), 40.5)
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"expected a mapping of key to tensor, got {type(d).__name__}")
    key, meta, nested = _read_meta(d)
    for k in d:
        if isinstance(k, str) and k.startswith("weight") and k != key and k not in ARRAY_KEYS:
            raise ValueError(f"unexpected key {k!r} for a 4-bit weight")
        if k in (NESTED_ABSMAX, NESTED_QUANT_MAP) and not nested:
            raise ValueError(f"{k!r} is present but the JSON in {key!r} has no nested_* fields")
    quant_type, blocksize, shape = meta["quant_type"], meta["blocksize"], tuple(meta["shape"])
    numel = math.prod(shape)
    n_blocks = -(-numel // blocksize)
    if "weight" not in d:
        raise ValueError("missing key 'weight'")
    w = d["weight"]
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"'weight' must be a tensor, got {type(w).__name__}")
    nbytes = w.numel() * w.element_size()
    if w.ndim != 2 or w.shape[1] != 1 or nbytes != (numel + 1) // 2:
        raise ValueError(f"'weight' has shape {tuple(w.shape)} and {nbytes} bytes, but shape {list(shape)} in "
                         f"{key!r} needs ({(numel + 1) // 2}, 1) bytes of packed codes")
    packed = w.contiguous().view(torch.uint8).reshape(-1, 1)
    table = _tensor(d, QUANT_MAP, torch.float32, (16,))
    expected = codebooks.codebook(quant_type, table.device)
    if not torch.equal(table.view(torch.int32), expected.view(torch.int32)):
        raise ValueError(f"'weight.quant_map' is not the {quant_type} codebook")
    common = dict(shape=shape, dtype=DTYPES[meta["dtype"]], blocksize=blocksize, quant_type=quant_type, codebook=table)
    if not nested:
        absmax = _tensor(d, ABSMAX, torch.float32, (n_blocks,))
        if not bool((torch.isfinite(absmax) & (absmax >= 0)).all()):
            raise ValueError("'weight.absmax' holds negative, NaN or Inf values")
        state = QuantState(**common, absmax=absmax)
    else:
        nbs = meta["nested_blocksize"]
        codes = _tensor(d, ABSMAX, torch.uint8, (n_blocks,))
        nested_absmax = _tensor(d, NESTED_ABSMAX, torch.float32, (-(-n_blocks // nbs),))
        if not bool((torch.isfinite(nested_absmax) & (nested_absmax >= 0)).all()):
            raise ValueError("'weight.nested_absmax' holds negative, NaN or Inf values")
        nested_map = _tensor(d, NESTED_QUANT_MAP, torch.float32, (256,))
        if not bool(torch.isfinite(nested_map).all()):
            raise ValueError("'weight.nested_quant_map' holds NaN or Inf values")
        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=codes.device)
        state = QuantState(**common, nested=NestedAbsmax(codes=codes, absmax=nested_absmax, codebook=nested_map,
                                                         offset=offset, blocksize=nbs))
    if device is not None:
        packed, state = packed.to(device), state.to(device)
    return packed, state
