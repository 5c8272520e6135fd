"""`sweeper reap` after a real crash: a worker killed with SIGKILL mid-trial, with nobody
left to take its trial back; reap ends the leftovers in Optuna and MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from processes import env as env_of
from processes import finish
from test_jobs import runs_by_status, study_file, sweeper, wait_for_training


def reap(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sweeper.cli", "reap", *args], cwd=cwd,
                          env=env_of(), capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.slow
def test_reap_ends_what_a_killed_worker_left_in_both_systems(tmp_path: Path) -> None:
    path = study_file(tmp_path, "crashed", trials=3, epochs=2000, train=512)
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    worker = sweeper(str(path), "--device", "cpu", "--heartbeat", "1s", cwd=tmp_path)
    lost = wait_for_training(storage, "crashed", worker.pid)
    time.sleep(1.0)
    worker.kill()
    worker.wait()

    early = reap("crashed", "--grace", "1h", cwd=tmp_path)  # not silent long enough yet
    assert early.returncode == 0, early.stderr
    assert f"still running, their workers alive: #{lost.number}" in early.stdout
    time.sleep(3.0)
    done = reap("crashed", "--grace", "2s", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["lost"] == [{"number": lost.number, "retry": lost.number + 1}]
    assert report["running"] == []
    assert {(r["name"], r["status"]) for r in report["runs"]} == {
        (f"trial-{lost.number}", "FAILED"), ("crashed", "FINISHED")}

    study = optuna.load_study(study_name="crashed", storage=storage)
    gone, retry = study.trials[lost.number], study.trials[lost.number + 1]
    assert gone.state == TrialState.FAIL and gone.user_attrs["fail_reason"].startswith(
        "worker lost: no heartbeat for")
    assert retry.state == TrialState.WAITING and retry.params == gone.params
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    parent, runs = runs_by_status(client, "crashed")
    assert parent.info.status == "FINISHED"
    assert all(r.info.status != "RUNNING" for r in runs)
    (run,) = runs
    assert run.data.tags["sweeper.reason"] == gone.user_attrs["fail_reason"]
    assert "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}

    again = reap("crashed", cwd=tmp_path)
    assert again.returncode == 0 and "nothing to reap in study 'crashed'" in again.stdout
    # The next run starts with the re-queued trial, with the lost trial's params.
    code, out, err = finish(sweeper(str(path), "--device", "cpu", "--trials", "1",
                                    "--no-tracking", cwd=tmp_path))
    assert code == 0, out + err
    retry = optuna.load_study(study_name="crashed", storage=storage).trials[lost.number + 1]
    assert retry.state == TrialState.COMPLETE and retry.params == gone.params


def test_reap_all_and_bad_questions(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    spec_path = study_file(tmp_path, "idle", trials=1)
    from sweeper.search.study import open_or_create
    from sweeper.spec import config

    study = open_or_create(config.load(spec_path), storage)[0]
    study.ask()  # RUNNING, no heartbeat ever: an old worker, or one that never started
    shown = reap("idle", "--all", "--no-retry", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == "trial 0: FAIL (worker lost); not re-queued"
    (trial,) = optuna.load_study(study_name="idle", storage=storage).trials
    assert trial.user_attrs["fail_reason"] == "worker lost: ended by sweeper reap --all"
    unknown = reap("idel", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "no study 'idel'" in unknown.stderr and "did you mean 'idle'?" in unknown.stderr
    assert "Traceback" not in unknown.stderr
