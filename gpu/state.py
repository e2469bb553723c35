"""``QuantState`` on torch tensors: the constants and metadata of a blockwise 4-bit tensor.

Mirror of ``qlora_ref.state`` (``QuantState``, ``NestedAbsmax``) with torch tensors in place of
NumPy arrays, so that a state lives on the device of its packed weights and moves with them
(``state.to(device)``). ``QuantState.from_oracle`` and ``QuantState.to_oracle`` convert to and
from the oracle's state (exactly: the arrays keep their bits), which is how the tests and the
providers compare the two.

Public API
----------
``QuantState``, ``NestedAbsmax``
    Dataclasses; fields as in the oracle, with ``dtype`` a ``torch.dtype`` and every array a
    tensor. ``numel``, ``n_blocks``, ``double_quant``, ``packed_nbytes`` and
    ``bits_per_parameter`` come from the oracle's ``BlockLayout`` (written once for both);
    ``nbytes``; ``to(device)``; ``from_oracle``; ``to_oracle``.
``tensor_from_numpy(a, device=None)``, ``tensor_to_numpy(t)``
    Exact conversions that also handle ``ml_dtypes.bfloat16`` arrays.
``torch_dtype(name_or_dtype)``, ``dtype_name(dtype)``
    ``"bfloat16"`` <-> ``torch.bfloat16`` and friends.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import torch

from qlora_ref.state import BLOCKSIZES, NESTED_BLOCKSIZES, QUANT_TYPES, BlockLayout
from qlora_ref.state import NestedAbsmax as RefNested
from qlora_ref.state import QuantState as RefState

__all__ = [
    "QuantState",
    "NestedAbsmax",
    "BLOCKSIZES",
    "NESTED_BLOCKSIZES",
    "QUANT_TYPES",
    "DTYPES",
    "torch_dtype",
    "dtype_name",
    "tensor_from_numpy",
    "tensor_to_numpy",
]

#: Input dtypes of quantization and output dtypes of decoding, by name.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(dtype) -> torch.dtype:
    """Return the torch dtype for ``"float32"``, ``"float16"``, ``"bfloat16"`` or a torch dtype.

    ``torch.float64`` is accepted too (decoding to it is exact; ``gradcheck`` needs it).

    Raises
    ------
    TypeError
        If the dtype is not one of these.

    Examples
    --------
    >>> torch_dtype("bfloat16"), torch_dtype(torch.float16)
    (torch.bfloat16, torch.float16)
    """
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and (dtype in DTYPES.values() or dtype == torch.float64):
        return dtype
    raise TypeError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)} or torch.float64")


def dtype_name(dtype: torch.dtype) -> str:
    """Return ``"float32"``, ``"float16"`` or ``"bfloat16"`` for a torch dtype.

    Examples
    --------
    >>> dtype_name(torch.bfloat16)
    'bfloat16'
    """
    for name, known in DTYPES.items():
        if dtype == known:
            return name
    raise TypeError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")


def tensor_from_numpy(a: np.ndarray, device=None) -> torch.Tensor:
    """Convert a NumPy array to a tensor bit for bit (``ml_dtypes.bfloat16`` included).

    Examples
    --------
    >>> import ml_dtypes
    >>> tensor_from_numpy(np.array([1.5, -2], ml_dtypes.bfloat16))
    tensor([ 1.5000, -2.0000], dtype=torch.bfloat16)
    """
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":  # ml_dtypes: NumPy has no native bfloat16, torch has
        t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a.copy())
    return t if device is None else t.to(device)


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """Convert a tensor to a NumPy array bit for bit (bfloat16 becomes ``ml_dtypes.bfloat16``).

    Examples
    --------
    >>> tensor_to_numpy(torch.tensor([1.5], dtype=torch.bfloat16)).dtype
    dtype(bfloat16)
    """
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@dataclass(frozen=True, eq=False)
class NestedAbsmax:
    """The double-quantized absmax (bitsandbytes' scheme), as tensors.

    Attributes
    ----------
    codes : Tensor, shape (n_blocks,), uint8
        One 8-bit code of the dynamic map per first-level block.
    absmax : Tensor, shape (ceil(n_blocks / blocksize),), float32
        Absmax of each nested block of ``absmax - offset``.
    codebook : Tensor, shape (256,), float32
        The dynamic map the codes index.
    offset : Tensor, shape (), float32
        The mean subtracted before quantizing (a 0-d tensor, so it stays on the device).
    blocksize : int
        Constants per nested block (256).
    scheme : str
        Always ``"bnb"`` here (the torchao scheme is not implemented by the fast path).
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    codebook: torch.Tensor
    offset: torch.Tensor
    blocksize: int = 256
    scheme: str = "bnb"

    @property
    def nbytes(self) -> int:
        """Bytes of the codes, nested absmax, map and offset (as the oracle counts them)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax, self.codebook, self.offset))

    def to(self, device) -> "NestedAbsmax":
        """Return a copy whose tensors live on ``device``."""
        return replace(self, codes=self.codes.to(device), absmax=self.absmax.to(device),
                       codebook=self.codebook.to(device), offset=self.offset.to(device))


@dataclass(frozen=True, eq=False)
class QuantState(BlockLayout):
    """Constants and metadata of a blockwise 4-bit tensor; the torch mirror of the oracle's.

    Attributes
    ----------
    shape : tuple of int
        Shape of the original tensor.
    dtype : torch.dtype
        dtype of the original tensor (float32, float16 or bfloat16); the default output dtype.
    blocksize : int
        Elements per block of the flattened tensor.
    quant_type : {"nf4", "fp4", "int4"}
    codebook : Tensor, shape (16,), float32
        The codebook the codes index.
    absmax : Tensor or None, shape (n_blocks,), float32
        Per-block absmax; None when double quantized.
    nested : NestedAbsmax or None
        The double-quantized absmax; None without double quantization.

    Examples
    --------
    >>> from qlora_gpu import quantize_4bit
    >>> _, state = quantize_4bit(torch.ones(4, 64), double_quant=True)
    >>> state.n_blocks, state.double_quant, state.to_oracle().nested.codes.tolist()
    (4, True, [127, 127, 127, 127])
    """

    shape: tuple
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    codebook: torch.Tensor
    absmax: torch.Tensor | None = None
    nested: NestedAbsmax | None = None

    @property
    def device(self) -> torch.device:
        """Device of the state's tensors."""
        return self.codebook.device

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored for the tensor (see the oracle's Note: storage accounting)."""
        constants = self.absmax.numel() * 4 if self.absmax is not None else self.nested.nbytes
        return self.packed_nbytes + constants + self.codebook.numel() * 4

    def to(self, device) -> "QuantState":
        """Return a copy whose tensors live on ``device``."""
        return replace(
            self,
            codebook=self.codebook.to(device),
            absmax=None if self.absmax is None else self.absmax.to(device),
            nested=None if self.nested is None else self.nested.to(device),
        )

    @classmethod
    def from_oracle(cls, state, device=None) -> "QuantState":
        """Build a torch state from a ``qlora_ref.QuantState``, keeping every bit.

        Raises
        ------
        ValueError
            If the oracle state uses the torchao double-quantization scheme.
        """
        nested = None
        if state.nested is not None:
            if state.nested.scheme != "bnb":
                raise ValueError(f"qlora_gpu implements the 'bnb' double quantization, not {state.nested.scheme!r}")
            n = state.nested
            nested = NestedAbsmax(
                codes=tensor_from_numpy(np.asarray(n.codes, np.uint8), device),
                absmax=tensor_from_numpy(np.asarray(n.absmax, np.float32), device),
                codebook=tensor_from_numpy(np.asarray(n.codebook, np.float32), device),
                offset=torch.tensor(np.float32(n.offset), dtype=torch.float32, device=device),
                blocksize=int(n.blocksize),
            )
        return cls(
            shape=tuple(int(d) for d in state.shape),
            dtype=DTYPES[state.dtype],
            blocksize=int(state.blocksize),
            quant_type=state.quant_type,
            codebook=tensor_from_numpy(np.asarray(state.codebook, np.float32), device),
            absmax=None if state.absmax is None else tensor_from_numpy(np.asarray(state.absmax, np.float32), device),
            nested=nested,
        )

    def to_oracle(self):
        """Return the equivalent ``qlora_ref.QuantState`` (NumPy arrays on the host)."""
        nested = None
        if self.nested is not None:
            n = self.nested
            nested = RefNested(
                scheme="bnb", codes=tensor_to_numpy(n.codes), absmax=tensor_to_numpy(n.absmax),
                codebook=tensor_to_numpy(n.codebook), offset=np.float32(tensor_to_numpy(n.offset)),
                blocksize=n.blocksize,
            )
        return RefState(
            shape=tuple(self.shape), dtype=dtype_name(self.dtype), blocksize=self.blocksize,
            quant_type=self.quant_type, codebook=tensor_to_numpy(self.codebook),
            absmax=None if self.absmax is None else tensor_to_numpy(self.absmax), nested=nested,
        )
