"""`fleet.liveness`: a run whose trial is finished is left to its worker while that worker
is alive and still writing it, and ended once the worker is gone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow import MlflowClient

from studies import tiny_study
from sweeper.fleet.heartbeat import HeartbeatSettings
from sweeper.fleet.liveness import process_exists, still_ending
from sweeper.keys import ATTR_HEARTBEAT, ATTR_WORKER, TAG_REASON, TAG_ROLE, TAG_STATE, TAG_TRIAL
from sweeper.search.queries import StudyQueries
from sweeper.search.storage import rdb_of
from sweeper.search.study import RunOptions, open_or_create, run_study
from sweeper.spec import config
from sweeper.tracking.tracker import MlflowTracker

SPEC = config.loads(tiny_study("ending", trials=1, train=128, hidden="[8]",
                                train_block="batch_size: 64"))
HOST = socket.gethostname()


@pytest.fixture
def live_process() -> Iterator[subprocess.Popen[bytes]]:
    """A process of this machine that stands for a worker still at work."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def finished_trial(study: optuna.Study, worker: str, *, beat: bool = True,
                   grace_s: float | None = None) -> optuna.trial.FrozenTrial:
    """A trial told COMPLETE by `worker` ("host:pid"), which beat just now."""
    trial = study.ask()
    trial.suggest_float("train.lr", 1e-3, 3e-2, log=True)
    trial.set_user_attr(ATTR_WORKER, worker)
    if grace_s is not None:
        rdb_of(study).set_trial_system_attr(trial._trial_id, ATTR_HEARTBEAT,
                                            {"interval_s": grace_s / 4, "grace_s": grace_s})
    if beat:
        rdb_of(study).record_heartbeat(trial._trial_id)
    study.tell(trial, 0.5)
    return study._storage.get_trial(trial._trial_id)


def test_a_process_exists_until_it_ends_and_a_zombie_does_not_count() -> None:
    assert process_exists(os.getpid())
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    assert process_exists(process.pid)
    process.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_exists(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # killed, not yet waited for: a zombie
    assert not process_exists(process.pid)
    process.wait()
    assert not process_exists(process.pid)


def test_a_finished_trial_is_still_ending_while_its_worker_lives_and_beats(
        storage: str, live_process: subprocess.Popen[bytes]) -> None:
    study = open_or_create(SPEC, storage)[0]
    alive = finished_trial(study, f"{HOST}:{live_process.pid}")
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout.strip()
    dead = finished_trial(study, f"{HOST}:{dead_pid}")
    elsewhere = finished_trial(study, "another-machine:1")
    never_beat = finished_trial(study, f"{HOST}:{live_process.pid}", beat=False)
    silent = finished_trial(study, "another-machine:2", grace_s=1.0)
    running = study.ask()
    rdb_of(study).record_heartbeat(running._trial_id)
    time.sleep(2.2)  # SQLite's clock counts whole seconds: `silent` is past its grace
    trials = study.get_trials()

    assert still_ending(study, trials) == {alive.number, elsewhere.number}
    assert dead.number not in still_ending(study, trials)
    assert never_beat.number not in still_ending(study, trials)
    assert silent.number not in still_ending(study, trials)
    # A grace given for all (`sweeper reap --grace 1s`) outweighs the recorded ones.
    short = HeartbeatSettings(interval_s=0.25, grace_s=1.0)
    assert still_ending(study, trials, default=short, override=True) == set()
    live_process.kill()
    live_process.wait()
    assert still_ending(study, trials) == {elsewhere.number}


def test_a_starting_worker_leaves_a_run_that_a_live_worker_is_still_writing(
        tmp_path: Path, storage: str, live_process: subprocess.Popen[bytes]) -> None:
    """The race two workers of one study ran into: one told Optuna that its trial was
    COMPLETE and was still uploading the run when the other started and ended the run as
    left behind by a dead worker."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = open_or_create(SPEC, storage)[0]
    first = MlflowTracker(tracking)
    first.start_study(study, SPEC)
    client = MlflowClient(tracking)
    trial = finished_trial(study, f"{HOST}:{live_process.pid}")
    run = client.create_run(first.experiment_id, run_name=f"trial-{trial.number}", tags={
        TAG_ROLE: "trial", TAG_TRIAL: str(trial.number)})

    MlflowTracker(tracking).start_study(study, SPEC)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"

    live_process.kill()
    live_process.wait()
    MlflowTracker(tracking).start_study(study, SPEC)
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "FINISHED"
    assert ended.data.tags[TAG_STATE] == "COMPLETE"
    assert "worker lost while uploading" in ended.data.tags[TAG_REASON]


def test_a_told_trial_beats_until_its_run_is_written(tmp_path: Path, storage: str) -> None:
    """A worker's heartbeat outlasts the tell while the run's writes are queued, and stops
    once they are made."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = HeartbeatSettings(interval_s=0.2, grace_s=1.0)
    seen: dict[str, Any] = {}

    class SlowUploads(MlflowTracker):
        def trial_ended(self, study: optuna.Study, outcome: Any) -> None:
            super().trial_ended(study, outcome)
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(
                study._study_id, outcome.number)
            queries = StudyQueries(rdb_of(study), study._study_id)

            def upload() -> None:  # a slow upload, after which its trial's silence is read
                time.sleep(2.1)
                seen["silence"] = queries.silences([trial_id])[trial_id]
                seen["state"] = study._storage.get_trial(trial_id).state

            self.queue("upload slowly", upload)

    report = run_study(SPEC, RunOptions(storage=storage, device="cpu", heartbeat=settings),
                       tracker=SlowUploads(tracking))
    (outcome,) = report.outcomes
    assert outcome.state == "COMPLETE"
    assert seen["state"] == optuna.trial.TrialState.COMPLETE
    # Told 2.1 s before, beating every 0.2 s (SQLite's clock counts whole seconds).
    assert seen["silence"] <= 1.0
    # No heartbeat is left beating once the run is written.
    trial_id = report.study.trials[0]._trial_id
    assert f"sweeper-heartbeat-{trial_id}" not in {t.name for t in threading.enumerate()}
