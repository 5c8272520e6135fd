"""The studies of studies/seeds/ cannot rot: every one validates with the network its
comments promise, and (slow) every one runs end to end on a few hundred images for one
epoch. Fashion-MNIST is not on the test machines: its study runs on small IDX files that
the test writes, in the real format."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import optuna
import pytest

from sweeper.search.study import RunOptions, run_study
from sweeper.spec import config, shapes

SEEDS = Path(__file__).resolve().parents[2] / "studies" / "seeds"
FILES = sorted(SEEDS.glob("*.yaml"))
# The network each study is about, by its parameter count on 28x28 inputs.
PARAMS = {
    "convnet_learning_rate": 34_826, "convnet_dropout": 34_826,
    "convnet_filter_size": 34_826, "regularisation": 34_826,
    "lenet5_mnist": 61_706, "lenet5_fashion_mnist": 61_706,
    "models_lr_dnn": 15_866, "models_lr_convnet": 93_322, "models_lr_resnet": 348_362,
    "optimizers": 289_630, "ensemble": 289_630, "transfer_resnet18": 11_175_370,
}


def test_every_experiment_has_its_study() -> None:
    assert {path.stem for path in FILES} >= set(PARAMS)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_seed_study_trains_the_network_it_names(path: Path) -> None:
    spec = config.load(path)
    if path.stem not in PARAMS:
        return
    layers = shapes.plan(spec.model, spec.dataset.input_shape, spec.dataset.num_classes)
    assert shapes.parameter_count(layers) == PARAMS[path.stem]
    assert spec.sampler.name == "grid", "a one-factor study visits every value once"


def write_fashion_idx(root: Path, n_train: int = 300, n_test: int = 100) -> None:
    """FashionMNIST/raw/ IDX files of learnable noise: each class a bright square."""
    rng = np.random.default_rng(0)
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 64, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 5)
            images[i, 4 + row * 12:12 + row * 12, 2 + col * 5:6 + col * 5] = 255
        (raw / f"{part}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{part}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("seed-data")
    (root / "MNIST").symlink_to(mnist_dir / "MNIST", target_is_directory=True)
    write_fashion_idx(root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_seed_study_runs_on_a_small_subset(path: Path, data_dir: Path, tmp_path: Path) -> None:
    spec = config.load(path)
    spec.dataset.subset = 200
    spec.dataset.val_fraction = 0.003  # 180 of MNIST's 60,000 (Fashion's files: 1)
    spec.dataset.test_subset = 100
    spec.dataset.download = False
    spec.budget.epochs = 1
    if spec.model.pretrained == "imagenet":  # no download in tests: a file in its format
        import torch
        import torchvision

        torch.save(torchvision.models.resnet18(weights=None).state_dict(),
                   tmp_path / "resnet18.pth")
        spec.model.pretrained = str(tmp_path / "resnet18.pth")
    report = run_study(spec, RunOptions(storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                        device="cpu", data_dir=data_dir))
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    grid = config.space_size(spec.dimensions)
    assert report.stopped_by in ("budget", "grid")
    states = [t.state.name for t in study.trials]
    # Every grid point trains once; only a point that diverges (lr 0.1) may end FAIL.
    assert len(states) == grid, states
    for trial in study.trials:
        assert trial.state.name == "COMPLETE" or trial.user_attrs.get(
            "fail_reason", "").startswith("diverged"), (trial.params, trial.user_attrs)
    for trial in study.trials:
        if trial.state.name == "COMPLETE":
            assert 0.0 <= trial.system_attrs["sweeper.metrics"]["test_accuracy"] <= 1.0
