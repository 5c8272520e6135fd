"""The read side against real stores: studies, trials, the best trial(s), models loaded
back, evaluation, ensembles and the CLI that prints them, once on the local SQLite stores
and once with the Optuna study on PostgreSQL and tracking over HTTP to a real `mlflow
server`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow_server import free_port, postgres_database
from typer.testing import CliRunner

from sweeper.cli import app
from sweeper.errors import ResultError, StorageError, TrackingError
from sweeper.ml.data import load_dataset
from sweeper.ml.metrics import evaluate
from sweeper.results import read as results
from sweeper.results.scoring import ensemble, evaluate_trial, hard_vote, soft_vote
from sweeper.search.study import RunOptions, open_or_create, run_study
from sweeper.spec import config
from sweeper.tracking.tracker import MlflowTracker

runner = CliRunner()

STUDY = """
name: {name}
dataset: {{name: synthetic, synthetic: {{train_size: 384, test_size: 96, image_size: 8}}}}
model: {{arch: cnn, channels: [4], dropout: 0.0}}
train: {{optimizer: adam, lr: 0.01, batch_size: 64}}
budget: {{trials: 4, epochs: 2}}
sampler: {{name: random, seed: 1}}
models: {models}
space:
  train.lr: {{float: [1.0e-3, 3.0e-2], log: true}}
  model.filter_size: {{choice: [3, 9]}}
"""
# Three trials that train and one whose 9x9 filter cannot fit an 8x8 image (FAIL).
ENQUEUED = [{"train.lr": 0.02, "model.filter_size": 3},
            {"train.lr": 0.004, "model.filter_size": 3},
            {"train.lr": 0.01, "model.filter_size": 9},
            {"train.lr": 0.001, "model.filter_size": 3}]
PARETO = """
name: pareto
dataset: {name: synthetic, synthetic: {train_size: 256, test_size: 64, image_size: 8}}
model: {arch: mlp, hidden: [16]}
budget: {trials: 4, epochs: 1}
objectives: [{metric: val_accuracy}, {metric: n_params}]
sampler: {name: random, seed: 0}
models: none
space:
  model.hidden: {choice: [[2], [8], [64]]}
