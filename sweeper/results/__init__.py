"""The read side: studies, trials, the best trial(s), models loaded back, scoring, reports.

`sweeper.results.best_trial` and the other names of `results.read` still resolve here
(lazily), as they did when this was one module.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("_") or name in ("read", "report", "rerun", "scoring"):
        # A submodule not imported yet (the import system asks here first) or a dunder.
        raise AttributeError(name)
    read = importlib.import_module("sweeper.results.read")
    try:
        return getattr(read, name)
    except AttributeError:
        raise AttributeError(f"module 'sweeper.results' has no attribute {name!r}") from None
