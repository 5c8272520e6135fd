"""Is the tracking store usable? One clear line within `CHECK_TIMEOUT_S` (a server or a SQL
database; a local SQLite file is checked without a deadline), before anything is written:
a typo in the URI or a server that is down costs nothing to fix.

MLflow's own client retries a failed HTTP request for minutes and its SQL engine for ~30 s,
so the probe asks first with plain, short-timeout requests.
"""

from __future__ import annotations

import base64
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sweeper.errors import TrackingError
from sweeper.search import sqlite
from sweeper.search.storage import redact
from sweeper.tracking.common import http_env, one_line
from sweeper.uris import (
    PASSWORD_ENV,
    TOKEN_ENV,
    TRACKING_ENV,
    USERNAME_ENV,
    is_http,
    sqlite_path,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHECK_TIMEOUT_S = 15.0  # the whole check answers within this, whatever the network does
CHECK_REQUEST_TIMEOUT_S = 5  # per HTTP request or SQL connect


def check_store(uri: str, make_client: Callable[[], MlflowClient], *, escape: str = ""
                ) -> None:
    """Raise TrackingError (one line, within `CHECK_TIMEOUT_S`) unless a client on `uri`
    answers. The client is made inside the time limit (MLflow's SQL stores connect, and
    retry for minutes, as the client is made). `escape` ends messages that say how to go
    on without tracking, e.g. "or run with --no-tracking"."""
    # The time limit is the store's, not the import's (seconds on a busy machine).
    import mlflow.tracking

    if not is_http(uri):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    outcome: dict[str, BaseException] = {}
    where = redact(uri)
    suffix = f", {escape}" if escape else ""

    def probe() -> None:
        try:
            _probe(uri, make_client, suffix)
        except KeyboardInterrupt:  # Ctrl-C while checking a local store: not a store error
            raise
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    if sqlite_path(uri) is not None:
        # A local file has no network to hang on; creating a fresh store (MLflow's schema
        # migrations) takes seconds of CPU, more on a busy machine: no deadline for it.
        probe()
    else:
        thread = threading.Thread(target=probe, name="sweeper-mlflow-check", daemon=True)
        thread.start()
        thread.join(CHECK_TIMEOUT_S)
        if thread.is_alive():
            raise TrackingError(f"MLflow tracking store {where} did not answer within "
                                f"{CHECK_TIMEOUT_S:.0f} s; check --tracking-uri / "
                                f"${TRACKING_ENV}{suffix}")
    error = outcome.get("error")
    if isinstance(error, TrackingError):
        raise error
    if error is not None:
        raise TrackingError(f"MLflow tracking store {where} cannot be used: "
                            f"{one_line(error)}") from error


def _probe(uri: str, make_client: Callable[[], MlflowClient], suffix: str) -> None:
    where = redact(uri)
    path = sqlite_path(uri)
    if is_http(uri):
        _probe_http(uri.rstrip("/"), where, suffix)
    elif path is None and "://" in uri and not uri.startswith("file:"):
        _probe_sql(uri, where)
    try:
        if path is not None:
            # Local workers that start together on a fresh file: one at a time creates
            # the tables (MLflow does on the first request). Later writes wait on MLflow's
            # own busy timeout; MLflow nests sessions, so `BEGIN IMMEDIATE` is not for it.
            with sqlite.creation_lock(path):
                make_client().search_experiments(max_results=1)
        else:
            with http_env(retries=0, timeout=CHECK_REQUEST_TIMEOUT_S):
                make_client().search_experiments(max_results=1)
    except Exception as exc:
        if is_http(uri) and "error code 404" in str(exc):
            raise TrackingError(f"no MLflow tracking server answers at {where} (HTTP 404 "
                                f"from its REST API); check --tracking-uri / "
                                f"${TRACKING_ENV}") from exc
        hint = ""
        if "alembic" in str(exc).lower() or "revision" in str(exc).lower():
            hint = " (is this the Optuna database? MLflow and Optuna need separate databases)"
        raise TrackingError(f"MLflow tracking store {where} refused a request: "
                            f"{one_line(exc)}{hint}") from exc


def _probe_http(base: str, where: str, suffix: str) -> None:
    """A plain GET with a short timeout, with the credentials MLflow's client will send."""
    request = urllib.request.Request(f"{base}/health", headers=auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=CHECK_REQUEST_TIMEOUT_S) as response:
            response.read(64)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise TrackingError(
                f"MLflow server {where} refused access (HTTP {exc.code}); set "
                f"MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or "
                f"MLFLOW_TRACKING_TOKEN") from exc
        # No /health behind some proxies: the API request decides.
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"cannot reach the MLflow server at {where} ({reason}); start it (e.g. docker "
            f"compose up -d), fix --tracking-uri / ${TRACKING_ENV}{suffix}") from exc


def auth_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The Authorization header MLflow's client sends: a bearer token, else basic auth."""
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV):
        return {"Authorization": f"Bearer {env[TOKEN_ENV]}"}
    if env.get(USERNAME_ENV):
        pair = f"{env[USERNAME_ENV]}:{env.get(PASSWORD_ENV, '')}".encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}
    return {}


def _probe_sql(uri: str, where: str) -> None:
    """Connect once with a short timeout."""
    import sqlalchemy

    connect_args: dict[str, Any] = {}
    if uri.startswith(("postgresql", "postgres", "mysql")):
        connect_args["connect_timeout"] = CHECK_REQUEST_TIMEOUT_S
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as exc:
        raise TrackingError(f"cannot connect to the MLflow database {where}: "
                            f"{one_line(exc)}; check --tracking-uri / "
                            f"${TRACKING_ENV}") from exc
