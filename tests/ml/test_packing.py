"""Trial packing's engine: a packed member trains as it would alone, to float tolerance."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from sweeper.errors import Diverged
from sweeper.ml.data import Dataset, load_dataset
from sweeper.ml.models import build_model
from sweeper.ml.packing import (
    MemberResult,
    fit_packed,
    member_bytes,
    pack_key,
    pack_size,
    packable,
)
from sweeper.ml.train import fit, seed_everything
from sweeper.spec.config import DatasetConfig, TrialConfig

CPU = torch.device("cpu")
COMPARED = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
TOL = 1e-4


@pytest.fixture(scope="module")
def data() -> Dataset:
    """4 classes of 16x16 templates plus noise, 460 training images."""
    return load_dataset(DatasetConfig(name="synthetic", subset=460), device="cpu")


def _config(model: dict[str, Any], train: dict[str, Any], epochs: int = 2,
            augment: dict[str, Any] | None = None) -> TrialConfig:
    return TrialConfig.model_validate({
        "dataset": {"name": "synthetic", "subset": 460, "augment": augment or {}},
        "model": model, "train": {"batch_size": 64, **train}, "epochs": epochs})


def _build(data: Dataset, config: TrialConfig) -> nn.Module:
    seed_everything(config.train.seed)
    return build_model(config.model, data.input_shape, data.num_classes)


def _alone(data: Dataset, config: TrialConfig) -> tuple[list[dict[str, float]], nn.Module]:
    model = _build(data, config)
    result = fit(model, data, config.train, epochs=config.epochs, device=CPU,
                 augment=config.dataset.augment)
    return result.history, model


def _close(packed: list[dict[str, float]], alone: list[dict[str, float]]) -> None:
    assert len(packed) == len(alone)
    for mine, theirs in zip(packed, alone, strict=True):
        for key in COMPARED:
            assert math.isclose(mine[key], theirs[key], rel_tol=TOL, abs_tol=TOL), (
                key, mine, theirs)


def _packed(data: Dataset, configs: list[TrialConfig], **kwargs: Any
            ) -> tuple[list[MemberResult], list[nn.Module]]:
    models = [_build(data, c) for c in configs]
    return fit_packed(models, configs, data, device=CPU, **kwargs), models


# Three members each: their own lr, weight decay, momentum or betas, dropout and seed.
CASES = {
    "mlp-adam-dropout": ({"arch": "mlp", "hidden": [32, 16]}, "adam",
                         [{"lr": 1e-3, "seed": 0, "dropout": 0.0},
                          {"lr": 3e-3, "seed": 1, "dropout": 0.3, "weight_decay": 1e-3},
                          {"lr": 5e-4, "seed": 2, "dropout": 0.5, "betas": [0.8, 0.99]}]),
    "mlp-batchnorm-momentum": ({"arch": "mlp", "hidden": [32], "batch_norm": True},
                               "momentum",
                               [{"lr": 0.05, "seed": 3, "momentum": 0.9},
                                {"lr": 0.01, "seed": 4, "momentum": 0.5, "nesterov": True},
                                {"lr": 0.02, "seed": 5, "momentum": 0.0}]),
    "lenet-sgd": ({"arch": "lenet"}, "sgd",
                  [{"lr": 0.05, "seed": 0}, {"lr": 0.1, "seed": 7, "weight_decay": 1e-4},
                   {"lr": 0.02, "seed": 9, "dropout": 0.2}]),
    "cnn-dropout-batchnorm-adamw": (
        {"arch": "cnn", "channels": [8, 16], "batch_norm": True, "head": [16]}, "adamw",
        [{"lr": 1e-3, "seed": 0, "dropout": 0.5},
         {"lr": 2e-3, "seed": 1, "dropout": 0.25, "weight_decay": 0.01},
         {"lr": 5e-4, "seed": 2, "dropout": 0.0}]),
    "cnn-rmsprop-cosine": ({"arch": "cnn", "channels": [8], "padding": "same"}, "rmsprop",
                           [{"lr": 1e-3, "seed": 0, "scheduler": "cosine"},
                            {"lr": 3e-4, "seed": 1, "scheduler": "cosine", "momentum": 0.5,
                             "alpha": 0.9}]),
    "resnet-adagrad": ({"arch": "resnet", "width": 4}, "adagrad",
                       [{"lr": 0.01, "seed": 0}, {"lr": 0.05, "seed": 1, "eps": 1e-6}]),
}


def _case(name: str) -> list[TrialConfig]:
    model, optimizer, members = CASES[name]
    configs = []
    for member in members:
        member = dict(member)
        dropout = member.pop("dropout", None)
        own_model = {**model, **({} if dropout is None else {"dropout": dropout})}
        configs.append(_config(own_model, {"optimizer": optimizer, **member}))
    return configs


@pytest.mark.parametrize("name", list(CASES))
def test_a_packed_member_trains_as_it_would_alone(data: Dataset, name: str) -> None:
    configs = _case(name)
    assert len({pack_key(c) for c in configs}) == 1
    results, models = _packed(data, configs)
    for config, result, model in zip(configs, results, models, strict=True):
        assert result.error is None and result.result is not None
        history, alone = _alone(data, config)
        _close(result.result.history, history)
        # The member's own model holds the weights it trained (a normal single model).
        for (key, mine), theirs in zip(model.state_dict().items(),
                                       alone.state_dict().values(), strict=True):
            assert torch.allclose(mine.float(), theirs.float(), rtol=1e-3, atol=1e-4), key


def test_augmentation_draws_are_each_members_own(data: Dataset) -> None:
    configs = [_config({"arch": "lenet"}, {"lr": 0.05, "optimizer": "sgd", "seed": s},
                       augment={"rotate": r, "shift": sh})
               for s, r, sh in ((0, 10.0, 1), (1, 0.0, 2), (2, 0.0, 0))]
    results, _ = _packed(data, configs)
    for config, result in zip(configs, results, strict=True):
        assert result.result is not None
        _close(result.result.history, _alone(data, config)[0])


def test_pruning_one_member_leaves_the_others_unchanged(data: Dataset) -> None:
    configs = _case("cnn-dropout-batchnorm-adamw")
    configs = [c.model_copy(update={"epochs": 3}) for c in configs]
    full, _ = _packed(data, configs)
    left: list[int] = []

    def prune_first(index: int, epoch: int, metrics: dict[str, float]) -> bool:
        return index == 0 and epoch == 1

    pruned, _ = _packed(data, configs, on_epoch=prune_first,
                        on_leave=lambda r: left.append(r.index))
    assert pruned[0].result is not None and pruned[0].result.stopped_early
    assert len(pruned[0].result.history) == 1
    assert left == [0, 1, 2]
    for before, after in zip(full[1:], pruned[1:], strict=True):
        assert before.result is not None and after.result is not None
        assert not after.result.stopped_early and len(after.result.history) == 3
        _close(after.result.history, before.result.history)


def test_a_diverged_member_leaves_and_the_others_go_on(data: Dataset) -> None:
    configs = [_config({"arch": "mlp", "hidden": [32]}, {"optimizer": "sgd", "lr": lr,
                                                         "seed": 1})
               for lr in (10.0, 0.05)]
    configs = [c.model_copy(update={"epochs": 3}) for c in configs]
    results, _ = _packed(data, configs)
    assert isinstance(results[0].error, Diverged)
    assert results[1].result is not None and len(results[1].result.history) == 3
    _close(results[1].result.history, _alone(data, configs[1])[0])


def test_pack_key_ignores_only_member_keys() -> None:
    base = _config({"arch": "cnn", "channels": [8]}, {"lr": 1e-3})
    assert pack_key(base) == pack_key(_config({"arch": "cnn", "channels": [8], "dropout": 0.1},
                                              {"lr": 0.1, "seed": 3, "weight_decay": 0.1}))
    assert pack_key(base) != pack_key(_config({"arch": "cnn", "channels": [16]}, {"lr": 1e-3}))
    assert pack_key(base) != pack_key(_config({"arch": "cnn", "channels": [8]},
                                              {"lr": 1e-3, "batch_size": 32}))
    assert not packable(_config({"arch": "resnet18"}, {}))


def test_pack_size_is_what_fits_in_memory(data: Dataset) -> None:
    config = _config({"arch": "cnn"}, {})
    need = member_bytes(config, data.input_shape, data.num_classes)
    assert need > 4 * 4 * sum(p.numel() for p in _build(data, config).parameters())
    assert pack_size(4, config, data.input_shape, data.num_classes, CPU) in range(1, 5)
    assert pack_size(1, config, data.input_shape, data.num_classes, CPU) == 1
    huge = _config({"arch": "mlp", "hidden": [8192, 8192, 8192]}, {"batch_size": 65536})
    assert pack_size(8, huge, data.input_shape, data.num_classes, CPU) < 8


def test_a_packed_convnet_runs_channels_last_from_its_first_layer(data: Dataset) -> None:
    """oneDNN picks a convolution's layout from its weight: a first layer of one input
    channel must still look channels_last, or the whole packed network runs NCHW (3-10x
    slower convolutions and pools on the CPU than the lone model `train.fit` runs)."""
    from sweeper.ml.packing import PackedNet, _template

    config = _config({"arch": "cnn", "channels": [8, 16]}, {})
    models = [_build(data, config) for _ in range(2)]
    template = _template(config.model, data.input_shape, data.num_classes)
    net = PackedNet(template, models, [0.0, 0.0], [torch.Generator(), torch.Generator()],
                    CPU, channels_last=True)
    for name in ("conv1.weight", "conv2.weight"):
        grouped = net._grouped(name, net.params[name])
        assert grouped.stride()[1] == 1, (name, grouped.stride())
        out = torch.nn.functional.conv2d(
            torch.zeros(4, grouped.shape[1] * 2, 16, 16).contiguous(
                memory_format=torch.channels_last), grouped, groups=2)
        assert out.is_contiguous(memory_format=torch.channels_last)
    images = data.train.x[:8]
    assert images.shape[1] == 1  # one input channel: the case that went NCHW
    net.training = False
    logits = net(images)
    for row, model in enumerate(models):
        assert torch.allclose(logits[row], model.eval()(images), atol=1e-5)
    assert logits.shape == (2, 8, data.num_classes)
