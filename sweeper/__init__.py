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
    "best_trial": "sweeper.results",
    "best_trials": "sweeper.results",
    "get_trial": "sweeper.results",
    "load_model": "sweeper.results",
    "load_study": "sweeper.results",
    "studies": "sweeper.results",
    "trials": "sweeper.results",
    "TrialResult": "sweeper.results",
    "StudySummary": "sweeper.results",
    "evaluate_trial": "sweeper.scoring",
    "ensemble": "sweeper.scoring",
    "build_report": "sweeper.report",
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
    from sweeper.report import build_report
    from sweeper.results import (
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
    from sweeper.scoring import ensemble, evaluate_trial


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sweeper' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
