"""Faults around a running study, with real processes and stores: two workers with
different heartbeats, PostgreSQL backends terminated again and again, the MLflow server
killed and restarted mid-study, a full disk. Afterwards every trial's state agrees in
Optuna and MLflow, and nothing is RUNNING."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_server import PG_ADMIN, MlflowServer, postgres_database
from optuna.trial import TrialState
from processes import assert_agree, env, finish, sweeper, trials_of, wait_until

from studies import tiny_study
from sweeper.keys import ATTR_CONFIG
from sweeper.search.storage import open_storage

pytestmark = pytest.mark.slow

def study_file(root: Path, name: str, *, trials: int, epochs: int = 1,
               train: int = 64) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(tiny_study(name, trials=trials, epochs=epochs, train=train, test=32,
                               hidden="[8]", train_block="batch_size: 32"))
    return path



# --------------------------------------------------------------------------------------
# Heartbeats: each trial judged by its own worker's settings
# --------------------------------------------------------------------------------------
def test_a_fast_beating_worker_leaves_a_slow_beating_workers_trial_alone(tmp_path: Path
                                                                         ) -> None:
    path = study_file(tmp_path, "beats2", trials=1, epochs=5000, train=256)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    slow = sweeper("run", str(path), "--storage", storage, "--device", "cpu",
                   "--no-tracking", "--heartbeat", "60s", cwd=tmp_path)
    try:
        def training() -> bool:
            (trial,) = trials_of(storage, "beats2")
            return trial.state == TrialState.RUNNING and ATTR_CONFIG in trial.system_attrs
        wait_until(training, what="the slow-beating worker's trial",
                   process=slow)
        time.sleep(6)  # silent longer than the fast worker's own grace (4 s)
        code, out, err = finish(sweeper("run", str(path), "--storage", storage, "--device",
                                        "cpu", "--no-tracking", "--heartbeat", "1s",
                                        cwd=tmp_path), timeout=300)
        assert code == 0, out + err
        assert "worker lost" not in out + err
        (trial,) = trials_of(storage, "beats2")
        assert trial.state == TrialState.RUNNING and "fail_reason" not in trial.user_attrs
    finally:
        slow.send_signal(signal.SIGTERM)
    code, out, err = finish(slow, timeout=120)
    assert code == 143, out + err
    trial, retry = trials_of(storage, "beats2")
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "terminated (SIGTERM)"
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == trial.number


# --------------------------------------------------------------------------------------
# PostgreSQL: backends terminated again and again
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def terminating_backends(database: str, every_s: tuple[float, float]) -> Iterator[list[int]]:
    """A thread that terminates every connection to `database` at random intervals."""
    import random

    import psycopg2

    stop = threading.Event()
    killed: list[int] = []

    def loop() -> None:
        conn = psycopg2.connect(PG_ADMIN)
        conn.autocommit = True
        try:
            while not stop.wait(random.uniform(*every_s)):
                with conn.cursor() as cur:
                    cur.execute("SELECT count(pg_terminate_backend(pid)) FROM "
                                "pg_stat_activity WHERE datname = %s AND pid <> "
                                "pg_backend_pid()", (database,))
                    killed.append(int(cur.fetchone()[0]))
        finally:
            conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        stop.set()
        thread.join(timeout=10)


def test_postgres_backends_terminated_repeatedly_the_study_completes(tmp_path: Path) -> None:
    with postgres_database("sweeper_faults", scheme="postgresql") as url:
        if url is None:
            pytest.skip("no PostgreSQL on 127.0.0.1:5432")
        database = url.rsplit("/", 1)[1]
        open_storage(url)  # the tables, before the faults start
        tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
        path = study_file(tmp_path, "pgfaults", trials=8, epochs=3)
        process = sweeper("run", str(path), "--storage", url, "--device", "cpu",
                          "--tracking-uri", tracking, cwd=tmp_path)
        # During the study: from its first trial on (a storm this dense at start-up can
        # outlast the retries of opening the storage, on a loaded machine).
        wait_until(lambda: any(t.state == TrialState.RUNNING for t in trials_of(url, "pgfaults")),
                   what="the first trial", process=process)
        with terminating_backends(database, (0.1, 0.3)) as killed:
            code, out, err = finish(process)
        assert sum(killed) > 10, f"only {sum(killed)} backends were terminated"
        assert code == 0, out + err
        assert "Traceback" not in err
        trials = assert_agree(url, tracking, "pgfaults")
        finished = [t for t in trials if t.state.is_finished()]
        assert len(finished) >= 8
        assert [t.state for t in finished].count(TrialState.COMPLETE) >= 8, \
            [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in finished]


def test_a_lasting_outage_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import psycopg2

    with postgres_database("sweeper_outage", scheme="postgresql") as url:
        if url is None:
            pytest.skip("no PostgreSQL on 127.0.0.1:5432")
        database = url.rsplit("/", 1)[1]
        tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
        path = study_file(tmp_path, "outage", trials=50, epochs=2)
        process = sweeper("run", str(path), "--storage", url, "--device", "cpu",
                          "--tracking-uri", tracking, cwd=tmp_path)
        wait_until(lambda: any(t.state == TrialState.COMPLETE
                               for t in trials_of(url, "outage")), what="a trial",
                   process=process)
        admin = psycopg2.connect(PG_ADMIN)
        admin.autocommit = True
        try:
            with admin.cursor() as cur:  # the database refuses every connection from now on
                cur.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                            "datname = %s", (database,))
            code, out, err = finish(process, timeout=300)
        finally:
            with admin.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            admin.close()
        assert code == 2, out + err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Optuna storage" in errors[0], err
        # Once the database is back, reap settles what the outage left.
        code, out, err = finish(sweeper("reap", "outage", "--all", "--storage", url,
                                        "--tracking-uri", tracking, cwd=tmp_path))
        assert code == 0, out + err
        assert_agree(url, tracking, "outage")


# --------------------------------------------------------------------------------------
# The MLflow server killed and restarted mid-study
# --------------------------------------------------------------------------------------
def test_mlflow_server_killed_and_restarted_mid_study(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "server").start()
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    path = study_file(tmp_path, "away", trials=8, epochs=3, train=256)
    try:
        url = server.wait_ready()
        process = sweeper("run", str(path), "--storage", storage, "--device", "cpu",
                          "--tracking-uri", url, cwd=tmp_path)

        def complete(n: int) -> bool:
            return sum(t.state == TrialState.COMPLETE for t in trials_of(storage, "away")) >= n
        wait_until(lambda: complete(2), what="two trials", process=process)
        server.kill()
        wait_until(lambda: complete(4), what="trials with the server away",
                   process=process)
        server = MlflowServer(tmp_path / "server", port=server.port).start()
        server.wait_ready()
        code, out, err = finish(process)
        assert code == 0, out + err
        assert "Traceback" not in err
        code, reaped, err = finish(sweeper("reap", "away", "--storage", storage,
                                           "--tracking-uri", url, "--json", cwd=tmp_path))
        assert code == 0, reaped + err
        json.loads(reaped)  # one JSON object, no "View run" lines from MLflow
        trials = assert_agree(storage, url, "away")
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("away")
        runs = {r.data.tags["sweeper.trial_number"]: r for r in client.search_runs(
            [experiment.experiment_id], filter_string="tags.`sweeper.role` = 'trial'")}
        for trial in trials:
            if trial.state == TrialState.COMPLETE:
                assert "val_accuracy" in runs[str(trial.number)].data.metrics, trial.number
    finally:
        server.stop()


# --------------------------------------------------------------------------------------
# `sweeper ui` takes its server down with it
# --------------------------------------------------------------------------------------
def test_killing_sweeper_ui_takes_its_mlflow_server_down(tmp_path: Path) -> None:
    import urllib.request

    from mlflow_server import free_port

    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "ui", "--port", str(port)],
                          cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)

    def answers() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return reply.status == 200

    try:
        wait_until(answers, timeout=180, what="the UI")
    finally:
        ui.kill()  # kill -9: no chance to clean up
        ui.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            answers()
        except OSError:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the mlflow server outlived `sweeper ui`")


# --------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "48m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(path)], capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> None:
    """Write zeros until the disk is full."""
    with contextlib.suppress(OSError), (disk / "filler").open("wb") as out:
        block = b"\0" * (1 << 20)
        while True:
            out.write(block)
            out.flush()


def test_a_full_disk_is_one_line_exit_2_and_nothing_running(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    # The databases on a sound disk, the artifacts and temporary files on a small one.
    with small_tmpfs(tmp_path / "mlruns" / "artifacts") as disk:
        (disk / "tmp").mkdir()
        path = study_file(tmp_path, "full", trials=20, epochs=2)
        process = sweeper("run", str(path), "--device", "cpu", cwd=tmp_path,
                          TMPDIR=str(disk / "tmp"))
        wait_until(lambda: any(t.state == TrialState.COMPLETE
                               for t in trials_of(storage, "full")), what="a trial",
                   process=process)
        fill(disk)
        code, out, err = finish(process, timeout=300)
        assert code == 2, out + err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "disk is full" in errors[0], err
        assert_agree(storage, tracking, "full")
        trials = trials_of(storage, "full")
        assert len(trials) < 20, "the worker stopped at the full disk"


# --------------------------------------------------------------------------------------
# kill -9 right after a trial: its record is repaired
# --------------------------------------------------------------------------------------
def test_kill_9_after_a_trial_loses_nothing_after_a_restart_and_a_reap(tmp_path: Path
                                                                        ) -> None:
    from sweeper.fleet.stopping import TEST_SIGNAL_ENV

    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    path = study_file(tmp_path, "nine", trials=3, epochs=2)
    # SIGKILL the moment trial 0 is told: its uploads and status may still be queued.
    code, out, err = finish(sweeper("run", str(path), "--device", "cpu", cwd=tmp_path,
                                    **{TEST_SIGNAL_ENV: "between-trials:SIGKILL"}))
    assert code == -signal.SIGKILL, out + err
    (first,) = trials_of(storage, "nine")
    assert first.state == TrialState.COMPLETE
    # The next worker ends what the killed one left RUNNING, and goes on.
    code, out, err = finish(sweeper("run", str(path), "--device", "cpu", cwd=tmp_path))
    assert code == 0, out + err
    code, reaped, err = finish(sweeper("reap", "nine", "--json", cwd=tmp_path))
    assert code == 0, reaped + err
    json.loads(reaped)
    trials = assert_agree(storage, tracking, "nine")
    client = MlflowClient(tracking)
    runs = {r.data.tags["sweeper.trial_number"]: r for r in client.search_runs(
        [client.get_experiment_by_name("nine").experiment_id],
        filter_string="tags.`sweeper.role` = 'trial'")}
    for trial in trials:
        assert "val_accuracy" in runs[str(trial.number)].data.metrics, trial.number
