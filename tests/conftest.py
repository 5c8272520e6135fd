"""Shared fixtures: where real MNIST lies, and the `gpu` marker's automatic skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _mnist_root() -> Path | None:
    for candidate in (os.environ.get("SWEEPER_DATA_DIR"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return Path(candidate).resolve()
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The data directory holding real MNIST (`SWEEPER_DATA_DIR`); skips if absent."""
    root = _mnist_root()
    if root is None:
        pytest.skip("real MNIST not found: set SWEEPER_DATA_DIR to a folder with MNIST/raw/")
    return root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres_url() -> object:
    """A fresh PostgreSQL database on 127.0.0.1:5432 for this test session, dropped after.

    Skips when no server answers (the tests of the SQLite paths still run)."""
    import uuid

    psycopg2 = pytest.importorskip("psycopg2")
    admin = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"
    name = f"sweeper_test_{uuid.uuid4().hex[:12]}"
    try:
        conn = psycopg2.connect(admin)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432: {exc}")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    conn = psycopg2.connect(admin)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()
