"""`arch: resnet18`: torchvision's ResNet-18 with weights from a local file (written here,
in the real state-dict format), adapted to 1-channel 28x28 images, frozen or not; and
the one-line errors when weights are missing, unreachable or not plain weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from sweeper.errors import DataError
from sweeper.ml.data import load_dataset
from sweeper.ml.models import build_model, count_parameters
from sweeper.ml.train import fit
from sweeper.spec.config import DatasetConfig, ModelConfig, TrainConfig

MNIST = (1, 28, 28)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(7)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_loads_a_local_weights_file_and_adapts_one_channel(weights: tuple[Path, dict]) -> None:
    path, state = weights
    model = build_model(ModelConfig(arch="resnet18", pretrained=str(path)), MNIST, 10)
    assert torch.equal(model.get_submodule("layer3.1.conv2").weight, state["layer3.1.conv2.weight"])
    # A grey image meets the sum of the RGB kernels.
    assert torch.allclose(model.get_submodule("conv1").weight,
                          state["conv1.weight"].sum(dim=1, keepdim=True))
    assert model(torch.randn(2, *MNIST)).shape == (2, 10)
    assert count_parameters(model) == 11_175_370


def test_freeze_trains_the_classifier_only(weights: tuple[Path, dict]) -> None:
    path, state = weights
    cfg = ModelConfig(arch="resnet18", pretrained=str(path), freeze=True)
    model = build_model(cfg, (3, 32, 32), 4)
    assert count_parameters(model) == 512 * 4 + 4
    data = load_dataset(DatasetConfig(name="synthetic", synthetic={
        "classes": 4, "image_size": 32, "channels": 3, "train_size": 64, "test_size": 16}))
    fc_before = model.get_submodule("fc").weight.detach().clone()
    fit(model, data, TrainConfig(lr=1e-2, batch_size=32), epochs=1, device=torch.device("cpu"))
    # The backbone, its BatchNorm statistics included, is untouched; the head learned.
    after = model.state_dict()
    for key in ("conv1.weight", "layer1.0.bn1.running_mean", "layer4.1.conv2.weight"):
        assert torch.equal(after[key], state[key]), key
    assert not torch.equal(model.get_submodule("fc").weight, fc_before)
    model.train()
    assert not model.get_submodule("layer1.0.bn1").training


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^model\.pretrained: no weights file '.*nothing\.pth'"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "nothing.pth")),
                    MNIST, 10)


class NotWeights:
    pass


def test_a_file_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": NotWeights()}, path)
    with pytest.raises(DataError, match="is not a plain weights file"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(path)), MNIST, 10)


def test_imagenet_offline_without_the_file_is_one_line(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy that refuses every connection: the real download code, really offline.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(DataError) as info:
        build_model(ModelConfig(arch="resnet18", pretrained="imagenet"), MNIST, 10,
                    data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"ResNet-18 ImageNet weights not in {tmp_path / 'torchvision'}")
    assert "resnet18-f37072fd.pth" in message


def test_a_saved_model_loads_without_its_pretrained_file(weights: tuple[Path, dict],
                                                          tmp_path: Path) -> None:
    """The saved weights replace the pretrained ones: loading a trial's model neither reads
    nor downloads the file it started from."""
    from sweeper.ml.modelfile import ModelInfo, read_model, write_model
    from sweeper.spec import config

    source = tmp_path / "resnet18.pth"
    source.write_bytes(weights[0].read_bytes())
    spec = config.loads(
        "name: transfer\n"
        "dataset: {name: synthetic, synthetic: {image_size: 32, channels: 3, classes: 4}}\n"
        f"model: {{arch: resnet18, pretrained: {source}, freeze: true}}\n"
        "budget: {trials: 1, epochs: 1}\n")
    info = ModelInfo(spec.resolve({}), ["a", "b", "c", "d"], (0.5,) * 3, (0.25,) * 3)
    model = build_model(info.config.model, info.input_shape, info.num_classes).eval()
    write_model(tmp_path / "model", model, info)
    source.unlink()
    loaded, _ = read_model(tmp_path / "model")
    x = torch.randn(2, *info.input_shape)
    torch.testing.assert_close(loaded(x), model(x))
