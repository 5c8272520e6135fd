"""The study file: its schema, every default, and loading it with one-line errors.

A study file says *what* to search (dataset, model, training, budget, objective, sampler,
pruner and the `space` of hyperparameters); the environment says *where* (storage,
tracking server, data directory, device). Everything here is plain data: no torch, optuna
or mlflow, so `sweeper validate` starts instantly.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import reprlib
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sweeper.errors import ConfigError

# --------------------------------------------------------------------------------------
# Names the study file may use
# --------------------------------------------------------------------------------------
DatasetName = Literal["mnist", "fashion_mnist", "kmnist", "cifar10", "digits", "synthetic"]
Arch = Literal["mlp", "cnn", "lenet", "resnet", "resnet18"]
OptimizerName = Literal["sgd", "momentum", "rmsprop", "adagrad", "adam", "adamw"]
SamplerName = Literal["tpe", "random", "grid", "cmaes", "gp", "qmc", "nsga2"]
PrunerName = Literal["none", "median", "hyperband", "successive_halving"]
Direction = Literal["maximize", "minimize"]
ModelsPolicy = Literal["all", "best", "none"]

# Metrics a trial produces on the validation split at its end; the objective picks from
# these. Test metrics are computed and logged but never selectable (no peeking).
OBJECTIVE_METRICS: dict[str, Direction] = {
    "val_accuracy": "maximize",
    "val_loss": "minimize",
    "val_f1_macro": "maximize",
    "val_f1_weighted": "maximize",
    "val_precision_macro": "maximize",
    "val_recall_macro": "maximize",
    "val_auc_macro": "maximize",
    "train_seconds": "minimize",
    "n_params": "minimize",
}
# Objectives known after every epoch, so a pruner can judge a trial part-way.
EPOCH_METRICS = ("val_accuracy", "val_loss")

# Input shape (channels, height, width) and class count of each named dataset.
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "kmnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "digits": ((1, 8, 8), 10),
}

_STUDY_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")  # \Z: no trailing newline

# Hostile input is bounded: a study file is read only if it is a regular file of at most
# MAX_STUDY_BYTES, holds at most MAX_YAML_VALUES values once its aliases are expanded and
# nests at most MAX_YAML_DEPTH deep; a choice lists at most MAX_CHOICE_OPTIONS options.
MAX_STUDY_BYTES = 1 << 20
MAX_YAML_VALUES = 20_000
MAX_YAML_DEPTH = 64
MAX_CHOICE_OPTIONS = 1_000
MAX_DESCRIPTION = 10_000  # characters; it is stored with the study
MAX_SEED = 2**32 - 1  # what both numpy and torch accept
MAX_PACK = 64  # trials trained together by one worker (`pack`)
# Images in the training set of each named dataset (digits: 80% of 1,797 is for training).
DATASET_TRAIN_SIZES: dict[str, int] = {
    "mnist": 60_000, "fashion_mnist": 60_000, "kmnist": 60_000, "cifar10": 50_000,
    "digits": 1_797 - round(1_797 * 0.2)}


class _Section(BaseModel):
    """A block of the study file: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------
# The fixed configuration of one trial: dataset, model, train
# --------------------------------------------------------------------------------------
class AugmentConfig(_Section):
    """Batched augmentation of training images (never of validation or test images)."""

    rotate: float = Field(0.0, ge=0, le=180, description="random rotation, up to ± degrees")
    shift: int = Field(0, ge=0, le=16, description="random translation, up to ± pixels")


class SyntheticConfig(_Section):
    """A learnable toy task for tests: each class is a fixed random template plus noise."""

    classes: int = Field(4, ge=2, le=100)
    image_size: int = Field(16, ge=4, le=64)
    channels: int = Field(1, ge=1, le=3)
    train_size: int = Field(2048, ge=16)
    test_size: int = Field(512, ge=8)
    noise: float = Field(1.0, ge=0)


class DatasetConfig(_Section):
    name: DatasetName
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of train held out")
    subset: int | None = Field(None, ge=1, description="train on at most this many images")
    test_subset: int | None = Field(None, ge=1, description="evaluate on at most this many")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the validation split "
                      "and subsets")
    normalize: bool = True
    download: bool = Field(True, description="fetch a missing torchvision dataset")
    augment: AugmentConfig = AugmentConfig()
    synthetic: SyntheticConfig = SyntheticConfig()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        if self.name == "synthetic":
            s = self.synthetic
            return (s.channels, s.image_size, s.image_size)
        return DATASET_SHAPES[self.name][0]

    @property
    def num_classes(self) -> int:
        if self.name == "synthetic":
            return self.synthetic.classes
        return DATASET_SHAPES[self.name][1]


Activation = Literal["relu", "sigmoid", "tanh", "gelu", "leaky_relu"]


