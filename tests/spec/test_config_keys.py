"""Keys that mean something, generated from the one declaration (config.ARCH_KEYS and
config.OPTIMIZER_KEYS): every arch x every model key, and every optimizer x every
optimizer key, is either read (changing it changes the built network or optimizer) or
rejected with one line naming the file, the line, the key, the arch and what it reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sweeper.errors import ConfigError
from sweeper.ml.models import build_model, count_parameters
from sweeper.ml.train import build_optimizer
from sweeper.spec import config, shapes
from sweeper.spec.config import (
    ARCH_KEYS,
    OPTIMIZER_KEYS,
    OPTIMIZER_SPECIFIC,
    ModelConfig,
    TrainConfig,
)

MNIST = (1, 28, 28)
MODEL_KEYS = [k for k in ModelConfig.model_fields if k != "arch"]
# Two values of every model key, the second unlike any default, to tell "read" from "ignored".
OTHER_VALUE: dict[str, tuple[Any, Any]] = {
    "dropout": (0.0, 0.3),
    "filter_size": (3, 5),
    "channels": ([8, 16], [8, 16, 16]),
    "padding": ("valid", "same"),
    "pool": (2, 1),
    "pool_blocks": ([1], [2]),
    "batch_norm": (False, True),
    "head": ([], [12]),
    "hidden": ([32], [32, 16]),
    "activation": ("relu", "tanh"),
    "pooling": ("max", "avg"),
    "width": (8, 16),
    "blocks": (1, 2),
    "shortcut": ("projection", "long"),
    "pretrained": ("none", "imagenet"),  # resnet18's "read" check uses a file it writes
    "freeze": (False, True),
}
OPTIMIZER_VALUES: dict[str, tuple[Any, Any]] = {
    "momentum": (0.5, 0.7),
    "nesterov": (False, True),
    "alpha": (0.9, 0.95),
    "betas": ((0.9, 0.99), (0.8, 0.9)),
    "eps": (1e-7, 1e-6),
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    return message.removeprefix(str(tmp_path / "study.yaml"))


def resnet18_weights(folder: Path) -> Path:
    import torchvision

    torch.manual_seed(123)
    path = folder / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def fingerprint(cfg: ModelConfig) -> tuple[str, int, float]:
    torch.manual_seed(0)
    model = build_model(cfg, MNIST, 10)
    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in model.parameters()))
    return repr(model), count_parameters(model), checksum


def test_the_declaration_covers_every_key() -> None:
    assert set(OTHER_VALUE) == set(MODEL_KEYS)
    assert set(OPTIMIZER_VALUES) == set(OPTIMIZER_SPECIFIC)
    for keys in ARCH_KEYS.values():
        assert set(keys) <= set(ModelConfig.model_fields)


@pytest.mark.parametrize("arch", list(ARCH_KEYS))
@pytest.mark.parametrize("key", MODEL_KEYS)
def test_every_arch_reads_or_rejects_every_key(tmp_path: Path, arch: str, key: str) -> None:
    first, second = OTHER_VALUE[key]
    base: dict[str, Any] = {"arch": arch, "channels": [8, 16], "width": 8, "hidden": [32]}
    if key in ARCH_KEYS[arch]:
        if key == "pretrained":
            second = str(resnet18_weights(tmp_path))
        # Read: the two values build different networks (modules, their settings, which
        # parameters train, or the starting weights).
        nets = [fingerprint(ModelConfig(**{**base, key: value})) for value in (first, second)]
        assert nets[0] != nets[1], f"{arch} declares {key} but ignores it"
        return
    # Not read: fixed in `model:` or searched in `space:`, it is an error.
    fixed = f"name: t\ndataset: {{name: mnist}}\nmodel:\n  arch: {arch}\n  {key}: {second!r}\n"
    message = error_of(tmp_path, fixed.replace("'", ""))
    assert message.startswith(f":5: model.{key}: model.{key} is not read by arch {arch}")
    assert f"arch {arch} reads " in message
    read = [k for k in ARCH_KEYS[arch] if k != "arch"]
    assert ", ".join(read) in message
    searched = (f"name: t\ndataset: {{name: mnist}}\nmodel: {{arch: {arch}}}\nspace:\n"
                f"  model.{key}: {{choice: [{first!r}, {second!r}]}}\n").replace("'", "")
    message = error_of(tmp_path, searched)
    assert message.startswith(f":5: space.model.{key}: model.{key} is not read by arch {arch}")


@pytest.mark.parametrize("optimizer", list(OPTIMIZER_KEYS))
@pytest.mark.parametrize("key", OPTIMIZER_SPECIFIC)
def test_every_optimizer_reads_or_rejects_its_keys(tmp_path: Path, optimizer: str,
                                                   key: str) -> None:
    first, second = OPTIMIZER_VALUES[key]
    if key in OPTIMIZER_KEYS[optimizer]:
        model = torch.nn.Linear(2, 2)
        # Nesterov needs a momentum to act on.
        extra = {"momentum": 0.5} if key == "nesterov" else {}
        groups = [build_optimizer(model, TrainConfig(optimizer=optimizer, **extra,
                                                     **{key: value})).param_groups[0]
                  for value in (first, second)]
        assert {k: v for k, v in groups[0].items() if k != "params"} != \
            {k: v for k, v in groups[1].items() if k != "params"}
        return
    text = (f"name: t\ndataset: {{name: mnist}}\ntrain:\n  optimizer: {optimizer}\n"
            f"  {key}: {list(second) if isinstance(second, tuple) else second}\n")
    message = error_of(tmp_path, text)
    assert message.startswith(f":5: train.{key}: train.{key} is not read by optimizer "
                              f"{optimizer}")
    options = json.dumps([list(v) if isinstance(v, tuple) else v for v in (first, second)])
    searched = (f"name: t\ndataset: {{name: mnist}}\ntrain: {{optimizer: {optimizer}}}\n"
                f"space:\n  train.{key}: {{choice: {options}}}\n")
    message = error_of(tmp_path, searched)
    assert message.startswith(f":5: space.train.{key}: train.{key} is not read by optimizer "
                              f"{optimizer}")


def test_defaults_never_trigger_the_check(tmp_path: Path) -> None:
    for arch in ARCH_KEYS:
        for optimizer in OPTIMIZER_KEYS:
            spec = config.load(write(tmp_path, f"name: t\ndataset: {{name: mnist}}\nmodel: "
                                               f"{{arch: {arch}}}\ntrain: {{optimizer: "
                                               f"{optimizer}}}\n"))
            assert spec.model.arch == arch


CHOICE = """name: t
dataset: {name: mnist}
space:
  model.arch:
    choice:
      cnn: {model.channels: {choice: [[8], [8, 16]]}}
      lenet: {}
      mlp: {}
