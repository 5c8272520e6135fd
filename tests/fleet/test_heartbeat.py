"""Heartbeats and lost trials on a real SQLite Optuna storage: a RUNNING trial whose worker
fell silent is failed as "worker lost", re-queued once with the same params, counted once
in the budget, and run again by the next worker; the worker's own failure policy."""

from __future__ import annotations

import time
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from studies import tiny_study
from sweeper.fleet.heartbeat import HeartbeatSettings, beating, fail_lost_trials
from sweeper.keys import ATTR_HEARTBEAT, ATTR_RETRY_OF, ATTR_WORKER
from sweeper.search.queries import StudyQueries
from sweeper.search.storage import rdb_of
from sweeper.search.study import RunOptions, Worker, count_finished, open_or_create, run_study
from sweeper.spec import config

STUDY = tiny_study("beats", trials=3, train=128, hidden="[8]", train_block="batch_size: 64")
# Short enough for tests; SQLite's clock ticks in whole seconds, hence the margins.
FAST = HeartbeatSettings(interval_s=0.2, grace_s=1.0)


def abandoned_trial(study: optuna.Study) -> optuna.Trial:
    """A trial whose worker beat once and then vanished, as after `kill -9`."""
    trial = study.ask()
    trial.suggest_float("train.lr", 1e-3, 3e-2, log=True)
    trial.set_user_attr(ATTR_WORKER, "elsewhere:1")
    rdb_of(study).record_heartbeat(trial._trial_id)
    return trial


def test_beating_records_heartbeats_until_the_block_ends(storage: str) -> None:
    study = open_or_create(config.loads(STUDY), storage)[0]
    trial = study.ask()
    queries = StudyQueries(rdb_of(study), study._study_id)
    with beating(rdb_of(study), trial._trial_id, FAST):
        time.sleep(1.5)
        (running,) = queries.running()
        # SQLite's clock counts whole seconds: a beat 0.2 s ago reads as at most 1 s.
        assert running.beats and running.silent_s <= 1.0
    time.sleep(2.2)
    (running,) = queries.running()
    assert running.silent_s >= 2.0  # no beats once the block ended


def test_a_lost_trial_fails_is_requeued_once_and_runs_again(storage: str) -> None:
    spec = config.loads(STUDY)
    study = open_or_create(spec, storage)[0]
    lost = abandoned_trial(study)
    lr = lost.params["train.lr"]
    assert fail_lost_trials(study, FAST) == []  # still within its grace period
    time.sleep(2.2)
    ended: list[tuple[int, str]] = []
    handled = fail_lost_trials(study, FAST,
                               on_lost=lambda s, t, reason: ended.append((t.number, reason)))
    assert handled == [(0, 1)]
    assert fail_lost_trials(study, FAST) == []  # a second worker finds nothing more to do
    failed, retry = study.get_trials(deepcopy=False)
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"].startswith("worker lost: no heartbeat for ")
    assert ended == [(0, failed.user_attrs["fail_reason"])]
    assert retry.state == TrialState.WAITING and retry.params == {"train.lr": lr}
    assert retry.user_attrs[ATTR_RETRY_OF] == 0
    assert count_finished(study) == 0  # the retry stands in for the lost trial

    report = run_study(spec, RunOptions(storage=storage, device="cpu", heartbeat=FAST))
    study = optuna.load_study(study_name="beats", storage=storage)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert report.outcomes[0].number == 1  # the retry ran first, with the lost params
    assert study.trials[1].params["train.lr"] == pytest.approx(lr)
    assert count_finished(study) == 3 and report.stopped_by == "budget"


def test_a_retry_that_is_lost_again_is_not_requeued(storage: str) -> None:
    study = open_or_create(config.loads(STUDY), storage)[0]
    abandoned_trial(study)
    time.sleep(2.2)
    assert fail_lost_trials(study, FAST) == [(0, 1)]
    retry = study.ask()  # popped from the queue: trial 1, the retry
    assert retry.number == 1
    rdb_of(study).record_heartbeat(retry._trial_id)
    time.sleep(2.2)
    assert fail_lost_trials(study, FAST) == [(1, None)]
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]


