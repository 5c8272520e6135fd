"""The study-file contract: good files load with their defaults; every bad input is one
line that names the file, the line, the key path and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeper.errors import ConfigError
from sweeper.spec import config
from sweeper.spec.config import ChoiceDim, FloatDim, IntDim

REPO = Path(__file__).resolve().parents[2]
MINIMAL = "name: t\ndataset: {name: mnist}\n"


def load_text(tmp_path: Path, text: str) -> config.StudySpec:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return config.load(path)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    assert message.startswith(str(tmp_path / "study.yaml")), "errors name the file"
    return message.removeprefix(str(tmp_path / "study.yaml"))


# --------------------------------------------------------------------------------------
# Good files
# --------------------------------------------------------------------------------------
def test_minimal_file_takes_documented_defaults(tmp_path: Path) -> None:
    spec = load_text(tmp_path, MINIMAL)
    assert spec.name == "t"
    assert spec.dataset.val_fraction == 0.1
    assert spec.model.arch == "cnn" and spec.model.channels == [32, 64]
    assert (spec.model.filter_size, spec.model.pool, spec.model.dropout) == (3, 2, 0.5)
    assert (spec.train.optimizer, spec.train.lr, spec.train.batch_size) == ("adam", 1e-3, 128)
    assert spec.objective_list[0].metric == "val_accuracy"
    assert spec.directions == ["maximize"]
    assert spec.sampler.name == "tpe" and spec.pruner.name == "none"
    assert spec.budget.trials == 20 and spec.budget.epochs == 10
    assert spec.dimensions == ()
    assert spec.models == "all"


def test_full_file_parses_every_section(tmp_path: Path) -> None:
    spec = load_text(tmp_path, """
name: full-study
dataset: {name: fashion_mnist, val_fraction: 0.2, subset: 500, augment: {rotate: 10, shift: 2}}
model: {arch: lenet, activation: sigmoid, pooling: avg}
train: {optimizer: momentum, nesterov: true, lr: 0.05, weight_decay: 1.0e-4, scheduler: cosine}
budget: {trials: 7, epochs: 3, timeout: 1h30m}
objectives:
  - {metric: val_accuracy}
  - {metric: train_seconds}
sampler: {name: nsga2, seed: 3}
models: best
space:
  train.lr: {float: [1.0e-4, 1.0e-1], log: true}
  train.batch_size: {int: [32, 256], step: 32}
  dataset.augment.rotate: {float: [0, 20], step: 5}
""")
    assert spec.budget.timeout == 5400
    assert spec.directions == ["maximize", "minimize"]
    assert spec.multi_objective
    lr, batch, rotate = spec.dimensions
    assert lr == FloatDim("train.lr", 1e-4, 1e-1, True, None, "train.lr")
    assert batch == IntDim("train.batch_size", 32, 256, False, 32, "train.batch_size")
    assert rotate.size == 5


@pytest.mark.parametrize("value, seconds", [(90, 90.0), ("90s", 90.0), ("30m", 1800.0),
                                            ("2h", 7200.0), ("1h30m", 5400.0), (None, None),
                                            ("420", 420.0), (" 2.5 ", 2.5)])
def test_durations(value: object, seconds: float | None) -> None:
    assert config.parse_duration(value) == seconds


def test_conditional_space_keeps_each_branch(tmp_path: Path) -> None:
    spec = load_text(tmp_path, MINIMAL + """space:
  model.arch:
    choice:
      mlp: {model.hidden: {choice: [[64], [128, 64]]}}
      cnn: {model.filter_size: {choice: [3, 5]}}
      lenet: {model.filter_size: {choice: [3, 5, 7]}}
      resnet:
