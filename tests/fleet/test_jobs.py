"""Many workers on one study, as real `sweeper run` processes: `--jobs N` on the default
local stores, several independent workers on PostgreSQL with tracking over HTTP, a worker
killed with SIGKILL mid-trial, and SIGINT/SIGTERM ending the running trial cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from processes import env as env_of
from processes import finish

from studies import tiny_study
from sweeper.fleet.jobs import cpu_threads, slots, worker_device
from sweeper.keys import ATTR_CONFIG
from sweeper.search.storage import open_storage
from sweeper.search.study import count_finished

HOST = socket.gethostname()


def study_file(root: Path, name: str, *, trials: int, epochs: int = 1, train: int = 160,
               extra: str = "") -> Path:
    path = root / f"{name}.yaml"
    path.write_text(tiny_study(name, trials=trials, epochs=epochs, train=train) + extra)
    return path


def sweeper(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sweeper.cli", "run", *args],
                            cwd=cwd, env=env or env_of(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_training(storage: str, name: str, pid: int, timeout: float = 120
                      ) -> optuna.trial.FrozenTrial:
    """The RUNNING trial of the worker `pid` once it trains (its config recorded)."""
    deadline = time.monotonic() + timeout
    rdb = open_storage(storage)  # one engine for the whole wait (PostgreSQL connections)
    while time.monotonic() < deadline:
        try:
            study = optuna.load_study(study_name=name, storage=rdb)
        except KeyError:
            time.sleep(0.2)
            continue
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            mine = trial.user_attrs.get("worker") == f"{HOST}:{pid}"
            if mine and ATTR_CONFIG in trial.system_attrs:
                return trial
        time.sleep(0.2)
    raise AssertionError(f"worker {pid} never started training a trial of {name}")


def runs_by_status(client: MlflowClient, name: str) -> tuple[Any, list[Any]]:
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("sweeper.role") == "parent"]
    trials = [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]
    return parent, trials


# --------------------------------------------------------------------------------------
# Sharing out the machine
# --------------------------------------------------------------------------------------
def test_workers_get_a_gpu_each_or_a_share_of_the_cores() -> None:
    assert [worker_device(None, i, 2) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:0",
                                                             "cuda:1"]
    assert worker_device(None, 3, 0) == "cpu" and worker_device("cuda:1", 0, 4) == "cuda:1"
    assert worker_device("cpu", 1, 8) == "cpu"
    assert cpu_threads(4, cores=16) == 4 and cpu_threads(4, cores=2) == 1
    assert [s.more_trials for s in slots(4, None, 10)] == [3, 3, 2, 2]
    assert [s.more_trials for s in slots(4, None, 2)] == [1, 1]
    assert [s.more_trials for s in slots(3, None, None)] == [None] * 3


# --------------------------------------------------------------------------------------
# --jobs on the default local stores
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_four_local_workers_share_the_default_stores_without_errors(tmp_path: Path) -> None:
    """4 workers x 20 short trials on `mlruns/optuna.db` and `mlruns/mlflow.db`, created
    fresh by the run: no storage error, no tracking warning, nothing left RUNNING."""
    path = study_file(tmp_path, "local4", trials=80)
    code, out, err = finish(sweeper(str(path), "--jobs", "4", "--device", "cpu",
                                    cwd=tmp_path))
    assert code == 0, out + err
    assert "local4: 80 trials, 4 workers, 1 epochs each" in err
    for bad in ("locked", "warning", "error", "could not", "traceback"):
        assert bad not in err.lower() and bad not in out.lower(), err
    study = optuna.load_study(study_name="local4",
                              storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert 80 <= len(trials) <= 80 + 3  # overshoot: at most one per other worker
    workers = Counter(t.user_attrs["worker"] for t in trials)
    assert len(workers) == 4, workers
    params = [t.params["train.lr"] for t in trials]
    assert len(set(params)) == len(params), "workers proposed the same params"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    parent, runs = runs_by_status(client, "local4")
    assert parent.info.status == "FINISHED"
    assert sorted(int(r.data.tags["sweeper.trial_number"]) for r in runs) == \
        [t.number for t in trials]
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
def test_a_grid_shared_by_three_workers_trains_each_point_once(tmp_path: Path) -> None:
    path = study_file(tmp_path, "grid3", trials=100, extra="")
    path.write_text(path.read_text().replace("random, seed: 0", "grid")
                    .replace("{float: [1.0e-3, 3.0e-2], log: true}",
                             "{choice: [0.001, 0.002, 0.004, 0.008, 0.016, 0.03]}")
                    + "  model.hidden: {choice: [[8], [16]]}\n")
    code, out, err = finish(sweeper(str(path), "--jobs", "3", "--device", "cpu",
                                    "--no-tracking", cwd=tmp_path))
    assert code == 0, out + err
    assert "stopped by grid-exhausted" in out
    study = optuna.load_study(study_name="grid3",
                              storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    points = [(t.params["train.lr"], t.params["model.hidden"]) for t in complete]
    assert len(points) == 12 and len(set(points)) == 12


# --------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig, code, reason", [
    (signal.SIGINT, 130, "interrupted"),
    (signal.SIGTERM, 143, "terminated (SIGTERM)"),
])
def test_a_signal_ends_the_running_trial_fail_and_its_run_killed(
        tmp_path: Path, sig: signal.Signals, code: int, reason: str) -> None:
    path = study_file(tmp_path, "sig", trials=5, epochs=200, train=512)
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    process = sweeper(str(path), "--device", "cpu", cwd=tmp_path)
    trial = wait_for_training(storage, "sig", process.pid)
    time.sleep(1.0)
    process.send_signal(sig)
    returncode, out, err = finish(process, timeout=120)
    assert returncode == code, out + err
    assert f"{reason}: the running trial was recorded as FAIL" in err
    study = optuna.load_study(study_name="sig", storage=storage)
    (stopped,) = [t for t in study.trials if t.number == trial.number]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == reason
    assert not study.get_trials(states=(TrialState.RUNNING,))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    parent, runs = runs_by_status(client, "sig")
    (run,) = [r for r in runs if r.data.tags["sweeper.trial_number"] == str(trial.number)]
    assert run.info.status == "KILLED" and run.data.tags["sweeper.reason"] == reason
    assert parent.info.status == "KILLED"
    assert all(r.info.status != "RUNNING" for r in runs)


@pytest.mark.slow
def test_sigterm_to_a_jobs_run_stops_every_worker_cleanly(tmp_path: Path) -> None:
    path = study_file(tmp_path, "term2", trials=20, epochs=200, train=512)
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    process = sweeper(str(path), "--jobs", "2", "--device", "cpu", "--no-tracking",
                      cwd=tmp_path)
    deadline = time.monotonic() + 120
    rdb = open_storage(storage)
    while time.monotonic() < deadline:  # both workers training
        with_config = []
        try:
            study = optuna.load_study(study_name="term2", storage=rdb)
            with_config = [t for t in study.get_trials(states=(TrialState.RUNNING,))
                           if ATTR_CONFIG in t.system_attrs]
        except KeyError:
            pass
        if len(with_config) == 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    returncode, out, err = finish(process, timeout=120)
    assert returncode == 143, out + err
    study = optuna.load_study(study_name="term2", storage=storage)
    stopped = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(stopped) == 2
    assert {t.user_attrs["fail_reason"] for t in stopped} == {"terminated (SIGTERM)"}
    assert not study.get_trials(states=(TrialState.RUNNING,))


# --------------------------------------------------------------------------------------
# A worker killed mid-trial, on PostgreSQL with tracking over HTTP
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_of_one_of_three_workers_loses_nothing(tmp_path: Path, postgres_url: str,
                                                     mlflow_url: str) -> None:
    """Three `sweeper run` processes (as on three machines) share a PostgreSQL study; one
    is killed with SIGKILL while it trains. The others reach the study's total, take the
    lost trial back after the grace period (FAIL "worker lost", re-queued, run again), and
    nothing is left RUNNING in Optuna or in MLflow."""
    name = f"kill9-{os.getpid()}"
    path = study_file(tmp_path, name, trials=8, epochs=40, train=512)
    env = env_of(SWEEPER_STORAGE=postgres_url, MLFLOW_TRACKING_URI=mlflow_url)
    workers = [sweeper(str(path), "--device", "cpu", "--heartbeat", "1s", cwd=tmp_path,
                       env=env) for _ in range(3)]
    victim = workers[0]
    lost = wait_for_training(postgres_url, name, victim.pid, timeout=180)
    time.sleep(1.0)
    study = optuna.load_study(study_name=name, storage=open_storage(postgres_url))
    complete_before = {t.number for t in study.get_trials(states=(TrialState.COMPLETE,))}
    victim.kill()
    victim.wait()
    results = [finish(worker) for worker in workers[1:]]
    for code, out, err in results:
        assert code == 0, out + err

    study = optuna.load_study(study_name=name, storage=open_storage(postgres_url))
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert count_finished(study) >= 8
    assert complete_before <= {n for n, t in trials.items() if t.state == TrialState.COMPLETE}
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    gone = trials[lost.number]
    assert gone.state == TrialState.FAIL
    assert gone.user_attrs["fail_reason"].startswith("worker lost: no heartbeat for")
    (retry,) = [t for t in trials.values() if t.user_attrs.get("retry_of") == lost.number]
    assert retry.state == TrialState.COMPLETE and retry.params == gone.params

    client = MlflowClient(mlflow_url)
    parent, runs = runs_by_status(client, name)
    assert parent.info.status == "FINISHED"
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    (lost_run,) = [r for r in runs if r.data.tags["sweeper.trial_number"] == str(lost.number)]
    assert lost_run.info.status == "FAILED"
    assert lost_run.data.tags["sweeper.reason"].startswith("worker lost")
    for number, trial in trials.items():
        if trial.state == TrialState.COMPLETE:
            (run,) = [r for r in runs if r.data.tags["sweeper.trial_number"] == str(number)]
            assert run.info.status == "FINISHED"
