"""The Python API's docstring examples run as written, against the shipped digits study
run with the default local stores (the examples use no paths: the defaults find it)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import sweeper

MODULES = ("sweeper", "sweeper.results.read", "sweeper.results.scoring", "sweeper.redaction")


def test_api_is_reexported_lazily() -> None:
    assert {"best_trial", "best_trials", "trials", "load_model", "studies"} <= set(
        sweeper.__all__)
    assert callable(sweeper.best_trial) and sweeper.best_trial.__doc__
    with pytest.raises(AttributeError):
        _ = sweeper.no_such_function


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str, digits_smoke: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(digits_smoke)
    monkeypatch.delenv("SWEEPER_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             extraglobs={"sweeper": sweeper}, raise_on_error=False,
                             report=True)
    assert result.attempted >= 3, f"{name} has too few examples"
    assert result.failed == 0, f"{result.failed} example(s) of {name} failed (see output)"
