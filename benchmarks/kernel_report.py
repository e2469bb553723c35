"""The Triton kernels compiled for GPUs that are not here: what their machine code will do.

    python -m benchmarks.kernel_report --all --out benchmarks/results/kernels.json

Every launch configuration the project's launch wrappers (``dequantize_4bit_triton``,
``quantize_4bit_triton``, ``double_quantize_triton``, ``matmul_4bit_triton``) choose is captured
from the wrapper itself, called on ``meta`` tensors of a real shape (the wrapper computes its
grid, constexprs and options as it would on a GPU; the kernel is not launched), then compiled
with Triton for sm_80 (A100) and sm_90 (H100/H200) and disassembled with the ``nvdisasm`` that
ships in the Triton wheel. Per configuration and architecture the report holds:

- ``registers``, ``stack_bytes`` and ``local_bytes`` (``cuobjdump -res-usage``),
  ``spill_instructions`` (``STL`` and ``LDL`` in the SASS): any spill fails the CI check;
- ``shared_bytes`` (Triton's metadata) against the per-block limit of the architecture;
- ``loop_instructions``: SASS instructions of one trip of the main loop (the largest backward
  branch; the whole kernel when it has no loop, every instruction counted once, predicated or
  not), and ``per_item``: that count divided by the elements (decode, quantize, double
  quantize) or weights (product) one thread handles per trip;
- ``loads``/``stores``: global loads and stores in the main loop by width in bytes;
- ``contractions``: floating-point multiply-adds the compiler made that the kernel did not
  write (Note: counting contractions);
- ``loop_dot_waits``: the tensor-core groups each ``wgmma`` wait in the main loop leaves in
  flight (sm_90; ``WARPGROUP.DEPBAR.LE gsb0, n``): all 0 means a program waits for its own
  products before decoding the next tile, so only another resident program can overlap them;
- ``programs_per_sm``: programs of the launch resident on one multiprocessor at once, from the
  registers, shared memory and warps (``programs_per_sm``).

Note: counting contractions
    The oracle rounds every float32 product and sum on its own. A kernel compiled with
    ``enable_fp_fusion=True`` lets LLVM and ``ptxas`` contract ``a * b + c`` into one ``fma``
    (one rounding), which the interpreter never shows. The report compiles each launch as
    launched and, when fusion is on, once more with it off: with fusion off every ``fma`` in
    the PTX is one the source wrote (``tl.fma``, a ``tl.dot`` on CUDA cores), so the
    difference of the two PTX ``fma`` counts (and of the SASS ``FFMA``/``DFMA`` counts) is the
    number of contractions the oracle does not define. With fusion off the count is 0 by
    construction, and the report also checks that no contractible PTX ``mul``/``add`` (one
    without a rounding modifier) is left for ``ptxas``.

Requires Triton's CUDA backend (the wheel carries ``ptxas``, ``nvdisasm``, ``cuobjdump``), no GPU.
It must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the kernels); the CI test
(``tests/test_kernel_report.py``) starts it in a subprocess. Triton caches compiled kernels
(``~/.triton/cache``), so a second run of the same configurations takes seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature  # a Triton internal (3.x): the launch binder

from qlora_gpu.kernels.dequantize import dequantize_4bit_triton
from qlora_gpu.kernels.matmul import CONFIGS, MatmulConfig, matmul_4bit_t_triton, matmul_4bit_triton
from qlora_gpu.kernels.quantize import double_quantize_triton, quantize_4bit_triton
from qlora_gpu.kernels.util import compiling_for
from qlora_gpu.state import BLOCKSIZES, NestedAbsmax, QuantState

__all__ = ["Case", "cases", "capture_launches", "compile_launch", "analyse", "run", "main", "ARCHS",
           "SHARED_PER_BLOCK", "KERNEL_FILES", "source_hash", "tool_path", "problems",
           "parse_sass", "main_loop", "Launch", "programs_per_sm", "SM_LIMITS"]

ROOT = Path(__file__).resolve().parents[1]
#: Compute capabilities compiled: 80 = A100, 90 = H100/H200.
ARCHS = (80, 90)
#: Most shared memory one block may use (bytes, with the opt-in attribute): CUDA C++ Programming
#: Guide, "Technical Specifications per Compute Capability": 163 KB on 8.0, 227 KB on 9.0.
SHARED_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
#: The files whose content decides the compiled code (the report records their hash).
KERNEL_FILES = ("gpu/kernels/util.py", "gpu/kernels/dequantize.py", "gpu/kernels/quantize.py", "gpu/kernels/matmul.py")
#: The kernels, by the module whose global name the wrappers launch.
KERNELS = {
    "dequantize_4bit_kernel": "qlora_gpu.kernels.dequantize",
    "quantize_4bit_kernel": "qlora_gpu.kernels.quantize",
    "double_quantize_kernel": "qlora_gpu.kernels.quantize",
    "matmul_4bit_kernel": "qlora_gpu.kernels.matmul",
    "splitk_reduce_kernel": "qlora_gpu.kernels.matmul",
    "matmul_4bit_t_kernel": "qlora_gpu.kernels.matmul",
}
#: The weight every case is shaped as (4096x14336: a Llama-3-8B MLP projection), NF4, block 64.
SHAPE = (4096, 14336)


def source_hash() -> str:
    """sha256 of the kernel files and the Triton version: a report is current when it matches."""

    h = hashlib.sha256(triton.__version__.encode())
    for name in KERNEL_FILES:
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the cases

@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a launch wrapper on meta tensors: ``kind`` is ``decode``, ``quantize``,
    ``double_quantize`` or ``matmul``; ``params`` its arguments; ``default`` marks the
    configuration CI checks (what the launchers choose for the common case)."""

    name: str
    kind: str
    params: tuple
    default: bool = False

    def call(self):
        """Call the wrapper (on meta tensors). Only the kernel launches matter."""
        p = dict(self.params)
        meta = torch.device("meta")
        N, K = p.get("shape", SHAPE)
        n = N * K
        blocksize = p.get("blocksize", 64)
        dtype = getattr(torch, p.get("dtype", "bfloat16"))
        if self.kind == "quantize":
            return quantize_4bit_triton(torch.empty((N, K), dtype=dtype, device=meta), blocksize, p.get("quant_type", "nf4"))
        if self.kind == "double_quantize":
            m = n // blocksize
            return double_quantize_triton(torch.empty(m, device=meta), torch.empty((), device=meta), 256)
        n_blocks = -(-n // blocksize)
        common = dict(shape=(N, K), dtype=torch.bfloat16, blocksize=blocksize, quant_type="nf4",
                      codebook=torch.empty(16, device=meta))
        if p.get("double_quant", True):
            nested = NestedAbsmax(codes=torch.empty(n_blocks, dtype=torch.uint8, device=meta),
                                  absmax=torch.empty(-(-n_blocks // 256), device=meta),
                                  codebook=torch.empty(256, device=meta), offset=torch.empty((), device=meta))
            state = QuantState(**common, nested=nested)
        else:
            state = QuantState(**common, absmax=torch.empty(n_blocks, device=meta))
        flat = torch.empty((n + 1) // 2, dtype=torch.uint8, device=meta)
        if self.kind == "decode":
            return dequantize_4bit_triton(flat, state, dtype)
        # matmul, splitk_reduce: the product's wrapper (which launches the reduction after a split)
        if self.kind == "matmul_t":  # the input gradient g W, g (M, N)
            return matmul_4bit_t_triton(torch.empty((p["rows"], N), dtype=dtype, device=meta), flat, state)
        x = torch.empty((p["rows"], K), dtype=dtype, device=meta)
        config = MatmulConfig(*p["config"]) if "config" in p else None
        return matmul_4bit_triton(x, flat, state, config=config)


def cases(full: bool = False) -> list:
    """The configurations to compile: the defaults (CI), or every one the launchers can choose.

    Examples
    --------
    >>> [c.name for c in cases()][:2]
    ['decode nf4 b64 dq -> bfloat16', 'quantize bfloat16 b64']
    """
    dflt = [
        Case("decode nf4 b64 dq -> bfloat16", "decode", (("dtype", "bfloat16"),), True),
        Case("quantize bfloat16 b64", "quantize", (("dtype", "bfloat16"),), True),
        Case("double_quantize 256", "double_quantize", (), True),
    ] + [Case(f"matmul M={m} bfloat16", "matmul", (("rows", m), ("dtype", "bfloat16")), True)
         for m in (1, 4, 16, 512, 2048)] + [
        Case("split-K reduce M=16 bfloat16", "splitk_reduce", (("rows", 16), ("dtype", "bfloat16")), True),
        Case("matmul_t M=512 bfloat16", "matmul_t", (("rows", 512), ("dtype", "bfloat16")), True)]
    if not full:
        return dflt

    more = []
    for dq in (True, False):
        for bs in BLOCKSIZES:
            for dt in ("bfloat16", "float16", "float32"):
                name = f"decode nf4 b{bs} {'dq' if dq else 'fp32-absmax'} -> {dt}"
                if name != dflt[0].name:
                    more.append(Case(name, "decode", (("blocksize", bs), ("double_quant", dq), ("dtype", dt))))
    for bs in BLOCKSIZES:
        for dt in ("bfloat16", "float16", "float32"):
            if (bs, dt) != (64, "bfloat16"):
                more.append(Case(f"quantize {dt} b{bs}", "quantize", (("blocksize", bs), ("dtype", dt))))
    for m in (2, 8, 64):  # more row counts (2048 and 512, training, are defaults)
        more.append(Case(f"matmul M={m} bfloat16", "matmul", (("rows", m), ("dtype", "bfloat16"))))
    for m in (16, 2048):
        more.append(Case(f"matmul_t M={m} bfloat16", "matmul_t", (("rows", m), ("dtype", "bfloat16"))))
    for kind in ("matmul", "matmul_t"):  # float32: CUDA-core dots on small tiles (F32_TILE)
        more.append(Case(f"{kind} M=2048 float32", kind, (("rows", 2048), ("dtype", "float32"))))
    for kind in ("matmul", "matmul_t"):  # offsets past 2^31: the 64-bit row offsets (WIDE)
        more.append(Case(f"{kind} M=262144 bfloat16", kind, (("rows", 262144), ("dtype", "bfloat16"))))
    for m in (1, 16):
        for dt in ("float16", "float32"):
            more.append(Case(f"matmul M={m} {dt}", "matmul", (("rows", m), ("dtype", dt))))
    for cfg in CONFIGS:  # CUDA cores take one row, tensor cores any other count (64-row tiles past 16)
        for m in (16, 2048) if cfg[3] else (1,):
            more.append(Case(f"matmul M={m} bfloat16 sweep {tuple(cfg)}", "matmul",
                             (("rows", m), ("dtype", "bfloat16"), ("config", tuple(cfg)))))
    return dflt + more


# ----------------------------------------------------------------------------- capture, compile

@dataclasses.dataclass
class Launch:
    """A kernel launch as a wrapper made it: the JIT function, grid, arguments, keywords."""

    kernel_name: str
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch(self.name, self.kernel, tuple(grid), args, kwargs))
        return record


def capture_launches(call) -> list:
    """Run ``call()`` with every kernel replaced by a recorder; return the launches it made.

    The wrappers look their kernel up as a module global at call time, so replacing the global
    captures exactly the grid, arguments and options they pass.
    """

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the kernel report compiles real kernels: run it without TRITON_INTERPRET=1")
    launches, saved = [], []
    try:
        for name, module_name in KERNELS.items():
            module = importlib.import_module(module_name)
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _Recorder(name, getattr(module, name), launches))
        call()
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)
    return launches


def compile_launch(launch: Launch, arch: int, enable_fp_fusion=None):
    """Compile a captured launch for ``sm_{arch}`` as ``JITFunction.run`` would; return the
    ``CompiledKernel`` (``asm`` holds ``ptx`` and ``cubin``).

    The specialization (pointer alignment, integers divisible by 16 or equal to 1) comes from
    the same binder Triton builds for a launch (``triton.runtime.jit``; its helpers are Triton
    internals of 3.x and may move in a later release).
    """

    kernel = launch.kernel
    kwargs = dict(launch.kwargs)
    if enable_fp_fusion is not None:
        kwargs["enable_fp_fusion"] = enable_fp_fusion
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


# ----------------------------------------------------------------------------- the SASS

_BIN = None
_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def tool_path(name: str) -> str:

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _run_tool(name: str, cubin: bytes, *flags) -> str:

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool_path(name), *flags, f.name], capture_output=True, text=True, check=True).stdout


