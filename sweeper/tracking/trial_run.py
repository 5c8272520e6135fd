"""One trial's nested MLflow run: opened before training, fed per-epoch metrics, given the
model, figures, tables and final metrics, and ended with the status Optuna's state maps to.

Only what the trial needs before it can go on happens on the training thread: creating the
run (its id goes into the Optuna trial) and creating the model's record (its id too, so
the read side needs no MLflow query to find a trial's model). Everything else (metric
batches, the model files, figures, tables, the final status) is queued on the tracker's
one background thread, in order, so the next trial trains while this one uploads. A
run's status is always the last thing queued for it, so a run never ends with its
metrics or files still in flight; `end_study` waits for the queue.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sweeper.fleet import stopping
from sweeper.keys import (
    ATTR_MODEL_ID,
    ATTR_RUN_ID,
    TAG_DEVICE,
    TAG_EPOCHS_RUN,
    TAG_NOTE,
    TAG_PACK,
    TAG_PARENT,
    TAG_PRUNER,
    TAG_REASON,
    TAG_ROLE,
    TAG_SAMPLER,
    TAG_STATE,
    TAG_STUDY,
    TAG_TORCH_VERSION,
    TAG_TRAIN_SECONDS,
    TAG_TRIAL,
    TAG_TRIAL_SECONDS,
    TAG_WORKER,
    mlflow_status,
)
from sweeper.redaction import redact_text
from sweeper.tracking import model_files, system_metrics
from sweeper.tracking.common import (
    EPOCH_METRICS,
    chunks,
    device_name,
    finite,
    is_run_metric,
    metric_key,
    model_device,
    now_ms,
    param_value,
    per_class_keys,
    racing,
    requirements,
    truncate,
    write_confusion_csv,
    write_per_class_csv,
)

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

    from sweeper.search.study import TrialOutcome
    from sweeper.spec.config import StudySpec, TrialConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
EXAMPLE_IMAGES = 4  # real input images stored with each model (its input example)


def model_name(study: str, number: int) -> str:
    """The name of a trial's logged model in MLflow's Models views."""
    return f"{study}-trial-{number}"


@dataclass(frozen=True)
class LoggedModel:
    run_id: str
    model_id: str
    location: str  # the artifact location of the model's files


@dataclass
class _ModelFiles:
    """What the background upload of a model needs, prepared on the training thread."""

    logged: LoggedModel
    cpu_model: Any
    example: Any  # numpy (EXAMPLE_IMAGES, C, H, W)
    signature: Any
    metadata: dict[str, Any]
    step: int
    info: Any  # sweeper.ml.modelfile.ModelInfo


class TrialHost(Protocol):
    """All a trial's run may use of the study's tracker (`MlflowTracker` is one): the
    client, the guarded calls and queue, where the run goes, and the best so far."""

    client: MlflowClient
    disabled: bool
    failures: list[str]
    device: str | None
    worker: str | None
    experiment_id: str | None
    parent_run_id: str | None
    models: dict[int, LoggedModel]  # the trials' logged models, by trial number

    @property
    def spec(self) -> StudySpec: ...

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any
             ) -> T | None: ...

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]: ...

    def timed(self, what: str) -> AbstractContextManager[None]: ...

    def beats_best(self, study: optuna.Study, values: list[float]) -> bool: ...


class TrialRun:
    """What `MlflowTracker.trial_run` yields: the run of one trial, which the loop logs into.

    A run whose creation failed, or whose logging failed once, quietly ignores further
    logging (one warning, not one per epoch) but is still ended with a status.
    """

    def __init__(self, tracker: TrialHost, trial: optuna.Trial,
                 config: TrialConfig) -> None:
        self.tracker = tracker
        self.trial = trial
        self.config = config
        self.number = trial.number
        self.run_id: str | None = None
        self.broken = False
        self.ending = False  # its final status is queued
        self.ended_as: str | None = None  # the status this run was terminated with
        self.in_context = False  # inside `MlflowTracker.trial_run`'s block: training
        self.error_logged = False
        self.model_id: str | None = None
        self._ops: list[Future[Any]] = []
        # Something of the run was not sent (a failure, or the store was away): the end
        # of the study fills it in from Optuna's record, or `sweeper reap` does.
        self.incomplete = False
        self._sampler: system_metrics.SystemSampler | None = None
        # Per-epoch curves: `lr` only when a schedule changes it (else it is a param).
        self.epoch_metrics = EPOCH_METRICS + (("lr",) if config.train.scheduler != "none"
                                              else ())

    # -- plumbing -----------------------------------------------------------------------
    @property
    def live(self) -> bool:
        return self.run_id is not None and not self.broken and not self.tracker.disabled

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(...)` now, on this thread; a failure marks the run broken (one warning)."""
        if not self.live:
            self.incomplete = True
            return None
        before = len(self.tracker.failures)
        result = self.tracker.call(f"{what} (trial {self.number})", fn, *args, **kwargs)
        if len(self.tracker.failures) > before or self.tracker.disabled:
            self.broken = True
            self.incomplete = True
        return result

    def _queue(self, what: str, fn: Callable[..., Any], *args: Any,
               always: bool = False, **kwargs: Any) -> None:
        """`fn(...)` on the background thread, after everything queued before it. Skipped
        there if the run broke in the meantime (unless `always`: ending the run)."""
        if self.run_id is None or self.tracker.disabled or (self.broken and not always):
            self.incomplete = True
            return

        def guarded() -> None:
            if self.tracker.disabled or (self.broken and not always):
                self.incomplete = True
                return
            if always:
                self.broken = False  # ending a run is tried even after an earlier failure
            self._call(what, fn, *args, **kwargs)

        self._ops.append(self.tracker.submit(guarded))

    def _batch(self, what: str, **entities: Any) -> None:
        """One `log_batch`, in the background."""
        self._queue(what, self.tracker.client.log_batch, self.run_id, **entities)

    def wait(self) -> None:
        """Block until everything queued for this run is done (failures were reported
        where they happened)."""
        ops, self._ops = self._ops, []
        for op in ops:
            op.result()

    @property
    def pending(self) -> bool:
        return any(not op.done() for op in self._ops)

    # -- opening --------------------------------------------------------------------------
    def open(self) -> None:
        import torch
        from mlflow.entities import Param

        from sweeper.tracking.context import context_tags, describe_trial

        tracker = self.tracker
        if tracker.disabled or tracker.experiment_id is None or tracker.parent_run_id is None:
            return
        spec = tracker.spec
        tags = {
            **context_tags(spec.source),
            TAG_NOTE: describe_trial(spec, self.config, self.number, dict(self.trial.params)),
            TAG_PARENT: tracker.parent_run_id,
            TAG_STUDY: spec.name,
            TAG_TRIAL: str(self.number),
            TAG_ROLE: "trial",
            TAG_SAMPLER: spec.sampler.name,
            TAG_PRUNER: spec.pruner.name,
            TAG_DEVICE: device_name(tracker.device),
            TAG_TORCH_VERSION: torch.__version__,
        }
        if tracker.worker:
            tags[TAG_WORKER] = tracker.worker
        run = tracker.call(f"create the run of trial {self.number}",
                           tracker.client.create_run, tracker.experiment_id,
                           run_name=f"trial-{self.number}", tags=tags)
        if run is None:
            return
        stopping.checkpoint("in-create-run")
        self.run_id = run.info.run_id
        try:
            self.trial.set_user_attr(ATTR_RUN_ID, self.run_id)
        except Exception as exc:  # the Optuna storage's problem is the loop's to report
            log.debug("could not record the run id on trial %d: %s", self.number, exc)
        params = [Param(k, param_value(v)) for k, v in self.config.flat().items()]
        for chunk in chunks(params, 100):
            self._batch("log params", params=chunk)
        if system_metrics.enabled():
            self._sampler = system_metrics.SystemSampler(self._log_system,
                                                         device_name(tracker.device))
            self._sampler.start()

    def _log_system(self, reading: dict[str, float], step: int, timestamp: int) -> None:
        """One system-metrics reading, queued like every other batch of the run."""
        from mlflow.entities import Metric

        if self.live and not self.ending:
            self._batch("log system metrics", metrics=[
                Metric(k, float(v), timestamp, step) for k, v in reading.items()])

    def stop_system_metrics(self) -> None:
        """End the sampling (its last reading is queued before the run's end)."""
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.stop()

    def log_data(self, data: Any) -> None:
        """The dataset the trial trains on, as the run's input (queued)."""
        if not self.live:
            return
        from sweeper.tracking.context import dataset_input

        with self.tracker.timed("trial.input"):
            entry = self._call("describe the dataset", dataset_input, data, self.config)
        if entry is not None:
            self._queue("log the dataset input", racing, self.tracker.client.log_inputs,
                        self.run_id, datasets=[entry])

    def log_pack(self, numbers: list[int]) -> None:
        """The trials this one trained with (`pack: K`), as a tag to filter runs by
        (queued)."""
        if not self.live:
            return
        self._queue("tag the pack", self.tracker.client.set_tag, self.run_id, TAG_PACK,
                    ",".join(str(n) for n in numbers))

    # -- the TrialRun protocol -------------------------------------------------------------
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One batch per epoch, `step=epoch`, sent in the background."""
        if not self.live:
            return
        with self.tracker.timed("trial.epoch"):
            from mlflow.entities import Metric

            now = now_ms()
            batch = [Metric(metric_key(k), float(v), now, int(epoch))
                     for k, v in metrics.items() if k in self.epoch_metrics and finite(v)]
            self._batch("log epoch metrics", metrics=batch)

    def log_result(self, *, model: Any, data: Any, history: list[dict[str, float]],
                   evaluations: dict[str, Any], metrics: dict[str, float],
                   values: list[float]) -> None:
        """The model (as the `models:` policy says), the final metrics in one batch, and
        figures, tables, reports and the resolved config in one upload."""
        if not self.live:
            return
        tracker = self.tracker
        policy = tracker.spec.models
        if policy == "all" or (policy == "best" and self._beats_best(values)):
            with tracker.timed("trial.model"):
                files = self._call("create the model's record", self._prepare_model, model,
                                   data, metrics)
            if files is not None:
                self.model_id = files.logged.model_id
                tracker.models[self.number] = files.logged
                self._queue("upload the model", self._upload_model, files)
        else:
            self._record_model_id("")  # known to have none: the read side need not look
        with tracker.timed("trial.metrics"):
            self._log_final_metrics(model, metrics, history,
                                    per_class_keys(evaluations, list(data.classes)))
        with tracker.timed("trial.artifacts"):
            self._queue("upload figures and tables", self._log_artifacts, history,
                        evaluations, list(data.classes))

    def _beats_best(self, values: list[float]) -> bool:
        try:
            return self.tracker.beats_best(self.trial.study, values)
        except Exception as exc:  # Optuna storage trouble: keep the model, to be safe
            log.debug("could not compare trial %d with the best: %s", self.number, exc)
            return True

    def _log_final_metrics(self, model: Any, metrics: dict[str, float],
                           history: list[dict[str, float]], per_class: set[str]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = now_ms()
        # At the last epoch's step, so the run's latest value of val_accuracy is the
        # final evaluation's. Per-class numbers and the other averages go to
        # tables/per_class_<split>.csv; the model's size is a param, epochs and seconds
        # tags (single points, not curves), unless one of them is an objective.
        step = int(history[-1].get("epoch", len(history))) if history else 0
        objectives = tuple(o.metric for o in self.tracker.spec.objective_list)
        batch = [Metric(metric_key(k), float(v), now, step, model_id=self.model_id)
                 for k, v in metrics.items()
                 if finite(v) and k not in per_class and is_run_metric(k, objectives)]
        tags = []
        device = model_device(model)
        if device:
            tags.append(RunTag(TAG_DEVICE, device))
        if "epochs_run" in metrics:
            tags.append(RunTag(TAG_EPOCHS_RUN, str(int(metrics["epochs_run"]))))
        if "train_seconds" in metrics:
            tags.append(RunTag(TAG_TRAIN_SECONDS, f"{metrics['train_seconds']:.2f}"))
        if "n_params" in metrics:
            self._batch("log the parameter count",
                        params=[Param("n_params", str(int(metrics["n_params"])))])
        for chunk in chunks(batch, 900):
            self._batch("log final metrics", metrics=chunk, tags=tags)
            tags = []

    def _log_artifacts(self, history: list[dict[str, float]], evaluations: dict[str, Any],
                       classes: list[str]) -> None:
        """Figures (small PNG images), confusion matrices, per-class numbers and ROC curves
        as CSV and the resolved config as YAML, in one upload. The interactive pages are
        the study's (parent run, `sweeper report`): a trial's would embed plotly.js, 2 MB."""
        import yaml

        from sweeper.render import images, plots

        assert self.run_id is not None
        with tempfile.TemporaryDirectory(prefix="sweeper-trial-") as tmp:
            root = Path(tmp)
            images.write_trial_images(root / "plots", history, evaluations, classes)
            (root / "tables").mkdir()
            (root / "config").mkdir()
            for split, ev in evaluations.items():
                write_confusion_csv(root / "tables" / f"confusion_matrix_{split}.csv",
                                    ev.confusion, classes)
                write_per_class_csv(root / "tables" / f"per_class_{split}.csv", ev, classes)
            test = evaluations.get("test")
            if test is not None and test.roc:
                plots.write_roc_csv(root / "tables" / "roc_test.csv", test.roc, test.metrics)
            (root / "config" / "trial.yaml").write_text(
                yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False))
            self.tracker.client.log_artifacts(self.run_id, tmp)

    def _prepare_model(self, model: Any, data: Any, metrics: dict[str, float]) -> _ModelFiles:
        """The model's record in MLflow (its id is known at once) and a CPU copy of it;
        the files themselves are written and uploaded in the background.

        Saved as data (config JSON + safetensors weights, `sweeper.ml.modelfile`), never
        pickled: loading rebuilds the network from the config, so whoever can write to
        the artifact store cannot make a reader run code. The weights are copied to the
        CPU first, so a model trained on a GPU loads anywhere (and the GPU copy can be
        freed while the upload runs). The input example is raw images, pixel values
        0-255, as the pyfunc takes them.
        """
        import torch

        from sweeper.ml.modelfile import ModelInfo
        from sweeper.tracking.model_files import output_signature

        tracker = self.tracker
        spec = tracker.spec
        assert self.run_id is not None and tracker.experiment_id
        cpu_model = copy.deepcopy(model).to("cpu").eval()
        example = data.val.x[:EXAMPLE_IMAGES].detach().to("cpu", torch.float32)
        shape = (1, -1, 1, 1)
        raw = example * torch.tensor(data.std).reshape(shape) + \
            torch.tensor(data.mean).reshape(shape)
        # As 0-255 integers: the input example is stored twice as JSON text, where a
        # float per pixel would cost ~60 KB an image.
        example_np = (raw.clamp(0, 1) * 255).round().to(torch.uint8).contiguous().numpy()
        logged = tracker.client.create_logged_model(
            tracker.experiment_id, name=model_name(spec.name, self.number),
            source_run_id=self.run_id,
            params={k: param_value(v) for k, v in self.config.flat().items()},
            tags={TAG_STUDY: spec.name, TAG_TRIAL: str(self.number)}, model_type="pytorch")
        self._record_model_id(logged.model_id)
        metadata = {"sweeper": {
            "study": spec.name, "trial_number": self.number, "dataset": data.name,
            "classes": list(data.classes), "input_shape": list(data.input_shape),
            "normalize_mean": list(data.mean), "normalize_std": list(data.std),
            "input": "raw images: [N, H, W] (one channel), [N, C, H, W], [N, H, W, C] or "
                     "[N, C*H*W]; pixel values 0-255 or 0-1"}}
        info = ModelInfo(self.config, list(data.classes), tuple(data.mean), tuple(data.std))
        return _ModelFiles(LoggedModel(self.run_id, logged.model_id, logged.artifact_location),
                           cpu_model, example_np, output_signature(len(data.classes)),
                           metadata, int(metrics.get("epochs_run", 0)), info)

    def _record_model_id(self, model_id: str) -> None:
        try:
            self.trial.set_user_attr(ATTR_MODEL_ID, model_id)
        except Exception as exc:  # the Optuna storage's problem is the loop's to report
            log.debug("could not record the model id on trial %d: %s", self.number, exc)

    def _upload_model(self, files: _ModelFiles) -> None:
        """Write the model (`tracking.model_files`), upload it, mark it READY and attach it
        to the run as an output (a failed upload leaves it FAILED, never PENDING)."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        client = self.tracker.client
        logged = files.logged
        try:
            with tempfile.TemporaryDirectory(prefix="sweeper-model-") as tmp:
                path = os.path.join(tmp, "model")
                mlflow_model = Model(artifact_path=logged.location,
                                     model_uuid=logged.model_id, run_id=logged.run_id,
                                     model_id=logged.model_id, signature=files.signature,
                                     metadata=files.metadata)
                model_files.save(path, files.cpu_model, files.info, mlflow_model,
                                 example=files.example, requirements=requirements())
                client.log_model_artifacts(logged.model_id, path)
        except BaseException:
            try:
                client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            except Exception as exc:
                log.debug("could not mark model %s FAILED: %s", logged.model_id, exc)
            raise
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        client.log_outputs(logged.run_id, [LoggedModelOutput(logged.model_id,
                                                             step=files.step)])

    # -- the end ----------------------------------------------------------------------------
    def abort(self, exc: BaseException) -> None:
        """Queue the run's end on the exception that ends the trial (see `trial_run`)."""
        from sweeper.search.endings import ending_of

        end = ending_of(exc)
        self.stop_system_metrics()
        self.end(end.state, end.mlflow_status, end.reason, end.detail or end.reason)

    def finish(self, outcome: TrialOutcome) -> None:
        """The final record, from what Optuna was told."""
        status = mlflow_status(outcome.state)
        if outcome.state == "FAIL" and outcome.interrupted:
            status = "KILLED"
        self.end(outcome.state, status, outcome.reason, outcome.detail or outcome.reason,
                 seconds=outcome.seconds)

    def close_unreported(self, reason: str, status: str) -> None:
        """End a run whose `trial_ended` never came (the Optuna tell failed, or Ctrl-C)."""
        if self.ending:
            return
        self.end("FAIL", status, reason, reason)

    def end(self, state: str, status: str, reason: str | None, error: str | None,
            seconds: float | None = None) -> None:
        """Queue tags, error.txt and the terminal status after everything else of the run."""
        self.stop_system_metrics()
        if self.run_id is None or self.tracker.disabled:
            self.incomplete = True
            return
        state = str(state)  # an `Outcome` is stored by its name
        reason = redact_text(reason) if reason else reason  # no password in a tag
        error = redact_text(error) if error else error
        self.ending = True
        self._queue(f"end the run as {status}", self._end, state, status, reason, error,
                    seconds, always=True)

    def _end(self, state: str, status: str, reason: str | None, error: str | None,
             seconds: float | None) -> None:
        """Tags, error.txt and the terminal status, each only if not already so. Runs on
        the background thread; every step is tried (a run left RUNNING is worse than one
        more warning), then the first failure is raised."""
        from mlflow.entities import RunTag

        assert self.run_id is not None
        client = self.tracker.client
        run_id = self.run_id
        tags = [RunTag(TAG_STATE, state)]
        if reason:
            tags.append(RunTag(TAG_REASON, truncate(reason)))
        if seconds:  # the run's own start and end times say it too; not a chart
            tags.append(RunTag(TAG_TRIAL_SECONDS, f"{seconds:.2f}"))
        errors: list[Exception] = []

        def attempt(fn: Callable[[], Any]) -> bool:
            try:
                fn()
            except Exception as exc:
                errors.append(exc)
                return False
            return True

        attempt(lambda: client.log_batch(run_id, tags=tags))
        if state == "FAIL" and error and not self.error_logged:
            self.error_logged = attempt(lambda: client.log_text(run_id, error, "error.txt"))
        if self.ended_as != status and attempt(lambda: client.set_terminated(run_id, status)):
            self.ended_as = status
        if errors:
            raise errors[0]
