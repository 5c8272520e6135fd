"""Runs that a crashed worker left RUNNING, ended with the status their trial has in Optuna:
for a lost trial found by another worker (`end_lost_run`), and for `sweeper reap`
(`reap_runs`), which also ends a parent run that no worker is left to end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sweeper.tracking.common import (
    MLFLOW_STATUS,
    TAG_REASON,
    TAG_ROLE,
    TAG_STATE,
    TAG_TRIAL,
    truncate,
)

if TYPE_CHECKING:
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
              trial_states: Mapping[int, str], reasons: Mapping[int, str],
              parent_run_id: str | None, study_running: bool) -> list[EndedRun]:
    """End the experiment's RUNNING runs whose trial is not RUNNING in Optuna (with the
    status its state maps to), and the parent run once no trial of the study runs."""
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                              max_results=5000)
    ended: list[EndedRun] = []
    for run in runs:
        tags = run.data.tags
        name = run.info.run_name or run.info.run_id
        if tags.get(TAG_ROLE) == "trial" and TAG_TRIAL in tags:
            number = int(tags[TAG_TRIAL])
            state = trial_states.get(number)
            if state == "RUNNING":
                continue  # its worker is alive: the run is its to end
            if state is None or state == "WAITING":
                state, reason = "FAIL", "no such trial in the Optuna study"
            else:
                reason = reasons.get(number) or (
                    "worker lost before the run was ended" if state != "COMPLETE" else
                    "worker lost while uploading: files may be missing")
            # A COMPLETE trial whose worker died mid-upload keeps COMPLETE <-> FINISHED;
            # the reason tag says that files may be missing.
            status = MLFLOW_STATUS[state]
            if end_run(client, run.info.run_id, state, status, reason):
                ended.append(EndedRun(run.info.run_id, name, status, reason))
        elif run.info.run_id == parent_run_id and not study_running:
            client.set_terminated(run.info.run_id, "FINISHED")
            ended.append(EndedRun(run.info.run_id, name, "FINISHED",
                                  "no trial of the study is running"))
    return ended