def parse_sass(text: str) -> list:
    """``[(address, opcode, operands, label_or_None)]`` of an ``nvdisasm -c`` listing; the label
    is the one that names the instruction's address (a branch target)."""
    out, pending = [], None
    for line in text.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            pending = m.group(1)
            continue
        m = _INSTR.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), m.group(4), pending))
            pending = None
    return out


def main_loop(instrs: list) -> tuple:
    """The main loop as ``(first, last, is_loop)``, indexes into ``instrs``: the largest span
    closed by a backward branch; the whole kernel up to its last ``EXIT`` when there is none."""
    at = {label: i for i, (_, _, _, label) in enumerate(instrs) if label}
    best = None
    for i, (_, op, operands, _) in enumerate(instrs):
        if op.startswith("BRA"):
            m = _TARGET.search(operands)
            if m and m.group(1) in at and at[m.group(1)] < i and (best is None or i - at[m.group(1)] > best[1] - best[0]):
                best = (at[m.group(1)], i)
    if best is not None:
        return best[0], best[1], True
    last = max(i for i, (_, op, _, _) in enumerate(instrs) if op == "EXIT")
    return 0, last, False


def _width(op: str) -> int:
    parts = op.split(".")
    for token, width in (("U8", 1), ("S8", 1), ("U16", 2), ("S16", 2), ("64", 8), ("128", 16)):
        if token in parts:
            return width
    return 4


