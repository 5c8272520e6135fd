"""The study file: its schema, every default, and loading it with one-line errors.

A study file says *what* to search (dataset, model, training, budget, objective, sampler,
pruner and the `space` of hyperparameters); the environment says *where* (storage,
tracking server, data directory, device). Everything here is plain data: no torch, optuna
or mlflow, so `sweeper validate` starts instantly.
"""

from __future__ import annotations

import copy
import difflib
import re
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
Arch = Literal["mlp", "cnn", "lenet", "resnet"]
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

_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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
    seed: int = Field(0, description="seed of the validation split and subsets")
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


class ModelConfig(_Section):
    """Every architecture's knobs; each arch reads only its own (see ARCH_KEYS)."""

    arch: Arch = "cnn"
    dropout: float = Field(0.5, ge=0, lt=1)
    # conv nets (cnn, lenet, resnet)
    filter_size: int = Field(3, ge=1, le=15, description="conv kernel size F (FxF)")
    # cnn: one conv block per entry; the classic MNIST ConvNet is [32, 64]
    channels: list[int] = Field(default_factory=lambda: [32, 64], min_length=1, max_length=8)
    padding: Literal["valid", "same"] = "valid"
    pool: int = Field(2, ge=1, le=4, description="max-pool size after each conv block")
    batch_norm: bool = False
    head: list[int] = Field(default_factory=list, max_length=4, description="dense layers")
    # mlp
    hidden: list[int] = Field(default_factory=lambda: [256, 128], max_length=8)
    # lenet: "classic" LeNet-5 is sigmoid + avg; "modern" is relu + max
    activation: Literal["relu", "sigmoid", "tanh", "gelu"] = "relu"
    pooling: Literal["max", "avg"] = "max"
    # resnet
    width: int = Field(16, ge=4, le=256, description="channels of the first stage")
    blocks: int = Field(1, ge=1, le=4, description="residual blocks per stage")

    @field_validator("channels", "hidden", "head")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if any(w < 1 for w in widths):
            raise ValueError(f"every width must be >= 1, but got {widths}")
        return widths


# Which ModelConfig keys each architecture reads; params logged for a trial are these.
ARCH_KEYS: dict[str, tuple[str, ...]] = {
    "mlp": ("arch", "hidden", "dropout", "activation"),
    "cnn": ("arch", "channels", "filter_size", "padding", "pool", "batch_norm", "head",
            "dropout"),
    "lenet": ("arch", "filter_size", "activation", "pooling", "dropout"),
    "resnet": ("arch", "width", "blocks", "filter_size", "dropout"),
}


class TrainConfig(_Section):
    optimizer: OptimizerName = "adam"
    lr: float = Field(1e-3, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1, description="for momentum and rmsprop")
    nesterov: bool = Field(False, description="Nesterov momentum (optimizer: momentum)")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1, le=65536)
    scheduler: Literal["none", "cosine"] = "none"
    seed: int = 0
    eval_batch_size: int | None = Field(
        None, ge=1, description="batch size of validation and test passes; default: "
                                "measured per device (sweeper.evaluate.EVAL_BATCH_SIZE)")


class TrialConfig(_Section):
    """The fully resolved configuration one trial trains with."""

    dataset: DatasetConfig
    model: ModelConfig
    train: TrainConfig
    epochs: int = Field(ge=1)

    def flat(self) -> dict[str, Any]:
        """`{"train.lr": 0.001, "model.filter_size": 3, ...}`, only the keys that matter."""
        out: dict[str, Any] = {}
        for section in ("dataset", "train"):
            for key, value in _flatten(getattr(self, section).model_dump(), section).items():
                out[key] = value
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
                             f"but got {value!r}")
        h, m, s = (float(g) if g else 0.0 for g in match.groups())
        seconds = h * 3600 + m * 60 + s
    if seconds <= 0:
        raise ValueError(f"a duration must be > 0, but got {value!r}")
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
            raise ValueError(f"{metric!r} would select on the test split; use "
                             f"{'val_' + metric[5:]!r} (test metrics are reported, never "
                             f"optimized)")
        raise ValueError(f"unknown metric {metric!r}{_did_you_mean(metric, OBJECTIVE_METRICS)}"
                         f"; choose one of {', '.join(OBJECTIVE_METRICS)}")

    @model_validator(mode="after")
    def _default_direction(self) -> ObjectiveConfig:
        if self.direction is None:
            self.direction = OBJECTIVE_METRICS[self.metric]
        return self


