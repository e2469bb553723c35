"""The docstring examples of the benchmark modules run (the normal test run covers qlora_ref and qlora_gpu)."""

import doctest
import importlib

import pytest

MODULES = ["timing", "ceilings", "adapters", "checks", "cases", "memory_model", "results"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"benchmarks.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) of benchmarks.{name} failed"
