"""The `sweeper` command line.

This is the one place that turns a `SweeperError` into a one-line message and exit code 2
(a traceback only with `--debug`). Heavy imports (torch, optuna, mlflow) happen inside the
commands that need them, so `sweeper --help` and `sweeper validate` start instantly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from sweeper import __version__
from sweeper.errors import ConfigError, SweeperError
from sweeper.keys import ATTR_EXPERIMENT, ATTR_PARENT_RUN

if TYPE_CHECKING:
    import optuna

    from sweeper.spec.config import StudySpec
    from sweeper.tracking.tracker import MlflowTracker

app = typer.Typer(
    name="sweeper",
    help="Hyperparameter sweeps for PyTorch image classifiers: Optuna studies, "
         "tracked in MLflow.",
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _console_width(stream: object) -> int | None:
    """Rich's own width on a terminal or where `COLUMNS` sets one; piped output (logs, CI)
    otherwise gets room for tables instead of rich's 80-column default."""
    if getattr(stream, "isatty", lambda: False)() or os.environ.get("COLUMNS", "").isdigit():
        return None
    return 140


out = Console(highlight=False, width=_console_width(sys.stdout))
err = Console(stderr=True, highlight=False, width=_console_width(sys.stderr))

# Options shared by several commands.
StudyFile = Annotated[Path, typer.Argument(help="The study file (YAML), e.g. "
                                                "studies/quickstart.yaml.", show_default=False)]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]
StorageOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045 - typer needs Optional
    "--storage", envvar="SWEEPER_STORAGE", show_default=False,
    help="Optuna storage URL [default: sqlite:///mlruns/optuna.db].")]

TrackingOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", show_default=False,
    help="MLflow tracking server or store [default: sqlite:///mlruns/mlflow.db].")]
StudyName = Annotated[str, typer.Argument(help="The study's name (its `name:`), e.g. "
                                               "quickstart; `sweeper studies` lists them.",
                                          show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]
DeviceOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--device", show_default=False,
    help="cpu, cuda or cuda:N [default: cuda when available, else cpu].")]
DataDirOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    "--data-dir", envvar="SWEEPER_DATA_DIR", show_default=False,
    help="Where datasets live (and are downloaded to) [default: ./data].")]


