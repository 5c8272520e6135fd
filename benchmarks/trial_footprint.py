"""What one trial leaves in MLflow: artifact bytes (its run's files, its model, both), the
metric keys of its run and the metric points it logged; and what the study's parent run
holds. Runs the README's quick start study (real MNIST), shortened, on a fresh local store.

    SWEEPER_DATA_DIR=../shared/data python benchmarks/trial_footprint.py [--trials 3]

It uses whichever `sweeper` Python imports, so the same script measures another checkout
(`PYTHONPATH=/path/to/other/checkout python benchmarks/trial_footprint.py`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

import sweeper
from sweeper.search.study import RunOptions, run_study
from sweeper.spec import config
from sweeper.tracking import MlflowTracker

REPO = Path(__file__).resolve().parents[1]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def local_path(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    raw = yaml.safe_load((REPO / "studies" / "quickstart.yaml").read_text())
    raw["budget"] = {"trials": args.trials, "epochs": args.epochs}
    raw["pruner"] = {"name": "none"}
    raw["models"] = "all"
    spec = config.loads(yaml.safe_dump(raw))
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        tracker = MlflowTracker(uri)
        run_study(spec, RunOptions(storage=f"sqlite:///{root / 'optuna.db'}"),
                  tracker=tracker)
        client = tracker.client
        experiment = client.get_experiment_by_name(spec.name)
        runs = client.search_runs([experiment.experiment_id])
        trials = [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]
        parent = next(r for r in runs if r.data.tags.get("sweeper.role") == "parent")
        run_bytes, model_bytes, keys, points = [], [], [], []
        for run in trials:
            run_bytes.append(folder_bytes(local_path(run.info.artifact_uri)))
            outputs = client.get_run(run.info.run_id).outputs.model_outputs
            model_bytes.append(sum(folder_bytes(local_path(
                client.get_logged_model(o.model_id).artifact_location)) for o in outputs))
            keys.append(len(run.data.metrics))
            points.append(sum(len(client.get_metric_history(run.info.run_id, k))
                              for k in run.data.metrics))
        print(f"sweeper {getattr(sweeper, '__file__', '?')}")
        print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        print(f"{len(trials)} trials x {args.epochs} epochs, quick start study")
        print(f"artifact bytes per trial run (median): {statistics.median(run_bytes):,.0f}")
        print(f"model bytes per trial (median):        {statistics.median(model_bytes):,.0f}")
        both = [a + b for a, b in zip(run_bytes, model_bytes, strict=True)]
        print(f"both per trial (median):               {statistics.median(both):,.0f}")
        print(f"parent run artifact bytes:             "
              f"{folder_bytes(local_path(parent.info.artifact_uri)):,.0f}")
        print(f"metric keys per trial run: {sorted(set(keys))}; "
              f"metric points per trial run (median): {statistics.median(points):.0f}")
        print("metric keys of one trial run:", ", ".join(sorted(trials[0].data.metrics)))


if __name__ == "__main__":
    main()
