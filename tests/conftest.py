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
