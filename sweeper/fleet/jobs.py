"""`sweeper run FILE --jobs N`: N worker processes on one study, on this machine.

There is no scheduler here: every worker runs the ordinary loop of `study.Worker` against
the same Optuna storage, which hands out the trials (the same as workers on other machines
do through PostgreSQL). This module only starts the processes, gives each its share of the
machine, forwards signals and shows one combined progress bar:

- **Devices.** With CUDA, worker i gets GPU `i mod <GPU count>` (unless `--device` names
  one); on the CPU, the cores are split evenly (`torch.set_num_threads`), since N workers
  each using every core would mostly wait on one another.
- **Processes.** `spawn`, not `fork`: CUDA cannot be used in a forked child, and a fresh
  interpreter holds none of the parent's threads or database connections.
- **Signals.** Ctrl-C reaches every worker (one process group): each records its running
  trial as FAIL ("interrupted", run KILLED), re-queues it once and exits. SIGTERM to
  `sweeper run` (docker stop, a batch scheduler) is passed on to the workers, which do
  the same.
- **Crashes.** A worker that dies (killed, out of host memory) takes nothing with it: its
  trial is taken back by the others after the heartbeat grace period (`heartbeat`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue as queue_module
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sweeper.errors import SweeperError
from sweeper.fleet.stopping import Stopped, stop_on_signals

if TYPE_CHECKING:
    import multiprocessing

    from sweeper.search.study import (
        Objective,
        ProgressCallback,
        RunOptions,
        RunReport,
        TrialOutcome,
    )
    from sweeper.spec.config import StudySpec

log = logging.getLogger(__name__)

EXIT_FAILING = 1  # a worker stopped itself: its trials kept failing on this machine
STOP_WAIT_S = 120.0  # after Ctrl-C, how long workers get to record their trials


@dataclass(frozen=True)
class WorkerSlot:
    """One worker's share of the machine."""

    index: int  # 0 .. jobs-1
    jobs: int
    device: str | None  # as asked (--device), resolved in the worker
    more_trials: int | None  # its share of --trials N