def test_a_worker_at_the_budget_waits_for_a_silent_trial_and_runs_its_retry(storage: str
                                                                            ) -> None:
    """The last worker standing takes back a trial lost near the end of the study."""
    spec = config.loads(STUDY.replace("trials: 3", "trials: 1"))
    study = open_or_create(spec, storage)[0]
    abandoned_trial(study)  # trial 0: RUNNING, its worker gone; the budget is one trial
    time.sleep(1.5)  # silent for a few beats already
    report = run_study(spec, RunOptions(storage=storage, device="cpu", heartbeat=FAST))
    study = optuna.load_study(study_name="beats", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert [o.number for o in report.outcomes] == [1]
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_a_worker_does_not_wait_for_trials_whose_workers_beat(storage: str) -> None:
    """Another worker's live trial counts toward the budget (no overshoot) and is that
    worker's to finish: this one stops without waiting for it."""
    spec = config.loads(STUDY.replace("trials: 3", "trials: 2"))
    study = open_or_create(spec, storage)[0]
    other = study.ask()  # another worker's trial, alive and beating
    with beating(rdb_of(study), other._trial_id, FAST):
        started = time.monotonic()
        report = run_study(spec, RunOptions(storage=storage, device="cpu", heartbeat=FAST))
        assert time.monotonic() - started < 30
    assert [o.state for o in report.outcomes] == ["COMPLETE"]
    assert report.stopped_by == "budget"


def test_settings_are_checked() -> None:
    assert HeartbeatSettings.from_interval(30).grace_s == 120
    with pytest.raises(ValueError, match="interval < grace period"):
        HeartbeatSettings(interval_s=5, grace_s=5)


# --------------------------------------------------------------------------------------
# Failures that are the machine's, not the config's
# --------------------------------------------------------------------------------------
def failing_with(exc: BaseException) -> Any:
    def objective(worker: Worker, trial: optuna.Trial, cfg: Any, run: Any) -> Any:
        raise exc

    return objective


def test_a_worker_stops_after_k_trials_fail_for_reasons_outside_their_params(storage: str
                                                                             ) -> None:
    spec = config.loads(STUDY.replace("trials: 3", "trials: 10"))
    broken = failing_with(RuntimeError("CUDA error: an illegal memory access was "
                                       "encountered"))
    report = run_study(spec, RunOptions(storage=storage, device="cpu",
                                        max_worker_failures=3), objective=broken)
    assert report.stopped_by == "failing" and len(report.outcomes) == 3
    assert {o.cause for o in report.outcomes} == {"environment"}
    assert report.message is not None and "its last 3 trials failed" in report.message
    assert "CUDA error" in report.message
    # Another worker on a sound machine goes on with the study.
    other = run_study(spec, RunOptions(storage=storage, device="cpu"))
    assert other.stopped_by == "budget" and {o.state for o in other.outcomes} == {"COMPLETE"}


def test_out_of_memory_fails_the_trial_and_the_worker_goes_on(storage: str) -> None:
    spec = config.loads(STUDY.replace("trials: 3", "trials: 5"))
    oom = failing_with(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate "
                                              "20.00 GiB"))
    report = run_study(spec, RunOptions(storage=storage, device="cpu",
                                        max_worker_failures=2), objective=oom)
    assert report.stopped_by == "budget" and len(report.outcomes) == 5
    assert all(o.cause == "params" for o in report.outcomes)
    assert report.outcomes[0].reason == ("out of memory on cpu: CUDA out of memory. Tried "
                                         "to allocate 20.00 GiB")
    study = optuna.load_study(study_name="beats", storage=storage)
    assert {t.user_attrs["fail_reason"] for t in study.trials} == {report.outcomes[0].reason}


@pytest.mark.gpu
def test_cuda_out_of_memory_is_freed_and_the_worker_goes_on(storage: str) -> None:
    """A real CUDA OOM (activations far beyond the GPU's memory; the model itself is small,
    so the host is never at risk), then a small study in the same process."""
    huge = config.loads(STUDY.replace("trials: 3", "trials: 1")
                        .replace("image_size: 8", "image_size: 128")
                        .replace("train_size: 128", "train_size: 1024")
                        .replace("{arch: mlp, hidden: [8]}",
                                 "{arch: cnn, channels: [2048, 2048]}")
                        + "train: {batch_size: 1024}\n")
    (outcome,) = run_study(huge, RunOptions(storage=storage, device="cuda")).outcomes
    assert outcome.state == "FAIL" and outcome.cause == "params"
    assert outcome.reason is not None and outcome.reason.startswith("out of memory on cuda")
    assert torch.cuda.memory_allocated() < 2**30  # the activations were given back
    small = config.loads(STUDY.replace("name: beats", "name: small"))
    report = run_study(small, RunOptions(storage=storage, device="cuda"))
    assert {o.state for o in report.outcomes} == {"COMPLETE"}


# --------------------------------------------------------------------------------------
# Each trial is judged by its own worker's settings
# --------------------------------------------------------------------------------------
def test_a_trial_is_judged_by_the_grace_its_own_worker_recorded(storage: str) -> None:

    study = open_or_create(config.loads(STUDY), storage)[0]
    slow = abandoned_trial(study)  # a worker beating every 60 s: silent for a while is fine
    rdb_of(study).set_trial_system_attr(slow._trial_id, ATTR_HEARTBEAT,
                                        HeartbeatSettings.from_interval(60).as_attr())
    time.sleep(2.2)
    assert fail_lost_trials(study, FAST) == []  # a reader with a 1 s grace leaves it
    (running,) = StudyQueries(rdb_of(study), study._study_id).running()
    assert not FAST.suspect(running) and FAST.of(running).grace_s == 240
    fast = abandoned_trial(study)  # a worker that recorded a short grace, then vanished
    rdb_of(study).set_trial_system_attr(fast._trial_id, ATTR_HEARTBEAT, FAST.as_attr())
    time.sleep(2.2)
    reader = HeartbeatSettings.from_interval(60)  # a patient reader still takes it back
    assert [n for n, _ in fail_lost_trials(study, reader)] == [fast.number]
    lost = study.trials[fast.number]
    assert lost.user_attrs["fail_reason"].endswith("(grace 1 s)")


def test_a_worker_whose_trial_was_taken_back_says_so_and_goes_on(
        storage: str, caplog: pytest.LogCaptureFixture) -> None:
    spec = config.loads(STUDY.replace("trials: 3", "trials: 2"))

    def taken_back_while_training(worker: Worker, trial: optuna.Trial, cfg: Any,
                                  run: Any) -> Any:
        if trial.number == 0:  # another worker (or `sweeper reap --all`) takes it back
            fail_lost_trials(trial.study, FAST, everything=True)
        return [0.5], {}

    with caplog.at_level("WARNING", logger="sweeper.search.study"):
        report = run_study(spec, RunOptions(storage=storage, device="cpu"),
                           objective=taken_back_while_training)
    # The lost trial counts once, as its retry: two more trials reach the budget of two.
    assert [(o.number, o.state) for o in report.outcomes] == [
        (0, "FAIL"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert report.outcomes[0].reason.startswith("taken back: worker lost")
    assert any("trial 0 was taken back" in r.getMessage() for r in caplog.records)
    study = optuna.load_study(study_name="beats", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[1].user_attrs[ATTR_RETRY_OF] == 0  # the retry ran next