class ModelConfig(_Section):
    """Every architecture's knobs; each arch reads only its own (see ARCH_KEYS).

    Keys whose canonical value depends on the arch (dropout, filter_size, batch_norm) are
    None until validation fills them from ARCH_DEFAULTS for the chosen arch; a key the
    study file set itself is never overwritten.
    """

    arch: Arch = "cnn"
    dropout: float | None = Field(None, ge=0, lt=1, description="default per arch "
                                  "(0 where the canonical network has none)")
    # conv nets (cnn, lenet, resnet)
    filter_size: int | None = Field(None, ge=1, le=15, description="conv kernel size F "
                                    "(FxF); lenet's default is 5, the others' 3")
    # cnn: one conv block per entry; the classic MNIST ConvNet is [32, 64]
    channels: list[int] = Field(default_factory=lambda: [32, 64], min_length=1, max_length=8)
    padding: Literal["valid", "same"] = "valid"
    pool: int = Field(2, ge=1, le=4, description="pool size after a pooling conv block")
    pool_blocks: list[int] | None = Field(None, max_length=8, description="cnn: the conv "
                                          "blocks (1-based) followed by a pool; all if unset")
    batch_norm: bool | None = Field(None, description="default: on for resnet, off otherwise")
    head: list[int] = Field(default_factory=list, max_length=4, description="dense layers")
    # mlp
    hidden: list[int] = Field(default_factory=lambda: [256, 128], max_length=8)
    # mlp, cnn, lenet, resnet: "classic" LeNet-5 is sigmoid + avg; "modern" is relu + max
    activation: Activation = "relu"
    pooling: Literal["max", "avg"] = "max"
    # resnet
    width: int = Field(16, ge=4, le=256, description="channels of the first stage")
    blocks: int = Field(1, ge=1, le=4, description="residual blocks per stage")
    shortcut: Literal["projection", "long"] = Field(
        "projection", description="resnet: a shortcut around every block (a 1x1 projection "
        "where the shape changes), or one long 1x1 strided shortcut over all stages")
    # resnet18 (torchvision's, for transfer learning)
    pretrained: str = Field("none", min_length=1, max_length=4096, description="resnet18: "
                            "none, imagenet (downloaded into the data directory) or the path "
                            "of a .pth state dict")
    freeze: bool = Field(False, description="resnet18: train the new classifier only")

    @field_validator("channels", "hidden", "head")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if any(w < 1 for w in widths):
            raise ValueError(f"every width must be >= 1, but got {widths}")
        return widths

    @field_validator("pool_blocks")
    @classmethod
    def _block_numbers(cls, blocks: list[int] | None) -> list[int] | None:
        if blocks is not None and (any(b < 1 for b in blocks) or len(set(blocks)) != len(blocks)):
            raise ValueError(f"pool_blocks lists distinct conv block numbers from 1, but got "
                             f"{blocks}")
        return blocks

    @model_validator(mode="after")
    def _arch_defaults(self) -> ModelConfig:
        if self.pool_blocks and max(self.pool_blocks) > len(self.channels):
            raise ValueError(f"pool_blocks {self.pool_blocks} names a block beyond the "
                             f"{len(self.channels)} conv blocks of channels {self.channels}")
        # Written through __dict__: a default is not a value the file set (model_fields_set
        # stays as it was), so changing `arch` later re-derives it.
        for key, value in ARCH_DEFAULTS[self.arch].items():
            if key not in self.model_fields_set:
                self.__dict__[key] = value
        return self


# The one declaration of which ModelConfig keys each architecture reads. A study file that
# sets or searches any other model key for that arch is rejected (`check_keys_read`);
# the params logged for a trial are these.
ARCH_KEYS: dict[str, tuple[str, ...]] = {
    "mlp": ("arch", "hidden", "activation", "batch_norm", "dropout"),
    "cnn": ("arch", "channels", "filter_size", "padding", "activation", "pool", "pooling",
            "pool_blocks", "batch_norm", "head", "dropout"),
    "lenet": ("arch", "filter_size", "activation", "pooling", "dropout"),
    "resnet": ("arch", "width", "blocks", "filter_size", "batch_norm", "shortcut", "head",
               "dropout"),
    "resnet18": ("arch", "pretrained", "freeze", "dropout"),
}
# Canonical values of the keys whose default depends on the arch.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"dropout": 0.0, "filter_size": 3, "batch_norm": False},
    "cnn": {"dropout": 0.5, "filter_size": 3, "batch_norm": False},
    "lenet": {"dropout": 0.0, "filter_size": 5, "batch_norm": False},
    "resnet": {"dropout": 0.0, "filter_size": 3, "batch_norm": True},
    "resnet18": {"dropout": 0.0, "filter_size": 3, "batch_norm": True},
}


LossName = Literal["cross_entropy", "mse"]


class TrainConfig(_Section):
    """Training settings. An optimizer's own hyperparameters (OPTIMIZER_KEYS) default to
    that optimizer's canonical values (OPTIMIZER_DEFAULTS), e.g. rmsprop's momentum is 0."""

    optimizer: OptimizerName = "adam"
    lr: float = Field(1e-3, gt=0, le=10)
    momentum: float | None = Field(None, ge=0, lt=1, description="momentum: 0.9, rmsprop: 0")
    nesterov: bool = Field(False, description="Nesterov momentum (optimizer: momentum)")
    alpha: float = Field(0.99, gt=0, lt=1, description="rmsprop: smoothing of the squares")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam, adamw")
    eps: float | None = Field(None, gt=0, le=1, description="adagrad: 1e-10; rmsprop, adam, "
                              "adamw: 1e-8")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1, le=65536)
    scheduler: Literal["none", "cosine"] = "none"
    loss: LossName = Field("cross_entropy", description="the training cost; mse is the "
                           "quadratic cost on softmax outputs. Reported losses are always "
                           "cross-entropy")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    eval_batch_size: int | None = Field(
        None, ge=1, description="batch size of validation and test passes; default: "
                                "measured per device (sweeper.ml.metrics.EVAL_BATCH_SIZE)")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"both betas must lie in [0, 1), but got {list(betas)}")
        return betas

    @model_validator(mode="after")
    def _optimizer_defaults(self) -> TrainConfig:
        for key, value in OPTIMIZER_DEFAULTS[self.optimizer].items():
            if key not in self.model_fields_set:
                self.__dict__[key] = value
        return self


# The one declaration of which optimizer-specific TrainConfig keys each optimizer reads;
# every other train key (lr, weight_decay, batch_size, ...) is read by all of them.
OPTIMIZER_KEYS: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "momentum": ("momentum", "nesterov"),
    "rmsprop": ("momentum", "alpha", "eps"),
    "adagrad": ("eps",),
    "adam": ("betas", "eps"),
    "adamw": ("betas", "eps"),
}
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.0, "eps": 1e-8},
    "momentum": {"momentum": 0.9, "eps": 1e-8},
    "rmsprop": {"momentum": 0.0, "eps": 1e-8},
    "adagrad": {"momentum": 0.0, "eps": 1e-10},
    "adam": {"momentum": 0.0, "eps": 1e-8},
    "adamw": {"momentum": 0.0, "eps": 1e-8},
}
OPTIMIZER_SPECIFIC = tuple(sorted({k for keys in OPTIMIZER_KEYS.values() for k in keys}))


