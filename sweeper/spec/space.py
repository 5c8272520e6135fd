"""The `space:` block turned into Optuna suggestions, and sampled values into a trial config.

A choice may carry a sub-space per option (`model.arch` carries each architecture's own
knobs), and those parameters are only suggested when their option is picked, so the
sampler never sees, say, a filter size for an MLP. Every sampled config is validated
again by the same schema as a hand-written one.

Optuna is not imported here: suggestions go through the trial object handed in.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from sweeper.errors import InfeasibleConfig, TrialFailure
from sweeper.spec import shapes
from sweeper.spec.config import (
    ChoiceDim,
    Dimension,
    FloatDim,
    IntDim,
    StudySpec,
    TrialConfig,
    space_size,
    walk_space,
)


class Suggester(Protocol):
    """What `suggest` asks of an `optuna.Trial` (Optuna itself is not imported here)."""

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1,
                    log: bool = False) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...

# Keys whose values decide layer shapes; `validate` looks for infeasible corners in them.
_SHAPE_KEYS = ("model.arch", "model.filter_size", "model.padding", "model.pool",
               "model.channels", "model.pool_blocks", "model.blocks", "model.shortcut")
_MAX_CORNERS = 4096


# --------------------------------------------------------------------------------------
# Optuna parameter values: Optuna's categorical choices must be None/bool/int/float/str,
# so list-valued options (channels, hidden widths) travel as JSON text.
# --------------------------------------------------------------------------------------
def encode(option: Any) -> Any:
    if option is None or isinstance(option, bool | int | float | str):
        return option
    return json.dumps(list(option) if isinstance(option, tuple) else option)


def decode(dim: ChoiceDim, value: Any) -> Any:
    for option in dim.options:
        if encode(option) == value:
            return option
    raise TrialFailure(f"{dim.name}={value!r} is not one of the options in the study file")


def suggest(trial: Suggester, spec: StudySpec) -> TrialConfig:
    """Ask the trial for a value of every active dimension; return the validated config."""
    values: dict[str, Any] = {}
    _suggest_block(trial, spec.dimensions, values)
    return resolve(spec, values)


def _suggest_block(trial: Suggester, dims: Sequence[Dimension], values: dict[str, Any]
                   ) -> None:
    for dim in dims:
        if isinstance(dim, FloatDim):
            values[dim.key] = trial.suggest_float(dim.name, dim.low, dim.high, log=dim.log,
                                                  step=dim.step)
        elif isinstance(dim, IntDim):
            values[dim.key] = trial.suggest_int(dim.name, dim.low, dim.high, log=dim.log,
                                                step=dim.step)
        else:
            picked = trial.suggest_categorical(dim.name, [encode(o) for o in dim.options])
            option = decode(dim, picked)
            values[dim.key] = option
            if dim.branches:
                _suggest_block(trial, dim.branches[option], values)


def resolve(spec: StudySpec, values: Mapping[str, Any]) -> TrialConfig:
    """Sampled values over the fixed config; a value the schema refuses fails the trial."""
    try:
        return spec.resolve(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise TrialFailure(f"sampled config is invalid at {key}: {err['msg']} "
                           f"(got {err.get('input')!r})") from None


def params_to_values(spec: StudySpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna params of a finished trial (by parameter name) → dotted key → value."""
    values: dict[str, Any] = {}

    def visit(dims: Sequence[Dimension]) -> None:
        for dim in dims:
            if dim.name not in params:
                continue
            if isinstance(dim, ChoiceDim):
                option = decode(dim, params[dim.name])
                values[dim.key] = option
                if dim.branches:
                    visit(dim.branches[option])
            else:
                values[dim.key] = params[dim.name]

    visit(spec.dimensions)
    return values


# --------------------------------------------------------------------------------------
# Grid sampling: one fixed set of parameters (branching choices are refused by config)
# --------------------------------------------------------------------------------------
def grid(spec: StudySpec) -> dict[str, list[Any]]:
    """Optuna GridSampler search space: parameter name → every value on the grid."""
    out: dict[str, list[Any]] = {}
    for dim in spec.dimensions:
        if isinstance(dim, ChoiceDim):
            out[dim.name] = [encode(o) for o in dim.options]
        else:
            out[dim.name] = list(dim.values())
    return out


# --------------------------------------------------------------------------------------
# Describing a space for `sweeper validate`
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DimensionInfo:
    name: str
    kind: str
    values: str
    condition: str  # "" or "model.arch=cnn"


