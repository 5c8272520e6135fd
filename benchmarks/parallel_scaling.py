"""How `sweeper run --jobs N` scales, and what each trial costs sweeper itself.

1. Scaling (floor: 4 workers >= 3.5x the trials/s of 1 worker). Each trial sleeps
   `--sleep` seconds in `--epochs` steps, standing in for GPU time, and logs every epoch;
   everything else is the real thing: worker processes from `sweeper.fleet.jobs`, the Optuna
   storage handing out trials, heartbeats, MLflow runs. Once on the local default (SQLite
   for both) and once on PostgreSQL with tracking over HTTP to an `mlflow server` on
   PostgreSQL. Trials/s is measured over the window in which every worker was running
   trials (the last worker's first start to the first worker's last end): start-up of the
   processes (importing torch and mlflow) is reported apart.
2. Bookkeeping per trial, in this process: the same loop with a trial that does nothing
   (ask, heartbeat, run opened, per-epoch metrics, run ended, tell, the parent's best),
   with tracking off and on; and a real trial of a tiny model (64 images, 1 epoch) with
   everything logged (`models: all`: model files, figures, tables).

    python benchmarks/parallel_scaling.py [--sleep 2] [--trials-per-worker 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _stores import mlflow_server, postgres_database

from sweeper.fleet.heartbeat import HeartbeatSettings
from sweeper.search.study import RunOptions, Worker, open_or_create
from sweeper.spec import config

warnings.filterwarnings("ignore", message=r".*experimental feature.*")

STUDY = """
name: {name}
dataset: {{name: synthetic, synthetic: {{train_size: 64, test_size: 32, image_size: 8}}}}
model: {{arch: mlp, hidden: [8]}}
train: {{batch_size: 32}}
budget: {{trials: {trials}, epochs: {epochs}}}
sampler: {{name: random, seed: 0}}
models: {models}
space:
  train.lr: {{float: [1.0e-4, 1.0e-1], log: true}}
  model.dropout: {{float: [0.0, 0.5]}}
"""
# --sleep reaches the worker processes through their environment.
SLEEP_ENV = "SWEEPER_BENCH_SLEEP"


def sleeping_trial(worker: Worker, trial: Any, cfg: Any, run: Any
                   ) -> tuple[list[float], dict[str, float]]:
    """A stand-in for training: sleeps, logs each epoch, returns a value that depends on
    the params (so that the sampler, the best-so-far and the registry have work to do)."""
    import math

    seconds = float(os.environ.get(SLEEP_ENV, "2"))
    epochs = cfg.epochs
    value = 1.0 / (1.0 + (math.log10(cfg.train.lr) + 2.5) ** 2)
    for epoch in range(1, epochs + 1):
        time.sleep(seconds / epochs)
        if run is not None:
            run.log_epoch(epoch, {"train_loss": 1.0 / epoch, "val_accuracy": value,
                                  "epoch_seconds": seconds / epochs})
    return [value], {"val_accuracy": value}


def steady_rate(study: Any) -> tuple[float, float, float]:
    """(trials/s while every worker ran trials, trials/s overall, seconds before every
    worker had started), from the trials' own start and end times."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    by_worker: dict[str, list[Any]] = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs.get("worker", "?"), []).append(t)
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    all_started = max(min(t.datetime_start for t in ts) for ts in by_worker.values())
    first_done = min(max(t.datetime_complete for t in ts) for ts in by_worker.values())
    inside = [t for t in trials if all_started <= t.datetime_complete <= first_done]
    window = (first_done - all_started).total_seconds()
    steady = len(inside) / window if window > 0 and inside else float("nan")
    overall = len(trials) / (last - first).total_seconds()
    return steady, overall, (all_started - first).total_seconds()


def scaling(name: str, storage: str, tracking: str, jobs: int, trials: int, epochs: int
            ) -> tuple[float, float, float, float]:
    from sweeper.fleet.jobs import run_jobs

    spec = config.loads(STUDY.format(name=name, trials=trials, epochs=epochs, models="none"))
    options = RunOptions(storage=storage, device="cpu",
                         heartbeat=HeartbeatSettings.from_interval(5))
    started = time.monotonic()
    outcome = run_jobs(spec, options, jobs, tracking_uri=tracking, objective=sleeping_trial)
    wall = time.monotonic() - started
    assert not outcome.errors and not outcome.lost, (outcome.errors, outcome.lost)
    states = {o.state for o in outcome.outcomes}
    assert states == {"COMPLETE"}, states
    steady, overall, stagger = steady_rate(open_or_create(spec, storage)[0])
    return steady, overall, stagger, wall