""")
    (arch,) = spec.dimensions
    assert isinstance(arch, ChoiceDim)
    assert arch.options == ("mlp", "cnn", "lenet", "resnet")
    assert arch.branches is not None and arch.branches["resnet"] == ()
    # The same key with two different ranges gets a qualified Optuna name per branch.
    assert arch.branches["cnn"][0].name == "model.filter_size[cnn]"
    assert arch.branches["lenet"][0].name == "model.filter_size[lenet]"
    assert arch.branches["mlp"][0].name == "model.hidden"
    assert arch.size == 2 + 2 + 3 + 1


def test_resolve_applies_values_and_validates(tmp_path: Path) -> None:
    spec = load_text(tmp_path, MINIMAL)
    cfg = spec.resolve({"train.lr": 0.01, "model.arch": "mlp", "model.hidden": (32, 16)})
    assert cfg.train.lr == 0.01 and cfg.model.hidden == [32, 16]
    flat = cfg.flat()
    assert flat["model.hidden"] == [32, 16] and "model.filter_size" not in flat
    assert flat["train.lr"] == 0.01 and flat["epochs"] == 10


def test_every_shipped_study_validates() -> None:
    files = sorted((REPO / "studies").glob("*.yaml"))
    assert {f.name for f in files} >= {"quickstart.yaml", "mnist_cnn.yaml", "mnist_arch.yaml",
                                      "digits_smoke.yaml"}
    for path in files:
        spec = config.load(path)
        assert spec.name and spec.source == str(path)


# --------------------------------------------------------------------------------------
# Bad input: message pinned, one line, file + line + key + fix
# --------------------------------------------------------------------------------------
BAD_INPUTS = [
    pytest.param(MINIMAL + "train: {lrr: 0.1}\n",
                 ":3: train.lrr: unknown key 'lrr' (did you mean 'lr'?); train takes optimizer,",
                 id="unknown-key"),
    pytest.param(MINIMAL + "optimiser: adam\n",
                 ":3: optimiser: unknown key 'optimiser'; the top level takes name,",
                 id="unknown-top-level-key"),
    pytest.param(MINIMAL + "train: {batch_size: lots}\n",
                 ":3: train.batch_size: input should be a valid integer, unable to parse string "
                 "as an integer, but got 'lots'", id="wrong-type"),
    pytest.param(MINIMAL + "space:\n  train.lr: {float: [0.1, 0.001]}\n",
                 ":4: space.train.lr.float: `low <= high` must hold, but got low=0.1 and "
                 "high=0.001; swap them", id="low-above-high"),
    pytest.param(MINIMAL + "space:\n  train.lr: {float: [0, 0.1], log: true}\n",
                 ":4: space.train.lr.float: a log scale needs low > 0, but got low=0; raise low "
                 "or drop log: true", id="log-with-zero-low"),
    pytest.param(MINIMAL + "space:\n  model.filter_size: {choice: []}\n",
                 ":4: space.model.filter_size.choice: an empty choice has nothing to pick",
                 id="empty-choice"),
    pytest.param("name: t\ndataset: {name: mnsit}\n",
                 ":2: dataset.name: 'mnsit' is not one of mnist, fashion_mnist, kmnist, cifar10, "
                 "digits, synthetic (did you mean 'mnist'?)", id="unknown-dataset"),
    pytest.param(MINIMAL + "model: {arch: resnett}\n",
                 ":3: model.arch: 'resnett' is not one of mlp, cnn, lenet, resnet, resnet18 "
                 "(did you mean 'resnet'?)", id="unknown-arch"),
    pytest.param(MINIMAL + "sampler: {name: tpee}\n",
                 ":3: sampler.name: 'tpee' is not one of tpe, random, grid, cmaes, gp, qmc, "
                 "nsga2 (did you mean 'tpe'?)", id="unknown-sampler"),
    pytest.param(MINIMAL + "pruner: {name: hyperbnd}\n",
                 ":3: pruner.name: 'hyperbnd' is not one of none, median, hyperband, "
                 "successive_halving (did you mean 'hyperband'?)", id="unknown-pruner"),
    pytest.param(MINIMAL + "sampler: {name: grid}\nspace:\n  train.lr: {float: [0.001, 0.1]}\n",
                 ":5: space.train.lr: the grid sampler cannot search a continuous range; give "
                 "it a `step`, or use a `choice`", id="grid-over-continuous"),
    pytest.param(MINIMAL + "space:\n  train.lr: {float: [0.001, 0.1]\n",
                 ":4: YAML syntax error: expected ',' or '}', but got '<stream end>'",
                 id="yaml-syntax"),
    pytest.param(MINIMAL + "x: !!python/object/apply:os.system ['echo hi']\n",
                 ":3: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not "
                 "allowed: a study file holds plain data only; remove the tag", id="yaml-tag"),
    pytest.param(MINIMAL + "space:\n  train.lrate: {float: [0.001, 0.1]}\n",
                 ":4: space.train.lrate: unknown key 'train.lrate' (did you mean 'train.lr'?)",
                 id="unknown-space-key"),
    pytest.param(MINIMAL + "space:\n  model.filter_size: {float: [1, 7]}\n",
                 ":4: space.model.filter_size.float: model.filter_size takes whole numbers; "
                 "write {int: [1, 7]}", id="float-range-on-int-key"),
    pytest.param(MINIMAL + "space:\n  model.filter_size: {choice: [3, five]}\n",
                 ":4: space.model.filter_size.choice.1: value 'five' is not valid for "
                 "model.filter_size: input should be a valid integer", id="bad-choice-value"),
    pytest.param(MINIMAL + "space:\n  train.optimizer: {choice: [adam, adamax]}\n",
                 ":4: space.train.optimizer.choice.1: value 'adamax' is not valid for "
                 "train.optimizer: 'adamax' is not one of sgd, momentum, rmsprop, adagrad, adam, "
                 "adamw", id="sampled-value-validated"),
    pytest.param(MINIMAL + "space:\n  model.arch:\n    choice:\n      mlp: {model.widths: "
                 "{choice: [1]}}\n",
                 ":6: space.model.arch.choice.mlp.model.widths: unknown key 'model.widths' (did "
                 "you mean 'model.width'?)", id="unknown-key-in-branch"),
    pytest.param(MINIMAL + "space:\n  train.lr: {float: [0.001, 0.1], steps: 2}\n",
                 ":4: space.train.lr.steps: unknown key 'steps' for a float dimension",
                 id="unknown-dimension-option"),
    pytest.param(MINIMAL + "space:\n  train.lr: [0.001, 0.1]\n",
                 ":4: space.train.lr: expected {float: [low, high]}", id="bare-list-dimension"),
    pytest.param(MINIMAL + "objective: {metric: test_accuracy}\n",
                 ":3: objective.metric: 'test_accuracy' would select on the test split; use "
                 "'val_accuracy'", id="objective-on-test"),
    pytest.param(MINIMAL + "objectives: [{metric: val_accuracy}, {metric: train_secs}]\n",
                 ":3: objectives.1.metric: unknown metric 'train_secs' (did you mean "
                 "'train_seconds'?)", id="unknown-metric"),
    pytest.param(MINIMAL + "objectives: [{metric: val_accuracy}, {metric: n_params}]\n"
                 "pruner: {name: median}\n",
                 ":4: pruner.name: Optuna cannot prune a multi-objective study",
                 id="pruner-with-multi-objective"),
    pytest.param(MINIMAL + "objective: {metric: val_f1_macro}\npruner: {name: median}\n",
                 ":4: pruner.name: a pruner judges trials by the objective after each epoch, "
                 "but 'val_f1_macro' is only known at the end", id="pruner-on-final-metric"),
    pytest.param(MINIMAL + "budget: {trials: null}\n",
                 ":3: budget: set budget.trials or budget.timeout, or the study never ends",
                 id="unbounded-budget"),
    pytest.param(MINIMAL + "budget: {timeout: soon}\n",
                 ":3: budget.timeout: expected a duration such as 90, '90s', '30m' or '2h', "
                 "but got 'soon'", id="bad-duration"),
    pytest.param("name: t\n", ": dataset: is required but missing; add it", id="missing-dataset"),
    pytest.param("name: bad name!\ndataset: {name: mnist}\n",
                 ":1: name: a study name is 1-100 letters, digits", id="bad-study-name"),
    pytest.param("- just\n- a list\n", ":1: expected a mapping of keys", id="not-a-mapping"),
    pytest.param("", ": the file is empty", id="empty-file"),
]


@pytest.mark.parametrize("text, expected", BAD_INPUTS)
def test_bad_input_is_one_pinned_line(tmp_path: Path, text: str, expected: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(expected), message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file; give the path to a "
                                          r"study file"):
        config.load(tmp_path / "nope.yaml")


def test_same_key_searched_twice_is_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + """space:
  model.arch:
    choice:
      cnn: {model.arch: {choice: [cnn]}}
""")
    assert "already searched by an enclosing choice" in message
