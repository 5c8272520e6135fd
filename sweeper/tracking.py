"""The only module that talks to MLflow: one experiment and one parent run per study, one
nested run per trial with its curves, figures, tables and model, and the statuses that
mirror Optuna's states (DESIGN §2, §4, §6).

`MlflowTracker` implements `sweeper.study.StudyTracker`; the study loop calls it and never
MLflow itself. Choices worth knowing:

- Every call goes through an explicit `MlflowClient(tracking_uri)`: no global tracking URI,
  no active run. Models are written with `mlflow.pytorch.save_model` into a temporary
  folder and attached to a LoggedModel created through the same client, which is what
  `mlflow.pytorch.log_model` does minus its global state, its requirement inference (a
  subprocess, ~6 s a model) and its re-reading of every metric history of the run.
- Per-epoch metrics, params and tags are sent as one `log_batch` each by a single
  background thread (in order): the training loop does not wait for the server, and the
  futures are awaited before a run is terminated, so a run never ends with metrics still
  in flight. Not MLflow's own `log_batch(synchronous=False)`: `set_terminated` shuts its
  queue down and joins its thread, which cost 0.5-1 s per trial in measurements, more than
  asynchronous logging saves.
- `MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT` defaults to true: MLflow would print two
  "View run" lines (and fetch the run once more) for every trial.
- Tracking must never cost an Optuna result. Every MLflow call is guarded: a failure is a
  one-line warning, the trial's remaining logging is skipped, and after `max_failures`
  failures in a row tracking is switched off for the rest of the run; the sweep goes on.
  Only `check()` (before any trial exists) and `start_study` raise `TrackingError`.
- mlflow is imported inside the functions: `sweeper --help` must stay instant.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sweeper.errors import TrackingError
from sweeper.storage import redact, sqlalchemy_url
from sweeper.study import ATTR_RUN_ID  # the trial's link to its run, read by results.py

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from sweeper.config import StudySpec, TrialConfig
    from sweeper.study import TrialOutcome

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
# Next to a local SQLite store, artifacts go to <store folder>/artifacts/<study>; other SQL
# stores (PostgreSQL without a server) use this folder under the working directory.
DEFAULT_ARTIFACT_ROOT = "mlruns/artifacts"

# Optuna study user attributes that link the study to MLflow.
ATTR_PARENT_RUN = "mlflow_parent_run_id"
ATTR_EXPERIMENT = "mlflow_experiment_id"

TAG_STUDY = "sweeper.study"
TAG_ROLE = "sweeper.role"
TAG_TRIAL = "sweeper.trial_number"
TAG_STATE = "sweeper.state"
TAG_REASON = "sweeper.reason"
TAG_PARENT = "mlflow.parentRunId"
REGISTRY_ALIAS = "best"

REASON_MAX_CHARS = 5000  # MLflow allows 8000 per tag value; leave room for multi-byte text
CHECK_TIMEOUT_S = 15.0  # `check` answers within this, whatever the network does
CHECK_REQUEST_TIMEOUT_S = 5  # per HTTP request or SQL connect during `check`
# A second worker that finds the experiment just created waits this long for the first
# worker's parent run, instead of racing to create its own.
PARENT_WAIT_S = 10.0
PARENT_RECENT_S = 120.0
EXAMPLE_IMAGES = 4  # real input images stored with each model (its input example)
# MLflow's own HTTP retry budget is 7 retries with backoff factor 2: about 4 minutes per
# failed request, which would stall a sweep whose server went away. Sweeper's defaults,
# applied only where the user has not set these variables:
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
_MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


# --------------------------------------------------------------------------------------
# Where the tracking store is
# --------------------------------------------------------------------------------------
def resolve_tracking_uri(explicit: str | None = None) -> str:
    """`explicit` (--tracking-uri) > `$MLFLOW_TRACKING_URI` > `sqlite:///mlruns/mlflow.db`.

    For a local SQLite store the folder is created, so the default works from any fresh
    checkout with no server.
    """
    uri = _choose_tracking_uri(explicit)
    path = _sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return uri


def _choose_tracking_uri(explicit: str | None) -> str:
    return explicit or os.environ.get(TRACKING_ENV) or DEFAULT_TRACKING_URI


def default_artifact_root(tracking_uri: str) -> str | None:
    """The artifact root for experiments created on a *local* SQL store, as an absolute
    `file://` URI; None for a server (the server decides, e.g. `--serve-artifacts`).

    Without it MLflow would put a SQL store's artifacts in `./mlruns/<experiment id>`
    relative to wherever the command happened to run.
    """
    scheme = tracking_uri.split(":", 1)[0].lower()
    if scheme.startswith("sqlite"):
        path = _sqlite_path(tracking_uri)
        root = (path.parent / "artifacts") if path is not None else Path(DEFAULT_ARTIFACT_ROOT)
    elif scheme.split("+", 1)[0] in ("postgresql", "postgres", "mysql", "mssql"):
        root = Path(DEFAULT_ARTIFACT_ROOT)
    else:
        return None
    return root.expanduser().resolve().as_uri()


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (relative or absolute), else None."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///:memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).expanduser()


def _absolute_sqlite(uri: str) -> str:
    """`sqlite:///mlruns/mlflow.db` with an absolute path: MLflow caches stores by URI, so a
    relative one would keep pointing at the folder of the first process-wide use."""
    path = _sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    query = uri.partition("?")[2]
    return f"sqlite:///{path.resolve()}" + (f"?{query}" if query else "")


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


# --------------------------------------------------------------------------------------
# The tracker
# --------------------------------------------------------------------------------------
class MlflowTracker:
    """A `StudyTracker` backed by MLflow: see the module docstring.

    Per-trial tracking time is summed in `seconds` (by operation) so that the overhead of
    tracking can be measured and reported; `failures` keeps the warnings that were issued.
    The model registry holds the best model of a single-objective study under the study's
    name with alias `best`; a multi-objective study has no single best model, so it
    registers nothing (its Pareto front is in the parent run's tags and figures).
    """

    def __init__(self, tracking_uri: str | None = None, *,
                 artifact_location: str | None = None, max_failures: int = 3,
                 device: str | None = None) -> None:
        # A bare postgresql:// would make SQLAlchemy look for psycopg 3; sweeper ships psycopg2.
        # Nothing is created yet: folders appear in `check`/`start_study`, not on a typo.
        self.tracking_uri = _absolute_sqlite(sqlalchemy_url(_choose_tracking_uri(tracking_uri)))
        self.artifact_root = artifact_location or default_artifact_root(self.tracking_uri)
        self.max_failures = max_failures
        self.device = device
        if _is_http(self.tracking_uri):
            for key, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.disabled = False
        self.failures: list[str] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self._client: MlflowClient | None = None
        self._spec: StudySpec | None = None
        self._consecutive_failures = 0
        self._runs: dict[int, _TrialRun] = {}  # open, or ended by their context only
        self._models: dict[int, _LoggedModel] = {}  # by trial number
        self._parent_ops: list[Future[Any]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._registry_ready = False
        self._best_number: int | None = None
        self._ended_here = 0  # trials that ended in this process since start_study

    # -- plumbing -----------------------------------------------------------------------
    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    @property
    def where(self) -> str:
        return redact(self.tracking_uri)

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - started

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """`fn(*args, **kwargs)`, or None with a warning when it fails (never raises)."""
        if self.disabled:
            return None
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            self.failed(what, exc)
            return None
        self._consecutive_failures = 0
        return result

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run `fn` on the tracker's one background thread (calls keep their order); a
        failure surfaces when the future's `result()` is taken through `call`."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="sweeper-mlflow")
        return self._executor.submit(fn, *args, **kwargs)

    def failed(self, what: str, exc: BaseException) -> None:
        """Record a tracking failure; switch tracking off after too many in a row."""
        message = f"MLflow ({self.where}): could not {what}: {_one_line(exc)}"
        self.failures.append(message)
        self._consecutive_failures += 1
        log.warning("%s", message)
        if self._consecutive_failures >= self.max_failures and not self.disabled:
            self.disabled = True
            log.warning("MLflow tracking is off for the rest of this run after %d failures "
                        "in a row; the study goes on and Optuna keeps every result",
                        self._consecutive_failures)

    # -- before anything is written ---------------------------------------------------
    def check(self) -> None:
        """Raise TrackingError (one line, within `CHECK_TIMEOUT_S`) if the store cannot be
        used: called before any Optuna study or trial is written, so that a typo in the
        URI or a server that is down costs nothing to fix."""
        outcome: dict[str, BaseException] = {}

        def probe() -> None:
            try:
                self._probe()
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc

        with self.timed("check"):
            thread = threading.Thread(target=probe, name="sweeper-mlflow-check", daemon=True)
            thread.start()
            thread.join(CHECK_TIMEOUT_S)
        if thread.is_alive():
            raise TrackingError(f"MLflow tracking store {self.where} did not answer within "
                                f"{CHECK_TIMEOUT_S:.0f} s; check --tracking-uri / "
                                f"${TRACKING_ENV}, or run with --no-tracking")
        error = outcome.get("error")
        if isinstance(error, TrackingError):
            raise error
        if error is not None:
            raise TrackingError(f"MLflow tracking store {self.where} cannot be used: "
                                f"{_one_line(error)}") from error

    def _prepare_local(self, *, artifacts: bool) -> None:
        """Create a local store's folders: the SQLite file's (before MLflow opens it) and,
        once the store answered, the artifact root."""
        path = _sqlite_path(self.tracking_uri)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if artifacts and self.artifact_root and self.artifact_root.startswith("file://"):
            from urllib.parse import unquote, urlparse

            Path(unquote(urlparse(self.artifact_root).path)).mkdir(parents=True,
                                                                   exist_ok=True)

    def _probe(self) -> None:
        uri = self.tracking_uri
        self._prepare_local(artifacts=False)
        if _is_http(uri):
            self._probe_http(uri.rstrip("/"))
        elif _sqlite_path(uri) is None and "://" in uri and not uri.startswith("file:"):
            self._probe_sql(uri)
        try:
            with _http_env(retries=0, timeout=CHECK_REQUEST_TIMEOUT_S):
                self.client.search_experiments(max_results=1)
        except Exception as exc:
            if _is_http(uri) and "error code 404" in str(exc):
                raise TrackingError(f"no MLflow tracking server answers at {self.where} (HTTP "
                                    f"404 from its REST API); check --tracking-uri / "
                                    f"${TRACKING_ENV}") from exc
            hint = ""
            if "alembic" in str(exc).lower() or "revision" in str(exc).lower():
                hint = (" (is this the Optuna database? MLflow and Optuna need separate "
                        "databases)")
            raise TrackingError(f"MLflow tracking store {self.where} refused a request: "
                                f"{_one_line(exc)}{hint}") from exc

    def _probe_http(self, base: str) -> None:
        """A plain GET with a short timeout: MLflow's client would retry for minutes."""
        try:
            with urllib.request.urlopen(f"{base}/health",
                                        timeout=CHECK_REQUEST_TIMEOUT_S) as response:
                response.read(64)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise TrackingError(
                    f"MLflow server {self.where} refused access (HTTP {exc.code}); set "
                    f"MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or "
                    f"MLFLOW_TRACKING_TOKEN") from exc
            # No /health behind some proxies: the API request below decides.
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"cannot reach the MLflow server at {self.where} ({reason}); start it "
                f"(e.g. docker compose up -d), fix --tracking-uri / ${TRACKING_ENV}, or run "
                f"with --no-tracking") from exc

    def _probe_sql(self, uri: str) -> None:
        """Connect once with a short timeout: MLflow's own engine retries for ~30 s."""
        import sqlalchemy

        connect_args: dict[str, Any] = {}
        if uri.startswith(("postgresql", "postgres", "mysql")):
            connect_args["connect_timeout"] = CHECK_REQUEST_TIMEOUT_S
        try:
            engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
            try:
                with engine.connect():
                    pass
            finally:
                engine.dispose()
        except Exception as exc:
            raise TrackingError(f"cannot connect to the MLflow database {self.where}: "
                                f"{_one_line(exc)}; check --tracking-uri / "
                                f"${TRACKING_ENV}") from exc

    # -- the study ------------------------------------------------------------------------
    def start_study(self, study: optuna.Study, spec: StudySpec) -> None:
        """Find or create the experiment and the study's one parent run, and link both to
        the Optuna study. Raises TrackingError: a study is not started half-tracked."""
        self._spec = spec
        self._runs.clear()
        self._models.clear()
        self._parent_ops.clear()
        self._registry_ready = False
        self._best_number = None
        self._ended_here = 0
        if self.disabled:
            return
        with self.timed("start_study"):
            try:
                self._prepare_local(artifacts=True)
                self.experiment_id, founder = self._experiment(spec.name)
                parent = self._parent_run(study, self.experiment_id, spec.name, founder)
                self.parent_run_id = parent.info.run_id
                study.set_user_attr(ATTR_PARENT_RUN, self.parent_run_id)
                study.set_user_attr(ATTR_EXPERIMENT, self.experiment_id)
                if parent.info.status != "RUNNING":  # resumed: the study runs again
                    self.client.update_run(self.parent_run_id, status="RUNNING")
                self._describe_parent(parent, spec)
            except TrackingError:
                raise
            except Exception as exc:
                raise TrackingError(f"MLflow ({self.where}) could not start tracking study "
                                    f"{spec.name!r}: {_one_line(exc)}") from exc

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
        from mlflow.entities import Param, RunTag

        wanted = _study_params(spec)
        existing = parent.data.params
        # Params cannot change in MLflow: a resumed study with an edited file keeps the
        # first values as params and records the edited ones in a tag.
        new = {k: v for k, v in wanted.items() if k not in existing}
        changed = sorted(k for k, v in wanted.items() if k in existing and existing[k] != v)
        tags = {TAG_STUDY: spec.name, TAG_ROLE: "parent",
                "sweeper.sampler": spec.sampler.name, "sweeper.pruner": spec.pruner.name,
                "sweeper.objectives": ", ".join(f"{o.metric} ({o.direction})"
                                                for o in spec.objective_list)}
        if spec.description:
            tags["mlflow.note.content"] = spec.description
        if changed:
            tags["sweeper.changed_settings"] = ", ".join(
                f"{k}={wanted[k]}" for k in changed)[:REASON_MAX_CHARS]
        params = [Param(k, v) for k, v in new.items()]
        tag_list = [RunTag(k, v) for k, v in tags.items()]
        for chunk in _chunks(params, 100):
            self.client.log_batch(parent.info.run_id, params=chunk)
        self.client.log_batch(parent.info.run_id, tags=tag_list)
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

    # -- one trial --------------------------------------------------------------------------
    @contextlib.contextmanager
    def trial_run(self, trial: optuna.Trial, config: TrialConfig) -> Iterator[_TrialRun]:
        """The trial's nested run, open while it trains.

        On an exception (pruned, failed, Ctrl-C) the run is ended here at once, so that no
        run is left RUNNING whatever happens next; `trial_ended` then only completes its
        record with the reason Optuna got. A run that ends normally stays open until
        `trial_ended` gives it its final status (or `end_study` closes it as FAILED).
        """
        self._close_unreported("sweeper did not report how this trial ended")
        run = _TrialRun(self, trial, config)
        with self.timed("trial.open"):
            run.open()
        self._runs[trial.number] = run
        try:
            yield run
        except BaseException as exc:
            with self.timed("trial.end"):
                run.abort(exc)
            raise
        finally:
            with self.timed("trial.flush"):
                run.flush()

    def trial_ended(self, study: optuna.Study, outcome: TrialOutcome) -> None:
        """Give the trial's run its final status and bring the parent's `best` up to date."""
        self._ended_here += 1
        run = self._runs.pop(outcome.number, None)
        if run is not None:
            with self.timed("trial.end"):
                run.finish(outcome)
        if outcome.state == "COMPLETE" and not self.disabled and self.parent_run_id:
            with self.timed("parent.best"):
                self._update_best(study, outcome)

    def _close_unreported(self, reason: str, status: str = "FAILED") -> None:
        for number in list(self._runs):
            run = self._runs.pop(number)
            run.close_unreported(reason, status)

    # -- best so far ----------------------------------------------------------------------
    def beats_best(self, study: optuna.Study, values: list[float]) -> bool:
        """Whether `values` would be a new best (single objective: strictly better than every
        complete trial; several: dominated by none)."""
        from optuna.study import StudyDirection
        from optuna.trial import TrialState

        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.values is not None]
        if not complete:
            return True
        signs = [1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in study.directions]
        mine = [s * v for s, v in zip(signs, values, strict=True)]
        if len(signs) == 1:
            return all(mine[0] > signs[0] * t.values[0] for t in complete)
        for t in complete:
            theirs = [s * v for s, v in zip(signs, t.values, strict=True)]
            if (all(a >= b for a, b in zip(theirs, mine, strict=True))
                    and any(a > b for a, b in zip(theirs, mine, strict=True))):
                return False
        return True

    def _update_best(self, study: optuna.Study, outcome: TrialOutcome) -> None:
        """Parent metrics `best_value`/`best_trial` (step = trial number, so the parent's
        chart is the optimization history) and `best.*` tags; the registry alias."""
        from mlflow.entities import Metric, RunTag

        now = _now_ms()
        step = outcome.number
        metrics: list[Metric] = []
        tags: list[RunTag] = []
        if len(study.directions) == 1:
            try:
                best = study.best_trial
            except ValueError:
                return
            metrics += [Metric("best_value", float(best.values[0]), now, step),
                        Metric("best_trial", float(best.number), now, step)]
            if best.number != self._best_number:
                self._best_number = best.number
                run_id = best.user_attrs.get(ATTR_RUN_ID, "")
                tags += [RunTag("best.trial", str(best.number)),
                         RunTag("best.value", repr(float(best.values[0]))),
                         RunTag("best.run_id", str(run_id)),
                         RunTag("best.params", _json(best.params)[:REASON_MAX_CHARS])]
                if best.number == outcome.number and outcome.number in self._models:
                    logged = self._models[outcome.number]
                    tags.append(RunTag("best.model_uri", f"models:/{logged.model_id}"))
                    self.call("register the best model", self._register, outcome.number,
                              float(best.values[0]), logged)
        else:
            front = study.best_trials
            metrics.append(Metric("pareto_size", float(len(front)), now, step))
            tags.append(RunTag("best.trials", ",".join(str(t.number) for t in front)))
        self._parent_ops.append(self.submit(self.client.log_batch, self.parent_run_id,
                                            metrics=metrics, tags=tags))

    def _register(self, number: int, value: float, logged: _LoggedModel) -> None:
        """Register the model as a new version of `<study>` and point alias `best` at it,
        unless the version the alias points to is at least as good (a faster worker).

        The source is the model's artifact location, not `models:/<id>`: a local SQL
        registry resolves the latter through MLflow's *global* tracking URI (a TODO in
        MLflow), which is not this tracker's store.
        """
        from mlflow.exceptions import MlflowException

        assert self._spec is not None
        name = self._spec.name
        client = self.client
        if not self._registry_ready:
            try:
                client.create_registered_model(
                    name, tags={TAG_STUDY: name},
                    description=f"Best model of sweeper study {name!r} (alias "
                                f"'{REGISTRY_ALIAS}').")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            self._registry_ready = True
        try:
            current = client.get_model_version_by_alias(name, REGISTRY_ALIAS)
        except MlflowException:
            current = None
        if current is not None and "sweeper.value" in current.tags:
            maximize = self._spec.objective_list[0].direction == "maximize"
            theirs = float(current.tags["sweeper.value"])
            if (theirs >= value) if maximize else (theirs <= value):
                return
        version = client.create_model_version(
            name, source=logged.location, run_id=logged.run_id, model_id=logged.model_id,
            tags={TAG_TRIAL: str(number), "sweeper.value": repr(value)},
            await_creation_for=0)
        client.set_registered_model_alias(name, REGISTRY_ALIAS, version.version)

    # -- the end ----------------------------------------------------------------------------
    def end_study(self, study: optuna.Study, *, interrupted: bool) -> None:
        """Close what is still open, upload the study's figures and end the parent run:
        FINISHED, or KILLED when interrupted; left RUNNING while other workers still run
        trials of the study (the last one to stop ends it)."""
        with self.timed("end_study"):
            try:
                self._close_unreported("interrupted" if interrupted else
                                       "sweeper did not report how this trial ended",
                                       "KILLED" if interrupted else "FAILED")
                if not self.disabled and self.parent_run_id is not None:
                    self._end_parent(study, interrupted)
            except Exception as exc:  # never mask the study's own outcome
                self.failed("end the study's parent run", exc)
            finally:
                if self._executor is not None:
                    # Tracking switched off: drop what is queued rather than wait for it.
                    self._executor.shutdown(wait=not self.disabled,
                                            cancel_futures=self.disabled)
                    self._executor = None

    def _end_parent(self, study: optuna.Study, interrupted: bool) -> None:
        from optuna.trial import TrialState

        from sweeper import plots

        assert self._spec is not None and self.parent_run_id is not None
        names = [o.metric for o in self._spec.objective_list]
        with self.timed("parent.figures"):
            # A run that ended no trial (nothing to do) leaves the figures as they were.
            figures = (plots.study_figures(study, objective_names=names)
                       if self._ended_here else {})
            with tempfile.TemporaryDirectory(prefix="sweeper-figures-") as tmp:
                for name, figure in figures.items():
                    plots.write_page(Path(tmp, f"{name}.html"), {name: figure},
                                     title=f"{self._spec.name}: {name}")
                if figures:
                    self.call("upload the study figures", self.client.log_artifacts,
                              self.parent_run_id, tmp, "figures")
        for op in self._parent_ops:
            self.call("log the parent run's best", op.result)
        self._parent_ops.clear()
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running:
            log.debug("parent run left RUNNING: %d trial(s) still running elsewhere",
                      len(running))
            return
        self.call("end the parent run", self.client.set_terminated, self.parent_run_id,
                  "KILLED" if interrupted else "FINISHED")

    # -- for reports ------------------------------------------------------------------------
    def overhead(self) -> dict[str, float]:
        """Seconds spent in tracking so far, by operation (a copy)."""
        return dict(self.seconds)


