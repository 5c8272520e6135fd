"""Every name sweeper writes into the two stores, and how a trial ended.

The Optuna user attrs, system attrs and MLflow tags below are the contract between the
writing side (the worker loop, the tracker) and the reading side (`sweeper.results`,
`sweeper reap`, repair): stores written by earlier releases carry exactly these names, so
they never change. `Outcome` is the one mapping from how a trial ended to its Optuna
state and its MLflow run status.

Nothing is imported here: every part of the package may use these names.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, NamedTuple

# --- Optuna trial user attrs (shown by Optuna's own tools: kept small) -------------------
ATTR_REASON = "fail_reason"  # why a trial failed or was pruned (redacted, one line)
ATTR_RUN_ID = "mlflow_run_id"  # the trial's nested MLflow run
ATTR_MODEL_ID = "mlflow_model_id"  # set only when the trial's model was logged
ATTR_WORKER = "worker"  # "host:pid" of the process that ran the trial
ATTR_PACK = "pack"  # with `pack: K`: the numbers of the trials that trained together
ATTR_RETRY_OF = "retry_of"  # on a retry: the number of the lost trial it replaces

# --- Optuna trial system attrs -----------------------------------------------------------
# sweeper's records: whole JSON objects that optuna-dashboard and the `optuna` CLI need not
# show (the MLflow runs show them as params and metrics). Studies written before kept them
# as the user attrs named in `OLD_USER_ATTRS`; the read side falls back to those.
ATTR_METRICS = "sweeper.metrics"  # the scalar summary metrics of a finished trial
ATTR_CONFIG = "sweeper.config"  # the trial's full config, flat (`TrialConfig.flat()`)
ATTR_HEARTBEAT = "sweeper:heartbeat"  # {"interval_s", "grace_s"} of the trial's own worker
RETRY_OF = "failed_trial"  # Optuna's own mark on a re-queued trial (`RetryFailedTrialCallback`)
RETRY_HISTORY = "retry_history"  # the numbers of the lost trials a retry replaces
GRID_ID = "grid_id"  # Optuna's GridSampler: the grid point a trial drew

# --- Optuna study system attrs (user attrs before) -----------------------------------------
ATTR_SPEC = "sweeper.spec"  # the study file as validated, JSON
OLD_USER_ATTRS = {ATTR_METRICS: "metrics", ATTR_CONFIG: "config", ATTR_SPEC: "sweeper.spec"}

# --- Optuna study user attrs --------------------------------------------------------------
ATTR_PARENT_RUN = "mlflow_parent_run_id"
ATTR_EXPERIMENT = "mlflow_experiment_id"

# --- MLflow tags ------------------------------------------------------------------------
TAG_STUDY = "sweeper.study"
# MLflow's own experiment tag: the metric its charts and parallel coordinates start from
TAG_NOTE = "mlflow.note.content"  # MLflow's own: the run's description in its UI
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own context tag
TAG_PRIMARY_METRIC = "mlflow.experiment.primaryMetric.name"
TAG_ROLE = "sweeper.role"  # parent | trial | ensemble
TAG_TRIAL = "sweeper.trial_number"
TAG_STATE = "sweeper.state"  # the trial's Optuna state
TAG_REASON = "sweeper.reason"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: what nests a run under its parent
TAG_FILLED_IN = "sweeper.filled_in"  # what a repair wrote from Optuna's record
TAG_SAMPLER = "sweeper.sampler"
TAG_PRUNER = "sweeper.pruner"
TAG_OBJECTIVES = "sweeper.objectives"
TAG_CHANGED_SETTINGS = "sweeper.changed_settings"
TAG_EPOCHS_RUN = "sweeper.epochs_run"  # epochs a trial trained (fewer when pruned)
TAG_TRAIN_SECONDS = "sweeper.train_seconds"  # its training time
TAG_TRIAL_SECONDS = "sweeper.trial_seconds"  # the whole trial, ask to tell
TAG_VERSION = "sweeper.version"  # the sweeper release that wrote the run
TAG_DEVICE = "sweeper.device"
TAG_TORCH_VERSION = "sweeper.torch_version"
TAG_WORKER = "sweeper.worker"
TAG_VALUE = "sweeper.value"  # on a registered model version: the objective it reached
TAG_MEMBERS = "sweeper.members"  # on an ensemble run: the trials that voted
TAG_PACK = "sweeper.pack"  # with `pack: K`: the trials that trained together, "0,1,2,3"

# --- Reasons ------------------------------------------------------------------------------
LOST_REASON = "worker lost"  # the start of the reason a lost trial fails with


class Outcome(str, Enum):
    """How a trial ended, by its Optuna state name (a `str`: it compares equal to
    "COMPLETE", "PRUNED" and "FAIL" as stored)."""

    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAIL = "FAIL"

    def __str__(self) -> str:  # printed and formatted as the state name, as stored
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def mlflow_status(self) -> str:
        """The status of the trial's MLflow run."""
        return _MLFLOW_STATUS[self]

    def ending(self, reason: str | None = None) -> Ending:
        """(Optuna state, MLflow status, reason) for a trial that ended this way."""
        return Ending(self, self.mlflow_status, reason)


_MLFLOW_STATUS = {Outcome.COMPLETE: "FINISHED", Outcome.PRUNED: "KILLED",
                  Outcome.FAIL: "FAILED"}


class Ending(NamedTuple):
    """One trial's end as both stores record it."""

    state: Outcome  # the Optuna state (its name)
    mlflow_status: str  # FINISHED | KILLED | FAILED
    reason: str | None


def mlflow_status(state: str) -> str:
    """The MLflow run status for an Optuna state name ("COMPLETE", "PRUNED", "FAIL")."""
    return Outcome(state).mlflow_status


def trial_record(trial: Any, key: str) -> dict[str, Any]:
    """A trial's `ATTR_CONFIG` or `ATTR_METRICS` (empty when it has none): Optuna system
    attrs, or the user attrs of the same meaning that studies written before kept."""
    value = trial.system_attrs.get(key) or trial.user_attrs.get(OLD_USER_ATTRS[key])
    return dict(value) if isinstance(value, dict) else {}


def study_spec(study: Any) -> dict[str, Any]:
    """The spec a study was created with (an `optuna.Study` or a `FrozenStudy`), as JSON;
    empty for a study sweeper did not create."""
    if hasattr(study, "system_attrs"):  # FrozenStudy
        system, user = study.system_attrs, study.user_attrs
    else:
        system = study._storage.get_study_system_attrs(study._study_id)
        user = study._storage.get_study_user_attrs(study._study_id)
    value = system.get(ATTR_SPEC) or user.get(OLD_USER_ATTRS[ATTR_SPEC])
    return dict(value) if isinstance(value, dict) else {}
