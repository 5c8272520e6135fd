"""`tracking.repair` on a real local MLflow store: Optuna's record decides a run's state."""

from __future__ import annotations

from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweeper.keys import TAG_ROLE, TAG_STATE, TAG_TRIAL
from sweeper.tracking.repair import fill_in_runs


def test_a_run_closed_before_its_trial_was_reported_takes_optunas_state(tmp_path: Path
                                                                        ) -> None:
    """The tell landed, then the storage went away before the worker heard of it: the run
    was closed FAILED. The repair gives it the trial's state."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("repair")
    run = client.create_run(experiment, run_name="trial-0", tags={
        TAG_ROLE: "trial", TAG_TRIAL: "0", TAG_STATE: "FAIL"})
    client.set_terminated(run.info.run_id, "FAILED")
    trial = optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.9,
                                      user_attrs={"metrics": {"val_accuracy": 0.9}})
    trial.number = 0

    repaired = fill_in_runs(client, experiment, "repair", None, [trial])

    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags[TAG_STATE] == "COMPLETE"
    assert after.data.metrics["val_accuracy"] == 0.9
    assert [r.status for r in repaired][:1] == ["FINISHED"]
    # A second pass finds nothing to change.
    assert [r for r in fill_in_runs(client, experiment, "repair", None, [trial])
            if r.status != after.info.status] == []