# --------------------------------------------------------------------------------------
# One trial's run
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LoggedModel:
    run_id: str
    model_id: str
    location: str  # the artifact location of the model's files


class _TrialRun:
    """What `MlflowTracker.trial_run` yields: the `TrialRun` the loop logs into.

    A run whose creation failed, or whose logging failed once, quietly ignores further
    logging (one warning, not one per epoch) but is still ended with a status.
    """

    def __init__(self, tracker: MlflowTracker, trial: optuna.Trial,
                 config: TrialConfig) -> None:
        self.tracker = tracker
        self.trial = trial
        self.config = config
        self.number = trial.number
        self.run_id: str | None = None
        self.broken = False
        self.ended_as: str | None = None  # the status this run was terminated with
        self.error_logged = False
        self.model_id: str | None = None
        self._ops: list[tuple[str, Future[Any]]] = []  # (what, background log_batch)

    # -- plumbing -----------------------------------------------------------------------
    @property
    def live(self) -> bool:
        return self.run_id is not None and not self.broken and not self.tracker.disabled

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        if not self.live:
            return None
        before = len(self.tracker.failures)
        result = self.tracker.call(f"{what} (trial {self.number})", fn, *args, **kwargs)
        if len(self.tracker.failures) > before:
            self.broken = True
        return result

    def _batch(self, what: str, **entities: Any) -> None:
        """One `log_batch` sent in the background; awaited in `flush`."""
        if self.live:
            self._ops.append((what, self.tracker.submit(self.tracker.client.log_batch,
                                                        self.run_id, **entities)))

    def flush(self) -> None:
        """Wait for every asynchronous batch of this run; a failure is reported once."""
        ops, self._ops = self._ops, []
        for what, op in ops:
            if self._call(what, op.result) is None and self.broken:
                break

    # -- opening --------------------------------------------------------------------------
    def open(self) -> None:
        import torch
        from mlflow.entities import Param

        tracker = self.tracker
        if tracker.disabled or tracker.experiment_id is None or tracker.parent_run_id is None:
            return
        spec = tracker._spec
        assert spec is not None
        tags = {
            TAG_PARENT: tracker.parent_run_id,
            TAG_STUDY: spec.name,
            TAG_TRIAL: str(self.number),
            TAG_ROLE: "trial",
            "sweeper.sampler": spec.sampler.name,
            "sweeper.pruner": spec.pruner.name,
            "sweeper.device": _device_name(tracker.device),
            "sweeper.torch_version": torch.__version__,
        }
        run = tracker.call(f"create the run of trial {self.number}",
                           tracker.client.create_run, tracker.experiment_id,
                           run_name=f"trial-{self.number}", tags=tags)
        if run is None:
            return
        self.run_id = run.info.run_id
        try:
            self.trial.set_user_attr(ATTR_RUN_ID, self.run_id)
        except Exception as exc:  # the Optuna storage's problem is the loop's to report
            log.debug("could not record the run id on trial %d: %s", self.number, exc)
        params = [Param(k, _param_value(v)) for k, v in self.config.flat().items()]
        for chunk in _chunks(params, 100):
            self._batch("log params", params=chunk)

    # -- the TrialRun protocol -------------------------------------------------------------
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One batch per epoch, `step=epoch`, sent in the background."""
        if not self.live:
            return
        with self.tracker.timed("trial.epoch"):
            from mlflow.entities import Metric

            now = _now_ms()
            batch = [Metric(_metric_key(k), float(v), now, int(epoch))
                     for k, v in metrics.items() if k != "epoch" and _finite(v)]
            self._batch("log epoch metrics", metrics=batch)

    def log_result(self, *, model: Any, data: Any, history: list[dict[str, float]],
                   evaluations: dict[str, Any], metrics: dict[str, float],
                   values: list[float]) -> None:
        """The model (as the `models:` policy says), the final metrics in one batch, and
        figures, tables, reports and the resolved config in one upload."""
        if not self.live:
            return
        tracker = self.tracker
        spec = tracker._spec
        assert spec is not None
        policy = spec.models
        if policy == "all" or (policy == "best" and self._beats_best(values)):
            with tracker.timed("trial.model"):
                logged = self._call("log the model", self._log_model, model, data, metrics)
            if logged is not None:
                self.model_id = logged.model_id
                tracker._models[self.number] = logged
        with tracker.timed("trial.metrics"):
            self._log_final_metrics(model, metrics, history)
        with tracker.timed("trial.artifacts"):
            self._call("upload figures and tables", self._log_artifacts, history,
                       evaluations, list(data.classes))

    def _beats_best(self, values: list[float]) -> bool:
        try:
            return self.tracker.beats_best(self.trial.study, values)
        except Exception as exc:  # Optuna storage trouble: keep the model, to be safe
            log.debug("could not compare trial %d with the best: %s", self.number, exc)
            return True

    def _log_final_metrics(self, model: Any, metrics: dict[str, float],
                           history: list[dict[str, float]]) -> None:
        from mlflow.entities import Metric, RunTag

        now = _now_ms()
        # At the last epoch's step, so the run's latest value of val_accuracy is the
        # final evaluation's.
        step = int(history[-1].get("epoch", len(history))) if history else 0
        batch = [Metric(_metric_key(k), float(v), now, step, model_id=self.model_id)
                 for k, v in metrics.items() if _finite(v)]
        tags = []
        device = _model_device(model)
        if device:
            tags.append(RunTag("sweeper.device", device))
        for chunk in _chunks(batch, 900):
            self._batch("log final metrics", metrics=chunk, tags=tags)
            tags = []

    def _log_artifacts(self, history: list[dict[str, float]], evaluations: dict[str, Any],
                       classes: list[str]) -> None:
        import yaml

        from sweeper import plots

        assert self.run_id is not None
        with tempfile.TemporaryDirectory(prefix="sweeper-trial-") as tmp:
            root = Path(tmp)
            figures = plots.trial_figures(history, evaluations, classes)
            plots.write_page(root / "plots" / "trial.html", figures,
                             title=f"{self.tracker._spec.name if self.tracker._spec else ''} "
                                   f"trial {self.number}")
            (root / "tables").mkdir()
            (root / "reports").mkdir()
            for split, ev in evaluations.items():
                _write_confusion_csv(root / "tables" / f"confusion_matrix_{split}.csv",
                                     ev.confusion, classes)
                (root / "reports" / f"classification_report_{split}.json").write_text(
                    _json(ev.report, indent=2))
            self._write_config(root, yaml)
            self.tracker.client.log_artifacts(self.run_id, tmp)

    def _write_config(self, root: Path, yaml: Any) -> None:
        (root / "config").mkdir(exist_ok=True)
        (root / "config" / "trial.yaml").write_text(
            yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False))

    def _log_model(self, model: Any, data: Any, metrics: dict[str, float]) -> _LoggedModel:
        """The model in MLflow's PyTorch flavour, attached to the run.

        Pickled (not `pt2`): `torch.export` graphs can neither switch to eval mode nor move
        to another device once loaded, and sweeper promises `load_model` a plain module.
        The weights are copied to the CPU first, so a model trained on a GPU loads anywhere.
        """
        import mlflow.pytorch
        import torch
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model, infer_signature

        tracker = self.tracker
        client = tracker.client
        spec = tracker._spec
        assert spec is not None and self.run_id is not None and tracker.experiment_id
        cpu_model = copy.deepcopy(model).to("cpu").eval()
        example = data.val.x[:EXAMPLE_IMAGES].detach().to("cpu", torch.float32).contiguous()
        with torch.no_grad():
            output = cpu_model(example).numpy()
        example_np = example.numpy()
        signature = infer_signature(example_np, output)
        logged = client.create_logged_model(
            tracker.experiment_id, name="model", source_run_id=self.run_id,
            params={k: _param_value(v) for k, v in self.config.flat().items()},
            tags={TAG_STUDY: spec.name, TAG_TRIAL: str(self.number)}, model_type="pytorch")
        metadata = {"sweeper": {
            "study": spec.name, "trial_number": self.number, "dataset": data.name,
            "classes": list(data.classes), "input_shape": list(data.input_shape),
            "normalize_mean": list(data.mean), "normalize_std": list(data.std)}}
        try:
            with tempfile.TemporaryDirectory(prefix="sweeper-model-") as tmp:
                path = os.path.join(tmp, "model")
                mlflow_model = Model(artifact_path=logged.artifact_location,
                                     model_uuid=logged.model_id, run_id=self.run_id,
                                     model_id=logged.model_id)
                with _quiet("mlflow.pytorch"):  # its pickle warning, once per model
                    mlflow.pytorch.save_model(
                        cpu_model, path, mlflow_model=mlflow_model, signature=signature,
                        input_example=example_np, pip_requirements=_requirements(),
                        metadata=metadata, serialization_format="pickle")
                client.log_model_artifacts(logged.model_id, path)
        except BaseException:
            with contextlib.suppress(Exception):
                client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        step = int(metrics.get("epochs_run", 0))
        client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=step)])
        return _LoggedModel(self.run_id, logged.model_id, logged.artifact_location)

    # -- the end ----------------------------------------------------------------------------
    def abort(self, exc: BaseException) -> None:
        """End the run now, on the exception that ends the trial (see `trial_run`)."""
        import traceback

        import optuna

        from sweeper.errors import TrialFailure

        if isinstance(exc, optuna.TrialPruned):
            state, status, reason, detail = "PRUNED", "KILLED", str(exc) or "pruned", None
        elif isinstance(exc, TrialFailure):
            state, status, reason, detail = "FAIL", "FAILED", str(exc), None
        elif isinstance(exc, Exception):
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = f"{type(exc).__name__}: {lines[0] if lines else ''}"  # as study.py says
            detail = "".join(traceback.format_exception(exc))
            state, status = "FAIL", "FAILED"
        else:  # KeyboardInterrupt, SystemExit: a person stopped it, the config did not fail
            state, status, reason, detail = "FAIL", "KILLED", "interrupted", None
        self.flush()
        self._end(state, status, reason, detail or reason)

    def finish(self, outcome: TrialOutcome) -> None:
        """The final record, from what Optuna was told."""
        status = _MLFLOW_STATUS[outcome.state]
        if outcome.state == "FAIL" and outcome.reason == "interrupted":
            status = "KILLED"
        self.flush()
        self._end(outcome.state, status, outcome.reason, outcome.detail or outcome.reason,
                  seconds=outcome.seconds)

    def close_unreported(self, reason: str, status: str) -> None:
        """End a run whose `trial_ended` never came (the Optuna tell failed, or Ctrl-C)."""
        if self.ended_as is not None:
            return
        self.flush()
        self._end("FAIL", status, reason, reason)

    def _end(self, state: str, status: str, reason: str | None, error: str | None,
             seconds: float | None = None) -> None:
        """Tags, error.txt and the terminal status, each only if not already so."""
        from mlflow.entities import Metric, RunTag

        if self.run_id is None or self.tracker.disabled:
            return
        client = self.tracker.client
        tags = [RunTag(TAG_STATE, state)]
        if reason:
            tags.append(RunTag(TAG_REASON, _truncate(reason)))
        metrics = [Metric("trial_seconds", float(seconds), _now_ms(), 0)] if seconds else []
        # Ending a run is attempted even after an earlier failure of this run: a run left
        # RUNNING is worse than one more warning.
        self.broken = False
        self._call("record how the trial ended", client.log_batch, self.run_id,
                   metrics=metrics, tags=tags)
        if state == "FAIL" and error and not self.error_logged and not self.broken:
            self._call("upload error.txt", client.log_text, self.run_id, error, "error.txt")
            self.error_logged = not self.broken
        if self.ended_as != status:
            self.broken = False
            self._call(f"end the run as {status}", client.set_terminated, self.run_id, status)
            if not self.broken:
                self.ended_as = status


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def _study_params(spec: StudySpec) -> dict[str, str]:
    """The settings of the search itself, flattened for the parent run's params."""
    out: dict[str, str] = {}
    for section in ("sampler", "pruner", "budget"):
        for key, value in getattr(spec, section).model_dump(mode="json").items():
            out[f"{section}.{key}"] = _param_value(value)
    for index, objective in enumerate(spec.objective_list):
        suffix = "" if len(spec.objective_list) == 1 else f".{index}"
        out[f"objective{suffix}.metric"] = objective.metric
        out[f"objective{suffix}.direction"] = str(objective.direction)
    out["models"] = spec.models
    out["dataset.name"] = spec.dataset.name
    out["space"] = _param_value(sorted(spec.space))
    return out


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _metric_key(key: str) -> str:
    """A metric name MLflow accepts (class names may hold other characters)."""
    return _BAD_KEY_CHARS.sub("_", key)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _now_ms() -> int:
    return int(time.time() * 1000)