def analyse(compiled, arch: int) -> dict:
    """Counts of one compiled kernel (see the module docstring for each key)."""
    cubin = compiled.asm["cubin"]
    res = _run_tool("cuobjdump", cubin, "-res-usage")
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    instrs = [i for i in parse_sass(_run_tool("nvdisasm", cubin, "-c")) if i[1] != "NOP"]
    first, last, is_loop = main_loop(instrs)
    loop = instrs[first:last + 1]
    ops = [op for _, op, _, _ in instrs]
    loads, stores = {}, {}
    for _, op, _, _ in loop:
        if op.startswith("LDG"):
            loads[_width(op)] = loads.get(_width(op), 0) + 1
        elif op.startswith("STG"):
            stores[_width(op)] = stores.get(_width(op), 0) + 1
    ptx = compiled.asm["ptx"]
    return dict(
        registers=regs, local_bytes=local, stack_bytes=stack, shared_bytes=int(compiled.metadata.shared),
        spill_instructions=sum(op.startswith(("STL", "LDL")) for op in ops),
        instructions=len(instrs), loop_instructions=len(loop), has_loop=is_loop,
        loop_shuffles=sum(op.startswith("SHFL") for _, op, _, _ in loop),
        loop_barriers=sum(op.startswith("BAR") for _, op, _, _ in loop),
        loop_dot_waits=[int(m.group(1), 16) for _, op, operands, _ in loop if op.startswith("WARPGROUP.DEPBAR")
                        for m in [re.search(r"0x([0-9a-f]+)", operands)] if m],
        loads={str(k): v for k, v in sorted(loads.items())}, stores={str(k): v for k, v in sorted(stores.items())},
        ptx_fma=len(re.findall(r"^\s*(?:fma|mad)\.rn[a-z.]*\.f(?:16|32|64)\b", ptx, re.M)),
        ptx_contractible=len(re.findall(r"^\s*(?:mul|add|sub)\.f(?:32|64)\b", ptx, re.M)),
        sass_fma=sum(op.startswith(("FFMA", "DFMA")) for op in ops),
        enable_fp_fusion=bool(compiled.metadata.enable_fp_fusion),
    )