class SamplerConfig(_Section):
    name: SamplerName = "tpe"
    seed: int | None = Field(None, description="same seed + same trials = same samples")
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
    description: str = ""
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
    space: dict[str, Any] = Field(default_factory=dict)

    # Parsed from `space` by `from_dict`; kept out of the pydantic schema on purpose.
    _dimensions: tuple[Dimension, ...] = ()
    _source: str | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _STUDY_NAME.match(name):
            raise ValueError(f"a study name is 1-100 letters, digits, '.', '_' or '-', "
                             f"starting with a letter or digit, but got {name!r}")
        return name

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
            "model": self.model.model_dump(),
            "train": self.train.model_dump(),
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
    """Read and validate a study file; every problem is a one-line `ConfigError`."""
    path = Path(path)
    file = str(path)
    if not path.exists():
        raise ConfigError("no such file; give the path to a study file such as "
                          "studies/quickstart.yaml", file=file)
    if path.is_dir():
        raise ConfigError("is a directory; give the path to a study .yaml file", file=file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read it ({exc}); give a UTF-8 text file", file=file) from exc
    return loads(text, file=file)


def loads(text: str, *, file: str = "<study>") -> StudySpec:
    """Validate a study given as YAML text; `file` names it in messages."""
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        tag = exc.problem.split("tag ")[-1] if exc.problem else "a tag"
        raise ConfigError(f"YAML tag {tag} is not allowed: a study file holds plain data "
                          f"only; remove the tag", file=file, line=line) from exc
    except yaml.YAMLError as exc:
        # Where the broken construct opened is where to look (an unclosed `{` is reported
        # at the end of the file otherwise).
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"YAML syntax error: {problem}; fix the YAML at that line",
                          file=file, line=line) from exc
    if data is None:
        raise ConfigError("the file is empty; start from studies/quickstart.yaml", file=file)
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of keys (name, dataset, ...), but got a "
                          f"{type(data).__name__}", file=file, line=1)
    return from_dict(data, file=file, text=text)


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
    _check_combinations(spec, file, lines)
    return spec


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
                              f"but {metric!r} is only known at the end; use "
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
    if spec.sampler.name == "nsga2" and not spec.multi_objective:
        # NSGA-II works for one objective too, but it is almost never what is meant.
        pass


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
    return model


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
                                    f"got {raw!r}")
        dims: list[Dimension] = []
        for key, body in raw.items():
            key_path = (*path, key)
            if not isinstance(key, str) or key not in self.keys:
                hint = _did_you_mean(str(key), self.keys)
                raise self._error(key_path, f"unknown key {key!r}{hint}; space keys are "
                                            f"dotted paths into dataset, model or train, "
                                            f"such as train.lr or model.filter_size")
            if key in taken:
                raise self._error(key_path, f"{key!r} is already searched by an enclosing "
                                            f"choice; remove one of them")
            dims.append(self._parse_dimension(key, body, key_path, taken))
        return tuple(dims)

    def _parse_dimension(self, key: str, body: Any, path: tuple[Any, ...], taken: set[str]
                         ) -> Dimension:
        if not isinstance(body, Mapping):
            raise self._error(path, f"expected {_SPACE_FORMS}, but got {body!r}")
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
                raise self._error((*path, extra), f"unknown key {extra!r} for a {kind} "
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
                                             f"{bounds!r}")
        low, high = bounds
        log = body.get("log", False)
        step = body.get("step")
        if not isinstance(log, bool):
            raise self._error((*path, "log"), f"expected true or false, but got {log!r}")
        if kind == "int" and not all(float(b).is_integer() for b in bounds):
            raise self._error((*path, kind), f"int bounds must be whole numbers, but got "
                                             f"{bounds!r}; use float for fractions")
        if low > high:
            raise self._error((*path, kind), f"`low <= high` must hold, but got low={low} "
                                             f"and high={high}; swap them")
        if log and low <= 0:
            raise self._error((*path, kind), f"a log scale needs low > 0, but got low={low}; "
                                             f"raise low or drop log: true")
        if step is not None:
            if not _is_number(step) or step <= 0:
                raise self._error((*path, "step"), f"step must be a number > 0, but got "
                                                   f"{step!r}")
            if log:
                raise self._error((*path, "step"), "step and log: true cannot be combined "
                                                   "(Optuna does not support it); drop one")
            if kind == "int" and not float(step).is_integer():
                raise self._error((*path, "step"), f"an int step must be a whole number, "
                                                   f"but got {step!r}")
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
            branches: dict[str, tuple[Dimension, ...]] = {}
            for option, sub in options.items():
                self._check_value(key, option, (*choice_path, option))
                branches[option] = self._parse_block(sub, (*choice_path, option),
                                                     taken | {key})
            return ChoiceDim(key, tuple(options), branches)
        if not isinstance(options, list):
            raise self._error(choice_path, f"expected a list of options, or a mapping of "
                                           f"option to its sub-space, but got {options!r}")
        if not options:
            raise self._error(choice_path, "an empty choice has nothing to pick; list at "
                                           "least one option")
        seen: list[Any] = []
        for index, option in enumerate(options):
            if option in seen:
                raise self._error((*choice_path, index), f"option {option!r} is listed twice")
            seen.append(option)
            self._check_value(key, option, (*choice_path, index))
        return ChoiceDim(key, tuple(_freeze(o) for o in options))

    def _check_value(self, key: str, value: Any, path: tuple[Any, ...]) -> None:
        """A value the space may sample must pass the same checks as a hand-written one."""
        try:
            self.spec.resolve({key: _thaw(value)})
        except ValidationError as exc:
            err = exc.errors()[0]
            raise self._error(path, f"value {value!r} is not valid for {key}: "
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


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _describe(err: Mapping[str, Any]) -> str:
    """A pydantic error as a sentence that states the rule and the bad value."""
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = _did_you_mean(str(value), expected)
        return f"{value!r} is not one of {', '.join(expected)}{hint}"
    if kind == "missing":
        return "is required but missing; add it"
    message = str(err.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if kind.startswith(("greater", "less", "too_", "int_", "float_", "bool_", "string_",
                        "list_", "model_", "dict_")):
        return f"{message[0].lower()}{message[1:]}, but got {value!r}"
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
        message = (f"unknown key {bad!r}{_did_you_mean(str(bad), known)}; {where} takes "
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
                self._root = yaml.compose(self.text, Loader=yaml.SafeLoader)
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
