"""The Triton kernels compiled for sm_80 and sm_90 without a GPU (``benchmarks/kernel_report.py``).

The compiles run in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces the
kernels in this process). Only the default configurations are compiled here; Triton caches them
(``~/.triton/cache``), so after the first run the test takes seconds. The committed full report
(``benchmarks/results/kernels.json``, the tables of ``docs/kernels.md``) must match the kernel
sources: a kernel edited without regenerating it fails ``test_committed_report_is_current``.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from benchmarks import kernel_model, kernel_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [Path(kernel_report.tool_path(name)) for name in ("nvdisasm", "cuobjdump", "ptxas")]
needs_tools = pytest.mark.skipif(not all(p.exists() for p in TOOLS),
                                 reason="Triton's CUDA backend tools (ptxas, nvdisasm, cuobjdump) are not installed")


def _compile_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def default_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / "kernels.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", "--out", str(out)],
                            cwd=ROOT, env=_compile_env(), capture_output=True, text=True, timeout=600)
    assert out.exists(), f"the kernel report did not run:\n{result.stderr[-4000:]}"
    return json.loads(out.read_text()), result


@needs_tools
def test_default_configurations_compile_for_both_architectures(default_report):
    doc, _ = default_report
    compiled = {(r["case"], r["arch"]) for r in doc["rows"]}
    expected = {(c.name, arch) for c in kernel_report.cases() for arch in kernel_report.ARCHS}
    assert compiled == expected, f"missing: {sorted(expected - compiled)}"


@needs_tools
def test_default_configurations_are_clean(default_report):
    """No spill, shared memory within the A100's per-block limit, no contraction the oracle does
    not define; every launch disables floating-point fusion (Note: counting contractions)."""
    doc, result = default_report
    assert kernel_report.problems(doc) == [], "\n".join(kernel_report.problems(doc))
    assert result.returncode == 0, result.stderr[-4000:]
    fused = [(r["case"], r["arch"]) for r in doc["rows"] if r["enable_fp_fusion"]]
    assert fused == [], f"launched with floating-point fusion on: {fused}"


@needs_tools
def test_gemm_programs_share_a_multiprocessor(default_report):
    """The GEMM model's prediction rests on two programs per sm_90 multiprocessor (the launchers'
    register cap): the compiled training-size products must keep it."""
    doc, _ = default_report
    gemms = [r for r in doc["rows"] if r["arch"] == 90 and r["kind"] in ("matmul", "matmul_t") and r["rows"] > 16]
    assert {r["rows"] for r in gemms} >= {512, 2048}
    for r in gemms:
        assert r["programs_per_sm"] >= 2, f"{r['case']}: {r['registers']} registers, {r['shared_bytes']} B shared"


@needs_tools
def test_the_contraction_check_can_fail(tmp_path):
    """A kernel computing ``a * b + c`` contracts to one fma with fusion on (counted), not with it off."""
    (tmp_path / "axpy_kernels.py").write_text(
        "import triton\nimport triton.language as tl\n\n\n"
        "@triton.jit\ndef axpy_kernel(a_ptr, b_ptr, c_ptr, out_ptr, BLOCK: tl.constexpr):\n"
        "    i = tl.arange(0, BLOCK)\n"
        "    tl.store(out_ptr + i, tl.load(a_ptr + i) * tl.load(b_ptr + i) + tl.load(c_ptr + i))\n")
    script = (
        "import sys, torch\n"
        "from benchmarks.kernel_report import Launch, analyse, compile_launch\n"
        "from axpy_kernels import axpy_kernel\n"
        "t = [torch.empty(128, device='meta') for _ in range(4)]\n"
        "for fusion in (True, False):\n"
        "    launch = Launch('axpy_kernel', axpy_kernel, (1,), tuple(t), dict(BLOCK=128, enable_fp_fusion=fusion))\n"
        "    row = analyse(compile_launch(launch, 90), 90)\n"
        "    print(row['ptx_fma'], row['sass_fma'], row['ptx_contractible'])\n")
    env = _compile_env()
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    fused, unfused = [list(map(int, line.split())) for line in result.stdout.split("\n") if line.strip()]
    assert fused[0] > 0 and fused[1] > 0, f"fusion on: expected an fma, got ptx/sass/contractible {fused}"
    assert unfused == [0, 0, 0], f"fusion off: expected no fma and nothing contractible, got {unfused}"


def test_committed_report_is_current():
    """The committed full report was made from the kernel sources as they are now."""
    doc = json.loads((ROOT / "benchmarks" / "results" / "kernels.json").read_text())
    assert doc["full"], "the committed report must hold every configuration (--all)"
    assert doc["source_hash"] == kernel_report.source_hash(), (
        "benchmarks/results/kernels.json is stale: run python -m benchmarks.kernel_report --all "
        "--out benchmarks/results/kernels.json and python docs/scripts/kernel_pages.py")
    assert kernel_report.problems(doc) == [], "\n".join(kernel_report.problems(doc))


@pytest.mark.parametrize("module", [kernel_report, kernel_model], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module.__name__} failed"
