"""SQLite shared by several worker processes: the default local stores (`mlruns/optuna.db`,
`mlruns/mlflow.db`) with no "database is locked" failures.

Two things go wrong when processes share one SQLite file, and each has its remedy here:

- **Read, then write.** Python's sqlite3 opens a transaction only at the first write, so
  what a transaction read before it wrote may have changed by then: two workers that both
  see a lost trial as RUNNING would both fail it and re-queue it twice (and a transaction
  that does hold a read lock when it writes can get "database is locked" at once, without
  waiting, where SQLite sees a deadlock). `serialize_transactions` makes every
  transaction of the Optuna storage begin with `BEGIN IMMEDIATE`: it takes the write lock
  up front, so it reads and writes atomically, and it *waits* for the lock (up to the
  busy timeout) instead of failing. Trials spend seconds training and milliseconds in the
  database, so the queueing costs nothing measurable. (MLflow's store keeps its own
  20 s busy timeout, and a tracking call that still fails is a warning, never a lost
  trial.)
- **Schema creation.** Workers that start together on a fresh file would all create the
  tables and run the migrations at once. `creation_lock` lets one process at a time do it
  (a lock on the database's folder).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

def serialize_transactions(engine: Engine) -> None:
    """Begin every transaction of `engine` (a SQLite one) with `BEGIN IMMEDIATE`.

    Only for an engine that never holds one connection's transaction open while another of
    its connections in the same process writes: Optuna's, once created (one scoped session
    per thread). Its schema check at creation nests connections, and so do MLflow's stores:
    those would wait on themselves, so they keep SQLite's default transactions.
    """
    from sqlalchemy import event

    event.listen(engine, "begin", _begin_immediate)


def _begin_immediate(conn: Connection) -> None:
    dbapi = conn.connection.dbapi_connection
    # pysqlite would otherwise open its own (deferred) transaction before the first write;
    # with isolation_level None it leaves BEGIN to us, and commit()/rollback() still end it.
    dbapi.isolation_level = None  # type: ignore[union-attr]
    conn.exec_driver_sql("BEGIN IMMEDIATE")


@contextlib.contextmanager
def creation_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder of the database file `path` (created if
    needed): one process at a time creates or migrates it.

    The folder, not the file: SQLite's own locks on the file are dropped when the process
    closes *any* descriptor of it, and a lock file of our own would clutter `mlruns/`. A
    no-op where POSIX file locks do not exist.
    """
    folder = Path(path).expanduser().parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no concurrent local workers there
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