def describe(spec: StudySpec) -> list[DimensionInfo]:
    """One row per dimension, branch sub-spaces included, with the option they hang on."""
    rows: list[DimensionInfo] = []

    def visit(dims: Sequence[Dimension], condition: str) -> None:
        for dim in dims:
            if isinstance(dim, ChoiceDim):
                options = ", ".join(str(encode(o)) for o in dim.options)
                rows.append(DimensionInfo(dim.name, "choice", f"[{options}]", condition))
                for option, sub in (dim.branches or {}).items():
                    visit(sub, f"{dim.key}={option}")
            else:
                kind = "float" if isinstance(dim, FloatDim) else "int"
                text = f"[{dim.low:g}, {dim.high:g}]"
                if dim.log:
                    text += " log"
                if dim.step is not None and not (kind == "int" and dim.step == 1):
                    text += f" step {dim.step:g}"
                rows.append(DimensionInfo(dim.name, kind, text, condition))

    visit(spec.dimensions, "")
    return rows


def size(spec: StudySpec) -> int | None:
    """Points in the space (the grid size); None when any active dimension is continuous."""
    return space_size(spec.dimensions) if spec.dimensions else 1


def networks(spec: StudySpec) -> list[tuple[str, str, int | None]]:
    """Per arch the study may train: (arch, its layers, parameter count), at the fixed
    values and each arch's defaults (None and the reason when it cannot be built)."""
    archs: list[Any] = [spec.model.arch]
    for dim in walk_space(spec.dimensions):
        if dim.key == "model.arch" and isinstance(dim, ChoiceDim):
            archs = list(dim.options)
            break
    out: list[tuple[str, str, int | None]] = []
    shape = spec.dataset.input_shape
    for arch in archs:
        config = spec.resolve({"model.arch": arch})
        try:
            layers = shapes.plan(config.model, shape, spec.dataset.num_classes)
        except InfeasibleConfig as exc:
            out.append((str(arch), str(exc), None))
            continue
        path = " → ".join([f"input {'x'.join(map(str, shape))}", *map(str, layers)])
        out.append((str(arch), path, shapes.parameter_count(layers)))
    return out


def infeasible_corners(spec: StudySpec, limit: int = 20) -> list[tuple[dict[str, Any], str]]:
    """Combinations of shape-deciding values (ranges at their ends) whose model cannot be
    built on this dataset's input, with the reason; at most `limit` of them."""
    found: list[tuple[dict[str, Any], str]] = []
    seen: set[str] = set()
    input_shape = spec.dataset.input_shape
    for values in itertools.islice(_corner_points(spec.dimensions), _MAX_CORNERS):
        try:
            config = spec.resolve(values)
        except ValidationError:
            continue
        try:
            shapes.plan(config.model, input_shape)
        except InfeasibleConfig as exc:
            shown = {k: v for k, v in values.items() if k in _SHAPE_KEYS}
            signature = json.dumps(shown, sort_keys=True, default=str)
            if signature not in seen:
                seen.add(signature)
                found.append((shown, str(exc)))
                if len(found) >= limit:
                    break
    if not spec.dimensions:
        try:
            shapes.plan(spec.model, input_shape)
        except InfeasibleConfig as exc:
            found.append(({}, str(exc)))
    return found


def _corner_points(dims: Sequence[Dimension]) -> Iterator[dict[str, Any]]:
    """Every combination of the shape keys' candidate values (branches expanded)."""
    if not dims:
        yield {}
        return
    first, rest = dims[0], dims[1:]
    for head in _candidates(first):
        for tail in _corner_points(rest):
            yield {**head, **tail}


def _candidates(dim: Dimension) -> Iterator[dict[str, Any]]:
    if dim.key not in _SHAPE_KEYS:
        if isinstance(dim, ChoiceDim) and dim.branches:
            for option, sub in dim.branches.items():
                for point in _corner_points(sub):
                    yield {dim.key: option, **point}
            return
        yield {}
        return
    if isinstance(dim, ChoiceDim):
        for option in dim.options:
            if dim.branches:
                for point in _corner_points(dim.branches[option]):
                    yield {dim.key: option, **point}
            else:
                yield {dim.key: option}
    elif isinstance(dim, IntDim):
        # Every value of a short range (an even filter size can fail where odd ones fit),
        # the two ends of a long one.
        values = dim.values() if dim.size <= 16 else sorted({dim.low, dim.high})
        for value in values:
            yield {dim.key: value}
    else:
        yield {}


def all_param_names(spec: StudySpec) -> list[str]:
    """Every Optuna parameter name the space can produce."""
    return [dim.name for dim in walk_space(spec.dimensions)]
