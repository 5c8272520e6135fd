"""The composition root: create or resume the Optuna study and run the ask → fit → tell loop.

One trial, in order (DESIGN §4): ask Optuna, resolve and validate the trial config, open
its tracking run, build the model (an infeasible one fails here, untrained), fit with a
hook that reports each epoch and asks the pruner, evaluate on validation (the objective)
and test (reported only), tell Optuna. Every way a trial can end maps to one state:
COMPLETE, PRUNED, or FAIL with a reason; an exception in one trial never stops the study.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sweeper import samplers, space
from sweeper.config import DatasetConfig, StudySpec, TrialConfig
from sweeper.errors import StorageError, TrialFailure
from sweeper.storage import open_storage, redact

if TYPE_CHECKING:
    import optuna
    import torch

    from sweeper.data import Dataset

log = logging.getLogger(__name__)

# Optuna user attributes a trial carries (the read side relies on these names).
ATTR_REASON = "fail_reason"
ATTR_METRICS = "metrics"
ATTR_CONFIG = "config"
ATTR_RUN_ID = "mlflow_run_id"
ATTR_MODEL_ID = "mlflow_model_id"  # set only when the trial's model was logged
# Study user attributes.
ATTR_SPEC = "sweeper.spec"

FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")


@dataclass
class TrialOutcome:
    """How one trial ended, as shown to the user and told to Optuna."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL
    values: list[float] | None = None
    reason: str | None = None
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    detail: str | None = None  # the traceback of an unexpected error, for the record
    interrupted: bool = False  # stopped by Ctrl-C or a signal, not by its config


@dataclass
class RunReport:
    """What one `sweeper run` did."""

    study_name: str
    storage: str
    outcomes: list[TrialOutcome]
    finished_before: int
    target: int | None
    stopped_by: str  # budget | trials | timeout | grid-exhausted | nothing-to-do | interrupted


class TrialRun(Protocol):
    """What a tracker keeps of one trial while it trains."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def log_result(self, *, model: Any, data: Any, history: list[dict[str, float]],
                   evaluations: dict[str, Any], metrics: dict[str, float],
                   values: list[float]) -> None: ...


class StudyTracker(Protocol):
    """The seam to experiment tracking: the loop calls these and never MLflow itself."""

    def check(self) -> None:
        """Raise a SweeperError if tracking cannot work; called before anything is written."""
        ...

    def start_study(self, study: optuna.Study, spec: StudySpec) -> None: ...

    def trial_run(self, trial: optuna.Trial, config: TrialConfig
                  ) -> AbstractContextManager[TrialRun]: ...

    def trial_ended(self, study: optuna.Study, outcome: TrialOutcome) -> None: ...

    def end_study(self, study: optuna.Study, *, interrupted: bool) -> None: ...


# --------------------------------------------------------------------------------------
# Opening the study
# --------------------------------------------------------------------------------------
def open_study(spec: StudySpec, storage_url: str, *, create: bool = True,
               seed_offset: int = 0) -> optuna.Study:
    """Create the study or resume it; a stored study with other directions is refused."""
    import optuna
    import sqlalchemy.exc

    storage = open_storage(storage_url)
    sampler = samplers.build_sampler(spec, seed_offset=seed_offset)
    pruner = samplers.build_pruner(spec)
    try:
        existing = _stored_directions(storage, spec.name)
        if existing is not None and existing != spec.directions:
            raise StorageError(
                f"study {spec.name!r} in {redact(storage_url)} optimizes {existing}, but the "
                f"study file says {spec.directions}; rename the study or restore the "
                f"objective")
        if existing is None and not create:
            raise StorageError(f"no study {spec.name!r} in {redact(storage_url)}")
        study = optuna.create_study(study_name=spec.name, storage=storage, sampler=sampler,
                                    pruner=pruner, directions=spec.directions,
                                    load_if_exists=True)
        if existing is None:
            study.set_user_attr(ATTR_SPEC, spec.model_dump(mode="json"))
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise StorageError(f"Optuna storage {redact(storage_url)} failed: "
                           f"{str(exc).splitlines()[0]}") from exc
    return study


def _stored_directions(storage: optuna.storages.BaseStorage, name: str) -> list[str] | None:
    import optuna

    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    except optuna.exceptions.OptunaError:  # pragma: no cover - defensive
        return None
    return [d.name.lower() for d in storage.get_study_directions(study_id)]


def count_finished(study: optuna.Study) -> int:
    """Trials that count against `budget.trials`: complete, pruned or failed."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return len(study.get_trials(deepcopy=False, states=states))