class TrialConfig(_Section):
    """The fully resolved configuration one trial trains with."""

    dataset: DatasetConfig
    model: ModelConfig
    train: TrainConfig
    epochs: int = Field(ge=1)

    def flat(self) -> dict[str, Any]:
        """`{"train.lr": 0.001, "model.filter_size": 3, ...}`, only the keys that matter."""
        dataset = self.dataset.model_dump()
        if self.dataset.name != "synthetic":  # only the synthetic dataset reads them
            dataset.pop("synthetic")
        out: dict[str, Any] = dict(_flatten(dataset, "dataset"))
        train = self.train.model_dump()
        read = OPTIMIZER_KEYS[self.train.optimizer]
        for key, value in train.items():
            if key not in OPTIMIZER_SPECIFIC or key in read:
                out[f"train.{key}"] = value
        model = self.model.model_dump()
        for key in ARCH_KEYS[self.model.arch]:
            out[f"model.{key}"] = model[key]
        out["epochs"] = self.epochs
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> TrialConfig:
        """The config `flat()` described (keys it left out take their defaults)."""
        data: dict[str, Any] = {}
        for key, value in flat.items():
            _set_dotted(data, key, value)
        return cls.model_validate(data)


# --------------------------------------------------------------------------------------
# Budget, objective, sampler, pruner
# --------------------------------------------------------------------------------------
_BARE_SECONDS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*$")  # "420" -> "420s"
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*"
                       r"(?:(\d+(?:\.\d+)?)\s*s)?\s*$")


def parse_duration(value: Any) -> float | None:
    """Seconds from `90`, `"90"`, `"90s"`, `"30m"`, `"1h30m"` or None; ValueError otherwise.

    A bare number is seconds, whether YAML gives it as a number or the command line as
    text (`--timeout 420`)."""
    if value is None or isinstance(value, bool):
        if value is None:
            return None
        raise ValueError("expected a duration such as 90, '90s', '30m' or '2h'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(_BARE_SECONDS.sub(r"\1s", str(value)))
        if not match or not any(match.groups()):
            raise ValueError(f"expected a duration such as 90, '90s', '30m' or '2h', "
                             f"but got {_brief(value)}")
        h, m, s = (float(g) if g else 0.0 for g in match.groups())
        seconds = h * 3600 + m * 60 + s
    if seconds <= 0:
        raise ValueError(f"a duration must be > 0, but got {_brief(value)}")
    return seconds


class BudgetConfig(_Section):
    trials: int | None = Field(20, ge=1, description="total for the study, all workers")
    epochs: int = Field(10, ge=1, le=10000, description="epochs per trial")
    timeout: float | None = Field(None, description="stop starting trials after this long")

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return parse_duration(value)

    @model_validator(mode="after")
    def _bounded(self) -> BudgetConfig:
        if self.trials is None and self.timeout is None:
            raise ValueError("set budget.trials or budget.timeout, or the study never ends")
        return self


class ObjectiveConfig(_Section):
    metric: str = "val_accuracy"
    direction: Direction | None = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric in OBJECTIVE_METRICS:
            return metric
        if metric.startswith("test_"):
            raise ValueError(f"{_brief(metric)} would select on the test split; use "
                             f"{_brief('val_' + metric[5:])} (test metrics are reported, never "
                             f"optimized)")
        hint = _did_you_mean(metric, OBJECTIVE_METRICS)
        raise ValueError(f"unknown metric {_brief(metric)}{hint}"
                         f"; choose one of {', '.join(OBJECTIVE_METRICS)}")

    @model_validator(mode="after")
    def _default_direction(self) -> ObjectiveConfig:
        if self.direction is None:
            self.direction = OBJECTIVE_METRICS[self.metric]
        return self


class SamplerConfig(_Section):
    name: SamplerName = "tpe"
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="same seed + same trials = same samples")
    startup_trials: int | None = Field(None, ge=0, description="random trials before TPE/GP/"
                                       "CMA-ES model the space (Optuna's default if unset)")
    multivariate: bool = Field(True, description="TPE: model parameters jointly")


class PrunerConfig(_Section):
    name: PrunerName = "none"
    startup_trials: int = Field(5, ge=0, description="median: trials never pruned")
    warmup_epochs: int = Field(1, ge=0, description="median: epochs before judging a trial")
    min_epochs: int = Field(1, ge=1, description="hyperband/successive_halving: min resource")
    reduction_factor: int = Field(3, ge=2, description="hyperband/successive_halving")


# --------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FloatDim:
    key: str
    low: float
    high: float
    log: bool = False
    step: float | None = None
    name: str = ""

    @property
    def size(self) -> int | None:
        if self.step is None:
            return None
        return round((self.high - self.low) / self.step) + 1

    def values(self) -> list[float]:
        assert self.step is not None
        return [self.low + i * self.step for i in range(self.size or 0)]


@dataclass(frozen=True)
class IntDim:
    key: str
    low: int
    high: int
    log: bool = False
    step: int = 1
    name: str = ""

    @property
    def size(self) -> int:
        return (self.high - self.low) // self.step + 1

    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))


@dataclass(frozen=True)
class ChoiceDim:
    """A categorical dimension; with `branches`, each option carries its own sub-space."""

    key: str
    options: tuple[Any, ...]
    branches: Mapping[str, tuple[Dimension, ...]] | None = None
    name: str = ""

    @property
    def size(self) -> int | None:
        if not self.branches:
            return len(self.options)
        total = 0
        for option in self.options:
            sub = space_size(self.branches[option])
            if sub is None:
                return None
            total += sub
        return total

    def values(self) -> list[Any]:
        return list(self.options)


Dimension = FloatDim | IntDim | ChoiceDim


def space_size(dims: Iterable[Dimension]) -> int | None:
    """Number of distinct points of a space; None when a dimension is continuous."""
    total = 1
    for dim in dims:
        size = dim.size
        if size is None:
            return None
        total *= size
    return total


def walk_space(dims: Iterable[Dimension]) -> Iterable[Dimension]:
    """Every dimension, branch sub-spaces included, parents first."""
    for dim in dims:
        yield dim
        if isinstance(dim, ChoiceDim) and dim.branches:
            for sub in dim.branches.values():
                yield from walk_space(sub)