@contextlib.contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """One line and exit 2 for a problem the user can fix; 130 for Ctrl-C."""
    from sweeper.redaction import install_log_filter, redact_text

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    install_log_filter()  # no log line shows a password, whoever logs it
    if not debug:
        # Optuna's own INFO lines ("A new study created ...") and experimental-feature
        # warnings repeat what sweeper shows anyway.
        import warnings

        warnings.filterwarnings("ignore", message=r".*experimental feature.*")
    try:
        yield
    except SweeperError as exc:
        if debug:
            raise
        err.print(f"error: {redact_text(str(exc))}", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as stop:
        if debug:
            raise
        reason = getattr(stop, "reason", None) or (str(stop) if str(stop) else "interrupted")
        # What the worker recorded on the way out (see `Worker.run`).
        recorded = getattr(stop, "recorded", None) or (
            "stopped at once: a running trial may be left RUNNING; `sweeper reap STUDY` "
            "ends it")
        err.print(f"{reason}: {recorded}", markup=False)
        # 130 for Ctrl-C, 143 for SIGTERM: what a shell reports for either signal.
        raise typer.Exit(143 if "SIGTERM" in reason else 130) from None


def _quiet_optuna() -> None:
    import optuna  # only commands that touch a study get here

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _quiet_libraries(debug: bool) -> None:
    """Optuna's and MLflow's INFO lines (creating tables...) and urllib3's line per HTTP
    retry: sweeper's own one-line messages say what matters."""
    if debug:
        return
    _quiet_optuna()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def _version(value: bool) -> None:
    if value:
        out.print(f"sweeper {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Hyperparameter sweeps for PyTorch image classifiers: Optuna studies, tracked in
    MLflow."""


@app.command()
def run(
    file: StudyFile,
    trials: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--trials", min=1, show_default=False,
        help="Run this many more trials, whatever the study's budget says.")] = None,
    timeout: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--timeout", show_default=False,
        help="Start no new trial after this long (90, 90s, 30m, 2h).")] = None,
    jobs: Annotated[int, typer.Option(
        "--jobs", "-j", min=1, envvar="SWEEPER_JOBS",
        help="Worker processes on this machine (one GPU each when there are several; on "
             "the CPU the cores are shared out).")] = 1,
    pack: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--pack", min=1, max=64, show_default=False,
        help="Train up to K trials of one shape together as one stacked network (trial "
             "packing); overrides the study file's `pack`.")] = None,
    storage: StorageOpt = None,
    device: DeviceOpt = None,
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
    no_tracking: Annotated[bool, typer.Option(
        "--no-tracking", help="Do not log to MLflow (Optuna still records every trial).")
    ] = False,
    heartbeat: Annotated[str, typer.Option(
        "--heartbeat", envvar="SWEEPER_HEARTBEAT",
        help="How often a running trial says it is alive; one silent for 4 beats is taken "
             "back (FAIL 'worker lost', re-queued once).")] = "30s",
    max_worker_failures: Annotated[int, typer.Option(
        "--max-worker-failures", min=1,
        help="A worker stops itself after this many trials in a row fail for reasons "
             "outside their params (the machine, not the config).")] = 3,
    debug: Debug = False,
) -> None:
    """Create or resume the study in FILE and run trials until its budget is reached."""
    from sweeper.spec import config

    with user_errors(debug):
        spec = config.load(file)
        if pack is not None:
            spec = config.with_pack(spec, pack)
        _quiet_libraries(debug)
        seconds = _duration(timeout, "--timeout")
        beat = _duration(heartbeat, "--heartbeat")
        assert beat is not None

        from sweeper.fleet.heartbeat import HeartbeatSettings
        from sweeper.fleet.stopping import Stopped, stop_on_signals
        from sweeper.render.display import RunDisplay, print_summary
        from sweeper.search.study import RunOptions, open_or_create, run_study
        from sweeper.uris import resolve_storage_url

        options = RunOptions(storage=resolve_storage_url(storage), more_trials=trials,
                             timeout=seconds, device=device, data_dir=data_dir,
                             heartbeat=HeartbeatSettings.from_interval(beat),
                             max_worker_failures=max_worker_failures)
        display = RunDisplay(spec, err)
        tracker = None
        if jobs > 1:
            from sweeper.fleet.jobs import run_jobs

            report = run_jobs(spec, options, jobs, tracking_uri=tracking_uri,
                              tracking=not no_tracking, progress=display, debug=debug)
        else:
            if not no_tracking:
                from sweeper.tracking.tracker import MlflowTracker

                # run_study calls tracker.check() before it writes anything.
                tracker = MlflowTracker(tracking_uri, device=device, worker=options.worker)
            with stop_on_signals():
                report = run_study(spec, options, tracker=tracker, progress=display)
        for line in report.lost:
            err.print(f"warning: {line}", markup=False, soft_wrap=True)
        if report.interrupted:
            stop = Stopped(report.interrupted)
            stop.recorded = "the running trials were recorded as FAIL"  # type: ignore[attr-defined]
            raise stop
        study = report.study or open_or_create(spec, options.storage)[0]
        if report.stopped_by == "nothing-to-do":
            out.print(f"study {spec.name!r} already has {report.finished_before}/"
                      f"{report.target} trials: nothing to do (use --trials N to run N more)")
        else:
            print_summary(report, study, out)
        if not no_tracking:
            _print_tracking(study, spec, tracking_uri, tracker)
        if report.errors:
            for message in report.errors:
                err.print(f"error: {message}", markup=False, soft_wrap=True)
            raise typer.Exit(2)
        if report.message:
            err.print(f"error: {report.message}", markup=False, soft_wrap=True)
            raise typer.Exit(1)


def _print_tracking(study: optuna.Study, spec: StudySpec, tracking_uri: str | None,
                    tracker: MlflowTracker | None) -> None:
    """Where the study's runs are, and how to browse them."""
    from sweeper.search.storage import redact
    from sweeper.uris import client_uri

    parent = study.user_attrs.get(ATTR_PARENT_RUN)
    if parent is None or (tracker is not None and tracker.parent_run_id is None):
        return
    uri = client_uri(tracking_uri)
    failures = tracker.failures if tracker is not None else []
    note = f"; {len(failures)} tracking warning(s)" if failures else ""
    out.print(f"MLflow: experiment {spec.name!r} in {redact(uri)}, parent run {parent}{note}",
              markup=False, soft_wrap=True)
    hint = _browse_hint(uri, study.user_attrs.get(ATTR_EXPERIMENT), spec)
    out.print(f"  browse: {hint}", markup=False, soft_wrap=True)
    if tracker is not None and (tracker.unsent or tracker.parent_unsent):
        missing = [f"trial(s) {', '.join(f'#{n}' for n in tracker.unsent)}"] \
            if tracker.unsent else []
        if tracker.parent_unsent:
            missing.append("the parent run's end")
        err.print(f"warning: MLflow is missing the record of {' and '.join(missing)}: run "
                  f"`sweeper reap {spec.name}` once it answers", markup=False,
                  soft_wrap=True)


def _duration(value: str | None, option: str) -> float | None:
    from sweeper.spec import config

    if value is None:
        return None
    try:
        return config.parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{exc}", file=option) from None


def _browse_hint(tracking_uri: str, experiment_id: str | None, spec: StudySpec) -> str:
    """Where to see the trials: the server's page, else `sweeper ui` on the local store."""
    from sweeper.tracking import server
    from sweeper.uris import DEFAULT_TRACKING_URI, sqlite_path

    if tracking_uri.startswith(("http://", "https://")) and experiment_id:
        objective = spec.objective_list[0]
        return server.trial_runs_url(tracking_uri, experiment_id, objective.metric,
                                     objective.direction == "maximize")
    default = sqlite_path(DEFAULT_TRACKING_URI)
    here = sqlite_path(tracking_uri)
    if here is not None and default is not None and here.resolve() == default.resolve():
        return "sweeper ui"
    return f"sweeper ui --backend-store-uri {tracking_uri}"


@app.command()
def validate(file: StudyFile, debug: Debug = False) -> None:
    """Check a study file without running it, and print its search space."""
    from sweeper.render.display import print_networks, print_space
    from sweeper.spec import config, space

    with user_errors(debug):
        spec = config.load(file)
        print_space(spec, space.describe(spec), space.size(spec),
                    space.infeasible_corners(spec), out)
        print_networks(space.networks(spec), out)


@app.command()
def ui(
    backend_store_uri: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--backend-store-uri", show_default=False,
        help="The MLflow store to serve [default: $MLFLOW_TRACKING_URI, else "
             "sqlite:///mlruns/mlflow.db, where `sweeper run` logs].")] = None,
    artifacts: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--artifacts-destination", show_default=False,
        help="Where artifacts uploaded through this server go [default: artifacts/ beside "
             "a SQLite store, else mlruns/artifacts].")] = None,
    host: Annotated[str, typer.Option(
        "--host", help="Interface to listen on; 0.0.0.0 opens it to other machines, "
                       "which needs $MLFLOW_AUTH_ADMIN_PASSWORD (MLflow's basic auth; "
                       "MLflow then accepts only localhost and private-IP Host headers: "
                       "set MLFLOW_SERVER_ALLOWED_HOSTS for a name).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 5000,
    debug: Debug = False,
) -> None:
    """Serve the MLflow UI on the store that `sweeper run` logs to (Ctrl-C stops it)."""
    from sweeper.search.storage import redact
    from sweeper.tracking import server
    from sweeper.uris import sqlite_path

    with user_errors(debug):
        store = server.resolve_ui_store(backend_store_uri)
        auth = server.ui_auth_env(host, store)  # refuses a non-loopback host without one
        database = sqlite_path(store)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        artifacts = artifacts or server.default_artifacts(store)
        server.check_port_free(host, port)
        command = server.server_command(store, artifacts, host=host, port=port,
                                        workers=server.UI_WORKERS, access_log=False,
                                        app_name=server.AUTH_APP if auth else None)
        url = server.browser_url(host, port)
        err.print(f"starting mlflow server on {redact(store)} (artifacts {artifacts}) ...",
                  markup=False, soft_wrap=True)
        if auth:
            err.print(f"basic auth on: sign in as {auth[server.ADMIN_USERNAME_ENV]} with "
                      f"${server.ADMIN_PASSWORD_ENV}", markup=False, soft_wrap=True)
        code = server.run_server(server.local_command(command), f"{url}/health",
                                 env=server.server_env({**os.environ, **(auth or {})}),
                                 on_ready=lambda: out.print(
                                     f"MLflow UI: {url}  (Ctrl-C to stop)\n  a study is an "
                                     f"experiment, its trials are runs: choose \"Model "
                                     f"training\" at the top left", markup=False,
                                     soft_wrap=True))
    if code == 130:
        err.print("MLflow UI stopped", markup=False)
    raise typer.Exit(code)


@app.command()
def reap(
    study: StudyName,
    grace: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--grace", show_default=False,
        help="A RUNNING trial whose worker has been silent this long is lost, and so is "
             "the worker of a finished trial whose run is still RUNNING [default: the "
             "grace its worker recorded (4 of its heartbeats), else 2m].")] = None,
    everything: Annotated[bool, typer.Option(
        "--all", help="Every RUNNING trial is lost, and every RUNNING run ended, silent or "
                      "not: when you know that no worker of the study is alive.")] = False,
    no_retry: Annotated[bool, typer.Option(
        "--no-retry", help="Do not re-queue the lost trials.")] = False,
    as_json: JsonOpt = False,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    debug: Debug = False,
) -> None:
    """End what crashed workers left: lost trials FAIL (re-queued once) and their MLflow
    runs, and the parent run once nothing runs."""
    import json

    from sweeper.fleet.reap import reap as reap_study

    with user_errors(debug):
        _quiet_libraries(debug)
        seconds = _duration(grace, "--grace")
        report = reap_study(study, storage=storage, tracking_uri=tracking_uri,
                            grace_s=seconds, everything=everything, retry=not no_retry)
        if as_json:
            _print_text(json.dumps(report.as_dict()))
            return
        for number, retry in report.lost:
            again = f"re-queued as trial {retry}" if retry is not None else "not re-queued"
            out.print(f"trial {number}: FAIL (worker lost); {again}", markup=False)
        for run in report.runs:
            out.print(f"run {run.name} ({run.run_id}): {run.status} ({run.reason})",
                      markup=False, soft_wrap=True)
        if report.running:
            listed = ", ".join(f"#{n}" for n in report.running)
            out.print(f"still running, their workers alive: {listed}", markup=False)
        if report.nothing:
            out.print(f"nothing to reap in study {report.study!r}", markup=False)


