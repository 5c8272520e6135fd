"""sweeper against the sweep a user writes by hand: same space, budget and images.

The work: TPE (seed 0) over lr, dropout, filter size 1/3/5 and batch 64/128/256 of the
classic MNIST ConvNet, `--trials` trials of `--epochs` epoch(s) on `--subset` training
images, 1,000 validation images (checked after every epoch) and the 10,000 test images
(evaluated once at the end of each trial).

  (a) the hand loop: `benchmarks/hand_loop.py`, Optuna `study.optimize` + optuna-integration's
      `MLflowCallback` + the torchvision Dataset/DataLoader tutorial loop;
  (b) sweeper: `sweeper run` on the same study, with its full tracking (params, per-epoch
      metrics, final validation and test metrics, figures, tables, the model).

Each is a fresh process with fresh SQLite stores, started `--repeats` times, interleaved
(a, b, b, a, a, b, ...), so that whatever else the machine does slows both alike; figures
are medians. Printed:

  - in loop: the median Optuna trial duration (ask to tell) and the ratio sweeper / hand;
  - whole process: launch to exit, and the ratio;
  - phases (median seconds per process): start-up = launch to the first training batch
    (imports, data, stores; includes `data`), data, train, validation (per epoch), final
    evaluation, tracking (time the main thread spends in it);
  - the load average before and after (the machine's other work shows there).

    SWEEPER_DATA_DIR=../shared/data .venv/bin/python benchmarks/vs_hand_loop.py
        [--repeats 3] [--trials 3] [--epochs 1] [--subset 10000]

Floors: in loop <= 0.75x the hand loop, whole process <= 1.0x (goal 0.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
N_VAL = 1000
PHASES = ("start-up", "data", "train", "validation", "final evaluation", "tracking")

STUDY = """\
name: vs-hand-loop
dataset: {{name: mnist, subset: {subset}, val_fraction: {val_fraction}, download: false}}
model: {{arch: cnn, channels: [32, 64]}}
train: {{optimizer: adam, batch_size: 128}}
budget: {{trials: {trials}, epochs: {epochs}}}
objective: {{metric: val_accuracy, direction: maximize}}
sampler: {{name: tpe, seed: 0}}
pruner: {{name: none}}
space:
  train.lr: {{float: [1.0e-4, 1.0e-1], log: true}}
  model.dropout: {{float: [0.0, 0.7]}}
  model.filter_size: {{choice: [1, 3, 5]}}
  train.batch_size: {{choice: [64, 128, 256]}}
