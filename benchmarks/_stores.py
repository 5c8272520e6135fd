"""What the benchmarks start: a real `mlflow server` (sweeper's own command) and a fresh
PostgreSQL database on 127.0.0.1:5432, both cleaned up afterwards."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from sweeper.tracking.server import local_command, server_command, server_env

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(root: Path, backend_store_uri: str | None = None,
                  port: int | None = None) -> Iterator[str]:
    """A ready `mlflow server` (SQLite under `root` unless a store is given); its URL."""
    port = port or free_port()
    store = backend_store_uri or f"sqlite:///{root / 'server.db'}"
    command = local_command(server_command(store, str(root / "artifacts"), port=port,
                                           workers=1, access_log=False))
    process = subprocess.Popen(command, env=server_env(), cwd=root, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("mlflow server did not start") from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def postgres_database(scheme: str = "postgresql") -> Iterator[str | None]:
    """A fresh database (dropped afterwards) as a URL, or None without a server."""
    try:
        import psycopg2
    except ImportError:
        yield None
        return
    name = f"sweeper_bench_{uuid.uuid4().hex[:8]}"
    try:
        conn = psycopg2.connect(PG_ADMIN)
    except psycopg2.OperationalError:
        yield None
        return
    conn.autocommit = True
    conn.cursor().execute(f'CREATE DATABASE "{name}"')
    conn.close()
    try:
        yield f"{scheme}://postgres@127.0.0.1:5432/{name}"
    finally:
        conn = psycopg2.connect(PG_ADMIN)
        conn.autocommit = True
        conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
