"""The composition root: create or resume the Optuna study and run the ask → fit → tell loop.

One trial, in order (DESIGN §4): ask Optuna, resolve and validate the trial config, open
its tracking run, build the model (an infeasible one fails here, untrained), fit with a
hook that reports each epoch and asks the pruner, evaluate on validation (the objective)
and test (reported only), tell Optuna. Every way a trial can end maps to one state:
COMPLETE, PRUNED, or FAIL with a reason; an exception in one trial never stops the study.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sweeper.errors import DiskFull, StorageError, TrialFailure
from sweeper.fleet import heartbeat, stopping
from sweeper.fleet.heartbeat import HeartbeatSettings
from sweeper.keys import (
    ATTR_CONFIG,
    ATTR_HEARTBEAT,
    ATTR_METRICS,
    ATTR_REASON,
    ATTR_SPEC,
    ATTR_WORKER,
    Outcome,
)
from sweeper.redaction import redact_text
from sweeper.search import retrying, samplers
from sweeper.search.endings import COMPLETED, TrialOutcome, ending_of, one_line
from sweeper.search.queries import StudyQueries
from sweeper.search.stopping_rules import StopPolicy
from sweeper.search.storage import open_storage, rdb_of, redact
from sweeper.spec import space
from sweeper.spec.config import DatasetConfig, StudySpec, TrialConfig

if TYPE_CHECKING:
    import optuna
    import torch

    from sweeper.ml.data import Dataset
    from sweeper.ml.train import FitResult

log = logging.getLogger(__name__)


FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")


@dataclass
class RunReport:
    """What one `sweeper run` did."""

    study_name: str
    storage: str
    outcomes: list[TrialOutcome]
    finished_before: int
    target: int | None
    # budget | trials | timeout | grid-exhausted | nothing-to-do | interrupted | failing
    stopped_by: str
    message: str | None = None  # why a worker that was `failing` stopped itself
    study: Any = None  # the optuna.Study it ran (no second connection to read it again)
    # With `--jobs N`, all workers together (one worker: these stay empty):
    errors: list[str] = field(default_factory=list)  # each distinct SweeperError, once
    lost: list[str] = field(default_factory=list)  # workers that died (a signal, a crash)
    interrupted: str | None = None  # why, when Ctrl-C or SIGTERM stopped the workers
    exit_codes: dict[int, int | None] = field(default_factory=dict)  # by worker index


class TrialLog(Protocol):
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
                  ) -> AbstractContextManager[TrialLog]: ...

    def trial_ended(self, study: optuna.Study, outcome: TrialOutcome) -> None: ...

    def trial_lost(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                   reason: str) -> None:
        """Another worker's trial was found lost (see `heartbeat`): end its run."""
        ...

    def after_writes(self, fn: Callable[[], None]) -> None:
        """Call `fn` once every write queued so far has been made (or at once)."""
        ...

    def end_study(self, study: optuna.Study, *, interrupted: bool) -> None: ...


# --------------------------------------------------------------------------------------
# Opening the study
# --------------------------------------------------------------------------------------
def open_or_create(spec: StudySpec, storage_url: str, *, create: bool = True,
                   seed_offset: int = 0) -> tuple[optuna.Study, bool]:
    """Create the study or resume it (a stored study with other directions is refused),
    and whether this call created it (of workers that start together, exactly one did:
    the storage keeps study names unique)."""

    storage = open_storage(storage_url)
    sampler = samplers.build_sampler(spec, seed_offset=seed_offset)
    pruner = samplers.build_pruner(spec)
    # Retried whole through a database blip: a study created by an attempt whose answer
    # was lost is found (and loaded) by the next.
    return retrying.retry(lambda: _open_or_create(spec, storage, storage_url, sampler,
                                                  pruner, create),
                          f"open study {spec.name!r} in {redact(storage_url)}")


