"""Optuna's own tools on a study that `sweeper run` wrote: objectives carry their names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
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


SINGLE = """name: single
dataset: {name: synthetic, synthetic: {train_size: 256, test_size: 64, image_size: 8}}
model: {arch: mlp, hidden: [16]}
budget: {trials: 2, epochs: 1}
sampler: {name: random, seed: 0}
space:
  train.lr: {float: [1.0e-3, 1.0e-1], log: true}
"""
USER_ATTR_MAX_CHARS = 100  # one short line in optuna-dashboard and the `optuna` CLI


@pytest.mark.slow  # a study, then the `optuna` command in a fresh interpreter
def test_optuna_best_trial_names_the_metric_and_user_attrs_stay_small(tmp_path: Path
                                                                       ) -> None:
    import optuna

    study_file = tmp_path / "single.yaml"
    study_file.write_text(SINGLE)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = CliRunner().invoke(app, ["run", str(study_file), "--storage", storage,
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    answer = subprocess.run(
        [sys.executable, "-c", "from optuna.cli import main; main()", "best-trial",
         "--study-name", "single", "--storage", storage, "-f", "json"],
        capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    best = json.loads(answer.stdout)
    assert set(best["value"]) == {"val_accuracy"}, best  # named, not "value": 0.9
    # Every user attr is a short value; the whole records are system attrs (and MLflow's).
    study = optuna.load_study(study_name="single", storage=storage)
    assert study.user_attrs and all(len(json.dumps(v)) <= USER_ATTR_MAX_CHARS
                                    for v in study.user_attrs.values()), study.user_attrs
    for trial in study.trials:
        assert "mlflow_run_id" in trial.user_attrs
        assert all(len(json.dumps(v)) <= USER_ATTR_MAX_CHARS
                   for v in trial.user_attrs.values()), trial.user_attrs
        assert trial.system_attrs["sweeper.config"]["train.lr"] == trial.params["train.lr"]
        assert "val_accuracy" in trial.system_attrs["sweeper.metrics"]
    # optuna-dashboard's own API on the same storage (a dev extra): named objectives, and
    # trial user attrs of a few short values.
    dashboard = pytest.importorskip("optuna_dashboard")
    app_ = dashboard.wsgi(storage)
    detail = _wsgi_get(app_, f"/api/studies/{study._study_id}", "after=0")
    assert detail["objective_names"] == ["val_accuracy"]
    for trial in detail["trials"]:
        assert all(len(a["value"]) <= USER_ATTR_MAX_CHARS for a in trial["user_attrs"])
        assert {a["key"] for a in trial["user_attrs"]} >= {"mlflow_run_id"}


def _wsgi_get(app_: Any, path: str, query: str = "") -> Any:
    """GET `path` from a WSGI app in this process; the JSON body."""
    import io
    from wsgiref.util import setup_testing_defaults

    environ: dict[str, Any] = {"PATH_INFO": path, "QUERY_STRING": query,
                               "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app_(environ, lambda s, headers, exc=None: status.append(s)))
    assert status and status[0].startswith("200"), (status, body[:500])
    return json.loads(body)