def bookkeeping(name: str, storage: str, tracking: str | None, trials: int,
                objective: Any, models: str = "none") -> float:
    """Median ms per trial of the loop in this process (after one warm-up trial)."""
    from sweeper.tracking.tracker import MlflowTracker

    spec = config.loads(STUDY.format(name=name, trials=trials + 1, epochs=1, models=models))
    tracker = MlflowTracker(tracking) if tracking else None
    worker = Worker(spec, RunOptions(storage=storage, device="cpu"), tracker=tracker,
                    objective=objective)
    if tracker is not None:
        tracker.check()
    worker.dataset(spec.dataset)
    study = open_or_create(spec, storage)[0]
    if tracker is not None:
        tracker.start_study(study, spec)
    times = []
    for _ in range(trials + 1):
        started = time.perf_counter()
        outcome = worker.run_trial(study)
        times.append(time.perf_counter() - started)
        assert outcome.state == "COMPLETE", outcome
    if tracker is not None:
        tracker.end_study(study, interrupted=False)
        assert not tracker.failures, tracker.failures
    return 1000 * statistics.median(times[1:])


def nothing(worker: Worker, trial: Any, cfg: Any, run: Any
            ) -> tuple[list[float], dict[str, float]]:
    if run is not None:
        run.log_epoch(1, {"train_loss": 1.0, "val_accuracy": 0.5})
    return [0.5], {"val_accuracy": 0.5}


@contextlib.contextmanager
def backends(root: Path) -> Iterator[list[tuple[str, str, str]]]:
    """(label, Optuna storage, tracking URI): the local default, then PostgreSQL + HTTP."""
    found = [("local", f"sqlite:///{root / 'optuna.db'}", f"sqlite:///{root / 'mlflow.db'}")]
    with contextlib.ExitStack() as stack:
        optuna_db = stack.enter_context(postgres_database())
        mlflow_db = stack.enter_context(postgres_database("postgresql+psycopg2"))
        if optuna_db and mlflow_db:
            (root / "server").mkdir()
            url = stack.enter_context(mlflow_server(root / "server", mlflow_db))
            found.append(("postgresql+http", optuna_db, url))
        else:
            print("(no PostgreSQL on 127.0.0.1:5432: local default only)")
        yield found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds per trial")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--trials-per-worker", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--bookkeeping-trials", type=int, default=20)
    args = parser.parse_args()
    os.environ[SLEEP_ENV] = str(args.sleep)
    n = args.trials_per_worker
    print(f"trial: sleeps {args.sleep:g} s in {args.epochs} epochs, logs each epoch; "
          f"{n} trials per worker")
    print(f"{'backend':<16} {'workers':>7} {'trials/s':>9} {'speed-up':>9} "
          f"{'overall/s':>10} {'start-up s':>11} {'wall s':>7}")
    with tempfile.TemporaryDirectory() as tmp, backends(Path(tmp)) as stores:
        worst = float("inf")
        for label, storage, tracking in stores:
            base = None
            for jobs in (1, args.jobs):
                steady, overall, stagger, wall = scaling(
                    f"scale-{label.split('+')[0]}-{jobs}", storage, tracking, jobs,
                    n * jobs, args.epochs)
                base = base or steady
                speedup = steady / base
                if jobs > 1:
                    worst = min(worst, speedup)
                print(f"{label:<16} {jobs:>7} {steady:>9.3f} {speedup:>8.2f}x "
                      f"{overall:>10.3f} {stagger:>11.1f} {wall:>7.1f}")
        print(f"worst speed-up with {args.jobs} workers: {worst:.2f}x (floor 3.5x)")
        print()
        print(f"bookkeeping per trial, one worker, median of {args.bookkeeping_trials}:")
        for label, storage, tracking in stores:
            tag = label.split("+")[0]
            off = bookkeeping(f"keep-off-{tag}", storage, None, args.bookkeeping_trials,
                              nothing)
            on = bookkeeping(f"keep-on-{tag}", storage, tracking, args.bookkeeping_trials,
                             nothing)
            real = bookkeeping(f"keep-real-{tag}", storage, tracking,
                               args.bookkeeping_trials, Worker.train, models="all")
            print(f"  {label:<16} empty trial: {off:6.1f} ms untracked, {on:6.1f} ms "
                  f"tracked; tiny real trial, everything logged: {real:6.1f} ms")


if __name__ == "__main__":
    main()
