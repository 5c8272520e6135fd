"""The read side: which studies a storage holds, their trials, which trial won, and its
model (DESIGN §1). It never trains.

Answers come from the Optuna storage: every finished trial records its resolved config,
its final validation and test metrics, its MLflow run id and the id of its logged model
(`sweeper.search.study.ATTR_*`). MLflow is asked only to load a model, to read one trial in
depth, or (once, for many trials) to find models of trials that did not record them.

Storage and tracking come from the arguments, else `$SWEEPER_STORAGE` and
`$MLFLOW_TRACKING_URI`, else the local defaults, as for `sweeper run`.

>>> best = best_trial("digits-smoke")
>>> best.value == best.metrics["val_accuracy"], best.model_uri.startswith("models:/")
(True, True)
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sweeper.errors import ResultError, SweeperError
from sweeper.keys import (
    ATTR_CONFIG,
    ATTR_EXPERIMENT,
    ATTR_METRICS,
    ATTR_MODEL_ID,
    ATTR_PARENT_RUN,
    ATTR_REASON,
    ATTR_RUN_ID,
    study_spec,
    trial_record,
)
from sweeper.search.queries import StudyQueries
from sweeper.search.storage import open_storage, rdb_of, redact
from sweeper.uris import resolve_storage_url, sqlite_path

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    from torch import nn

    from sweeper.spec.config import StudySpec
    from sweeper.tracking.reader import TrackingReader

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


@dataclass(frozen=True)
class TrialResult:
    """One trial as the read side shows it; `as_dict()` is what `sweeper best --json`
    prints."""

    study: str
    number: int
    state: str
    values: list[float] | None
    params: dict[str, Any]
    metrics: dict[str, float]  # final validation and test metrics (val_*, test_*, ...)
    config: dict[str, Any]  # the resolved trial config, flattened (`train.lr`, ...)
    run_id: str | None
    run_url: str | None  # the run's page when a tracking server is configured
    model_uri: str | None  # `models:/<id>` when the trial's model was logged
    duration_s: float | None = None
    reason: str | None = None  # why it was pruned or failed
    started: datetime | None = None
    tracking_uri: str | None = field(default=None, repr=False)

    @property
    def value(self) -> float | None:
        """The objective of a single-objective study."""
        return self.values[0] if self.values else None

    @property
    def model_id(self) -> str | None:
        return self.model_uri.removeprefix("models:/") if self.model_uri else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {key: data[key] for key in ("study", "number", "values", "params", "metrics",
                                           "run_id", "run_url", "model_uri")}


@dataclass(frozen=True)
class StudySummary:
    """One study of a storage: `sweeper studies` prints one line each."""

    name: str
    directions: list[str]
    objectives: list[str]
    counts: dict[str, int]  # trials by state
    best_number: int | None
    best_values: list[float] | None
    pareto_size: int | None  # multi-objective studies
    last_activity: datetime | None

    @property
    def n_trials(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["last_activity"] = self.last_activity.isoformat() if self.last_activity else None
        return data


# --------------------------------------------------------------------------------------
# Studies
# --------------------------------------------------------------------------------------
def storage_for_reading(storage: str | None = None) -> optuna.storages.RDBStorage:
    """The Optuna storage, opened without creating anything: a local database that does
    not exist yet is an error that says how to make one."""
    url = resolve_storage_url(storage)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise ResultError(f"no Optuna storage at {path}: run a study first (sweeper run "
                          f"studies/quickstart.yaml), or point --storage / "
                          f"$SWEEPER_STORAGE at the database that holds it")
    return _open_for_reading(url)


@functools.lru_cache(maxsize=8)
def _open_for_reading(url: str) -> optuna.storages.RDBStorage:
    """One storage object per URL and process: a command that asks several questions
    connects once."""
    return open_storage(url, read_only=True)


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return sorted(s.study_name for s in storage.get_all_studies())


def load_study(name: str, storage: str | optuna.storages.BaseStorage | None = None
               ) -> optuna.Study:
    """The study called `name`; an unknown name is one line listing the known ones."""
    import optuna

    rdb = storage if storage is not None and not isinstance(storage, str) \
        else storage_for_reading(storage)
    try:
        return optuna.load_study(study_name=name, storage=rdb)
    except KeyError:
        pass
    known = study_names(rdb)
    where = redact(getattr(rdb, "url", "") or resolve_storage_url(None))
    if not known:
        raise ResultError(f"no study {name!r}: {where} holds no study yet; run one first "
                          f"(sweeper run FILE) or point --storage at the right database")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    listed = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20
                                      else "")
    raise ResultError(f"no study {name!r} in {where}; {hint}known studies: {listed}")


def studies(storage: str | None = None) -> list[StudySummary]:
    """Every study in the storage: trials by state, best value(s), last activity.

    >>> [(s.name, s.counts) for s in studies()]
    [('digits-smoke', {'COMPLETE': 6})]
    """
    rdb = storage_for_reading(storage)
    summaries = []
    for frozen in sorted(rdb.get_all_studies(), key=lambda s: s.study_name):
        queries = StudyQueries(rdb, frozen._study_id)
        counts = queries.counts()
        directions = [d.name.lower() for d in frozen.directions]
        objectives = objective_names(study_spec(frozen), len(directions))
        best_number = best_values = pareto = None
        if counts.get("COMPLETE") and len(directions) == 1:
            (best,) = queries.trials(queries.trial_ids(
                states=["COMPLETE"], by_value=True, descending=directions[0] == "maximize",
                limit=1))
            best_number, best_values = best.number, list(best.values)
        elif counts.get("COMPLETE"):
            pareto = len(_pareto_front(queries.complete_values(), directions))
        summaries.append(StudySummary(frozen.study_name, directions, objectives,
                                      {s: counts[s] for s in STATES if counts.get(s)},
                                      best_number, best_values, pareto,
                                      queries.last_activity()))
    return summaries


# --------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------
class _Results:
    """One study opened for reading, and what turns its trials into `TrialResult`s."""

    def __init__(self, study: str | optuna.Study, storage: str | None,
                 tracking_uri: str | None) -> None:
        import optuna

        self.study = study if isinstance(study, optuna.Study) else load_study(study, storage)
        self.name = self.study.study_name
        self.queries = StudyQueries(rdb_of(self.study), self.study._study_id)
        self.tracking_uri = tracking_uri
        attrs = self.study.user_attrs
        self.experiment_id: str | None = attrs.get(ATTR_EXPERIMENT)
        self.parent_run_id: str | None = attrs.get(ATTR_PARENT_RUN)
        self.spec: dict[str, Any] = study_spec(self.study)
        self.directions = [d.name.lower() for d in self.study.directions]
        self._reader: TrackingReader | None = None
        self._space = _stored_spec(self.spec)

    @property
    def reader(self) -> TrackingReader:
        if self._reader is None:
            from sweeper.tracking.reader import TrackingReader

            self._reader = TrackingReader(self.tracking_uri)
        return self._reader

    @property
    def multi_objective(self) -> bool:
        return len(self.directions) > 1

    @property
    def objective_names(self) -> list[str]:
        return objective_names(self.spec, len(self.directions))

    def result(self, trial: optuna.trial.FrozenTrial,
               model_ids: dict[str, str] | None = None) -> TrialResult:
        attrs = trial.user_attrs
        run_id = attrs.get(ATTR_RUN_ID) or None
        model_id = attrs.get(ATTR_MODEL_ID) or (model_ids or {}).get(run_id or "")
        return TrialResult(
            study=self.name, number=trial.number, state=trial.state.name,
            values=list(trial.values) if trial.values else None,
            params=self.params(trial.params),
            metrics=trial_record(trial, ATTR_METRICS),
            config=trial_record(trial, ATTR_CONFIG), run_id=run_id,
            run_url=self._run_url(run_id), model_uri=f"models:/{model_id}" if model_id
            else None,
            duration_s=trial.duration.total_seconds() if trial.duration else None,
            reason=attrs.get(ATTR_REASON), started=trial.datetime_start,
            tracking_uri=self.tracking_uri)

    def params(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Optuna's params as the study file says them: dotted keys, list-valued choices
        as lists (Optuna stores them as JSON text)."""
        if self._space is None:
            return dict(raw)
        from sweeper.spec.space import params_to_values

        try:
            values = params_to_values(self._space, raw)
        except SweeperError:  # a value the current space does not know: show it as stored
            return dict(raw)
        return {k: _plain(v) for k, v in values.items()}

    def results(self, trials: list[optuna.trial.FrozenTrial]) -> list[TrialResult]:
        """Many trials; models of trials that did not record theirs found in one query."""
        unknown = [t.user_attrs[ATTR_RUN_ID] for t in trials
                   if t.state.name == "COMPLETE" and t.user_attrs.get(ATTR_RUN_ID)
                   and ATTR_MODEL_ID not in t.user_attrs]
        model_ids: dict[str, str] = {}
        if unknown and self.experiment_id and self.spec.get("models", "all") != "none":
            model_ids = self.reader.model_ids(self.experiment_id, unknown)
        return [self.result(t, model_ids) for t in trials]

    def _run_url(self, run_id: str | None) -> str | None:
        from sweeper.uris import client_uri, is_http

        if not (run_id and self.experiment_id and is_http(client_uri(self.tracking_uri))):
            return None
        from sweeper.tracking.server import run_url

        return run_url(client_uri(self.tracking_uri), self.experiment_id, run_id)

    # -- choosing trials ----------------------------------------------------------------
    def all_trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def best_first(self, limit: int | None = None) -> list[optuna.trial.FrozenTrial]:
        """Complete trials, best first (single objective; ties by trial number)."""
        ids = self.queries.trial_ids(states=["COMPLETE"], by_value=True,
                                     descending=self.directions[0] == "maximize", limit=limit)
        return self.queries.trials(ids)

    def pareto_front(self) -> list[optuna.trial.FrozenTrial]:
        """The non-dominated complete trials, best first by the first objective."""
        values = self.queries.complete_values()
        front = _pareto_front(values, self.directions)
        sign = 1.0 if self.directions[0] == "maximize" else -1.0
        ordered = sorted(front, key=lambda tid: (-sign * values[tid][0], tid))
        return self.queries.trials(ordered)

    def require_complete(self) -> None:
        counts = self.queries.counts()
        if not counts.get("COMPLETE"):
            seen = ", ".join(f"{n} {s.lower()}" for s, n in counts.items()) or "no trials"
            raise ResultError(f"study {self.name!r} has no completed trial yet ({seen}); "
                              f"run more trials (sweeper run FILE --trials N)")

    def trial(self, number: int) -> optuna.trial.FrozenTrial:
        trial_id = self.queries.trial_id_of(number)
        if trial_id is None:
            total = sum(self.queries.counts().values())
            raise ResultError(f"study {self.name!r} has trials 0-{total - 1}, not {number}; "
                              f"see sweeper trials {self.name}")
        return self.queries.trials([trial_id])[0]


