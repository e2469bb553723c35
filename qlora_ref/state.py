"""``QuantState``: everything a blockwise 4-bit tensor stores besides its packed codes.

Pairs with ``qlora_ref.blockwise`` (which makes states) and ``qlora_ref.formats.bnb`` (which writes
and reads them as bitsandbytes state-dict entries). Fast pair: ``qlora_gpu.QuantState``.

Note: sizes from the data
    A file's header says how large things are (shape, block size, nested block size); a reader
    believes it only after checking it against the format's allowed values and against the
    bytes present, with exact Python-int arithmetic (a shape product cannot wrap round in
    int64). Decoding allocates in proportion to its output, never an array sized by a header
    field. ``BlockLayout`` checks a state's fields when it is built, for the oracle's
    ``QuantState`` and ``qlora_gpu.QuantState`` alike (one rule, inherited).

Note: storage accounting
    ``nbytes`` counts every array a checkpoint stores for the tensor: the packed codes, the
    absmax constants (float32, or uint8 codes plus the nested float32 absmax when double
    quantized), the double-quantization offset, and the two code maps (16 and 256 float32
    values). The JSON metadata is not counted. For a large NF4 tensor with block 64 and double
    quantization, ``bits_per_parameter`` tends to ``4 + 8/64 + 32/(64*256) = 4.127``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

__all__ = [
    "QuantState",
    "NestedAbsmax",
    "BlockLayout",
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "NESTED_BLOCKSIZES",
    "INPUT_DTYPES",
    "QUANT_TYPES",
    "dtype_name",
    "numpy_dtype",
]

#: Block sizes bitsandbytes accepts; others are refused.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Absmax constants per nested block in bitsandbytes' double quantization (its ``blocksize=256``).
NESTED_BLOCKSIZE = 256
#: Nested block sizes a reader accepts from a file; a state built in memory may use any positive
#: size, and decoding allocates by the number of constants, never by this size (Note: sizes
#: from the data).
NESTED_BLOCKSIZES = BLOCKSIZES
#: Input and output dtypes, by name.
INPUT_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
#: 4-bit codebooks the oracle quantizes to ("int4" is the uniform one used for comparison).
QUANT_TYPES = ("nf4", "fp4", "int4")


def dtype_name(dtype) -> str:
    """Return ``"float32"``, ``"float16"`` or ``"bfloat16"`` for a supported dtype or its name.

    Raises
    ------
    TypeError
        If the dtype is not one of the three.

    Examples
    --------
    >>> dtype_name(np.float16), dtype_name("bfloat16")
    ('float16', 'bfloat16')
    """
    if isinstance(dtype, str) and dtype in INPUT_DTYPES:
        return dtype
    try:
        d = np.dtype(dtype)
    except TypeError:
        d = None
    for name, known in INPUT_DTYPES.items():
        if d == known:
            return name
    raise TypeError(f"unsupported dtype {dtype!r}; expected one of {sorted(INPUT_DTYPES)}")


def numpy_dtype(name) -> np.dtype:
    """Return the NumPy dtype for ``"float32"``, ``"float16"`` or ``"bfloat16"`` (ml_dtypes)."""
    return INPUT_DTYPES[dtype_name(name)]


@dataclass(frozen=True, eq=False)
class NestedAbsmax:
    """The double-quantized form of the absmax constants.

    Attributes
    ----------
    scheme : {"bnb", "torchao"}
        ``"bnb"``: ``absmax - offset`` quantized blockwise to 8 bits with the signed dynamic map.
        ``"torchao"``: torchao's int8 linear scheme (see ``qlora_ref.torchao_nf4``).
    codes : ndarray, shape (n_blocks,)
        uint8 codes (bnb) or int8 codes (torchao), one per first-level block.
    absmax : ndarray, shape (ceil(n_blocks / blocksize),)
        bnb: float32 absmax of each nested block. torchao: the per-block factor, in the
        input dtype.
    codebook : ndarray or None
        bnb: the 256-entry float32 map the codes index (``dynamic_map()``). torchao: None.
    offset : numpy scalar
        bnb: the float32 mean subtracted before quantizing. torchao: the mean, in the input dtype.
    blocksize : int
        Constants per nested block (256 in both schemes).
    """

    scheme: str
    codes: np.ndarray
    absmax: np.ndarray
    codebook: np.ndarray | None
    offset: np.generic
    blocksize: int = 256

    @property
    def nbytes(self) -> int:
        """Bytes of every stored array of the nested level (codes, absmax, map, offset)."""
        n = self.codes.nbytes + self.absmax.nbytes + np.asarray(self.offset).nbytes
        return n + (self.codebook.nbytes if self.codebook is not None else 0)


class BlockLayout:
    """What follows from a 4-bit tensor's shape and block size; shared by both ``QuantState`` types.

    A mixin for a dataclass with ``shape``, ``blocksize``, ``absmax``, ``nested`` and an
    ``nbytes`` property: the oracle's ``QuantState`` (NumPy) and ``qlora_gpu.QuantState``
    (torch) inherit it, so the block arithmetic is written once.
    """

    def __post_init__(self):
        if (self.absmax is None) == (self.nested is None):
            raise ValueError("a QuantState holds exactly one of absmax and nested")
        # Note: sizes from the data. Fields are normalised to Python ints (frozen dataclasses).
        shape = self.shape
        if not isinstance(shape, (tuple, list)) or not all(
                isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)) for d in shape):
            raise TypeError(f"shape {shape!r} must be a tuple of ints")
        if not shape or any(d < 1 for d in shape):
            raise ValueError(f"shape {tuple(shape)!r} must hold at least one size, each >= 1")
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))
        bs = self.blocksize
        if isinstance(bs, (bool, np.bool_)) or not isinstance(bs, (int, np.integer)):
            raise TypeError(f"blocksize must be an int, got {type(bs).__name__}")
        if int(bs) not in BLOCKSIZES:
            raise ValueError(f"blocksize {bs} is not allowed; use one of {BLOCKSIZES}")
        object.__setattr__(self, "blocksize", int(bs))
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"unknown quant_type {self.quant_type!r}; expected one of {QUANT_TYPES}")
        if self.nested is not None:
            nbs = self.nested.blocksize
            if isinstance(nbs, (bool, np.bool_)) or not isinstance(nbs, (int, np.integer)) or nbs <= 0:
                raise ValueError(f"nested blocksize {nbs!r} must be a positive int")

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor (an exact Python int)."""
        return math.prod([int(d) for d in self.shape])  # a list, not a generator: torch.compile traces it

    @property
    def n_blocks(self) -> int:
        """Number of first-level blocks, the last one possibly partial."""
        return -(-self.numel // self.blocksize)

    @property
    def double_quant(self) -> bool:
        """Whether the absmax constants are double quantized."""
        return self.nested is not None

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the packed codes: two codes per byte, an odd count padded."""
        return (self.numel + 1) // 2

    @property
    def bits_per_parameter(self) -> float:
        """``8 * nbytes / numel``: stored bits per element, constants included."""
        return 8.0 * self.nbytes / self.numel


@dataclass(frozen=True, eq=False)
class QuantState(BlockLayout):
    """The constants and metadata of a blockwise 4-bit tensor.

    Attributes
    ----------
    shape : tuple of int
        Shape of the original tensor.
    dtype : {"float32", "float16", "bfloat16"}
        dtype of the original tensor; the default output dtype of ``dequantize_4bit``.
    blocksize : int
        Elements per block of the flattened tensor, one of ``BLOCKSIZES``.
    quant_type : {"nf4", "fp4", "int4"}
    codebook : ndarray, shape (16,)
        The codebook the codes index (float32; the torchao scheme keeps its own rounded table in
        the input dtype).
    absmax : ndarray or None, shape (n_blocks,), float32
        Per-block absmax; None when double quantized.
    nested : NestedAbsmax or None
        The double-quantized absmax; None without double quantization.
    """

    shape: tuple
    dtype: str
    blocksize: int
    quant_type: str
    codebook: np.ndarray
    absmax: np.ndarray | None = None
    nested: NestedAbsmax | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored for the tensor (see Note: storage accounting)."""
        constants = self.absmax.nbytes if self.absmax is not None else self.nested.nbytes
        return self.packed_nbytes + constants + self.codebook.nbytes
