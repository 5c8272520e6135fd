"""Transfer learning: torchvision's ResNet-18, pretrained on ImageNet, as `arch: resnet18`.

`model.pretrained` says where the starting weights come from: `none` (random, trained from
scratch), `imagenet` (torchvision's ResNet18_Weights.IMAGENET1K_V1, downloaded once into
<data dir>/torchvision/ by torchvision's own download code, with its hash checked), or the
path of a local `.pth` file holding a ResNet-18 state dict. Every file is read with
`weights_only=True`: a weights file is data, never code.

`model.freeze: true` trains the new classifier only: the backbone's weights keep their
pretrained values and its BatchNorm layers keep their ImageNet statistics (they stay in
eval mode while the model trains).

Inputs: a 1-channel image is fed to the 3-channel first convolution by summing its
pretrained RGB kernels into one (the same response as a grey image repeated on R, G and
B). 28x28 images pass through unchanged: the stride-32 backbone ends at 1x1, which the
global average pool accepts.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sweeper.errors import DataError
from sweeper.spec.config import ModelConfig

IMAGENET = "imagenet"
NONE = "none"
WEIGHTS_FOLDER = "torchvision"  # under the data directory


class Transfer(nn.Sequential):
    """A backbone followed by a new classifier; with `frozen`, the backbone's BatchNorm
    layers stay in eval mode whatever mode the model is put in."""

    def __init__(self, layers: OrderedDict[str, nn.Module], frozen: bool) -> None:
        super().__init__(layers)
        self.frozen = frozen

    def train(self, mode: bool = True) -> Transfer:
        super().train(mode)
        if self.frozen:
            for name, module in self.named_modules():
                if isinstance(module, nn.BatchNorm2d) and not name.startswith("fc"):
                    module.eval()
        return self


def build_resnet18(cfg: ModelConfig, in_channels: int, num_classes: int,
                   data_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """ResNet-18 with `cfg.pretrained` weights, `in_channels` inputs and a new `fc`."""
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    if cfg.pretrained != NONE:
        net.load_state_dict(load_weights(cfg.pretrained, data_dir))
    if in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        with torch.no_grad():
            # Summed RGB kernels for a grey input; spread evenly for other channel counts.
            mean = old.weight.sum(dim=1, keepdim=True) if in_channels == 1 else \
                old.weight.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)
            net.conv1.weight.copy_(mean)
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool,
        layer1=net.layer1, layer2=net.layer2, layer3=net.layer3, layer4=net.layer4,
        avgpool=net.avgpool, flatten=nn.Flatten())
    if cfg.freeze:
        for module in layers.values():
            for param in module.parameters():
                param.requires_grad_(False)
    if cfg.dropout:
        layers["drop"] = nn.Dropout(cfg.dropout)
    layers["fc"] = nn.Linear(512, num_classes)
    return Transfer(layers, frozen=bool(cfg.freeze))


def load_weights(source: str, data_dir: str | os.PathLike[str] | None = None
                 ) -> dict[str, Any]:
    """The state dict `source` names: `imagenet` (downloaded once into the data directory)
    or a local file. A missing file that cannot be fetched is one DataError line."""
    if source == IMAGENET:
        return _imagenet(data_dir)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"model.pretrained: no weights file {str(path)!r}; give the path of a "
                        f"ResNet-18 state dict (.pth), `imagenet` or `none`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, code in the file
        raise DataError(f"model.pretrained: {str(path)!r} is not a plain weights file "
                        f"({_first_line(exc)}); save one with torch.save(model.state_dict())"
                        ) from exc
    if not isinstance(state, dict):
        raise DataError(f"model.pretrained: {str(path)!r} holds a {type(state).__name__}, "
                        f"not a state dict")
    return state


def _imagenet(data_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    from torchvision.models import ResNet18_Weights

    from sweeper.ml.data import resolve_data_dir

    weights = ResNet18_Weights.IMAGENET1K_V1
    folder = resolve_data_dir(data_dir) / WEIGHTS_FOLDER
    target = folder / Path(weights.url).name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # torchvision's own download: reuses the file when present, checks its hash.
        return weights.get_state_dict(model_dir=str(folder), progress=False,
                                      check_hash=True, weights_only=True)
    except Exception as exc:  # URLError, HTTPError, OSError, a hash mismatch
        raise DataError(f"ResNet-18 ImageNet weights not in {folder} and not downloadable "
                        f"({_first_line(exc)}); put {target.name} from {weights.url} there, "
                        f"or set model.pretrained to a local .pth file") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
