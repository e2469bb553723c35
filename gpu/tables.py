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
           "dynamic_midpoints", "DYNAMIC_ZERO_CODE"]

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
