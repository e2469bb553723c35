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
    exactly ``prod(shape) * itemsize`` bytes, no header. The params and arrays each kind needs
    are ``REQUIRED``; the reader checks that the arrays' sizes agree with the params (``n``,
    ``shape``, ``n_blocks``, ``in_features``, ...) before a case is run.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from qlora_ref.codebooks import codebook
from qlora_ref.conformance.vector_cases import build_cases
from qlora_ref.double_quant import dynamic_map
from qlora_ref.formats.safe_io import confined_file, read_confined_bytes, read_json_file, write_bytes_atomic
from qlora_ref.state import BLOCKSIZES, INPUT_DTYPES, NESTED_BLOCKSIZES, QUANT_TYPES, NestedAbsmax, QuantState

__all__ = [
    "FORMAT_VERSION",
    "SHIPPED_DIR",
    "ARRAY_DTYPES",
    "write_vectors",
    "check_output_folder",
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
#: Case kinds, and the arrays a manifest may hold at most (all files together).
KINDS = ("quantize", "double_quant", "dequantize", "lora", "qlora")
MAX_TOTAL_BYTES = 1 << 30


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
    path.parent.mkdir(exist_ok=True)
    if path.parent.is_symlink():  # never write through a link out of the folder
        raise ValueError(f"{path.parent} is a symlink; refusing to write through it")
    write_bytes_atomic(path, data)
    return {"file": relative, "dtype": name, "shape": [int(d) for d in a.shape],
            "sha256": hashlib.sha256(data).hexdigest()}


def check_output_folder(out_dir, *, force: bool = False) -> Path:
    """Check that golden vectors may be written into ``out_dir``; return it as a Path.

    A folder that is missing or empty may be written; a non-empty one only when it already holds
    golden vectors (a regular ``manifest.json`` with our ``format_version``), or with ``force``.

    Raises
    ------
    ValueError
        If ``out_dir`` is empty, a symlink or a file, or a non-empty folder of something else.
    """
    if out_dir is None or str(out_dir) == "":
        raise ValueError("--out: the folder name is empty")
    root = Path(out_dir)
    if root.is_symlink():
        raise ValueError(f"--out: {root} is a symlink; refusing to write through it")
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out: {root} exists and is not a folder")
    if force or not root.exists() or not any(root.iterdir()):
        return root
    manifest = root / "manifest.json"
    ours = False
    if manifest.is_file() and not manifest.is_symlink():
        try:
            ours = read_json_file(manifest).get("format_version") == FORMAT_VERSION
        except (ValueError, AttributeError):
            ours = False
    if not ours:
        raise ValueError(f"--out: {root} is not empty and holds no golden vectors (manifest.json of "
                         f"format_version {FORMAT_VERSION}); choose an empty folder or pass --force")
    return root


def write_vectors(out_dir, cases=None, *, force: bool = False) -> dict:
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

    root = check_output_folder(out_dir, force=force)
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
    write_bytes_atomic(root / "manifest.json", text.encode("utf-8"))
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
        manifest = read_json_file(path)
    except ValueError as exc:
        raise ValueError(f"not a UTF-8 JSON manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ValueError(f"{path}: format_version {version!r}; this reader knows {FORMAT_VERSION}")
    for key in ("byte_order", "tables", "cases"):
        if key not in manifest:
            raise ValueError(f"{path}: the manifest lacks {key!r}")
    if manifest["byte_order"] != "little":
        raise ValueError(f"{path}: byte_order {manifest['byte_order']!r}; files are little-endian")
    _check_manifest(path, manifest)
    manifest["root"] = str(root)
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_entry(where: str, entry) -> int:
    """Validate one array entry's fields; return its size in bytes (exact, in Python ints)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an array entry must be an object")
    if not isinstance(entry.get("file"), str):
        raise ValueError(f"{where}: 'file' must be a string")
    if not isinstance(entry.get("dtype"), str) or entry["dtype"] not in ARRAY_DTYPES:
        raise ValueError(f"{where}: unknown dtype {entry.get('dtype')!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"{where}: shape {shape!r} must be a list of ints >= 0")
    if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
        raise ValueError(f"{where}: 'sha256' must be 64 lowercase hex digits")
    return math.prod(shape) * ARRAY_DTYPES[entry["dtype"]].itemsize


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


#: Rules for the params a reader of the vectors uses (other params are descriptive).
_PARAM_RULES = {
    "blocksize": (lambda v: v in BLOCKSIZES and not isinstance(v, bool), f"one of {BLOCKSIZES}"),
    "nested_blocksize": (lambda v: v in NESTED_BLOCKSIZES and not isinstance(v, bool), f"one of {NESTED_BLOCKSIZES}"),
    "quant_type": (lambda v: isinstance(v, str) and v in QUANT_TYPES, f"one of {QUANT_TYPES}"),
    "dtype": (lambda v: isinstance(v, str) and v in ARRAY_DTYPES, f"one of {sorted(ARRAY_DTYPES)}"),
    "weight_dtype": (lambda v: isinstance(v, str) and v in INPUT_DTYPES, f"one of {sorted(INPUT_DTYPES)}"),
    "compute_dtype": (lambda v: isinstance(v, str) and v in INPUT_DTYPES, f"one of {sorted(INPUT_DTYPES)}"),
    "shape": (lambda v: isinstance(v, list) and bool(v) and all(_positive(d) for d in v), "a list of ints >= 1"),
    "n": (_positive, "an int >= 1"), "n_blocks": (_positive, "an int >= 1"),
    "in_features": (_positive, "an int >= 1"), "out_features": (_positive, "an int >= 1"),
    "r": (_positive, "an int >= 1"),
    "alpha": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number"),
    "scaling": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number"),
    "dropout_p": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "in [0, 1)"),
    "double_quant": (lambda v: isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "budgets": (lambda v: isinstance(v, dict) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                      for x in v.values()), "an object of numbers"),
    "nested_offset": (lambda v: isinstance(v, dict) and isinstance(v.get("value"), (int, float))
                      and not isinstance(v.get("value"), bool) and math.isfinite(v["value"]), "{'value': number}"),
}


#: The params and arrays each case kind must hold (what ``qlora-ref check`` reads).
REQUIRED = {
    "quantize": (("blocksize", "double_quant", "dtype", "n_blocks", "quant_type", "shape"),
                 ("absmax", "codes", "decoded", "input", "packed")),
    "double_quant": (("n", "nested_blocksize", "nested_offset"),
                     ("absmax_dq", "input", "nested_absmax", "nested_codes")),
    "dequantize": (("blocksize", "dtype", "n_blocks", "quant_type", "shape"), ("absmax", "decoded", "packed")),
    "lora": (("alpha", "budgets", "dropout_p", "dtype", "in_features", "out_features", "r", "scaling", "use_rslora"),
             ("A", "B", "W", "grad_A", "grad_B", "grad_x", "grad_y", "x", "y")),
    "qlora": (("alpha", "blocksize", "budgets", "compute_dtype", "dropout_p", "dtype", "in_features", "n_blocks",
               "nested_blocksize", "nested_offset", "out_features", "quant_type", "r", "scaling", "shape",
               "use_rslora", "weight_dtype"),
              ("A", "B", "W_c", "grad_A", "grad_B", "grad_x", "grad_y", "nested_absmax", "nested_codes", "packed",
               "x", "y")),
}


def _size(entry: dict) -> int:
    return math.prod(entry["shape"])


def _check_sizes(where: str, kind: str, p: dict, arrays: dict) -> None:
    """The arrays' element counts agree with the params: sizes come from the data."""
    expected = {}
    if kind in ("quantize", "dequantize", "qlora"):
        n = math.prod(p["shape"])
        if -(-n // p["blocksize"]) != p["n_blocks"]:
            raise ValueError(f"{where}: n_blocks {p['n_blocks']} disagrees with shape {p['shape']} in blocks of "
                             f"{p['blocksize']}")
        expected.update(packed=(n + 1) // 2, input=n, decoded=n, codes=n, absmax=p["n_blocks"],
                        nested_codes=p["n_blocks"])
    if kind == "double_quant":
        expected.update(input=p["n"], absmax_dq=p["n"], nested_codes=p["n"])
    if kind in ("lora", "qlora"):
        r, n_in, n_out = p["r"], p["in_features"], p["out_features"]
        expected.update(A=r * n_in, B=n_out * r, W=n_out * n_in, W_c=n_out * n_in, grad_A=r * n_in, grad_B=n_out * r)
        if kind == "qlora" and list(p["shape"]) != [n_out, n_in]:
            raise ValueError(f"{where}: shape {p['shape']} is not [out_features, in_features]")
    for key, n in expected.items():
        if key in arrays and _size(arrays[key]) != n:
            raise ValueError(f"{where}: array {key!r} has {_size(arrays[key])} elements, the params need {n}")


def _check_manifest(path: Path, manifest: dict) -> None:
    """Validate the manifest's structure: every field a reader uses has the right type and range,
    every file name stays inside the folder, and the files hold at most ``MAX_TOTAL_BYTES``."""
    tables, cases = manifest["tables"], manifest["cases"]
    if not isinstance(tables, dict) or not isinstance(cases, list):
        raise ValueError(f"{path}: 'tables' must be an object and 'cases' a list")
    total = 0
    for name, entry in tables.items():
        total += _check_entry(f"{path}: table {name!r}", entry)
    names = set()
    for i, case in enumerate(cases):
        if not isinstance(case, dict):
            raise ValueError(f"{path}: case {i} is not an object")
        name = case.get("name")
        where = f"{path}: case {name!r}" if isinstance(name, str) else f"{path}: case {i}"
        if not isinstance(name, str) or name in names:
            raise ValueError(f"{where}: 'name' must be a unique string")
        names.add(name)
        if case.get("kind") not in KINDS:
            raise ValueError(f"{where}: 'kind' {case.get('kind')!r} is not one of {KINDS}")
        params, arrays = case.get("params"), case.get("arrays")
        if not isinstance(params, dict) or not isinstance(arrays, dict):
            raise ValueError(f"{where}: 'params' and 'arrays' must be objects")
        need_params, need_arrays = REQUIRED[case["kind"]]
        missing = [k for k in need_params if k not in params] + [k for k in need_arrays if k not in arrays]
        if missing:
            raise ValueError(f"{where}: a {case['kind']} case needs {missing}")
        for key, (ok, rule) in _PARAM_RULES.items():
            if key in params and not ok(params[key]):
                raise ValueError(f"{where}: params[{key!r}] = {params[key]!r} must be {rule}")
        for key, entry in arrays.items():
            total += _check_entry(f"{where}: array {key!r}", entry)
        _check_sizes(where, case["kind"], params, arrays)
    if total > MAX_TOTAL_BYTES:
        raise ValueError(f"{path}: the arrays would hold {total} bytes, more than the {MAX_TOTAL_BYTES} allowed")


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
    where = f"{Path(root) / 'manifest.json'}: {entry.get('file') if isinstance(entry, dict) else entry!r}"
    expected = _check_entry(where, entry)
    dtype = ARRAY_DTYPES[entry["dtype"]]
    shape = tuple(entry["shape"])
    # Inside the folder, a regular file, of the right size by stat before a byte is read.
    path, size = confined_file(root, entry["file"], what=f"{Path(root) / 'manifest.json'}: file")
    if size != expected:
        raise ValueError(f"{entry['file']}: {size} bytes, but {entry['dtype']} {list(shape)} needs {expected}")
    data = read_confined_bytes(root, entry["file"], expected_size=expected, what=where)
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
                  codebook=codebook(p["quant_type"]))
    packed = arrays["packed"].reshape(-1, 1)
    if double_quant or "absmax" not in arrays:
        if "nested_codes" not in arrays:
            raise ValueError(f"case {case['name']!r} has no double-quantized arrays")
        nested = NestedAbsmax(scheme="bnb", codes=arrays["nested_codes"], absmax=arrays["nested_absmax"],
                              codebook=dynamic_map(), offset=np.float32(p["nested_offset"]["value"]),
                              blocksize=p["nested_blocksize"])
        return packed, QuantState(**common, nested=nested)
    return packed, QuantState(**common, absmax=arrays["absmax"])
