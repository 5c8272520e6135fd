"""The four architectures (mlp, cnn, lenet, resnet) as torch modules.

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

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from sweeper import shapes
from sweeper.config import ModelConfig

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}
_POOLS: dict[str, Callable[[int], nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int],
                num_classes: int) -> nn.Module:
    """The model `cfg` describes, for images of `input_shape` (C, H, W).

    Raises InfeasibleConfig (from `shapes.plan`) before building anything when a layer
    does not fit its input.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, but got {num_classes}")
    layers = shapes.plan(cfg, input_shape, num_classes)
    features = next(layer.shape[0] for layer in layers if layer.name == "flatten")
    builder = _BUILDERS[cfg.arch]
    return builder(cfg, input_shape[0], features, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------
# The architectures
# --------------------------------------------------------------------------------------
def _mlp(cfg: ModelConfig, in_channels: int, features: int, num_classes: int) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = features
    for i, hidden in enumerate(cfg.hidden, 1):
        layers[f"fc{i}"] = nn.Linear(width, hidden)
        layers[f"fc{i}_act"] = _ACTIVATIONS[cfg.activation]()
        layers[f"fc{i}_drop"] = nn.Dropout(cfg.dropout)
        width = hidden
    layers["fc"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


def _cnn(cfg: ModelConfig, in_channels: int, features: int, num_classes: int) -> nn.Module:
    kernel = cfg.filter_size
    padding = kernel // 2 if cfg.padding == "same" else 0
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    for i, out in enumerate(cfg.channels, 1):
        # A bias right before BatchNorm is cancelled by its mean subtraction: leave it out.
        layers[f"conv{i}"] = nn.Conv2d(channels, out, kernel, padding=padding,
                                       bias=not cfg.batch_norm)
        if cfg.batch_norm:
            layers[f"conv{i}_bn"] = nn.BatchNorm2d(out)
        layers[f"conv{i}_relu"] = nn.ReLU()
        if cfg.pool > 1:
            layers[f"pool{i}"] = nn.MaxPool2d(cfg.pool)
        channels = out
    layers["flatten"] = nn.Flatten()
    layers["drop"] = nn.Dropout(cfg.dropout)
    width = features
    for i, hidden in enumerate(cfg.head, 1):
        layers[f"fc{i}"] = nn.Linear(width, hidden)
        layers[f"fc{i}_relu"] = nn.ReLU()
        layers[f"fc{i}_drop"] = nn.Dropout(cfg.dropout)
        width = hidden
    layers["fc"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


def _lenet(cfg: ModelConfig, in_channels: int, features: int, num_classes: int) -> nn.Module:
    """LeNet-5; activation sigmoid + pooling avg is the classic, relu + max the modern one."""
    kernel = cfg.filter_size
    act = _ACTIVATIONS[cfg.activation]
    c1, c2 = shapes.LENET_CHANNELS
    d1, d2 = shapes.LENET_DENSE
    pool = shapes.LENET_POOL
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=nn.Conv2d(in_channels, c1, kernel, padding=kernel // 2),
        conv1_act=act(),
        pool1=_POOLS[cfg.pooling](pool),
        conv2=nn.Conv2d(c1, c2, kernel),
        conv2_act=act(),
        pool2=_POOLS[cfg.pooling](pool),
        flatten=nn.Flatten(),
        fc1=nn.Linear(features, d1),
        fc1_act=act(),
        fc1_drop=nn.Dropout(cfg.dropout),
        fc2=nn.Linear(d1, d2),
        fc2_act=act(),
        fc2_drop=nn.Dropout(cfg.dropout),
        fc=nn.Linear(d2, num_classes),
    )
    return nn.Sequential(layers)


class BasicBlock(nn.Module):
    """Two FxF convs with BatchNorm, added to a shortcut (a strided 1x1 conv + BN when the
    stride or the width changes, the identity otherwise)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int) -> None:
        super().__init__()
        padding = kernel // 2
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel, 1, padding, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                bn=nn.BatchNorm2d(out_channels),
            ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _resnet(cfg: ModelConfig, in_channels: int, features: int, num_classes: int) -> nn.Module:
    kernel, width = cfg.filter_size, cfg.width
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, width, kernel, padding=kernel // 2, bias=False),
        bn=nn.BatchNorm2d(width),
        relu=nn.ReLU(),
    )))
    channels = width
    for stage, (mult, stride) in enumerate(zip((1, 2, 4), (1, 2, 2), strict=True), 1):
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for block in range(1, cfg.blocks + 1):
            blocks[f"block{block}"] = BasicBlock(channels, width * mult, kernel,
                                                 stride if block == 1 else 1)
            channels = width * mult
        layers[f"stage{stage}"] = nn.Sequential(blocks)
    layers["gap"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["drop"] = nn.Dropout(cfg.dropout)
    layers["fc"] = nn.Linear(features, num_classes)
    return nn.Sequential(layers)


_BUILDERS: dict[str, Callable[[ModelConfig, int, int, int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "lenet": _lenet,
    "resnet": _resnet,
}
