"""Signals cannot tear a trial: a signal injected at each named point of a real `sweeper
run` (after ask, inside tell, while a run is created, inside end_study, between trials),
SIGINT and SIGTERM each, with the default local stores. Afterwards no Optuna trial and no
MLflow run is RUNNING, the exit code is the signal's, and the process left within seconds.
The points are reached through the test-only `SWEEPER_TEST_SIGNAL_AT` hook (`stopping`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from studies import tiny_study
from sweeper.fleet import stopping

TINY = tiny_study("sig", trials=3, train=64, test=32, hidden="[8]", train_block="batch_size: 32")
POINTS = ["after-ask", "in-tell", "in-create-run", "in-end-study", "between-trials"]
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


@pytest.fixture(scope="module")
def fresh_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow store made once: creating its tables takes seconds under load."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)
    return path


def run_with_signal(root: Path, at: str, template: Path
                    ) -> tuple[subprocess.CompletedProcess[str], float]:
    (root / "sig.yaml").write_text(TINY)
    (root / "mlruns").mkdir()
    shutil.copy(template, root / "mlruns" / "mlflow.db")
    env = {k: v for k, v in os.environ.items()
           if k not in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI")}
    env[stopping.TEST_SIGNAL_ENV] = at
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "sweeper.cli", "run", "sig.yaml",
                             "--device", "cpu"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=180, check=False)
    return result, time.monotonic() - started


def left_running(root: Path) -> tuple[list[int], list[str]]:
    """RUNNING trials (numbers) and RUNNING MLflow runs (names) in the local stores."""
    study = optuna.load_study(study_name="sig",
                              storage=f"sqlite:///{root / 'mlruns' / 'optuna.db'}")
    trials = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sig")
    runs = client.search_runs([experiment.experiment_id], max_results=100) if experiment else []
    return trials, [r.info.run_name for r in runs if r.info.status == "RUNNING"]


def check_stopped(root: Path, sig: signal.Signals, point: str, template: Path) -> None:
    result, seconds = run_with_signal(root, f"{point}:{sig.name}", template)
    assert result.returncode == EXIT[sig], result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    reason = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert f"{reason}: " in result.stderr, result.stderr
    assert left_running(root) == ([], [])
    assert seconds < 60, f"took {seconds:.0f} s to stop"
    study = optuna.load_study(study_name="sig",
                              storage=f"sqlite:///{root / 'mlruns' / 'optuna.db'}")
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    runs = {r.data.tags.get("sweeper.trial_number"): r for r in client.search_runs(
        [client.get_experiment_by_name("sig").experiment_id], max_results=100)}
    for trial in study.trials:  # the two systems agree on every trial
        run = runs.get(str(trial.number))
        if run is None:
            continue
        want = {"COMPLETE": {"FINISHED"}, "PRUNED": {"KILLED"},
                "FAIL": {"FAILED", "KILLED"}}[trial.state.name]
        assert run.info.status in want, (trial.number, trial.state, run.info.status)
    if point in ("after-ask", "in-create-run"):  # a trial was running: FAIL, interrupted
        (stopped,) = [t for t in study.trials if t.state == TrialState.FAIL]
        assert stopped.user_attrs["fail_reason"] == reason
        assert runs[str(stopped.number)].info.status == "KILLED"
        assert f"the running trial was recorded as FAIL (#{stopped.number})" in result.stderr
    if point in ("in-tell", "between-trials"):  # the trial that ended keeps its result
        assert study.trials[0].state == TrialState.COMPLETE
        assert runs["0"].info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("point", POINTS)
def test_a_signal_at_any_point_leaves_nothing_running(tmp_path: Path, point: str,
                                                      sig: signal.Signals,
                                                      fresh_mlflow_db: Path) -> None:
    check_stopped(tmp_path, sig, point, fresh_mlflow_db)


def test_the_hook_fires_only_at_its_point_and_only_once(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    fired: list[tuple[int, int]] = []
    monkeypatch.setattr(stopping, "_TEST_TARGET", ("in-tell", int(signal.SIGUSR1), 2))
    monkeypatch.setattr(stopping, "_test_passes", 0)
    monkeypatch.setattr(os, "kill", lambda pid, sig: fired.append((pid, sig)))
    for point in ("after-ask", "in-tell", "after-ask", "in-tell", "in-tell"):
        stopping.checkpoint(point)
    assert fired == [(os.getpid(), int(signal.SIGUSR1))]


def test_a_signal_in_deferred_code_waits_for_the_next_interruptible_point() -> None:
    with stopping.stop_on_signals():
        os.kill(os.getpid(), signal.SIGINT)  # bookkeeping: recorded, not raised
        assert stopping.requested() == "interrupted"
        with pytest.raises(stopping.Stopped, match="interrupted"), stopping.interruptible():
            pytest.fail("an interruptible block starts only after a pending stop")
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C gets out anywhere
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert stopping.requested() is None
