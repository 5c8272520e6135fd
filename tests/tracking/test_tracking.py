"""MLflow tracking against what users run: a real `mlflow server` subprocess (PostgreSQL
backend when one answers on 127.0.0.1:5432, else SQLite; proxied artifacts), a local
SQLite store without a server, real Optuna storage and real (tiny) training."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from mlflow_server import (
    MlflowServer,
    free_port,
    mlflow_server,
    postgres_database,
    serving_env,
)
from optuna.trial import TrialState

from sweeper.errors import TrackingError
from sweeper.keys import ATTR_PARENT_RUN
from sweeper.ml.modelfile import MODEL_DIR, read_model
from sweeper.render.plots import read_roc_csv
from sweeper.search.storage import open_storage
from sweeper.search.study import RunOptions, open_or_create, run_study
from sweeper.serving import prepare_images
from sweeper.spec import config
from sweeper.tracking import MlflowTracker, default_artifact_root, model_files, resolve_tracking_uri
from sweeper.tracking.context import sweeper_version

SYNTHETIC = """
name: {name}
dataset: {{name: synthetic, synthetic: {{train_size: 512, test_size: 128, image_size: 12}}}}
model: {{arch: mlp, hidden: [32], dropout: 0.0}}
train: {{optimizer: adam, lr: 0.01, batch_size: 64}}
budget: {{trials: 3, epochs: 2}}
sampler: {{name: random, seed: 0}}
models: {models}
space:
  train.lr: {{float: [1.0e-3, 3.0e-2], log: true}}
"""
TRIAL_ARTIFACTS = {
    "plots/history.png", "plots/confusion_matrix_val.png", "plots/confusion_matrix_test.png",
    "plots/roc_test.png", "tables/confusion_matrix_val.csv", "tables/confusion_matrix_test.csv",
    "tables/per_class_val.csv", "tables/per_class_test.csv", "config/trial.yaml",
    "tables/roc_test.csv",
}


def spec_of(name: str, models: str = "all", **replace: str) -> config.StudySpec:
    text = SYNTHETIC.format(name=name, models=models)
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return config.loads(text)


def runs_of(client: MlflowClient, name: str) -> tuple[Any, list[Any]]:
    """(the parent run, the trial runs by trial number) of study `name`."""
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no experiment {name!r}"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweeper.role") == "parent"]
    trials = sorted((r for r in runs if r.data.tags.get("sweeper.role") == "trial"),
                    key=lambda r: int(r.data.tags["sweeper.trial_number"]))
    assert len(parents) == 1, f"{len(parents)} parent runs"
    return parents[0], trials


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def load_logged_model(tracking_uri: str, model_id: str) -> Any:
    """A logged model as a torch module, without touching MLflow's global tracking URI
    (`models:/` URIs ignore `tracking_uri`; the model's own artifact location does not)."""
    location = MlflowClient(tracking_uri).get_logged_model(model_id).artifact_location
    local = mlflow.artifacts.download_artifacts(artifact_uri=location,
                                                tracking_uri=tracking_uri)
    return model_files.load(local)  # config + safetensors: nothing unpickled


def layout_study(three_trials: dict[str, Any]) -> optuna.Study:
    """The Optuna study of `three_trials`, through sweeper's storage (psycopg2 on PG)."""
    return optuna.load_study(study_name="layout",
                             storage=open_storage(three_trials["storage"]))


# --------------------------------------------------------------------------------------
# A study over HTTP: layout, artifacts, model, registry
# --------------------------------------------------------------------------------------
# PostgreSQL's copy starts a second server on fresh databases: it runs with the slow tests.
@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql",
                                                               marks=pytest.mark.slow)])