# --------------------------------------------------------------------------------------
# The whole study file
# --------------------------------------------------------------------------------------
class StudySpec(_Section):
    name: str
    description: str = Field("", max_length=MAX_DESCRIPTION)
    dataset: DatasetConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    budget: BudgetConfig = BudgetConfig()
    objective: ObjectiveConfig | None = None
    objectives: list[ObjectiveConfig] | None = Field(None, min_length=1)
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    models: ModelsPolicy = Field("all", description="log the model of every completed "
                                 "trial, of the best one so far only, or none")
    pack: int = Field(1, description="trials a worker trains together as one stacked "
                      "network (trial packing); 1 trains each alone")
    space: dict[str, Any] = Field(default_factory=dict)

    # Parsed from `space` by `from_dict`; kept out of the pydantic schema on purpose.
    _dimensions: tuple[Dimension, ...] = ()
    _source: str | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _STUDY_NAME.match(name):  # fullmatch by \A...\Z
            raise ValueError(f"a study name is 1-100 letters, digits, '.', '_' or '-', "
                             f"starting with a letter or digit, but got {_brief(name)}")
        return name

    @field_validator("pack", mode="before")
    @classmethod
    def _pack_size(cls, pack: Any) -> int:
        if isinstance(pack, bool) or not isinstance(pack, int) or not 1 <= pack <= MAX_PACK:
            raise ValueError(f"pack is the number of trials trained together, a whole "
                             f"number from 1 (each alone) to {MAX_PACK}, but got "
                             f"{_brief(pack)}; write for example `pack: 4`")
        return pack

    @model_validator(mode="after")
    def _one_way_to_say_objective(self) -> StudySpec:
        if self.objective is not None and self.objectives is not None:
            raise ValueError("give either `objective` or `objectives`, not both")
        if self.objective is None and self.objectives is None:
            self.objective = ObjectiveConfig()
        names = [o.metric for o in self.objective_list]
        if len(set(names)) != len(names):
            raise ValueError(f"each objective metric may appear once, but got {names}")
        return self

    @property
    def objective_list(self) -> list[ObjectiveConfig]:
        if self.objectives is not None:
            return list(self.objectives)
        assert self.objective is not None
        return [self.objective]

    @property
    def directions(self) -> list[str]:
        return [str(o.direction) for o in self.objective_list]

    @property
    def multi_objective(self) -> bool:
        return len(self.objective_list) > 1

    @property
    def dimensions(self) -> tuple[Dimension, ...]:
        return self._dimensions

    @property
    def source(self) -> str | None:
        """The path the spec was read from, for messages."""
        return self._source

    def base_config(self) -> dict[str, Any]:
        """The fixed trial configuration as plain data, before any sampled value."""
        return {
            "dataset": self.dataset.model_dump(),
            # Only what the file set: defaults that depend on the arch or the optimizer are
            # derived again once a trial's values are in.
            "model": self.model.model_dump(exclude_unset=True),
            "train": self.train.model_dump(exclude_unset=True),
            "epochs": self.budget.epochs,
        }

    def resolve(self, values: Mapping[str, Any]) -> TrialConfig:
        """The trial config with `values` (dotted key → value) put over the fixed one."""
        data = self.base_config()
        for key, value in values.items():
            _set_dotted(data, key, value)
        return TrialConfig.model_validate(data)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def load(path: str | Path) -> StudySpec:
    """Read and validate a study file; every problem is a one-line `ConfigError`.

    Only a regular file of at most `MAX_STUDY_BYTES` is read: a FIFO, a device such as
    /dev/zero or a huge file is refused before a byte is read."""
    path = Path(path)
    file = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ConfigError("no such file; give the path to a study file such as "
                          "studies/quickstart.yaml", file=file) from None
    except IsADirectoryError:
        raise ConfigError("is a directory; give the path to a study .yaml file",
                          file=file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read it ({exc.strerror or exc}); give a UTF-8 text file",
                          file=file) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError("is a directory; give the path to a study .yaml file", file=file)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("is not a regular file (a pipe, a device or a socket); give "
                              "the path to a study .yaml file", file=file)
        if info.st_size > MAX_STUDY_BYTES:
            raise ConfigError(f"is {info.st_size:,} bytes; a study file may be at most "
                              f"{MAX_STUDY_BYTES:,} bytes: shorten it", file=file)
        raw = f.read(MAX_STUDY_BYTES + 1)
    if len(raw) > MAX_STUDY_BYTES:  # it grew while being read
        raise ConfigError(f"is over {MAX_STUDY_BYTES:,} bytes; a study file may be at most "
                          f"{MAX_STUDY_BYTES:,} bytes: shorten it", file=file)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read it ({exc.reason} at byte {exc.start}); give a UTF-8 "
                          f"text file", file=file) from None
    return loads(text, file=file)


def loads(text: str, *, file: str = "<study>") -> StudySpec:
    """Validate a study given as YAML text; `file` names it in messages."""
    if len(text) > MAX_STUDY_BYTES:
        raise ConfigError(f"is {len(text):,} characters; a study file may be at most "
                          f"{MAX_STUDY_BYTES:,} bytes: shorten it", file=file)
    try:
        data = _parse_yaml(text, file)
    except yaml.constructor.ConstructorError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        tag = exc.problem.split("tag ")[-1] if exc.problem else "a tag"
        raise ConfigError(f"YAML tag {tag[:60]} is not allowed: a study file holds plain "
                          f"data only; remove the tag", file=file, line=line) from exc
    except yaml.YAMLError as exc:
        # Where the broken construct opened is where to look (an unclosed `{` is reported
        # at the end of the file otherwise).
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"YAML syntax error: {problem[:120]}; fix the YAML at that line",
                          file=file, line=line) from exc
    if data is None:
        raise ConfigError("the file is empty; start from studies/quickstart.yaml", file=file)
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of keys (name, dataset, ...), but got a "
                          f"{type(data).__name__}", file=file, line=1)
    return from_dict(data, file=file, text=text)


def _parse_yaml(text: str, file: str) -> Any:
    """The YAML's data: composed first (aliases stay shared nodes), measured, and only
    then built. libyaml when installed (a large file parses in milliseconds); a broken
    file of ordinary size is parsed again by PyYAML, whose messages say more."""
    fast = getattr(yaml, "CSafeLoader", None)
    for loader in ((fast, yaml.SafeLoader) if fast else (yaml.SafeLoader,)):
        try:
            _check_yaml_size(yaml.compose(text, Loader=loader), file)
            return yaml.load(text, Loader=loader)
        except yaml.YAMLError as exc:
            if "nesting depth" in str(exc):  # libyaml's own cap; PyYAML would crawl
                mark = getattr(exc, "problem_mark", None)
                raise ConfigError("YAML nests deeper than libyaml allows: a study file is "
                                  "a few levels deep; flatten it", file=file,
                                  line=mark.line + 1 if mark else None) from None
            if loader is yaml.SafeLoader or len(text) > 65_536:
                raise
    raise AssertionError("unreachable")