def _plain(value: Any) -> Any:
    """Tuples (how the space keeps list options hashable) back to lists."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _stored_spec(data: dict[str, Any]) -> StudySpec | None:
    """The study file as the study stored it, to decode params; None if it no longer
    validates (a study from an older sweeper)."""
    from sweeper.spec import config

    if not data:
        return None
    try:
        return config.from_dict(data, file="<stored study>")
    except SweeperError:
        return None


def objective_names(spec: dict[str, Any], n: int) -> list[str]:
    """The objective metric names of a stored study spec (`value` when unknown)."""
    objectives = spec.get("objectives") or ([spec["objective"]] if spec.get("objective")
                                            else [])
    names = [o.get("metric", "value") for o in objectives if isinstance(o, dict)]
    if len(names) != n:
        names = ["value"] if n == 1 else [f"value_{i}" for i in range(n)]
    return names


def _pareto_front(values: dict[int, list[float]], directions: list[str]) -> list[int]:
    """The keys of `values` that no other dominates (all objectives at least as good, one
    strictly better)."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    points = {k: [s * x for s, x in zip(signs, v, strict=True)] for k, v in values.items()}

    def dominated(key: int) -> bool:
        mine = points[key]
        return any(all(a >= b for a, b in zip(other, mine, strict=True))
                   and any(a > b for a, b in zip(other, mine, strict=True))
                   for k, other in points.items() if k != key)

    return [k for k in points if not dominated(k)]


