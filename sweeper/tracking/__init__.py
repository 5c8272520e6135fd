"""Experiment tracking in MLflow: the only package that imports mlflow (DESIGN §3).

- `uris`: where the store is (`--tracking-uri`, `$MLFLOW_TRACKING_URI`, the local default),
  and the one parser of SQL store URLs.
- `tracker`: `MlflowTracker`, the study loop's tracker: experiment, parent run, best so far,
  model registry, study figures.
- `trial_run`: one trial's nested run: metrics, figures, tables, model, final status.
- `reader`: the read side for `sweeper.results.read`: models, histories and artifacts back.
- `repair`: runs left RUNNING, and what MLflow missed filled in from Optuna's record.
- `probe`: is the store usable; `model_files`: the MLflow model folder; `server`: the one
  `mlflow server` command; `common`: value conversions.

Importing this package imports nothing: `MlflowTracker` and the URI helpers load on first
use, so that the read side and `sweeper ui` need not load the tracker (and mlflow).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "MlflowTracker": "sweeper.tracking.tracker",
    "REGISTRY_ALIAS": "sweeper.tracking.common",
    "DEFAULT_TRACKING_URI": "sweeper.uris",
    "TRACKING_ENV": "sweeper.uris",
    "default_artifact_root": "sweeper.uris",
    "resolve_tracking_uri": "sweeper.uris",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module 'sweeper.tracking' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
