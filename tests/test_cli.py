"""The command line as a user meets it: help, validate, run, resume, bad input (one line,
exit 2, nothing written), Ctrl-C (exit 130, trial FAIL), and the README's quick start on
the real MNIST."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from studies import tiny_study
from sweeper.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

TINY = tiny_study(lr="[1.0e-3, 1.0e-2]")


@pytest.fixture(autouse=True)
def local_tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep in-process runs' MLflow store in the test's folder, not the repo's mlruns/."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture
def study_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "run" in result.output and "validate" in result.output


def _help(*command: str) -> str:
    """A command's --help as one line of words (rich wraps it to the terminal)."""
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_every_timeout_example_in_help_runs(study_file: Path, storage: str) -> None:
    match = re.search(r"Start no new trial after this long \(([^)]*)\)", _help("run"))
    assert match is not None, "run --help no longer lists --timeout examples"
    examples = [e.strip() for e in match.group(1).split(",")]
    assert "90" in examples  # a bare number: seconds
    for example in examples:
        result = runner.invoke(app, ["run", str(study_file), "--storage", storage,
                                     "--no-tracking", "--trials", "1", "--timeout", example])
        assert result.exit_code == 0, (example, result.output)
        assert "this run: 1 complete" in result.output, (example, result.output)
    result = runner.invoke(app, ["run", str(study_file), "--storage", storage,
                                 "--no-tracking", "--timeout", "420"])
    assert result.exit_code == 0, result.output


def test_study_examples_in_help_run(tmp_path: Path, storage: str) -> None:
    """The file and study-name examples of every command's help are real."""
    from sweeper.search.study import open_or_create
    from sweeper.spec import config

    file_example = re.search(r"e\.g\. (\S+\.yaml)", _help("validate")).group(1)
    result = runner.invoke(app, ["validate", str(REPO / file_example)])
    assert result.exit_code == 0, result.output
    name_example = re.search(r"e\.g\. (\w+);", _help("trials")).group(1)
    open_or_create(config.load(REPO / file_example), storage)[0]
    assert config.load(REPO / file_example).name == name_example
    result = runner.invoke(app, ["trials", name_example, "--storage", storage])
    assert result.exit_code == 0, result.output


def test_validate_prints_the_space() -> None:
    result = runner.invoke(app, ["validate", str(REPO / "studies" / "mnist_arch.yaml")])
    assert result.exit_code == 0, result.output
    assert "OK - study mnist-arch" in result.output
    assert "model.filter_size" in result.output and "model.arch=cnn" in result.output
    assert "[mlp, cnn, lenet, resnet]" in result.output
    assert "infeasible corners: none" in result.output


def test_validate_reports_infeasible_corners(tmp_path: Path) -> None:
    path = tmp_path / "corners.yaml"
    path.write_text("name: c\ndataset: {name: mnist}\nsampler: {name: grid}\nspace:\n"
                    "  model.filter_size: {choice: [3, 11]}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0
    assert "grid size: 2 points" in result.output
    assert "infeasible corners: 1" in result.output and "model.filter_size=11" in result.output


def test_bad_file_is_one_line_exit_2_and_debug_shows_the_exception(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ndataset: {name: mnist}\ntrain: {lr: -1}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0] == (f"error: {path}:3: train.lr: input should be greater than 0, but got -1")
    debug = runner.invoke(app, ["validate", str(path), "--debug"])
    assert debug.exit_code != 0 and type(debug.exception).__name__ == "ConfigError"


def test_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml: no such file" in result.output


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ndataset: {name: mnist}\nspace:\n  train.lr: {float: [1, 0]}\n")
    db = tmp_path / "optuna.db"
    result = runner.invoke(app, ["run", str(path), "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 2 and "`low <= high` must hold" in result.output
    assert not db.exists(), "a bad study file creates no storage and no study"


def test_bad_timeout_and_device(study_file: Path, storage: str) -> None:
    result = runner.invoke(app, ["run", str(study_file), "--storage", storage,
                                 "--timeout", "soon"])
    assert result.exit_code == 2 and "--timeout" in result.output
    result = runner.invoke(app, ["run", str(study_file), "--storage", storage,
                                 "--device", "tpu"])
    assert result.exit_code == 2 and "device 'tpu'" in result.output
    assert optuna.get_all_study_names(storage) == []


def test_missing_dataset_is_one_line(tmp_path: Path, storage: str) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("name: f\ndataset: {name: fashion_mnist, download: false}\n")
    result = runner.invoke(app, ["run", str(path), "--storage", storage,
                                 "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "FashionMNIST/raw" in line and "train-images-idx3-ubyte" in line


def test_run_then_resume(study_file: Path, storage: str) -> None:
    result = runner.invoke(app, ["run", str(study_file), "--storage", storage, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "this run: 2 complete; stopped by budget" in result.output
    assert "best: trial #" in result.output
    again = runner.invoke(app, ["run", str(study_file), "--storage", storage])
    assert again.exit_code == 0
    assert "already has 2/2 trials: nothing to do" in again.output
    more = runner.invoke(app, ["run", str(study_file), "--storage", storage, "--trials", "1"])
    assert more.exit_code == 0 and "this run: 1 complete; stopped by trials" in more.output
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


def test_storage_from_environment(study_file: Path, storage: str) -> None:
    result = runner.invoke(app, ["run", str(study_file), "--trials", "1"],
                           env={"SWEEPER_STORAGE": storage})
    assert result.exit_code == 0, result.output
    assert optuna.get_all_study_names(storage) == ["tiny"]


@pytest.mark.slow  # a real process, Ctrl-C mid-trial: 9 s
def test_ctrl_c_fails_the_running_trial_and_exits_130(tmp_path: Path, storage: str) -> None:
    path = tmp_path / "slow.yaml"
    path.write_text(TINY.replace("budget: {trials: 2, epochs: 1}",
                                 "budget: {trials: 2, epochs: 500}"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "run", str(path), "--storage",
                             storage, "--device", "cpu"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # No deadline of its own (a busy machine only makes it slower): the trial starts,
        # or the process ends, or pytest's timeout stops the test.
        running = False
        while proc.poll() is None and not running:
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="tiny", storage=storage)
                running = any(t.state.name == "RUNNING" for t in study.trials)
            except KeyError:
                continue
        assert running, f"a trial started: {proc.communicate()}"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert "the running trial was recorded as FAIL (#0) and re-queued as #1" in err, err
    trial, retry = optuna.load_study(study_name="tiny", storage=storage).trials
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"] == "interrupted"
    assert retry.state.name == "WAITING" and retry.user_attrs["retry_of"] == 0


@pytest.mark.slow
def test_readme_quickstart_on_real_mnist(mnist_dir: Path, tmp_path: Path) -> None:
    """The README's first command, as written, in a fresh folder: the quick start study on
    the real MNIST with the default local storage."""
    import shutil

    shutil.copytree(REPO / "studies", tmp_path / "studies")
    env = {**os.environ, "SWEEPER_DATA_DIR": str(mnist_dir)}
    env.pop("SWEEPER_STORAGE", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "sweeper.cli", "run",
                             "studies/quickstart.yaml"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "this run: " in result.stdout and "best: trial #" in result.stdout
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    study = optuna.load_study(study_name="quickstart", storage=storage)
    assert len(study.trials) == 6
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert study.best_value > 0.9, "a few epochs on 6,000 MNIST images reach over 90%"
