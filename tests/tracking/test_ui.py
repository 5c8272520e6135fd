"""`sweeper ui` as a person meets it: the command starts a real MLflow server on a local
store, headless Chromium opens the study's page and must show its trials, and Ctrl-C stops
the server (exit 130, port free again). Plus the one-line errors of the command."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sweeper.cli import app
from sweeper.errors import TrackingError
from sweeper.tracking.server import (
    browser_url,
    resolve_ui_store,
    run_server,
    run_url,
    server_command,
    trial_runs_url,
)

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
STUDY = "ui-study"
TRIALS = ("trial-0", "trial-1", "trial-2")



@contextlib.contextmanager
def _sweeper_ui(store: str, port: int, log: Path, *, cwd: Path
                ) -> Iterator[subprocess.Popen[bytes]]:
    """`sweeper ui` on `store` and `port`, its output in `log`, once it says it is ready;
    stopped with Ctrl-C (then terminated) if it still runs when the block ends."""
    with log.open("w") as out:
        ui = subprocess.Popen([*_sweeper(), "ui", "--backend-store-uri", store,
                               "--port", str(port)],
                              stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        deadline = time.monotonic() + 90
        while "MLflow UI:" not in log.read_text():
            assert ui.poll() is None, f"sweeper ui exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"sweeper ui not ready:\n{log.read_text()}"
            time.sleep(0.25)
        yield ui
    finally:
        if ui.poll() is None:
            ui.send_signal(signal.SIGINT)
            try:
                ui.wait(timeout=30)
            except subprocess.TimeoutExpired:
                ui.terminate()
                ui.wait(timeout=30)

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _sweeper() -> list[str]:
    script = Path(sys.executable).with_name("sweeper")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sweeper.cli"]


def _chromium(*args: str, profile: Path, window: str = "1400,900"
              ) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
         "--virtual-time-budget=20000", f"--window-size={window}", *args],
        capture_output=True, text=True, timeout=120, check=False)


STUDY_FILE = f"""
name: {STUDY}
dataset: {{name: synthetic, synthetic: {{train_size: 256, test_size: 64, image_size: 8}}}}
model: {{arch: mlp, hidden: [16]}}
budget: {{trials: 3, epochs: 1}}
sampler: {{name: random, seed: 0}}
models: none
space:
  train.lr: {{float: [1.0e-3, 1.0e-1], log: true}}
"""


def _study_store(root: Path) -> tuple[str, str]:
    """The store a real `sweeper run` of a 3-trial study leaves (a parent run, three nested
    trial runs). Returns (store URI, experiment id)."""
    from mlflow import MlflowClient

    root.mkdir(parents=True)
    (root / "study.yaml").write_text(STUDY_FILE)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run = subprocess.run([*_sweeper(), "run", "study.yaml", "--tracking-uri", uri,
                          "--storage", f"sqlite:///{root / 'optuna.db'}", "--device", "cpu"],
                         cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    experiment = MlflowClient(uri).get_experiment_by_name(STUDY)
    assert experiment is not None
    return uri, experiment.experiment_id


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(apt-get install chromium; .ci/run installs it)")
def test_ui_shows_the_study_in_a_browser_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    store, experiment_id = _study_store(tmp_path / "store")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "ui.log"
    with _sweeper_ui(store, port, log, cwd=tmp_path) as ui:
        assert f"MLflow UI: {url}" in log.read_text()
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            assert response.read() == b"OK"

        # MLflow 3.17 opens experiments in its GenAI view (traces) unless told the workflow
        # is model training; that view lists the runs. Trial runs are nested under the
        # parent (collapsed) unless a filter lists them flat: the link sweeper prints.
        page = trial_runs_url(url, experiment_id)
        dom = _chromium("--dump-dom", page, profile=tmp_path / "profile-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        for name in (STUDY, *TRIALS):
            assert name in dom.stdout, f"{name!r} not in the rendered page"
        screenshot = tmp_path / "experiment.png"
        shot = _chromium(f"--screenshot={screenshot}", page, profile=tmp_path / "profile-png")
        assert shot.returncode == 0, shot.stderr[-2000:]
        assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank one

        ui.send_signal(signal.SIGINT)  # Ctrl-C
        assert ui.wait(timeout=30) == 130, log.read_text()
    assert "MLflow UI stopped" in log.read_text()
    assert _port_is_free(port), "the mlflow server outlived sweeper ui"


def test_http_tracking_uri_is_one_line_exit_2() -> None:
    result = runner.invoke(app, ["ui"], env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert "$MLFLOW_TRACKING_URI is http://mlflow:5000, an MLflow server" in result.output
    result = runner.invoke(app, ["ui", "--backend-store-uri", "https://x.example"])
    assert result.exit_code == 2 and "--backend-store-uri is https://x.example" in result.output


def test_busy_port_is_one_line_exit_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["ui", "--backend-store-uri",
                                     f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "--port" in result.output


def test_store_and_url_defaults() -> None:
    assert resolve_ui_store(None, {}) == "sqlite:///mlruns/mlflow.db"
    assert resolve_ui_store(None, {"MLFLOW_TRACKING_URI": "sqlite:///x.db"}) == "sqlite:///x.db"
    assert resolve_ui_store("sqlite:///y.db", {"MLFLOW_TRACKING_URI": "sqlite:///x.db"}) == (
        "sqlite:///y.db")
    assert browser_url("0.0.0.0", 5000) == "http://127.0.0.1:5000"
    assert server_command("sqlite:///mlruns/mlflow.db", "mlruns/artifacts") == [
        "mlflow", "server", "--backend-store-uri", "sqlite:///mlruns/mlflow.db",
        "--artifacts-destination", "mlruns/artifacts", "--serve-artifacts",
        "--host", "127.0.0.1", "--port", "5000"]


def test_a_server_that_dies_early_is_one_line() -> None:
    with pytest.raises(TrackingError, match="exited with code 3 before it was ready"):
        run_server(["sh", "-c", "exit 3"], "http://127.0.0.1:9/health")


MODEL_STUDY = "ui-model"
MODEL_STUDY_FILE = f"""
name: {MODEL_STUDY}
dataset: {{name: synthetic, synthetic: {{train_size: 256, test_size: 64, image_size: 8}}}}
model: {{arch: mlp, hidden: [16]}}
budget: {{trials: 2, epochs: 3}}
sampler: {{name: random, seed: 0}}
models: best
space:
  train.lr: {{float: [1.0e-3, 1.0e-1], log: true}}
