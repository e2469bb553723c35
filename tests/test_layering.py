"""The house rules of the code base, enforced: who may import whom, and how.

The layout (README, Layout): ``qlora_ref`` is the oracle, its top level the core a learner reads;
``qlora_ref.formats``, ``.conformance``, ``.memory`` and ``.cli`` sit around it; ``qlora_gpu``
(folder ``gpu/``) is the fast path; ``benchmarks`` and the tests are tools. The rules:

1. The core imports with torch (and every other optional library) blocked.
2. Dependencies point one way: tools -> ``qlora_gpu`` -> ``qlora_ref``, and inside ``qlora_ref``
   cli -> conformance / memory -> formats -> core. ``qlora_ref`` names ``qlora_gpu`` only through
   the provider plug-in point (an entry point, not code); ``qlora_gpu`` takes from ``qlora_ref``
   only constants and the public state types (a test that checks the fast path against code
   the fast path calls would check nothing).
3. No import cycle; no import inside a function except of an optional dependency, with a
   comment saying so; no private name imported from another module.
4. One home for each fact: the bitsandbytes state-dict keys, the block sizes, the bfloat16
   bit-pattern conversion.

Everything is read with ``ast`` from the files in the checkout; nothing here imports the
packages except rule 1, which does so in a child process.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Import name -> folder, for the project's own packages.
PACKAGES = {"qlora_ref": ROOT / "qlora_ref", "qlora_gpu": ROOT / "gpu", "benchmarks": ROOT / "benchmarks"}
#: Libraries the packages may import only lazily (inside a function, with a comment): optional
#: dependencies, and SciPy, which the oracle loads only when a codebook is derived.
OPTIONAL = {"scipy", "torch", "triton", "bitsandbytes", "torchao", "peft", "transformers", "qlora_gpu.kernels"}
#: The core of the oracle: the top level of qlora_ref.
CORE = {"codebooks", "blockwise", "double_quant", "torchao_nf4", "state", "api", "lora", "qlora", "dora", "text_table"}
#: Layers of qlora_ref, lowest first; a module may import its own layer and those below it.
LAYERS = {"core": 0, "formats": 1, "memory": 1, "conformance": 2, "cli": 3, "package": 4}
#: qlora_ref modules that run comparators and so need torch (loaded only through the registry).
TORCH_MODULES = {"qlora_ref.conformance.providers.comparators", "qlora_ref.conformance.providers.torch_arrays"}


def _module_name(path: Path) -> str:
    for name, folder in PACKAGES.items():
        if folder in path.parents:
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([name, *parts])
    raise AssertionError(path)


def _modules(*packages: str) -> dict:
    """``{module name: (path, ast tree)}`` for every .py file of the packages."""
    found = {}
    for name in packages:
        for path in sorted(PACKAGES[name].rglob("*.py")):
            found[_module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return found


MODULES = _modules("qlora_ref", "qlora_gpu", "benchmarks")


def _imports(module: str, tree: ast.AST):
    """Yield ``(imported module, names, node, inside a function)`` for every import of a module."""
    package = module if (MODULES[module][0].name == "__init__.py") else module.rpartition(".")[0]

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, [], child, in_function
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against the package
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([child.module] if child.module else []))
                names = [a.name for a in child.names]
                # "from pkg import submodule" is an import of the submodule
                subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
                if subs:
                    for s in subs:
                        yield s, [], child, in_function
                    names = [n for n in names if f"{base}.{n}" not in MODULES]
                    if not names:
                        continue
                yield base, names, child, in_function
            yield from visit(child, inner)

    yield from visit(tree, False)


def _layer(module: str):
    parts = module.split(".")
    if parts[0] != "qlora_ref":
        return None
    if len(parts) == 1:
        return "package"  # qlora_ref/__init__.py: the public face, re-exporting from every layer
    return "core" if parts[1] in CORE else parts[1]


def _is_optional(imported: str) -> bool:
    return any(imported == o or imported.startswith(o + ".") for o in OPTIONAL)


def test_the_core_imports_with_torch_blocked():
    """Every module of qlora_ref except the comparators imports with the optional libraries gone,
    and the command line builds its parser."""
    blocked = sorted({o.split(".")[0] for o in OPTIONAL} | {"qlora_gpu"})
    names = sorted(m for m in MODULES if m.startswith("qlora_ref") and m not in TORCH_MODULES)
    script = textwrap.dedent(f"""
        import importlib, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ImportError(f"blocked by test_layering: {{name}}")
        sys.meta_path.insert(0, Block())
        for name in {names!r}:
            importlib.import_module(name)
        from qlora_ref.cli import build_parser
        build_parser()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r} or m.startswith("scipy"))
        assert not loaded, loaded
        print("ok", len({names!r}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]


def test_dependencies_point_one_way():
    problems = []
    for module, (path, tree) in MODULES.items():
        for imported, names, node, _ in _imports(module, tree):
            top = imported.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if module.startswith("qlora_ref"):
                if top in ("qlora_gpu", "benchmarks"):
                    problems.append(f"{where}: qlora_ref imports {imported} (use the provider plug-in point)")
                if top == "torch" and module not in TORCH_MODULES:
                    problems.append(f"{where}: {module} imports torch (the oracle never does)")
                src, dst = _layer(module), _layer(imported)
                if dst is not None and src != dst and LAYERS[dst] >= LAYERS[src]:
                    problems.append(f"{where}: {module} ({src}) imports {imported} ({dst}), "
                                    "a layer above it or beside it")
            elif module.startswith("qlora_gpu"):
                if top == "benchmarks":
                    problems.append(f"{where}: qlora_gpu imports the benchmarks")
                if top == "qlora_ref":
                    for name in names or ["(a whole module)"]:
                        constant = name.isupper()
                        state_type = imported == "qlora_ref.state" and name[:1].isupper()
                        if not (constant or state_type):
                            problems.append(f"{where}: qlora_gpu imports {imported}.{name}: only constants "
                                            "and the public state types may cross")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {m: set() for m in MODULES}
    for module, (_, tree) in MODULES.items():
        for imported, _, _, _ in _imports(module, tree):
            target = imported
            while target and target not in MODULES:  # "from a.b import name": the module a.b
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_at_the_top_except_optional_dependencies():
    problems = []
    for module, (path, tree) in MODULES.items():
        if not module.startswith(("qlora_ref", "qlora_gpu")):
            continue
        lines = path.read_text().splitlines()
        for imported, _, node, in_function in _imports(module, tree):
            if not in_function:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            if not _is_optional(imported):
                problems.append(f"{where}: {imported} imported inside a function (not an optional dependency)")
            elif not commented:
                problems.append(f"{where}: lazy import of {imported} without a comment saying why")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("package", ["qlora_ref", "qlora_gpu", "benchmarks", "tests"])
def test_no_private_names_cross_modules(package):
    trees = MODULES if package != "tests" else {
        p.stem: (p, ast.parse(p.read_text())) for p in sorted((ROOT / "tests").glob("*.py"))}
    problems = []
    for module, (path, tree) in trees.items():
        if not module.startswith(package) and package != "tests":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{alias.name}")
    assert not problems, "private names imported across modules:\n" + "\n".join(problems)


def _source_files():
    for folder in ("qlora_ref", "gpu", "benchmarks", "tests", "docs/scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name != "test_layering.py":
                yield path


@pytest.mark.parametrize("fact, home", [
    ('"weight.nested_quant_map"', "qlora_ref/formats/bnb.py"),
    ("(32, 64, 128, 256, 512, 1024, 2048, 4096)", "qlora_ref/state.py"),
    (".view(torch.int16).numpy()", None),
])
def test_one_home_for_each_fact(fact, home):
    """Each fact is written in one place; everything else imports it from there."""
    found = sorted(str(p.relative_to(ROOT)) for p in _source_files() if fact in p.read_text())
    if home is None:
        # The bfloat16 bit view: the fast path's converter, and the comparators' own (they may
        # not use the fast path they are checked beside).
        expected = ["gpu/state.py", "qlora_ref/conformance/providers/torch_arrays.py"]
        assert found == expected, f"{fact!r} written in {found}, expected only in {expected}"
    else:
        assert found == [home], f"{fact!r} written in {found}, expected only in {home}"


def test_the_repository_stands_alone():
    """No code, test or page points at files outside the repository."""
    pattern = ("../shared", "shared spec", "STYLE.md", "PERF.md")
    hits = []
    for path in list(_source_files()) + sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if any(p in line for p in pattern):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
