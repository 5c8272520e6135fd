"""Database blips: transient errors retried with backoff, a lasting outage one line,
other errors untouched; a real SQLite storage's idempotent calls wrapped."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc

from sweeper.errors import StorageError
from sweeper.search import retrying
from sweeper.search.storage import open_storage


def dropped() -> Exception:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception(
        "server closed the connection unexpectedly"))


def test_transient_errors_are_retried_until_the_call_succeeds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrying, "FIRST_DELAY_S", 0.01)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise optuna.exceptions.StorageInternalError("commit failed") from dropped()
        return "done"

    assert retrying.retry(flaky, "test") == "done" and len(calls) == 3


def test_a_lasting_outage_is_one_storage_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrying, "FIRST_DELAY_S", 0.01)

    def down() -> None:
        raise dropped()

    with pytest.raises(StorageError, match=r"could not record trial 3: the Optuna storage did "
                                           r"not answer for \d+ s") as caught:
        retrying.retry(down, "record trial 3", window_s=0.2)
    assert "\n" not in str(caught.value)


def test_other_errors_and_a_full_disk_are_not_retried() -> None:
    calls = []

    def bad() -> None:
        calls.append(1)
        raise ValueError("Cannot tell a COMPLETE trial.")

    with pytest.raises(ValueError):
        retrying.retry(bad, "test")
    full = sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError(
        "database or disk is full"))
    assert not retrying.is_transient(full) and retrying.is_transient(dropped())
    assert len(calls) == 1


def test_a_retry_that_finds_the_first_attempt_landed_stops_there(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrying, "FIRST_DELAY_S", 0.01)
    attempts = []

    def lost_answer() -> str:
        attempts.append(1)
        raise dropped()  # the commit landed, the answer did not

    assert retrying.retry(lost_answer, "test", before_retry=lambda: "landed") == "landed"
    assert len(attempts) == 1


def test_open_storage_wraps_idempotent_calls(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}")
    assert getattr(storage.set_trial_user_attr, "_sweeper_retried", False)
    assert not getattr(storage.create_new_trial, "_sweeper_retried", False)
    assert not getattr(storage.set_trial_state_values, "_sweeper_retried", False)
