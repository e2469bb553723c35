"""Golden vectors: a versioned, language-neutral statement of what the 4-bit formats compute.

A folder holds ``manifest.json`` and raw little-endian binary files, one per array, readable
from any language without Python (the format is documented in ``docs/conformance.md``). The
cases themselves are chosen in ``qlora_ref.conformance.vector_cases``; this module writes, reads and
verifies them, and defines ``qlora-ref vectors``. The shipped set lives in
``qlora_ref/conformance/vectors/`` and ``tests/test_vectors.py`` regenerates it byte for byte.

Note: golden-vector format (format_version 1)
    ``manifest.json`` (UTF-8, keys sorted, two-space indent) holds ``format_version``,
    ``byte_order`` (always ``"little"``), ``tables`` (the NF4 and FP4 codebooks and the signed
    dynamic map, as arrays) and ``cases``: a list of objects with ``name``, ``kind``
    (``quantize``, ``double_quant``, ``dequantize``, ``lora``, ``qlora``), ``description``,
    ``tags``, ``params`` and ``arrays``. Each array entry names its ``file`` (relative to the
    folder, ``<case>/<array>.bin``), ``dtype`` (``uint8``, ``int8``, ``float16``, ``bfloat16``,
    ``float32``, ``float64``), ``shape`` (row-major) and ``sha256`` of the file. A file holds
    exactly ``prod(shape) * itemsize`` bytes, no header.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import ml_dtypes
import numpy as np

from qlora_ref.codebooks import codebook
from qlora_ref.conformance.vector_cases import build_cases
from qlora_ref.double_quant import dynamic_map
from qlora_ref.state import NestedAbsmax, QuantState

__all__ = [
    "FORMAT_VERSION",
    "SHIPPED_DIR",
    "ARRAY_DTYPES",
    "write_vectors",
    "read_manifest",
    "load_array",
    "load_case",
    "case_state",
]

#: Version of the on-disk format; a reader refuses any other.
FORMAT_VERSION = 1
#: The golden vectors shipped with the package.
SHIPPED_DIR = Path(__file__).resolve().with_name("vectors")
#: dtypes a file may hold, by the name the manifest uses.
ARRAY_DTYPES = {
    "uint8": np.dtype(np.uint8),
    "int8": np.dtype(np.int8),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}


def _dtype_name(dtype) -> str:
    for name, known in ARRAY_DTYPES.items():
        if np.dtype(dtype) == known:
            return name
    raise TypeError(f"golden vectors cannot store dtype {dtype}")


def _write_array(root: Path, relative: str, a: np.ndarray) -> dict:
    a = np.asarray(a)
    name = _dtype_name(a.dtype)
    data = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"file": relative, "dtype": name, "shape": [int(d) for d in a.shape],
            "sha256": hashlib.sha256(data).hexdigest()}


def write_vectors(out_dir, cases=None) -> dict:
    """Generate the golden vectors into ``out_dir``; return the manifest.

    Parameters
    ----------
    out_dir : str or Path
        Created if missing. Existing files of the same names are overwritten; nothing else is
        deleted.
    cases : list of qlora_ref.conformance.vector_cases.Case, optional
        Default: ``build_cases()``, the shipped set.

    Returns
    -------
    dict
        The manifest written to ``out_dir/manifest.json`` (Note: golden-vector format).

    Examples
    --------
    >>> import tempfile
    >>> from qlora_ref.conformance.vector_cases import build_cases
    >>> cases = [c for c in build_cases() if c.name == "length3-nf4-float32"]
    >>> with tempfile.TemporaryDirectory() as d:
    ...     manifest = write_vectors(d, cases)
    ...     arrays = load_case(manifest["cases"][0], d)
    >>> manifest["format_version"], sorted(arrays)[:3]
    (1, ['absmax', 'absmax_dq', 'codes'])
    """

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    cases = build_cases() if cases is None else cases
    tables = {
        "nf4": _write_array(root, "tables/nf4.bin", codebook("nf4")),
        "fp4": _write_array(root, "tables/fp4.bin", codebook("fp4")),
        "dynamic_map": _write_array(root, "tables/dynamic_map.bin", dynamic_map()),
    }
    entries = []
    seen = set()
    for case in cases:
        if case.name in seen:
            raise ValueError(f"two cases are named {case.name!r}")
        seen.add(case.name)
        arrays = {k: _write_array(root, f"{case.name}/{k}.bin", a) for k, a in case.arrays.items()}
        entries.append({"name": case.name, "kind": case.kind, "description": case.description,
                        "tags": list(case.tags), "params": case.params, "arrays": arrays})
    manifest = {
        "format_version": FORMAT_VERSION,
        "byte_order": "little",
        "description": "qlora-ref golden vectors: bitsandbytes-compatible NF4/FP4 blockwise "
                       "quantization with double quantization, and LoRA/QLoRA forward and backward. "
                       "See docs/conformance.md.",
        "tables": tables,
        "cases": entries,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=True) + "\n"
    (root / "manifest.json").write_text(text, encoding="utf-8")
    return manifest


def read_manifest(root=None) -> dict:
    """Read and validate ``manifest.json`` of a golden-vector folder (default: the shipped one).

    Returns
    -------
    dict
        The manifest (Note: golden-vector format), with ``"root"`` added: the folder as a str.

    Raises
    ------
    FileNotFoundError
        If the folder has no manifest.
    ValueError
        If the manifest is not JSON, has another ``format_version`` or lacks a field.

    Examples
    --------
    >>> m = read_manifest()
    >>> m["format_version"], m["byte_order"], len(m["cases"]) > 50
    (1, 'little', True)
    """
    root = SHIPPED_DIR if root is None else Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no golden-vector manifest at {path}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a UTF-8 JSON manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ValueError(f"{path}: format_version {version!r}; this reader knows {FORMAT_VERSION}")
    for key in ("byte_order", "tables", "cases"):
        if key not in manifest:
            raise ValueError(f"{path}: the manifest lacks {key!r}")
    if manifest["byte_order"] != "little":
        raise ValueError(f"{path}: byte_order {manifest['byte_order']!r}; files are little-endian")
    manifest["root"] = str(root)
    return manifest


def load_array(root, entry: dict) -> np.ndarray:
    """Read one array file described by a manifest entry, checking its length and digest.

    Raises
    ------
    ValueError
        If the dtype is unknown, or the file's size or SHA-256 does not match the entry.

    Examples
    --------
    >>> m = read_manifest()
    >>> load_array(m["root"], m["tables"]["nf4"])[15]
    np.float32(1.0)
    """
    if entry.get("dtype") not in ARRAY_DTYPES:
        raise ValueError(f"{entry.get('file')}: unknown dtype {entry.get('dtype')!r}")
    dtype = ARRAY_DTYPES[entry["dtype"]]
    shape = tuple(int(d) for d in entry["shape"])
    data = (Path(root) / entry["file"]).read_bytes()
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{entry['file']}: {len(data)} bytes, but {entry['dtype']} {list(shape)} needs {expected}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{entry['file']}: SHA-256 does not match the manifest")
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


def load_case(case: dict, root=None) -> dict:
    """Read every array of one manifest case: ``{name: ndarray}``.

    Examples
    --------
    >>> m = read_manifest()
    >>> case = next(c for c in m["cases"] if c["name"] == "length3-nf4-float32")
    >>> load_case(case, m["root"])["codes"].shape
    (3,)
    """
    root = SHIPPED_DIR if root is None else root
    return {k: load_array(root, entry) for k, entry in case["arrays"].items()}


def case_state(case: dict, arrays: dict, *, double_quant: bool = False):
    """Rebuild the oracle's ``(packed, QuantState)`` of a ``quantize``/``dequantize``/``qlora`` case.

    Parameters
    ----------
    case : dict
        A manifest case.
    arrays : dict
        Its arrays (``load_case``).
    double_quant : bool
        Use the nested arrays (``nested_codes``, ``nested_absmax``, ``nested_offset``) instead of
        the float32 ``absmax``.

    Returns
    -------
    packed : ndarray, shape ((n + 1) // 2, 1), uint8
    state : QuantState

    Raises
    ------
    ValueError
        If the case has no such state (another kind, or no double-quantized arrays).

    Examples
    --------
    >>> m = read_manifest()
    >>> case = next(c for c in m["cases"] if c["name"] == "length3-nf4-float32")
    >>> packed, state = case_state(case, load_case(case, m["root"]), double_quant=True)
    >>> state.shape, state.double_quant
    ((3,), True)
    """

    p = case["params"]
    if case["kind"] not in ("quantize", "dequantize", "qlora"):
        raise ValueError(f"case {case['name']!r} of kind {case['kind']!r} has no 4-bit state")
    dtype = p["weight_dtype"] if case["kind"] == "qlora" else p["dtype"]
    common = dict(shape=tuple(p["shape"]), dtype=dtype, blocksize=p["blocksize"], quant_type=p["quant_type"],
                  code=codebook(p["quant_type"]))
    packed = arrays["packed"].reshape(-1, 1)
    if double_quant or "absmax" not in arrays:
        if "nested_codes" not in arrays:
            raise ValueError(f"case {case['name']!r} has no double-quantized arrays")
        nested = NestedAbsmax(scheme="bnb", codes=arrays["nested_codes"], absmax=arrays["nested_absmax"],
                              code=dynamic_map(), offset=np.float32(p["nested_offset"]["value"]),
                              blocksize=p["nested_blocksize"])
        return packed, QuantState(**common, nested=nested)
    return packed, QuantState(**common, absmax=arrays["absmax"])