#: Per multiprocessor: registers, shared memory (bytes), warps, resident programs (CUDA C++
#: Programming Guide, "Technical Specifications per Compute Capability", 8.0 and 9.0), and
#: the shared memory the system reserves per program (1 KB on both).
SM_LIMITS = {80: dict(registers=65536, shared=164 * 1024, warps=64, programs=32, reserved=1024),
             90: dict(registers=65536, shared=228 * 1024, warps=64, programs=32, reserved=1024)}


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int, arch: int) -> int:
    """Programs (thread blocks) of one kernel that fit on a multiprocessor at once.

    Registers are allocated per warp in units of 256 (a thread's count rounded up to 8).

    Examples
    --------
    >>> programs_per_sm(128, 8, 76288, 90), programs_per_sm(129, 8, 76288, 90), programs_per_sm(64, 4, 120000, 90)
    (2, 1, 1)
    """
    lim = SM_LIMITS[arch]
    by_regs = lim["registers"] // (-(-registers // 8) * 8 * 32 * num_warps)
    by_shared = lim["shared"] // (shared_bytes + lim["reserved"])
    return max(0, min(by_regs, by_shared, lim["warps"] // num_warps, lim["programs"]))


def _per_thread_items(kind: str, constexprs: dict, num_warps: int) -> int:
    """Elements (or weights, for the product) one thread handles per trip of the main loop."""
    threads = 32 * num_warps
    if kind == "decode":
        return constexprs["ROWS"] * constexprs["BLOCKSIZE"] / threads
    if kind == "quantize":
        return constexprs["ROWS"] * constexprs["BLOCKSIZE"] / threads
    if kind == "double_quantize":
        return constexprs["NESTED"] / threads
    if kind == "splitk_reduce":
        return constexprs["BLOCK"] / threads
    return constexprs["BLOCK_N"] * constexprs["BLOCK_K"] / threads  # matmul, matmul_t: one weight tile per trip


_KIND_OF = {"dequantize_4bit_kernel": "decode", "quantize_4bit_kernel": "quantize",
            "double_quantize_kernel": "double_quantize", "matmul_4bit_kernel": "matmul",
            "splitk_reduce_kernel": "splitk_reduce", "matmul_4bit_t_kernel": "matmul_t"}


#: Launch keywords that are compiler options, not constexprs.
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "maxnreg")


def report_case(case: Case, archs=ARCHS) -> list:
    """Compile every launch ``case`` makes, for each architecture; one row per launch and arch."""
    rows = []
    for arch in archs:
        with compiling_for(divmod(arch, 10)):  # the configuration the launcher picks on that GPU
            launches = capture_launches(case.call)
        rows += _report_launches(case, launches, arch)
    return rows


def _report_launches(case: Case, launches: list, arch: int) -> list:
    rows = []
    for launch in launches:
        constexprs = {k: v for k, v in launch.kwargs.items() if k not in _OPTIONS}
        num_warps = launch.kwargs.get("num_warps", 4)
        kind = _KIND_OF[launch.kernel_name]
        if case.kind != kind:  # a wrapper that launches another kernel first (e.g. decode + linear)
            continue
        compiled = compile_launch(launch, arch)
        row = analyse(compiled, arch)
        contractions = 0
        if row["enable_fp_fusion"]:
            unfused = analyse(compile_launch(launch, arch, enable_fp_fusion=False), arch)
            contractions = max(row["ptx_fma"] - unfused["ptx_fma"], row["sass_fma"] - unfused["sass_fma"])
        items = _per_thread_items(kind, constexprs, num_warps)
        p = dict(case.params)
        rows.append(dict(
            case=case.name, kind=kind, default=case.default, kernel=launch.kernel_name, arch=arch,
            shape=list(p.get("shape", SHAPE)), blocksize=p.get("blocksize", 64), dtype=p.get("dtype", "bfloat16"),
            double_quant=p.get("double_quant", True), rows=p.get("rows"),
            grid=list(launch.grid), num_warps=num_warps,
            constexprs={k: v for k, v in constexprs.items() if isinstance(v, (int, str, bool))},
            items_per_thread=items, per_item=round(row["loop_instructions"] / items, 2),
            contractions=contractions, shared_limit=SHARED_PER_BLOCK[arch],
            programs_per_sm=programs_per_sm(row["registers"], num_warps, row["shared_bytes"], arch), **row,
        ))
    return rows


def _worker(args):
    name, full, archs = args
    case = next(c for c in cases(full) if c.name == name)
    return report_case(case, archs)


def run(full: bool = False, archs=ARCHS, jobs: int | None = None) -> dict:
    """Compile the cases (in ``jobs`` processes) and return the report document."""

    sources = source_hash()  # before compiling: the sources the workers import
    todo = [(c.name, full, tuple(archs)) for c in cases(full)]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        results = [_worker(t) for t in todo]
    else:

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_worker, todo))
    return dict(
        schema=1, kind="kernels", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        triton=triton.__version__, source_hash=sources, shape=list(SHAPE), full=full,
        rows=[r for rs in results for r in rs],
    )


