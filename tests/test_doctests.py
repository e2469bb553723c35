"""Run the Examples in every docstring of qlora_ref and qlora_gpu as doctests."""

import doctest
import importlib
import pkgutil

import pytest


def _modules(package_name):
    try:
        package = importlib.import_module(package_name)
    except ImportError:  # qlora_gpu needs torch
        return []
    names = [package_name]
    names += [m.name for m in pkgutil.walk_packages(package.__path__, package_name + ".")]
    return names


MODULES = _modules("qlora_ref") + _modules("qlora_gpu")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


def test_modules_found():
    assert "qlora_ref.blockwise" in MODULES
