"""No secret leaks: one URL redactor (`sweeper.redaction`) for every output path, and
credentials in a tracking URI work.

The end-to-end test starts `sweeper ui --host 0.0.0.0` (MLflow's basic-auth app), checks
that an unauthenticated request gets 401, runs a study with the password in both the
storage URL (PostgreSQL, trust auth: any password connects) and the tracking URI, then
reads every output path: the CLI's lines, `--json`, `--debug` logs, MLflow tags and params,
Optuna attrs.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_server import free_port, postgres_database
from typer.testing import CliRunner

from studies import tiny_study
from sweeper.cli import app
from sweeper.redaction import RedactingFilter, redact_text, redact_url, without_credentials
from sweeper.tracking.server import ui_auth_env
from sweeper.uris import credentials_to_env

SECRET = "Sw33p-s3cret-XYZ"  # must appear nowhere a person or a record can see
runner = CliRunner()


# --------------------------------------------------------------------------------------
# The redactor
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("url, expected", [
    (f"postgresql://alice:{SECRET}@db:5432/optuna", "postgresql://alice:***@db:5432/optuna"),
    (f"postgresql://alice@db/optuna?sslmode=require&password={SECRET}",
     "postgresql://alice@db/optuna?sslmode=require&password=***"),
    (f"https://u:{SECRET}@host/path?api_key={SECRET}&x=1",
     "https://u:***@host/path?api_key=***&x=1"),
    (f"s3://bucket/key?X-Amz-Signature={SECRET}", "s3://bucket/key?X-Amz-Signature=***"),
    ("sqlite:///mlruns/optuna.db", "sqlite:///mlruns/optuna.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    (f"http://[::1:{SECRET}@x", "http://***"),  # unparseable: everything masked
    ("not a url", "not a url"),
])
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_links_drop_credentials_and_text_is_redacted() -> None:
    assert without_credentials(f"http://admin:{SECRET}@h:5000/#/x") == "http://h:5000/#/x"
    text = f"cannot reach postgresql://bob:{SECRET}@db/x (refused); http://a:{SECRET}@c/ too"
    assert SECRET not in redact_text(text) and "bob:***@db" in redact_text(text)
    assert redact_text(f"store db://h/x?password={SECRET}: refused") == \
        "store db://h/x?password=***: refused"


def test_log_lines_and_tracebacks_are_redacted() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "store %s failed",
                               (f"postgresql://u:{SECRET}@h/db",), None)
    try:
        raise RuntimeError(f"boom at http://u:{SECRET}@h/")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record)
    assert SECRET not in logging.Formatter().format(record)


def test_tracking_uri_credentials_move_to_mlflows_environment() -> None:
    env: dict[str, str] = {}
    assert credentials_to_env(f"http://admin:{SECRET}@h:5000", env) == "http://h:5000"
    assert env == {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": SECRET}


# --------------------------------------------------------------------------------------
# CLI lines and `sweeper ui`'s door
# --------------------------------------------------------------------------------------
def test_error_line_hides_storage_passwords() -> None:
    url = f"postgresql://alice:{SECRET}@127.0.0.1:1/optuna?password={SECRET}"
    result = runner.invoke(app, ["studies", "--storage", url])
    assert result.exit_code == 2, result.output
    assert SECRET not in result.output and "alice:***@127.0.0.1:1" in result.output


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.7", "my-host"])
def test_ui_on_a_shared_interface_refuses_without_credentials(
        host: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["ui", "--host", host, "--port", str(free_port())])
    assert result.exit_code == 2
    assert "set MLFLOW_AUTH_ADMIN_PASSWORD" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_ui_auth_env_only_off_loopback(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert ui_auth_env("127.0.0.1", store, {}) is None
    assert ui_auth_env("::1", store, {}) is None
    env = ui_auth_env("0.0.0.0", store, {"MLFLOW_AUTH_ADMIN_PASSWORD": SECRET})
    assert env is not None and env["MLFLOW_AUTH_ADMIN_USERNAME"] == "admin"
    config = Path(env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    assert SECRET not in config and str(tmp_path / "basic_auth.db") in config


# --------------------------------------------------------------------------------------
# End to end: an authenticated server, a study with passwords in both URLs
# --------------------------------------------------------------------------------------
STUDY = tiny_study("secret-study")


def _request(url: str, *, data: dict | None = None, auth: bool) -> int:
    headers = {"Content-Type": "application/json"}
    if auth:
        token = base64.b64encode(f"admin:{SECRET}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    request = urllib.request.Request(url, data=json.dumps(data).encode() if data else None,
                                     headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # not listening yet
        return 0


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`sweeper ui --host 0.0.0.0` with the admin password set: its loopback URL."""
    root = tmp_path_factory.mktemp("auth-ui")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = SECRET
    log = (root / "ui.log").open("w")
    ui = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "ui", "--host", "0.0.0.0",
                           "--port", str(port)], cwd=root, env=env, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while _request(f"{url}/health", auth=False) != 200:
            assert ui.poll() is None, (root / "ui.log").read_text()
            assert time.monotonic() < deadline, (root / "ui.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        ui.wait(timeout=60)
        assert SECRET not in (root / "ui.log").read_text()


@pytest.mark.slow
def test_unauthenticated_requests_get_401(auth_server: str) -> None:
    create = f"{auth_server}/api/2.0/mlflow/experiments/create"
    search = f"{auth_server}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _request(create, data={"name": "intruder"}, auth=False) == 401
    assert _request(search, auth=False) == 401
    assert _request(search, auth=True) == 200


@pytest.mark.slow
def test_no_output_path_shows_a_password(auth_server: str, tmp_path: Path) -> None:
    import optuna
    from mlflow import MlflowClient

    with postgres_database("sweeper_secret", scheme="postgresql") as database:
        if database is None:
            pytest.skip("no PostgreSQL on 127.0.0.1:5432")
        # Trust authentication accepts any password: the URL carries one all the same.
        storage = database.replace("postgres@", f"postgres:{SECRET}@")
        tracking = auth_server.replace("http://", f"http://admin:{SECRET}@")
        (tmp_path / "study.yaml").write_text(STUDY)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(SWEEPER_STORAGE=storage, MLFLOW_TRACKING_URI=tracking)

        def sweeper(*args: str) -> str:
            done = subprocess.run([sys.executable, "-m", "sweeper.cli", *args], cwd=tmp_path,
                                  env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout + done.stderr

        outputs = {"run": sweeper("run", "study.yaml", "--device", "cpu"),
                   "best --json": sweeper("best", "secret-study", "--json"),
                   "trials --json": sweeper("trials", "secret-study", "--json"),
                   "studies --json": sweeper("studies", "--json"),
                   "best --debug": sweeper("best", "secret-study", "--debug")}
        for name, text in outputs.items():
            assert SECRET not in text, f"{name}: {text}"
        best = json.loads(outputs["best --json"])
        best = best[0] if isinstance(best, list) else best
        assert best["run_url"].startswith(f"{auth_server}/#/experiments/")

        # MLflow tags and params, with the credentials the client takes from the env
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = \
            "admin", SECRET
        try:
            client = MlflowClient(auth_server)
            experiment = client.get_experiment_by_name("secret-study")
            runs = client.search_runs([experiment.experiment_id])
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME")
            os.environ.pop("MLFLOW_TRACKING_PASSWORD")
        assert len(runs) == 3  # the parent and two trials
        for run in runs:
            recorded = json.dumps([run.data.tags, run.data.params])
            assert SECRET not in recorded
        # Optuna attrs of the study and of every trial
        study = optuna.load_study(study_name="secret-study",
                                  storage=database.replace("postgresql://",
                                                           "postgresql+psycopg2://"))
        attrs = [study.user_attrs, study._storage.get_study_system_attrs(study._study_id),
                 *([t.user_attrs, t.system_attrs] for t in study.trials)]
        assert SECRET not in json.dumps(attrs, default=str)
