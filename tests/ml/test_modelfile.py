"""Models are data, never code: a trial's model is its config plus safetensors weights;
whoever can write to the artifact store can make loading fail, never make it run code.

The study tests run a real tiny study on the local stores, replace its model files with a
malicious pickle (the payload creates a file when unpickled), and run `sweeper evaluate`,
`sweeper ensemble` and `sweeper.load_model` against it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from studies import tiny_study
from sweeper import serving
from sweeper.cli import app
from sweeper.errors import SweeperError
from sweeper.ml import modelfile
from sweeper.ml.modelfile import ModelFileError, ModelInfo, read_model, write_model
from sweeper.ml.models import build_model
from sweeper.spec import config

STUDY = tiny_study("trust", model="dropout: 0.0",
                   train_block="optimizer: adam, lr: 0.01, batch_size: 64", extra="models: all")


class _Payload:
    """Unpickling this runs `touch <marker>`: what an attacker would put in a model file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def tiny_info(channels: int = 1, size: int = 8, classes: int = 3) -> ModelInfo:
    spec = config.loads(STUDY.replace("image_size: 8", f"image_size: {size}, channels: "
                                      f"{channels}, classes: {classes}"))
    cfg = spec.resolve({})
    return ModelInfo(cfg, [f"c{i}" for i in range(classes)], (0.25,) * channels,
                     (0.5,) * channels)


def tiny_model(info: ModelInfo) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(info.config.model, info.input_shape, info.num_classes).eval()


# --------------------------------------------------------------------------------------
# The format
# --------------------------------------------------------------------------------------
def test_round_trip_rebuilds_the_same_network(tmp_path: Path) -> None:
    info = tiny_info()
    model = tiny_model(info)
    write_model(tmp_path, model, info)
    loaded, read = read_model(tmp_path)
    x = torch.randn(5, *info.input_shape)
    assert not loaded.training and read == info
    torch.testing.assert_close(loaded(x), model(x))


def test_pickle_in_place_of_the_weights_is_refused_and_never_run(tmp_path: Path) -> None:
    info = tiny_info()
    write_model(tmp_path, tiny_model(info), info)
    marker = tmp_path / "pwned"
    (tmp_path / modelfile.WEIGHTS_FILE).write_bytes(malicious_pickle(marker))
    with pytest.raises(ModelFileError, match="not a safetensors file") as caught:
        read_model(tmp_path)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(format="pickle"), "not a sweeper model config"),
    (lambda d: d["config"]["model"].update(hidden=[17]), "does not fit|is \\("),
    (lambda d: d.update(classes=["a"]), "disagrees with itself"),
    (lambda d: d["config"]["model"].update(hidden=[10**9]), "is \\("),
])
def test_altered_config_is_one_line(tmp_path: Path, change, match: str) -> None:
    import json

    info = tiny_info()
    write_model(tmp_path, tiny_model(info), info)
    path = tmp_path / modelfile.CONFIG_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match=match) as caught:
        read_model(tmp_path)  # hidden: [10**9] is built on the meta device: no memory
    assert "\n" not in str(caught.value)


def test_a_fifo_as_a_model_file_does_not_hang(tmp_path: Path) -> None:
    info = tiny_info()
    write_model(tmp_path, tiny_model(info), info)
    (tmp_path / modelfile.WEIGHTS_FILE).unlink()
    os.mkfifo(tmp_path / modelfile.WEIGHTS_FILE)
    with pytest.raises(ModelFileError, match="not a regular file"):
        read_model(tmp_path)


# --------------------------------------------------------------------------------------
# The pyfunc's input: raw images in every layout
# --------------------------------------------------------------------------------------
def test_raw_images_in_any_layout_are_prepared_as_training_did() -> None:
    info = tiny_info(size=8)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    expected = ((raw[:, None] / 255.0 - 0.25) / 0.5).astype(np.float32)
    for images in (raw, raw.astype(np.int64), raw[:, None], raw / 255.0, raw[:, None] / 255.0,
                   raw[..., None], raw.reshape(3, 64).tolist()):
        prepared = serving.prepare_images(images, info)
        np.testing.assert_allclose(prepared, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, 8, 8\] or \[N, 1, 8, 8\]"):
        serving.prepare_images(np.zeros((2, 9, 9)), info)


