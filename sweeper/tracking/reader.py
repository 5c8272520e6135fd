"""The read side of MLflow, for `sweeper.results.read`, `sweeper.results.report` and
`sweeper.ensemble`: a trial's model, its per-epoch history and its artifacts, and the ensemble run.

Everything a question about many trials needs comes from the Optuna storage (the trial
records its run id and model id); MLflow is asked only about the few trials a command
shows in depth, or in one query for many (`model_ids`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper.errors import SweeperError, TrackingError
from sweeper.ml.modelfile import ModelFileError
from sweeper.search.storage import redact
from sweeper.tracking.common import chunks, one_line
from sweeper.tracking.probe import check_store
from sweeper.uris import client_uri, is_http

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from torch import nn

log = logging.getLogger(__name__)

# The per-epoch series a trial logs (`step` = epoch), as `fit` names them.
# What a trial run logs per epoch (`lr` only under a schedule); older runs also logged
# epoch_seconds.
HISTORY_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


class TrackingReader:
    """Reads runs and models back from one tracking store (`--tracking-uri`, else
    `$MLFLOW_TRACKING_URI`, else the local default)."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        import os

        self.tracking_uri = client_uri(tracking_uri)
        # One progress bar per downloaded model or table would drown the command's output.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self._client: MlflowClient | None = None
        self._checked = False

    @property
    def where(self) -> str:
        return redact(self.tracking_uri)

    @property
    def client(self) -> MlflowClient:
        """The client, once the store answered (one clear line otherwise)."""
        if not self._checked:
            check_store(self.tracking_uri, self._make_client)
            self._checked = True
        return self._make_client()

    def _make_client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    # -- links ------------------------------------------------------------------------------
    def run_url(self, experiment_id: str | None, run_id: str | None) -> str | None:
        """The run's page on the tracking server; None for a local store (no server)."""
        if not (is_http(self.tracking_uri) and experiment_id and run_id):
            return None
        from sweeper.tracking.server import run_url

        return run_url(self.tracking_uri, experiment_id, run_id)

    # -- many trials, one query -------------------------------------------------------------
    def model_ids(self, experiment_id: str, run_ids: Sequence[str]) -> dict[str, str]:
        """run id → id of the model logged in it, for runs whose trial did not record one
        (trials logged before sweeper kept it): one search per 100 runs."""
        found: dict[str, str] = {}
        for group in chunks(list(run_ids), 100):
            quoted = ", ".join(f"'{r}'" for r in group)
            runs = self._search(experiment_id, f"attributes.run_id IN ({quoted})")
            for run in runs:
                outputs = run.outputs.model_outputs if run.outputs else []
                if outputs:
                    found[run.info.run_id] = outputs[-1].model_id
        return found

    def model_id_of_run(self, run_id: str) -> str | None:
        """The id of the model logged in run `run_id`, if any."""
        try:
            run = self.client.get_run(run_id)
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(f"MLflow ({self.where}) has no run {run_id}: "
                                f"{one_line(exc)}") from exc
        outputs = run.outputs.model_outputs if run.outputs else []
        return outputs[-1].model_id if outputs else None

    def _search(self, experiment_id: str, filter_string: str) -> list[Any]:
        try:
            return list(self.client.search_runs([experiment_id], filter_string=filter_string,
                                                 max_results=1000))
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(f"MLflow ({self.where}) could not search runs: "
                                f"{one_line(exc)}") from exc

    # -- one trial in depth -----------------------------------------------------------------
    def history(self, run_id: str, keys: Iterable[str] = HISTORY_KEYS
                ) -> list[dict[str, float]]:
        """The per-epoch metrics of a trial run, one dict per epoch (`epoch` included), as
        `fit` produced them; the final evaluation (logged at the last epoch's step with a
        later timestamp) does not overwrite an epoch's value."""
        rows: dict[int, dict[str, float]] = {}
        for key in keys:
            try:
                points = self.client.get_metric_history(run_id, key)
            except Exception as exc:
                raise TrackingError(f"MLflow ({self.where}) could not read {key} of run "
                                    f"{run_id}: {one_line(exc)}") from exc
            seen: set[int] = set()
            for point in sorted(points, key=lambda p: (p.step, p.timestamp)):
                if point.step in seen:  # the final evaluation, at the last epoch's step
                    continue
                seen.add(point.step)
                rows.setdefault(point.step, {"epoch": float(point.step)})[key] = point.value
        return [rows[step] for step in sorted(rows) if step > 0]

    def download(self, run_id: str, path: str, destination: Path) -> Path | None:
        """One artifact of a run, downloaded under `destination`; None if the run has no
        such artifact."""
        try:
            listed = {item.path for item in self.client.list_artifacts(run_id,
                                                                        str(Path(path).parent))}
            if path not in listed:
                return None
            return Path(self.client.download_artifacts(run_id, path, str(destination)))
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(f"MLflow ({self.where}) could not download {path} of run "
                                f"{run_id}: {one_line(exc)}") from exc

    def load_model(self, model_id: str, *, device: str = "cpu") -> nn.Module:
        """A logged model as a torch module in eval mode on `device`.

        Only `MLmodel` and the model's config and safetensors weights are downloaded and
        read (`tracking.model_files`): nothing is unpickled, so a model file replaced in a
        shared artifact store fails to load in one line instead of running code. Resolved
        through the model's own artifact location, not `models:/<id>`: MLflow resolves the
        latter through its *global* tracking URI, which is not this store.
        """
        import mlflow.artifacts
        from mlflow.entities import LoggedModelStatus

        from sweeper.ml.modelfile import MODEL_DIR
        from sweeper.tracking import model_files

        try:
            model = self.client.get_logged_model(model_id)
        except SweeperError:
            raise
        except Exception as exc:
            raise TrackingError(f"MLflow ({self.where}) has no model {model_id}: "
                                f"{one_line(exc)}") from exc
        if model.status != LoggedModelStatus.READY:
            raise TrackingError(f"model {model_id} in {self.where} is {model.status}, not "
                                f"READY: its upload did not finish; pick another trial")
        location = model.artifact_location.rstrip("/")
        try:
            with tempfile.TemporaryDirectory(prefix="sweeper-load-") as tmp:
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{location}/MLmodel", tracking_uri=self.tracking_uri,
                    dst_path=tmp)
                model_files.check_flavor(Path(tmp) / "MLmodel")
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{location}/{MODEL_DIR}", tracking_uri=self.tracking_uri,
                    dst_path=tmp)
                module = model_files.load(tmp, device=device)
        except ModelFileError as exc:
            # Name the files as they are in the store, not in the temporary folder.
            message = str(exc).replace(f"{tmp}{os.sep}", "")
            raise ModelFileError(f"model {model_id} in {self.where}: {message}") from None
        except SweeperError:
            raise
        except Exception as exc:
            raise TrackingError(f"could not load model {model_id} from {self.where}: "
                                f"{one_line(exc)}") from exc
        return module
