"""Studies with `pack`: each packed trial is its own Optuna trial, MLflow run and model,
trains as it would alone, and a worker killed mid-pack loses nothing."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweeper.keys import ATTR_CONFIG, ATTR_METRICS, ATTR_PACK, trial_record
from sweeper.ml.data import load_dataset
from sweeper.ml.metrics import evaluate
from sweeper.ml.models import build_model
from sweeper.ml.train import fit, seed_everything
from sweeper.results import get_trial, load_model
from sweeper.search.packed_trials import member_params
from sweeper.search.study import RunOptions, run_study
from sweeper.spec import config
from sweeper.tracking import MlflowTracker

STUDY = """
name: {name}
dataset: {{name: synthetic, synthetic: {{train_size: 400, test_size: 96, image_size: 10}}}}
model: {{arch: cnn, channels: [4], head: [8], batch_norm: true}}
train: {{optimizer: adam, batch_size: 64}}
budget: {{trials: {trials}, epochs: 2}}
sampler: {{name: tpe, seed: 0, startup_trials: 2}}
pack: {pack}
space:
  train.lr: {{float: [1.0e-3, 3.0e-2], log: true}}
  model.dropout: {{float: [0.0, 0.5]}}
  model.filter_size: {{choice: [1, 3]}}
  train.seed: {{int: [0, 1000]}}
