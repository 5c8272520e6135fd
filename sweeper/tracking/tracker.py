"""The study side of MLflow tracking: one experiment and one parent run per study, the
trial runs it opens (`trial_run.py`), the best-so-far record, the model registry, and the
statuses that mirror Optuna's states (DESIGN §2, §4, §6).

`MlflowTracker` implements `sweeper.search.study.StudyTracker`; the study loop calls it and never
MLflow itself. Choices worth knowing:

- Every call goes through an explicit `MlflowClient(tracking_uri)`: no global tracking URI,
  no active run. Models are written with `mlflow.pytorch.save_model` into a temporary
  folder and attached to a LoggedModel created through the same client, which is what
  `mlflow.pytorch.log_model` does minus its global state, its requirement inference (a
  subprocess, ~6 s a model) and its re-reading of every metric history of the run.
- One background thread sends, in order, everything that need not block training: metric
  batches, model files, figures, registry updates and the final status of each run. The
  next trial trains while the last one uploads; the queue is at most one trial behind
  (`trial_run` waits for older runs) and `end_study` waits for all of it, so no run ends
  with metrics in flight and none is left RUNNING. Not MLflow's own
  `log_batch(synchronous=False)`: `set_terminated` shuts its queue down and joins its
  thread, which cost 0.5-1 s per trial in measurements.
- `MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT` defaults to true: MLflow would print two
  "View run" lines (and fetch the run once more) for every trial.
- Tracking must never cost an Optuna result. Every MLflow call is guarded: a failure is a
  one-line warning, the trial's remaining logging is skipped, and after `max_failures`
  failures in a row the store is taken to be *away*: calls are skipped (none waits on a
  server that is down) and the store is asked again every `guard.REPROBE_S` before a trial and
  at the end. Once it answers, tracking resumes, and at the end of the run what it missed
  is filled in from Optuna's record (`repair.fill_in_runs`); what still could not be sent
  is listed in `unsent` (the CLI says so) and `sweeper reap` repairs it later. Only
  `check()` (before any trial exists) and `start_study` raise `TrackingError`.
- At start, a worker ends the runs left RUNNING for trials that Optuna has finished (a
  worker killed with its uploads queued).
- mlflow is imported inside the functions: `sweeper --help` must stay instant.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sweeper.errors import TrackingError
from sweeper.keys import (
    ATTR_EXPERIMENT,
    ATTR_PARENT_RUN,
    ATTR_RUN_ID,
    ATTR_WORKER,
    TAG_CHANGED_SETTINGS,
    TAG_OBJECTIVES,
    TAG_PRIMARY_METRIC,
    TAG_PRUNER,
    TAG_ROLE,
    TAG_SAMPLER,
    TAG_STUDY,
    TAG_TRIAL,
)
from sweeper.search.storage import redact
from sweeper.tracking import best
from sweeper.tracking.common import (
    HTTP_ENV_DEFAULTS,
    REASON_MAX_CHARS,
    chunks,
    http_env,
    one_line,
    param_value,
    racing,
)
from sweeper.tracking.guard import CallGuard
from sweeper.tracking.probe import check_store
from sweeper.tracking.trial_run import LoggedModel, TrialRun
from sweeper.uris import (
    client_uri,
    default_artifact_root,
    is_http,
    sqlite_path,
)

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from sweeper.search.study import TrialOutcome
    from sweeper.spec.config import StudySpec, TrialConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

# A second worker that finds the experiment just created waits this long for the first
# worker's parent run, instead of racing to create its own.
PARENT_WAIT_S = 10.0
PARENT_RECENT_S = 120.0
# How many finished trials may still have uploads queued when the next one starts.
MAX_TRIALS_BEHIND = 1


# --------------------------------------------------------------------------------------
class MlflowTracker(CallGuard):
    """A `StudyTracker` backed by MLflow: see the module docstring.

    Per-trial tracking time is summed in `seconds` (by operation) so that the overhead of
    tracking can be measured and reported; `failures` keeps the warnings that were issued.
    The model registry holds the best model of a single-objective study under the study's
    name with alias `best`; a multi-objective study has no single best model, so it
    registers nothing (its Pareto front is in the parent run's tags and figures).
    """

    def __init__(self, tracking_uri: str | None = None, *,
                 artifact_location: str | None = None, max_failures: int = 3,
                 device: str | None = None, worker: str | None = None) -> None:
        # A bare postgresql:// would make SQLAlchemy look for psycopg 3; sweeper ships psycopg2.
        # Nothing is created yet: folders appear in `check`/`start_study`, not on a typo.
        self.tracking_uri = client_uri(tracking_uri)
        self.artifact_root = artifact_location or default_artifact_root(self.tracking_uri)
        self.device = device
        self.worker = worker  # "host:pid" of the process, a tag on its trial runs
        if is_http(self.tracking_uri):
            for key, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        super().__init__(redact(self.tracking_uri), max_failures=max_failures)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._client: MlflowClient | None = None
        self._spec: StudySpec | None = None
        self._runs: dict[int, TrialRun] = {}  # open, or ended by their context only
        self._behind: deque[TrialRun] = deque()  # runs that may have uploads queued
        self.models: dict[int, LoggedModel] = {}  # by trial number
        self._registry_ready = False
        self._best_number: int | None = None
        self._ended_here = 0  # trials that ended in this process since start_study
        self._ended: dict[int, TrialRun | None] = {}  # trials ended here, and their runs
        self.unsent: list[int] = []  # trials whose MLflow record is incomplete (at the end)
        self.parent_unsent = False  # the parent run could not be ended

    # -- plumbing -----------------------------------------------------------------------
    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    @property
    def spec(self) -> StudySpec:
        """The study being tracked (set by `start_study`)."""
        if self._spec is None:
            raise RuntimeError("start_study() was not called")
        return self._spec

    def probe(self) -> None:
        with http_env(retries=0, timeout=5):
            self.client.search_experiments(max_results=1)

    def wait_queued(self) -> None:
        """Block until every background call queued so far, and every trial's uploads, have
        run."""
        super().wait_queued()
        while self._behind:
            self._behind.popleft().wait()

    # -- before anything is written ---------------------------------------------------
    def check(self) -> None:
        """Raise TrackingError (one line, within 15 s) if the store cannot be used: called
        before any Optuna study or trial is written."""
        with self.timed("check"):
            check_store(self.tracking_uri, lambda: self.client,
                        escape="or run with --no-tracking")

    def _prepare_local(self, *, artifacts: bool) -> None:
        """Create a local store's folders: the SQLite file's (before MLflow opens it) and,
        once the store answered, the artifact root."""
        path = sqlite_path(self.tracking_uri)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if artifacts and self.artifact_root and self.artifact_root.startswith("file://"):
            from urllib.parse import unquote, urlparse

            Path(unquote(urlparse(self.artifact_root).path)).mkdir(parents=True,
                                                                   exist_ok=True)

    # -- the study ------------------------------------------------------------------------
    def start_study(self, study: optuna.Study, spec: StudySpec) -> None:
        """Find or create the experiment and the study's one parent run, and link both to
        the Optuna study. Raises TrackingError: a study is not started half-tracked."""
        self._spec = spec
        self._runs.clear()
        self._behind.clear()
        self.models.clear()
        self._queued.clear()
        self._registry_ready = False
        self._best_number = None
        self._ended_here = 0
        self._ended.clear()
        self.unsent = []
        self.parent_unsent = False
        if self.disabled:
            return
        with self.timed("start_study"):
            try:
                self._prepare_local(artifacts=True)
                self.experiment_id, founder = self._experiment(spec.name)
                # MLflow's UI charts this metric first (parallel coordinates, runs table).
                self.client.set_experiment_tag(self.experiment_id, TAG_PRIMARY_METRIC,
                                               spec.objective_list[0].metric)
                parent = self._parent_run(study, self.experiment_id, spec.name, founder)
                self.parent_run_id = parent.info.run_id
                study.set_user_attr(ATTR_PARENT_RUN, self.parent_run_id)
                study.set_user_attr(ATTR_EXPERIMENT, self.experiment_id)
                if parent.info.status != "RUNNING":  # resumed: the study runs again
                    self.client.update_run(self.parent_run_id, status="RUNNING")
                # Params, tags and the study file: nothing waits for them, so the first
                # trial starts while they upload.
                self.queue("describe the parent run", self._describe_parent, parent, spec)
                self._end_orphans(study)
            except TrackingError:
                raise
            except Exception as exc:
                raise TrackingError(f"MLflow ({self.where}) could not start tracking study "
                                    f"{spec.name!r}: {one_line(exc)}") from exc

    def _end_orphans(self, study: optuna.Study) -> None:
        """End the runs left RUNNING for trials Optuna has finished (their worker was
        killed with the run's end still queued), with the trial's state."""
        from sweeper.fleet import liveness
        from sweeper.tracking.repair import reap_runs

        assert self.experiment_id is not None
        running = self.client.search_runs(
            [self.experiment_id], max_results=1000,
            filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_ROLE}` = 'trial'")
        numbers = {int(r.data.tags[TAG_TRIAL]) for r in running
                   if r.data.tags.get(TAG_TRIAL, "").isdigit()}
        if not numbers:
            return
        storage = study._storage
        trials: list[optuna.trial.FrozenTrial] = []
        for number in numbers:
            try:
                trials.append(storage.get_trial(
                    storage.get_trial_id_from_study_id_trial_number(study._study_id, number)))
            except KeyError:
                continue
        # Only the runs looked up here: another worker may have opened one since. A run
        # whose worker has told Optuna but is still writing it is that worker's to end.
        for ended in reap_runs(self.client, self.experiment_id, trials=trials,
                               parent_run_id=None, study_running=True,
                               only_trials={t.number for t in trials},
                               still_ending=liveness.still_ending(study, trials)):
            log.warning("ended run %s left RUNNING by a worker that stopped: %s (%s)",
                        ended.name, ended.status, ended.reason)

    def _experiment(self, name: str) -> tuple[str, bool]:
        """The experiment's id, and whether this call created it."""
        from mlflow.exceptions import MlflowException

        client = self.client
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = f"{self.artifact_root}/{name}" if self.artifact_root else None
            try:
                return client.create_experiment(name, artifact_location=location,
                                                tags={TAG_STUDY: name}), True
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)  # another worker was first
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            log.warning("MLflow experiment %r was deleted; restoring it for this study", name)
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id, False

    def _parent_run(self, study: optuna.Study, experiment_id: str, name: str,
                    founder: bool) -> Run:
        """The study's one parent run, shared by every worker and found again on resume.

        1. The Optuna study remembers it (`mlflow_parent_run_id`).
        2. Else a search by tags finds it (the attr was lost, or another worker set it).
        3. Else the worker that created the experiment creates it; another worker that
           finds a fresh experiment waits for it rather than racing. Whoever does create
           one searches again afterwards and, if several exist, keeps the oldest
           (deterministic for all workers) and deletes its own.
        """
        from mlflow.exceptions import MlflowException

        client = self.client
        remembered = study.user_attrs.get(ATTR_PARENT_RUN)
        if remembered:
            try:
                run = client.get_run(remembered)
            except MlflowException:
                run = None
            if (run is not None and run.info.experiment_id == experiment_id
                    and run.info.lifecycle_stage == "active"):
                return run
        parents = self._search_parents(experiment_id, name)
        if not parents and not founder:
            experiment = client.get_experiment(experiment_id)
            age_s = time.time() - (experiment.creation_time or 0) / 1000
            deadline = time.monotonic() + (PARENT_WAIT_S if age_s < PARENT_RECENT_S else 0)
            while not parents and time.monotonic() < deadline:
                time.sleep(0.5)
                parents = self._search_parents(experiment_id, name)
        if parents:
            return parents[0]
        mine = client.create_run(experiment_id, run_name=name,
                                 tags={TAG_STUDY: name, TAG_ROLE: "parent"})
        parents = self._search_parents(experiment_id, name) or [mine]
        chosen = parents[0]
        if chosen.info.run_id != mine.info.run_id:
            client.delete_run(mine.info.run_id)
        return chosen

    def _search_parents(self, experiment_id: str, name: str) -> list[Run]:
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG_STUDY}` = '{name}' and tags.`{TAG_ROLE}` = 'parent'",
            max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def _describe_parent(self, parent: Run, spec: StudySpec) -> None:
        """Params (settings of the search), tags and the study file, on the parent run."""
        from mlflow.entities import RunTag

        wanted = _study_params(spec)
        existing = self._log_new_params(parent, wanted)
        # Params cannot change in MLflow: a resumed study with an edited file keeps the
        # first values as params and records the edited ones in a tag.
        changed = sorted(k for k, v in wanted.items() if k in existing and existing[k] != v)
        tags = {TAG_STUDY: spec.name, TAG_ROLE: "parent",
                TAG_SAMPLER: spec.sampler.name, TAG_PRUNER: spec.pruner.name,
                TAG_OBJECTIVES: ", ".join(f"{o.metric} ({o.direction})"
                                                for o in spec.objective_list)}
        if spec.description:
            tags["mlflow.note.content"] = spec.description
        if changed:
            tags[TAG_CHANGED_SETTINGS] = ", ".join(
                f"{k}={wanted[k]}" for k in changed)[:REASON_MAX_CHARS]
        racing(self.client.log_batch, parent.info.run_id,
               tags=[RunTag(k, v) for k, v in tags.items()])
        with tempfile.TemporaryDirectory(prefix="sweeper-study-") as tmp:
            target = Path(tmp, "study.yaml")
            source = Path(spec.source) if spec.source else None
            if source is not None and source.is_file():
                target.write_bytes(source.read_bytes())
            else:
                import yaml

                target.write_text(yaml.safe_dump(spec.model_dump(mode="json"),
                                                 sort_keys=False))
            self.client.log_artifacts(parent.info.run_id, tmp)

    def _log_new_params(self, parent: Run, wanted: dict[str, str]) -> dict[str, str]:
        """Log those of `wanted` the parent run lacks; return those it had from earlier
        runs or other workers. Workers that start together describe the same parent at
        once: one that finds a param written since it looked (a unique-key error, or a
        different value) looks again."""
        from mlflow.entities import Param

        def log_missing(existing: dict[str, str]) -> dict[str, str]:
            new = [Param(k, v) for k, v in wanted.items() if k not in existing]
            for chunk in chunks(new, 100):
                self.client.log_batch(parent.info.run_id, params=chunk)
            return existing

        existing = parent.data.params
        for pause in (0.2, 0.4):
            try:
                return log_missing(existing)
            except Exception:
                time.sleep(pause)
                existing = self.client.get_run(parent.info.run_id).data.params
        return log_missing(existing)

    # -- one trial --------------------------------------------------------------------------
    @contextlib.contextmanager
    def trial_run(self, trial: optuna.Trial, config: TrialConfig) -> Iterator[TrialRun]:
        """The trial's nested run, open while it trains.

        On an exception (pruned, failed, Ctrl-C) the run's end is queued at once, so that
        no run is left RUNNING whatever happens next; `trial_ended` then only completes its
        record with the reason Optuna got. A run that ends normally stays open until
        `trial_ended` gives it its final status (or `end_study` closes it as FAILED).
        Before a new run opens, runs more than `MAX_TRIALS_BEHIND` trials old are waited
        for, so uploads never pile up behind fast trials.
        """
        # Runs still open in their own context are trials packed with this one (see
        # `packed_trials`): they are training, not unreported.
        self._close_unreported("sweeper did not report how this trial ended", open_too=False)
        self.available()  # the store may be back
        with self.timed("trial.wait"):
            while len(self._behind) > MAX_TRIALS_BEHIND:
                self._behind.popleft().wait()
        run = TrialRun(self, trial, config)
        with self.timed("trial.open"):
            run.open()
        self._runs[trial.number] = run
        self._behind.append(run)
        run.in_context = True
        try:
            yield run
        except BaseException as exc:
            with self.timed("trial.end"):
                run.abort(exc)
            raise
        finally:
            run.in_context = False
            run.stop_system_metrics()  # training is over, whatever ended it

    def trial_ended(self, study: optuna.Study, outcome: TrialOutcome) -> None:
        """Give the trial's run its final status and bring the parent's `best` up to date."""
        self._ended_here += 1
        run = self._runs.pop(outcome.number, None)
        self._ended[outcome.number] = run
        if run is not None:
            with self.timed("trial.end"):
                run.finish(outcome)
        if outcome.state == "COMPLETE" and not self.disabled and self.parent_run_id:
            with self.timed("parent.best"):
                self._update_best(study, outcome)

    def trial_lost(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                   reason: str) -> None:
        """End the run of a trial whose worker vanished (found by this worker): FAILED with
        the reason, now (its own worker will never do it)."""
        from sweeper.tracking.repair import end_lost_run

        run_id = trial.user_attrs.get(ATTR_RUN_ID)
        if run_id:
            self.call(f"end the run of lost trial {trial.number}", end_lost_run, self.client,
                      run_id, reason)

    def _close_unreported(self, reason: str, status: str = "FAILED", *,
                          open_too: bool = True) -> None:
        for number in list(self._runs):
            if not open_too and self._runs[number].in_context:
                continue
            run = self._runs.pop(number)
            run.close_unreported(reason, status)

    # -- best so far ----------------------------------------------------------------------
    def beats_best(self, study: optuna.Study, values: list[float]) -> bool:
        return best.beats_best(study, values)

    def _update_best(self, study: optuna.Study, outcome: TrialOutcome) -> None:
        """Parent metrics and `best.*` tags; the registry alias (see `best`)."""
        assert self.parent_run_id is not None
        update = best.best_so_far(study, outcome.number, self._best_number, self.models)
        if update is None:
            return
        self._best_number = update.number
        if update.register is not None:
            # Queued after the model's upload: registered once its files exist.
            self.queue("register the best model", self._register, *update.register)
        # Racing: every worker's first best inserts the same new keys on the one parent.
        self.queue("log the parent run's best", racing, self.client.log_batch,
                   self.parent_run_id, metrics=update.metrics, tags=update.tags)

    def _register(self, number: int, value: float, logged: LoggedModel) -> None:
        self._registry_ready = best.register(self.client, self.spec, number, value, logged,
                                             registry_ready=self._registry_ready)

    # -- the end ----------------------------------------------------------------------------
    def end_study(self, study: optuna.Study, *, interrupted: bool) -> None:
        """Close what is still open, upload the study's figures and end the parent run:
        FINISHED, or KILLED when interrupted; left RUNNING while other workers still run
        trials of the study (the last one to stop ends it)."""
        # A worker asked to stop leaves within seconds: no long retries on the way out.
        hurry = http_env(retries=0, timeout=10) if interrupted and is_http(
            self.tracking_uri) else contextlib.nullcontext()
        with self.timed("end_study"), hurry:
            try:
                self._close_unreported("interrupted" if interrupted else
                                       "sweeper did not report how this trial ended",
                                       "KILLED" if interrupted else "FAILED")
                self._reprobe_at = 0.0  # at the end, the store is always asked again
                if self.available() and self.parent_run_id is not None:
                    self._end_parent(study, interrupted)
                else:
                    self.parent_unsent = self.parent_run_id is not None
            except Exception as exc:  # never mask the study's own outcome
                self.failed("end the study's parent run", exc)
                self.parent_unsent = True
            finally:
                self.shutdown()
            self._catch_up(study)

    def _catch_up(self, study: optuna.Study) -> None:
        """Fill in, from Optuna's record, the trials ended here whose MLflow record is
        incomplete; list in `unsent` those that still are (`sweeper reap` repairs them)."""
        from sweeper.tracking.repair import fill_in_runs, reap_runs

        incomplete = sorted(n for n, run in self._ended.items()
                            if run is None or run.run_id is None or run.incomplete)
        self.unsent = incomplete
        if not incomplete or self.experiment_id is None or not self.available():
            return
        storage = study._storage
        try:
            trials = [storage.get_trial(storage.get_trial_id_from_study_id_trial_number(
                study._study_id, n)) for n in incomplete]

            reap_runs(self.client, self.experiment_id, trials=trials,
                      parent_run_id=None, study_running=True)
            fill_in_runs(self.client, self.experiment_id, self.spec.name,
                         self.parent_run_id, trials,
                         objectives=[o.metric for o in self.spec.objective_list])
        except Exception as exc:
            log.warning("MLflow (%s): could not fill in what tracking missed: %s",
                        self.where, one_line(exc))
            return
        self.unsent = []

    def _end_parent(self, study: optuna.Study, interrupted: bool) -> None:
        from optuna.trial import TrialState

        from sweeper.render import plots

        assert self.parent_run_id is not None
        with self.timed("end_study.wait"):
            self.wait_queued()  # every run's files, metrics and status are in
        names = [o.metric for o in self.spec.objective_list]
        with self.timed("parent.figures"):
            try:
                # A run that ended no trial (nothing to do) leaves the figures as they were.
                figures = (plots.study_figures(study, objective_names=names)
                           if self._ended_here else {})
                with tempfile.TemporaryDirectory(prefix="sweeper-figures-") as tmp:
                    for name, figure in figures.items():
                        plots.write_page(Path(tmp, f"{name}.html"), {name: figure},
                                         title=f"{self.spec.name}: {name}")
                    if figures:
                        self.call("upload the study figures", self.client.log_artifacts,
                                  self.parent_run_id, tmp, "figures")
            except Exception as exc:  # a full disk, say: the parent run still ends
                self.failed("write the study figures", exc)
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.user_attrs.get(ATTR_WORKER) != self.worker or self.worker is None]
        if running:
            log.debug("parent run left RUNNING: %d trial(s) still running elsewhere",
                      len(running))
            return
        before = len(self.failures)
        self.call("end the parent run", self.client.set_terminated, self.parent_run_id,
                  "KILLED" if interrupted else "FINISHED")
        self.parent_unsent = len(self.failures) > before or self.disabled

    # -- for reports ------------------------------------------------------------------------
    def overhead(self) -> dict[str, float]:
        """Seconds spent in tracking so far, by operation (a copy)."""
        return dict(self.seconds)


def _study_params(spec: StudySpec) -> dict[str, str]:
    """The settings of the search itself, flattened for the parent run's params."""
    out: dict[str, str] = {}
    for section in ("sampler", "pruner", "budget"):
        for key, value in getattr(spec, section).model_dump(mode="json").items():
            out[f"{section}.{key}"] = param_value(value)
    for index, objective in enumerate(spec.objective_list):
        suffix = "" if len(spec.objective_list) == 1 else f".{index}"
        out[f"objective{suffix}.metric"] = objective.metric
        out[f"objective{suffix}.direction"] = str(objective.direction)
    out["models"] = spec.models
    out["dataset.name"] = spec.dataset.name
    out["space"] = param_value(sorted(spec.space))
    return out
