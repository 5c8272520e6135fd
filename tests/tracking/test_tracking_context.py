"""Where a trial run comes from and what it ran on: MLflow's context tags with the git
commit of the study's repository, the dataset digest, system metrics while a trial trains,
and `lr` as a curve only when a schedule changes it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sweeper.ml.data import load_dataset
from sweeper.search.study import RunOptions, run_study
from sweeper.spec import config
from sweeper.tracking import MlflowTracker, system_metrics
from sweeper.tracking.context import context_tags, data_digest

SCHEDULED = """
name: scheduled
dataset: {name: synthetic, synthetic: {train_size: 2048, test_size: 128, image_size: 16}}
model: {arch: mlp, hidden: [64]}
train: {optimizer: sgd, lr: 0.05, batch_size: 32, scheduler: cosine}
budget: {trials: 1, epochs: 3}
sampler: {name: random, seed: 0}
models: none
"""


def test_git_commit_is_the_study_repositorys(tmp_path: Path) -> None:
    repo = tmp_path / "project"
    repo.mkdir()
    (repo / "study.yaml").write_text("name: x\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "study.yaml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "study"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    tags = context_tags(str(repo / "study.yaml"))
    assert tags["mlflow.source.git.commit"] == head
    assert tags["mlflow.user"] and tags["sweeper.version"]
    assert "mlflow.runName" not in tags
    outside = context_tags(str(tmp_path / "elsewhere.yaml"))
    assert "mlflow.source.git.commit" not in outside


def test_data_digest_tells_datasets_apart() -> None:
    spec = config.loads("name: d\ndataset: {name: digits}\n")
    cfg = spec.resolve({})
    first = load_dataset(cfg.dataset, device="cpu")
    assert data_digest(first) == data_digest(first)
    other = load_dataset(cfg.dataset.model_copy(update={"seed": 1}), device="cpu")
    assert data_digest(other) != data_digest(first)  # another validation split


def test_sampler_reads_cpu_and_memory_until_stopped() -> None:
    readings: list[tuple[dict[str, float], int]] = []
    sampler = system_metrics.SystemSampler(lambda r, step, ts: readings.append((r, step)),
                                           device="cpu", interval=0.05)
    sampler.start()
    time.sleep(0.4)
    sampler.stop()
    count = len(readings)
    time.sleep(0.2)
    assert len(readings) == count >= 3, "it samples, then stops"
    assert [step for _, step in readings] == list(range(count))
    first = readings[0][0]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_percentage",
            "system/process_memory_usage_megabytes"} <= set(first)
    assert 0 <= first["system/system_memory_usage_percentage"] <= 100


def test_system_metrics_follow_mlflows_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(system_metrics.ENABLE_ENV, raising=False)
    assert system_metrics.enabled()
    monkeypatch.setenv(system_metrics.ENABLE_ENV, "false")
    assert not system_metrics.enabled()
    monkeypatch.setenv(system_metrics.INTERVAL_ENV, "2.5")
    assert system_metrics.interval_s() == 2.5


def test_a_scheduled_trial_logs_lr_and_system_metrics(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(system_metrics.INTERVAL_ENV, "0.1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = config.loads(SCHEDULED)
    tracker = MlflowTracker(uri)
    report = run_study(spec, RunOptions(storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                        device="cpu"), tracker=tracker)
    assert [o.state for o in report.outcomes] == ["COMPLETE"]
    assert tracker.failures == []
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("scheduled")
    (run,) = client.search_runs([experiment.experiment_id],
                                filter_string="tags.`sweeper.role` = 'trial'")
    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr"),
                                   key=lambda m: m.step)]
    assert len(lrs) == 3 and lrs[0] == pytest.approx(0.05) and lrs[2] < lrs[1] < lrs[0]
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert cpu, "system metrics while the trial trained"
    assert all(0 <= m.value <= 100 * 64 for m in cpu)
    params = run.data.params
    assert params["dataset.synthetic.train_size"] == "2048"  # read: the dataset is synthetic