def test_channels_last_colour_images_are_transposed() -> None:
    info = tiny_info(channels=3, size=4)
    chw = np.random.default_rng(1).random((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(serving.prepare_images(chw.transpose(0, 2, 3, 1), info),
                               serving.prepare_images(chw, info))


def test_pyfunc_returns_probabilities_and_labels(tmp_path: Path) -> None:
    info = tiny_info()
    model = tiny_model(info)
    write_model(tmp_path, model, info)
    classifier = serving._load_pyfunc(str(tmp_path))
    raw = np.random.default_rng(2).integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    out = classifier.predict(raw)
    expected = torch.softmax(model(torch.from_numpy(serving.prepare_images(raw, info))), 1)
    np.testing.assert_allclose(out["probabilities"], expected.detach().numpy(), rtol=1e-5)
    np.testing.assert_array_equal(out["label"], expected.argmax(1).numpy())
    assert out["probabilities"].dtype == np.float32 and out["label"].dtype == np.int64


# --------------------------------------------------------------------------------------
# A real study whose model files an attacker replaced
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trust_study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 2-trial study on the local default stores: returns its folder (the commands run
    with it as the working directory)."""
    root = tmp_path_factory.mktemp("trust")
    (root / "trust.yaml").write_text(STUDY)
    # MLflow creates its tables on first use (~20 migrations): done here, so that a loaded
    # machine does not spend the command's 15 s store check on them.
    (root / "mlruns").mkdir()
    MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}").search_experiments()
    with _in(root):
        result = CliRunner().invoke(app, ["run", "trust.yaml", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    yield root


@contextlib.contextmanager
def _in(root: Path) -> Iterator[None]:
    """`root` as the working directory, with the default local stores."""
    from sweeper.results.read import _open_for_reading

    previous = Path.cwd()
    saved = {k: os.environ.pop(k, None) for k in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI")}
    os.chdir(root)
    # Storages are cached per URL: the default one is relative, so another folder's
    # would answer for this one.
    _open_for_reading.cache_clear()
    try:
        yield
    finally:
        _open_for_reading.cache_clear()
        os.chdir(previous)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def _model_folders(root: Path) -> list[Path]:
    return sorted((root / "mlruns" / "artifacts").glob("trust/models/*/artifacts"))


@pytest.fixture
def tampered(trust_study: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The study's model folders, restored after each test."""
    backup = tmp_path / "backup"
    folders = _model_folders(trust_study)
    assert len(folders) == 2
    for i, folder in enumerate(folders):
        shutil.copytree(folder, backup / str(i))
    marker = tmp_path / "pwned"
    yield trust_study, marker
    for i, folder in enumerate(folders):
        shutil.rmtree(folder)
        shutil.copytree(backup / str(i), folder)


def _old_pickled_format(folder: Path, payload: bytes) -> None:
    """What sweeper wrote before models were data: MLflow's pytorch flavour with
    `data/model.pth` a pickle (here: the attacker's)."""
    shutil.rmtree(folder)
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "model.pth").write_bytes(payload)
    (folder / "MLmodel").write_text(
        "flavors:\n"
        "  python_function: {loader_module: mlflow.pytorch, data: data, pickle_module_name: "
        "mlflow.pytorch.pickle_module}\n"
        "  pytorch: {model_data: data, pytorch_version: 2.14.1, serialization_format: "
        "pickle}\n")


@pytest.mark.parametrize("how", ["weights", "old-format"])
def test_malicious_model_is_refused_by_evaluate_ensemble_and_load_model(
        tampered: tuple[Path, Path], how: str) -> None:
    import sweeper

    root, marker = tampered
    payload = malicious_pickle(marker)
    for folder in _model_folders(root):
        if how == "weights":
            (folder / modelfile.MODEL_DIR / modelfile.WEIGHTS_FILE).write_bytes(payload)
        else:
            _old_pickled_format(folder, payload)
    expected = "not a safetensors file" if how == "weights" else "never loads"
    with _in(root):
        for command in (["evaluate", "trust"], ["ensemble", "trust", "--top", "2"]):
            result = CliRunner().invoke(app, [*command, "--device", "cpu"])
            assert result.exit_code == 2, result.output
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and expected in lines[0], result.output
            assert not marker.exists(), f"{command}: the pickle ran"
        with pytest.raises(SweeperError, match=expected) as caught:
            sweeper.load_model(sweeper.best_trial("trust"))
        assert "\n" not in str(caught.value)
    assert not marker.exists(), "load_model: the pickle ran"


def test_untampered_model_evaluates(trust_study: Path) -> None:
    with _in(trust_study):
        result = CliRunner().invoke(app, ["evaluate", "trust", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "matches the logged test metrics" in result.output
