"""The architectures (mlp, cnn, lenet, resnet; resnet18 in `transfer`) as torch modules.

`build_model` asks `shapes.plan` first, so an infeasible configuration raises
InfeasibleConfig before a single parameter is allocated, and the widths of the dense
layers come from the same arithmetic that `sweeper validate` uses. Every model is an
`nn.Sequential` whose children carry the names the plan uses (`conv1`, `pool1`,
`stage2.block1`, `flatten`, `fc`), so a layer's output shape can be checked against its
plan by name.

Each architecture reads only its own keys (`config.ARCH_KEYS`): tuning `hidden` never
changes a cnn, so trials that differ only in another arch's keys are the same model.

This module imports torch only: no optuna, mlflow or data code, so a model can be built
(and its parameters counted) anywhere.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from sweeper.spec import shapes
from sweeper.spec.config import ModelConfig

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
}
_POOLS: dict[str, Callable[..., nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int],
                num_classes: int, *, data_dir: str | os.PathLike[str] | None = None
                ) -> nn.Module:
    """The model `cfg` describes, for images of `input_shape` (C, H, W).

    Raises InfeasibleConfig (from `shapes.plan`) before building anything when a layer
    does not fit its input. `data_dir` is where `resnet18` finds (or downloads) its
    pretrained weights; no other arch reads anything from disk.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, but got {num_classes}")
    layers = shapes.plan(cfg, input_shape, num_classes)
    if cfg.arch == "resnet18":
        # torchvision is imported only by the one arch that needs it.
        from sweeper.ml.transfer import build_resnet18

        return build_resnet18(cfg, input_shape[0], num_classes, data_dir)
    features = next(layer.shape[0] for layer in layers if layer.name == "flatten")
    builder = _BUILDERS[cfg.arch]
    return builder(cfg, input_shape[0], features, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------
def _dropout(p: float | None) -> nn.Module | None:
    """A Dropout layer, or none at all where the rate is 0 (the network prints as it is)."""
    return nn.Dropout(p) if p else None


def _dense_head(layers: OrderedDict[str, nn.Module], cfg: ModelConfig, width: int,
                widths: list[int], num_classes: int, *, batch_norm: bool = False) -> None:
    """fc1..fcN (each Linear [BN] act [dropout]) and the classifier `fc`, appended."""
    for i, hidden in enumerate(widths, 1):
        layers[f"fc{i}"] = nn.Linear(width, hidden, bias=not batch_norm)
        if batch_norm:
            layers[f"fc{i}_bn"] = nn.BatchNorm1d(hidden)
        layers[f"fc{i}_act"] = _ACTIVATIONS[cfg.activation]()
        drop = _dropout(cfg.dropout)
        if drop is not None:
            layers[f"fc{i}_drop"] = drop
        width = hidden
    layers["fc"] = nn.Linear(width, num_classes)


def _conv_block(layers: OrderedDict[str, nn.Module], name: str, in_channels: int,
                out_channels: int, kernel: int, padding: int, *, batch_norm: bool,
                activation: str) -> None:
    # A bias right before BatchNorm is cancelled by its mean subtraction: leave it out.
    layers[name] = nn.Conv2d(in_channels, out_channels, kernel, padding=padding,
                             bias=not batch_norm)
    if batch_norm:
        layers[f"{name}_bn"] = nn.BatchNorm2d(out_channels)
    layers[f"{name}_act"] = _ACTIVATIONS[activation]()


# --------------------------------------------------------------------------------------
# The architectures
# --------------------------------------------------------------------------------------
def _mlp(cfg: ModelConfig, in_channels: int, features: int, num_classes: int) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    _dense_head(layers, cfg, features, cfg.hidden, num_classes, batch_norm=bool(cfg.batch_norm))
    return nn.Sequential(layers)


def _cnn(cfg: ModelConfig, in_channels: int, features: int, num_classes: int) -> nn.Module:
    kernel = int(cfg.filter_size or 3)
    padding = kernel // 2 if cfg.padding == "same" else 0
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    for i, out in enumerate(cfg.channels, 1):
        _conv_block(layers, f"conv{i}", channels, out, kernel, padding,
                    batch_norm=bool(cfg.batch_norm), activation=cfg.activation)
        if shapes.cnn_pools(cfg, i):
            layers[f"pool{i}"] = _POOLS[cfg.pooling](cfg.pool)
        channels = out
    layers["flatten"] = nn.Flatten()
    drop = _dropout(cfg.dropout)
    if drop is not None:
        layers["drop"] = drop
    _dense_head(layers, cfg, features, cfg.head, num_classes)
    return nn.Sequential(layers)


def _lenet(cfg: ModelConfig, in_channels: int, features: int, num_classes: int) -> nn.Module:
    """LeNet-5: 6@5x5 (padded), pool, 16@5x5, pool, 120, 84, classes; 61,706 parameters on
    MNIST. Activation sigmoid + pooling avg is the classic, relu + max the modern one."""
    kernel = int(cfg.filter_size or 5)
    c1, c2 = shapes.LENET_CHANNELS
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    _conv_block(layers, "conv1", in_channels, c1, kernel, kernel // 2, batch_norm=False,
                activation=cfg.activation)
    layers["pool1"] = _POOLS[cfg.pooling](shapes.LENET_POOL)
    _conv_block(layers, "conv2", c1, c2, kernel, 0, batch_norm=False,
                activation=cfg.activation)
    layers["pool2"] = _POOLS[cfg.pooling](shapes.LENET_POOL)
    layers["flatten"] = nn.Flatten()
    _dense_head(layers, cfg, features, list(shapes.LENET_DENSE), num_classes)
    return nn.Sequential(layers)


class BasicBlock(nn.Module):
    """Two FxF convs (each with BatchNorm when `batch_norm`), added to a shortcut (a strided
    1x1 conv [+ BN] when the stride or the width changes, the identity otherwise)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int,
                 batch_norm: bool = True) -> None:
        super().__init__()
        padding = kernel // 2
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d if batch_norm else _identity
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel, stride, padding,
                               bias=not batch_norm)
        self.bn1 = norm(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel, 1, padding,
                               bias=not batch_norm)
        self.bn2 = norm(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, stride, bias=not batch_norm),
                bn=norm(out_channels),
            ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _identity(_: int) -> nn.Module:
    return nn.Identity()


class LongResidual(nn.Module):
    """A main path added to one 1x1 strided conv shortcut (each branch ends in its own
    activation, the sum is passed on as it is)."""

    def __init__(self, main: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


def _resnet(cfg: ModelConfig, in_channels: int, features: int, num_classes: int) -> nn.Module:
    kernel, width, bn = int(cfg.filter_size or 3), cfg.width, bool(cfg.batch_norm)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if cfg.shortcut == "long":
        _resnet_long(layers, cfg, in_channels, kernel)
    else:
        # Names kept from the first version of this arch (stem.conv, stem.bn), so that
        # weights saved then still load.
        stem: OrderedDict[str, nn.Module] = OrderedDict(
            conv=nn.Conv2d(in_channels, width, kernel, padding=kernel // 2, bias=not bn))
        if bn:
            stem["bn"] = nn.BatchNorm2d(width)
        stem["relu"] = nn.ReLU()
        layers["stem"] = nn.Sequential(stem)
        channels = width
        for stage, (mult, stride) in enumerate(zip((1, 2, 4), (1, 2, 2), strict=True), 1):
            blocks: OrderedDict[str, nn.Module] = OrderedDict()
            for block in range(1, cfg.blocks + 1):
                blocks[f"block{block}"] = BasicBlock(channels, width * mult, kernel,
                                                     stride if block == 1 else 1, bn)
                channels = width * mult
            layers[f"stage{stage}"] = nn.Sequential(blocks)
        layers["gap"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    drop = _dropout(cfg.dropout)
    if drop is not None:
        layers["drop"] = drop
    _dense_head(layers, cfg, features, cfg.head, num_classes)
    return nn.Sequential(layers)


def _resnet_long(layers: OrderedDict[str, nn.Module], cfg: ModelConfig, in_channels: int,
                 kernel: int) -> None:
    """The long-shortcut layout of `shapes._plan_resnet_long` (names match its plan)."""
    w, bn, pad = cfg.width, bool(cfg.batch_norm), kernel // 2
    stem: OrderedDict[str, nn.Module] = OrderedDict()
    _conv_block(stem, "conv", in_channels, w, kernel, pad, batch_norm=bn, activation="relu")
    layers["stem"] = nn.Sequential(stem)
    layers["stem_pool"] = nn.MaxPool2d(2, ceil_mode=True)
    main: OrderedDict[str, nn.Module] = OrderedDict()
    _conv_block(main, "conv1", w, 2 * w, kernel, pad, batch_norm=bn, activation="relu")
    main["pool1"] = nn.MaxPool2d(2, ceil_mode=True)
    _conv_block(main, "conv2", 2 * w, 2 * w, kernel, pad, batch_norm=bn, activation="relu")
    main["pool2"] = nn.MaxPool2d(2, ceil_mode=True)
    _conv_block(main, "conv3", 2 * w, 4 * w, kernel, pad, batch_norm=bn, activation="relu")
    short: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(w, 4 * w, 1, shapes.LONG_SHORTCUT_STRIDE, bias=not bn))
    if bn:
        short["bn"] = nn.BatchNorm2d(4 * w)
    short["act"] = nn.ReLU()
    layers["add"] = LongResidual(nn.Sequential(main), nn.Sequential(short))
    for block in range(1, cfg.blocks + 1):
        post: OrderedDict[str, nn.Module] = OrderedDict()
        _conv_block(post, "conv", 4 * w, 4 * w, kernel, pad, batch_norm=bn, activation="relu")
        post["pool"] = nn.MaxPool2d(2, ceil_mode=True)
        layers[f"post{block}"] = nn.Sequential(post)


_BUILDERS: dict[str, Callable[[ModelConfig, int, int, int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "lenet": _lenet,
    "resnet": _resnet,
}
