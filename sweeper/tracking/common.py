"""Small helpers shared by the tracking modules: how values become MLflow keys, params and
one-line errors, the registry alias, and MLflow's HTTP settings (the tag and attr names
that link Optuna and MLflow are in `sweeper.keys`)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sweeper.redaction import redact_text

T = TypeVar("T")

REGISTRY_ALIAS = "best"

REASON_MAX_CHARS = 5000  # MLflow allows 8000 per tag value; leave room for multi-byte text
# MLflow's own HTTP retry budget is 7 retries with backoff factor 2: about 4 minutes per
# failed request, which would stall a sweep whose server went away. Sweeper's defaults,
# applied only where the user has not set these variables:
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")

# What a store says when another writer inserted the same unique row a moment earlier:
# SQLite, PostgreSQL, MySQL, and the server's text of either over HTTP.
_UNIQUE_CONFLICT = ("UNIQUE constraint failed", "duplicate key value violates unique",
                    "Duplicate entry")


def is_unique_conflict(exc: BaseException) -> bool:
    return any(words in str(exc) for words in _UNIQUE_CONFLICT)


def racing(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, tried again (twice, after a pause) when it fails on a unique
    key that another worker inserted at the same moment (workers that start together log
    the same dataset): the row is there by then, and MLflow reuses it."""
    for pause in (0.1, 0.2):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_unique_conflict(exc):
                raise
            time.sleep(pause)
    return fn(*args, **kwargs)


def chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def metric_key(key: str) -> str:
    """A metric name MLflow accepts (class names may hold other characters)."""
    return _BAD_KEY_CHARS.sub("_", key)


def param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]


def finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def now_ms() -> int:
    return int(time.time() * 1000)


def truncate(text: str, limit: int = REASON_MAX_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(exc: BaseException) -> str:
    """An error as one short line, URLs redacted; MLflow's HTTP errors carry a whole
    urllib3 repr."""
    text = redact_text(str(exc))
    for marker, short in (("Connection refused", "connection refused"),
                          ("Name or service not known", "unknown host"),
                          ("Read timed out", "timed out"), ("ConnectTimeout", "timed out")):
        if marker in text:
            url = re.search(r"API request to (\S+)", text)
            return f"{short}{f' ({url.group(1)})' if url else ''}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return truncate(lines[0] if lines else type(exc).__name__, 300)


def json_text(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, default=str, sort_keys=indent is not None)


def device_name(explicit: str | None) -> str:
    from sweeper.ml.device import resolve_device

    try:
        return str(resolve_device(explicit))
    except Exception:
        return str(explicit or "unknown")


def model_device(model: Any) -> str | None:
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return str(param.device) if param is not None else None


def write_confusion_csv(path: Path, confusion: Any, classes: list[str]) -> None:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, confusion, strict=True):
            writer.writerow([name, *(int(v) for v in row)])


PER_CLASS_METRICS = ("precision", "recall", "f1", "auc")
# What a trial run shows as metrics: what people compare across runs. The other averages
# (precision, recall, weighted F1) are rows of tables/per_class_<split>.csv.
RUN_METRICS = ("accuracy", "loss", "f1_macro", "auc_macro", "auc_micro")
RUN_SPLITS = ("val", "test")
RUN_EXTRA_METRICS: tuple[str, ...] = ()  # train_seconds, n_params, epochs_run: a tag, a param
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def is_run_metric(key: str, objectives: tuple[str, ...] | list[str] = ()) -> bool:
    """Whether a final metric is one of a trial run's metrics (an objective always is)."""
    split, _, name = key.partition("_")
    return (key in objectives or key in RUN_EXTRA_METRICS
            or (split in RUN_SPLITS and name in RUN_METRICS))


def per_class_keys(evaluations: dict[str, Any], classes: list[str]) -> set[str]:
    """The `<split>_<metric>_<class>` keys of the final metrics: a table, not metrics."""
    return {f"{split}_{metric}_{name}" for split in evaluations
            for metric in PER_CLASS_METRICS for name in classes}


def write_per_class_csv(path: Path, evaluation: Any, classes: list[str]) -> None:
    """One row per class: its support (true images), precision, recall, F1 and one-vs-rest
    AUC (empty where undefined) on one split; then the macro and weighted averages."""
    import csv

    support = [int(v) for v in evaluation.confusion.sum(axis=1)]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "support", *PER_CLASS_METRICS])
        rows = [(name, count, [evaluation.metrics.get(f"{metric}_{name}")
                               for metric in PER_CLASS_METRICS])
                for name, count in zip(classes, support, strict=True)]
        # The averages over the classes, as in scikit-learn's classification report.
        for average in ("macro", "weighted"):
            rows.append((f"{average} avg", sum(support),
                         [evaluation.metrics.get(f"{metric}_{average}")
                          for metric in PER_CLASS_METRICS]))
        for name, count, values in rows:
            writer.writerow([name, count, *("" if v is None else f"{v:.6g}" for v in values)])


def requirements() -> list[str]:
    """Pinned requirements of a logged model, given so MLflow does not infer them (which
    costs a subprocess and ~6 s per model)."""
    pins = []
    # sweeper itself: the pyfunc's loader module is `sweeper.serving`.
    for package in ("sweeper", "torch", "numpy", "safetensors"):
        try:
            pins.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(package)
    return pins


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    target = logging.getLogger(logger)
    previous = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(previous)


@contextlib.contextmanager
def http_env(*, retries: int, timeout: int) -> Iterator[None]:
    """MLflow's HTTP retry and timeout settings, for the duration of a quick probe."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
