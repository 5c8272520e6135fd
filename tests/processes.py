"""Real `sweeper` processes for the fault and fleet tests, and the check that Optuna and
MLflow agree once they are gone."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweeper.search.storage import open_storage

STATUS = {"COMPLETE": {"FINISHED"}, "PRUNED": {"KILLED"}, "FAIL": {"FAILED", "KILLED"}}


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items()
           if k not in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI")}
    out.update(extra)
    return out


def sweeper(*args: str, cwd: Path, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sweeper.cli", *args], cwd=cwd,
                            env=env(**extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"sweeper did not finish:\n{out}\n{err}") from None
    return process.returncode, out, err


def wait_until(check, timeout: float = 300, what: str = "",  # type: ignore[no-untyped-def]
               process: subprocess.Popen[str] | None = None) -> None:
    """Poll `check` until it holds; fail at once, with its output, if `process` ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"sweeper exited {process.returncode} before {what}:\n"
                                 f"{out}\n{err}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def trials_of(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials()


def assert_agree(storage: str, tracking: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """No trial and no run RUNNING; every trial's run has the status its state maps to."""
    trials = trials_of(storage, name)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    by_number = {r.data.tags.get("sweeper.trial_number"): r for r in runs}
    for trial in trials:
        if trial.state == TrialState.WAITING:
            continue
        run = by_number.get(str(trial.number))
        assert run is not None, f"trial {trial.number} has no run"
        assert run.info.status in STATUS[trial.state.name], (trial.number, trial.state,
                                                             run.info.status)
    return trials