"""


def main() -> None:
    args = _parse()
    data_dir = Path(args.data_dir).resolve()
    env = {**os.environ, "SWEEPER_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    python = sys.executable
    runs: dict[str, list[dict]] = {"hand loop": [], "sweeper": []}
    load_before = _load()
    print(f"{args.repeats} x {args.trials} trials x {args.epochs} epoch(s), {args.subset:,} "
          f"MNIST training images, {N_VAL:,} validation, 10,000 test | cpu cores: "
          f"{os.cpu_count()} | load average before: {load_before}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vs-hand-loop-") as tmp:
        split = Path(tmp, "split.json")
        split.write_text(json.dumps(_same_images(args.subset)))
        for repeat in range(args.repeats):
            order = ["hand loop", "sweeper"] if repeat % 2 == 0 else ["sweeper", "hand loop"]
            for who in order:
                work = Path(tmp, f"{who.replace(' ', '-')}-{repeat}")
                work.mkdir()
                phases = work / "phases.json"
                if who == "hand loop":
                    command = [python, str(HERE / "hand_loop.py"), "--data-dir",
                               str(data_dir), "--workdir", str(work), "--split", str(split),
                               "--trials", str(args.trials), "--epochs", str(args.epochs),
                               "--phases", str(phases)]
                else:
                    study = work / "study.yaml"
                    study.write_text(STUDY.format(subset=args.subset, trials=args.trials,
                                                  epochs=args.epochs,
                                                  val_fraction=N_VAL / 60000))
                    command = [python, str(HERE / "_sweeper_phases.py"), str(phases), "run",
                               str(study), "--storage", f"sqlite:///{work}/optuna.db",
                               "--tracking-uri", f"sqlite:///{work}/mlflow.db",
                               "--device", "cpu"]
                launched = time.time()
                started = time.perf_counter()
                done = subprocess.run(command, cwd=work, env=env, capture_output=True,
                                      text=True)
                wall = time.perf_counter() - started
                if done.returncode != 0:
                    sys.exit(f"{who} failed ({done.returncode}):\n{done.stdout}\n"
                             f"{done.stderr}")
                record = json.loads(phases.read_text())
                trials = _trial_seconds(work / "optuna.db")
                ph = record["phases"]
                if who == "sweeper":
                    ph["train"] = ph.pop("train+validation") - ph["validation"]
                ph["start-up"] = record["first_batch"] - launched
                runs[who].append({"wall": wall, "trials": trials, "phases": ph})
                print(f"  {who:9s} run {repeat + 1}: process {wall:6.2f} s, trials "
                      f"{', '.join(f'{t:.2f}' for t in trials)} s | load "
                      f"{_load()}", flush=True)
    _report(runs, load_before)


def _report(runs: dict[str, list[dict]], load_before: str) -> None:
    def trial_median(who: str) -> float:
        return statistics.median(t for run in runs[who] for t in run["trials"])

    def wall_median(who: str) -> float:
        return statistics.median(run["wall"] for run in runs[who])

    def phase_median(who: str, name: str) -> float:
        return statistics.median(run["phases"].get(name, 0.0) for run in runs[who])

    hand, ours = "hand loop", "sweeper"
    print()
    print(f"{'median seconds':24s} {'hand loop':>10s} {'sweeper':>10s} {'ratio':>7s}")
    rows = [("per trial, in loop", trial_median(hand), trial_median(ours)),
            ("whole process", wall_median(hand), wall_median(ours))]
    rows += [(f"  {name}", phase_median(hand, name), phase_median(ours, name))
             for name in PHASES]
    for label, a, b in rows:
        ratio = f"{b / a:6.2f}x" if a > 0.005 else "      -"
        print(f"{label:24s} {a:10.2f} {b:10.2f} {ratio}")
    print("phases: start-up = launch to the first training batch (includes data); "
          "validation = the per-epoch passes; tracking = main-thread time in MLflow calls")
    print(f"load average before: {load_before} | after: {_load()} "
          f"(1, 5, 15 min; this benchmark itself keeps about 2 cores busy)")
    in_loop = trial_median(ours) / trial_median(hand)
    whole = wall_median(ours) / wall_median(hand)
    print(f"sweeper / hand loop: in loop {in_loop:.2f}x (floor 0.75x, goal 0.5x), whole "
          f"process {whole:.2f}x (floor 1.0x)")


def _same_images(subset: int) -> dict[str, list[int]]:
    """The training and validation indices sweeper's study uses, for the hand loop too."""
    from sweeper.ml.data import _split_indices

    train, val = _split_indices(60000, N_VAL / 60000, subset, seed=0)
    return {"train": train.tolist(), "val": val.tolist()}


def _trial_seconds(database: Path) -> list[float]:
    """Each finished trial's Optuna duration (datetime_start to datetime_complete)."""
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT datetime_start, datetime_complete FROM trials "
                            "WHERE datetime_complete IS NOT NULL ORDER BY number").fetchall()
    return [(datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()
            for a, b in rows]


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_dir = os.environ.get("SWEEPER_DATA_DIR") or str(REPO.parent / "shared" / "data")
    parser.add_argument("--data-dir", default=default_dir,
                        help="folder with MNIST/raw/ (default $SWEEPER_DATA_DIR, else "
                             "../shared/data)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--subset", type=int, default=10000, help="training images")
    return parser.parse_args()


if __name__ == "__main__":
    main()
