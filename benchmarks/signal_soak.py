"""Signals at random moments: `sweeper run` on a tiny study with the default local stores
(SQLite for both), interrupted by SIGINT or SIGTERM at a random moment of its life, again
and again. Counts what was left RUNNING in Optuna and in MLflow (goal: 0 of each), the exit
codes (goal: 130 or 143, or 0 when the study ended first) and how long each took to stop.

    python benchmarks/signal_soak.py [--runs 100] [--sweeper .venv/bin/sweeper] [--seed 0]

`--sweeper` may point at another checkout's console script, to compare. The stores are read
with plain SQL, so that any version can be counted the same way. Each run starts from a
copy of an empty MLflow store made once (creating its tables takes seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

STUDY = """
name: soak
dataset: {name: synthetic, synthetic: {train_size: 64, test_size: 32, image_size: 8}}
model: {arch: mlp, hidden: [8]}
train: {batch_size: 32}
budget: {trials: 4, epochs: 2}
sampler: {name: random, seed: 0}
space:
  train.lr: {float: [1.0e-3, 3.0e-2], log: true}
"""


def count(db: Path, sql: str) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return int(conn.execute(sql).fetchone()[0])
        except sqlite3.OperationalError:  # no tables yet: nothing was written
            return 0


def one_run(sweeper: str, root: Path, template: Path, delay: float, sig: signal.Signals
            ) -> dict[str, object]:
    (root / "mlruns").mkdir(parents=True)
    shutil.copy(template, root / "mlruns" / "mlflow.db")
    (root / "soak.yaml").write_text(STUDY)
    env = {k: v for k, v in os.environ.items()
           if k not in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI")}
    process = subprocess.Popen([sweeper, "run", "soak.yaml", "--device", "cpu"], cwd=root,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    time.sleep(delay)
    sent = time.monotonic()
    process.send_signal(sig)
    try:
        _, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    stopped_s = time.monotonic() - sent
    return {
        "signal": sig.name, "delay_s": round(delay, 2), "exit": process.returncode,
        "stop_s": round(stopped_s, 1),
        "trials_running": count(root / "mlruns" / "optuna.db",
                                "SELECT count(*) FROM trials WHERE state = 'RUNNING'"),
        "runs_running": count(root / "mlruns" / "mlflow.db",
                              "SELECT count(*) FROM runs WHERE status = 'RUNNING'"),
        "traceback": "Traceback" in err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--sweeper", default=str(Path(".venv/bin/sweeper").resolve()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=0.0,
                        help="latest moment to signal [default: a full run's time, measured]")
    parser.add_argument("--json", type=Path, help="write every run's record here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="sweeper-soak-") as tmp:
        base = Path(tmp)
        template = base / "template.db"
        from mlflow import MlflowClient

        MlflowClient(f"sqlite:///{template}").search_experiments(max_results=1)
        max_delay = args.max_delay
        if not max_delay:  # one uninterrupted run: the span to signal in
            started = time.monotonic()
            root = base / "whole"
            (root / "mlruns").mkdir(parents=True)
            shutil.copy(template, root / "mlruns" / "mlflow.db")
            (root / "soak.yaml").write_text(STUDY)
            subprocess.run([args.sweeper, "run", "soak.yaml", "--device", "cpu"], cwd=root,
                           capture_output=True, check=False)
            max_delay = time.monotonic() - started
        print(f"load {Path('/proc/loadavg').read_text().split()[:3]}; signalling within "
              f"{max_delay:.1f} s of the start", flush=True)
        records = []
        for index in range(args.runs):
            sig = rng.choice([signal.SIGINT, signal.SIGTERM])
            record = one_run(args.sweeper, base / f"run{index}", template,
                             rng.uniform(0.5, max_delay), sig)
            records.append(record)
            print(json.dumps(record), flush=True)
            shutil.rmtree(base / f"run{index}", ignore_errors=True)
    left = sum(int(r["trials_running"]) for r in records)
    runs = sum(int(r["runs_running"]) for r in records)
    torn = [r for r in records if r["trials_running"] or r["runs_running"]]
    codes: dict[str, int] = {}
    for r in records:
        codes[str(r["exit"])] = codes.get(str(r["exit"]), 0) + 1
    stops = [float(r["stop_s"]) for r in records]
    print(f"{len(records)} runs: {left} trial(s) and {runs} run(s) left RUNNING "
          f"(in {len(torn)} runs); exit codes {codes}; "
          f"{sum(bool(r['traceback']) for r in records)} traceback(s); time to stop: median "
          f"{statistics.median(stops):.1f} s, max {max(stops):.1f} s; load "
          f"{Path('/proc/loadavg').read_text().split()[:3]}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
