"""The README's "Serve the best model", as written: after `sweeper run` with the defaults, the
one documented variable points MLflow's own tools at sweeper's store;
`mlflow models serve -m models:/quickstart@best --env-manager local` labels real MNIST test
images sent raw (uint8 0-255 as [N, 28, 28], and 0-1 floats as [N, 1, 28, 28]), and
`mlflow.pyfunc.load_model` / `mlflow.search_runs` in a fresh process find the study. No
stray `./mlflow.db` appears."""

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

REPO = Path(__file__).resolve().parents[1]
EXPORT = "export MLFLOW_TRACKING_URI=sqlite:///mlruns/mlflow.db"
SERVE = "mlflow models serve -m models:/quickstart@best --env-manager local --port 5001"
STUDY = """
name: quickstart
dataset: {name: mnist, subset: 4000, test_subset: 500, download: false}
model: {arch: cnn, channels: [8, 16], dropout: 0.1}
train: {optimizer: adam, lr: 0.003, batch_size: 64}
budget: {trials: 1, epochs: 2}
sampler: {name: random, seed: 0}
"""
IMAGES = 200


def _invoke(url: str, inputs: list) -> dict:
    request = urllib.request.Request(f"{url}/invocations",
                                     data=json.dumps({"inputs": inputs}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"]


def test_readme_gives_the_commands_this_file_runs() -> None:
    readme = (REPO / "README.md").read_text()
    assert "## Serve the best model" in readme
    assert EXPORT in readme and SERVE in readme
    assert "curl -s http://127.0.0.1:5001/invocations" in readme


@pytest.mark.slow
def test_mlflow_serves_the_best_model_of_a_study_to_raw_mnist_images(
        mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    from sweeper.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWEEPER_DATA_DIR", str(mnist_dir))
    for name in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "study.yaml").write_text(STUDY)
    result = CliRunner().invoke(app, ["run", "study.yaml", "--device", "cpu"])
    assert result.exit_code == 0, result.output

    test = torchvision.datasets.MNIST(str(mnist_dir), train=False, download=False)
    raw = test.data[:IMAGES].numpy()  # uint8 [N, 28, 28], as the files hold them
    truth = test.targets[:IMAGES].numpy()

    # The documented environment only: the variable of the README, in a fresh shell.
    name, _, value = EXPORT.removeprefix("export ").partition("=")
    env = {**serving_env(tmp_path), name: value}
    for other in ("SWEEPER_STORAGE", "MLFLOW_REGISTRY_URI"):
        env.pop(other, None)
    port = free_port()
    command = SERVE.replace("--port 5001", f"--port {port}").split()
    command[0] = str(Path(sys.executable).with_name("mlflow"))
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        as_uint8 = _invoke(url, raw.tolist())
        as_floats = _invoke(url, (raw[:20, None] / 255.0).tolist())
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)

    labels = np.asarray(as_uint8["label"])
    probabilities = np.asarray(as_uint8["probabilities"])
    assert probabilities.shape == (IMAGES, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    accuracy = float((labels == truth).mean())
    assert accuracy >= 0.85, f"accuracy {accuracy} on raw images (chance: 0.1)"
    assert as_floats["label"] == labels[:20].tolist()  # 0-1 floats, [N, 1, 28, 28]

    # MLflow's Python API in a fresh process, with the same one variable.
    script = ("import mlflow, numpy as np\n"
              "model = mlflow.pyfunc.load_model('models:/quickstart@best')\n"
              "out = model.predict(np.load('images.npy'))\n"
              "runs = mlflow.search_runs(experiment_names=['quickstart'])\n"
              "print(out['label'].tolist(), sorted(runs['tags.mlflow.runName']))\n")
    np.save(tmp_path / "images.npy", raw[:8])
    answer = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert answer.stdout.strip().startswith(str(labels[:8].tolist())), answer.stdout
    assert "'trial-0'" in answer.stdout and "'quickstart'" in answer.stdout
    assert not (tmp_path / "mlflow.db").exists(), "MLflow's tools made a store of their own"
