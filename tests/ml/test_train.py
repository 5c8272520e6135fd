"""The training loop on the tiny synthetic task: it learns, stops, diverges and repeats."""

from __future__ import annotations

import ast
import itertools
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from sweeper.errors import Diverged, SweeperError
from sweeper.ml.data import Dataset, load_dataset
from sweeper.ml.models import build_model
from sweeper.ml.train import (
    FitResult,
    build_optimizer,
    fit,
    resolve_device,
    seed_everything,
)
from sweeper.spec.config import (
    AugmentConfig,
    DatasetConfig,
    ModelConfig,
    OptimizerName,
    TrainConfig,
)

CPU = torch.device("cpu")
MLP = ModelConfig(arch="mlp", hidden=[64], dropout=0.0)
KEYS = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds",
        "lr"}


@pytest.fixture(scope="module")
def data() -> Dataset:
    """4 classes of 16x16 templates plus noise: 1843 train, 205 val images."""
    return load_dataset(DatasetConfig(name="synthetic"), device="cpu")


def _model(data: Dataset, cfg: ModelConfig = MLP, seed: int = 0) -> nn.Module:
    seed_everything(seed)
    return build_model(cfg, data.input_shape, data.num_classes)


def _finite(result: FitResult) -> bool:
    return all(math.isfinite(v) for row in result.history for v in row.values())


def test_synthetic_task_learns(data: Dataset) -> None:
    result = fit(_model(data), data, TrainConfig(lr=1e-3, batch_size=64), epochs=3,
                 device=CPU)
    assert len(result.history) == 3 and not result.stopped_early
    assert set(result.history[0]) == KEYS
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.history[-1]["val_accuracy"] > 0.9
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.train_seconds >= sum(row["epoch_seconds"] for row in result.history) * 0.99
    assert _finite(result)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "rmsprop", "adagrad", "adam",
                                       "adamw"])
def test_every_optimizer_builds_and_trains(data: Dataset, optimizer: OptimizerName) -> None:
    cfg = TrainConfig(optimizer=optimizer, lr=1e-2, weight_decay=1e-4, nesterov=True,
                      batch_size=256)
    model = _model(data)
    assert isinstance(build_optimizer(model, cfg), torch.optim.Optimizer)
    result = fit(model, data, cfg, epochs=1, device=CPU)
    assert len(result.history) == 1 and _finite(result)


def test_optimizer_settings_follow_the_config(data: Dataset) -> None:
    model = _model(data)
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1))
    assert sgd.defaults["momentum"] == 0
    nesterov = build_optimizer(model, TrainConfig(optimizer="momentum", momentum=0.8,
                                                  nesterov=True))
    assert nesterov.defaults["momentum"] == 0.8 and nesterov.defaults["nesterov"]
    adamw = build_optimizer(model, TrainConfig(optimizer="adamw"))
    assert adamw.defaults["weight_decay"] == 0.0  # the study file's default, not torch's
    # Nesterov without momentum is rejected by torch: quietly plain SGD instead.
    build_optimizer(model, TrainConfig(optimizer="momentum", momentum=0.0, nesterov=True))


def test_huge_lr_on_unnormalised_data_diverges(data: Dataset) -> None:
    scaled = replace(data, train=replace(data.train, x=data.train.x * 1e6),
                     val=replace(data.val, x=data.val.x * 1e6))
    history: list[dict[str, float]] = []

    def keep(epoch: int, metrics: dict[str, float]) -> bool:
        history.append(metrics)
        return False

    with pytest.raises(Diverged, match="diverged at epoch 1"):
        fit(_model(data), scaled, TrainConfig(optimizer="sgd", lr=10.0), epochs=3,
            device=CPU, on_epoch=keep)
    assert history == []  # the hook never saw a NaN


def test_hook_stops_training(data: Dataset) -> None:
    seen: list[int] = []

    def stop_at_two(epoch: int, metrics: dict[str, float]) -> bool:
        seen.append(epoch)
        assert {"val_accuracy", "val_loss"} <= set(metrics)
        return epoch == 2

    result = fit(_model(data), data, TrainConfig(batch_size=256), epochs=5, device=CPU,
                 on_epoch=stop_at_two)
    assert seen == [1, 2]
    assert len(result.history) == 2 and result.stopped_early


def test_same_seed_same_history_on_cpu(data: Dataset) -> None:
    cfg = TrainConfig(seed=7, batch_size=128)
    model = ModelConfig(arch="mlp", hidden=[32], dropout=0.3)  # dropout draws from the seed
    aug = AugmentConfig(shift=2)  # and so does augmentation

    def run() -> list[dict[str, float]]:
        result = fit(_model(data, model), data, cfg, epochs=2, device=CPU, augment=aug)
        return [{k: v for k, v in row.items() if k != "epoch_seconds"}
                for row in result.history]

    first, second = run(), run()
    assert first == second
    other = fit(_model(data, model), data, cfg.model_copy(update={"seed": 8}), epochs=2,
                device=CPU, augment=aug)
    assert other.history[0]["train_loss"] != first[0]["train_loss"]


def test_conv_net_is_deterministic_too(data: Dataset) -> None:
    # Conv nets train in channels_last (oneDNN kernels) on the CPU: still reproducible.
    cfg = TrainConfig(seed=3, batch_size=256)
    model = ModelConfig(arch="cnn", channels=[8], head=[16], dropout=0.2)

    def run() -> list[float]:
        result = fit(_model(data, model), data, cfg, epochs=1, device=CPU)
        return [result.history[0][k] for k in ("train_loss", "val_loss", "val_accuracy")]

    assert run() == run()


