"""The constant tables of the fast path, as torch tensors cached per device.

Data, not code, from the oracle: the codebooks ``NF4_CODEBOOK``, ``FP4_CODEBOOK``,
``INT4_CODEBOOK`` (``qlora_ref.codebooks``) and the signed dynamic map ``DYNAMIC_MAP``
(``qlora_ref.double_quant``). From them this module derives the encoder's tables with its own
code, following the oracle's Note: quantization semantics (step 4) and Note: nested encoding
rule:

- ``midpoints(quant_type)``: the 15 float32 midpoints between neighbouring codebook entries in
  sorted order; the sorted position of ``s`` is the number of midpoints strictly below it.
- ``sorted_codes(quant_type)``: the code of each sorted position (identity for NF4 and INT4;
  FP4 is stored by code, not by value). Sorting is stable, as the oracle's.
- ``encode_table(quant_type)``: the step-4 rule as a lookup on the upper 16 bits of a float32
  ``s`` (Note: the encoder's lookup table).
- ``pair_table(code)``: the two decoded values of each of the 256 packed bytes.
- ``dynamic_midpoints()``: the 255 midpoints of the dynamic map in float64, where the sum of two
  float32 values is exact, so comparing a float32 value against them is the exact nearest rule.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from qlora_ref.codebooks import FP4_CODEBOOK, INT4_CODEBOOK, NF4_CODEBOOK
from qlora_ref.double_quant import DYNAMIC_MAP

__all__ = ["CODEBOOKS", "ZERO_CODES", "codebook", "midpoints", "sorted_codes", "dynamic_map",
           "dynamic_midpoints", "DYNAMIC_ZERO_CODE", "encode_table", "pair_table"]

#: The 16-entry float32 tables, indexed by code (NumPy, read-only; data from the oracle).
CODEBOOKS = {"nf4": NF4_CODEBOOK, "fp4": FP4_CODEBOOK, "int4": INT4_CODEBOOK}
#: The code whose value is 0.0: what zeros encode to and what pads an odd count.
ZERO_CODES = {name: int(np.flatnonzero(table == 0.0)[0]) for name, table in CODEBOOKS.items()}
#: Index of 0.0 in the dynamic map: the nested code of a constant in an all-zero nested block.
DYNAMIC_ZERO_CODE = int(np.flatnonzero(DYNAMIC_MAP == 0.0)[0])


def _check(quant_type: str) -> str:
    if not isinstance(quant_type, str) or quant_type not in CODEBOOKS:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {sorted(CODEBOOKS)}")
    return quant_type


@functools.lru_cache(maxsize=None)
def _tables(quant_type: str, device: str):
    table = CODEBOOKS[quant_type]
    order = np.argsort(table, kind="stable")  # (16,) code of each sorted position
    v = table[order]
    mids = (v[:-1] + v[1:]) / np.float32(2.0)  # (15,) float32, as the oracle computes them
    as_tensor = lambda a, dt: torch.tensor(np.asarray(a), dtype=dt, device=device)  # noqa: E731
    return (as_tensor(table, torch.float32), as_tensor(mids, torch.float32),
            as_tensor(order.astype(np.int64), torch.int64))


def codebook(quant_type: str, device="cpu") -> torch.Tensor:
    """Return the codebook of ``quant_type`` (16 float32 values, indexed by code) on ``device``.

    Examples
    --------
    >>> codebook("nf4")[[0, 7, 15]].tolist()
    [-1.0, 0.0, 1.0]
    """
    return _tables(_check(quant_type), str(torch.device(device)))[0]


def midpoints(quant_type: str, device="cpu") -> torch.Tensor:
    """Return the 15 float32 midpoints between sorted neighbouring codebook entries.

    Examples
    --------
    >>> midpoints("int4").shape
    torch.Size([15])
    """
    return _tables(_check(quant_type), str(torch.device(device)))[1]


def sorted_codes(quant_type: str, device="cpu") -> torch.Tensor:
    """Return the code of each sorted position (int64, 16 entries).

    Examples
    --------
    >>> sorted_codes("fp4").tolist()
    [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]
    """
    return _tables(_check(quant_type), str(torch.device(device)))[2]


@functools.lru_cache(maxsize=None)
def _encode(quant_type: str, device: str) -> torch.Tensor:
    mids = _tables(quant_type, "cpu")[1].numpy()  # (15,) float32, sorted
    order = _tables(quant_type, "cpu")[2].numpy().astype(np.uint8)  # (16,) code of each position
    top = np.arange(1 << 16, dtype=np.uint32)  # the upper 16 bits of a float32
    low_end = (top << 16).view(np.float32)  # low 16 bits all 0: the end nearer to zero
    high_end = ((top << 16) | 0xFFFF).view(np.float32)  # low 16 bits all 1: the end away from zero
    negative = top >= 0x8000
    vmin, vmax = np.where(negative, high_end, low_end), np.where(negative, low_end, high_end)
    with np.errstate(invalid="ignore"):
        below_min = (mids[None, :] < vmin[:, None]).sum(axis=1)  # positions at the two ends
        below_max = (mids[None, :] < vmax[:, None]).sum(axis=1)
    # Inf/NaN exponent: +-inf take the end position of their sign; NaN (0 * inf) is fixed later.
    special = (top & 0x7F80) == 0x7F80
    below_min = np.where(special, np.where(negative, 0, 15), below_min)
    below_max = np.where(special, below_min, below_max)
    if (below_max - below_min).max() > 1:  # pragma: no cover - the codebooks' gaps are wider
        raise AssertionError("two midpoints share a 16-bit prefix; the lookup cannot resolve them")
    split = below_max > below_min
    threshold = np.where(split, mids[np.minimum(below_min, 14)], np.float32(np.inf)).astype(np.float32)
    entry = np.zeros((1 << 16, 8), dtype=np.uint8)
    entry[:, :4] = threshold.view(np.uint8).reshape(-1, 4)  # little-endian float32
    entry[:, 4] = order[below_min]  # the code when s <= threshold
    entry[:, 5] = order[below_max]  # the code when s > threshold
    return torch.from_numpy(entry.view(np.int64).reshape(-1).copy()).to(device)


def encode_table(quant_type: str, device="cpu") -> torch.Tensor:
    """Return the encoder's lookup table: 65536 int64 entries indexed by the upper 16 bits of ``s``.

    Returns
    -------
    Tensor, shape (65536,), int64
        Entry ``k`` holds, as 8 little-endian bytes: a float32 ``threshold`` (bytes 0-3), the
        code ``lo`` (byte 4) and the code ``hi`` (byte 5).

    Notes
    -----
    Note: the encoder's lookup table. All float32 values sharing their upper 16 bits ``k`` form
    one interval (a bfloat16 truncation bucket). The codebooks' midpoints are farther apart than
    any such interval inside [-1, 1], so at most one midpoint ``m`` lies in it; then the oracle's
    code (step 4: the number of midpoints strictly below ``s``, mapped to its code) is
    ``hi if s > m else lo``; with no midpoint inside, ``threshold`` is +inf and the code is
    ``lo``. Buckets of +-inf give the end codes; NaN buckets are arbitrary (the caller fixes them).

    Examples
    --------
    >>> e = encode_table("nf4").view(torch.uint8).reshape(-1, 8)
    >>> one = torch.tensor([1.0]).view(torch.int32).item() >> 16
    >>> e[one, 4].item(), e[one, 5].item()
    (15, 15)
    """
    return _encode(_check(quant_type), str(torch.device(device)))


def pair_table(codebook: torch.Tensor) -> torch.Tensor:
    """Return the two float32 values of each packed byte, as one int64 per byte.

    Parameters
    ----------
    codebook : Tensor, shape (16,), any float dtype
        The codebook (``QuantState.codebook``), converted to float32.

    Returns
    -------
    Tensor, shape (256,), int64
        Entry ``b`` is the float32 pair ``(codebook[b >> 4], codebook[b & 15])`` reinterpreted as one
        int64, so that one 1-D gather decodes two elements; view the result as float32.

    Examples
    --------
    >>> pair_table(codebook("nf4")).view(torch.float32).reshape(256, 2)[0xF0].tolist()
    [1.0, -1.0]
    """
    c = codebook.to(torch.float32)
    byte = torch.arange(256, device=c.device)
    return torch.stack([c[byte >> 4], c[byte & 15]], dim=1).view(torch.int64).reshape(256)


@functools.lru_cache(maxsize=None)
def _dynamic(device: str):
    t = DYNAMIC_MAP.astype(np.float64)
    mids = (t[:-1] + t[1:]) / 2.0  # (255,) float64, exact
    return (torch.tensor(DYNAMIC_MAP, dtype=torch.float32, device=device),
            torch.tensor(mids, dtype=torch.float64, device=device))


def dynamic_map(device="cpu") -> torch.Tensor:
    """Return the signed 8-bit dynamic map (256 sorted float32 values) on ``device``.

    Examples
    --------
    >>> m = dynamic_map()
    >>> m.shape, m[127].item(), m[-1].item()
    (torch.Size([256]), 0.0, 1.0)
    """
    return _dynamic(str(torch.device(device)))[0]


def dynamic_midpoints(device="cpu") -> torch.Tensor:
    """Return the 255 float64 midpoints between neighbouring entries of the dynamic map.

    Examples
    --------
    >>> dynamic_midpoints().dtype
    torch.float64
    """
    return _dynamic(str(torch.device(device)))[1]