# --------------------------------------------------------------------------------------
# The read side: studies, trials, the best, reports, scores
# --------------------------------------------------------------------------------------
@app.command()
def studies(storage: StorageOpt = None, as_json: JsonOpt = False, debug: Debug = False
            ) -> None:
    """Every study in the storage: trials by state, best value(s), last activity."""
    from sweeper.render import views
    from sweeper.results import read as results
    from sweeper.search.storage import redact
    from sweeper.uris import resolve_storage_url

    with user_errors(debug):
        _quiet_libraries(debug)
        summaries = results.studies(storage)
        if as_json:
            _print_text(views.json_lines(summaries))
        elif not summaries:
            out.print(f"no studies in {redact(resolve_storage_url(storage))} yet: "
                      f"sweeper run studies/quickstart.yaml", markup=False)
        else:
            out.print(views.studies_table(summaries, redact(resolve_storage_url(storage))))


@app.command("trials")
def trials_command(
    study: StudyName,
    state: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--state", show_default=False,
        help="Only trials in this state (complete, pruned, fail, running, waiting); "
             "repeat for several.")] = None,
    sort: Annotated[str, typer.Option(
        "--sort", help="number, value (best first), duration, a metric (test_accuracy) or a "
                       "param (train.lr); a leading '-' reverses.")] = "number",
    limit: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--limit", min=1, show_default=False, help="Show at most this many.")] = None,
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV with a header row.")] = False,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    debug: Debug = False,
) -> None:
    """A table of the study's trials: number, state, values, params, duration, run id."""
    from sweeper.render import views
    from sweeper.results import read as results

    with user_errors(debug):
        _quiet_libraries(debug)
        if as_json and as_csv:
            raise ConfigError("choose one of --json and --csv", file="sweeper trials")
        chosen = results.trial_results(study, storage=storage, tracking_uri=tracking_uri,
                                       states=state, sort=sort, limit=limit)
        names = _objectives(study, storage)
        if as_json:
            _print_text(views.json_lines(chosen))
        elif as_csv:
            _print_text(views.trials_csv(chosen, names))
        else:
            out.print(views.trials_table(chosen, names, title=f"{study}: {len(chosen)} trials"
                                                              f" (sorted by {sort})"))