def best_trial(study: str | optuna.Study, *, storage: str | None = None,
               tracking_uri: str | None = None) -> TrialResult:
    """The best completed trial of a single-objective study: params, values, final metrics,
    MLflow run and model URI.

    >>> best = best_trial("digits-smoke")
    >>> sorted(best.as_dict())
    ['metrics', 'model_uri', 'number', 'params', 'run_id', 'run_url', 'study', 'values']
    >>> round(best.metrics["test_accuracy"], 2) > 0.9
    True
    """
    results = _Results(study, storage, tracking_uri)
    if results.multi_objective:
        raise ResultError(f"study {results.name!r} has {len(results.directions)} objectives "
                          f"({', '.join(results.objective_names)}): no single best trial; "
                          f"use best_trials() / sweeper best for its Pareto front")
    results.require_complete()
    return results.results(results.best_first(limit=1))[0]


def best_trials(study: str | optuna.Study, *, top: int | None = None,
                storage: str | None = None, tracking_uri: str | None = None
                ) -> list[TrialResult]:
    """The `top` best completed trials (default 1) of a single-objective study, best first;
    for a multi-objective study its Pareto front (ordered by the first objective, `top`
    keeps the first ones).

    >>> top = best_trials("digits-smoke", top=3)
    >>> values = [t.value for t in top]
    >>> len(top), values == sorted(values, reverse=True)
    (3, True)
    """
    if top is not None and top < 1:
        raise ResultError(f"`top >= 1` must hold, but got top={top}")
    results = _Results(study, storage, tracking_uri)
    results.require_complete()
    if results.multi_objective:
        front = results.pareto_front()
        return results.results(front[:top] if top else front)
    return results.results(results.best_first(limit=top or 1))