"""


def run(spec_text: str, storage: str, tracking_uri: str | None,
        enqueue: list[dict[str, Any]] | None = None) -> None:
    spec = config.loads(spec_text)
    study = open_or_create(spec, storage)[0]
    for params in enqueue or []:
        study.enqueue_trial(params)
    tracker = MlflowTracker(tracking_uri) if tracking_uri else None
    report = run_study(spec, RunOptions(storage=storage, device="cpu"), tracker=tracker)
    assert report.outcomes and (tracker is None or tracker.failures == [])


# PostgreSQL behind an MLflow server: the same answers, in the slow suite (its study alone
# takes 15 s to set up).
@pytest.fixture(scope="module", params=[
    "local", pytest.param("postgresql-http", marks=pytest.mark.slow)])
def stores(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, Any]]:
    """Study `results` (3 complete, 1 failed, every model logged) and, in the local
    stores, the multi-objective study `pareto` and `bare` (models: none)."""
    root = tmp_path_factory.mktemp(request.param)
    with contextlib.ExitStack() as stack:
        if request.param == "local":
            storage = f"sqlite:///{root / 'optuna.db'}"
            tracking = f"sqlite:///{root / 'mlflow.db'}"
        else:
            storage = stack.enter_context(postgres_database("sweeper_results",
                                                            scheme="postgresql"))
            if storage is None:
                pytest.skip("no PostgreSQL on 127.0.0.1:5432")
            tracking = request.getfixturevalue("mlflow_url")
        run(STUDY.format(name="results", models="all"), storage, tracking, ENQUEUED)
        if request.param == "local":
            run(PARETO, storage, tracking)
            run(STUDY.format(name="bare", models="none"), storage, tracking, ENQUEUED[:1])
        yield {"backend": request.param, "storage": storage, "tracking": tracking,
               "root": root}


def cli(stores: dict[str, Any], *args: str) -> Any:
    return runner.invoke(app, [*args, "--storage", stores["storage"],
                               "--tracking-uri", stores["tracking"]])


# --------------------------------------------------------------------------------------
# Studies and trials
# --------------------------------------------------------------------------------------
def test_studies_lists_every_study_with_states_and_best(stores: dict[str, Any]) -> None:
    summaries = {s.name: s for s in results.studies(stores["storage"])}
    mine = summaries["results"]
    assert mine.counts == {"COMPLETE": 3, "FAIL": 1}
    assert mine.objectives == ["val_accuracy"] and mine.directions == ["maximize"]
    best = results.best_trial("results", storage=stores["storage"],
                              tracking_uri=stores["tracking"])
    assert (mine.best_number, mine.best_values) == (best.number, best.values)
    assert mine.last_activity is not None
    if stores["backend"] == "local":
        assert sorted(summaries) == ["bare", "pareto", "results"]
        assert summaries["pareto"].pareto_size >= 1 and summaries["pareto"].best_values is None
    shown = runner.invoke(app, ["studies", "--storage", stores["storage"]])
    assert shown.exit_code == 0 and "results" in shown.output and "3 complete" in shown.output
    lines = runner.invoke(app, ["studies", "--storage", stores["storage"], "--json"]).output
    parsed = {json.loads(line)["name"]: json.loads(line) for line in lines.splitlines()}
    assert parsed["results"]["counts"] == {"COMPLETE": 3, "FAIL": 1}


def test_trials_dataframe_has_a_row_per_trial(stores: dict[str, Any]) -> None:
    df = results.trials("results", storage=stores["storage"],
                        tracking_uri=stores["tracking"])
    assert list(df.index) == [0, 1, 2, 3] and df.index.name == "number"
    assert list(df["state"]) == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert df.loc[0, "params.train.lr"] == pytest.approx(0.02)
    assert df.loc[2, "params.model.filter_size"] == 9
    assert "model.filter_size=9" in df.loc[2, "reason"]
    assert np.isnan(df.loc[2, "value"])
    for number in (0, 1, 3):
        assert df.loc[number, "value"] == pytest.approx(df.loc[number, "metrics.val_accuracy"])
        assert 0 <= df.loc[number, "metrics.test_accuracy"] <= 1
        assert df.loc[number, "model_uri"].startswith("models:/")
        assert len(df.loc[number, "run_id"]) == 32


def test_trials_filter_sort_and_limit(stores: dict[str, Any]) -> None:
    kwargs = {"storage": stores["storage"], "tracking_uri": stores["tracking"]}
    failed = results.trial_results("results", states=["fail"], **kwargs)
    assert [t.number for t in failed] == [2]
    by_value = results.trial_results("results", sort="value", **kwargs)
    values = [t.value for t in by_value if t.value is not None]
    assert values == sorted(values, reverse=True) and by_value[-1].number == 2
    assert [t.number for t in results.trial_results("results", sort="-number", limit=2,
                                                    **kwargs)] == [3, 2]
    lr = [t.params["train.lr"] for t in results.trial_results("results", sort="train.lr",
                                                              **kwargs)]
    assert lr == sorted(lr)
    # The failed trial has no metrics: it sorts last both ways.
    for sort in ("val_loss", "-val_loss", "test_accuracy", "-test_accuracy"):
        ranked = results.trial_results("results", sort=sort, **kwargs)
        assert ranked[-1].number == 2, sort
        losses = [t.metrics[sort.removeprefix("-")] for t in ranked[:-1]]
        ascending = sort.startswith("-") == sort.endswith("accuracy")
        assert losses == sorted(losses, reverse=not ascending), sort
    with pytest.raises(ResultError, match="did you mean 'test_accuracy'"):
        results.trial_results("results", sort="test_acuracy", **kwargs)
    with pytest.raises(ResultError, match="unknown state 'DONE'"):
        results.trial_results("results", states=["done"], **kwargs)

    table = cli(stores, "trials", "results", "--sort", "value", "--limit", "2")
    assert table.exit_code == 0, table.output
    assert table.output.count("COMPLETE") == 2 and "FAIL" not in table.output
    rows = [json.loads(line) for line in
            cli(stores, "trials", "results", "--state", "complete", "--json").output.split("\n")
            if line]
    assert [r["number"] for r in rows] == [0, 1, 3]
    csv_text = cli(stores, "trials", "results", "--csv").output
    header, *lines = csv_text.strip().splitlines()
    assert header.startswith("number,state,val_accuracy,params.model.filter_size,params.train.lr")
    assert len(lines) == 4 and lines[2].startswith("2,FAIL,,9,")


# --------------------------------------------------------------------------------------
# The best trial(s)
# --------------------------------------------------------------------------------------
def test_best_trial_links_params_metrics_run_and_model(stores: dict[str, Any]) -> None:
    best = results.best_trial("results", storage=stores["storage"],
                              tracking_uri=stores["tracking"])
    complete = results.trial_results("results", states=["complete"],
                                     storage=stores["storage"], tracking_uri=stores["tracking"])
    assert best.value == max(t.value for t in complete)
    assert set(best.params) == {"train.lr", "model.filter_size"}
    client = MlflowClient(stores["tracking"])
    run = client.get_run(best.run_id)
    assert run.data.tags["sweeper.trial_number"] == str(best.number)
    assert run.data.metrics["test_accuracy"] == pytest.approx(best.metrics["test_accuracy"])
    (output,) = run.outputs.model_outputs
    assert best.model_uri == f"models:/{output.model_id}"
    if stores["backend"] == "local":
        assert best.run_url is None  # no server to link to
    else:
        assert best.run_url.startswith(stores["tracking"]) and best.run_id in best.run_url

    shown = cli(stores, "best", "results", "--json")
    assert shown.exit_code == 0, shown.output
    (line,) = shown.output.strip().splitlines()
    data = json.loads(line)
    assert set(data) == {"study", "number", "values", "params", "metrics", "run_id",
                         "run_url", "model_uri"}
    assert (data["study"], data["number"], data["run_id"]) == ("results", best.number,
                                                               best.run_id)
    assert {"val_accuracy", "test_accuracy", "test_f1_macro", "test_auc_macro"} <= set(
        data["metrics"])
    top = cli(stores, "best", "results", "--top", "3", "--json").output.strip().splitlines()
    assert [json.loads(t)["number"] for t in top] == [
        t.number for t in results.best_trials("results", top=3, storage=stores["storage"])]
    text = cli(stores, "best", "results").output
    assert f"trial #{best.number} of results" in text and best.model_uri in text


def test_pareto_front_of_a_multi_objective_study(stores: dict[str, Any]) -> None:
    if stores["backend"] != "local":
        pytest.skip("one backend is enough for the front's arithmetic")
    import optuna

    from sweeper.search.storage import open_storage

    front = results.best_trials("pareto", storage=stores["storage"])
    study = optuna.load_study(study_name="pareto", storage=open_storage(stores["storage"]))
    assert {t.number for t in front} == {t.number for t in study.best_trials}
    accuracies = [t.values[0] for t in front]
    assert accuracies == sorted(accuracies, reverse=True)
    with pytest.raises(ResultError, match=r"2 objectives .*Pareto front"):
        results.best_trial("pareto", storage=stores["storage"])
    shown = cli(stores, "best", "pareto")
    assert shown.exit_code == 0 and "Pareto front of pareto" in shown.output


# --------------------------------------------------------------------------------------
# Models: loaded back, evaluated, voting
# --------------------------------------------------------------------------------------
def test_loaded_model_reproduces_the_logged_test_accuracy(stores: dict[str, Any]) -> None:
    best = results.best_trial("results", storage=stores["storage"],
                              tracking_uri=stores["tracking"])
    cfg = config.TrialConfig.from_flat(best.config)
    data = load_dataset(cfg.dataset, device="cpu")
    for reference in (best, best.run_id, best.model_uri):
        model = results.load_model(reference, tracking_uri=stores["tracking"])
        assert not model.training
        accuracy = evaluate(model, data.test, classes=data.classes).metrics["accuracy"]
        assert accuracy == pytest.approx(best.metrics["test_accuracy"])


def test_evaluate_matches_the_logged_metrics(stores: dict[str, Any]) -> None:
    score = evaluate_trial("results", 1, storage=stores["storage"],
                           tracking_uri=stores["tracking"], device="cpu")
    assert score.trial.number == 1 and score.matches
    assert set(score.logged) >= {"accuracy", "loss", "f1_macro", "auc_macro"}
    shown = cli(stores, "evaluate", "results", "--trial", "1", "--device", "cpu")
    assert shown.exit_code == 0, shown.output
    assert "trial #1: matches the logged test metrics" in shown.output
    failed = cli(stores, "evaluate", "results", "--trial", "2")
    assert failed.exit_code == 2 and "trial 2 of study 'results' has no logged model" in \
        failed.output


def test_ensemble_votes_and_logs_a_run_under_the_parent(stores: dict[str, Any]) -> None:
    score = ensemble("results", 3, storage=stores["storage"], tracking_uri=stores["tracking"],
                     device="cpu")
    ranked = results.best_trials("results", top=3, storage=stores["storage"])
    assert [m.number for m in score.members] == [t.number for t in ranked]
    assert score.member_metrics[0]["accuracy"] == pytest.approx(
        ranked[0].metrics["test_accuracy"])
    assert 0 <= score.soft["accuracy"] <= 1 and 0 <= score.hard["accuracy"] <= 1
    client = MlflowClient(stores["tracking"])
    run = client.get_run(score.run_id)
    parent_id = client.get_run(ranked[0].run_id).data.tags["mlflow.parentRunId"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["sweeper.role"] == "ensemble"
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.metrics["soft_test_accuracy"] == pytest.approx(score.soft["accuracy"])
    assert run.data.params["members"] == ",".join(str(m.number) for m in score.members)
    shown = cli(stores, "ensemble", "results", "--top", "2", "--no-log", "--device", "cpu")
    assert shown.exit_code == 0, shown.output
    assert "soft vote" in shown.output and "points against the best single model" in \
        shown.output


def test_voting_rules() -> None:
    # Three members, two images, three classes.
    a = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], dtype=np.float32)
    b = np.array([[0.1, 0.8, 0.1], [0.1, 0.2, 0.7]], dtype=np.float32)
    c = np.array([[0.5, 0.4, 0.1], [0.3, 0.4, 0.3]], dtype=np.float32)
    np.testing.assert_allclose(soft_vote([a, b, c]), (a + b + c) / 3)
    # Image 0: votes 0, 1, 0 -> class 0 although class 1 has the higher mean probability.
    # Image 1: votes 1, 2, 1 -> class 1.
    assert hard_vote([a, b, c]).argmax(axis=1).tolist() == [0, 1]
    # A tie (one vote each for 0 and 1) goes to the higher mean probability: class 1.
    assert hard_vote([a, b]).argmax(axis=1)[0] == 1
    np.testing.assert_allclose(hard_vote([a, b, c]).sum(axis=1), 1.0, atol=1e-3)


# --------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# --------------------------------------------------------------------------------------
def test_unknown_study_lists_the_known_ones(stores: dict[str, Any]) -> None:
    for command in (["best", "resluts"], ["trials", "resluts"], ["evaluate", "resluts"],
                    ["report", "resluts"]):
        shown = cli(stores, *command)
        assert shown.exit_code == 2, shown.output
        assert shown.output.count("\n") == 1, shown.output
        assert "no study 'resluts'" in shown.output and "did you mean 'results'?" in \
            shown.output


def test_missing_storage_and_unreachable_stores_are_one_line(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["best", "x", "--storage", f"sqlite:///{tmp_path / 'no.db'}"])
    assert missing.exit_code == 2 and "no Optuna storage at" in missing.output
    assert not (tmp_path / "no.db").exists(), "a read command creates nothing"
    down = runner.invoke(app, ["studies", "--storage",
                               f"postgresql://postgres@127.0.0.1:{free_port()}/x"])
    assert down.exit_code == 2 and down.output.count("\n") == 1
    assert "cannot open Optuna storage" in down.output
    with pytest.raises(StorageError):
        results.studies(f"postgresql://postgres@127.0.0.1:{free_port()}/x")


def test_unreachable_tracking_server_is_one_line(stores: dict[str, Any]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    shown = runner.invoke(app, ["evaluate", "results", "--storage", stores["storage"],
                                "--tracking-uri", url])
    assert shown.exit_code == 2 and shown.output.count("\n") == 1, shown.output
    assert f"cannot reach the MLflow server at {url}" in shown.output
    best = results.best_trial("results", storage=stores["storage"], tracking_uri=url)
    with pytest.raises(TrackingError):
        results.load_model(best, tracking_uri=url)


def test_no_completed_trial_and_no_model_are_one_line(stores: dict[str, Any],
                                                      tmp_path: Path) -> None:
    if stores["backend"] != "local":
        pytest.skip("the rules do not depend on the backend")
    import optuna

    from sweeper.search.storage import open_storage

    optuna.create_study(study_name="empty", storage=open_storage(stores["storage"]))
    shown = cli(stores, "best", "empty")
    assert shown.exit_code == 2 and "has no completed trial yet" in shown.output
    bare = results.best_trial("bare", storage=stores["storage"],
                              tracking_uri=stores["tracking"])
    assert bare.model_uri is None and bare.run_id
    with pytest.raises(ResultError, match="has no logged model"):
        results.load_model(bare, tracking_uri=stores["tracking"])
    shown = cli(stores, "ensemble", "bare")
    assert shown.exit_code == 2 and "an ensemble needs 2 or more" in shown.output
    shown = cli(stores, "ensemble", "pareto")
    assert shown.exit_code == 2 and "ensembles need a single-objective study" in shown.output


def test_best_and_trials_import_neither_torch_nor_mlflow(stores: dict[str, Any]) -> None:
    """The answers come from the Optuna storage: no torch, no MLflow client to start."""
    import subprocess
    import sys

    if stores["backend"] != "local":
        pytest.skip("the imports do not depend on the backend")
    for command in (["best", "results", "--json"], ["trials", "results", "--limit", "2"],
                    ["studies"]):
        code = ("import sys\nfrom sweeper.cli import app\n"
                f"sys.argv = ['sweeper', *{command!r}, '--storage', {stores['storage']!r}]\n"
                "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
                "print('LOADED', [m for m in ('torch', 'mlflow') if m in sys.modules])\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=False)
        assert "LOADED []" in done.stdout, (command, done.stdout[-500:], done.stderr[-2000:])
