"""How fast the read side answers on a big study: `sweeper best` and `sweeper trials --limit
20` on a study of 2,000 trials (floor: 2 s each, the whole command, start-up included).

The study is written directly into the storage, shaped like what `sweeper run` leaves:
six params, ten intermediate values, the final metrics, the resolved config, the run id
and the model id of every trial (85% complete, 10% pruned, 5% failed). It is built on the
local SQLite default and, when PostgreSQL answers on 127.0.0.1:5432, in a fresh database
there (dropped afterwards).

    python benchmarks/query_scale.py [--trials 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

from _stores import postgres_database

from sweeper.keys import ATTR_CONFIG, ATTR_METRICS
from sweeper.search.study import open_or_create
from sweeper.spec import config

# TPE's `group` option is marked experimental; the warning says nothing about speed.
warnings.filterwarnings("ignore", message=r".*experimental feature.*")

STUDY = """
name: scale
dataset: {name: mnist}
budget: {trials: 100000, epochs: 10}
pruner: {name: median}
space:
  train.lr: {float: [1.0e-5, 1.0e-1], log: true}
  model.dropout: {float: [0.0, 0.9]}
  model.filter_size: {choice: [3, 5, 7]}
  train.batch_size: {choice: [32, 64, 128, 256]}
  train.optimizer: {choice: [sgd, adam, adamw]}
  model.padding: {choice: [valid, same]}
"""
LIMIT_S = 2.0


def build(storage: str, n: int) -> None:
    """`n` finished trials, added in batches of one transaction each."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    spec = config.loads(STUDY)
    study = open_or_create(spec, storage)[0]
    rng = random.Random(0)
    distributions = {
        "train.lr": FloatDistribution(1e-5, 1e-1, log=True),
        "model.dropout": FloatDistribution(0.0, 0.9),
        "model.filter_size": CategoricalDistribution([3, 5, 7]),
        "train.batch_size": CategoricalDistribution([32, 64, 128, 256]),
        "train.optimizer": CategoricalDistribution(["sgd", "adam", "adamw"]),
        "model.padding": CategoricalDistribution(["valid", "same"]),
    }
    trials = []
    for _ in range(n):
        params = {k: (d.choices[rng.randrange(len(d.choices))]
                      if isinstance(d, CategoricalDistribution)
                      else rng.uniform(d.low, d.high)) for k, d in distributions.items()}
        roll = rng.random()
        state = (optuna.trial.TrialState.COMPLETE if roll < 0.85 else
                 optuna.trial.TrialState.PRUNED if roll < 0.95 else
                 optuna.trial.TrialState.FAIL)
        accuracy = rng.uniform(0.9, 0.995)
        curve = {epoch: accuracy * (1 - 0.5 ** epoch) for epoch in range(1, 11)}
        metrics = {f"{split}_{name}": rng.random() for split in ("val", "test")
                   for name in ("accuracy", "loss", "f1_macro", "f1_weighted",
                                "precision_macro", "recall_macro", "auc_macro", "auc_micro")}
        metrics["val_accuracy"] = accuracy
        # As sweeper writes them: ids as user attrs, its records as system attrs.
        attrs = {"mlflow_run_id": uuid.uuid4().hex, "mlflow_model_id": f"m-{uuid.uuid4().hex}"}
        records = {ATTR_METRICS: metrics,
                   ATTR_CONFIG: {**{f"dataset.{k}": 0 for k in range(8)}, **params,
                                 "epochs": 10}}
        if state != optuna.trial.TrialState.COMPLETE:
            attrs["fail_reason"] = "pruned at epoch 3" if roll < 0.95 else "diverged"
        trials.append(optuna.trial.create_trial(
            state=state, value=accuracy if state == optuna.trial.TrialState.COMPLETE else None,
            params=params, distributions=distributions, user_attrs=attrs,
            system_attrs=records, intermediate_values=curve))
    study.add_trials(trials)


def timed(command: list[str], repeat: int) -> float:
    """Median wall time of the whole command, start-up included."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sweeper = [sys.executable, "-m", "sweeper.cli"]
    with tempfile.TemporaryDirectory() as tmp, postgres_database() as pg:
        storages = {"sqlite": f"sqlite:///{Path(tmp) / 'optuna.db'}"}
        if pg is not None:
            storages["postgresql"] = pg
        print(f"study of {args.trials:,} trials; median of {args.repeat} runs of the whole "
              f"command (floor {LIMIT_S:.0f} s)")
        print(f"{'storage':<11} {'build s':>8} {'best s':>7} {'trials --limit 20 s':>20} "
              f"{'--help s':>9}")
        worst = 0.0
        for name, url in storages.items():
            started = time.perf_counter()
            build(url, args.trials)
            built = time.perf_counter() - started
            best = timed([*sweeper, "best", "scale", "--storage", url], args.repeat)
            listed = timed([*sweeper, "trials", "scale", "--sort", "value", "--limit", "20",
                            "--storage", url], args.repeat)
            baseline = timed([*sweeper, "--help"], args.repeat)
            worst = max(worst, best, listed)
            print(f"{name:<11} {built:>8.1f} {best:>7.2f} {listed:>20.2f} {baseline:>9.2f}")
        print(f"slowest answer: {worst:.2f} s (floor {LIMIT_S:.0f} s)")


if __name__ == "__main__":
    main()
