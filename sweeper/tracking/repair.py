"""Runs that a crashed worker left RUNNING, ended with the status their trial has in Optuna:
for a lost trial found by another worker (`end_lost_run`), for a worker that starts
(`reap_runs` without the parent), and for `sweeper reap` (`reap_runs`), which also ends a
parent run that no worker is left to end. `fill_in_runs` writes what MLflow missed while
it was away (or while a killed worker's uploads were queued) from Optuna's record: a run
for a finished trial that has none, and the summary metrics of one that lacks them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sweeper.keys import (
    ATTR_CONFIG,
    ATTR_METRICS,
    ATTR_REASON,
    TAG_FILLED_IN,
    TAG_PARENT,
    TAG_REASON,
    TAG_ROLE,
    TAG_STATE,
    TAG_STUDY,
    TAG_TRIAL,
    mlflow_status,
    trial_record,
)
from sweeper.tracking.common import (
    chunks,
    finite,
    is_run_metric,
    metric_key,
    param_value,
    truncate,
)

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient



@dataclass(frozen=True)
class EndedRun:
    run_id: str
    name: str  # trial-N, or the parent run's name
    status: str  # the status it was given
    reason: str


def end_run(client: MlflowClient, run_id: str, state: str, status: str,
            reason: str) -> bool:
    """Tag the run with the trial's state and reason, write the reason as `error.txt` for a
    FAIL, and end it with `status`, if it is still RUNNING. Returns whether it was."""
    from mlflow.entities import RunTag

    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        return False
    client.log_batch(run_id, tags=[RunTag(TAG_STATE, state),
                                   RunTag(TAG_REASON, truncate(reason))])
    if state == "FAIL":
        client.log_text(run_id, reason + "\n", "error.txt")
    client.set_terminated(run_id, status)
    return True


def end_lost_run(client: MlflowClient, run_id: str, reason: str) -> bool:
    """The run of a trial whose worker vanished: FAILED, with the reason."""
    return end_run(client, run_id, "FAIL", "FAILED", reason)


def reap_runs(client: MlflowClient, experiment_id: str, *,
              trials: Iterable[optuna.trial.FrozenTrial],
              parent_run_id: str | None, study_running: bool,
              only_trials: Collection[int] | None = None,
              still_ending: Collection[int] = ()) -> list[EndedRun]:
    """End the experiment's RUNNING runs whose trial is not RUNNING in Optuna (with the
    status its state maps to), and the parent run once no trial of the study runs.

    `trials`: the study's trials as Optuna records them (a run of a trial not among them
    ends FAIL). `only_trials`: look at the runs of these trials only. A caller whose
    `trials` are a snapshot taken while other workers run passes the trials it looked up,
    so that a run opened after the snapshot (its trial asked since) is not taken for an
    orphan. `still_ending`: finished trials whose worker is alive and still ending their
    run (`fleet.liveness`): left to it."""
    trials = list(trials)
    trial_states = {t.number: t.state.name for t in trials}
    reasons = {t.number: str(t.user_attrs[ATTR_REASON]) for t in trials
               if t.user_attrs.get(ATTR_REASON)}
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                              max_results=5000)
    ended: list[EndedRun] = []
    for run in runs:
        tags = run.data.tags
        name = run.info.run_name or run.info.run_id
        if tags.get(TAG_ROLE) == "trial" and TAG_TRIAL in tags:
            number = int(tags[TAG_TRIAL])
            if only_trials is not None and number not in only_trials:
                continue
            state = trial_states.get(number)
            if state == "RUNNING" or number in still_ending:
                continue  # its worker is alive: the run is its to end
            if state is None or state == "WAITING":
                state, reason = "FAIL", "no such trial in the Optuna study"
            else:
                reason = reasons.get(number) or (
                    "worker lost before the run was ended" if state != "COMPLETE" else
                    "worker lost while uploading: files may be missing")
            # A COMPLETE trial whose worker died mid-upload keeps COMPLETE <-> FINISHED;
            # the reason tag says that files may be missing.
            status = mlflow_status(state)
            if end_run(client, run.info.run_id, state, status, reason):
                ended.append(EndedRun(run.info.run_id, name, status, reason))
        elif run.info.run_id == parent_run_id and not study_running:
            client.set_terminated(run.info.run_id, "FINISHED")
            ended.append(EndedRun(run.info.run_id, name, "FINISHED",
                                  "no trial of the study is running"))
    return ended


def fill_in_runs(client: MlflowClient, experiment_id: str, study_name: str,
                 parent_run_id: str | None, trials: Iterable[optuna.trial.FrozenTrial],
                 objectives: list[str] | tuple[str, ...] = ()) -> list[EndedRun]:
    """For each finished trial of `trials`: create its run from Optuna's record if it has
    none (params, summary metrics, state, reason), or log the summary metrics its run
    lacks (those a trial run shows: `common.is_run_metric`). Returns the runs created or
    completed."""
    from mlflow.entities import Metric, Param, RunTag


    finished = [t for t in trials if t.state.is_finished()]
    if not finished:
        return []
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'",
                              max_results=50000)
    by_number = {}
    for run in runs:
        number = run.data.tags.get(TAG_TRIAL)
        if number is not None and number.isdigit():
            by_number.setdefault(int(number), run)
    done: list[EndedRun] = []
    for trial in finished:
        summary = {k: v for k, v in trial_record(trial, ATTR_METRICS).items()
                   if is_run_metric(k, tuple(objectives))}
        when = int((trial.datetime_complete or trial.datetime_start).timestamp() * 1000) \
            if (trial.datetime_complete or trial.datetime_start) else 0
        run = by_number.get(trial.number)
        if run is None:
            status = mlflow_status(trial.state.name)
            reason = str(trial.user_attrs.get(ATTR_REASON) or "")
            tags = {TAG_STUDY: study_name, TAG_TRIAL: str(trial.number), TAG_ROLE: "trial",
                    TAG_STATE: trial.state.name,
                    TAG_FILLED_IN: "the run, from the Optuna record"}
            if parent_run_id:
                tags[TAG_PARENT] = parent_run_id
            if reason:
                tags[TAG_REASON] = truncate(reason)
            start = int(trial.datetime_start.timestamp() * 1000) if trial.datetime_start \
                else None
            created = client.create_run(experiment_id, run_name=f"trial-{trial.number}",
                                        tags=tags, start_time=start)
            run_id = created.info.run_id
            config = trial_record(trial, ATTR_CONFIG) or trial.params
            params = [Param(k, param_value(v)) for k, v in config.items()]
            for chunk in chunks(params, 100):
                client.log_batch(run_id, params=chunk)
            metrics = [Metric(metric_key(k), float(v), when, 0)
                       for k, v in summary.items() if finite(v)]
            for chunk in chunks(metrics, 900):
                client.log_batch(run_id, metrics=chunk)
            client.set_terminated(run_id, status, end_time=when or None)
            done.append(EndedRun(run_id, f"trial-{trial.number}", status,
                                 "created from the Optuna record"))
            continue
        recorded = run.data.tags.get(TAG_STATE)
        if recorded is not None and recorded != trial.state.name:
            # The run was closed before its worker learnt how the trial ended (the tell
            # landed, then the storage went away): Optuna's record decides.
            status = mlflow_status(trial.state.name)
            reason = str(trial.user_attrs.get(ATTR_REASON) or "")
            client.log_batch(run.info.run_id, tags=[
                RunTag(TAG_STATE, trial.state.name), RunTag(TAG_REASON, truncate(reason)),
                RunTag(TAG_FILLED_IN, "state, from the Optuna record")])
            client.set_terminated(run.info.run_id, status, end_time=when or None)
            done.append(EndedRun(run.info.run_id, run.info.run_name or run.info.run_id,
                                 status, f"state {trial.state.name} from the Optuna record "
                                         f"(the run said {recorded})"))
        missing = [Metric(metric_key(k), float(v), when, 0) for k, v in summary.items()
                   if finite(v) and metric_key(k) not in run.data.metrics]
        if missing:
            for chunk in chunks(missing, 900):
                client.log_batch(run.info.run_id, metrics=chunk,
                                 tags=[RunTag(TAG_FILLED_IN, "metrics, from the Optuna "
                                                             "record")])
            done.append(EndedRun(run.info.run_id, run.info.run_name or run.info.run_id,
                                 run.info.status, f"{len(missing)} metric(s) filled in from "
                                                  f"the Optuna record"))
    return done