def _check_yaml_size(root: yaml.Node | None, file: str) -> None:
    """Refuse a document that expands to more than `MAX_YAML_VALUES` values or nests
    deeper than `MAX_YAML_DEPTH`. Counted on the composed graph, where an alias is the
    node it names: each node is sized once, so an alias bomb is measured in linear time
    without being expanded."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"YAML nests deeper than {MAX_YAML_DEPTH} levels: a study file "
                              f"is a few levels deep; flatten it", file=file,
                              line=node.start_mark.line + 1)
        if key in open_nodes:
            raise ConfigError("a YAML alias refers to the value that contains it (a "
                              "recursive structure); remove the alias", file=file,
                              line=node.start_mark.line + 1)
        total = 1
        if isinstance(node, yaml.CollectionNode):
            open_nodes.add(key)
            children = (node.value if isinstance(node, yaml.SequenceNode)
                        else [n for pair in node.value for n in pair])
            for child in children:
                total += size(child, depth + 1)
                if total > MAX_YAML_VALUES:
                    raise ConfigError(
                        f"the YAML holds more than {MAX_YAML_VALUES:,} values once its "
                        f"aliases (*name) are expanded; a study file needs a few hundred: "
                        f"remove the aliases or shorten it", file=file,
                        line=node.start_mark.line + 1)
            open_nodes.discard(key)
        sizes[key] = total
        return total

    if root is not None:
        size(root, 0)


def from_dict(data: Mapping[str, Any], *, file: str = "<study>", text: str | None = None
              ) -> StudySpec:
    """Validate a study given as plain data (what the YAML file holds)."""
    lines = _LineFinder(text)
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, data, file, lines, prefix=()) from None
    spec._source = file
    spec._dimensions = _SpaceParser(spec, file, lines).parse(spec.space)
    _check_keys_read(spec, file, lines)
    _check_combinations(spec, file, lines)
    return spec


# --------------------------------------------------------------------------------------
# Keys that mean something: each key set or searched is read by the arch/optimizer chosen
# --------------------------------------------------------------------------------------
# The keys whose value decides which other keys are read, and each one's declaration.
SELECTORS: dict[str, tuple[str, Mapping[str, tuple[str, ...]]]] = {
    "model.arch": ("arch", ARCH_KEYS),
    "train.optimizer": ("optimizer", OPTIMIZER_KEYS),
}


def selector_of(key: str) -> str | None:
    """The selector (`model.arch` or `train.optimizer`) that decides whether `key` is read;
    None for keys every trial reads (dataset keys, train.lr, ...)."""
    section, _, name = key.partition(".")
    if section == "model" and name != "arch":
        return "model.arch"
    if section == "train" and name in OPTIMIZER_SPECIFIC:
        return "train.optimizer"
    return None


def reads(selector: str, option: str, key: str) -> bool:
    """Whether `option` of `selector` (an arch, an optimizer) reads the dotted `key`."""
    return key.partition(".")[2] in SELECTORS[selector][1][option]


@dataclass(frozen=True)
class _SelectorChoice:
    """A selector searched in the space: where it is, and whether its options carry
    sub-spaces (so a key can move under the options that read it)."""

    path: tuple[Any, ...]
    branches: bool


def _check_keys_read(spec: StudySpec, file: str, lines: _LineFinder) -> None:
    """A fixed or searched key that the chosen arch or optimizer never reads is an error
    (it would train the same model under different labels). Defaults never count: only
    keys the file itself sets."""
    fixed: dict[str, tuple[Any, ...]] = {"model.arch": (spec.model.arch,),
                                         "train.optimizer": (spec.train.optimizer,)}
    top, choices = _selector_context(spec.dimensions, ("space",), fixed, {})
    for section in ("model", "train"):
        for name in sorted(getattr(spec, section).model_fields_set):
            key = f"{section}.{name}"
            if selector_of(key) is not None:
                _check_read(key, top, choices, (section, name), file, lines)
    _check_block(spec.dimensions, ("space",), fixed, {}, file, lines)


def _selector_context(dims: Iterable[Dimension], path: tuple[Any, ...],
                      options: Mapping[str, tuple[Any, ...]],
                      choices: Mapping[str, _SelectorChoice]
                      ) -> tuple[dict[str, tuple[Any, ...]], dict[str, _SelectorChoice]]:
    """The options each selector may take for the keys of a block (a selector searched in
    the block itself may take any of its options) and the selector choices in force."""
    options, choices = dict(options), dict(choices)
    for dim in dims:
        if dim.key in SELECTORS and isinstance(dim, ChoiceDim):
            options[dim.key] = dim.options
            choices[dim.key] = _SelectorChoice((*path, dim.key), bool(dim.branches))
    return options, choices


def _check_block(dims: tuple[Dimension, ...], path: tuple[Any, ...],
                 outer: Mapping[str, tuple[Any, ...]],
                 outer_choices: Mapping[str, _SelectorChoice], file: str,
                 lines: _LineFinder) -> None:
    options, choices = _selector_context(dims, path, outer, outer_choices)
    for dim in dims:
        dim_path = (*path, dim.key)
        if selector_of(dim.key) is not None:
            _check_read(dim.key, options, choices, dim_path, file, lines)
        if isinstance(dim, ChoiceDim) and dim.branches:
            for option, sub in dim.branches.items():
                inner, inner_choices = dict(options), dict(choices)
                if dim.key in SELECTORS:  # inside an option, the selector is that option
                    inner[dim.key] = (option,)
                    inner_choices.pop(dim.key, None)
                _check_block(sub, (*dim_path, "choice", option), inner, inner_choices,
                             file, lines)


def _check_read(key: str, options_of: Mapping[str, tuple[Any, ...]],
                choices: Mapping[str, _SelectorChoice], path: tuple[Any, ...], file: str,
                lines: _LineFinder) -> None:
    selector = selector_of(key)
    assert selector is not None
    options = options_of[selector]
    readers = [o for o in options if reads(selector, o, key)]
    if len(readers) == len(options):
        return
    what, declared = SELECTORS[selector]
    skipped = [o for o in options if o not in readers]

    def keys_of(option: Any) -> str:
        return ", ".join(k for k in declared[option] if k != what) or "no keys of its own"

    where = ".".join(str(p) for p in path)
    choice = choices.get(selector)
    if choice is None:
        option = options[0]
        others = [o for o in declared if reads(selector, o, key)]
        message = (f"{key} is not read by {what} {option}, so trials would differ in a label "
                   f"only; {what} {option} reads {keys_of(option)}")
        if others:
            message += f" ({key} is read by {what} {', '.join(others)})"
        raise ConfigError(message + "; remove it", file=file, key=where,
                          line=lines.find(path))
    at = ".".join(str(p) for p in choice.path)
    if not readers:
        fix = f"no option of {at} reads it; remove it"
    elif choice.branches:
        fix = "move it under " + ", ".join(f"{at}.choice.{o}" for o in readers)
    else:
        fix = (f"give {at} sub-spaces ({{choice: {{{readers[0]}: {{...}}, ...}}}}) and move "
               f"it under {', '.join(map(str, readers))}")
    raise ConfigError(f"{key} is not read by {what} {', '.join(map(str, skipped))} of the "
                      f"{selector} choice ({what} {skipped[0]} reads {keys_of(skipped[0])}); "
                      f"{fix}", file=file, key=where, line=lines.find(path))


def _check_combinations(spec: StudySpec, file: str, lines: _LineFinder) -> None:
    """Rules that tie several sections together."""
    if spec.pruner.name != "none":
        if spec.multi_objective:
            raise ConfigError("Optuna cannot prune a multi-objective study; set "
                              "`pruner: {name: none}` or keep one objective",
                              file=file, key="pruner.name", line=lines.find(("pruner",)))
        metric = spec.objective_list[0].metric
        if metric not in EPOCH_METRICS:
            raise ConfigError(f"a pruner judges trials by the objective after each epoch, "
                              f"but {_brief(metric)} is only known at the end; use "
                              f"{' or '.join(EPOCH_METRICS)} or `pruner: {{name: none}}`",
                              file=file, key="pruner.name", line=lines.find(("pruner",)))
    if spec.sampler.name == "grid":
        for dim in walk_space(spec.dimensions):
            if isinstance(dim, ChoiceDim) and dim.branches and any(dim.branches.values()):
                raise ConfigError("the grid sampler needs one fixed set of parameters, but "
                                  "this choice carries sub-spaces; use sampler tpe or random",
                                  file=file, key=f"space.{dim.key}",
                                  line=lines.find(("space", dim.key)))
            if isinstance(dim, FloatDim) and dim.step is None:
                raise ConfigError("the grid sampler cannot search a continuous range; "
                                  "give it a `step`, or use a `choice`",
                                  file=file, key=f"space.{dim.key}",
                                  line=lines.find(("space", dim.key)))
    _check_splits(spec, file, lines)
    check_pack(spec, file, lines)
    if spec.sampler.name == "nsga2" and not spec.multi_objective:
        # NSGA-II works for one objective too, but it is almost never what is meant.
        pass


def check_pack(spec: StudySpec, file: str | None = None, lines: _LineFinder | None = None
               ) -> None:
    """`pack` > 1 needs trials whose shape params can be fixed while the sampler picks the
    rest: not the grid sampler (it picks every param), and not an arch that cannot be
    packed (resnet18) when every trial would use it."""
    if spec.pack <= 1:
        return
    file = file or spec.source or "<study>"
    line = lines.find(("pack",)) if lines is not None else None
    if spec.sampler.name == "grid":
        raise ConfigError(f"pack {spec.pack} needs a sampler that lets shape params be fixed, "
                          f"but the grid sampler picks every param itself; use `pack: 1` or "
                          f"sampler tpe or random", file=file, key="pack", line=line)
    archs = {spec.model.arch}
    for dim in walk_space(spec.dimensions):
        if dim.key == "model.arch" and isinstance(dim, ChoiceDim):
            archs = set(dim.options)
    if archs == {"resnet18"}:
        raise ConfigError(f"pack {spec.pack}: arch resnet18 (torchvision's) cannot be "
                          f"packed, every trial trains alone; use `pack: 1`", file=file,
                          key="pack", line=line)


def with_pack(spec: StudySpec, pack: int) -> StudySpec:
    """The spec with `pack` set from the command line (`--pack K`), checked as in a file."""
    try:
        spec.pack = pack
    except ValidationError as exc:
        raise ConfigError(f"--pack: {_describe(exc.errors()[0])}", file=spec.source
                          or "<study>", key="pack") from None
    check_pack(spec)
    return spec


def _check_splits(spec: StudySpec, file: str, lines: _LineFinder) -> None:
    """The training split must hold at least one batch (the largest the space may pick):
    `val_fraction: 0.999999` would otherwise train every trial on one image."""
    dataset = spec.dataset
    total = (dataset.synthetic.train_size if dataset.name == "synthetic"
             else DATASET_TRAIN_SIZES[dataset.name])
    held_out = min(max(1, round(total * dataset.val_fraction)), total - 1)  # as data.py
    train = total - held_out
    if dataset.subset is not None:
        train = min(train, dataset.subset)
    batch = spec.train.batch_size
    for dim in walk_space(spec.dimensions):
        if dim.key == "train.batch_size":
            batch = max(batch, int(max(dim.values()) if isinstance(dim, ChoiceDim)
                                   else dim.high))
    if train < batch:
        key = "dataset.val_fraction" if dataset.val_fraction > 0.5 else "dataset"
        raise ConfigError(f"the training split holds {train:,} image(s) ({total:,} minus "
                          f"val_fraction {dataset.val_fraction:g}"
                          f"{'' if dataset.subset is None else ', subset'}), fewer than one "
                          f"batch of {batch}; lower val_fraction or train.batch_size",
                          file=file, key=key, line=lines.find(tuple(key.split("."))))


# --------------------------------------------------------------------------------------
# The space block
# --------------------------------------------------------------------------------------
_SPACE_FORMS = ("{float: [low, high]}, {int: [low, high]} (with optional log: true, "
                "step: x) or {choice: [a, b, ...]}")
_SEARCHABLE_SECTIONS: dict[str, type[BaseModel]] = {
    "dataset": DatasetConfig,
    "model": ModelConfig,
    "train": TrainConfig,
}


def searchable_keys() -> list[str]:
    """Every dotted key the space may search, e.g. `train.lr`, `dataset.augment.rotate`."""
    keys: list[str] = []

    def visit(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                visit(annotation, f"{prefix}{name}.")
            else:
                keys.append(f"{prefix}{name}")

    for section, model in _SEARCHABLE_SECTIONS.items():
        visit(model, f"{section}.")
    return [k for k in keys if k not in ("dataset.name", "dataset.synthetic")]


def _field_annotation(key: str) -> Any:
    parts = key.split(".")
    model: Any = _SEARCHABLE_SECTIONS[parts[0]]
    for part in parts[1:]:
        model = model.model_fields[part].annotation
    # `int | None` (a default derived from the arch or the optimizer) is an int key.
    args = [a for a in getattr(model, "__args__", ()) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in model.__args__ else model


class _SpaceParser:
    def __init__(self, spec: StudySpec, file: str, lines: _LineFinder) -> None:
        self.spec = spec
        self.file = file
        self.lines = lines
        self.keys = searchable_keys()

    def parse(self, raw: Mapping[str, Any]) -> tuple[Dimension, ...]:
        dims = self._parse_block(raw, ("space",), taken=set())
        return self._name_dimensions(dims)

    def _error(self, path: tuple[Any, ...], message: str) -> ConfigError:
        return ConfigError(message, file=self.file, key=".".join(str(p) for p in path),
                           line=self.lines.find(path))

    def _parse_block(self, raw: Any, path: tuple[Any, ...], taken: set[str]
                     ) -> tuple[Dimension, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, Mapping):
            raise self._error(path, f"expected a mapping of dotted keys to dimensions, but "
                                    f"got {_brief(raw)}")
        dims: list[Dimension] = []
        for key, body in raw.items():
            key_path = (*path, key)
            if not isinstance(key, str) or key not in self.keys:
                hint = _did_you_mean(str(key), self.keys)
                raise self._error(key_path, f"unknown key {_brief(key)}{hint}; space keys are "
                                            f"dotted paths into dataset, model or train, "
                                            f"such as train.lr or model.filter_size")
            if key in taken:
                raise self._error(key_path, f"{_brief(key)} is already searched by an enclosing "
                                            f"choice; remove one of them")
            dims.append(self._parse_dimension(key, body, key_path, taken))
        return tuple(dims)

    def _parse_dimension(self, key: str, body: Any, path: tuple[Any, ...], taken: set[str]
                         ) -> Dimension:
        if not isinstance(body, Mapping):
            raise self._error(path, f"expected {_SPACE_FORMS}, but got {_brief(body)}")
        kinds = [k for k in ("float", "int", "choice") if k in body]
        if len(kinds) != 1:
            extra = [k for k in body if k not in ("float", "int", "choice", "log", "step")]
            hint = _did_you_mean(str(extra[0]), ["float", "int", "choice", "log", "step"]) \
                if extra else ""
            raise self._error(path, f"expected exactly one of float, int or choice{hint}; "
                                    f"write {_SPACE_FORMS}")
        kind = kinds[0]
        allowed = {"choice"} if kind == "choice" else {kind, "log", "step"}
        for extra in body:
            if extra not in allowed:
                raise self._error((*path, extra), f"unknown key {_brief(extra)} for a {kind} "
                                                  f"dimension; it takes {sorted(allowed)}")
        if kind == "choice":
            return self._parse_choice(key, body["choice"], path, taken)
        return self._parse_range(key, kind, body, path)

    def _parse_range(self, key: str, kind: str, body: Mapping[str, Any],
                     path: tuple[Any, ...]) -> Dimension:
        bounds = body[kind]
        if (not isinstance(bounds, list | tuple) or len(bounds) != 2
                or not all(_is_number(b) for b in bounds)):
            raise self._error((*path, kind), f"expected [low, high], two numbers, but got "
                                             f"{_brief(bounds)}")
        low, high = bounds
        log = body.get("log", False)
        step = body.get("step")
        if not isinstance(log, bool):
            raise self._error((*path, "log"), f"expected true or false, but got {_brief(log)}")
        if kind == "int" and not all(float(b).is_integer() for b in bounds):
            raise self._error((*path, kind), f"int bounds must be whole numbers, but got "
                                             f"{_brief(bounds)}; use float for fractions")
        if low > high:
            raise self._error((*path, kind), f"`low <= high` must hold, but got low={low} "
                                             f"and high={high}; swap them")
        if log and low <= 0:
            raise self._error((*path, kind), f"a log scale needs low > 0, but got low={low}; "
                                             f"raise low or drop log: true")
        if step is not None:
            if not _is_number(step) or step <= 0:
                raise self._error((*path, "step"), f"step must be a number > 0, but got "
                                                   f"{_brief(step)}")
            if log:
                raise self._error((*path, "step"), "step and log: true cannot be combined "
                                                   "(Optuna does not support it); drop one")
            if kind == "int" and not float(step).is_integer():
                raise self._error((*path, "step"), f"an int step must be a whole number, "
                                                   f"but got {_brief(step)}")
        annotation = _field_annotation(key)
        if kind == "float" and annotation is int:
            raise self._error((*path, kind), f"{key} takes whole numbers; write "
                                             f"{{int: [{int(low)}, {int(high)}]}}")
        dim: Dimension
        if kind == "float":
            dim = FloatDim(key, float(low), float(high), log, None if step is None
                           else float(step))
        else:
            dim = IntDim(key, int(low), int(high), log, 1 if step is None else int(step))
        for value in (dim.low, dim.high):
            self._check_value(key, value, (*path, kind))
        return dim

    def _parse_choice(self, key: str, options: Any, path: tuple[Any, ...], taken: set[str]
                      ) -> ChoiceDim:
        choice_path = (*path, "choice")
        if isinstance(options, Mapping):
            if not options:
                raise self._error(choice_path, "an empty choice has nothing to pick; list "
                                               "at least one option")
            if len(options) > MAX_CHOICE_OPTIONS:
                raise self._error(choice_path, f"a choice of {len(options):,} options; at "
                                               f"most {MAX_CHOICE_OPTIONS:,} are allowed")
            branches: dict[str, tuple[Dimension, ...]] = {}
            for option, sub in options.items():
                self._check_value(key, option, (*choice_path, option))
                branches[option] = self._parse_block(sub, (*choice_path, option),
                                                     taken | {key})
            return ChoiceDim(key, tuple(options), branches)
        if not isinstance(options, list):
            raise self._error(choice_path, f"expected a list of options, or a mapping of "
                                           f"option to its sub-space, but got {_brief(options)}")
        if not options:
            raise self._error(choice_path, "an empty choice has nothing to pick; list at "
                                           "least one option")
        if len(options) > MAX_CHOICE_OPTIONS:
            raise self._error(choice_path, f"a choice of {len(options):,} options; at most "
                                           f"{MAX_CHOICE_OPTIONS:,} are allowed: search a "
                                           f"range ({{int: [low, high]}}) instead")
        seen: set[Any] = set()
        for index, option in enumerate(options):
            frozen = _freeze(option)
            try:
                hash(frozen)
            except TypeError:  # a mapping as an option: compared by its text
                frozen = ("unhashable", repr(option))  # bounded by MAX_YAML_VALUES
            if frozen in seen:
                raise self._error((*choice_path, index),
                                  f"option {_brief(option)} is listed twice")
            seen.add(frozen)
            self._check_value(key, option, (*choice_path, index))
        return ChoiceDim(key, tuple(_freeze(o) for o in options))

    def _check_value(self, key: str, value: Any, path: tuple[Any, ...]) -> None:
        """A value the space may sample must pass the same checks as a hand-written one."""
        try:
            self.spec.resolve({key: _thaw(value)})
        except ValidationError as exc:
            err = exc.errors()[0]
            raise self._error(path, f"value {_brief(value)} is not valid for {key}: "
                                    f"{_describe(err)}") from None

    def _name_dimensions(self, dims: tuple[Dimension, ...]) -> tuple[Dimension, ...]:
        """Optuna parameter names: the key, or `key[option]` where branches disagree."""
        definitions: dict[str, set[Any]] = {}
        for dim in walk_space(dims):
            definitions.setdefault(dim.key, set()).add(_signature(dim))

        def rename(dims: tuple[Dimension, ...], option: str | None) -> tuple[Dimension, ...]:
            out: list[Dimension] = []
            for dim in dims:
                name = dim.key
                if option is not None and len(definitions[dim.key]) > 1:
                    name = f"{dim.key}[{option}]"
                if isinstance(dim, ChoiceDim) and dim.branches:
                    branches = {o: rename(sub, str(o)) for o, sub in dim.branches.items()}
                    out.append(ChoiceDim(dim.key, dim.options, branches, name))
                elif isinstance(dim, ChoiceDim):
                    out.append(ChoiceDim(dim.key, dim.options, None, name))
                elif isinstance(dim, FloatDim):
                    out.append(FloatDim(dim.key, dim.low, dim.high, dim.log, dim.step, name))
                else:
                    out.append(IntDim(dim.key, dim.low, dim.high, dim.log, dim.step, name))
            return tuple(out)

        return rename(dims, None)


def _signature(dim: Dimension) -> Any:
    if isinstance(dim, ChoiceDim):
        return ("choice", dim.options, tuple(dim.branches or ()))
    return (type(dim).__name__, dim.low, dim.high, dim.log, dim.step)


def _freeze(value: Any) -> Any:
    """Lists become tuples so options are hashable (Optuna wants plain hashable choices)."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


