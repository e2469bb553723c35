"""The docs: every Python example runs, generated tables are current, the site builds strictly."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(page: Path) -> list[str]:
    return FENCE.findall(page.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=lambda p: p.name)
def test_examples_run(page, monkeypatch, capsys):
    """Each page's ```python blocks run in order in one namespace, from the repository root."""
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": f"docs_{page.stem}"}
    for i, source in enumerate(_blocks(page)):
        try:
            exec(compile(source, f"{page.name} block {i + 1}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page.name}: example {i + 1} failed: {exc!r}\n{source}") from exc


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPTS = sorted(p.stem for p in (ROOT / "docs" / "scripts").glob("*.py")
                 if "GENERATED = {" in p.read_text())


@pytest.mark.parametrize("name", SCRIPTS)
def test_generated_tables_are_current(name):
    """The committed tables equal what their script makes now (nothing typed by hand)."""
    script = _load_script(name)
    for file_name, make in script.GENERATED.items():
        committed = (ROOT / "docs" / "generated" / file_name).read_text()
        assert committed == make(), f"docs/generated/{file_name} is stale: run docs/scripts/{name}.py"


# A decimal number in prose: optional sign, digits, a point, digits (not part of a word or version).
# arXiv identifiers (2306.06965) are citations, not numbers.
NUMBER = re.compile(r"(?<![\w.])(?<!arXiv )-?(\d+\.\d+)(?![\w.])")
ANY_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _significant_digits(number: str) -> int:
    return len(number.replace(".", "").lstrip("0"))


def _sources_of_numbers() -> str:
    """Where a number in a page may come from: the generated fragments, and the constants of the
    project's code with their provenance beside them (``qlora_ref``, ``qlora_gpu`` in ``gpu/``,
    ``benchmarks/``): the spec page quotes format constants, the kernels page datasheet figures
    that ``benchmarks.kernel_model`` holds."""
    from qlora_ref import codebook

    generated = [p.read_text() for p in (ROOT / "docs" / "generated").glob("*")]
    constants = [p.read_text() for folder in ("qlora_ref", "gpu", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    tables = [f"{float(v)!r} {v!s}" for t in ("nf4", "fp4", "int4") for v in codebook(t)]  # float32 entries
    return "\n".join(generated + constants + tables)


#: Numbers a page derives in its own prose from numbers that pass the check, with the formula
#: written beside them on the page: (page, number) -> the arithmetic.
DERIVED_ON_THE_PAGE = {
    ("kernels.md", "12.8"): "bytes per clock of an H100 SXM5: 3.35e12 / (132 * 1.98e9)",
}


def test_prose_numbers_come_from_generators():
    """A measured number in a page's prose (three or more significant digits, outside code blocks)
    must appear in a generated fragment or in the oracle's constants: typed-in numbers go stale.

    Numbers that a ```python block prints are checked by running the block, not here."""
    sources = _sources_of_numbers()
    stray = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        prose = ANY_FENCE.sub("", page.read_text())
        for m in NUMBER.finditer(prose):
            number = m.group(1)
            if (_significant_digits(number) >= 3 and number not in sources
                    and (page.name, number) not in DERIVED_ON_THE_PAGE):
                line = prose[:m.start()].count("\n") + 1
                stray.append(f"{page.name}: {m.group()} in {prose.splitlines()[line - 1].strip()[:90]!r}")
    assert not stray, ("numbers typed into pages that no generator or constant makes (make them in "
                       "docs/scripts/ and include the fragment):\n" + "\n".join(stray))


@pytest.mark.skipif(shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_site_builds_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
