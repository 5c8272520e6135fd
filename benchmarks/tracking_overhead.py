"""What tracking costs a trial: the same trial with tracking off, on the local SQLite store,
and over HTTP to a real `mlflow server`, measured in one run (floor: <= 5% of trial time).

The trial: the default ConvNet, 1 epoch on a 10,000-image MNIST subset, `models: all`
(every trial logs its model, plots, tables and per-epoch metrics).

    SWEEPER_DATA_DIR=../shared/data python benchmarks/tracking_overhead.py [--trials 3]

Each mode runs the same trials (same config, same seed) in a fresh study, interleaved; the
first trial of each mode is a warm-up (lazy imports, store creation) and not counted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _stores import mlflow_server

from sweeper.search.study import RunOptions, Worker, open_or_create
from sweeper.spec import config
from sweeper.tracking.tracker import MlflowTracker

STUDY = """
name: overhead-{mode}
dataset: {{name: mnist, subset: 10000}}
model: {{arch: cnn}}
budget: {{trials: 100, epochs: 1}}
sampler: {{name: random, seed: 0}}
models: all
"""


class Mode:
    """One study (tracking off, local or HTTP) whose trials are timed."""

    def __init__(self, mode: str, tracking_uri: str | None, root: Path,
                 data_dir: str | None) -> None:
        self.spec = config.loads(STUDY.format(mode=mode))
        options = RunOptions(storage=f"sqlite:///{root / f'optuna-{mode}.db'}", device="cpu",
                             data_dir=Path(data_dir) if data_dir else None)
        self.tracker = MlflowTracker(tracking_uri) if tracking_uri else None
        self.worker = Worker(self.spec, options, tracker=self.tracker)
        self.worker.dataset(self.spec.dataset)
        self.study = open_or_create(self.spec, options.storage)[0]
        if self.tracker is not None:
            self.tracker.check()
            self.tracker.start_study(self.study, self.spec)
        self.seconds: list[float] = []
        self.inside: list[float] = []  # seconds spent in tracker calls, per trial

    def trial(self) -> None:
        before = self.tracked_seconds()
        started = time.perf_counter()
        outcome = self.worker.run_trial(self.study)
        self.seconds.append(time.perf_counter() - started)
        self.inside.append(self.tracked_seconds() - before)
        assert outcome.state == "COMPLETE", outcome
        if self.tracker is not None:
            assert not self.tracker.failures, self.tracker.failures

    def tracked_seconds(self) -> float:
        return sum(self.tracker.overhead().values()) if self.tracker is not None else 0.0

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.end_study(self.study, interrupted=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with mlflow_server(root, port=args.port) as url:
            modes = {
                "off": None,
                "sqlite": f"sqlite:///{root / 'mlflow.db'}",
                "http": url,
            }
            runs = {mode: Mode(mode, uri, root, args.data_dir) for mode, uri in modes.items()}
            # Interleaved, so that whatever else the machine does slows every mode alike.
            for _ in range(args.trials + 1):
                for run in runs.values():
                    run.trial()
            for run in runs.values():
                run.close()
            results = {mode: run.seconds[1:] for mode, run in runs.items()}
            inside = {mode: run.inside[1:] for mode, run in runs.items()}
    base = statistics.median(results["off"])
    print(f"trial: default cnn, 1 epoch on 10,000 MNIST images, models: all; "
          f"median of {args.trials} trials after a warm-up")
    # Two views of the same cost: the wall-time difference against tracking off (what a
    # user sees, but noisy on a shared machine) and the time spent inside tracker calls
    # (the training thread blocked on MLflow; background uploads overlap training).
    print(f"{'tracking':<10} {'trial s':>8} {'overhead s':>11} {'overhead %':>11} "
          f"{'in tracker s':>13} {'in tracker %':>13}")
    for mode, seconds in results.items():
        median = statistics.median(seconds)
        tracked = statistics.median(inside[mode])
        print(f"{mode:<10} {median:>8.2f} {median - base:>11.2f} "
              f"{100 * (median - base) / median:>10.1f}% {tracked:>13.3f} "
              f"{100 * tracked / median:>12.1f}%")
    tracked_modes = [m for m in results if m != "off"]
    wall = max(100 * (statistics.median(results[m]) - base) / statistics.median(results[m])
               for m in tracked_modes)
    blocked = max(100 * statistics.median(inside[m]) / statistics.median(results[m])
                  for m in tracked_modes)
    print(f"worst tracking overhead: {wall:.1f}% of trial wall time, {blocked:.1f}% blocked "
          f"in the tracker (floor 5%)")


if __name__ == "__main__":
    main()