def three_trials(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[dict[str, Any]]:
    """A 3-trial study run once over HTTP per backend; the tests below read what it left.

    `sqlite`: the server on a SQLite store, the Optuna study in SQLite. `postgresql`: the
    server on one fresh PostgreSQL database and the Optuna study on another, as the
    compose stack runs them."""
    backend = request.param
    root = tmp_path_factory.mktemp(f"three-{backend}")
    study_file = root / "layout.yaml"
    study_file.write_text(SYNTHETIC.format(name="layout", models="all"))
    spec = config.load(study_file)
    with contextlib.ExitStack() as stack:
        if backend == "postgresql":
            store = stack.enter_context(postgres_database("sweeper_mlflow"))
            storage = stack.enter_context(postgres_database("sweeper_optuna",
                                                            scheme="postgresql"))
            if store is None or storage is None:
                pytest.skip("no PostgreSQL on 127.0.0.1:5432")
        else:
            store, storage = None, f"sqlite:///{root / 'optuna.db'}"
        server = stack.enter_context(mlflow_server(root / "server", store))
        tracker = MlflowTracker(server.url)
        report = run_study(spec, RunOptions(storage=storage, device="cpu"), tracker=tracker)
        yield {"spec": spec, "file": study_file, "storage": storage, "report": report,
               "tracker": tracker, "client": MlflowClient(server.url), "url": server.url,
               "backend": backend, "server": server}


def test_one_experiment_one_parent_and_a_nested_run_per_trial(three_trials: dict[str, Any]
                                                             ) -> None:
    client, tracker = three_trials["client"], three_trials["tracker"]
    backend = three_trials["backend"]
    assert three_trials["storage"].startswith(backend)
    assert three_trials["server"].backend_store_uri.startswith(backend)
    assert [o.state for o in three_trials["report"].outcomes] == ["COMPLETE"] * 3
    assert tracker.failures == []
    parent, trials = runs_of(client, "layout")
    assert parent.info.status == "FINISHED"
    assert [r.info.run_name for r in trials] == ["trial-0", "trial-1", "trial-2"]
    study = layout_study(three_trials)
    assert study.user_attrs[ATTR_PARENT_RUN] == parent.info.run_id
    for run, trial in zip(trials, study.trials, strict=True):
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["sweeper.study"] == "layout" and tags["sweeper.trial_number"] == str(
            trial.number)
        assert tags["sweeper.state"] == "COMPLETE"
        assert {"sweeper.sampler", "sweeper.pruner", "sweeper.device",
                "sweeper.torch_version"} <= set(tags)
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        (output,) = client.get_run(run.info.run_id).outputs.model_outputs
        assert trial.user_attrs["mlflow_model_id"] == output.model_id
        # Params are the flat trial config; metrics the final evaluation (per-class numbers
        # are a table, not metrics).
        assert float(run.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
        metrics = run.data.metrics
        assert metrics["val_accuracy"] == pytest.approx(trial.value)
        assert {"test_accuracy", "val_f1_macro", "test_auc_micro"} <= set(metrics)
        assert int(run.data.params["n_params"]) > 0
        assert float(tags["sweeper.trial_seconds"]) > 0 and tags["sweeper.epochs_run"] == "2"
        assert float(tags["sweeper.train_seconds"]) > 0
        assert not [k for k in metrics if k.endswith(("_class_0", "_class_3"))]
        # Per-epoch curves: one point per epoch, step = epoch.
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == [1, 2]
        assert {m.step for m in client.get_metric_history(run.info.run_id,
                                                          "val_accuracy")} == {1, 2}


RUN_METRICS = {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1_macro",
               "val_auc_macro", "val_auc_micro", "test_accuracy", "test_loss",
               "test_f1_macro", "test_auc_macro", "test_auc_micro"}


def test_trial_runs_read_well(three_trials: dict[str, Any]) -> None:
    """What people compare as metrics (no per-class figures, no flat `lr` without a
    schedule), MLflow's context tags and sweeper's version, a description, the dataset as
    an input, a model named after its trial and, for the best, the registry's version
    linked to the run."""
    client = three_trials["client"]
    _, trials = runs_of(client, "layout")
    experiment = client.get_experiment_by_name("layout")
    assert experiment.tags["mlflow.experiment.primaryMetric.name"] == "val_accuracy"
    digests = set()
    for run in trials:
        metrics = {k for k in run.data.metrics if not k.startswith("system/")}
        assert metrics == RUN_METRICS
        assert "lr" not in run.data.metrics and "train.lr" in run.data.params
        tags = run.data.tags
        assert tags["sweeper.version"] == sweeper_version() != "unknown"
        assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.name"]
        number = tags["sweeper.trial_number"]
        assert tags["mlflow.note.content"].startswith(
            f"Trial {number} of sweeper study **layout**, objective val_accuracy (maximize)")
        assert "train.lr=" in tags["mlflow.note.content"]
        (entry,) = run.inputs.dataset_inputs
        assert entry.dataset.name == "synthetic" and len(entry.dataset.digest) == 16
        assert json.loads(entry.dataset.profile)["test"] == 128
        assert {t.key: t.value for t in entry.tags} == {"mlflow.data.context": "training"}
        digests.add(entry.dataset.digest)
        (output,) = run.outputs.model_outputs
        assert client.get_logged_model(output.model_id).name == f"layout-trial-{number}"
    assert len(digests) == 1, "the same data has one digest"
    best = layout_study(three_trials).best_trial
    version = client.get_model_version_by_alias("layout", "best")
    assert version.run_id == trials[best.number].info.run_id
    assert [v.version for v in client.search_model_versions(
        f"run_id = '{version.run_id}'")] == [version.version]


def test_trial_runs_carry_figures_tables_reports_config(three_trials: dict[str, Any]) -> None:
    client = three_trials["client"]
    _, trials = runs_of(client, "layout")
    run_id = trials[0].info.run_id
    assert artifacts(client, run_id) == TRIAL_ARTIFACTS
    local = Path(client.download_artifacts(run_id, ""))
    for figure in ("history", "confusion_matrix_val", "confusion_matrix_test", "roc_test"):
        image = (local / "plots" / f"{figure}.png").read_bytes()
        assert image.startswith(b"\x89PNG") and len(image) < 150_000, (figure, len(image))
    rows = (local / "tables" / "confusion_matrix_test.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[0].endswith("class_3")
    assert sum(int(v) for row in rows[1:] for v in row.split(",")[1:]) == 128
    table = (local / "tables" / "per_class_test.csv").read_text().splitlines()
    assert table[0] == "class,support,precision,recall,f1,auc"
    assert [row.split(",")[0] for row in table[1:]] == [
        *(f"class_{i}" for i in range(4)), "macro avg", "weighted avg"]
    assert sum(int(row.split(",")[1]) for row in table[1:5]) == 128
    assert all(0 <= float(v) <= 1 for row in table[1:5] for v in row.split(",")[2:])
    macro = dict(zip(table[0].split(","), table[5].split(","), strict=True))
    assert float(macro["f1"]) == pytest.approx(trials[0].data.metrics["test_f1_macro"],
                                               rel=1e-4)
    curves, aucs = read_roc_csv(local / "tables" / "roc_test.csv")
    assert {"micro", "macro", "class_0"} <= set(curves)
    assert aucs["micro"] == pytest.approx(trials[0].data.metrics["test_auc_micro"], rel=1e-4)
    fpr, tpr = curves["micro"]
    assert tpr[-1] == 1
    assert fpr[0] == 0 and fpr[-1] == 1 and (np.diff(fpr) >= 0).all()
    trial_cfg = config.TrialConfig.model_validate(
        __import__("yaml").safe_load((local / "config" / "trial.yaml").read_text()))
    assert trial_cfg.train.lr == pytest.approx(float(trials[0].data.params["train.lr"]))


def test_parent_run_holds_study_file_settings_best_and_figures(three_trials: dict[str, Any]
                                                              ) -> None:
    client = three_trials["client"]
    parent, trials = runs_of(client, "layout")
    files = artifacts(client, parent.info.run_id)
    assert "study.yaml" in files
    assert {"figures/optimization_history.html", "figures/parallel_coordinate.html",
            "figures/slice.html"} <= files
    local = client.download_artifacts(parent.info.run_id, "study.yaml")
    assert Path(local).read_text() == three_trials["file"].read_text()
    params = parent.data.params
    assert params["sampler.name"] == "random" and params["objective.metric"] == "val_accuracy"
    study = layout_study(three_trials)
    best = study.best_trial
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.tags["best.trial"] == str(best.number)
    assert parent.data.tags["best.run_id"] == trials[best.number].info.run_id


def test_logged_model_reproduces_the_test_accuracy(three_trials: dict[str, Any]) -> None:
    from sweeper.ml.data import load_dataset
    from sweeper.ml.metrics import evaluate

    client, url = three_trials["client"], three_trials["url"]
    _, trials = runs_of(client, "layout")
    run = client.get_run(trials[1].info.run_id)
    (output,) = run.outputs.model_outputs
    model = load_logged_model(url, output.model_id)
    model.eval()  # a plain nn.Module, not an exported graph
    study = layout_study(three_trials)
    cfg = three_trials["spec"].resolve(study.trials[1].params)
    data = load_dataset(cfg.dataset, device="cpu")
    result = evaluate(model, data.test, classes=data.classes)
    assert result.metrics["accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])


@pytest.mark.slow
def test_logged_model_serves_over_http(three_trials: dict[str, Any], tmp_path: Path) -> None:
    """`mlflow models serve` (sweeper's pyfunc, this environment) answers /invocations with
    the class probabilities and labels the network gives for the stored raw example."""
    import subprocess
    import sys
    import time
    import urllib.request

    import numpy as np
    import torch

    if three_trials["backend"] != "sqlite":
        pytest.skip("the model files are the same on every backend")
    client, url = three_trials["client"], three_trials["url"]
    _, trials = runs_of(client, "layout")
    (output,) = client.get_run(trials[0].info.run_id).outputs.model_outputs
    location = client.get_logged_model(output.model_id).artifact_location
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=url,
                                                     dst_path=str(tmp_path)))
    example = json.loads((local / "serving_input_example.json").read_text())
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", str(local),
                              "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env=serving_env(tmp_path))
    try:
        deadline = time.monotonic() + 90
        body = None
        while body is None:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", data=json.dumps(example).encode(),
                    headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    body = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)
    served = np.asarray(body["predictions"]["probabilities"], dtype=np.float32)
    model, info = read_model(local / MODEL_DIR)
    raw = np.asarray(example["inputs"], dtype=np.uint8)  # raw images, 0-255
    with torch.no_grad():
        logits = model(torch.from_numpy(prepare_images(raw, info)))
    expected = torch.softmax(logits, dim=1).numpy()
    assert served.shape == expected.shape == (4, 4)  # EXAMPLE_IMAGES x classes
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
    assert body["predictions"]["label"] == expected.argmax(axis=1).tolist()


def test_best_model_is_registered_with_alias(three_trials: dict[str, Any]) -> None:
    client = three_trials["client"]
    _, trials = runs_of(client, "layout")
    study = layout_study(three_trials)
    version = client.get_model_version_by_alias("layout", "best")
    assert version.run_id == trials[study.best_trial.number].info.run_id


# --------------------------------------------------------------------------------------
# Resume, concurrency, local store
# --------------------------------------------------------------------------------------
def test_resume_adds_trials_under_the_same_parent(mlflow_url: str, storage: str) -> None:
    spec = spec_of("resume", models="none", **{"trials: 3": "trials: 1"})
    run_study(spec, RunOptions(storage=storage, device="cpu"), tracker=MlflowTracker(mlflow_url))
    client = MlflowClient(mlflow_url)
    first_parent, _ = runs_of(client, "resume")
    assert first_parent.info.status == "FINISHED"
    run_study(spec, RunOptions(storage=storage, device="cpu", more_trials=1),
              tracker=MlflowTracker(mlflow_url))
    parent, trials = runs_of(client, "resume")
    assert parent.info.run_id == first_parent.info.run_id
    assert parent.info.status == "FINISHED"
    assert len(trials) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}


