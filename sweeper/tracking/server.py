"""The MLflow server that sweeper documents, starts and tests: one definition of its command.

`server_command` is the argv of `mlflow server` with proxied artifacts; `sweeper ui` runs
it on the local store, `docker-compose.yml` runs it on PostgreSQL (a test checks the
compose file against it) and the integration tests run it on a free loopback port. This
module is plain data and `subprocess`: it never imports mlflow (cli start stays instant).

MLflow 3's server checks the Host header of every request (DNS-rebinding protection) and by
default accepts only localhost and private IP addresses: a worker that reaches the server
as `http://mlflow:5000` from another container is refused (HTTP 403, "Invalid Host header")
unless the name is in `--allowed-hosts`; see `COMPOSE_ALLOWED_HOSTS`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from sweeper.errors import TrackingError
from sweeper.redaction import without_credentials
from sweeper.uris import DEFAULT_TRACKING_URI, TRACKING_ENV, sqlite_path

DEFAULT_ARTIFACTS = "mlruns/artifacts"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000

# Environment of every server sweeper starts: MLflow's background job runner (GenAI
# scorers, trace archival; seven more processes) is switched off, sweeper uses none of it.
SERVER_ENV: dict[str, str] = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

# Host headers the compose server accepts: the service name other containers use
# (`http://mlflow:5000`) and the loopback names of the port published on the host
# (`http://127.0.0.1:5000`, an SSH tunnel). Giving --allowed-hosts replaces MLflow's
# default list, so the loopback names must be listed too.
COMPOSE_SERVICE = "mlflow"
COMPOSE_ALLOWED_HOSTS: tuple[str, ...] = (
    COMPOSE_SERVICE, f"{COMPOSE_SERVICE}:*", "localhost", "localhost:*", "127.0.0.1",
    "127.0.0.1:*")

# What `sweeper ui` starts: one uvicorn worker is plenty for one person's browser.
UI_WORKERS = 1
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


def server_command(backend_store_uri: str | None, artifacts_destination: str, *,
                   host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                   workers: int | None = None,
                   allowed_hosts: Sequence[str] | None = None,
                   access_log: bool = True, app_name: str | None = None) -> list[str]:
    """The argv of `mlflow server` on `backend_store_uri`, with artifacts proxied by the
    server (`--serve-artifacts`) and stored under `artifacts_destination`.

    `backend_store_uri` None leaves the store to `$MLFLOW_BACKEND_STORE_URI` (compose: a
    password in a URI on a command line is visible to every user of the machine);
    `workers` None keeps MLflow's default (4 uvicorn workers); `allowed_hosts` None keeps
    MLflow's default Host-header check (localhost and private IP addresses only);
    `access_log` False drops uvicorn's line per request (a browser polls every few
    seconds); `app_name` `basic-auth` turns on MLflow's authentication (`ui_auth_env`).
    """
    command = ["mlflow", "server"]
    if backend_store_uri is not None:  # None: from $MLFLOW_BACKEND_STORE_URI, off argv
        command += ["--backend-store-uri", backend_store_uri]
    command += ["--artifacts-destination", artifacts_destination,
               "--serve-artifacts",
               "--host", host,
               "--port", str(port)]
    if workers is not None:
        command += ["--workers", str(workers)]
    if allowed_hosts:
        command += ["--allowed-hosts", ",".join(allowed_hosts)]
    if not access_log:
        command += ["--uvicorn-opts", "--no-access-log"]
    if app_name:
        command += ["--app-name", app_name]
    return command


def mlflow_executable() -> list[str]:
    """How to start this interpreter's mlflow: the `mlflow` script beside `sys.executable`
    (a virtual environment's bin/), else `python -m mlflow`."""
    script = Path(sys.executable).with_name("mlflow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlflow"]


def local_command(command: Sequence[str]) -> list[str]:
    """`command` (from `server_command`) with `mlflow` replaced by this interpreter's."""
    return [*mlflow_executable(), *command[1:]]


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a server subprocess: `base` (default os.environ) plus
    `SERVER_ENV`, without MLFLOW_TRACKING_URI (a server has a store, not a client URI)."""
    env = {**(os.environ if base is None else base), **SERVER_ENV}
    env.pop(TRACKING_ENV, None)
    return env


# --------------------------------------------------------------------------------------
# `sweeper ui`: which store, and running the server in the foreground
# --------------------------------------------------------------------------------------
def resolve_ui_store(explicit: str | None = None,
                     environ: dict[str, str] | None = None) -> str:
    """`--backend-store-uri` > `$MLFLOW_TRACKING_URI` > the local SQLite default; an http
    URI is an error (that is a server already: open it in a browser)."""
    env = os.environ if environ is None else environ
    uri = explicit or env.get(TRACKING_ENV) or DEFAULT_TRACKING_URI
    if uri.lower().startswith(("http://", "https://")):
        source = "--backend-store-uri" if explicit else f"${TRACKING_ENV}"
        raise TrackingError(
            f"{source} is {uri}, an MLflow server: open it in a browser instead; sweeper ui "
            f"serves a store (sqlite:///..., postgresql://...), e.g. "
            f"--backend-store-uri {DEFAULT_TRACKING_URI}")
    return uri


def default_artifacts(backend_store_uri: str) -> str:
    """Where a store's artifacts live: `artifacts/` beside a SQLite file (the default store
    gives `mlruns/artifacts`, where `sweeper run` writes), else `mlruns/artifacts`."""
    path = sqlite_path(backend_store_uri)
    if path is None or backend_store_uri == DEFAULT_TRACKING_URI:
        return DEFAULT_ARTIFACTS
    return str(path.parent / "artifacts")


# --------------------------------------------------------------------------------------
# Authentication: `sweeper ui` on an interface other machines reach
# --------------------------------------------------------------------------------------
AUTH_APP = "basic-auth"  # MLflow's basic-auth app (needs Flask-WTF)
ADMIN_USERNAME_ENV = "MLFLOW_AUTH_ADMIN_USERNAME"
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"  # signs the auth app's CSRF tokens
AUTH_CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
DEFAULT_ADMIN = "admin"


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach a server bound to `host`."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name, 0.0.0.0's peers...: other machines may reach it


def ui_auth_env(host: str, backend_store_uri: str,
                environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment that turns on MLflow's basic auth for a UI bound to `host`, or None
    on a loopback interface (only this machine's users reach it).

    Anyone who reaches an MLflow server without auth can write runs and upload artifacts,
    models included; so a non-loopback host needs `$MLFLOW_AUTH_ADMIN_PASSWORD` (and
    optionally `$MLFLOW_AUTH_ADMIN_USERNAME`, default `admin`), or the UI refuses to start.
    The users database (`basic_auth.db`) and its config (`basic_auth.ini`, no password in
    it) live beside the store; MLflow creates the admin from the environment the first time.
    """
    import secrets

    env = os.environ if environ is None else environ
    if is_loopback(host):
        return None
    password = env.get(ADMIN_PASSWORD_ENV, "")
    if not password:
        raise TrackingError(
            f"sweeper ui --host {host} would let anyone who reaches this machine write runs "
            f"and upload files: set {ADMIN_PASSWORD_ENV} (and {ADMIN_USERNAME_ENV}, default "
            f"{DEFAULT_ADMIN}) to turn on MLflow's basic auth, or serve on 127.0.0.1")
    username = env.get(ADMIN_USERNAME_ENV) or DEFAULT_ADMIN
    path = sqlite_path(backend_store_uri)
    folder = (path.parent if path is not None else Path(DEFAULT_ARTIFACTS).parent).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "# Written by sweeper ui; the admin's password comes from the environment.\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
        f"admin_username = {username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return {AUTH_CONFIG_ENV: str(config), ADMIN_USERNAME_ENV: username,
            ADMIN_PASSWORD_ENV: password,
            SECRET_KEY_ENV: env.get(SECRET_KEY_ENV) or secrets.token_hex(32)}