def get_trial(study: str | optuna.Study, number: int, *, storage: str | None = None,
              tracking_uri: str | None = None) -> TrialResult:
    """Trial `number` of the study, whatever its state."""
    results = _Results(study, storage, tracking_uri)
    return results.results([results.trial(number)])[0]


def trial_results(study: str | optuna.Study, *, storage: str | None = None,
                  tracking_uri: str | None = None, states: list[str] | None = None,
                  sort: str = "number", limit: int | None = None) -> list[TrialResult]:
    """The study's trials as `TrialResult`s: filtered by state, sorted, limited.

    `sort`: `number`, `value` (best first), `duration`, a metric name (`test_accuracy`)
    or a param name (`train.lr`); a leading `-` reverses the order.
    """
    results = _Results(study, storage, tracking_uri)
    wanted = sorted({s.upper() for s in states}) if states else None
    unknown = set(wanted or ()) - set(STATES)
    if unknown:
        raise ResultError(f"unknown state {sorted(unknown)[0]!r}; choose from "
                          f"{', '.join(s.lower() for s in STATES)}")
    key = sort.removeprefix("-")
    if key in ("number", "value"):  # answered in SQL: only the trials shown are loaded
        descending = sort.startswith("-")
        if key == "value":
            descending ^= results.directions[0] == "maximize"
        ids = results.queries.trial_ids(states=wanted, by_value=key == "value",
                                        descending=descending, limit=limit)
        return results.results(results.queries.trials(ids))
    trials = results.all_trials()
    if wanted:
        trials = [t for t in trials if t.state.name in wanted]
    trials = _sorted(results, trials, sort)
    return results.results(trials[:limit] if limit is not None else trials)