def test_cosine_schedule_decreases_lr(data: Dataset) -> None:
    cfg = TrainConfig(lr=0.01, scheduler="cosine", batch_size=512)
    model = _model(data)
    result = fit(model, data, cfg, epochs=4, device=CPU)
    lrs = [row["lr"] for row in result.history]
    assert lrs[0] == pytest.approx(0.01)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    constant = fit(_model(data), data, cfg.model_copy(update={"scheduler": "none"}),
                   epochs=2, device=CPU)
    assert [row["lr"] for row in constant.history] == [0.01, 0.01]


def test_model_is_trained_in_place(data: Dataset) -> None:
    model = _model(data)
    before = [p.detach().clone() for p in model.parameters()]
    fit(model, data, TrainConfig(batch_size=512), epochs=1, device=CPU)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(),
                                                     strict=True))


def test_resolve_device() -> None:
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == CPU
    with pytest.raises(SweeperError, match="unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(SweeperError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_train_module_never_imports_optuna_or_mlflow() -> None:
    import sweeper.ml.train

    tree = ast.parse(Path(sweeper.ml.train.__file__).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"optuna", "mlflow"}


def test_per_epoch_and_final_loss_agree(data: Dataset) -> None:
    """One definition of the loss: the last epoch's val_loss is the final val_loss of the
    same model on the same images, even where a probability underflows."""
    from sweeper.ml.metrics import evaluate

    # A large lr makes a few confident mistakes, whose softmax underflows in float32.
    model = _model(data)
    result = fit(model, data, TrainConfig(lr=3e-2, batch_size=64), epochs=2, device=CPU)
    final = evaluate(model, data.val, classes=data.classes).metrics["loss"]
    assert final == pytest.approx(result.history[-1]["val_loss"], rel=1e-5)


def test_mse_loss_trains_and_reports_cross_entropy(data: Dataset) -> None:
    from sweeper.ml.metrics import evaluate

    model = _model(data)
    cfg = TrainConfig(lr=1e-2, batch_size=64, loss="mse")
    result = fit(model, data, cfg, epochs=2, device=CPU)
    assert result.history[-1]["val_accuracy"] > 0.9
    # What is reported is the cross-entropy, whichever cost was minimised.
    final = evaluate(model, data.val, classes=data.classes).metrics["loss"]
    assert final == pytest.approx(result.history[-1]["val_loss"], rel=1e-5, abs=1e-7)
    other = _model(data)
    ce = fit(other, data, TrainConfig(lr=1e-2, batch_size=64), epochs=2, device=CPU)
    assert ce.history[0]["train_loss"] != result.history[0]["train_loss"]


def test_last_validation_is_the_final_evaluation_of_the_validation_split(data: Dataset
                                                                         ) -> None:
    """fit keeps the last epoch's validation logits: the trial's final validation
    metrics come from them, with no second forward pass, and they are the model's own."""
    from sweeper.ml.metrics import predict_logits

    cnn = ModelConfig(arch="cnn", channels=[4], filter_size=3, padding="same", dropout=0.3)
    model = _model(data, cnn)
    result = fit(model, data, TrainConfig(lr=1e-3, batch_size=64), epochs=2, device=CPU)
    assert result.val_logits is not None
    assert result.val_logits.shape == (len(data.val), data.num_classes)
    again = predict_logits(model, data.val.x)
    torch.testing.assert_close(result.val_logits, again)
    accuracy = float((again.argmax(dim=1) == data.val.y).float().mean())
    assert accuracy == pytest.approx(result.history[-1]["val_accuracy"])


class SourceLeNet5(nn.Module):
    """The source document's LeNet-5 class, written out as its readers would."""

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor],
                 pool: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.act, self.pool = act, pool
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, stride=1, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, stride=1, padding=0)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)), kernel_size=2, stride=2)
        x = self.pool(self.act(self.conv2(x)), kernel_size=2, stride=2)
        x = torch.flatten(x, 1)
        x = self.act(self.fc2(self.act(self.fc1(x))))
        return self.fc3(x)


@pytest.mark.parametrize(("activation", "pooling"), [("relu", "max"), ("sigmoid", "avg")],
                         ids=["modern", "classic"])
def test_lenet_trains_as_the_textbook_loop_does(mnist_dir: Path, activation: str,
                                                pooling: str) -> None:
    """`lenet` + `fit` is the source's network in the textbook loop (Adam, mean
    cross-entropy, a fresh permutation each epoch): from the same initial weights and batch
    order both end with the same weights, so no hidden default (weight decay, label
    smoothing, augmentation, dropout, a missing activation) changes what is trained."""
    import torch.nn.functional as F

    data = load_dataset(DatasetConfig(name="mnist", subset=640, val_fraction=0.01,
                                      test_subset=10),
                        data_dir=mnist_dir)
    model = _model(data, ModelConfig(arch="lenet", activation=activation, pooling=pooling))
    torch.manual_seed(0)
    source = SourceLeNet5(getattr(torch, activation), getattr(F, f"{pooling}_pool2d"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), source.parameters(),
                                                 strict=True))

    optimizer = torch.optim.Adam(source.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(2):
        for index in torch.randperm(len(data.train), generator=order).split(128):
            optimizer.zero_grad()
            F.cross_entropy(source(data.train.x[index]), data.train.y[index]).backward()
            optimizer.step()
    result = fit(model, data, TrainConfig(optimizer="adam", lr=1e-3, batch_size=128, seed=0),
                 epochs=2, device=CPU)

    for ours, theirs in zip(model.parameters(), source.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=2e-4)
    source.eval()
    with torch.no_grad():
        hits = (source(data.val.x).argmax(1) == data.val.y).float().mean().item()
    assert result.history[-1]["val_accuracy"] == pytest.approx(hits, abs=1 / len(data.val))
