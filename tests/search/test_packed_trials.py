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
from processes import assert_agree, finish, sweeper

from sweeper.keys import ATTR_CONFIG, ATTR_METRICS, ATTR_PACK, TAG_PACK, trial_record
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
        assert run.data.tags[TAG_PACK] == ",".join(map(str, trial.user_attrs[ATTR_PACK]))
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


@pytest.mark.slow  # two packs of three, three epochs: 7 s
def test_a_pruned_member_leaves_its_pack_and_the_others_finish(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    text = STUDY.format(name="pruned", trials=8, pack=4).replace("epochs: 2", "epochs: 3")
    text = text.replace("[1.0e-3, 3.0e-2]", "[1.0e-5, 3.0e-2]")
    spec = config.loads(text + "pruner: {name: median, startup_trials: 2, warmup_epochs: 1}\n")
    run_study(spec, RunOptions(storage=storage, device="cpu"), tracker=MlflowTracker(tracking))
    trials = optuna.load_study(study_name="pruned", storage=storage).get_trials()
    assert [t.user_attrs[ATTR_PACK] for t in trials] == [[0, 1, 2, 3]] * 4 + [[4, 5, 6, 7]] * 4
    # The first pack trains before any trial has finished: the median pruner judges none.
    assert [t.state for t in trials[:4]] == [TrialState.COMPLETE] * 4
    second = trials[4:]
    pruned = [t for t in second if t.state == TrialState.PRUNED]
    finished = [t for t in second if t.state == TrialState.COMPLETE]
    assert pruned and finished and len(pruned) + len(finished) == 4
    client = MlflowClient(tracking)
    for trial in pruned:  # reported up to the epoch it was pruned at, its run KILLED
        assert max(trial.intermediate_values) < 3
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert steps == sorted(trial.intermediate_values)
    data = load_dataset(spec.dataset, device="cpu")
    for trial in finished:  # the pack went on without it: every epoch, as trained alone
        assert sorted(trial.intermediate_values) == [1, 2, 3]
        trial_config = config.TrialConfig.from_flat(trial_record(trial, ATTR_CONFIG))
        seed_everything(trial_config.train.seed)
        alone = build_model(trial_config.model, data.input_shape, data.num_classes)
        lone = fit(alone, data, trial_config.train, epochs=3, device=data.train.x.device)
        assert [row["val_accuracy"] for row in lone.history] == pytest.approx(
            [trial.intermediate_values[e] for e in (1, 2, 3)], abs=1e-6)


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


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_pack_ends_every_member_and_leaves_nothing_running(
        tmp_path: Path, sig: signal.Signals) -> None:

    from sweeper.fleet.stopping import TEST_SIGNAL_ENV

    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    path = tmp_path / "stop.yaml"
    path.write_text(STUDY.format(name="stop", trials=6, pack=3))
    # The signal arrives while the first pack opens its second member's run: that waits
    # for the run to exist, then training stops and all three members end.
    code, out, err = finish(sweeper("run", str(path), "--device", "cpu", cwd=tmp_path,
                                    **{TEST_SIGNAL_ENV: f"in-create-run:{sig.name}:2"}))
    assert code == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], out + err
    assert "Traceback" not in err, err
    assert ("the running trials were recorded as FAIL (#0, #1, #2) and re-queued (#3, #4, "
            "#5)") in err, err
    trials = assert_agree(storage, tracking, "stop")
    reason = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.WAITING] * 3
    assert [t.user_attrs["fail_reason"] for t in trials[:3]] == [reason] * 3
    client = MlflowClient(tracking)
    statuses = [client.get_run(t.user_attrs["mlflow_run_id"]).info.status
                for t in trials[:3] if "mlflow_run_id" in t.user_attrs]
    assert statuses and set(statuses) == {"KILLED"}
    # The next run trains the three again first (same params), then the budget's rest:
    # each retry stands in for the trial it repeats.
    code, out, err = finish(sweeper("run", str(path), "--device", "cpu", cwd=tmp_path))
    assert code == 0, out + err
    trials = assert_agree(storage, tracking, "stop")
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.COMPLETE] * 6
    for stopped, retry in zip(trials[:3], trials[3:6], strict=True):
        assert retry.user_attrs["retry_of"] == stopped.number
        assert retry.params == stopped.params


