"""The `ensemble` run that `sweeper ensemble --log` writes: the one write of the read side,
kept apart from `reader` so that the reader only reads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sweeper.errors import TrackingError
from sweeper.keys import TAG_PARENT, TAG_ROLE, TAG_STUDY
from sweeper.tracking.common import finite, metric_key, now_ms, one_line, param_value

if TYPE_CHECKING:
    from sweeper.tracking.reader import TrackingReader


def log_ensemble(reader: TrackingReader, *, experiment_id: str, parent_run_id: str | None,
                 study: str, params: Mapping[str, Any], metrics: Mapping[str, float],
                 tags: Mapping[str, str], tables: Mapping[str, str]) -> str:
    """An `ensemble` run nested under the study's parent run: params (members,
    voting), metrics, tags and text tables; ended FINISHED. Returns its run id."""
    from mlflow.entities import Metric, Param

    client = reader.client
    run_tags = {TAG_STUDY: study, TAG_ROLE: "ensemble", **tags}
    if parent_run_id:
        run_tags[TAG_PARENT] = parent_run_id
    try:
        run = client.create_run(experiment_id, run_name="ensemble", tags=run_tags)
        run_id = run.info.run_id
        try:
            now = now_ms()
            client.log_batch(
                run_id, params=[Param(k, param_value(v)) for k, v in params.items()],
                metrics=[Metric(metric_key(k), float(v), now, 0)
                         for k, v in metrics.items() if finite(v)])
            for name, text in tables.items():
                client.log_text(run_id, text, name)
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
    except Exception as exc:
        raise TrackingError(f"MLflow ({reader.where}) could not log the ensemble run: "
                            f"{one_line(exc)}") from exc
    return run_id

