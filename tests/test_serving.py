"""A trial's model served by `mlflow models serve` (sweeper's pyfunc, `--env-manager local`)
labels real MNIST test images sent raw: uint8 0-255 as [N, 28, 28], and 0-1 floats as
[N, 1, 28, 28]."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow_server import free_port, serving_env
from typer.testing import CliRunner

STUDY = """
name: served
dataset: {name: mnist, subset: 4000, test_subset: 500, download: false}
model: {arch: cnn, channels: [8, 16], dropout: 0.1}
train: {optimizer: adam, lr: 0.003, batch_size: 64}
budget: {trials: 1, epochs: 2}
sampler: {name: random, seed: 0}
"""
IMAGES = 12


def _invoke(url: str, inputs: list) -> dict:
    request = urllib.request.Request(f"{url}/invocations",
                                     data=json.dumps({"inputs": inputs}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["predictions"]


@pytest.mark.slow
def test_served_model_labels_raw_mnist_images(mnist_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.artifacts
    import torch
    import torchvision
    from mlflow import MlflowClient

    import sweeper
    from sweeper.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWEEPER_DATA_DIR", str(mnist_dir))
    for name in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "study.yaml").write_text(STUDY)
    result = CliRunner().invoke(app, ["run", "study.yaml", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    best = sweeper.best_trial("served")
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    location = MlflowClient(tracking).get_logged_model(best.model_id).artifact_location
    local = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=tracking,
                                                dst_path=str(tmp_path / "model"))

    test = torchvision.datasets.MNIST(str(mnist_dir), train=False, download=False)
    raw = test.data[:IMAGES].numpy()  # uint8 [N, 28, 28], as the files hold them
    truth = test.targets[:IMAGES].numpy()

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = serving_env(tmp_path)
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", local,
                              "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                             stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        as_uint8 = _invoke(url, raw.tolist())
        as_floats = _invoke(url, (raw[:, None] / 255.0).tolist())
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)

    # What sweeper's own evaluation path predicts: its dataset normalisation, its loader.
    model = sweeper.load_model(best)
    mean, std = 0.1307, 0.3081  # MNIST's train statistics, close to the subset's
    with torch.no_grad():
        logits = model(torch.from_numpy(((raw[:, None] / 255.0 - mean) / std)
                                        .astype(np.float32)))
    labels = np.asarray(as_uint8["label"])
    assert labels.tolist() == as_floats["label"]
    probabilities = np.asarray(as_uint8["probabilities"])
    assert probabilities.shape == (IMAGES, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (labels == truth).mean() >= 0.9, (labels, truth)
    assert (labels == logits.argmax(1).numpy()).mean() >= 0.9