@app.command()
def best(
    study: StudyName,
    top: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--top", min=1, show_default=False,
        help="The K best trials (a multi-objective study: the first K of its Pareto front)."
    )] = None,
    as_json: JsonOpt = False,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    debug: Debug = False,
) -> None:
    """The best trial: values, params, final metrics, MLflow run and model URI (a
    multi-objective study: its Pareto front)."""
    from sweeper.render import views
    from sweeper.results import read as results

    with user_errors(debug):
        _quiet_libraries(debug)
        chosen = results.best_trials(study, top=top, storage=storage,
                                     tracking_uri=tracking_uri)
        if as_json:
            _print_text(views.json_lines(chosen))
            return
        names = _objectives(study, storage)
        if len(names) > 1:
            out.print(f"Pareto front of {study}: {len(chosen)} trial(s), best "
                      f"{names[0]} first", markup=False)
        for line in views.best_lines(chosen, names):
            out.print(line, markup=False, soft_wrap=True)


@app.command()
def report(
    study: StudyName,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The HTML file to write.")] = Path("report.html"),
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    debug: Debug = False,
) -> None:
    """One self-contained interactive page: the search, the architectures, the best trial."""
    from sweeper.results.report import build_report

    with user_errors(debug):
        _quiet_libraries(debug)
        summary = build_report(study, output, storage=storage, tracking_uri=tracking_uri)
        size = summary.path.stat().st_size / 1e6
        out.print(f"wrote {summary.path} ({size:.1f} MB): {len(summary.figures)} figures, "
                  f"best trial #{summary.best.number}", markup=False, soft_wrap=True)
        for note in summary.notes:
            err.print(f"note: {note}", markup=False, soft_wrap=True)


