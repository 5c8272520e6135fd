"""A real `mlflow server` for integration tests: what users start with docker compose, as a
subprocess on a free loopback port (DESIGN §7).

The command and environment are `sweeper.tracking.server`'s (`server_command`, `server_env`: proxied
artifacts, MLflow's background job runner off), with one worker. The server runs in its
own session, so `stop` can end the server and the uvicorn worker it spawns together, and
`kill` can take it away abruptly in the middle of a study.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from sweeper.tracking.server import local_command, server_command, server_env

STARTUP_TIMEOUT_S = 120.0
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MlflowServer:
    """One `mlflow server` subprocess; `start()` returns at once, `wait_ready()` blocks."""

    def __init__(self, root: Path, backend_store_uri: str | None = None,
                 port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifacts = self.root / "artifacts"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> MlflowServer:
        command = local_command(server_command(
            self.backend_store_uri, str(self.artifacts), host="127.0.0.1", port=self.port,
            workers=1, access_log=False))
        env = server_env()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, cwd=self.root, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> str:
        """Block until `/health` answers; returns the URL. Raises with the server's log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.url
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """Take the server away at once (SIGKILL), as a crash or a pulled cable would."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server's process group; SIGKILL it if it is still there after
        `timeout` seconds."""
        if self.process is None or (self.process.poll() is not None and not self._group_alive()):
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._group_alive():
            self._signal(signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _signal(self, sig: signal.Signals) -> None:
        """Signal the server's own process group (it was started in a new session, so the
        group id is its pid): the server and the uvicorn worker it started, nothing else."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def _group_alive(self) -> bool:
        if self.process is None:
            return False
        try:
            os.killpg(self.process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


@contextlib.contextmanager
def mlflow_server(root: Path, backend_store_uri: str | None = None) -> Iterator[MlflowServer]:
    """A started, ready server, stopped on exit."""
    server = MlflowServer(root, backend_store_uri).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def postgres_database(prefix: str = "sweeper_mlflow", scheme: str = "postgresql+psycopg2"
                      ) -> Iterator[str | None]:
    """A fresh PostgreSQL database on 127.0.0.1:5432 (dropped on exit) as a URL with
    `scheme`, or None when no server answers or psycopg2 is missing: callers fall back to
    SQLite or skip. The one place tests create (and drop) databases."""
    try:
        import psycopg2
    except ImportError:
        yield None
        return
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        conn = psycopg2.connect(PG_ADMIN)
    except psycopg2.OperationalError:
        yield None
        return
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    try:
        yield f"{scheme}://postgres@127.0.0.1:5432/{name}"
    finally:
        with contextlib.suppress(Exception):
            conn = psycopg2.connect(PG_ADMIN)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.close()


def serving_env(folder: Path) -> dict[str, str]:
    """The environment for `mlflow models serve --env-manager local`, which starts
    `uvicorn` from PATH: a `uvicorn` of this interpreter in `folder`, first on PATH (a
    virtual environment that borrows its packages has no such script of its own)."""
    shim = folder / "uvicorn"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m uvicorn "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"}
