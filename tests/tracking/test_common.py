"""`tracking.common.racing`: a write that lost an insert race to another worker is tried
again and finds the row; any other error is not."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sweeper.tracking.common import is_unique_conflict, racing


def test_a_write_that_lost_an_insert_race_is_tried_again(tmp_path: Path) -> None:
    rows = sqlite3.connect(tmp_path / "rows.db")
    rows.execute("CREATE TABLE datasets (name TEXT UNIQUE)")
    attempts: list[str] = []

    def log_dataset(name: str) -> int:
        """Insert the row unless it exists, as MLflow's store does: look, then insert."""
        attempts.append(name)
        exists = rows.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone()
        if len(attempts) == 1:  # another worker inserts it between the look and the insert
            rows.execute("INSERT INTO datasets VALUES (?)", (name,))
        if not exists:
            rows.execute("INSERT INTO datasets VALUES (?)", (name,))
        return int(rows.execute("SELECT count(*) FROM datasets").fetchone()[0])

    assert racing(log_dataset, "mnist") == 1
    assert attempts == ["mnist", "mnist"]


def test_other_errors_are_not_tried_again() -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("Changing param values is not allowed")

    with pytest.raises(ValueError):
        racing(broken)
    assert calls == [1]
    assert is_unique_conflict(sqlite3.IntegrityError(
        "UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest"))
    assert is_unique_conflict(Exception(
        'duplicate key value violates unique constraint "dataset_pk"'))
