"""Check implementations against the oracle, and name every difference (``qlora-ref check``).

Runs each implementation (``qlora_ref.conformance.implementations``: the registered providers and user code
given as ``module:function``) on the shipped golden vectors (``qlora_ref.conformance.vectors``) and on fresh
random inputs, compares what it produces with the oracle's results (``qlora_ref.conformance.compare``,
Note: what check compares), and prints one table: per implementation and group of cases, the
values compared, those bit-identical, the differences in each named class
(``qlora_ref.conformance.classify``) and the unexplained ones.

Decoded values are explained by whole decoder models (``qlora_ref.conformance.variants``): an
implementation passes only when ONE model reproduces every tensor it decoded; the table's notes
name that model per implementation, and the report states the machine (the CPU features that
decide the comparators' paths, the paths each took, the versions).

Exit status: 1 when any difference is unexplained or no single decoder model explains an
implementation (with ``--strict``: any difference at all), 2 on a usage error, 0 otherwise.
"""

from __future__ import annotations

import platform
import warnings

import numpy as np

from qlora_ref.api import dequantize_4bit
from qlora_ref.blockwise import pack_4bit
from qlora_ref.codebooks import codebook
from qlora_ref.conformance.compare import (
    Row,
    check_dequantize,
    check_lora,
    check_quantize,
    check_torchao,
)
from qlora_ref.conformance.variants import DECODE_MODELS, ENCODE_MODELS
from qlora_ref.conformance.vector_cases import quantize_case
from qlora_ref.conformance.vectors import load_case, read_manifest
from qlora_ref.state import BLOCKSIZES, QuantState, numpy_dtype
from qlora_ref.text_table import format_table

__all__ = ["SHAPE_KINDS", "Row", "check_implementations", "format_report", "random_inputs", "machine_info", "count_inconsistent",
           "decode_models"]

#: CPU features that decide which paths the comparators take (``/proc/cpuinfo`` flag names).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def machine_info(impls=()) -> dict:
    """The machine and the implementations' own account of their paths and versions.

    Returns
    -------
    dict
        ``machine`` (``platform.machine()``), ``python``, ``numpy``, ``cpu features`` (each of
        ``CPU_FEATURES``: True or False; empty when ``/proc/cpuinfo`` cannot be read) and
        ``implementations``: ``describe()`` of each available implementation that has one.

    Examples
    --------
    >>> sorted(machine_info())
    ['cpu features', 'implementations', 'machine', 'numpy', 'python']
    """
    flags: set = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    described = {}
    for impl in impls:
        if impl.available and impl.describe is not None:
            try:
                described[impl.name] = impl.describe()
            except Exception as exc:  # a description must never stop the check
                described[impl.name] = {"error": f"{type(exc).__name__}: {exc}"}
    return {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
            "cpu features": {name: name in flags for name in CPU_FEATURES} if flags else {},
            "implementations": described}


def decode_models(rows, kind: str = "decode") -> dict:
    """Per implementation, the models that reproduce every tensor of one kind it produced.

    Parameters
    ----------
    rows : list of Row
    kind : {"decode", "encode"}
        Decoded values (``qlora_ref.conformance.variants.DECODE_MODELS``), or codes and absmax
        (``ENCODE_MODELS``).

    Returns
    -------
    dict
        ``{implementation: list of model names, the oracle first}`` for implementations that
        produced such tensors; an empty list means no single model explains all of them.
    """
    found: dict = {}
    for r in rows:
        models = getattr(r, f"{kind}_models")
        if models is not None:
            found[r.impl] = models if r.impl not in found else found[r.impl] & models
    order = list(DECODE_MODELS if kind == "decode" else ENCODE_MODELS)
    return {impl: sorted(models, key=order.index) for impl, models in found.items()}


def count_inconsistent(rows) -> int:
    """How many implementations (times kinds) no single model explains; each counts as unexplained."""
    return sum(1 for kind in ("encode", "decode") for m in decode_models(rows, kind).values() if not m)


