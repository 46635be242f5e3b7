"""Every example in the library's docstrings runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import tf_piggyback

MODULES = sorted(m.name for m in pkgutil.walk_packages(tf_piggyback.__path__, "tf_piggyback."))


@pytest.mark.parametrize("name", ["tf_piggyback"] + MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write task files relative to the working directory
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