@pytest.mark.slow
def test_two_workers_each_form_their_own_packs(tmp_path: Path) -> None:

    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    path = tmp_path / "two.yaml"
    path.write_text(STUDY.format(name="two", trials=12, pack=3))
    code, out, err = finish(sweeper("run", str(path), "--jobs", "2", "--device", "cpu",
                                    cwd=tmp_path))
    assert code == 0, out + err
    for bad in ("locked", "warning", "error", "traceback"):
        assert bad not in err.lower(), err
    trials = assert_agree(storage, tracking, "two")
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert 12 <= len(trials) <= 12 + 2  # overshoot: at most a pack's others
    by_number = {t.number: t for t in trials}
    packs = {tuple(t.user_attrs[ATTR_PACK]) for t in trials}
    assert sorted(n for pack in packs for n in pack) == sorted(by_number)  # disjoint
    workers = set()
    for pack in packs:
        members = [by_number[n] for n in pack]
        assert len({m.user_attrs["worker"] for m in members}) == 1
        assert len({m.params["model.filter_size"] for m in members}) == 1
        workers.add(members[0].user_attrs["worker"])
    assert len(workers) == 2


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


# A worker whose address space is capped (RLIMIT_AS) after start-up, so that a pack of 8
# wide MLPs (about 130 MB each) cannot allocate its step while packs of 2 can: a real
# allocation failure of torch's CPU allocator, as a full host or GPU gives.
CAPPED_WORKER = """
import json, resource, sys
from sweeper.search.study import RunOptions, run_study
from sweeper.spec import config

STUDY = '''
name: {name}
dataset: {{name: synthetic, synthetic: {{train_size: 1200, test_size: 64, image_size: 28,
                                       classes: 10, noise: 8.0}}}}
model: {{arch: mlp, hidden: [4096]}}
train: {{optimizer: adam, batch_size: 1024}}
budget: {{trials: {trials}, epochs: 1}}
sampler: {{name: tpe, seed: 0}}
pack: {trials}
space:
  train.lr: {{float: [1.0e-3, 3.0e-2], log: true}}
  model.dropout: {{float: [0.0, 0.5]}}
'''
folder, cap_mb = sys.argv[1], int(sys.argv[2])
# Every module and thread a pack uses is loaded before the cap.
run_study(config.loads(STUDY.format(name="warm", trials=2)),
          RunOptions(storage=f"sqlite:///{folder}/warm.db", device="cpu"))
if cap_mb:
    size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size + (cap_mb << 20), resource.RLIM_INFINITY))
run_study(config.loads(STUDY.format(name="capped", trials=8)),
          RunOptions(storage=f"sqlite:///{folder}/optuna.db", device="cpu"))
"""


@pytest.mark.slow
def test_a_pack_out_of_memory_trains_in_smaller_packs_with_the_same_numbers(
        tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    def worker(cap_mb: int) -> tuple[list[optuna.trial.FrozenTrial], str]:
        folder = tmp_path / f"cap-{cap_mb}"
        folder.mkdir()
        # One malloc arena: glibc reserves 64 MB of address space for each thread's
        # arena, which the cap would count as memory used.
        env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
        result = subprocess.run([sys.executable, "-c", CAPPED_WORKER, str(folder),
                                 str(cap_mb)], env=env, capture_output=True, text=True,
                                timeout=300, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        storage = f"sqlite:///{folder / 'optuna.db'}"
        return optuna.load_study(study_name="capped", storage=storage).get_trials(), \
            result.stderr

    free, free_log = worker(0)
    capped, capped_log = worker(600)
    assert "did not fit in memory" not in free_log
    assert ("a pack of 8 trials (#0, #1, #2, #3, #4, #5, #6, #7) did not fit in memory on "
            "cpu; training them in packs of 4 and 4") in capped_log
    assert [t.state for t in capped] == [TrialState.COMPLETE] * 8
    for alone, split in zip(free, capped, strict=True):
        assert split.params == alone.params
        assert split.user_attrs[ATTR_PACK] == list(range(8))
        assert trial_record(split, ATTR_METRICS)["val_loss"] == pytest.approx(
            trial_record(alone, ATTR_METRICS)["val_loss"], rel=1e-4)