def test_workers_starting_together_share_one_parent(mlflow_url: str, storage: str) -> None:
    spec = spec_of("together")
    studies = [open_or_create(spec, storage)[0] for _ in range(2)]
    trackers = [MlflowTracker(mlflow_url) for _ in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def start(index: int) -> None:
        try:
            barrier.wait()
            trackers[index].start_study(studies[index], spec)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert trackers[0].parent_run_id == trackers[1].parent_run_id is not None
    parent, _ = runs_of(MlflowClient(mlflow_url), "together")  # exactly one, asserted there
    assert parent.info.run_id == trackers[0].parent_run_id


def test_a_worker_describing_the_parent_after_another_keeps_the_first_values(
        tmp_path: Path, storage: str) -> None:
    """Two workers start together: both read the parent run without params, the other
    writes them first (here with a value this worker's file changed). This worker reads
    them again, adds nothing twice and records its change in a tag."""
    from sweeper.keys import TAG_CHANGED_SETTINGS

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = spec_of("described", models="none")
    tracker = MlflowTracker(tracking)
    tracker.start_study(open_or_create(spec, storage)[0], spec)
    tracker.wait_queued()  # the parent is described on the upload thread
    client = MlflowClient(tracking)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.data.params["budget.trials"] == "3"
    stale = client.create_run(parent.info.experiment_id, run_name="described")
    client.log_batch(stale.info.run_id, params=[
        mlflow.entities.Param(k, v) for k, v in parent.data.params.items()
        if k != "budget.trials"] + [mlflow.entities.Param("budget.trials", "99")])

    tracker._describe_parent(stale, spec)  # `stale` still shows no params

    described = client.get_run(stale.info.run_id)
    assert described.data.params == {**parent.data.params, "budget.trials": "99"}
    assert described.data.tags[TAG_CHANGED_SETTINGS] == (
        f"budget.trials={parent.data.params['budget.trials']}")


def test_local_default_store_needs_no_server(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == "sqlite:///mlruns/mlflow.db"
    tracker = MlflowTracker()
    spec = spec_of("local", **{"trials: 3": "trials: 1"})
    report = run_study(spec, RunOptions(storage="sqlite:///mlruns/optuna.db", device="cpu"),
                       tracker=tracker)
    assert [o.state for o in report.outcomes] == ["COMPLETE"] and tracker.failures == []
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    parent, (trial,) = runs_of(client, "local")
    experiment = client.get_experiment(parent.info.experiment_id)
    artifact_root = (tmp_path / "mlruns" / "artifacts").resolve()
    assert experiment.artifact_location == f"{artifact_root.as_uri()}/local"
    assert artifacts(client, trial.info.run_id) >= TRIAL_ARTIFACTS
    # Everything under mlruns/: the two databases and the artifacts folder, nothing else
    # (no ./mlruns/<experiment id> from MLflow's defaults).
    assert {p.name for p in (tmp_path / "mlruns").iterdir()} == {
        "mlflow.db", "optuna.db", "artifacts"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlruns"]
    (output,) = client.get_run(trial.info.run_id).outputs.model_outputs
    model_files = list((artifact_root / "local").rglob("MLmodel"))
    assert len(model_files) == 1 and output.model_id in str(model_files[0])


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert resolve_tracking_uri("http://explicit:1") == "http://explicit:1"
    assert resolve_tracking_uri() == "http://example.invalid:5000"
    assert default_artifact_root("http://example.invalid:5000") is None
    db = tmp_path / "deep" / "mlflow.db"
    assert resolve_tracking_uri(f"sqlite:///{db}") == f"sqlite:///{db}"
    assert db.parent.is_dir()
    assert default_artifact_root(f"sqlite:///{db}") == (db.parent / "artifacts").as_uri()


# --------------------------------------------------------------------------------------
# How trials end
# --------------------------------------------------------------------------------------
def test_complete_pruned_and_failed_trials_map_to_run_statuses(mlflow_url: str,
                                                               storage: str) -> None:
    spec = spec_of("ends", models="none", **{
        "model: {arch: mlp, hidden: [32], dropout: 0.0}":
            "model: {arch: cnn, channels: [4, 8], dropout: 0.0}",
        "budget: {trials: 3, epochs: 2}": "budget: {trials: 3, epochs: 3}",
        "sampler: {name: random, seed: 0}":
            "sampler: {name: random, seed: 0}\n"
            "pruner: {name: median, startup_trials: 1, warmup_epochs: 0}",
        "  train.lr: {float: [1.0e-3, 3.0e-2], log: true}":
            "  train.lr: {float: [1.0e-6, 3.0e-2], log: true}\n"
            "  model.filter_size: {choice: [3, 7]}"})
    study = open_or_create(spec, storage)[0]
    study.enqueue_trial({"train.lr": 0.02, "model.filter_size": 3})
    study.enqueue_trial({"train.lr": 1e-6, "model.filter_size": 3})  # below the median
    study.enqueue_trial({"train.lr": 0.02, "model.filter_size": 7})  # 12→6→0: infeasible
    tracker = MlflowTracker(mlflow_url)
    report = run_study(spec, RunOptions(storage=storage, device="cpu"), tracker=tracker)
    assert [o.state for o in report.outcomes] == ["COMPLETE", "PRUNED", "FAIL"]
    client = MlflowClient(mlflow_url)
    parent, (complete, pruned, failed) = runs_of(client, "ends")
    assert complete.info.status == "FINISHED"
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["sweeper.state"] == "PRUNED"
    assert pruned.data.tags["sweeper.reason"].startswith("pruned at epoch 1")
    assert failed.info.status == "FAILED"
    assert failed.data.tags["sweeper.state"] == "FAIL"
    reason = failed.data.tags["sweeper.reason"]
    assert reason == report.outcomes[2].reason and "model.filter_size=7" in reason
    assert "error.txt" in artifacts(client, failed.info.run_id)
    error = Path(client.download_artifacts(failed.info.run_id, "error.txt")).read_text()
    assert "model.filter_size=7" in error
    assert parent.info.status == "FINISHED"
    assert tracker.failures == []


def test_interrupted_trial_leaves_no_running_run(mlflow_url: str, storage: str) -> None:
    def interrupt(event: str, info: dict[str, Any]) -> None:
        if event == "epoch":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(spec_of("interrupted"), RunOptions(storage=storage, device="cpu"),
                  tracker=MlflowTracker(mlflow_url), progress=interrupt)
    trial, retry = optuna.load_study(study_name="interrupted", storage=storage).trials
    assert trial.state == TrialState.FAIL
    assert retry.state == TrialState.WAITING  # queued for the next run, no run of its own
    parent, (run,) = runs_of(MlflowClient(mlflow_url), "interrupted")
    assert run.info.status in ("KILLED", "FAILED")
    assert run.data.tags["sweeper.reason"] == "interrupted"
    assert parent.info.status == "KILLED"


# --------------------------------------------------------------------------------------
# Models policy
# --------------------------------------------------------------------------------------
def test_models_best_logs_only_improvements_and_moves_the_alias(mlflow_url: str,
                                                                storage: str) -> None:
    spec = spec_of("policy-best", models="best", **{
        "  train.lr: {float: [1.0e-3, 3.0e-2], log: true}":
            "  train.lr: {float: [1.0e-6, 3.0e-2], log: true}"})
    study = open_or_create(spec, storage)[0]
    for lr in (1e-6, 0.02, 1e-6):  # poor, then better, then worse than the best
        study.enqueue_trial({"train.lr": lr})
    run_study(spec, RunOptions(storage=storage, device="cpu"), tracker=MlflowTracker(mlflow_url))
    values = [t.value for t in optuna.load_study(study_name="policy-best",
                                                 storage=storage).trials]
    assert values[1] > values[0] and values[2] < values[1], values
    client = MlflowClient(mlflow_url)
    _, trials = runs_of(client, "policy-best")
    logged = [bool(client.get_run(r.info.run_id).outputs.model_outputs) for r in trials]
    assert logged == [True, True, False]
    versions = client.search_model_versions("name = 'policy-best'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in trials[:2])
    assert client.get_model_version_by_alias("policy-best", "best").run_id == \
        trials[1].info.run_id


def test_models_none_logs_no_model_and_registers_nothing(mlflow_url: str,
                                                         storage: str) -> None:
    from mlflow.exceptions import MlflowException

    spec = spec_of("policy-none", models="none", **{"trials: 3": "trials: 1"})
    run_study(spec, RunOptions(storage=storage, device="cpu"), tracker=MlflowTracker(mlflow_url))
    client = MlflowClient(mlflow_url)
    _, (run,) = runs_of(client, "policy-none")
    assert not client.get_run(run.info.run_id).outputs.model_outputs
    with pytest.raises(MlflowException):
        client.get_registered_model("policy-none")


def test_multi_objective_study_keeps_a_pareto_front_and_no_registry(mlflow_url: str,
                                                                    storage: str) -> None:
    from mlflow.exceptions import MlflowException

    spec = spec_of("pareto", models="best", **{
        "budget: {trials: 3, epochs: 2}":
            "budget: {trials: 2, epochs: 2}\n"
            "objectives: [{metric: val_accuracy}, {metric: n_params}]",
        "  train.lr: {float: [1.0e-3, 3.0e-2], log: true}":
            "  model.hidden: {choice: [[8], [32]]}"})
    tracker = MlflowTracker(mlflow_url)
    report = run_study(spec, RunOptions(storage=storage, device="cpu"), tracker=tracker)
    assert [o.state for o in report.outcomes] == ["COMPLETE"] * 2
    assert tracker.failures == []
    client = MlflowClient(mlflow_url)
    parent, trials = runs_of(client, "pareto")
    front = optuna.load_study(study_name="pareto", storage=storage).best_trials
    assert parent.data.tags["best.trials"] == ",".join(str(t.number) for t in front)
    assert parent.data.metrics["pareto_size"] == len(front)
    assert "figures/pareto_front.html" in artifacts(client, parent.info.run_id)
    # `models: best` keeps the model of every trial that was on the front when it ended.
    assert bool(client.get_run(trials[0].info.run_id).outputs.model_outputs)
    with pytest.raises(MlflowException):
        client.get_registered_model("pareto")


# --------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------
def test_unreachable_server_fails_before_anything_is_written(storage: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TrackingError) as caught:
        run_study(spec_of("unreachable"), RunOptions(storage=storage, device="cpu"),
                  tracker=MlflowTracker(url))
    message = str(caught.value)
    assert "cannot reach the MLflow server" in message and url in message
    assert "\n" not in message
    assert optuna.get_all_study_names(storage) == []


def test_unreachable_database_fails_before_anything_is_written(
        tmp_path: Path, storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/mlflow"
    with pytest.raises(TrackingError, match="cannot connect to the MLflow database"):
        run_study(spec_of("no-db"), RunOptions(storage=storage, device="cpu"),
                  tracker=MlflowTracker(url))
    assert optuna.get_all_study_names(storage) == []
    assert not (tmp_path / "mlruns").exists(), "no artifact folder for a store that is down"


@pytest.mark.slow  # a server killed and restarted mid-study
def test_server_lost_mid_study_loses_no_optuna_result(
        tmp_path: Path, storage: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast once it is gone
    server = MlflowServer(tmp_path / "doomed").start()
    try:
        url = server.wait_ready()

        def kill_after_first_trial(event: str, info: dict[str, Any]) -> None:
            if event == "trial" and info["outcome"].number == 0:
                server.kill()

        tracker = MlflowTracker(url)
        with caplog.at_level(logging.WARNING, logger="sweeper.tracking"):
            report = run_study(spec_of("doomed"), RunOptions(storage=storage, device="cpu"),
                               tracker=tracker, progress=kill_after_first_trial)
    finally:
        server.stop()
    assert [o.state for o in report.outcomes] == ["COMPLETE"] * 3
    trials = optuna.load_study(study_name="doomed", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert tracker.failures, "the lost server was reported"
    assert any("could not" in r.getMessage() for r in caplog.records)
    assert all("\n" not in f for f in tracker.failures)


def test_a_store_that_was_away_is_asked_again_and_tracking_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sweeper.tracking import guard

    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.check()
    for _ in range(tracker.max_failures):  # as if the store had stopped answering
        tracker.failed("log", ConnectionError("connection refused"))
    assert tracker.disabled and not tracker.available()  # not asked again before REPROBE_S
    monkeypatch.setattr(guard, "REPROBE_S", 0.0)
    tracker._reprobe_at = 0.0
    assert tracker.available() and not tracker.disabled  # it answers: tracking resumes