def problems(doc: dict) -> list:
    """What the CI check refuses: a spill, shared memory over the limit, a forbidden contraction."""
    out = []
    for r in doc["rows"]:
        where = f"{r['case']} sm_{r['arch']}"
        if r["local_bytes"] or r["stack_bytes"] or r["spill_instructions"]:
            out.append(f"{where}: spills ({r['stack_bytes']} stack bytes, {r['spill_instructions']} STL/LDL)")
        if r["shared_bytes"] > SHARED_PER_BLOCK[80]:
            out.append(f"{where}: {r['shared_bytes']} bytes of shared memory > the A100's {SHARED_PER_BLOCK[80]}")
        if r["contractions"]:
            out.append(f"{where}: {r['contractions']} floating-point contractions the oracle does not define")
        if not r["enable_fp_fusion"] and r["ptx_contractible"]:
            out.append(f"{where}: {r['ptx_contractible']} contractible PTX mul/add")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line.

    Examples
    --------
    >>> build_parser().parse_args(["--out", "k.json"]).all
    False
    """
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--all", action="store_true", help="every configuration the launchers can choose, not only the defaults")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (default 80 90)")
    p.add_argument("--jobs", type=int, default=None, help="compiler processes (default: the CPU count)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    doc = run(full=args.all, archs=args.arch, jobs=args.jobs)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    for line in problems(doc):
        print(line, file=sys.stderr)
    return 1 if problems(doc) else 0


if __name__ == "__main__":
    sys.exit(main())
