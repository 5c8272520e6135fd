"""Whether the worker that finished a trial may still be ending its MLflow run.

A worker tells Optuna how a trial ended first, then ends the trial's run from its tracking
thread, after the run's queued uploads (the model, the figures). Until then a finished
trial has a RUNNING run, exactly as when its worker was killed mid-upload. Another worker
that starts, and `sweeper reap`, end such a run only once its worker is gone:

- the worker keeps the trial's heartbeat going until the run's end is written, so a run
  whose trial has been silent longer than the grace its worker recorded has no one left
  to end it;
- on this machine, sooner: a worker (`ATTR_WORKER`, "host:pid") with this host name whose
  process no longer exists is gone at once. A host name names one process space, as it
  does for the processes of `--jobs` and for containers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sweeper.fleet.heartbeat import HeartbeatSettings
from sweeper.keys import ATTR_HEARTBEAT, ATTR_WORKER
from sweeper.search.queries import StudyQueries
from sweeper.search.storage import rdb_of

if TYPE_CHECKING:
    import optuna


def still_ending(study: optuna.Study, trials: Iterable[optuna.trial.FrozenTrial], *,
                 default: HeartbeatSettings | None = None, override: bool = False
                 ) -> set[int]:
    """The numbers of the finished `trials` whose worker may still be ending their run:
    its heartbeat is within the grace its worker recorded (`default`'s for one that
    recorded none, or for all with `override`), and it is not a process of this machine
    that no longer exists."""
    finished = [t for t in trials if t.state.is_finished()]
    if not finished:
        return set()
    default = default or HeartbeatSettings()
    silences = StudyQueries(rdb_of(study), study._study_id).silences(
        [t._trial_id for t in finished])
    host = socket.gethostname()
    ending: set[int] = set()
    for trial in finished:
        silent = silences.get(trial._trial_id)
        if silent is None:  # it never beat: no sweeper worker ran it
            continue
        settings = default if override else default.recorded(
            trial.system_attrs.get(ATTR_HEARTBEAT))
        if silent > settings.grace_s:
            continue
        name, _, pid = str(trial.user_attrs.get(ATTR_WORKER) or "").rpartition(":")
        if name == host and pid.isdigit() and not process_exists(int(pid)):
            continue
        ending.add(trial.number)
    return ending


def process_exists(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (a zombie, killed but not yet waited
    for by its parent, does not). True where this cannot be told (not POSIX)."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to another user
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True