# --------------------------------------------------------------------------------------
# The worker: data loaded once, then trial after trial
# --------------------------------------------------------------------------------------
@dataclass
class RunOptions:
    storage: str
    more_trials: int | None = None  # --trials N: run N more, whatever the budget says
    timeout: float | None = None  # --timeout, else budget.timeout
    device: str | None = None
    data_dir: Path | None = None


ProgressCallback = Callable[[str, dict[str, Any]], None]


class Worker:
    """Runs trials of one study in this process."""

    def __init__(self, spec: StudySpec, options: RunOptions,
                 tracker: StudyTracker | None = None,
                 progress: ProgressCallback | None = None) -> None:
        from sweeper.train import resolve_device

        self.spec = spec
        self.options = options
        self.device: torch.device = resolve_device(options.device)
        self.tracker = tracker
        self.progress = progress or (lambda event, info: None)
        self._data_key: DatasetConfig | None = None
        self._data: Dataset | None = None

    # -- data ---------------------------------------------------------------------------
    def dataset(self, cfg: DatasetConfig) -> Dataset:
        """The dataset for a trial; reloaded only when a searched key changes it."""
        from sweeper.data import load_dataset

        key = cfg.model_copy(update={"augment": cfg.augment.model_construct()})
        if self._data is None or key != self._data_key:
            self._data = load_dataset(cfg, device=self.device, data_dir=self.options.data_dir)
            self._data_key = key
        return self._data

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> RunReport:
        spec, options = self.spec, self.options
        # An unreachable tracking store, then a missing dataset: both are the user's to fix,
        # before any study is written.
        if self.tracker is not None:
            self.tracker.check()
        self.dataset(spec.dataset)
        study = open_study(spec, options.storage)
        if self.tracker is not None:
            self.tracker.start_study(study, spec)
        finished_before = count_finished(study)
        target = None if options.more_trials is not None else spec.budget.trials
        timeout = options.timeout if options.timeout is not None else spec.budget.timeout
        started = time.monotonic()
        outcomes: list[TrialOutcome] = []
        stopped_by = "budget"
        self.progress("start", {"study": study, "finished": finished_before, "target": target,
                                "more": options.more_trials})
        try:
            while True:
                if options.more_trials is not None and len(outcomes) >= options.more_trials:
                    stopped_by = "trials"
                    break
                if target is not None and count_finished(study) >= target:
                    stopped_by = "budget" if outcomes else "nothing-to-do"
                    break
                if timeout is not None and time.monotonic() - started >= timeout:
                    stopped_by = "timeout"
                    break
                if samplers.grid_points_left(study) == 0:
                    stopped_by = "grid-exhausted"
                    break
                outcome = self.run_trial(study)
                outcomes.append(outcome)
                self.progress("trial", {"outcome": outcome, "study": study})
        except KeyboardInterrupt:
            stopped_by = "interrupted"
            raise
        finally:
            if self.tracker is not None:
                self.tracker.end_study(study, interrupted=stopped_by == "interrupted")
            self.progress("end", {"study": study, "stopped_by": stopped_by})
        return RunReport(spec.name, options.storage, outcomes, finished_before, target,
                         stopped_by)

    def run_trial(self, study: optuna.Study) -> TrialOutcome:
        """Ask, train, tell. Returns how the trial ended; raises only KeyboardInterrupt."""
        import optuna

        trial = study.ask()
        outcome = TrialOutcome(trial.number, "FAIL")
        started = time.monotonic()
        run = None
        try:
            config = space.suggest(trial, self.spec)
            outcome.params = dict(trial.params)
            trial.set_user_attr(ATTR_CONFIG, config.flat())
            with self._trial_run(trial, config) as run:
                values, metrics = self._train(trial, config, run)
                outcome.values, outcome.metrics = values, metrics
                outcome.state = "COMPLETE"
        except optuna.TrialPruned as pruned:
            outcome.state = "PRUNED"
            outcome.reason = str(pruned) or "pruned"
        except TrialFailure as exc:
            outcome.reason = str(exc)
        except KeyboardInterrupt as stop:  # Ctrl-C, or a signal (see `workers`)
            outcome.reason = getattr(stop, "reason", None) or "interrupted"
            outcome.interrupted = True
            outcome.seconds = time.monotonic() - started
            self._tell(study, trial, outcome)
            raise
        except Exception as exc:  # any error fails this trial, never the study
            outcome.reason = f"{type(exc).__name__}: {_one_line(str(exc))}"
            outcome.detail = traceback.format_exc()
            log.debug("trial %d failed:\n%s", trial.number, outcome.detail)
        finally:
            _free_device_memory(self.device)
        outcome.seconds = time.monotonic() - started
        self._tell(study, trial, outcome)
        return outcome

    @contextlib.contextmanager
    def _trial_run(self, trial: optuna.Trial, config: TrialConfig) -> Iterator[Any]:
        if self.tracker is None:
            yield None
            return
        with self.tracker.trial_run(trial, config) as run:
            yield run

    def _train(self, trial: optuna.Trial, config: TrialConfig, run: Any
               ) -> tuple[list[float], dict[str, float]]:
        import optuna

        from sweeper.evaluate import evaluate, prefixed
        from sweeper.models import build_model, count_parameters
        from sweeper.train import fit, seed_everything

        data = self.dataset(config.dataset)
        seed_everything(config.train.seed)  # the same seed gives the same initial weights
        model = build_model(config.model, data.input_shape, data.num_classes)
        objectives = self.spec.objective_list
        pruning = self.spec.pruner.name != "none"
        watched = objectives[0].metric

        def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
            if run is not None:
                run.log_epoch(epoch, metrics)
            self.progress("epoch", {"trial": trial.number, "epoch": epoch,
                                    "epochs": config.epochs, "metrics": metrics})
            if not pruning:
                return False
            trial.report(metrics[watched], epoch)
            return trial.should_prune()

        result = fit(model, data, config.train, epochs=config.epochs, device=self.device,
                     augment=config.dataset.augment, on_epoch=on_epoch)
        if result.stopped_early:
            last = result.history[-1]
            raise optuna.TrialPruned(f"pruned at epoch {int(last['epoch'])} "
                                     f"({watched}={last[watched]:.4g})")
        val = evaluate(model, data.val, classes=data.classes,
                       batch_size=config.train.eval_batch_size)
        test = evaluate(model, data.test, classes=data.classes,
                        batch_size=config.train.eval_batch_size)
        metrics = {**prefixed(val.metrics, "val"), **prefixed(test.metrics, "test"),
                   "train_seconds": result.train_seconds,
                   "n_params": float(count_parameters(model)),
                   "epochs_run": float(len(result.history))}
        missing = [o.metric for o in objectives if o.metric not in metrics]
        if missing:  # e.g. an AUC on a validation split holding a single class
            raise TrialFailure(f"objective {', '.join(missing)} is undefined for this trial's "
                               f"validation split")
        values = [float(metrics[o.metric]) for o in objectives]
        if not all(math.isfinite(v) for v in values):
            raise TrialFailure(f"objective is not finite: {values}")
        summary = {k: v for k, v in metrics.items() if _is_summary_metric(k)}
        trial.set_user_attr(ATTR_METRICS, summary)
        if run is not None:
            run.log_result(model=model, data=data, history=result.history,
                           evaluations={"val": val, "test": test}, metrics=metrics,
                           values=values)
        return values, summary

    def _tell(self, study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome) -> None:
        from optuna.trial import TrialState

        state = {"COMPLETE": TrialState.COMPLETE, "PRUNED": TrialState.PRUNED,
                 "FAIL": TrialState.FAIL}[outcome.state]
        if outcome.reason:
            with contextlib.suppress(Exception):
                trial.set_user_attr(ATTR_REASON, outcome.reason)
        try:
            if state == TrialState.COMPLETE:
                study.tell(trial, outcome.values)
            else:
                study.tell(trial, state=state)
        except Exception as exc:
            raise StorageError(f"could not record trial {trial.number} in Optuna storage: "
                               f"{_one_line(str(exc))}") from exc
        if self.tracker is not None:
            self.tracker.trial_ended(study, outcome)


def _is_summary_metric(key: str) -> bool:
    """The scalar metrics kept in Optuna (per-class ones go to MLflow only)."""
    if key in ("train_seconds", "n_params", "epochs_run"):
        return True
    _, _, name = key.partition("_")
    return name in ("accuracy", "loss", "f1_macro", "f1_weighted", "precision_macro",
                    "recall_macro", "precision_weighted", "recall_weighted", "auc_macro",
                    "auc_micro")


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def run_study(spec: StudySpec, options: RunOptions, *, tracker: StudyTracker | None = None,
              progress: ProgressCallback | None = None) -> RunReport:
    """Run a study to its budget (or `more_trials` more) in this process."""
    return Worker(spec, options, tracker=tracker, progress=progress).run()
