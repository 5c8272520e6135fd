"""A store written by release 0.1.0 opens unchanged.

`tests/data/old_store/` holds what `sweeper run old-store.yaml --device cpu` of release
0.1.0 wrote into `mlruns/` (the Optuna and MLflow SQLite stores and the artifacts of two
one-epoch trials; left out: the parent run's four plotly pages, 2 MB each, which no command
reads back), and what that release's read commands printed about it (`*.out`, `*.json`,
with `TZ=UTC`). Today's code must read the same store and print the same, load its models and
resume its study. MLflow records artifact locations as absolute paths: the store was
written in `WRITTEN_AT`, and the copy each test uses is moved as a person moving the folder
would have to (the paths rewritten, nothing else).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

OLD = Path(__file__).resolve().parent / "data" / "old_store"
WRITTEN_AT = "/tmp/sweeper-old-store"
STUDY = "old-store"


def move_store(database: Path, old: str, new: str) -> int:
    """Rewrite the absolute prefix `old` as `new` in every text column of an SQLite
    database (MLflow's artifact locations); returns how many values changed."""
    changed = 0
    with sqlite3.connect(database) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for column in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                name, kind = column[1], (column[2] or "").upper()
                if not any(t in kind for t in ("CHAR", "TEXT", "CLOB")):
                    continue
                changed += db.execute(
                    f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) '
                    f'WHERE "{name}" LIKE ?', (old, new, f"%{old}%")).rowcount
    return changed


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    """A copy of the release's store in a fresh folder (the working directory of every
    command below: the default stores are `mlruns/` there)."""
    shutil.copytree(OLD / "mlruns", tmp_path / "mlruns")
    shutil.copy(OLD / "old-store.yaml", tmp_path / "old-store.yaml")
    assert move_store(tmp_path / "mlruns" / "mlflow.db", WRITTEN_AT, str(tmp_path)) > 0
    return tmp_path


def sweeper(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI", "COLUMNS")}
    env["TZ"] = "UTC"  # the release's outputs show times as UTC
    return subprocess.run([sys.executable, "-m", "sweeper.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_the_stored_files_are_the_release_s() -> None:
    """The fixture is small and whole: both databases and each trial's model files."""
    files = [p for p in (OLD / "mlruns").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2_000_000
    names = {p.name for p in files}
    assert {"optuna.db", "mlflow.db", "MLmodel", "weights.safetensors"} <= names
    with sqlite3.connect(OLD / "mlruns" / "optuna.db") as db:
        states = sorted(r[0] for r in db.execute("SELECT state FROM trials"))
    assert states == ["COMPLETE", "COMPLETE"]


@pytest.mark.parametrize("args, printed", [
    (["studies"], "studies.out"),
    (["trials", STUDY], "trials.out"),
    (["trials", STUDY, "--json"], "trials.json"),
    (["best", STUDY], "best.out"),
    (["best", STUDY, "--json"], "best.json"),
])
def test_read_commands_print_what_the_release_printed(old_store: Path, args: list[str],
                                                      printed: str) -> None:
    done = sweeper(old_store, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    # Only where the store lies differs (an absolute tracking URI, say).
    assert done.stdout == (OLD / printed).read_text().replace(WRITTEN_AT, str(old_store))


def test_the_best_model_loads_and_predicts(old_store: Path) -> None:
    import torch

    import sweeper

    # Absolute URLs: this process has opened other stores under the relative default.
    stores = {"storage": f"sqlite:///{old_store / 'mlruns' / 'optuna.db'}",
              "tracking_uri": f"sqlite:///{old_store / 'mlruns' / 'mlflow.db'}"}
    best = sweeper.best_trial(STUDY, **stores)
    released = json.loads((OLD / "best.json").read_text().splitlines()[0])
    assert best.number == released["number"] and best.run_id == released["run_id"]
    model = sweeper.load_model(best, tracking_uri=stores["tracking_uri"])
    with torch.no_grad():
        logits = model(torch.zeros(3, 1, 8, 8))
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()  # 4 synthetic classes


@pytest.mark.slow  # seconds of training or a fresh interpreter: run with `pytest -m slow`
def test_the_pyfunc_the_release_logged_still_serves(old_store: Path) -> None:
    """Each logged model's `MLmodel` names `sweeper.serving` as its loader: it must stay."""
    mlmodel = next((old_store / "mlruns").rglob("MLmodel")).read_text()
    assert re.search(r"loader_module: sweeper\.serving\b", mlmodel), mlmodel
    code = ("import sys, numpy as np, mlflow.pyfunc\n"
            "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
            "out = m.predict(np.zeros((2, 8, 8), dtype=np.uint8))\n"
            "print(out['probabilities'].shape, out['label'].shape)\n")
    model_dir = next((old_store / "mlruns").rglob("MLmodel")).parent
    done = subprocess.run([sys.executable, "-c", code, str(model_dir)], cwd=old_store,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "(2, 4) (2,)" in done.stdout


@pytest.mark.slow  # seconds of training or a fresh interpreter: run with `pytest -m slow`
def test_evaluate_matches_what_was_logged(old_store: Path) -> None:
    done = sweeper(old_store, "evaluate", STUDY, "--json", "--device", "cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    now = json.loads(done.stdout)
    then = json.loads((OLD / "evaluate.json").read_text().replace(WRITTEN_AT, str(old_store)))
    assert now["matches"] is True and now["number"] == then["number"]
    # Scored again from the same weights and data: the same numbers, up to float noise
    # on another CPU.
    assert now["logged"] == then["logged"]
    assert now["test"] == pytest.approx(then["test"], rel=1e-5, abs=1e-6)


@pytest.mark.slow  # seconds of training or a fresh interpreter: run with `pytest -m slow`
def test_the_study_resumes_and_reap_finds_nothing_to_do(old_store: Path) -> None:
    done = sweeper(old_store, "run", "old-store.yaml", "--trials", "1", "--device", "cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    listed = sweeper(old_store, "trials", STUDY, "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["number"] for r in rows] == [0, 1, 2]
    assert all(r["values"] and r["model_uri"] for r in rows)  # all three complete, logged
    reaped = sweeper(old_store, "reap", STUDY)
    assert reaped.returncode == 0, reaped.stdout + reaped.stderr
