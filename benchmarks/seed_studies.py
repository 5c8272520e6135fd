"""Run seed studies on the full dataset and print one line per epoch and per trial.

Each study runs as written (or with `--epochs N` fewer epochs, said in the output) into a
fresh SQLite storage, without tracking, on the CPU with `--threads` torch threads. Every
epoch line gives the training and validation accuracy so far; every trial line its
parameters, final validation and test accuracy, the training wall time and the load
average when it ended: the machine is shared, so a wall time means little without it.
`--where KEY=VALUE` keeps one value of a searched key (a grid point or a row of it), so a
long grid can be measured a part at a time.

    SWEEPER_DATA_DIR=/work/shared/data python benchmarks/seed_studies.py \\
        studies/seeds/models_lr_dnn.yaml --epochs 10
    SWEEPER_DATA_DIR=/work/shared/data python benchmarks/seed_studies.py \\
        studies/seeds/optimizers.yaml --epochs 3 --where train.lr=0.001
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from sweeper.search.study import RunOptions, run_study
from sweeper.spec import config


def narrowed(path: Path, where: list[str]) -> config.StudySpec:
    """The study in `path` with each `KEY=VALUE` of `where` as that key's only choice."""
    if not where:
        return config.load(path)
    data = yaml.safe_load(path.read_text())
    for item in where:
        key, _, value = item.partition("=")
        if key not in data.get("space", {}):
            raise SystemExit(f"{path}: --where {item}: {key} is not searched in its space")
        data["space"][key] = {"choice": [yaml.safe_load(value)]}
    return config.loads(yaml.safe_dump(data, sort_keys=False), file=str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--epochs", type=int, default=None, help="override budget.epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="keep only this value of a searched key (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = os.environ.get("SWEEPER_DATA_DIR")
    for path in args.files:
        spec = narrowed(path, args.where)
        if args.epochs is not None:
            spec.budget.epochs = args.epochs
        storage = f"sqlite:///{tempfile.mkdtemp()}/optuna.db"
        print(f"== {spec.name}: {spec.budget.epochs} epochs, {args.threads} thread(s)"
              + (f", {' '.join(args.where)}" if args.where else ""), flush=True)
        started = time.perf_counter()

        def progress(event: str, info: dict[str, Any], name: str = spec.name) -> None:
            if event == "epoch":
                m = info["metrics"]
                print(f"{name} trial {info['trial']} epoch {info['epoch']}/{info['epochs']}: "
                      f"train_accuracy {m['train_accuracy']:.4f} val_accuracy "
                      f"{m['val_accuracy']:.4f} val_loss {m['val_loss']:.4f} "
                      f"({m['epoch_seconds']:.0f}s, load {os.getloadavg()[0]:.1f})",
                      flush=True)
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