def _open_or_create(spec: StudySpec, storage: optuna.storages.BaseStorage, storage_url: str,
                    sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner,
                    create: bool) -> tuple[optuna.Study, bool]:
    import optuna
    import sqlalchemy.exc

    created = False
    try:
        existing = _stored_directions(storage, spec.name)
        if existing is not None and existing != spec.directions:
            raise StorageError(
                f"study {spec.name!r} in {redact(storage_url)} optimizes {existing}, but the "
                f"study file says {spec.directions}; rename the study or restore the "
                f"objective")
        if existing is None and not create:
            raise StorageError(f"no study {spec.name!r} in {redact(storage_url)}")
        study = None
        if existing is None:
            try:
                study = optuna.create_study(study_name=spec.name, storage=storage,
                                            sampler=sampler, pruner=pruner,
                                            directions=spec.directions)
                created = True
                study._storage.set_study_system_attr(study._study_id, ATTR_SPEC,
                                                     spec.model_dump(mode="json"))
            except optuna.exceptions.DuplicatedStudyError:  # another worker was first
                study = None
        if study is None:
            study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler,
                                      pruner=pruner)
        if study.metric_names is None:
            # Optuna's own tools (the dashboard, `optuna best-trial`) then name the
            # objectives; a study made before sweeper set them gets them on resume.
            with warnings.catch_warnings():  # experimental in Optuna, stable in use
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([o.metric for o in spec.objective_list])
    except sqlalchemy.exc.SQLAlchemyError as exc:
        if retrying.is_transient(exc):
            raise  # retried by the caller
        raise StorageError(f"Optuna storage {redact(storage_url)} failed: "
                           f"{str(exc).splitlines()[0]}") from exc
    return study, created


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
    """Trials that count against `budget.trials`: complete, pruned or failed, all workers
    and restarts together; a lost trial that was re-queued counts once, as its retry."""
    return StudyQueries(rdb_of(study), study._study_id).budget_count()


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
    heartbeat: HeartbeatSettings = field(default_factory=HeartbeatSettings)
    # This worker stops itself after so many trials in a row fail for reasons outside
    # their params (a broken GPU, a full disk): its trials would all fail the same way.
    max_worker_failures: int = 3
    # Draw from the study file's seed even if the study exists (`--jobs`: its first worker,
    # when the study was created just before); otherwise only the worker that creates the
    # study does, so that one fresh run repeats exactly and workers never propose alike.
    keep_seed: bool = False
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


ProgressCallback = Callable[[str, dict[str, Any]], None]
# What trains one trial: (worker, trial, config, tracking run or None) -> (objective
# values, summary metrics). `Worker.train` by default; a stand-in for benchmarks of the
# loop itself (see benchmarks/parallel_scaling.py).
Objective = Callable[["Worker", "optuna.Trial", TrialConfig, Any],
                     tuple[list[float], dict[str, float]]]