def browser_url(host: str, port: int) -> str:
    """The URL to open for a server bound to `host` (all interfaces: this machine's)."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def experiment_url(base: str, experiment_id: str) -> str:
    """The runs page of an experiment in MLflow's model-training view (MLflow 3 opens its
    GenAI view by default, which does not list runs)."""
    base = without_credentials(base)
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning")


def trial_runs_url(base: str, experiment_id: str, metric: str = "val_accuracy",
                   maximize: bool = True) -> str:
    """The runs page with every trial run listed flat, best `metric` first. Sorted by
    creation time (the default), the UI folds trial runs under their collapsed parent."""
    from urllib.parse import quote

    key = quote(f"metrics.`{metric}`", safe="")
    return (f"{experiment_url(base, experiment_id)}&orderByKey={key}"
            f"&orderByAsc={'false' if maximize else 'true'}")


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """The UI page of one run (never with the credentials of a tracking URI: the browser
    asks for them)."""
    base = without_credentials(base)
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def check_port_free(host: str, port: int) -> None:
    """Fail in one line when something already listens on host:port (another UI?)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TrackingError(f"cannot serve on --host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as exc:
            raise TrackingError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc} (another MLflow UI "
                f"running?); choose another with --port") from None


class _Stop(Exception):
    """SIGTERM arrived: stop the server and exit cleanly."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Linux: a small guard runs the server and takes its whole process group down (the
# server and the uvicorn workers it spawns) when `sweeper ui` dies, even by kill -9: the
# kernel sends the guard SIGTERM as its parent goes (PR_SET_PDEATHSIG).
_GUARD = """
import ctypes, os, signal, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
def stop(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
signal.signal(signal.SIGTERM, stop)
sys.exit(subprocess.Popen(sys.argv[2:]).wait())
"""


def _guarded(command: Sequence[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-c", _GUARD, str(os.getpid()), *command]


def run_server(command: Sequence[str], health_url: str, *,
               on_ready: Callable[[], None] | None = None,
               env: dict[str, str] | None = None,
               startup_timeout: float = STARTUP_TIMEOUT_S) -> int:
    """Run `command` (an `mlflow server` argv) in the foreground until it ends.

    Calls `on_ready` once `health_url` answers. Ctrl-C returns 130 and SIGTERM returns 0,
    after stopping the server and the workers it spawned (it runs in its own process group,
    so nothing is left behind). A server that dies by itself raises `TrackingError` (its own
    messages are on stderr above).
    """
    process = subprocess.Popen(_guarded(command), env=server_env() if env is None else env,
                               start_new_session=True)
    try:
        with _sigterm_raises():
            wait_ready(process, health_url, startup_timeout)
            if on_ready is not None:
                on_ready()
            code = process.wait()
    except KeyboardInterrupt:
        stop_group(process)
        return 130
    except _Stop:
        stop_group(process)
        return 0
    except BaseException:
        stop_group(process)
        raise
    stop_group(process)  # the uvicorn workers, should the server have left any
    if code != 0:
        raise TrackingError(f"mlflow server exited with code {code}; its messages are above")
    return 0


def wait_ready(process: subprocess.Popen[bytes], health_url: str,
               timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Block until `health_url` answers 200; `TrackingError` if the server exits first or
    does not answer within `timeout` seconds."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise TrackingError(f"mlflow server exited with code {code} before it was ready; "
                                f"its messages are above")
        try:
            with opener.open(health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise TrackingError(f"mlflow server did not answer {health_url} within {timeout:.0f} s")


def stop_group(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the server's process group, SIGKILL whatever is left after `timeout`."""
    def signal_group(sig: int) -> bool:
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    if not signal_group(signal.SIGTERM):
        process.poll()
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.poll()  # reap the leader so the group can empty
        if not signal_group(0):  # signal 0: is anyone in the group still there?
            return
        time.sleep(0.1)
    signal_group(signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