def cpu_threads(jobs: int, cores: int | None = None) -> int:
    """Torch threads per worker when `jobs` workers share the CPU cores."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // jobs)


def worker_device(requested: str | None, index: int, gpus: int) -> str:
    """The device of worker `index`: the one asked for when it names one (`cpu`,
    `cuda:1`), else GPU `index mod gpus` (or the CPU without a GPU)."""
    if requested not in (None, "cuda"):
        return str(requested)
    if gpus == 0:
        return "cpu" if requested is None else "cuda"  # `cuda` without one: torch says so
    return f"cuda:{index % gpus}"


def slots(jobs: int, device: str | None, more_trials: int | None) -> list[WorkerSlot]:
    """The workers to start: `jobs` of them, `--trials N` split among them (none gets
    zero trials: `--trials 2 --jobs 4` starts two)."""
    if jobs < 1:
        raise ValueError(f"`jobs >= 1` must hold, but got {jobs}")
    if more_trials is None:
        return [WorkerSlot(i, jobs, device, None) for i in range(jobs)]
    count = min(jobs, more_trials)
    shares = [more_trials // count + (1 if i < more_trials % count else 0)
              for i in range(count)]
    return [WorkerSlot(i, count, device, share) for i, share in enumerate(shares)]


# --------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------
@dataclass
class WorkerArgs:
    """Everything a worker process needs (pickled to it)."""

    spec: StudySpec
    options: RunOptions
    slot: WorkerSlot
    tracking_uri: str | None
    tracking: bool
    objective: Objective | None = None
    debug: bool = False


def worker_main(args: WorkerArgs, events: multiprocessing.Queue[Any]) -> None:
    """The body of one worker process: its share of the machine, then `Worker.run`, with
    each event sent to the parent. Exit codes: 0, 2 (a SweeperError: the message was
    sent), `EXIT_FAILING`, 130 (interrupted)."""
    slot = args.slot
    threads = cpu_threads(slot.jobs)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch is imported
        os.environ[name] = str(threads)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format=f"worker {slot.index}: %(levelname)s %(message)s")
    if not args.debug:
        import warnings

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", message=r".*experimental feature.*")
        for noisy in ("mlflow", "alembic", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(threads)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = worker_device(slot.device, slot.index, gpus)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    options = dataclasses.replace(args.options, device=device, worker=worker,
                                  more_trials=slot.more_trials)

    def progress(event: str, info: dict[str, Any]) -> None:
        if event == "trial":
            events.put(("trial", slot.index, info["outcome"]))
        elif event == "epoch":
            events.put(("epoch", slot.index, {k: info[k] for k in
                                              ("trial", "epoch", "epochs", "metrics")}))

    from sweeper.search.study import run_study

    code = 0
    try:
        with stop_on_signals():
            tracker = None
            if args.tracking:
                from sweeper.tracking.tracker import MlflowTracker

                tracker = MlflowTracker(args.tracking_uri, device=device, worker=worker)
            report = run_study(args.spec, options, tracker=tracker, progress=progress,
                               objective=args.objective)
            events.put(("done", slot.index, dataclasses.replace(report, study=None)))
            if report.stopped_by == "failing":
                code = EXIT_FAILING
    except SweeperError as exc:
        events.put(("error", slot.index, str(exc)))
        code = 2
    except KeyboardInterrupt as stop:
        events.put(("interrupted", slot.index, getattr(stop, "reason", "interrupted")))
        code = 130
    events.close()
    events.join_thread()  # every event is in the pipe before the process ends
    raise SystemExit(code)


# --------------------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------------------
def run_jobs(spec: StudySpec, options: RunOptions, jobs: int, *,
             tracking_uri: str | None, tracking: bool = True,
             progress: ProgressCallback | None = None, objective: Objective | None = None,
             debug: bool = False) -> RunReport:
    """Start the workers, relay their progress, wait for them, and sum up (the report
    of one worker's `run_study`, for all of them).

    Before any worker starts, this process checks the tracking store and the dataset and
    creates the study, so that a mistake is one message (not N) and N workers do not race
    to create the same tables or download the same files.
    """
    import multiprocessing

    from sweeper.ml.data import load_dataset
    from sweeper.search.study import RunReport, count_finished, open_or_create

    show = progress or (lambda event, info: None)
    if tracking:
        from sweeper.tracking.tracker import MlflowTracker

        MlflowTracker(tracking_uri).check()
    load_dataset(spec.dataset, device="cpu", data_dir=options.data_dir)
    study, created = open_or_create(spec, options.storage)
    finished_before = count_finished(study)
    target = None if options.more_trials is not None else spec.budget.trials
    plan = slots(jobs, options.device, options.more_trials)
    show("start", {"study": study, "finished": finished_before, "target": target,
                   "more": options.more_trials, "workers": len(plan)})

    context = multiprocessing.get_context("spawn")
    events: multiprocessing.Queue[Any] = context.Queue()
    processes = {}
    for slot in plan:
        # A study created just now: its first worker draws from the file's seed.
        mine = dataclasses.replace(options, keep_seed=created and slot.index == 0)
        args = WorkerArgs(spec, mine, slot, tracking_uri, tracking, objective, debug)
        process = context.Process(target=worker_main, args=(args, events),
                                  name=f"sweeper-worker-{slot.index}")
        process.start()
        processes[slot.index] = process

    outcomes: list[TrialOutcome] = []
    reports: dict[int, RunReport] = {}
    errors: list[str] = []
    lost: list[str] = []
    interrupted: str | None = None
    stop_deadline: float | None = None

    def relay(event: tuple[str, int, Any]) -> None:
        nonlocal interrupted
        kind, index, payload = event
        if kind == "trial":
            outcomes.append(payload)
            show("trial", {"outcome": payload, "study": study})
        elif kind == "epoch":
            show("epoch", payload)
        elif kind == "done":
            reports[index] = payload
        elif kind == "error" and payload not in errors:
            errors.append(payload)
        elif kind == "interrupted":
            interrupted = interrupted or payload

    def forward_sigterm(signum: int, frame: Any) -> None:
        for process in processes.values():
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        raise Stopped("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        reported_dead: set[int] = set()
        while True:
            try:
                try:
                    relay(events.get(timeout=0.5))
                    continue
                except queue_module.Empty:
                    pass
                for index, process in processes.items():
                    code = process.exitcode
                    if code is not None and code < 0 and index not in reported_dead:
                        reported_dead.add(index)
                        name = signal.Signals(-code).name if -code in signal.valid_signals() \
                            else str(-code)
                        lost.append(f"worker {index} (pid {process.pid}) was killed by "
                                    f"{name}: its trial is taken back after the heartbeat "
                                    f"grace period ({options.heartbeat.grace_s:g} s)")
                        log.warning("%s", lost[-1])
                if all(p.exitcode is not None for p in processes.values()):
                    break
                if stop_deadline is not None and time.monotonic() > stop_deadline:
                    _terminate(processes)
                    stop_deadline = None
            except KeyboardInterrupt as stop:
                # Ctrl-C reached the workers too (SIGTERM was passed on): they record their
                # trials and exit. A second Ctrl-C (or the deadline) hurries them.
                interrupted = getattr(stop, "reason", None) or "interrupted"
                if stop_deadline is None:
                    stop_deadline = time.monotonic() + STOP_WAIT_S
                else:
                    _terminate(processes)
        _drain(events, relay)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for process in processes.values():
            process.join(timeout=5)
        show("end", {"study": study, "stopped_by": "interrupted" if interrupted else ""})

    stopped = Counter(r.stopped_by for r in reports.values())
    stopped_by = ("interrupted" if interrupted else
                  stopped.most_common(1)[0][0] if stopped else "error")
    messages = [r.message for r in reports.values() if r.message]
    return RunReport(spec.name, options.storage, sorted(outcomes, key=lambda o: o.number),
                     finished_before, target, stopped_by,
                     "; ".join(messages) if messages else None, errors=errors,
                     lost=lost, interrupted=interrupted,
                     exit_codes={i: p.exitcode for i, p in processes.items()})


def _terminate(processes: dict[int, Any]) -> None:
    for process in processes.values():
        if process.is_alive() and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)


def _drain(events: multiprocessing.Queue[Any], relay: Any) -> None:
    """The events still in the queue once every worker has exited."""
    while True:
        try:
            relay(events.get(timeout=0.2))
        except queue_module.Empty:
            return