"""


def test_a_key_outside_a_conditional_choice_names_the_options_to_move_it_under(
        tmp_path: Path) -> None:
    message = error_of(tmp_path, CHOICE + "  model.pooling: {choice: [max, avg]}\n")
    assert message == (":9: space.model.pooling: model.pooling is not read by arch mlp of "
                       "the model.arch choice (arch mlp reads hidden, activation, "
                       "batch_norm, dropout); move it under space.model.arch.choice.cnn, "
                       "space.model.arch.choice.lenet")
    fixed = CHOICE.replace("space:", "model: {pooling: avg}\nspace:")
    message = error_of(tmp_path, fixed)
    assert message.startswith(":3: model.pooling: model.pooling is not read by arch mlp of "
                              "the model.arch choice")
    assert message.endswith("move it under space.model.arch.choice.cnn, "
                            "space.model.arch.choice.lenet")


def test_a_key_inside_a_choice_must_be_read_by_its_option(tmp_path: Path) -> None:
    text = CHOICE.replace("lenet: {}", "lenet: {model.channels: {choice: [[8]]}}")
    message = error_of(tmp_path, text)
    assert message.startswith(":7: space.model.arch.choice.lenet.model.channels: "
                              "model.channels is not read by arch lenet")
    assert "(model.channels is read by arch cnn); remove it" in message


def test_a_plain_list_choice_says_to_give_it_sub_spaces(tmp_path: Path) -> None:
    text = ("name: t\ndataset: {name: mnist}\nspace:\n  model.arch: {choice: [cnn, mlp]}\n"
            "  model.hidden: {choice: [[8]]}\n")
    message = error_of(tmp_path, text)
    assert message.startswith(":5: space.model.hidden: model.hidden is not read by arch cnn")
    assert message.endswith("give space.model.arch sub-spaces ({choice: {mlp: {...}, ...}}) "
                            "and move it under mlp")


def test_an_optimizer_choice_is_checked_too(tmp_path: Path) -> None:
    text = ("name: t\ndataset: {name: mnist}\nspace:\n  train.optimizer:\n    choice:\n"
            "      sgd: {}\n      momentum: {}\n  train.momentum: {float: [0.5, 0.9]}\n")
    message = error_of(tmp_path, text)
    assert message.startswith(":8: space.train.momentum: train.momentum is not read by "
                              "optimizer sgd of the train.optimizer choice")
    assert message.endswith("move it under space.train.optimizer.choice.momentum")


OPTIMIZER_CHOICE = """name: t
dataset: {name: mnist}
space:
  train.optimizer:
    choice:
      sgd: {}
      momentum: {}
