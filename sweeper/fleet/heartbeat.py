"""How a study notices that a worker vanished (killed, out of memory, preempted, its
machine gone) and takes its trial back.

While a trial runs, its worker records a heartbeat in the Optuna storage every
`interval_s` (a thread: training never waits for it). A RUNNING trial whose worker has
been silent for `grace_s` is *lost*: any worker (or `sweeper reap`) marks it FAIL with the
reason "worker lost", ends its MLflow run FAILED, and queues one retry with the same
params (Optuna's WAITING state; the next worker to ask gets it). The retry stands in for
the lost trial in the study's budget. Optuna's RDB storage is the only coordinator: the
FAIL is a conditional state change, so of several workers that notice the same lost trial
exactly one re-queues it.

Each trial is judged by its own worker's settings: the worker records its interval and
grace on the trial (`ATTR_HEARTBEAT`) and every reader uses those, so a worker started
with `--heartbeat 5s` never takes back a live trial of one started with `--heartbeat 60s`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sweeper.keys import (
    ATTR_REASON,
    ATTR_RETRY_OF,
    LOST_REASON,
    RETRY_HISTORY,
    RETRY_OF,
)
from sweeper.search.queries import RunningTrial, StudyQueries
from sweeper.search.storage import rdb_of

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# How many times a lost trial is re-queued: a config that kills its worker every time (a
# host out of memory) is tried twice, not forever.
MAX_RETRIES = 1


@dataclass(frozen=True)
class HeartbeatSettings:
    interval_s: float = 30.0  # a running trial's worker records a beat this often
    grace_s: float = 120.0  # silent this long: the trial is lost

    def __post_init__(self) -> None:
        if not 0 < self.interval_s < self.grace_s:
            raise ValueError(f"`0 < heartbeat interval < grace period` must hold, but got "
                             f"interval {self.interval_s:g} s, grace {self.grace_s:g} s")

    @classmethod
    def from_interval(cls, interval_s: float) -> HeartbeatSettings:
        """A grace period of four beats: a worker busy in a long database call or a slow
        network is not taken for dead."""
        return cls(interval_s, 4 * interval_s)

    def as_attr(self) -> dict[str, float]:
        return {"interval_s": self.interval_s, "grace_s": self.grace_s}

    def of(self, trial: RunningTrial) -> HeartbeatSettings:
        """The settings the trial's own worker recorded (see `ATTR_HEARTBEAT`), else these."""
        return self.recorded(trial.heartbeat)

    def recorded(self, recorded: Any) -> HeartbeatSettings:
        """The settings in a trial's `ATTR_HEARTBEAT`, else these."""
        if not recorded:
            return self
        try:
            return HeartbeatSettings(float(recorded["interval_s"]),
                                     float(recorded["grace_s"]))
        except (KeyError, TypeError, ValueError):
            return self

    def suspect(self, trial: RunningTrial) -> bool:
        """Silent for longer than two of its beats: lost, unless it beats again before its
        grace period ends."""
        return trial.silent_s > 2 * self.of(trial).interval_s


@contextmanager
def beating(storage: optuna.storages.BaseStorage, trial_id: int,
            settings: HeartbeatSettings) -> Iterator[None]:
    """Record the trial's heartbeat now and every `interval_s` until the block ends (see
    `start_beating`)."""
    stop = start_beating(storage, trial_id, settings)
    try:
        yield
    finally:
        stop()


def start_beating(storage: optuna.storages.BaseStorage, trial_id: int,
                  settings: HeartbeatSettings, *, now: bool = True) -> Callable[[], None]:
    """Record the trial's heartbeat now (unless not `now`: it beat lately) and every
    `interval_s` (a thread) until the returned function is called (from any thread, any
    number of times). A failed beat is logged and retried at the next one: a database
    blip must not end a trial that is training fine."""
    stop = threading.Event()

    def beat() -> None:
        if not now and stop.wait(settings.interval_s):
            return
        while True:
            try:
                storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
            except Exception as exc:
                log.warning("could not record the heartbeat of trial id %d: %s", trial_id,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            if stop.wait(settings.interval_s):
                return

    thread = threading.Thread(target=beat, name=f"sweeper-heartbeat-{trial_id}",
                              daemon=True)
    thread.start()

    def stop_beating() -> None:
        stop.set()
        if thread is not threading.current_thread():
            thread.join(timeout=10)

    return stop_beating


LostCallback = Callable[["optuna.Study", "optuna.trial.FrozenTrial", str], None]


def fail_lost_trials(study: optuna.Study, settings: HeartbeatSettings, *,
                     on_lost: LostCallback | None = None, retry: bool = True,
                     everything: bool = False, override: bool = False
                     ) -> list[tuple[int, int | None]]:
    """Fail the study's lost trials (silent for the grace their own worker recorded, or
    `settings.grace_s` with `override`; every RUNNING one with `everything`), re-queue
    each once, and call `on_lost(study, trial, reason)` for each (the tracker ends its
    MLflow run). Returns (lost trial number, retry number or None)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState


    storage = rdb_of(study)
    queries = StudyQueries(storage, study._study_id)
    handled: list[tuple[int, int | None]] = []
    for running in queries.running():
        # The trial's own worker's grace, unless the caller decides (`sweeper reap --grace`).
        grace_s = settings.grace_s if override else settings.of(running).grace_s
        if not everything and running.silent_s <= grace_s:
            continue
        reason = (f"{LOST_REASON}: no heartbeat for {running.silent_s:.0f} s (grace "
                  f"{grace_s:g} s)" if not everything else
                  f"{LOST_REASON}: ended by sweeper reap --all")
        try:
            # The reason first (a finished trial's attrs cannot change), then the state:
            # the state change succeeds for exactly one of the workers that try it.
            storage.set_trial_user_attr(running.trial_id, ATTR_REASON, reason)
            if not storage.set_trial_state_values(running.trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another worker was first, or it just finished
            continue
        lost = storage.get_trial(running.trial_id)
        retried = requeue(study, lost) if retry else None
        log.warning("trial %d: %s; %s", lost.number, reason,
                    f"re-queued as trial {retried}" if retried is not None else
                    "not re-queued")
        if on_lost is not None:
            try:
                on_lost(study, lost, reason)
            except Exception as exc:  # the Optuna side is done; tracking is best effort
                log.warning("trial %d: could not end its tracking run: %s", lost.number, exc)
        handled.append((lost.number, retried))
    return handled


def requeue(study: optuna.Study, lost: optuna.trial.FrozenTrial) -> int | None:
    """A WAITING copy of a trial that ended for a reason outside its params (its worker
    lost, or stopped by Ctrl-C or SIGTERM), with the same params (and grid point), unless
    it was itself retried `MAX_RETRIES` times over. Returns its number."""
    import optuna

    history = list(lost.system_attrs.get(RETRY_HISTORY, []))
    if len(history) >= MAX_RETRIES:
        return None
    system_attrs: dict[str, Any] = {
        key: value for key, value in lost.system_attrs.items()
        if key in ("grid_id", "search_space", "fixed_params")}  # not ATTR_HEARTBEAT
    system_attrs[RETRY_OF] = lost.system_attrs.get(RETRY_OF, lost.number)
    system_attrs[RETRY_HISTORY] = [*history, lost.number]
    copy = optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=lost.params,
        distributions=lost.distributions, user_attrs={ATTR_RETRY_OF: lost.number},
        system_attrs=system_attrs)
    storage = study._storage
    trial_id = storage.create_new_trial(study._study_id, template_trial=copy)
    return storage.get_trial(trial_id).number