def _group(case) -> str:
    p = case["params"]
    if case["kind"] in ("lora", "qlora"):
        return "vectors lora"
    return f"vectors {p['quant_type']}"


def _run_case(impl, case, arrays, row: Row) -> None:
    """One case under one implementation; an exception is a failure unless NotImplementedError."""
    name = case["name"]
    n = int(np.prod(case["params"].get("shape", [0]))) or int(arrays[next(iter(arrays))].size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                if case["kind"] == "quantize" and impl.quantize is not None:
                    check_quantize(impl, arrays["input"], case["params"], arrays, row, name)
                if case["kind"] in ("quantize", "dequantize") and impl.dequantize is not None:
                    check_dequantize(impl, case, arrays, row, name)
                if case["kind"] in ("lora", "qlora"):
                    check_lora(impl, case, arrays, row, name)
        row.cases += 1
    except NotImplementedError:
        row.skipped += 1
    except Exception as exc:  # any crash on valid input counts against the implementation
        row.cases += 1
        row.fail(name, n, f"raised {type(exc).__name__}: {str(exc)[:200]}")


def _applies(impl, case) -> bool:
    p = case["params"]
    if case["kind"] in ("lora", "qlora"):
        return impl.lora_forward is not None or impl.lora_backward is not None
    if case["kind"] not in ("quantize", "dequantize"):
        return False
    qt, bs = p["quant_type"], p["blocksize"]
    encodes = impl.quantize is not None and case["kind"] == "quantize" and any(
        impl.supports(qt, dq, bs) for dq in (False, True))
    decode_support = impl.supports_decode or impl.supports
    decodes = impl.dequantize is not None and any(decode_support(qt, dq, bs) for dq in (False, True))
    return encodes or decodes


# ----------------------------------------------------------------------------- random inputs


#: The shapes of the random inputs, in turn (Note: inputs that reach every path): what each
#: reaches in bitsandbytes' CPU decode (``qlora_ref.conformance.variants``, Note: bitsandbytes CPU decode paths).
SHAPE_KINDS = (
    "1-D odd",                           # its torch fallback; a padded byte
    "2-D, last dim a multiple of 16",    # its AVX-512 loop where the CPU has one, blocks crossing rows
    "3-D, last dim even, not of 16",     # its native scalar loop
    "2-D, last dim odd",                 # its torch fallback, several rows
    "1-D, a multiple of 16",             # decoded as (1, n) by its native loop
    "2-D, rows of whole blocks",         # every path agrees on the absmax index
)


def _shape(rng, kind: str, n: int, blocksize: int) -> tuple:
    """A shape of about ``n`` elements of the given kind."""
    if kind == "1-D odd":
        return (n | 1,)
    if kind == "1-D, a multiple of 16":
        return (max(n // 16, 1) * 16,)
    if kind == "2-D, last dim a multiple of 16":
        last = 16 * int(rng.integers(1, 12))
        last += 16 if last % blocksize == 0 else 0  # never a multiple of the blocksize
        return (max(n // last, 3), last)
    if kind == "3-D, last dim even, not of 16":
        last = 2 * int(rng.integers(1, 40))
        last += 2 if last % 16 == 0 else 0
        return (2, max(n // (2 * last), 2), last)
    if kind == "2-D, last dim odd":
        last = 2 * int(rng.integers(1, 60)) + 1
        return (max(n // last, 2), last)
    return (max(n // (2 * blocksize), 2), 2 * blocksize)  # rows of whole blocks


def random_inputs(seed: int = 0, rounds: int = 1, max_elements: int = 40_000):
    """Yield ``(quant_type, blocksize, x)`` random hard inputs for both quant types and all dtypes.

    Note: inputs that reach every path
        Each block of an input is one of: normal data at a random scale, all zeros, exact
        codebook midpoints times a power-of-two absmax, subnormals, values around 1e-37 (a
        normal absmax whose products with the small codebook entries are float32 subnormals),
        a single outlier. The shapes take the kinds of ``SHAPE_KINDS`` in turn (1-D, 2-D and
        3-D; even and odd last dimensions; multiples of 16 and of the blocksize or not), and the
        blocksizes run over all eight, 32 to 4096.

    Examples
    --------
    >>> [(q, x.dtype.name, x.ndim) for q, b, x in random_inputs(rounds=1)][:3]
    [('nf4', 'float32', 1), ('nf4', 'float16', 2), ('nf4', 'bfloat16', 3)]
    """
    rng = np.random.default_rng(seed)
    i = 0
    for _ in range(rounds):
        for quant_type in ("nf4", "fp4"):
            for dtype in ("float32", "float16", "bfloat16"):
                blocksize = int(rng.choice(BLOCKSIZES))
                n = int(rng.integers(min(blocksize * 3, max_elements // 2), max_elements))
                shape = _shape(rng, SHAPE_KINDS[i % len(SHAPE_KINDS)], n, blocksize)
                i += 1
                size = int(np.prod(shape))
                x = _hard_blocks(rng, size, blocksize, quant_type).astype(numpy_dtype(dtype))
                yield quant_type, blocksize, x.reshape(shape)


def _hard_blocks(rng, n: int, blocksize: int, quant_type: str) -> np.ndarray:

    table = np.sort(codebook(quant_type))
    midpoints = (table[:-1] + table[1:]) / np.float32(2)
    x = np.empty(n, dtype=np.float64)
    for start in range(0, n, blocksize):
        m = min(blocksize, n - start)
        kind = rng.choice(["normal", "normal", "normal", "zeros", "midpoints", "subnormal", "tiny", "outlier"])
        if kind == "normal":
            block = rng.standard_normal(m) * 2.0 ** rng.uniform(-8, 8)
        elif kind == "zeros":
            block = np.zeros(m)
        elif kind == "midpoints":
            absmax = 2.0 ** int(rng.integers(-6, 6))
            block = rng.choice(midpoints, m).astype(np.float64) * absmax
            block[rng.integers(m)] = absmax
        elif kind == "subnormal":
            block = rng.integers(-100, 100, m) * 1.4e-45
        elif kind == "tiny":  # normal absmax, subnormal products
            block = rng.standard_normal(m) * 1e-37
        else:
            block = rng.standard_normal(m) * 0.01
            block[rng.integers(m)] = 50.0
        x[start:start + m] = block
    return x.astype(np.float32)


def _random_cases(seed: int, rounds: int):
    """Random inputs as manifest-like cases, with the oracle's results as the expected arrays."""
    for i, (quant_type, blocksize, x) in enumerate(random_inputs(seed, rounds)):
        c = quantize_case(f"random-{i}-{quant_type}-b{blocksize}-{x.dtype.name}", x, blocksize=blocksize,
                          quant_type=quant_type, description="", tags=[])
        yield {"name": c.name, "kind": "quantize", "params": c.params}, c.arrays


def _random_decode_cases(seed: int):
    """Decode-only cases: uniform random codes under absmax with random mantissas.

    Rounding a float32 product into float16 or bfloat16 is a double rounding for a decoder that
    skips the float32 step; it shows in about 1 value in 2^13 of such data, so each case holds
    2^16 values. Shapes: a last dimension that is a multiple of 16 (with blocks crossing rows)
    and an odd one.
    """

    rng = np.random.default_rng(seed + 2)
    for quant_type in ("nf4", "fp4"):
        for dtype, shape in (("float16", (1024, 64)), ("bfloat16", (655, 101)), ("float32", (2048, 32))):
            blocksize = int(rng.choice([32, 128, 256]))
            n = int(np.prod(shape))
            codes = rng.integers(0, 16, n).astype(np.uint8)
            absmax = (2.0 ** rng.uniform(-8, 8, -(-n // blocksize))).astype(np.float32)
            packed = pack_4bit(codes, quant_type)
            state = QuantState(shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type,
                               codebook=codebook(quant_type), absmax=absmax)
            params = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
            arrays = {"codes": codes, "packed": packed.reshape(-1), "absmax": absmax,
                      "decoded": dequantize_4bit(packed, state)}
            yield {"name": f"random-decode-{quant_type}-b{blocksize}-{dtype}", "kind": "dequantize",
                   "params": params}, arrays
    # float16 midpoints hit exactly by the float32 product but not by the exact one: a decoder
    # that rounds the exact (float64) product straight to float16 differs in every such block.
    shape, blocksize = (64, 64), 64
    codes = np.repeat(rng.integers(9, 16, shape[0]), blocksize).astype(np.uint8)  # positive NF4 entries
    table = codebook("nf4")
    absmax = np.ones(shape[0], np.float32)
    for b in range(shape[0]):
        t = table[codes[b * blocksize]]
        h = np.float16(rng.uniform(0.5, 1000))
        midpoint = (float(h) + float(np.nextafter(h, np.float16(np.inf)))) / 2
        a = np.float32(midpoint / float(t))
        for step in range(64):  # the float32 neighbours of the quotient, outward
            a_try = a
            for _ in range(step // 2):
                a_try = np.nextafter(a_try, np.float32(np.inf if step % 2 else -np.inf))
            if float(t * a_try) == midpoint and float(t) * float(a_try) != midpoint:
                absmax[b] = a_try
                break
    state = QuantState(shape=shape, dtype="float16", blocksize=blocksize, quant_type="nf4", codebook=table,
                       absmax=absmax)
    packed = pack_4bit(codes, "nf4")
    yield {"name": "random-decode-float16-midpoints", "kind": "dequantize",
           "params": {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float16", "shape": list(shape)}}, \
        {"codes": codes, "packed": packed.reshape(-1), "absmax": absmax, "decoded": dequantize_4bit(packed, state)}


def _torchao_inputs(seed: int):
    rng = np.random.default_rng(seed + 1)
    for dtype in ("bfloat16", "float32"):
        x = rng.standard_normal((64, 512)) * 0.02
        x[rng.integers(0, 64, 3)] = 0.0  # a few all-zero rows: all-zero blocks
        yield x.astype(numpy_dtype(dtype))


# ----------------------------------------------------------------------------- the run


def check_implementations(impls, *, vectors_root=None, use_vectors: bool = True, seed: int = 0, rounds: int = 1,
                          per_case: bool = False) -> list:
    """Check implementations on the golden vectors and on random inputs.

    Parameters
    ----------
    impls : list of qlora_ref.conformance.implementations.Implementation
        Unavailable ones are skipped (their reason is reported by ``format_report``).
    vectors_root : str or Path, optional
        A golden-vector folder; default the shipped set.
    use_vectors : bool
        Run the golden vectors.
    seed, rounds : int
        The random inputs: ``rounds`` inputs per quant type and dtype (0 for none).
    per_case : bool
        One row per case instead of one per group.

    Returns
    -------
    list of Row
        One per implementation and group (or case), in run order.

    Examples
    --------
    >>> from qlora_ref.conformance.implementations import resolve
    >>> rows = check_implementations([resolve("oracle")], rounds=0)
    >>> sum(r.unexplained for r in rows), sum(sum(r.classes.values()) for r in rows), rows[0].compared > 0
    (0, 0, True)
    """
    rows: dict = {}

    def row_for(impl, group):
        key = (impl.name, group)
        if key not in rows:
            rows[key] = Row(impl.name, group)
        return rows[key]

    manifest = read_manifest(vectors_root) if use_vectors else {"cases": [], "root": None}
    vector_cases = [c for c in manifest["cases"] if c["kind"] in ("quantize", "dequantize", "lora", "qlora")]
    loaded = {}
    for impl in impls:
        if not impl.available:
            continue
        for case in vector_cases:
            if not _applies(impl, case):
                if case["kind"] == "quantize" and (impl.quantize or impl.dequantize) or \
                        case["kind"] == "dequantize" and impl.dequantize:
                    row_for(impl, case["name"] if per_case else _group(case)).skipped += 1  # counted
                continue
            if case["name"] not in loaded:
                loaded[case["name"]] = load_case(case, manifest["root"])
            _run_case(impl, case, loaded[case["name"]], row_for(impl, case["name"] if per_case else _group(case)))
    with np.errstate(all="ignore"):  # subnormal blocks overflow the reciprocal, by design
        random_cases = list(_random_cases(seed, rounds)) + list(_random_decode_cases(seed)) if rounds else []
    for impl in impls:
        if not impl.available:
            continue
        for case, arrays in random_cases:
            if not (impl.quantize or impl.dequantize):
                break
            p = case["params"]
            group = "random decode" if case["kind"] == "dequantize" else f"random {p['quant_type']}"
            row = row_for(impl, case["name"] if per_case else group)
            if _applies(impl, case):
                _run_case(impl, case, arrays, row)
            elif impl.quantize or impl.dequantize:
                row.skipped += 1
        if rounds and impl.quantize is not None and impl.supports("nf4", "torchao", 64):
            for i, x in enumerate(_torchao_inputs(seed)):
                name = f"random-torchao-{i}-{x.dtype.name}"
                row = row_for(impl, name if per_case else "random torchao scheme")
                try:
                    with warnings.catch_warnings(), np.errstate(all="ignore"):
                        warnings.simplefilter("ignore")
                        check_torchao(impl, x, row, name)
                    row.cases += 1
                except NotImplementedError:
                    row.skipped += 1
                except Exception as exc:
                    row.cases += 1
                    row.fail(name, x.size, f"raised {type(exc).__name__}: {str(exc)[:200]}")
    order = {impl.name: i for i, impl in enumerate(impls)}
    return sorted(rows.values(), key=lambda r: order[r.impl])  # stable: groups keep their run order


def format_report(rows, impls, *, elapsed_s: float | None = None, machine: dict | None = None) -> str:
    """Format the rows as one table, then the unavailable implementations, the notes, the machine."""
    class_names = sorted({name for r in rows for name in r.classes})
    headers = ["implementation", "cases", "compared", "exact"] + class_names + ["unexplained"]
    table_rows = []
    for r in rows:
        if not r.cases and not r.compared:  # everything skipped: listed below the table
            continue
        label = f"{r.impl}: {r.group}"
        table_rows.append([label, r.cases, r.compared, r.exact] + [r.classes.get(c, 0) for c in class_names]
                          + [r.unexplained])
    lines = [format_table(headers, table_rows, title="qlora-ref check: implementations against the oracle")]
    skipped = [r for r in rows if r.skipped]
    for r in skipped:
        lines.append(f"{r.impl}: {r.group}: {r.skipped} case(s) not supported, skipped")
    for impl in impls:
        if not impl.available:
            lines.append(f"{impl.name}: not checked ({impl.reason})")
    total = sum(r.unexplained for r in rows)
    explained = sum(sum(r.classes.values()) for r in rows)
    for r in rows:
        for note in r.notes:
            lines.append(f"  {r.impl}: {note}")
    diagnosed: dict = {}
    for r in rows:
        for d in r.diagnoses:
            found = diagnosed.setdefault(r.impl, [])
            if d not in found:
                found.append(d)
    for impl, found in diagnosed.items():
        for d in found:
            lines.append(f"{impl}: diagnosis: {d}")
    for kind, what in (("encode", "codes and absmax"), ("decode", "decoded values")):
        for impl, models in decode_models(rows, kind).items():
            if models:
                lines.append(f"{impl}: {what} reproduced by the model {models[0]!r}")
            else:
                total += 1
                lines.append(f"{impl}: no single model reproduces all its {what} (unexplained)")
    if machine is not None:
        features = machine["cpu features"]
        listed = " ".join(f"{k}" if v else f"no-{k}" for k, v in features.items()) or "unknown"
        lines.append(f"machine: {machine['machine']}, CPU features: {listed}; python {machine['python']}, "
                     f"numpy {machine['numpy']}")
        for impl, info in machine["implementations"].items():
            lines.append(f"  {impl}: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    summary = (f"{total} unexplained difference(s)" if total else "no unexplained differences") + \
              f"; {explained} explained by a named class"
    if elapsed_s is not None:
        summary += f" ({elapsed_s:.1f} s)"
    lines.append(summary)
    return "\n".join(lines)
