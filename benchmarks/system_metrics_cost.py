"""What system metrics cost a trial: one reading (psutil calls), one reading's upload to a
local SQLite store, and the same tracked trial with system metrics off, at the default
interval and at a 0.2 s interval, interleaved (median of `--repeats`).

    SWEEPER_DATA_DIR=../shared/data python benchmarks/system_metrics_cost.py [--repeats 3]

The trial: the default ConvNet, 1 epoch on 5,000 MNIST images, tracked on a local store.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from sweeper.search.study import RunOptions, run_study
from sweeper.spec import config
from sweeper.tracking import MlflowTracker, system_metrics

STUDY = """
name: sysmetrics-{mode}-{index}
dataset: {{name: mnist, subset: 5000, test_subset: 1000}}
model: {{arch: cnn}}
budget: {{trials: 1, epochs: 1}}
sampler: {{name: random, seed: 0}}
models: none
"""
MODES = {"off": None, "default": str(system_metrics.DEFAULT_INTERVAL_S), "0.2s": "0.2"}


def reading_cost(n: int = 200) -> tuple[float, float]:
    """(wall ms, CPU ms) of one reading, median / mean over `n`."""
    system_metrics.sample("cpu")
    walls = []
    cpu_start = time.process_time()
    for _ in range(n):
        started = time.perf_counter()
        system_metrics.sample("cpu")
        walls.append(time.perf_counter() - started)
    return statistics.median(walls) * 1e3, (time.process_time() - cpu_start) / n * 1e3


def upload_cost(root: Path, n: int = 50) -> float:
    """Median ms of one reading's `log_batch` to a local SQLite store."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(f"sqlite:///{root / 'upload.db'}")
    run = client.create_run(client.create_experiment("upload"))
    reading = {f"system/{k}": v for k, v in system_metrics.sample("cpu").items()}
    times = []
    for step in range(n):
        metrics = [Metric(k, v, int(time.time() * 1000), step) for k, v in reading.items()]
        started = time.perf_counter()
        client.log_batch(run.info.run_id, metrics=metrics)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def trial_seconds(mode: str, index: int, root: Path) -> float:
    interval = MODES[mode]
    if interval is None:
        os.environ[system_metrics.ENABLE_ENV] = "false"
        os.environ.pop(system_metrics.INTERVAL_ENV, None)
    else:
        os.environ.pop(system_metrics.ENABLE_ENV, None)
        os.environ[system_metrics.INTERVAL_ENV] = interval
    spec = config.loads(STUDY.format(mode=mode.replace(".", ""), index=index))
    tracker = MlflowTracker(f"sqlite:///{root / 'mlflow.db'}")
    report = run_study(spec, RunOptions(storage=f"sqlite:///{root / 'optuna.db'}",
                                        device="cpu"), tracker=tracker)
    return report.outcomes[0].seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    wall_ms, cpu_ms = reading_cost()
    print(f"one reading: {wall_ms:.2f} ms wall, {cpu_ms:.2f} ms CPU "
          f"({cpu_ms / (system_metrics.DEFAULT_INTERVAL_S * 1e3) * 100:.3f}% of one core at "
          f"the default {system_metrics.DEFAULT_INTERVAL_S:g} s interval)")
    with tempfile.TemporaryDirectory(prefix="sysmetrics-") as tmp:
        root = Path(tmp)
        print(f"one reading's upload (log_batch, local SQLite, background thread): "
              f"{upload_cost(root):.2f} ms")
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        trial_seconds("off", -1, root)  # warm-up: imports, data cache, store creation
        for index in range(args.repeats):
            for mode in MODES:
                times[mode].append(trial_seconds(mode, index, root))
    base = statistics.median(times["off"])
    for mode, values in times.items():
        median = statistics.median(values)
        print(f"trial, system metrics {mode:>7}: median {median:.2f} s "
              f"({median / base:.3f}x off)  all: {', '.join(f'{v:.2f}' for v in values)}")
    print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
