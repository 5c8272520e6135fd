"""Several writers on one SQLite file, as local workers share `mlruns/optuna.db`."""

from __future__ import annotations

import threading
from pathlib import Path

import sqlalchemy

from sweeper.search import sqlite
from sweeper.search.storage import open_storage


def test_read_then_write_transactions_lose_no_update(tmp_path: Path) -> None:
    """Four connections each add 1 to a counter 100 times, reading it first: with plain
    sqlite3 transactions some increments are lost (both read the same value); serialized,
    every one counts and none fails with "database is locked"."""
    url = f"sqlite:///{tmp_path / 'counter.db'}"
    with sqlalchemy.create_engine(url).begin() as conn:
        conn.exec_driver_sql("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER)")
        conn.exec_driver_sql("INSERT INTO counter VALUES (1, 0)")
    errors: list[str] = []

    def add_many() -> None:
        engine = sqlalchemy.create_engine(url, connect_args={"timeout": 30})
        sqlite.serialize_transactions(engine)
        for _ in range(100):
            try:
                with engine.begin() as conn:
                    n = conn.exec_driver_sql("SELECT n FROM counter").scalar()
                    conn.exec_driver_sql(f"UPDATE counter SET n = {n + 1}")
            except sqlalchemy.exc.OperationalError as exc:
                errors.append(str(exc).splitlines()[0])

    threads = [threading.Thread(target=add_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with sqlalchemy.create_engine(url).connect() as conn:
        total = conn.exec_driver_sql("SELECT n FROM counter").scalar()
    assert errors == []
    assert total == 400


def test_optuna_storage_on_sqlite_is_serialized_and_created_once(tmp_path: Path) -> None:
    path = tmp_path / "optuna.db"
    storage = open_storage(f"sqlite:///{path}")
    with storage.engine.connect() as conn:
        # BEGIN IMMEDIATE holds the write lock: a second connection cannot start writing.
        conn.exec_driver_sql("SELECT 1")
        other = sqlalchemy.create_engine(f"sqlite:///{path}",
                                         connect_args={"timeout": 0.1})
        try:
            with other.connect() as second:
                second.exec_driver_sql("BEGIN IMMEDIATE")
            raise AssertionError("a second writer got the lock")
        except sqlalchemy.exc.OperationalError as exc:
            assert "locked" in str(exc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.db"]  # no lock files


def test_creation_lock_is_exclusive_between_processes(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from sweeper.search import sqlite\n"
            "with sqlite.creation_lock(sys.argv[1]):\n    print('got it')\n")
    with sqlite.creation_lock(tmp_path / "x.db"):
        waiting = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "x.db")],
                                   stdout=subprocess.PIPE, text=True)
        try:
            waiting.wait(timeout=1.5)
            raise AssertionError("another process took the lock while it was held")
        except subprocess.TimeoutExpired:
            pass
    out, _ = waiting.communicate(timeout=30)
    assert out.strip() == "got it"
