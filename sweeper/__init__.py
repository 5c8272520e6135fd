"""sweeper: hyperparameter sweeps and experiment tracking for PyTorch image classifiers.

The Python API reads what `sweeper run` recorded (storage and tracking come from the
arguments, else `$SWEEPER_STORAGE` and `$MLFLOW_TRACKING_URI`, else the local defaults):

>>> import sweeper
>>> best = sweeper.best_trial("digits-smoke")   # after: sweeper run studies/digits_smoke.yaml
>>> best.state, best.params["model.arch"] in ("mlp", "cnn")
('COMPLETE', True)
>>> print(f"trial {best.number}: val_accuracy {best.value:.2f}")
trial ...: val_accuracy 0.9...
>>> model = sweeper.load_model(best)            # a torch.nn.Module in eval mode
>>> model.training
False
>>> df = sweeper.trials("digits-smoke")         # a pandas DataFrame, one row per trial
>>> len(df), list(df.columns[:2])
(6, ['state', 'value'])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The API is imported on first use, so `import sweeper` (and `sweeper --help`) stays
# instant: optuna, torch and mlflow load only when a function needs them.
_API = {
    "best_trial": "sweeper.results.read",
    "best_trials": "sweeper.results.read",
    "get_trial": "sweeper.results.read",
    "load_model": "sweeper.results.read",
    "load_study": "sweeper.results.read",
    "studies": "sweeper.results.read",
    "trials": "sweeper.results.read",
    "TrialResult": "sweeper.results.read",
    "StudySummary": "sweeper.results.read",
    "evaluate_trial": "sweeper.results.scoring",
    "ensemble": "sweeper.results.scoring",
    "build_report": "sweeper.results.report",
}
__all__ = [
    "StudySummary",
    "TrialResult",
    "__version__",
    "best_trial",
    "best_trials",
    "build_report",
    "ensemble",
    "evaluate_trial",
    "get_trial",
    "load_model",
    "load_study",
    "studies",
    "trials",
]

if TYPE_CHECKING:
    from sweeper.results.read import (
        StudySummary,
        TrialResult,
        best_trial,
        best_trials,
        get_trial,
        load_model,
        load_study,
        studies,
        trials,
    )
    from sweeper.results.report import build_report
    from sweeper.results.scoring import ensemble, evaluate_trial


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sweeper' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
