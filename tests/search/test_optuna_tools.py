"""Optuna's own tools on a study that `sweeper run` wrote: objectives carry their names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from sweeper.cli import app

STUDY = """name: named
dataset: {name: synthetic, synthetic: {train_size: 256, test_size: 64, image_size: 8}}
model: {arch: mlp, hidden: [16]}
budget: {trials: 2, epochs: 1}
objectives: [{metric: val_accuracy, direction: maximize}, {metric: n_params, direction: minimize}]
sampler: {name: random, seed: 0}
space:
  model.hidden: {choice: [[4], [16]]}
"""


def test_optuna_best_trials_names_the_objectives(tmp_path: Path) -> None:
    study_file = tmp_path / "named.yaml"
    study_file.write_text(STUDY)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = CliRunner().invoke(app, ["run", str(study_file), "--storage", storage,
                                      "--no-tracking", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # Optuna's own command line, as a user would call it.
    answer = subprocess.run(
        [sys.executable, "-c", "from optuna.cli import main; main()", "best-trials",
         "--study-name", "named", "--storage", storage, "-f", "json"],
        capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    front = json.loads(answer.stdout)
    assert front and all(set(t["values"]) == {"val_accuracy", "n_params"} for t in front)
