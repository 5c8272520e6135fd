"""`sweeper rerun`: a completed trial trained again from its logged config and seed gives
the logged metrics exactly on the CPU."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from sweeper.cli import app
from sweeper.results.rerun import rerun_trial
from sweeper.search.study import RunOptions, run_study
from sweeper.spec import config

STUDY = """
name: rerun-me
dataset: {name: synthetic, synthetic: {train_size: 256, test_size: 64, image_size: 8}}
model: {arch: cnn, channels: [4], padding: same, dropout: 0.2}
train: {optimizer: rmsprop, batch_size: 32}
budget: {trials: 2, epochs: 2}
sampler: {name: grid}
space:
  train.lr: {choice: [1.0e-3, 3.0e-3]}
  dataset.augment.shift: {choice: [1]}
"""


def test_rerun_reproduces_the_logged_metrics(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    run_study(config.loads(STUDY), RunOptions(storage=storage, device="cpu"))
    score = rerun_trial("rerun-me", 1, storage=storage, device="cpu")
    assert {"val_accuracy", "val_loss", "test_accuracy", "test_loss"} <= set(score.logged)
    assert score.metrics == score.logged

    result = CliRunner().invoke(app, ["rerun", "rerun-me", "--trial", "0", "--storage",
                                      storage, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "trial #0: reproduces the logged metrics exactly" in result.output
    assert "val_accuracy" in result.output


def test_rerun_of_an_unknown_trial_is_one_line(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    run_study(config.loads(STUDY.replace("trials: 2", "trials: 1")),
              RunOptions(storage=storage, device="cpu"))
    result = CliRunner().invoke(app, ["rerun", "rerun-me", "--trial", "7", "--storage",
                                      storage])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "7" in result.output