@app.command()
def evaluate(
    study: StudyName,
    trial: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--trial", min=0, show_default=False,
        help="The trial's number [default: the best trial].")] = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    data_dir: DataDirOpt = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    debug: Debug = False,
) -> None:
    """Load a trial's model from MLflow, evaluate it on the test split and compare with
    what was logged."""
    import json

    from sweeper.render import views
    from sweeper.results.scoring import evaluate_trial

    with user_errors(debug):
        _quiet_libraries(debug)
        score = evaluate_trial(study, trial, storage=storage, tracking_uri=tracking_uri,
                               data_dir=data_dir, device=device)
        if as_json:
            _print_text(json.dumps({"study": study, "number": score.trial.number,
                                    "test": score.metrics, "logged": score.logged,
                                    "matches": score.matches}, default=str))
            return
        out.print(views.evaluation_table(score))
        verdict = ("matches the logged test metrics" if score.matches else
                   "differs from the logged test metrics (another device or precision?)")
        out.print(f"trial #{score.trial.number}: {verdict}", markup=False)


@app.command()
def rerun(
    study: StudyName,
    trial: Annotated[int, typer.Option("--trial", min=0, help="The trial's number.")],
    device: DeviceOpt = None,
    data_dir: DataDirOpt = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    debug: Debug = False,
) -> None:
    """Train a completed trial again from its logged config and seed, and print the logged
    final metrics beside the new ones (on the CPU they are identical)."""
    from sweeper.render import views
    from sweeper.results.rerun import rerun_trial

    with user_errors(debug):
        _quiet_libraries(debug)
        score = rerun_trial(study, trial, storage=storage, tracking_uri=tracking_uri,
                            data_dir=data_dir, device=device)
        out.print(views.evaluation_table(score, title=f"trial #{trial} of {study}, trained "
                                                      f"again"))
        same = all(score.metrics.get(k) == v for k, v in score.logged.items())
        verdict = ("reproduces the logged metrics exactly" if same else
                   "matches the logged metrics within 1e-4" if score.matches else
                   "differs from the logged metrics (another device or precision?)")
        out.print(f"trial #{trial}: {verdict}", markup=False)


@app.command()
def ensemble(
    study: StudyName,
    top: Annotated[int, typer.Option("--top", min=2, help="How many of the best models "
                                                          "vote.")] = 5,
    no_log: Annotated[bool, typer.Option(
        "--no-log", help="Do not record the result as an `ensemble` run in MLflow.")] = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    data_dir: DataDirOpt = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    debug: Debug = False,
) -> None:
    """The K best models vote (soft and hard) on the test split, beside the best one."""
    import json

    from sweeper.render import views
    from sweeper.results.scoring import ensemble as vote

    with user_errors(debug):
        _quiet_libraries(debug)
        score = vote(study, top, storage=storage, tracking_uri=tracking_uri,
                     data_dir=data_dir, device=device, log=not no_log)
        if as_json:
            _print_text(json.dumps(score.as_dict(), default=str))
            return
        out.print(views.ensemble_table(score))
        single = score.member_metrics[0]["accuracy"]
        for name, metrics in (("soft", score.soft), ("hard", score.hard)):
            gain = 100 * (metrics["accuracy"] - single)
            out.print(f"{name} vote: test accuracy {metrics['accuracy']:.4f}, {gain:+.2f} "
                      f"points against the best single model", markup=False)
        if score.skipped:
            err.print(f"note: trials {score.skipped} rank higher but logged no model",
                      markup=False)
        if score.run_id:
            out.print(f"MLflow: ensemble run {score.run_id}", markup=False)


def _objectives(study: str, storage: str | None) -> list[str]:
    from sweeper.keys import study_spec
    from sweeper.results import read as results

    loaded = results.load_study(study, storage)
    return results.objective_names(study_spec(loaded), len(loaded.directions))


def _print_text(text: str) -> None:
    """Machine-readable output: plain stdout, no wrapping, no markup."""
    if text:
        sys.stdout.write(text + "\n")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - Ctrl-C outside a command body
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
