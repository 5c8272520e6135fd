"""The team setup (docker-compose.yml, docker/, .env.example) without Docker: the file is
parsed and checked for what a team relies on (127.0.0.1-only ports, healthchecks, secrets
from .env, two databases), and the MLflow server command it runs, which must be
`sweeper.tracking.server.server_command`, is started for real on a fresh PostgreSQL database."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow_server import postgres_database

from sweeper.errors import TrackingError
from sweeper.tracking.server import (
    AUTH_APP,
    COMPOSE_ALLOWED_HOSTS,
    SERVER_ENV,
    local_command,
    server_command,
    server_env,
    stop_group,
    wait_ready,
)

REPO = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (REPO / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def _option(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def _database(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]


def _published(ports: list[Any]) -> list[tuple[str, str]]:
    """(host ip, host port) of every published port, short or long syntax."""
    found = []
    for port in ports:
        if isinstance(port, dict):
            found.append((str(port.get("host_ip", "")), str(port.get("published", ""))))
        else:
            parts = str(port).split(":")
            ip = parts[0] if len(parts) == 3 else ""
            found.append((ip, parts[-2] if len(parts) >= 2 else ""))
    return found


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif node is not None:
        yield str(node)


def _env_example() -> dict[str, str]:
    values = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_services_and_volumes() -> None:
    assert {"postgres", "mlflow", "worker"} <= set(SERVICES)
    assert SERVICES["postgres"]["image"].startswith("postgres:16")
    assert {"postgres", "mlartifacts", "data"} <= set(COMPOSE["volumes"])
    assert "postgres:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert "mlartifacts:/mlartifacts" in SERVICES["mlflow"]["volumes"]
    assert "data:/data" in SERVICES["worker"]["volumes"]


def test_every_published_port_is_on_loopback() -> None:
    published = {name: _published(service.get("ports", []))
                 for name, service in SERVICES.items()}
    assert published["mlflow"] == [("127.0.0.1", "5000")]
    assert published["postgres"] == [("127.0.0.1", "5433")]
    for name, ports in published.items():
        for ip, _ in ports:
            assert ip == "127.0.0.1", f"{name} publishes a port on {ip or 'all interfaces'}"


def test_worker_can_be_scaled() -> None:
    worker = SERVICES["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports")


def test_healthchecks_and_start_order() -> None:
    postgres, mlflow, worker = SERVICES["postgres"], SERVICES["mlflow"], SERVICES["worker"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert worker["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert worker["depends_on"]["data"]["condition"] == "service_completed_successfully"


SECRETS = ("POSTGRES_PASSWORD", "OPTUNA_DB_PASSWORD", "MLFLOW_DB_PASSWORD",
           "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY")


def test_no_literal_password_and_none_on_a_command_line() -> None:
    assert "${POSTGRES_PASSWORD:?" in SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"]
    urls = [text for text in _strings(COMPOSE) if "://" in text and "@" in text]
    assert len(urls) >= 2  # the Optuna storage and the MLflow backend store
    for url in urls:
        credentials = url.split("://", 1)[1].rsplit("@", 1)[0]
        _user, _, password = credentials.partition(":")
        assert password.startswith("${") and password.split(":?")[0][2:] in SECRETS, \
            f"literal password in {url!r}"
    for name, service in SERVICES.items():
        environment = service.get("environment") or {}
        for key, value in environment.items():
            if "PASSWORD" in key or "SECRET" in key:
                assert str(value).startswith("${"), f"{name}: {key} is a literal"
        # Secrets travel as environment variables: a command line is visible in `ps`.
        for part in [*_strings(service.get("command")), *_strings(service.get("entrypoint"))]:
            assert not any(secret in part for secret in SECRETS), f"{name}: {part}"


def test_env_example_defines_every_variable_and_env_is_private() -> None:
    used = set(INTERPOLATION.findall(COMPOSE_TEXT))
    assert set(SECRETS) <= used
    example = _env_example()
    assert used <= set(example), f"missing in .env.example: {sorted(used - set(example))}"
    for secret in SECRETS:  # empty: `${VAR:?...}` refuses to start until .env sets it
        assert example[secret] == "", secret
        assert f"${{{secret}:?" in COMPOSE_TEXT, secret
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()
    assert ".env" in (REPO / ".dockerignore").read_text().splitlines()


def _user(url: str) -> str:
    return url.split("://", 1)[1].split(":", 1)[0]


def test_optuna_and_mlflow_have_their_own_databases_and_roles() -> None:
    storage = SERVICES["worker"]["environment"]["SWEEPER_STORAGE"]
    backend = SERVICES["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert storage.startswith("postgresql://") and "@postgres:5432/" in storage
    assert backend.startswith("postgresql+psycopg2://") and "@postgres:5432/" in backend
    assert _database(storage) != _database(backend)
    superuser = SERVICES["postgres"]["environment"]["POSTGRES_USER"]
    assert len({_user(storage), _user(backend), superuser}) == 3  # no shared role
    init = (REPO / "docker" / "postgres-init.sql").read_text()
    owners = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+)", init))
    assert owners == {_database(storage): _user(storage), _database(backend): _user(backend)}
    assert set(re.findall(r"CREATE ROLE (\w+) LOGIN", init)) == set(owners.values())


def test_mlflow_runs_exactly_sweepers_server_command_with_auth() -> None:
    mlflow = SERVICES["mlflow"]
    assert mlflow["command"] == server_command(None, "/mlartifacts", host="0.0.0.0",
                                               port=5000, allowed_hosts=COMPOSE_ALLOWED_HOSTS,
                                               app_name=AUTH_APP)
    env = mlflow["environment"]
    assert SERVER_ENV.items() <= env.items()
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_SECRET_KEY:?")
    config = (REPO / "docker" / "mlflow-auth.ini").read_text()
    assert "admin_username = admin" in config and "/mlflow-auth/" in config
    assert "admin_password" not in config
    mounted = {v.split(":")[1] for v in mlflow["volumes"]}
    assert {env["MLFLOW_AUTH_CONFIG_PATH"], "/mlflow-auth"} <= mounted
    worker = SERVICES["worker"]["environment"]
    assert worker["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert worker["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")


def test_worker_environment() -> None:
    worker = SERVICES["worker"]
    env = worker["environment"]
    assert env["SWEEPER_STORAGE"].startswith("postgresql://")
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["SWEEPER_DATA_DIR"] == "/data"
    assert worker["command"][0] == "run"
    assert worker["build"]["dockerfile"] == "docker/Dockerfile"


def test_dockerfiles() -> None:
    worker = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", worker, re.M)
    assert re.search(r"^RUN pip install .*\"\.\[postgres\]\"", worker, re.M)
    assert 'ENTRYPOINT ["sweeper"]' in worker
    assert 'CMD ["run", "studies/mnist_cnn.yaml"]' in worker
    server = (REPO / "docker" / "mlflow.Dockerfile").read_text()
    assert '"mlflow==${MLFLOW_VERSION}"' in server and "psycopg2" in server
    assert "Flask-WTF" in server and "/mlflow-auth" in server  # the basic-auth app
    pins = [re.findall(r"^ARG MLFLOW_VERSION=(\d+\.\d+\.\d+)$", text, re.M)
            for text in (worker, server)]
    assert pins[0] == pins[1] and len(pins[0]) == 1  # client and server: one MLflow
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert {".git", ".venv", "mlruns", "data"} <= set(ignored)


# --------------------------------------------------------------------------------------
# The compose server command, run for real on PostgreSQL
# --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def postgres_db() -> Iterator[str]:
    """A fresh database on the local PostgreSQL, as an MLflow (psycopg2) URI; dropped after."""
    with postgres_database("sweeper_test") as url:
        if url is None:
            pytest.skip("no PostgreSQL on 127.0.0.1:5432 (or psycopg2 missing)")
        yield url


def _status(url: str, host: str, auth: str | None = None) -> int:
    headers = {"Host": host}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request(url, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_compose_server_command_serves_postgresql(postgres_db: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    artifacts = tmp_path / "mlartifacts"
    # The compose command with this machine's database, folder and port; the store and
    # the auth settings come from the environment, as in the compose file.
    command = server_command(None, str(artifacts), host="127.0.0.1", port=port,
                             allowed_hosts=COMPOSE_ALLOWED_HOSTS, workers=1,
                             app_name=AUTH_APP)
    ini = (REPO / "docker" / "mlflow-auth.ini").read_text().replace(
        "sqlite:////mlflow-auth/", f"sqlite:///{tmp_path}/")
    (tmp_path / "mlflow-auth.ini").write_text(ini)
    env = server_env({**os.environ, "MLFLOW_BACKEND_STORE_URI": postgres_db,
                      "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "mlflow-auth.ini"),
                      "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
                      "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-" + "k" * 40})
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(local_command(command), stdout=out,
                                   stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, cwd=tmp_path)
    try:
        try:
            wait_ready(process, f"{url}/health", timeout=90)
        except TrackingError as exc:
            pytest.fail(f"{exc}:\n{log.read_text()[-3000:]}")
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        admin = f"admin:{ADMIN_PASSWORD}"
        assert _status(search, "mlflow:5000") == 401  # no login, no answer
        assert _status(search, "mlflow:5000", "admin:wrong-password") == 401
        os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"  # as the workers sign in
        os.environ["MLFLOW_TRACKING_PASSWORD"] = ADMIN_PASSWORD
        client = MlflowClient(url)
        experiment_id = client.create_experiment("compose-check")
        run = client.create_run(experiment_id, run_name="trial-0")
        client.log_metric(run.info.run_id, "val_accuracy", 0.97)
        note = tmp_path / "note.txt"
        note.write_text("proxied")
        client.log_artifact(run.info.run_id, str(note))
        client.set_terminated(run.info.run_id)

        assert client.get_run(run.info.run_id).data.metrics == {"val_accuracy": 0.97}
        assert client.get_experiment(experiment_id).artifact_location.startswith(
            "mlflow-artifacts:")
        assert [p.name for p in artifacts.rglob("note.txt")] == ["note.txt"]  # proxied
        assert _status(search, "mlflow:5000", admin) == 200  # a worker in another container
        assert _status(search, "127.0.0.1:5000", admin) == 200  # the published port
        assert _status(search, "evil.example:5000", admin) == 403  # DNS rebinding
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
        stop_group(process)
    assert ADMIN_PASSWORD not in log.read_text()


ADMIN_PASSWORD = "compose-admin-Pw-123"


def test_postgres_init_refuses_placeholder_passwords(tmp_path: Path) -> None:
    script = REPO / "docker" / "postgres-init.sh"
    for bad in ("change-me", "short", ""):
        env = {"PATH": os.environ["PATH"], "POSTGRES_USER": "postgres",
               "POSTGRES_PASSWORD": "a-long-password-1", "OPTUNA_DB_PASSWORD": bad,
               "MLFLOW_DB_PASSWORD": "a-long-password-2"}
        done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                              timeout=30, cwd=tmp_path)
        assert done.returncode == 1 and "OPTUNA_DB_PASSWORD" in done.stderr, done.stderr
        assert "password" not in done.stdout


def test_postgres_init_gives_each_service_its_own_role(tmp_path: Path) -> None:
    """docker/postgres-init.sql run by psql on the local PostgreSQL (names made unique):
    each role reaches its own database and not the other's; no password on argv."""
    import uuid

    import psycopg2

    suffix = uuid.uuid4().hex[:8]
    names = {"optuna": f"t{suffix}_optuna", "mlflow": f"t{suffix}_mlflow"}
    sql = (REPO / "docker" / "postgres-init.sql").read_text()
    for name, unique in names.items():
        sql = re.sub(rf"\b{name}\b(?!_password)", unique, sql)
    (tmp_path / "init.sql").write_text(sql)
    env = {**os.environ, "OPTUNA_DB_PASSWORD": "optuna-Pw-123456",
           "MLFLOW_DB_PASSWORD": "mlflow-Pw-123456"}
    admin = ["psql", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres",
             "-d", "postgres"]
    done = subprocess.run([*admin, "-f", str(tmp_path / "init.sql")], env=env,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "could not connect" in done.stderr:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    try:
        assert done.returncode == 0, done.stderr

        def connects(role: str, database: str) -> bool:
            password = env[f"{role.upper()}_DB_PASSWORD"]
            try:
                psycopg2.connect(host="127.0.0.1", user=names[role], password=password,
                                 dbname=names[database]).close()
            except psycopg2.OperationalError:
                return False
            return True

        assert connects("optuna", "optuna") and connects("mlflow", "mlflow")
        assert not connects("optuna", "mlflow") and not connects("mlflow", "optuna")
    finally:
        drop = "; ".join([f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)' for n in names.values()]
                         + [f'DROP ROLE IF EXISTS "{n}"' for n in names.values()])
        for statement in drop.split("; "):
            subprocess.run([*admin, "-c", statement], capture_output=True, timeout=60)