"""


def test_an_optimizer_key_fixed_beside_an_optimizer_choice_names_where_to_move_it(
        tmp_path: Path) -> None:
    fixed = OPTIMIZER_CHOICE.replace("space:", "train: {momentum: 0.5}\nspace:")
    message = error_of(tmp_path, fixed)
    assert message == (":3: train.momentum: train.momentum is not read by optimizer sgd of "
                       "the train.optimizer choice (optimizer sgd reads no keys of its own); "
                       "move it under space.train.optimizer.choice.momentum")


def test_an_optimizer_key_inside_a_choice_must_be_read_by_its_option(tmp_path: Path) -> None:
    inside = OPTIMIZER_CHOICE.replace("sgd: {}", "sgd: {train.momentum: {choice: [0.5, 0.9]}}")
    message = error_of(tmp_path, inside)
    assert message == (":6: space.train.optimizer.choice.sgd.train.momentum: train.momentum "
                       "is not read by optimizer sgd, so trials would differ in a label only; "
                       "optimizer sgd reads no keys of its own (train.momentum is read by "
                       "optimizer momentum, rmsprop); remove it")
    moved = OPTIMIZER_CHOICE.replace("momentum: {}",
                                     "momentum: {train.momentum: {choice: [0.5, 0.9]}}")
    spec = config.loads(moved)
    assert spec.resolve({"train.optimizer": "momentum", "train.momentum": 0.5}
                        ).train.momentum == 0.5


def test_every_study_file_validates() -> None:
    files = sorted(Path(__file__).resolve().parents[2].glob("studies/**/*.yaml"))
    assert len(files) >= 5
    for path in files:
        config.load(path)


# --------------------------------------------------------------------------------------
# Canonical networks and defaults
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("values", "params"), [
    ({"arch": "lenet"}, 61_706),
    ({"arch": "lenet", "activation": "sigmoid", "pooling": "avg"}, 61_706),
    ({"arch": "cnn", "channels": [32, 64, 64], "pool_blocks": [1, 2], "head": [64],
      "dropout": 0.0}, 93_322),
    ({"arch": "mlp", "hidden": [16, 32, 64]}, 15_866),
    ({"arch": "cnn", "channels": [20], "filter_size": 5, "activation": "sigmoid",
      "head": [100], "dropout": 0.0}, 289_630),
    ({"arch": "resnet", "shortcut": "long", "width": 32, "batch_norm": False,
      "head": [128]}, 348_362),
], ids=["lenet5-modern", "lenet5-classic", "convnet-32-64-64-dense64", "dnn-16-32-64",
        "sigmoid-cnn-20-fc100", "resnet-long-shortcut"])
def test_parameter_counts_of_the_source_networks(values: dict[str, Any], params: int) -> None:
    cfg = ModelConfig(**values)
    assert count_parameters(build_model(cfg, MNIST, 10)) == params
    assert shapes.parameter_count(shapes.plan(cfg, MNIST, 10)) == params


def test_lenet_is_lenet5_without_dropout() -> None:
    cfg = ModelConfig(arch="lenet")
    assert (cfg.filter_size, cfg.dropout) == (5, 0.0)
    model = build_model(cfg, MNIST, 10)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert [str(layer) for layer in shapes.plan(cfg, MNIST, 10)] == [
        "conv1 6x28x28", "pool1 6x14x14", "conv2 16x10x10", "pool2 16x5x5", "flatten 400",
        "fc1 120", "fc2 84", "fc 10"]


def test_dropout_and_batch_norm_default_per_arch_and_follow_a_changed_arch() -> None:
    assert [ModelConfig(arch=a).dropout for a in ARCH_KEYS] == [0.0, 0.5, 0.0, 0.0, 0.0]
    assert ModelConfig(arch="resnet").batch_norm and not ModelConfig(arch="cnn").batch_norm
    cfg = ModelConfig(arch="cnn")
    cfg.arch = "lenet"
    assert (cfg.dropout, cfg.filter_size) == (0.0, 5)
    assert ModelConfig(arch="lenet", dropout=0.2).dropout == 0.2


def test_rmsprop_momentum_defaults_to_zero() -> None:
    model = torch.nn.Linear(2, 2)
    group = build_optimizer(model, TrainConfig(optimizer="rmsprop")).param_groups[0]
    assert (group["momentum"], group["alpha"], group["eps"]) == (0.0, 0.99, 1e-8)
    assert build_optimizer(model, TrainConfig(optimizer="momentum")).param_groups[0][
        "momentum"] == 0.9
    assert build_optimizer(model, TrainConfig(optimizer="adagrad")).param_groups[0][
        "eps"] == 1e-10


def test_flat_logs_only_the_keys_read_and_rebuilds_the_same_config() -> None:
    spec = config.loads("name: t\ndataset: {name: mnist}\nmodel: {arch: lenet}\n"
                        "train: {optimizer: rmsprop}\n")
    trial = spec.resolve({})
    flat = trial.flat()
    assert flat["model.filter_size"] == 5 and "model.channels" not in flat
    assert flat["train.momentum"] == 0.0 and "train.betas" not in flat
    assert not [k for k in flat if k.startswith("dataset.synthetic.")]  # mnist reads none
    assert config.TrialConfig.from_flat(flat) == trial
    synthetic = config.loads("name: s\ndataset: {name: synthetic}\n").resolve({}).flat()
    assert synthetic["dataset.synthetic.classes"] == 4


def test_a_space_arch_choice_takes_each_archs_own_defaults() -> None:
    spec = config.loads(CHOICE)
    assert spec.resolve({"model.arch": "lenet"}).model.dropout == 0.0
    assert spec.resolve({"model.arch": "cnn"}).model.dropout == 0.5
