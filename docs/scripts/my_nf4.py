"""A small NF4 implementation as someone might write it, for the worked example of
docs/conformance.md: plain NumPy, the user protocol of ``qlora-ref check``.

It follows the format except in one place: it scales by a float32 DIVISION ``x / absmax``
where bitsandbytes multiplies by the float32 reciprocal. ``qlora-ref check`` shows where that
matters.
"""

import ml_dtypes
import numpy as np

# The normative NF4 table as float32 bit patterns (docs/spec.md, section 1.1).
NF4 = np.array([0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
                0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000],
               dtype=np.uint32).view(np.float32)
MIDPOINTS = (NF4[:-1] + NF4[1:]) / np.float32(2)


def quantize(x, blocksize):
    """NF4 only (no quant_type parameter): returns (packed uint8, absmax float32)."""
    x = np.asarray(x).astype(np.float32).reshape(-1)
    n = x.size
    padded = np.zeros(-(-n // blocksize) * blocksize, np.float32)
    padded[:n] = x
    blocks = padded.reshape(-1, blocksize)  # (n_blocks, blocksize)
    absmax = np.abs(blocks).max(axis=1)  # (n_blocks,) float32
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = (blocks / absmax[:, None]).reshape(-1)[:n]  # division: the one deviation
    codes = np.searchsorted(MIDPOINTS, scaled, side="left").astype(np.uint8)
    codes[x == 0] = 7  # zero is the code of 0.0
    if n % 2:
        codes = np.append(codes, np.uint8(7))
    return (codes[0::2] << 4) | codes[1::2], absmax


def dequantize(packed, absmax, shape, blocksize, dtype):
    """Decode: float32 product, rounded to the output dtype."""
    n = int(np.prod(shape))
    codes = np.empty(packed.size * 2, np.uint8)
    codes[0::2], codes[1::2] = packed >> 4, packed & 0x0F
    y = NF4[codes[:n]] * np.repeat(absmax, blocksize)[:n]  # float32
    out = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    return y.astype(out).reshape(shape)


def quantize_low_first(x, blocksize):
    """The same, with a classic packing bug: the first element of each pair in the LOW nibble."""
    packed, absmax = quantize(x, blocksize)
    return (packed >> 4) | ((packed & 0x0F) << 4), absmax
