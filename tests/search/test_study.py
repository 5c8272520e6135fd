"""The study loop against a real SQLite Optuna storage and real (tiny) training: states,
reasons, resume, budget, pruning, timeouts and interruption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from sweeper.errors import StorageError
from sweeper.search.study import RunOptions, Worker, count_finished, open_or_create, run_study
from sweeper.spec import config

SYNTHETIC = """
name: {name}
dataset: {{name: synthetic, synthetic: {{train_size: 512, test_size: 128, image_size: 12}}}}
model: {{arch: mlp, hidden: [32], dropout: 0.0}}
train: {{optimizer: adam, lr: 0.01, batch_size: 64}}
budget: {{trials: 3, epochs: 2}}
sampler: {{name: random, seed: 0}}
space:
  train.lr: {{float: [1.0e-3, 3.0e-2], log: true}}
"""


def spec_of(text: str = SYNTHETIC, name: str = "syn", **replace: str) -> config.StudySpec:
    text = text.format(name=name)
    for old, new in replace.items():
        text = text.replace(old, new)
    return config.loads(text)


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def test_three_trial_study_completes_and_records_everything(storage: str) -> None:
    spec = spec_of()
    report = run_study(spec, RunOptions(storage=storage, device="cpu"))
    assert report.stopped_by == "budget"
    assert [o.state for o in report.outcomes] == ["COMPLETE"] * 3
    study = optuna.load_study(study_name="syn", storage=storage)
    assert states(study) == ["COMPLETE"] * 3
    for trial in study.trials:
        metrics = trial.system_attrs["sweeper.metrics"]
        # The objective is the validation accuracy; test accuracy is reported beside it.
        assert trial.value == pytest.approx(metrics["val_accuracy"])
        assert 0 <= metrics["test_accuracy"] <= 1 and "val_f1_macro" in metrics
        config = trial.system_attrs["sweeper.config"]
        assert config["train.lr"] == pytest.approx(trial.params["train.lr"])
        assert metrics["epochs_run"] == 2
    assert study.best_value > 0.5, "the synthetic task is learnable"
    system = study._storage.get_study_system_attrs(study._study_id)
    assert system["sweeper.spec"]["name"] == "syn"
    assert "sweeper.spec" not in study.user_attrs  # Optuna's tools show user attrs whole


def test_second_run_resumes_and_adds_trials(storage: str) -> None:
    spec = spec_of()
    run_study(spec, RunOptions(storage=storage, device="cpu"))
    again = run_study(spec, RunOptions(storage=storage, device="cpu"))
    assert again.stopped_by == "nothing-to-do" and again.outcomes == []
    more = run_study(spec, RunOptions(storage=storage, device="cpu", more_trials=2))
    assert more.stopped_by == "trials" and len(more.outcomes) == 2
    study = optuna.load_study(study_name="syn", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    # A larger budget in the file resumes up to the new total.
    bigger = spec_of(**{"trials: 3": "trials: 6"})
    report = run_study(bigger, RunOptions(storage=storage, device="cpu"))
    assert len(report.outcomes) == 1 and count_finished(study) == 6


def test_infeasible_and_failing_trials_fail_with_reason_and_study_goes_on(storage: str) -> None:
    spec = spec_of(**{"model: {arch: mlp, hidden: [32], dropout: 0.0}":
                      "model: {arch: cnn, channels: [4, 8], dropout: 0.0}",
                      "  train.lr: {float: [1.0e-3, 3.0e-2], log: true}":
                      "  model.filter_size: {choice: [3, 7]}\n"
                      "  train.optimizer: {choice: [adam, sgd]}"})
    study = open_or_create(spec, storage)[0]
    study.enqueue_trial({"model.filter_size": 7, "train.optimizer": "adam"})  # 12→6→0
    study.enqueue_trial({"model.filter_size": 3, "train.optimizer": "adam"})
    report = run_study(spec, RunOptions(storage=storage, device="cpu", more_trials=2))
    first, second = report.outcomes
    assert first.state == "FAIL"
    assert "model.filter_size=7" in first.reason and "conv2" in first.reason
    assert first.seconds < 5, "an infeasible model fails before any training"
    assert second.state == "COMPLETE"
    stored = optuna.load_study(study_name="syn", storage=storage).trials
    assert stored[0].state == TrialState.FAIL
    assert stored[0].user_attrs["fail_reason"] == first.reason


def test_divergence_ends_fail_not_complete(storage: str) -> None:
    spec = spec_of(**{"optimizer: adam, lr: 0.01": "optimizer: sgd, lr: 10.0",
                      "  train.lr: {float: [1.0e-3, 3.0e-2], log: true}":
                      "  train.lr: {choice: [10.0]}",
                      "synthetic: {train_size": "normalize: false, synthetic: {noise: 50.0, "
                                                "train_size"})
    report = run_study(spec, RunOptions(storage=storage, device="cpu", more_trials=1))
    (outcome,) = report.outcomes
    assert outcome.state == "FAIL", outcome
    assert outcome.reason is not None and outcome.reason.startswith("diverged at epoch")
    trial = optuna.load_study(study_name="syn", storage=storage).trials[0]
    assert trial.values is None


def test_unexpected_error_fails_one_trial_only(storage: str, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    import sweeper.ml.models

    real = sweeper.ml.models.build_model
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA error: an illegal memory access\nsecond line")
        return real(*args, **kwargs)

    monkeypatch.setattr(sweeper.ml.models, "build_model", flaky)
    report = run_study(spec_of(), RunOptions(storage=storage, device="cpu"))
    assert [o.state for o in report.outcomes] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert report.outcomes[0].reason == "RuntimeError: CUDA error: an illegal memory access"
    assert "Traceback" in (report.outcomes[0].detail or "")


def test_pruner_prunes_a_poor_trial(storage: str) -> None:
    spec = spec_of(**{"sampler: {name: random, seed: 0}":
                      "sampler: {name: random, seed: 0}\n"
                      "pruner: {name: median, startup_trials: 1, warmup_epochs: 0}",
                      "budget: {trials: 3, epochs: 2}": "budget: {trials: 3, epochs: 3}",
                      "  train.lr: {float: [1.0e-3, 3.0e-2], log: true}":
                      "  train.lr: {float: [1.0e-6, 3.0e-2], log: true}"})
    study = open_or_create(spec, storage)[0]
    study.enqueue_trial({"train.lr": 0.02})
    study.enqueue_trial({"train.lr": 1e-6})  # learns nothing: below the median at epoch 1
    report = run_study(spec, RunOptions(storage=storage, device="cpu", more_trials=2))
    assert [o.state for o in report.outcomes] == ["COMPLETE", "PRUNED"]
    assert report.outcomes[1].reason.startswith("pruned at epoch 1")
    trial = optuna.load_study(study_name="syn", storage=storage).trials[1]
    assert trial.state == TrialState.PRUNED and trial.intermediate_values


def test_timeout_stops_starting_trials(storage: str) -> None:
    spec = spec_of(**{"budget: {trials: 3, epochs: 2}":
                      "budget: {trials: 50, epochs: 1, timeout: 0.001s}"})
    report = run_study(spec, RunOptions(storage=storage, device="cpu"))
    assert report.stopped_by == "timeout"
    assert len(report.outcomes) <= 1


def test_interrupt_ends_running_trial_as_fail(storage: str) -> None:
    def interrupt(event: str, info: dict[str, Any]) -> None:
        if event == "epoch":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stopped:
        run_study(spec_of(), RunOptions(storage=storage, device="cpu"), progress=interrupt)
    assert stopped.value.recorded == (  # type: ignore[attr-defined]
        "the running trial was recorded as FAIL (#0) and re-queued as #1")
    trial, retry = optuna.load_study(study_name="syn", storage=storage).trials
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "interrupted"
    # Stopped by a person, not by its params: queued once, with the same params.
    assert retry.state == TrialState.WAITING
    assert retry.user_attrs["retry_of"] == 0 and retry.params == trial.params
    # Stopped again, the retry is not queued a second time; the next run trains the
    # budget's other trials.
    with pytest.raises(KeyboardInterrupt) as again:
        run_study(spec_of(), RunOptions(storage=storage, device="cpu"), progress=interrupt)
    assert again.value.recorded == (  # type: ignore[attr-defined]
        "the running trial was recorded as FAIL (#1)")
    report = run_study(spec_of(), RunOptions(storage=storage, device="cpu"))
    study = optuna.load_study(study_name="syn", storage=storage)
    assert states(study)[:2] == ["FAIL", "FAIL"]
    assert "WAITING" not in states(study)
    assert len(report.outcomes) == spec_of().budget.trials - 1  # the retry stands in for #0


def test_changed_objective_direction_is_refused(storage: str) -> None:
    run_study(spec_of(), RunOptions(storage=storage, device="cpu", more_trials=1))
    flipped = spec_of(**{"budget:": "objective: {metric: val_loss}\nbudget:"})
    with pytest.raises(StorageError, match=r"optimizes \['maximize'\], but the study file says "
                                           r"\['minimize'\]"):
        run_study(flipped, RunOptions(storage=storage, device="cpu"))


def test_missing_dataset_writes_no_study(tmp_path: Path, storage: str) -> None:
    from sweeper.errors import DataError

    spec = config.loads("name: nodata\ndataset: {name: kmnist, download: false}\n")
    with pytest.raises(DataError):
        run_study(spec, RunOptions(storage=storage, device="cpu", data_dir=tmp_path))
    assert optuna.get_all_study_names(storage) == []


def test_worker_reuses_loaded_data(storage: str) -> None:
    spec = spec_of(**{"  train.lr: {float: [1.0e-3, 3.0e-2], log: true}":
                      "  dataset.augment.rotate: {choice: [0.0, 10.0]}"})
    worker = Worker(spec, RunOptions(storage=storage, device="cpu"))
    first = worker.dataset(spec.dataset)
    rotated = spec.resolve({"dataset.augment.rotate": 10.0}).dataset
    assert worker.dataset(rotated).train.x is first.train.x, \
        "augmentation is applied per batch, not on load"
    bigger = spec.resolve({"dataset.val_fraction": 0.2}).dataset
    assert worker.dataset(bigger).train.x is not first.train.x