"""
FIRST_CHARTS = 8  # of the 12 model metrics a trial run logs (MLflow sorts them by name)


def chart_titles(dom: str) -> list[str]:
    """The titles of the chart cards MLflow rendered on a run's metrics page (those in
    view: it renders the others as they scroll in), in page order."""
    import re

    return re.findall(r'<h4[^>]*title="([^"]+)"', dom)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(apt-get install chromium; .ci/run installs it)")
def test_trial_run_page_charts_validation_accuracy_first_and_links_the_registry(
        tmp_path: Path) -> None:
    """In MLflow's UI, the best trial's metrics page shows val_accuracy among its first
    charts (and no per-class ones), and its overview links the registered model version."""
    from mlflow import MlflowClient

    root = tmp_path / "store"
    root.mkdir()
    (root / "study.yaml").write_text(MODEL_STUDY_FILE)
    store = f"sqlite:///{root / 'mlflow.db'}"
    run = subprocess.run([*_sweeper(), "run", "study.yaml", "--tracking-uri", store,
                          "--storage", f"sqlite:///{root / 'optuna.db'}", "--device", "cpu"],
                         cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(MODEL_STUDY)
    version = client.get_model_version_by_alias(MODEL_STUDY, "best")
    logged = client.get_run(version.run_id).data.metrics
    metrics = {k for k in logged if not k.startswith("system/")}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "ui.log"
    with _sweeper_ui(store, port, log, cwd=tmp_path):
        run_page = run_url(url, experiment.experiment_id, version.run_id)
        # A tall window: MLflow renders only the charts in view (three per row). On a busy
        # machine the page may not have drawn its charts when Chromium's time budget ends:
        # the page is loaded again, a few times at most, until it has.
        for attempt in range(3):
            charts = _chromium("--dump-dom", f"{run_page}/model-metrics",
                               profile=tmp_path / f"profile-charts-{attempt}",
                               window="1400,1400")
            assert charts.returncode == 0, charts.stderr[-2000:]
            if chart_titles(charts.stdout):
                break
        assert len(metrics) == 12, sorted(metrics)
        titles = [t for t in chart_titles(charts.stdout) if t in metrics]
        assert "val_accuracy" in titles[:FIRST_CHARTS], titles
        assert not [t for t in chart_titles(charts.stdout) if "class_" in t or t == "lr"]
        overview = _chromium("--dump-dom", run_page, profile=tmp_path / "profile-overview")
        assert overview.returncode == 0, overview.stderr[-2000:]
        link = f"#/models/{MODEL_STUDY}/versions/{version.version}"
        assert link in overview.stdout, "the run links its registered model version"
        assert f"{MODEL_STUDY}-trial-" in overview.stdout, "the logged model, by its name"
