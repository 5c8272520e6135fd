"""Run seed studies on the full dataset and print one line per trial for the README table.

Each study runs as written (or with `--epochs N` fewer epochs, said in the output) into a
fresh SQLite storage, without tracking, on the CPU with `--threads` torch threads. Every
line gives the trial's parameters, its final validation and test accuracy, the training
wall time and the load average when it ended: the machine is shared, so a wall time means
little without it.

    SWEEPER_DATA_DIR=/work/shared/data python benchmarks/seed_studies.py \\
        studies/seeds/models_lr_dnn.yaml --epochs 10
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from sweeper.search.study import RunOptions, run_study
from sweeper.spec import config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--epochs", type=int, default=None, help="override budget.epochs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = os.environ.get("SWEEPER_DATA_DIR")
    for path in args.files:
        spec = config.load(path)
        if args.epochs is not None:
            spec.budget.epochs = args.epochs
        storage = f"sqlite:///{tempfile.mkdtemp()}/optuna.db"
        print(f"== {spec.name}: {spec.budget.epochs} epochs, {args.threads} thread(s)",
              flush=True)
        started = time.perf_counter()

        def progress(event: str, info: dict[str, object], name: str = spec.name) -> None:
            outcome = info.get("outcome")
            if event != "trial" or outcome is None:
                return
            m = getattr(outcome, "metrics", {})
            print(f"{name} trial {getattr(outcome, 'number', '?')} "
                  f"{getattr(outcome, 'params', {})} {getattr(outcome, 'state', '?')}: "
                  f"val_accuracy {m.get('val_accuracy', float('nan')):.4f} test_accuracy "
                  f"{m.get('test_accuracy', float('nan')):.4f} seconds "
                  f"{getattr(outcome, 'seconds', 0.0):.0f} load {os.getloadavg()[0]:.1f}",
                  flush=True)

        report = run_study(spec, RunOptions(storage=storage, device="cpu",
                                            data_dir=Path(data_dir) if data_dir else None),
                           progress=progress)
        print(f"stopped by {report.stopped_by}", flush=True)
        print(f"== {spec.name}: {time.perf_counter() - started:.0f}s wall, load "
              f"{os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
