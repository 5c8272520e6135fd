"""Experiment tracking in MLflow: the only package that imports mlflow (DESIGN §3).

- `uris`: where the store is (`--tracking-uri`, `$MLFLOW_TRACKING_URI`, the local default).
- `tracker`: `MlflowTracker`, the study loop's tracker: experiment, parent run, best so far,
  model registry, study figures.
- `trial_run`: one trial's nested run: metrics, figures, tables, model, final status.
- `reader`: the read side for `sweeper.results.read`: models, histories and artifacts back.
- `common`: tag and attribute names, value conversions.
"""

from sweeper.tracking.common import (
    ATTR_EXPERIMENT,
    ATTR_PARENT_RUN,
    REGISTRY_ALIAS,
    TAG_ROLE,
    TAG_STUDY,
    TAG_TRIAL,
)
from sweeper.tracking.tracker import MlflowTracker
from sweeper.tracking.uris import (
    DEFAULT_TRACKING_URI,
    TRACKING_ENV,
    default_artifact_root,
    resolve_tracking_uri,
)

__all__ = [
    "ATTR_EXPERIMENT",
    "ATTR_PARENT_RUN",
    "DEFAULT_TRACKING_URI",
    "REGISTRY_ALIAS",
    "TAG_ROLE",
    "TAG_STUDY",
    "TAG_TRIAL",
    "TRACKING_ENV",
    "MlflowTracker",
    "default_artifact_root",
    "resolve_tracking_uri",
]
