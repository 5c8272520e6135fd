"""Shared fixtures: where real MNIST lies, and the `gpu` marker's automatic skip."""

from __future__ import annotations

import os
from collections.abc import Iterator
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
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432 for this test session, dropped after,
    as a bare `postgresql://` URL (what users write). Skips when no server answers."""
    from mlflow_server import postgres_database

    with postgres_database("sweeper_test", scheme="postgresql") as url:
        if url is None:
            pytest.skip("no PostgreSQL on 127.0.0.1:5432 (or psycopg2 missing)")
        yield url