def _sorted(results: _Results, trials: list[optuna.trial.FrozenTrial], sort: str
            ) -> list[optuna.trial.FrozenTrial]:
    """Trials sorted by duration, a metric or a param (number and value are sorted in SQL,
    see `trial_results`); trials without the key go last."""
    reverse = sort.startswith("-")
    key = sort.removeprefix("-")
    missing = math.inf

    if key == "duration":
        def order(t: optuna.trial.FrozenTrial) -> tuple[float, int]:
            return (t.duration.total_seconds() if t.duration else missing, t.number)
    else:
        metrics = {k for t in trials for k in trial_record(t, ATTR_METRICS)}
        params = {k for t in trials for k in t.params}
        if key not in metrics | params:
            choices = ["number", "value", "duration", *sorted(metrics), *sorted(params)]
            close = difflib.get_close_matches(key, choices, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ResultError(f"cannot sort by {key!r}: {hint}choose number, value, duration, "
                              f"a metric or a param (a leading '-' reverses)")
        # Metrics where bigger is better sort descending, the rest ascending.
        descending = key in metrics and not key.endswith(("loss", "seconds", "n_params"))

        def order(t: optuna.trial.FrozenTrial) -> tuple[float, int]:
            value = trial_record(t, ATTR_METRICS).get(key, t.params.get(key))
            if not isinstance(value, int | float) or isinstance(value, bool):
                return (missing, t.number)
            return (-float(value) if descending else float(value), t.number)

    # A leading '-' reverses the trials that have the key; those without it stay last.
    ranked = sorted(trials, key=order)
    present = [t for t in ranked if order(t)[0] != missing]
    absent = [t for t in ranked if order(t)[0] == missing]
    return [*(present[::-1] if reverse else present), *absent]


def trials(study: str | optuna.Study, *, storage: str | None = None,
           tracking_uri: str | None = None, states: list[str] | None = None
           ) -> pd.DataFrame:
    """One row per trial (index: trial number): state, objective value(s), `params.*`,
    `metrics.*` (final validation and test metrics), duration, run id, model URI, reason.

    >>> df = trials("digits-smoke")
    >>> int(df["value"].idxmax()) == best_trial("digits-smoke").number   # index: trial number
    True
    >>> df[["state", "value", "params.train.lr", "metrics.test_accuracy"]].shape
    (6, 4)
    """
    import pandas as pd

    results = _Results(study, storage, tracking_uri)
    names = results.objective_names
    value_columns = ["value"] if len(names) == 1 else [f"value_{n}" for n in names]
    rows = []
    for r in trial_results(results.study, tracking_uri=tracking_uri, states=states):
        row: dict[str, Any] = {"number": r.number, "state": r.state}
        for column, value in zip(value_columns, r.values or [None] * len(value_columns),
                                 strict=True):
            row[column] = value
        row.update({f"params.{k}": v for k, v in r.params.items()})
        row.update({f"metrics.{k}": v for k, v in r.metrics.items()})
        row.update({"duration_s": r.duration_s, "started": r.started, "run_id": r.run_id,
                    "model_uri": r.model_uri, "reason": r.reason})
        rows.append(row)
    columns = ["number", "state", *value_columns]
    frame = pd.DataFrame(rows, columns=None if rows else columns)
    return frame.set_index("number")


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
def load_model(trial_or_run_id: TrialResult | str, *, tracking_uri: str | None = None,
               device: str = "cpu") -> nn.Module:
    """The trained model of a trial as a torch module in eval mode on `device`.

    Accepts a `TrialResult` (from `best_trial`, `best_trials`, `get_trial`), an MLflow run
    id, or a model URI (`models:/<id>`).

    >>> import torch
    >>> model = load_model(best_trial("digits-smoke"))
    >>> model(torch.zeros(2, 1, 8, 8)).shape             # two 8x8 images, ten digits
    torch.Size([2, 10])
    """
    from sweeper.tracking.reader import TrackingReader

    if isinstance(trial_or_run_id, TrialResult):
        trial = trial_or_run_id
        if trial.model_uri is None:
            raise ResultError(f"trial {trial.number} of study {trial.study!r} has no logged "
                              f"model (state {trial.state}; the study's `models:` policy may "
                              f"keep only the best); choose a trial that has one, e.g. "
                              f"sweeper best {trial.study}")
        reader = TrackingReader(tracking_uri or trial.tracking_uri)
        return reader.load_model(trial.model_uri.removeprefix("models:/"), device=device)
    reference = str(trial_or_run_id)
    reader = TrackingReader(tracking_uri)
    if reference.startswith("models:/"):
        return reader.load_model(reference.removeprefix("models:/"), device=device)
    model_id = reader.model_id_of_run(reference)
    if model_id is None:
        raise ResultError(f"MLflow run {reference} in {reader.where} has no logged model; "
                          f"give a trial run that has one, or a models:/ URI")
    return reader.load_model(model_id, device=device)

