"""Where Optuna keeps studies: the URL, and an RDB storage tuned for long trials.

Defaults to SQLite under `mlruns/`; `--storage` or `SWEEPER_STORAGE` points elsewhere
(PostgreSQL when several machines share a study).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sweeper.errors import StorageError
from sweeper.redaction import redact_text, redact_url
from sweeper.search import retrying, sqlite
from sweeper.uris import STORAGE_ENV, sqlalchemy_url, sqlite_path

if TYPE_CHECKING:
    import optuna

OPEN_RETRY_S = 5.0  # how long opening a storage rides out a blip before it says why


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy settings per backend.

    SQLite: wait up to 60 s for a lock instead of failing at once, so local workers that
    write at the same moment queue up. Servers: pre-ping pooled connections so one that
    idled through a long trial (or was dropped by a firewall) is replaced rather than
    failing the trial's `tell`, and recycle them every 30 minutes. A worker uses two
    connections (its loop and its trial's heartbeat), four at most: PostgreSQL's default
    `max_connections` of 100 serves about 25 workers at their worst, 50 as they run.
    """
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2, "pool_recycle": 1800}


def open_storage(url: str, *, read_only: bool = False) -> optuna.storages.RDBStorage:
    """Connect (creating the schema if needed); an unreachable store is one clear line.
    Calls that can run twice are retried through a database blip (`retrying.harden`).

    `read_only` skips creating tables and checking the schema version (a third of a
    second, most of what a `sweeper best` would otherwise spend in the database)."""
    import optuna
    import sqlalchemy.exc

    database = sqlite_path(url)
    try:
        if database is None or read_only:
            try:  # a blip is ridden out; a store that is down is said at once (5 s)
                return retrying.harden(retrying.retry(
                    lambda: optuna.storages.RDBStorage(
                        sqlalchemy_url(url), engine_kwargs=engine_kwargs(url),
                        skip_compatibility_check=read_only, skip_table_creation=read_only),
                    f"open Optuna storage {redact(url)}", window_s=OPEN_RETRY_S))
            except StorageError as exc:
                if exc.__cause__ is None:
                    raise
                raise exc.__cause__ from None
        # Local workers share the file: one at a time creates the tables; then every
        # transaction queues for the write lock.
        with sqlite.creation_lock(database):
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
        sqlite.serialize_transactions(storage.engine)
        return retrying.harden(storage)
    except ImportError as exc:
        raise StorageError(f"cannot open Optuna storage {redact(url)}: its database driver "
                           f"is not installed; pip install 'sweeper[postgres]'") from exc
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError,
            ValueError) as exc:
        # Optuna wraps SQL errors in StorageInternalError: the cause says what happened.
        cause = exc.__cause__ if isinstance(exc.__cause__, sqlalchemy.exc.SQLAlchemyError) \
            else exc
        if read_only and "no such table" in str(cause):
            raise StorageError(f"{redact(url)} is not an Optuna storage (it has no Optuna "
                               f"tables); check --storage / ${STORAGE_ENV}") from exc
        raise StorageError(f"cannot open Optuna storage {redact(url)}: {_first_line(cause)}; "
                           f"check --storage / ${STORAGE_ENV}") from exc


def rdb_of(study: optuna.Study) -> optuna.storages.RDBStorage:
    """The RDB storage under a study (Optuna wraps it in a cache)."""
    storage = study._storage
    return getattr(storage, "_backend", storage)


def redact(url: str) -> str:
    """The URL with its password and secret query values masked, for messages: the one
    redactor, `sweeper.redaction.redact_url`."""
    return redact_url(url)


def _first_line(exc: BaseException) -> str:
    text = redact_text(str(getattr(exc, "orig", None) or exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
