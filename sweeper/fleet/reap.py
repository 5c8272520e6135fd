"""`sweeper reap STUDY`: end, on demand, what crashed workers left behind.

Workers take back each other's lost trials as they go (`heartbeat`); this is for what no
running worker is left to see: the last worker died, or a study ran before a crash and
nobody resumed it. In Optuna, every RUNNING trial silent for the grace period (every
RUNNING one with `everything`) ends FAIL "worker lost" and is re-queued once. In MLflow,
every RUNNING trial run whose trial no longer runs ends with the status its state maps to
(unless the worker that finished the trial is alive and still writing the run: `liveness`),
the parent run ends once no trial of the study runs, and a finished trial that has no run
(MLflow was away) or whose run lacks its summary metrics (a worker killed while they were
queued) gets them from Optuna's record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sweeper.fleet import liveness
from sweeper.fleet.heartbeat import HeartbeatSettings, fail_lost_trials
from sweeper.keys import ATTR_EXPERIMENT, ATTR_PARENT_RUN
from sweeper.search.queries import StudyQueries
from sweeper.search.storage import open_storage, rdb_of
from sweeper.uris import resolve_storage_url

if TYPE_CHECKING:
    from sweeper.tracking.repair import EndedRun


@dataclass
class ReapReport:
    study: str
    lost: list[tuple[int, int | None]]  # (trial failed as lost, the retry's number or None)
    runs: list[EndedRun] = field(default_factory=list)  # MLflow runs it ended
    running: list[int] = field(default_factory=list)  # trials whose workers still beat
    tracked: bool = True  # whether the study has an MLflow experiment to look in

    @property
    def nothing(self) -> bool:
        return not self.lost and not self.runs

    def as_dict(self) -> dict[str, Any]:
        return {"study": self.study,
                "lost": [{"number": n, "retry": r} for n, r in self.lost],
                "runs": [{"run_id": r.run_id, "name": r.name, "status": r.status,
                          "reason": r.reason} for r in self.runs],
                "running": self.running}


def reap(study_name: str, *, storage: str | None = None, tracking_uri: str | None = None,
         grace_s: float | None = None, everything: bool = False,
         retry: bool = True) -> ReapReport:
    """End the study's leftovers of crashed workers in Optuna and MLflow (see the module
    docstring); returns what was ended."""
    from sweeper.results.read import load_study

    rdb = open_storage(resolve_storage_url(storage))
    study = load_study(study_name, rdb)
    # `grace_s` given: every trial is judged by it; else by the grace its own worker
    # recorded (the default settings for a trial without one).
    settings = (HeartbeatSettings(interval_s=grace_s / 4, grace_s=grace_s)
                if grace_s is not None else HeartbeatSettings())
    lost = fail_lost_trials(study, settings, retry=retry, everything=everything,
                            override=grace_s is not None)
    running = sorted(t.number for t in StudyQueries(rdb_of(study), study._study_id).running())
    report = ReapReport(study.study_name, lost, running=running)
    experiment_id = study.user_attrs.get(ATTR_EXPERIMENT)
    if not experiment_id:
        report.tracked = False
        return report
    import os

    from sweeper.tracking.reader import TrackingReader
    from sweeper.tracking.repair import fill_in_runs, reap_runs

    # MLflow would print a "View run" line for every run it ends (on stdout, in the way
    # of `--json`).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    trials = study.get_trials(deepcopy=False)
    client = TrackingReader(tracking_uri).client
    # A live worker still writing a finished trial's run ends and completes it itself
    # (`liveness`), unless the caller says every worker is gone.
    ending = set() if everything else liveness.still_ending(
        study, trials, default=settings, override=grace_s is not None)
    report.runs = reap_runs(
        client, experiment_id, trials=trials,
        parent_run_id=study.user_attrs.get(ATTR_PARENT_RUN), study_running=bool(running),
        still_ending=ending)
    # What MLflow missed while it was away, or while a killed worker's uploads waited.
    report.runs += fill_in_runs(client, experiment_id, study.study_name,
                                study.user_attrs.get(ATTR_PARENT_RUN),
                                [t for t in trials if t.number not in ending],
                                objectives=study.metric_names or ())
    return report
