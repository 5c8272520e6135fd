"""What a trial run says about where it came from: MLflow's context tags (user, source,
git commit) plus sweeper's version, a one-paragraph description, and the dataset it
trained on as an MLflow input (name, split sizes, a digest of the data)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper.keys import TAG_GIT_COMMIT, TAG_VERSION

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput

    from sweeper.spec.config import StudySpec, TrialConfig

log = logging.getLogger(__name__)

DIGEST_IMAGES = 256  # images per split hashed into the digest (all labels are)
_DIGESTS: dict[int, tuple[Any, str]] = {}  # id(dataset) -> (dataset, digest), per process


def sweeper_version() -> str:
    try:
        return importlib.metadata.version("sweeper")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=8)
def context_tags(study_file: str | None) -> dict[str, str]:
    """MLflow's own run-context tags (`mlflow.user`, `mlflow.source.name`/`type`, git commit,
    branch and repository when the entry point lies in a repository) plus
    `sweeper.version`. When the entry point is an installed script (`sweeper` in a
    virtual environment), the git commit is the one of the study file's repository: the
    code and settings the study came from. Resolved once per process and study file."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    try:
        tags = {k: str(v) for k, v in resolve_tags().items() if k != MLFLOW_RUN_NAME}
    except Exception as exc:  # a context provider's trouble never costs a run
        log.debug("could not resolve MLflow's context tags: %s", exc)
        tags = {}
    if TAG_GIT_COMMIT not in tags and study_file:
        tags.update(_git_tags(Path(study_file)))
    tags[TAG_VERSION] = sweeper_version()
    return tags


def _git_tags(path: Path) -> dict[str, str]:
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_REPO_URL

    where = str(path.resolve())
    try:
        found = {TAG_GIT_COMMIT: get_git_commit(where), MLFLOW_GIT_BRANCH: get_git_branch(where),
                 MLFLOW_GIT_REPO_URL: get_git_repo_url(where)}
    except Exception as exc:
        log.debug("no git information for %s: %s", where, exc)
        return {}
    return {k: str(v) for k, v in found.items() if v} if found[TAG_GIT_COMMIT] else {}


def describe_trial(spec: StudySpec, config: TrialConfig, number: int,
                   searched: dict[str, Any]) -> str:
    """A few lines for the run's description: which study, what it optimises, the
    architecture and optimizer, and the values the sampler chose."""
    objectives = ", ".join(f"{o.metric} ({o.direction})" for o in spec.objective_list)
    chosen = ", ".join(f"{k}={_short(v)}" for k, v in searched.items()) or "none searched"
    train = config.train
    return (f"Trial {number} of sweeper study **{spec.name}**, objective {objectives}.\n\n"
            f"{config.model.arch} trained with {train.optimizer} (lr {train.lr:.3g}, batch "
            f"{train.batch_size}) for up to {config.epochs} epoch(s) on "
            f"{config.dataset.name}.\n\nSampled: {chosen}.")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def data_digest(data: Any) -> str:
    """A digest of a loaded dataset: its split sizes and shapes, every label in split
    order (so a different subset or validation seed differs), the first images of each
    split and the normalisation. Like MLflow's own dataset digests it hashes a sample of
    the pixels, not all of them; computed once per dataset and process."""
    cached = _DIGESTS.get(id(data))
    if cached is not None and cached[0] is data:
        return cached[1]
    sha = hashlib.sha256()
    sha.update(json.dumps([data.name, list(data.input_shape), list(data.classes),
                           list(data.mean), list(data.std)]).encode())
    for split in (data.train, data.val, data.test):
        sha.update(str(tuple(split.x.shape)).encode())
        sha.update(split.y.detach().to("cpu").numpy().tobytes())
        sha.update(split.x[:DIGEST_IMAGES].detach().to("cpu").contiguous().numpy().tobytes())
    digest = sha.hexdigest()[:16]
    if len(_DIGESTS) >= 8:
        _DIGESTS.clear()
    _DIGESTS[id(data)] = (data, digest)
    return digest


def dataset_input(data: Any, config: TrialConfig) -> DatasetInput:
    """The trial's data as an MLflow dataset input: name, digest, where it came from (the
    dataset config) and a profile with the split sizes, input shape and classes."""
    from mlflow.entities import Dataset as MlflowDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source = config.dataset.model_dump(mode="json", exclude={"synthetic"}
                                       if config.dataset.name != "synthetic" else None)
    profile = {"train": len(data.train), "val": len(data.val), "test": len(data.test),
               "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    schema = {"images": {"dtype": "float32", "shape": [-1, *data.input_shape]},
              "labels": {"dtype": "int64", "shape": [-1], "classes": list(data.classes)}}
    dataset = MlflowDataset(name=data.name, digest=data_digest(data), source_type="sweeper",
                            source=json.dumps(source, sort_keys=True),
                            schema=json.dumps(schema), profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])
