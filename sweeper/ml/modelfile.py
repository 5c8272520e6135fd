"""A trial's model on disk as data, never code: its config as JSON and its weights as
safetensors. Loading rebuilds the network from the config with sweeper's own code, then
fills in the weights; nothing is unpickled, so a tampered or foreign file can only fail to
load (one line), never run anything.

The folder (`MODEL_DIR` inside an MLflow model) holds:

- `config.json`: the trial's resolved config, the classes and the per-channel
  normalisation of its training data;
- `weights.safetensors`: the state dict.

This module knows nothing of MLflow: `sweeper.tracking` writes the folder into an MLflow
model, `sweeper.serving` serves it as a pyfunc.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper.errors import SweeperError
from sweeper.spec.config import TrialConfig

if TYPE_CHECKING:
    from torch import nn

FORMAT = "sweeper-model"
VERSION = 1
MODEL_DIR = "sweeper_model"  # the folder inside an MLflow model
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
FLAVOR = "sweeper"  # the MLflow flavour that says a model is in this format
MAX_CONFIG_BYTES = 1 << 20  # a trial config is a few kilobytes
MAX_WEIGHTS_BYTES = 4 << 30  # far beyond any model a study trains


class ModelFileError(SweeperError):
    """A model folder that is not a sweeper model, or whose files were altered."""


@dataclass(frozen=True)
class ModelInfo:
    """What rebuilds a trial's network and prepares its input, from `config.json`."""

    config: TrialConfig
    classes: list[str]
    mean: tuple[float, ...]  # per-channel normalisation of the training data ([0, 1] scale)
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.config.dataset.input_shape

    @property
    def num_classes(self) -> int:
        return self.config.dataset.num_classes

    def as_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION,
                "config": self.config.model_dump(mode="json"), "classes": self.classes,
                "mean": list(self.mean), "std": list(self.std)}


def write_model(folder: str | Path, model: nn.Module, info: ModelInfo) -> Path:
    """Write `model`'s weights and `info` into `folder` (created); returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(info.as_json(), indent=2))
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    return folder


def read_info(folder: str | Path) -> ModelInfo:
    """`config.json` of a model folder, checked; `ModelFileError` (one line) otherwise."""
    path = Path(folder) / CONFIG_FILE
    raw = _read_regular(path, MAX_CONFIG_BYTES)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not a sweeper model config (not JSON: {exc}); the "
                             f"model files were altered: use another trial's model") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a sweeper model config (no \"format\": "
                             f"\"{FORMAT}\"); use a model logged by sweeper")
    if data.get("version") != VERSION:
        raise ModelFileError(f"{path} is format version {str(data.get('version'))[:20]}, "
                             f"this sweeper reads version {VERSION}; upgrade sweeper")
    try:
        config = TrialConfig.model_validate(data["config"])
        classes = [str(c) for c in data["classes"]]
        mean = _floats(data["mean"])
        std = _floats(data["std"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelFileError(f"{path} holds an invalid model config ({type(exc).__name__}: "
                             f"{first}); the model files were altered: use another trial's "
                             f"model") from None
    channels = config.dataset.input_shape[0]
    if len(classes) != config.dataset.num_classes or len(mean) != channels \
            or len(std) != channels or any(s <= 0 for s in std):
        raise ModelFileError(f"{path} disagrees with itself (classes, mean or std do not fit "
                             f"the dataset); the model files were altered: use another "
                             f"trial's model")
    return ModelInfo(config, classes, mean, std)


def read_model(folder: str | Path, *, device: str = "cpu") -> tuple[nn.Module, ModelInfo]:
    """The network `config.json` describes, with the weights of `weights.safetensors`, in
    eval mode on `device`. Every way the files can be wrong is a `ModelFileError`."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    from sweeper.ml.models import build_model

    folder = Path(folder)
    info = read_info(folder)
    path = folder / WEIGHTS_FILE
    raw = _read_regular(path, MAX_WEIGHTS_BYTES)
    try:
        weights = load(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelFileError(f"{path} is not a safetensors file ({first}); the model files "
                             f"were altered: use another trial's model") from None
    try:
        # On the meta device: no memory is allocated until the weights, whose size the
        # file bounds, are known to fit.
        # Pretrained weights are never fetched or read here: the saved ones replace them.
        model_cfg = info.config.model
        if model_cfg.arch == "resnet18":
            model_cfg = model_cfg.model_copy(update={"pretrained": "none"})
        with torch.device("meta"):
            model = build_model(model_cfg, info.input_shape, info.num_classes)
    except Exception as exc:
        raise ModelFileError(f"{path.parent / CONFIG_FILE} describes a model that cannot be "
                             f"built: {str(exc)[:200]}") from None
    expected = model.state_dict()
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))[:3]
        extra = sorted(set(weights) - set(expected))[:3]
        raise ModelFileError(f"{path} does not fit the model its config describes (missing "
                             f"{missing}, unexpected {extra}); use another trial's model")
    for key, tensor in weights.items():
        if tensor.shape != expected[key].shape or tensor.dtype != expected[key].dtype:
            raise ModelFileError(f"{path}: {key} is {tuple(tensor.shape)} {tensor.dtype}, the "
                                 f"model needs {tuple(expected[key].shape)} "
                                 f"{expected[key].dtype}; use another trial's model")
    model.load_state_dict(weights, strict=True, assign=True)
    return model.to(device).eval(), info


def _read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (no FIFO, device or link
    to one can make a read hang or never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing: the folder is not a sweeper model, or "
                             f"its upload did not finish; use another trial's model") from None
    except OSError as exc:
        raise ModelFileError(f"cannot open {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ModelFileError(f"{path} is not a regular file; use another trial's model")
        if info.st_size > limit:
            raise ModelFileError(f"{path} is {info.st_size:,} bytes, more than the "
                                 f"{limit:,} a sweeper model file may be")
        return f.read(limit + 1)


def _floats(values: Sequence[Any]) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in out):
        raise ValueError("non-finite normalisation")
    return out
