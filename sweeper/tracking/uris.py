"""Where the tracking store is: the URI a command uses, and where a local store keeps its
artifacts. Plain strings and paths: no mlflow import here."""

from __future__ import annotations

import os
from pathlib import Path

from sweeper.storage import sqlalchemy_url

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
# Next to a local SQLite store, artifacts go to <store folder>/artifacts/<study>; other SQL
# stores (PostgreSQL without a server) use this folder under the working directory.
DEFAULT_ARTIFACT_ROOT = "mlruns/artifacts"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """`explicit` (--tracking-uri) > `$MLFLOW_TRACKING_URI` > `sqlite:///mlruns/mlflow.db`.

    For a local SQLite store the folder is created, so the default works from any fresh
    checkout with no server.
    """
    uri = choose_tracking_uri(explicit)
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return uri


def choose_tracking_uri(explicit: str | None) -> str:
    """The URI the user asked for, or the default; nothing is created."""
    return explicit or os.environ.get(TRACKING_ENV) or DEFAULT_TRACKING_URI


def client_uri(explicit: str | None) -> str:
    """The URI an `MlflowClient` is given: a bare `postgresql://` with the psycopg2 driver
    sweeper ships, a relative SQLite path made absolute."""
    return absolute_sqlite(sqlalchemy_url(choose_tracking_uri(explicit)))


def default_artifact_root(tracking_uri: str) -> str | None:
    """The artifact root for experiments created on a *local* SQL store, as an absolute
    `file://` URI; None for a server (the server decides, e.g. `--serve-artifacts`).

    Without it MLflow would put a SQL store's artifacts in `./mlruns/<experiment id>`
    relative to wherever the command happened to run.
    """
    scheme = tracking_uri.split(":", 1)[0].lower()
    if scheme.startswith("sqlite"):
        path = sqlite_path(tracking_uri)
        root = (path.parent / "artifacts") if path is not None else Path(DEFAULT_ARTIFACT_ROOT)
    elif scheme.split("+", 1)[0] in ("postgresql", "postgres", "mysql", "mssql"):
        root = Path(DEFAULT_ARTIFACT_ROOT)
    else:
        return None
    return root.expanduser().resolve().as_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (relative or absolute), else None."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///:memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).expanduser()


def absolute_sqlite(uri: str) -> str:
    """`sqlite:///mlruns/mlflow.db` with an absolute path: MLflow caches stores by URI, so a
    relative one would keep pointing at the folder of the first process-wide use."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    query = uri.partition("?")[2]
    return f"sqlite:///{path.resolve()}" + (f"?{query}" if query else "")


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))
