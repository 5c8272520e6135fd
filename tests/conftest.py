"""Shared fixtures: where real MNIST lies, a fresh storage, PostgreSQL and MLflow servers, the
shipped smoke study run once, and the `gpu` marker's automatic skip. The tiny study file most
tests run is `studies.tiny_study`."""

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


@pytest.fixture(scope="session", autouse=True)
def decoded_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Decoded datasets are cached in the session's folder, not the user's ~/.cache
    (subprocesses inherit it through the environment)."""
    root = tmp_path_factory.mktemp("decoded-cache")
    previous = os.environ.get("SWEEPER_CACHE_DIR")
    os.environ["SWEEPER_CACHE_DIR"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("SWEEPER_CACHE_DIR", None)
    else:
        os.environ["SWEEPER_CACHE_DIR"] = previous


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


@pytest.fixture
def storage(tmp_path: Path) -> str:
    """A fresh Optuna storage in the test's folder (SQLite), as a URL."""
    return f"sqlite:///{tmp_path / 'optuna.db'}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432 for this test session, dropped after,
    as a bare `postgresql://` URL (what users write). Skips when no server answers."""
    from mlflow_server import postgres_database

    with postgres_database("sweeper_test", scheme="postgresql") as url:
        if url is None:
            pytest.skip("no PostgreSQL on 127.0.0.1:5432 (or psycopg2 missing)")
        yield url


@pytest.fixture(scope="session")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One MLflow server for the session, as docker compose runs it: PostgreSQL-backed
    when PostgreSQL answers, else SQLite; proxied artifacts."""
    from mlflow_server import mlflow_server, postgres_database

    root = tmp_path_factory.mktemp("mlflow-server")
    with postgres_database() as database, mlflow_server(root, database) as server:
        yield server.url


@pytest.fixture(scope="session")
def digits_smoke(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shipped `studies/digits_smoke.yaml`, run once with the default local stores:
    returns the folder whose `mlruns/` holds them (chdir there to use the defaults)."""
    from typer.testing import CliRunner

    from sweeper.cli import app

    root = tmp_path_factory.mktemp("digits-smoke")
    previous = Path.cwd()
    saved = {k: os.environ.pop(k, None) for k in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI")}
    os.chdir(root)
    try:
        result = CliRunner().invoke(app, ["run", str(REPO / "studies" / "digits_smoke.yaml"),
                                          "--device", "cpu"])
        assert result.exit_code == 0, result.output
    finally:
        os.chdir(previous)
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    yield root