"""


def spec_of(name: str, *, trials: int = 6, pack: int = 4) -> config.StudySpec:
    return config.loads(STUDY.format(name=name, trials=trials, pack=pack))


def test_a_packed_study_keeps_each_trial_a_trial(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = spec_of("packed")
    report = run_study(spec, RunOptions(storage=storage, device="cpu"),
                       tracker=MlflowTracker(tracking))
    assert [o.state for o in report.outcomes] == ["COMPLETE"] * 6
    study = optuna.load_study(study_name="packed", storage=storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    # Two packs (4, then the 2 the budget leaves), members sharing the shape params and
    # the sampler choosing their own.
    packs = sorted({tuple(t.user_attrs[ATTR_PACK]) for t in trials})
    assert packs == [(0, 1, 2, 3), (4, 5)]
    assert member_params(spec) == {"train.lr", "model.dropout", "train.seed"}
    for pack in packs:
        members = [trials[n] for n in pack]
        assert len({m.params["model.filter_size"] for m in members}) == 1
        assert len({m.params["train.lr"] for m in members}) == len(members)
    client = MlflowClient(tracking)
    data = load_dataset(spec.dataset, device="cpu")
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in history] == [1, 2]
        assert run.data.metrics["test_accuracy"] == pytest.approx(
            trial_record(trial, ATTR_METRICS)["test_accuracy"])
        # Its own model, a normal single one, loaded as any trial's is.
        model = load_model(get_trial(study, trial.number, tracking_uri=tracking),
                           tracking_uri=tracking)
        result = evaluate(model, data.test, classes=data.classes)
        assert result.metrics["accuracy"] == pytest.approx(
            trial_record(trial, ATTR_METRICS)["test_accuracy"])
        # The same trial trained alone gives the same numbers.
        trial_config = config.TrialConfig.from_flat(trial_record(trial, ATTR_CONFIG))
        seed_everything(trial_config.train.seed)
        alone = build_model(trial_config.model, data.input_shape, data.num_classes)
        lone = fit(alone, data, trial_config.train, epochs=2, device=data.train.x.device)
        for alone_row, epoch in zip(lone.history, history, strict=True):
            assert math.isclose(alone_row["train_loss"], epoch.value, rel_tol=1e-4)
        assert lone.history[-1]["val_accuracy"] == pytest.approx(trial.value)


def test_the_budget_and_more_trials_bound_the_pack(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    report = run_study(spec_of("bounded", trials=3, pack=8),
                       RunOptions(storage=storage, device="cpu"))
    assert len(report.outcomes) == 3
    more = run_study(spec_of("bounded", trials=3, pack=8),
                     RunOptions(storage=storage, device="cpu", more_trials=2))
    assert len(more.outcomes) == 2
    trials = optuna.load_study(study_name="bounded", storage=storage).get_trials()
    assert [t.user_attrs[ATTR_PACK] for t in trials] == [[0, 1, 2]] * 3 + [[3, 4]] * 2


def test_pack_values_are_checked() -> None:
    for bad in ("0", "65", "2.5", "four", "true"):
        with pytest.raises(config.ConfigError, match="pack"):
            config.loads(STUDY.format(name="bad", trials=2, pack=bad))
    grid = STUDY.format(name="grid", trials=2, pack=2).replace("tpe", "grid")
    grid = grid[:grid.index("space:")] + "space: {train.lr: {choice: [0.01, 0.02]}}\n"
    with pytest.raises(config.ConfigError, match="grid sampler"):
        config.loads(grid)
    spec = spec_of("cli", pack=1)
    assert config.with_pack(spec, 3).pack == 3
    with pytest.raises(config.ConfigError, match="--pack"):
        config.with_pack(spec, 0)


@pytest.mark.slow
def test_kill_9_mid_pack_loses_no_finished_trial_and_leaves_nothing_running(
        tmp_path: Path) -> None:
    from test_faults import assert_agree, finish, sweeper

    from sweeper.fleet.stopping import TEST_SIGNAL_ENV

    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    path = tmp_path / "nine.yaml"
    path.write_text(STUDY.format(name="nine", trials=6, pack=3))
    # SIGKILL as the second pack opens its first run: the first pack is told (its
    # uploads may still be queued), the second pack's three trials are RUNNING.
    code, out, err = finish(sweeper("run", str(path), "--device", "cpu", "--heartbeat", "1s",
                                    cwd=tmp_path,
                                    **{TEST_SIGNAL_ENV: "in-create-run:SIGKILL:4"}))
    assert code == -signal.SIGKILL, out + err
    before = optuna.load_study(study_name="nine", storage=storage).get_trials()
    assert [t.state for t in before] == [TrialState.COMPLETE] * 3 + [TrialState.RUNNING] * 3
    # The next worker takes the three back (FAIL "worker lost", each re-queued once) and
    # runs their retries; a reap ends whatever MLflow still shows RUNNING.
    code, out, err = finish(sweeper("run", str(path), "--device", "cpu", "--heartbeat", "1s",
                                    cwd=tmp_path))
    assert code == 0, out + err
    code, out, err = finish(sweeper("reap", "nine", cwd=tmp_path))
    assert code == 0, out + err
    trials = assert_agree(storage, tracking, "nine")
    states = [t.state for t in trials]
    assert states[:3] == [TrialState.COMPLETE] * 3
    assert states[3:6] == [TrialState.FAIL] * 3
    assert all("worker lost" in t.user_attrs["fail_reason"] for t in trials[3:6])
    retries = [t for t in trials if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == [3, 4, 5]
    assert all(t.state == TrialState.COMPLETE for t in retries)
    for lost in trials[3:6]:
        retry = next(t for t in retries if t.user_attrs["retry_of"] == lost.number)
        assert retry.params == lost.params
    client = MlflowClient(tracking)
    for trial in trials[:3]:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert "val_accuracy" in run.data.metrics and run.info.status == "FINISHED"


def test_run_takes_pack_from_the_command_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sweeper.cli import app

    path = tmp_path / "cli.yaml"
    path.write_text(STUDY.format(name="cli", trials=2, pack=1))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    bad = CliRunner().invoke(app, ["run", str(path), "--pack", "0", "--storage", storage])
    assert bad.exit_code == 2 and "--pack" in bad.output
    assert not (tmp_path / "optuna.db").exists()
    result = CliRunner().invoke(app, ["run", str(path), "--pack", "2", "--storage", storage,
                                      "--device", "cpu", "--no-tracking"])
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="cli", storage=storage).get_trials()
    assert [t.user_attrs[ATTR_PACK] for t in trials] == [[0, 1], [0, 1]]
