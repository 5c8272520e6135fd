"""When a worker starts no new trial: `--trials N` done, the timeout, the study's budget
(counting trials other workers are running), or a grid with no point left; and how long a
worker at the budget lingers, to take back a trial whose worker went silent."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from sweeper.fleet import stopping
from sweeper.search import samplers

if TYPE_CHECKING:
    import optuna

    from sweeper.fleet.heartbeat import HeartbeatSettings
    from sweeper.search.queries import StudyQueries

log = logging.getLogger(__name__)

LINGER_POLL_S = 2.0  # how often a worker at the budget looks at the trials still running


class StopPolicy:
    """One worker's rules for stopping (see the module docstring)."""

    def __init__(self, more_trials: int | None, heartbeat: HeartbeatSettings) -> None:
        self.more_trials = more_trials
        self.heartbeat = heartbeat
        self._waiting_said = False
        self._linger_until: float | None = None  # see `wait_for_silent`

    def trial_ran(self) -> None:
        """A trial ended here: a later stop at the budget lingers afresh."""
        self._linger_until = None

    def reason(self, study: optuna.Study, queries: StudyQueries, ran: int,
                     target: int | None, started: float, timeout: float | None
                     ) -> str | None:
        """Why this worker should start no new trial, or None."""
        more = self.more_trials
        if more is not None and ran >= more:
            return "trials"
        if timeout is not None and time.monotonic() - started >= timeout:
            return "timeout"
        counts = queries.counts()
        # Trials that other workers are running count too: they are likely to finish, and
        # a silent one is taken back before this worker stops (`wait_for_silent`).
        if target is not None and (queries.budget_count(counts) + counts.get("RUNNING", 0)
                                   >= target):
            return "budget"
        # Queued trials (re-queued lost ones, enqueued ones) run before the grid counts.
        if not counts.get("WAITING") and samplers.grid_points_left(study) == 0:
            return "grid-exhausted"
        return None

    def wait_for_silent(self, queries: StudyQueries, *, ran_trials: bool) -> bool:
        """Whether to wait a moment before stopping at the budget. Other workers' trials
        still count toward it, and one of them may be lost: its retry is then this
        worker's to run. A worker that has been running trials lingers one grace period
        (a worker that died a moment ago still looks alive), and any worker waits as long
        as a running trial stays silent. Trials that keep beating are their workers' to
        finish: nobody waits for them beyond that, and a worker that arrives at a full
        study says so at once."""
        settings = self.heartbeat
        running = queries.running()
        if not running:
            return False
        now = time.monotonic()
        if self._linger_until is None:
            self._linger_until = now + (settings.grace_s + settings.interval_s
                                        if ran_trials else 0.0)
        silent = [t for t in running if settings.suspect(t)]
        if not silent and now >= self._linger_until:
            return False
        if silent and not self._waiting_said:
            self._waiting_said = True
            numbers = ", ".join(f"#{t.number}" for t in silent)
            log.warning("the study is at its budget, but the worker(s) of trial(s) %s went "
                        "silent: waiting up to %g s to take them back", numbers,
                        settings.grace_s)
        # A cheap query: look often, so that the worker leaves soon after the last trial.
        with stopping.interruptible():
            time.sleep(min(settings.interval_s, LINGER_POLL_S))
        return True
