"""Where the two stores are: the Optuna storage URL and the MLflow tracking URI a command
uses, the one parser of `sqlite:///` paths, and where a local store keeps its artifacts.
Plain strings and paths: nothing is imported here."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
STORAGE_ENV = "SWEEPER_STORAGE"


def resolve_storage_url(explicit: str | None = None) -> str:
    """`--storage` > `$SWEEPER_STORAGE` > the local SQLite default."""
    return explicit or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def sqlalchemy_url(url: str) -> str:
    """`postgresql://...` with the driver sweeper ships (psycopg2, the `postgres` extra).

    SQLAlchemy 2.1 picks psycopg 3 for a bare `postgresql://`; an explicit driver in the URL
    (`postgresql+psycopg://`) is left alone.
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url.removeprefix(prefix)
    return url


DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"  # MLflow's client sends them as basic auth
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
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
    sweeper ships, a relative SQLite path made absolute, and the credentials of an
    `http://user:password@host` URI moved to `$MLFLOW_TRACKING_USERNAME` and
    `$MLFLOW_TRACKING_PASSWORD` (where MLflow's client reads them), so the URI that
    every message, link and record shows holds none."""
    return absolute_sqlite(sqlalchemy_url(credentials_to_env(choose_tracking_uri(explicit))))


def credentials_to_env(uri: str, environ: MutableMapping[str, str] | None = None) -> str:
    """`uri` without the user info of an http(s) URI, which goes to the environment
    (unless the environment already names a user: it wins)."""
    if not is_http(uri):
        return uri
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    env = os.environ if environ is None else environ
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    if not env.get(USERNAME_ENV):
        env[USERNAME_ENV] = unquote(user)
        env[PASSWORD_ENV] = unquote(password)
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


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