class Worker:
    """Runs trials of one study in this process."""

    def __init__(self, spec: StudySpec, options: RunOptions,
                 tracker: StudyTracker | None = None,
                 progress: ProgressCallback | None = None,
                 objective: Objective | None = None) -> None:
        from sweeper.ml.device import resolve_device

        self.spec = spec
        self.options = options
        self.device: torch.device = resolve_device(options.device)
        self.tracker = tracker
        self.progress = progress or (lambda event, info: None)
        self.objective: Objective = objective or Worker.train
        self.stop = StopPolicy(options.more_trials, options.heartbeat)
        # Heartbeats of finished trials whose runs are still being written (`_tell`).
        self._ending_beats: set[Callable[[], None]] = set()

    # -- data ---------------------------------------------------------------------------
    def dataset(self, cfg: DatasetConfig) -> Dataset:
        """The dataset for a trial, from the data module's per-process cache: loaded again
        only when a searched key changes its tensors (augmentation does not)."""
        from sweeper.ml.data import load_dataset

        return load_dataset(cfg, device=self.device, data_dir=self.options.data_dir)

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> RunReport:
        spec, options = self.spec, self.options
        # An unreachable tracking store, then a missing dataset: both are the user's to fix,
        # before any study is written. The store is checked (a fresh one created: seconds
        # of MLflow migrations) while the dataset loads, off the way to the first batch.
        with stopping.interruptible():  # nothing is written yet: a signal stops at once
            self._check_tracking_while(lambda: self.dataset(spec.dataset))
        study, created = open_or_create(spec, options.storage)
        if not (created or options.keep_seed):
            # Another worker, or an earlier run, already draws from the file's seed: the
            # same seed here would propose the same params again.
            study.sampler = samplers.build_sampler(spec,
                                                   seed_offset=samplers.fresh_seed_offset())
        if self.tracker is not None:
            self.tracker.start_study(study, spec)
        queries = StudyQueries(rdb_of(study), study._study_id)
        finished_before = queries.budget_count()
        target = None if options.more_trials is not None else spec.budget.trials
        timeout = options.timeout if options.timeout is not None else spec.budget.timeout
        started = time.monotonic()
        outcomes: list[TrialOutcome] = []
        stopped_by = "budget"
        message = None
        failing = 0  # trials in a row that failed for reasons outside their params
        self.progress("start", {"study": study, "finished": finished_before, "target": target,
                                "more": options.more_trials})
        try:
            while True:
                stopping.raise_if_stopped()
                self.fail_lost_trials(study)
                reason = self.stop.reason(study, queries, len(outcomes), target, started,
                                          timeout)
                if reason is not None:
                    stopped_by = reason
                    if reason in ("budget", "grid-exhausted") and self.stop.wait_for_silent(
                            queries, ran_trials=bool(outcomes)):
                        continue
                    if reason == "budget" and not outcomes:
                        stopped_by = "nothing-to-do"
                    break
                ended = self.run_trials(study, queries, len(outcomes), target)
                self.stop.trial_ran()
                for outcome in ended:
                    outcomes.append(outcome)
                    self.progress("trial", {"outcome": outcome, "study": study})
                stopping.checkpoint("between-trials")
                halt = None
                for outcome in ended:
                    full = self._disk_full(outcome)
                    if full is not None:
                        halt = ("disk-full", full)
                        break
                    failing = failing + 1 if outcome.cause == "environment" else 0
                    if failing >= options.max_worker_failures:
                        halt = ("failing", (
                            f"worker {options.worker} stopped: its last {failing} trials "
                            f"failed for reasons outside their params (last: "
                            f"{outcome.reason}); fix this machine and run again"))
                        log.error("%s", halt[1])
                        break
                if halt is not None:
                    stopped_by, message = halt
                    break
        except KeyboardInterrupt as stop:
            stopped_by = "interrupted"
            if isinstance(stop, stopping.Stopped) and not hasattr(stop, "recorded"):
                stop.recorded = "no trial was running"  # type: ignore[attr-defined]
            raise
        finally:
            if self.tracker is not None:
                stopping.checkpoint("in-end-study")
                try:
                    self.tracker.end_study(study, interrupted=stopped_by == "interrupted")
                finally:
                    while self._ending_beats:  # written, or given up
                        with contextlib.suppress(KeyError):  # one just stopped itself
                            self._ending_beats.pop()()
            self.progress("end", {"study": study, "stopped_by": stopped_by})
        if stopped_by == "disk-full":
            raise DiskFull(f"{message}; free some space and run again (the study resumes)")
        if stopping.requested() is not None:  # arrived while the study ended: still a stop
            stop = stopping.Stopped(stopping.requested() or "interrupted")
            stop.recorded = "every trial was recorded before the stop"  # type: ignore[attr-defined]
            raise stop
        return RunReport(spec.name, options.storage, outcomes, finished_before, target,
                         stopped_by, message, study)

    def _disk_full(self, outcome: TrialOutcome) -> str | None:
        """Why this worker must stop for a full disk (the trial's, or tracking's), or None:
        every trial after it would fail, or lose its record, the same way."""
        if outcome.cause == "disk-full":
            return f"the disk is full: trial {outcome.number} failed ({outcome.reason})"
        full = getattr(self.tracker, "disk_full", None)
        if full:
            return f"the disk is full: {full}"
        return None

    def _check_tracking_while(self, load: Callable[[], object]) -> None:
        """`load()` with the tracker's check running beside it on a thread; a tracking
        problem is raised first, as if checked before."""
        if self.tracker is None:
            load()
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sweeper-check") as pool:
            checked = pool.submit(self.tracker.check)
            try:
                load()
            except BaseException:
                checked.result()
                raise
            checked.result()

    def fail_lost_trials(self, study: optuna.Study) -> None:
        """Fail and re-queue the trials whose workers vanished (see `heartbeat`)."""
        on_lost = self.tracker.trial_lost if self.tracker is not None else None
        try:
            heartbeat.fail_lost_trials(study, self.options.heartbeat, on_lost=on_lost)
        except Exception as exc:  # the storage's trouble shows in the trial that follows
            log.warning("could not check for lost trials: %s", one_line(str(exc)))

    def run_trials(self, study: optuna.Study, queries: StudyQueries, ran: int,
                   target: int | None) -> list[TrialOutcome]:
        """The next trial, or with `pack` > 1 the next pack of trials that train together
        (`packed_trials`): as many as the budget and `--trials` leave room for."""
        room = self.spec.pack if self.objective is Worker.train else 1
        if room > 1 and self.options.more_trials is not None:
            room = min(room, self.options.more_trials - ran)
        if room > 1 and target is not None:
            counts = queries.counts()
            room = min(room, target - queries.budget_count(counts) - counts.get("RUNNING", 0))
        if room > 1:
            from sweeper.search.packed_trials import run_pack

            return run_pack(self, study, room)
        return [self.run_trial(study)]

    def run_trial(self, study: optuna.Study) -> TrialOutcome:
        """One trial: ask, suggest, fit and evaluate (the objective), tell, with the trial's
        heartbeat going all the while. Returns how the trial ended; raises only
        KeyboardInterrupt (after telling Optuna) and StorageError (an outage that outlasted
        the retries). Every way a trial ends maps to one state (`endings.ending_of`).

        Everything but the training runs with signals deferred (see `stopping`): a stop
        that arrives while the trial is asked for, its run created or its result told
        takes effect when training starts (the trial then ends FAIL, interrupted) or
        before the next trial."""
        trial = self._ask(study)
        stopping.checkpoint("after-ask")
        settings = self.options.heartbeat
        with contextlib.suppress(StorageError):  # readers fall back to their own settings
            rdb_of(study).set_trial_system_attr(trial._trial_id, ATTR_HEARTBEAT,
                                                settings.as_attr())
        with heartbeat.beating(rdb_of(study), trial._trial_id, settings):
            return self.attempt(study, trial)

    def attempt(self, study: optuna.Study, trial: optuna.Trial) -> TrialOutcome:
        """An asked trial, its heartbeat going: suggest, fit and evaluate (the objective),
        tell. A pack's member left on its own trains through this too."""
        outcome = TrialOutcome(trial.number, Outcome.FAIL)
        started = time.monotonic()
        try:
            config = self._suggest(study, trial, outcome)
            with self._trial_run(trial, config) as run, stopping.interruptible():
                values, metrics = self.objective(self, trial, config, run)  # fit, evaluate
                outcome.values, outcome.metrics = values, metrics
                outcome.ended(COMPLETED)
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (see `stopping`)
            # A stop that lands as a completed trial's run closes keeps its result.
            outcome.ended(dataclasses.replace(ending_of(stop), state=outcome.state))
            outcome.seconds = time.monotonic() - started
            with stopping.deferred():
                self._tell(study, trial, outcome)
            stop.recorded = (  # type: ignore[attr-defined]
                f"the running trial was recorded as {outcome.state} (#{trial.number})"
                + (f" and re-queued as #{outcome.retry}" if outcome.retry is not None
                   else ""))
            raise
        except Exception as exc:  # any error fails this trial, never the study
            outcome.ended(ending_of(exc, device=self.device))
            if outcome.detail:
                log.debug("trial %d failed:\n%s", trial.number, outcome.detail)
        finally:
            # After the except blocks: the exception and its frames (the model, the
            # batch) are gone, so their memory can actually be returned.
            from sweeper.ml.device import free_device_memory

            free_device_memory(self.device)
        outcome.seconds = time.monotonic() - started
        self._tell(study, trial, outcome)
        return outcome

    def _ask(self, study: optuna.Study) -> optuna.Trial:
        """`study.ask()`, retried through a database blip. An attempt whose commit landed
        although its answer was lost leaves a trial that never beats: the heartbeat rules
        take it back like any lost one."""
        return retrying.retry(study.ask, "ask the Optuna storage for a new trial")

    def _suggest(self, study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome
                 ) -> TrialConfig:
        """The trial's config from the space (validated), recorded in the trial; a grid
        point that another worker already trains fails here."""
        trial.set_user_attr(ATTR_WORKER, self.options.worker)
        config = space.suggest(trial, self.spec)
        outcome.params = dict(trial.params)
        samplers.check_grid_point(study, trial)
        study._storage.set_trial_system_attr(trial._trial_id, ATTR_CONFIG, config.flat())
        return config

    @contextlib.contextmanager
    def _trial_run(self, trial: optuna.Trial, config: TrialConfig) -> Iterator[Any]:
        if self.tracker is None:
            yield None
            return
        with self.tracker.trial_run(trial, config) as run:
            yield run

    def train(self, trial: optuna.Trial, config: TrialConfig, run: Any
              ) -> tuple[list[float], dict[str, float]]:
        """The default objective: build, fit (reporting each epoch), evaluate, log."""
        import optuna

        from sweeper.ml.models import build_model
        from sweeper.ml.train import fit, seed_everything

        data = self.dataset(config.dataset)
        if run is not None and hasattr(run, "log_data"):
            run.log_data(data)  # the dataset as the run's input
        seed_everything(config.train.seed)  # the same seed gives the same initial weights
        model = build_model(config.model, data.input_shape, data.num_classes,
                            data_dir=self.options.data_dir)
        result = fit(model, data, config.train, epochs=config.epochs, device=self.device,
                     augment=config.dataset.augment,
                     on_epoch=self.epoch_hook(trial, config, run))
        if result.stopped_early:
            raise optuna.TrialPruned(self.pruned_reason(result.history))
        return self.complete(trial, config, run, model, data, result)

    def pruned_reason(self, history: list[dict[str, float]]) -> str:
        watched = self.spec.objective_list[0].metric
        last = history[-1]
        return f"pruned at epoch {int(last['epoch'])} ({watched}={last[watched]:.4g})"

    def epoch_hook(self, trial: optuna.Trial, config: TrialConfig, run: Any
                   ) -> Callable[[int, dict[str, float]], bool]:
        """What runs after each epoch of a trial: log, report to the pruner, stop?"""
        pruning = self.spec.pruner.name != "none"
        watched = self.spec.objective_list[0].metric

        def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
            stopping.raise_if_stopped()
            with stopping.deferred():  # the epoch's records reach the stores whole
                return record_epoch(epoch, metrics)

        def record_epoch(epoch: int, metrics: dict[str, float]) -> bool:
            if run is not None:
                run.log_epoch(epoch, metrics)
            self.progress("epoch", {"trial": trial.number, "epoch": epoch,
                                    "epochs": config.epochs, "metrics": metrics})
            if not pruning:
                return False
            trial.report(metrics[watched], epoch)
            return trial.should_prune()

        return on_epoch

    def complete(self, trial: optuna.Trial, config: TrialConfig, run: Any, model: Any,
                 data: Dataset, result: FitResult) -> tuple[list[float], dict[str, float]]:
        """A trial trained to its last epoch: evaluate, record, return its objective
        values and summary metrics."""
        from sweeper.ml.metrics import evaluate, evaluate_logits, prefixed
        from sweeper.ml.models import count_parameters

        objectives = self.spec.objective_list
        # Validation: the last epoch's pass already holds its logits. Test: once, here,
        # for a completed trial only.
        assert result.val_logits is not None
        val = evaluate_logits(result.val_logits, data.val.y, data.classes)
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
        with stopping.deferred():
            trial.study._storage.set_trial_system_attr(trial._trial_id, ATTR_METRICS, summary)
            if run is not None:
                run.log_result(model=model, data=data, history=result.history,
                               evaluations={"val": val, "test": test}, metrics=metrics,
                               values=values)
        return values, summary

    def _tell(self, study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome) -> None:
        """Record the outcome in Optuna, then in tracking. Retried through a database blip
        and idempotent: an attempt that landed although its answer was lost is not told
        twice. A trial that another worker took back meanwhile (its heartbeat looked
        lost) keeps the state it was given there; this worker says so and goes on."""
        from optuna.trial import TrialState

        state = TrialState[Outcome(outcome.state).value]
        # An exception's text may hold a URL with a password: redacted before it is
        # stored (Optuna attr here, MLflow tag and error.txt in `trial_ended`).
        outcome.reason = redact_text(outcome.reason) if outcome.reason else outcome.reason
        outcome.detail = redact_text(outcome.detail) if outcome.detail else outcome.detail
        storage = rdb_of(study)
        if outcome.reason:
            with contextlib.suppress(Exception):  # a finished trial's attrs cannot change
                storage.set_trial_user_attr(trial._trial_id, ATTR_REASON, outcome.reason)
        stopping.checkpoint("in-tell")

        def tell() -> optuna.trial.FrozenTrial:
            if storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                with contextlib.suppress(UpdateFinishedTrialError, ValueError):
                    # Finished meanwhile: taken back, or an earlier attempt landed.
                    if state == TrialState.COMPLETE:
                        study.tell(trial, outcome.values, skip_if_finished=True)
                    else:
                        study.tell(trial, state=state, skip_if_finished=True)
            return storage.get_trial(trial._trial_id)

        from optuna.exceptions import UpdateFinishedTrialError

        try:
            stored = retrying.retry(tell, f"record trial {trial.number}")
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"could not record trial {trial.number} in Optuna storage: "
                               f"{one_line(str(exc))}") from exc
        if stored.state != state and stored.state.is_finished():
            taken = str(stored.user_attrs.get(ATTR_REASON) or "taken back")
            log.warning("trial %d was taken back by another worker while it ran here (%s); "
                        "it stays %s there and this worker goes on", trial.number, taken,
                        stored.state.name)
            outcome.state = Outcome(stored.state.name)
            outcome.reason = f"taken back: {taken}"
            outcome.cause = "taken-back"
        elif outcome.interrupted and stored.state == TrialState.FAIL:
            # Stopped by a person or a scheduler, not by its params: the next run trains
            # it again first (once, as a lost trial), and the copy stands in for it in the
            # budget.
            try:  # not retried: a create that landed but whose answer was lost would
                # queue two copies
                outcome.retry = heartbeat.requeue(study, stored)
            except Exception as exc:  # the FAIL is recorded; the copy is a convenience
                log.warning("trial %d: could not re-queue it: %s", trial.number, exc)
        if self.tracker is not None:
            self.tracker.trial_ended(study, outcome)
            # The run ends once its queued uploads are written. Until then the trial keeps
            # beating, so that no other worker takes the run for one whose worker died
            # mid-upload (`fleet.liveness`).
            stop_beating = heartbeat.start_beating(storage, trial._trial_id,
                                                   self.options.heartbeat, now=False)
            self._ending_beats.add(stop_beating)

            def written() -> None:
                stop_beating()
                self._ending_beats.discard(stop_beating)

            self.tracker.after_writes(written)


def _is_summary_metric(key: str) -> bool:
    """The scalar metrics kept in Optuna (per-class ones go to MLflow only)."""
    if key in ("train_seconds", "n_params", "epochs_run"):
        return True
    _, _, name = key.partition("_")
    return name in ("accuracy", "loss", "f1_macro", "f1_weighted", "precision_macro",
                    "recall_macro", "precision_weighted", "recall_weighted", "auc_macro",
                    "auc_micro")


def run_study(spec: StudySpec, options: RunOptions, *, tracker: StudyTracker | None = None,
              progress: ProgressCallback | None = None, objective: Objective | None = None
              ) -> RunReport:
    """Run a study to its budget (or `more_trials` more) in this process."""
    return Worker(spec, options, tracker=tracker, progress=progress,
                  objective=objective).run()
