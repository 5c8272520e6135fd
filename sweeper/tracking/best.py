"""The best so far: whether a trial's values would beat every complete trial, the parent
run's `best_value`/`best_trial` metrics and `best.*` tags (a Pareto front for several
objectives), and the model registry, where alias `best` of model `<study>` points at the
best model of a single-objective study."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sweeper.keys import ATTR_RUN_ID, TAG_STUDY, TAG_TRIAL, TAG_VALUE
from sweeper.tracking.common import REASON_MAX_CHARS, REGISTRY_ALIAS, json_text, now_ms

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

    from sweeper.spec.config import StudySpec
    from sweeper.tracking.trial_run import LoggedModel

log = logging.getLogger(__name__)


def beats_best(study: optuna.Study, values: list[float]) -> bool:
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


@dataclass
class BestUpdate:
    """What the parent run gets after a trial completed."""

    number: int | None  # the best trial now (None: several objectives)
    metrics: list[Any]  # mlflow.entities.Metric
    tags: list[Any]  # mlflow.entities.RunTag
    register: tuple[int, float, LoggedModel] | None = None  # a new best model to register


def best_so_far(study: optuna.Study, step: int, recorded: int | None,
                models: dict[int, LoggedModel]) -> BestUpdate | None:
    """Parent metrics `best_value`/`best_trial` (step = trial number, so the parent's
    chart is the optimization history) and `best.*` tags when the best trial changed
    since `recorded`; the Pareto front's size and members for several objectives."""
    from mlflow.entities import Metric, RunTag

    now = now_ms()
    metrics: list[Metric] = []
    tags: list[RunTag] = []
    if len(study.directions) > 1:
        front = study.best_trials
        metrics.append(Metric("pareto_size", float(len(front)), now, step))
        tags.append(RunTag("best.trials", ",".join(str(t.number) for t in front)))
        return BestUpdate(recorded, metrics, tags)
    try:
        best = study.best_trial
    except ValueError:
        return None
    metrics += [Metric("best_value", float(best.values[0]), now, step),
                Metric("best_trial", float(best.number), now, step)]
    update = BestUpdate(best.number, metrics, tags)
    if best.number != recorded:
        run_id = best.user_attrs.get(ATTR_RUN_ID, "")
        tags += [RunTag("best.trial", str(best.number)),
                 RunTag("best.value", repr(float(best.values[0]))),
                 RunTag("best.run_id", str(run_id)),
                 RunTag("best.params", json_text(best.params)[:REASON_MAX_CHARS])]
        if best.number == step and step in models:
            logged = models[step]
            tags.append(RunTag("best.model_uri", f"models:/{logged.model_id}"))
            update.register = (step, float(best.values[0]), logged)
    return update


def register(client: MlflowClient, spec: StudySpec, number: int, value: float,
             logged: LoggedModel, *, registry_ready: bool) -> bool:
    """Register the model as a new version of `<study>` and point alias `best` at it,
    unless the version the alias points to is at least as good (a faster worker). Returns
    whether the registered model exists now.

    The source is the model's artifact location, not `models:/<id>`: a local SQL
    registry resolves the latter through MLflow's *global* tracking URI (a TODO in
    MLflow), which is not this tracker's store.
    """
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    name = spec.name
    if client.get_logged_model(logged.model_id).status != LoggedModelStatus.READY:
        log.debug("model of trial %d was not uploaded: not registered", number)
        return registry_ready
    if not registry_ready:
        try:
            client.create_registered_model(
                name, tags={TAG_STUDY: name},
                description=f"Best model of sweeper study {name!r} (alias "
                            f"'{REGISTRY_ALIAS}').")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    try:
        current = client.get_model_version_by_alias(name, REGISTRY_ALIAS)
    except MlflowException:
        current = None
    if current is not None and TAG_VALUE in current.tags:
        maximize = spec.objective_list[0].direction == "maximize"
        theirs = float(current.tags[TAG_VALUE])
        if (theirs >= value) if maximize else (theirs <= value):
            return True
    version = client.create_model_version(
        name, source=logged.location, run_id=logged.run_id, model_id=logged.model_id,
        tags={TAG_TRIAL: str(number), TAG_VALUE: repr(value)},
        await_creation_for=0)
    client.set_registered_model_alias(name, REGISTRY_ALIAS, version.version)
    return True