# --------------------------------------------------------------------------------------
# Helpers: dotted keys, messages, line numbers
# --------------------------------------------------------------------------------------
def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = copy.deepcopy(_thaw(value))


def _flatten(data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}.{key}"))
        else:
            out[f"{prefix}.{key}"] = value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _brief(value: Any, limit: int = 80) -> str:
    """`repr(value)` bounded in time and length: the first few items of each container, a
    few levels deep, however large (or alias-expanded) the value is."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 6, 6, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(word[:100], list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {_brief(match[0])}?)" if match else ""


def _describe(err: Mapping[str, Any]) -> str:
    """A pydantic error as a sentence that states the rule and the bad value."""
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = _did_you_mean(str(value), expected)
        return f"{_brief(value)} is not one of {', '.join(expected)}{hint}"
    if kind == "missing":
        return "is required but missing; add it"
    message = str(err.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if kind.startswith(("greater", "less", "too_", "int_", "float_", "bool_", "string_",
                        "list_", "model_", "dict_")):
        return f"{message[0].lower()}{message[1:]}, but got {_brief(value)}"
    return message


def _config_error(exc: ValidationError, data: Any, file: str, lines: _LineFinder,
                  prefix: tuple[Any, ...]) -> ConfigError:
    err = exc.errors()[0]
    loc = _real_path(data, err["loc"])
    key = ".".join(str(p) for p in (*prefix, *loc)) or None
    if err["type"] == "extra_forbidden":
        *parent, bad = loc
        model = _model_at(tuple(parent))
        known = list(model.model_fields) if model else []
        where = ".".join(str(p) for p in parent) or "the top level"
        message = (f"unknown key {_brief(bad)}{_did_you_mean(str(bad), known)}; {where} takes "
                   f"{', '.join(known)}")
    else:
        message = _describe(err)
    return ConfigError(message, file=file, key=key, line=lines.find(loc))


def _real_path(data: Any, loc: Iterable[Any]) -> tuple[Any, ...]:
    """Drop pydantic's union-member tags from an error location: keep real keys only."""
    path: list[Any] = []
    node = data
    for part in loc:
        in_mapping = isinstance(node, Mapping) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if in_mapping or in_list:
            node = node[part]
            path.append(part)
        elif not path or isinstance(node, Mapping):
            # A missing or unknown key: still part of the path the user must fix.
            if isinstance(part, str) and part not in ("int", "float", "str", "list[int]",
                                                       "function-after", "function-before"):
                path.append(part)
            break
    return tuple(path)


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = StudySpec
    for part in path:
        if isinstance(part, int):
            continue  # an index into a list of sections: same model
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        annotation = info.annotation
        # `ObjectiveConfig | None` and `list[ObjectiveConfig] | None`
        for arg in getattr(annotation, "__args__", (annotation,)):
            inner = getattr(arg, "__args__", (arg,))[0]
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                annotation = inner
                break
        model = annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


@dataclass
class _LineFinder:
    """Maps a key path to its 1-based line in the YAML text, for messages."""

    text: str | None
    _root: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.text:
            try:
                loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
                self._root = yaml.compose(self.text, Loader=loader)
            except yaml.YAMLError:
                self._root = None

    def find(self, path: Iterable[Any]) -> int | None:
        node = self._root
        line = None
        for part in path:
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if key_node.value == str(part):
                        line = key_node.start_mark.line + 1
                        node = value_node
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if part >= len(node.value):
                    return line
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line