def _truncate(text: str, limit: int = REASON_MAX_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _one_line(exc: BaseException) -> str:
    """An error as one short line; MLflow's HTTP errors carry a whole urllib3 repr."""
    text = str(exc)
    for marker, short in (("Connection refused", "connection refused"),
                          ("Name or service not known", "unknown host"),
                          ("Read timed out", "timed out"), ("ConnectTimeout", "timed out")):
        if marker in text:
            url = re.search(r"API request to (\S+)", text)
            return f"{short}{f' ({url.group(1)})' if url else ''}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return _truncate(lines[0] if lines else type(exc).__name__, 300)


def _json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, default=str, sort_keys=indent is not None)


def _device_name(explicit: str | None) -> str:
    from sweeper.train import resolve_device

    try:
        return str(resolve_device(explicit))
    except Exception:
        return str(explicit or "unknown")


def _model_device(model: Any) -> str | None:
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return str(param.device) if param is not None else None


def _write_confusion_csv(path: Path, confusion: Any, classes: list[str]) -> None:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, confusion, strict=True):
            writer.writerow([name, *(int(v) for v in row)])


def _requirements() -> list[str]:
    """Pinned requirements of a logged model, given so MLflow does not infer them (which
    costs a subprocess and ~6 s per model)."""
    pins = []
    for package in ("torch", "numpy", "cloudpickle"):
        try:
            pins.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(package)
    return pins


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    target = logging.getLogger(logger)
    previous = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(previous)


@contextlib.contextmanager
def _http_env(*, retries: int, timeout: int) -> Iterator[None]:
    """MLflow's HTTP retry and timeout settings, for the duration of a quick probe."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

