"""`models.build_model`: every architecture runs, and every layer's output is what
`shapes.plan` promised (or the config is refused up front with the layer named)."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from sweeper.errors import InfeasibleConfig
from sweeper.ml import models
from sweeper.ml.models import build_model, count_parameters
from sweeper.spec.config import ARCH_KEYS, ModelConfig
from sweeper.spec.shapes import plan

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
DIGITS = (1, 8, 8)

VARIANTS: dict[str, dict[str, Any]] = {
    "mlp": {"arch": "mlp"},
    "cnn": {"arch": "cnn"},
    "cnn-same": {"arch": "cnn", "padding": "same"},
    "cnn-3blocks": {"arch": "cnn", "channels": [32, 64, 128]},
    "lenet": {"arch": "lenet"},
    "resnet": {"arch": "resnet", "width": 8},
}
# (variant, filter_size) on 1x28x28 that cannot be built, with the layer that does not fit.
# The default two-block cnn fits every F up to 9 (F=7: 28 → 22 → 11 → 5 → 2); a third
# block does not: F=5 goes 28 → 24 → 12 → 8 → 4 and F=7 goes 28 → 22 → 11 → 5 → 2, both
# smaller than conv3's filter.
INFEASIBLE_ON_MNIST = {("cnn-3blocks", 5): "conv3", ("cnn-3blocks", 7): "conv3"}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These models are tiny: one thread is faster than two fighting over a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_against_plan(model: nn.Module, cfg: ModelConfig, input_shape: tuple[int, int, int],
                       num_classes: int = 10, *, train: bool = False) -> torch.Tensor:
    """Run a batch of 2 and compare each planned layer's output with its plan."""
    layers = plan(cfg, input_shape, num_classes)
    modules = dict(model.named_modules())
    seen: dict[str, tuple[int, ...]] = {}
    handles = []
    for layer in layers:
        assert layer.name in modules, f"no module named {layer.name!r} in the model"

        def hook(_m: nn.Module, _i: Any, out: torch.Tensor, name: str = layer.name) -> None:
            seen[name] = tuple(out.shape)

        handles.append(modules[layer.name].register_forward_hook(hook))
    model.train(train)
    torch.manual_seed(0)
    try:
        out = model(torch.randn(2, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    for layer in layers:
        got = seen[layer.name]
        assert got[0] == 2
        assert (*got[1:], 1, 1)[:3] == layer.shape, f"{layer.name}: {got} vs {layer.shape}"
    return out


def config(variant: str, **overrides: Any) -> ModelConfig:
    return ModelConfig(**{**VARIANTS[variant], **overrides})


# --------------------------------------------------------------------------------------
# The grid: every arch x filter size on MNIST, one test each
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("filter_size", [1, 3, 5, 7])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mnist_grid(variant: str, filter_size: int) -> None:
    cfg = config(variant, filter_size=filter_size)
    layer = INFEASIBLE_ON_MNIST.get((variant, filter_size))
    if layer is None:
        check_against_plan(build_model(cfg, MNIST, 10), cfg, MNIST)
    else:
        with pytest.raises(InfeasibleConfig, match=rf"^model\.filter_size={filter_size}: "
                                                   rf"{layer} needs an input"):
            build_model(cfg, MNIST, 10)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cifar_defaults(variant: str) -> None:
    cfg = config(variant)
    check_against_plan(build_model(cfg, CIFAR, 10), cfg, CIFAR)


@pytest.mark.parametrize(("variant", "overrides"), [
    ("mlp", {}), ("cnn-same", {}), ("cnn", {"pool": 1}), ("lenet", {"filter_size": 3}),
    ("resnet", {}), ("resnet", {"filter_size": 7}),
], ids=["mlp", "cnn-same", "cnn-pool1", "lenet-f3", "resnet", "resnet-f7"])
def test_digits_feasible(variant: str, overrides: dict[str, Any]) -> None:
    cfg = config(variant, **overrides)
    check_against_plan(build_model(cfg, DIGITS, 10), cfg, DIGITS)


def test_default_cnn_is_infeasible_on_digits() -> None:
    with pytest.raises(InfeasibleConfig) as info:
        build_model(ModelConfig(), DIGITS, 10)
    message = str(info.value)
    assert message.startswith("model.pool=2: pool2 (2x2) would reduce 64x1x1 to 64x0x0")
    assert "input 1x8x8 → conv1 32x6x6" in message
    assert "\n" not in message


def test_infeasible_is_raised_before_any_module_is_built(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    def boom(*_args: Any) -> nn.Module:
        raise AssertionError("a module was built")

    monkeypatch.setattr(models, "_BUILDERS", dict.fromkeys(models._BUILDERS, boom))
    with pytest.raises(InfeasibleConfig):
        build_model(ModelConfig(channels=[32, 64, 128], filter_size=7), MNIST, 10)
    with pytest.raises(InfeasibleConfig):
        build_model(ModelConfig(), DIGITS, 10)
    with pytest.raises(InfeasibleConfig):
        build_model(ModelConfig(arch="resnet", filter_size=4), MNIST, 10)


# --------------------------------------------------------------------------------------
# Plan and torch agree on feasibility too: with `plan` bypassed, torch itself fails on
# exactly the configs `plan` refuses
# --------------------------------------------------------------------------------------
def torch_accepts(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> bool:
    """Whether torch runs the layers before `flatten` (the model built without `plan`)."""
    model = models._BUILDERS[cfg.arch](cfg, input_shape[0], 1, 10)
    children = list(model.named_children())
    body = nn.Sequential(OrderedDict(children[:[n for n, _ in children].index("flatten")]))
    try:
        with torch.no_grad():
            body.eval()(torch.zeros(1, *input_shape))
    except RuntimeError:
        return False
    return True


def plan_accepts(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> bool:
    try:
        plan(cfg, input_shape)
    except InfeasibleConfig:
        return False
    return True


AGREEMENT: dict[str, list[dict[str, Any]]] = {
    "cnn": [{"arch": "cnn", "channels": [2, 2, 2], "padding": padding, "pool": pool}
            for padding in ("valid", "same") for pool in (1, 2, 3, 4)],
    "lenet": [{"arch": "lenet", "pooling": pooling} for pooling in ("max", "avg")],
    "resnet": [{"arch": "resnet", "width": 4}],
}


@pytest.mark.parametrize("arch", list(AGREEMENT))
def test_plan_and_torch_agree_on_feasibility(arch: str) -> None:
    disagree, outcomes = [], set()
    for input_shape in [(1, 1, 1), (1, 5, 7), DIGITS, (1, 12, 12), MNIST, (3, 32, 32)]:
        for filter_size in range(1, 16):
            for values in AGREEMENT[arch]:
                cfg = ModelConfig(**values, filter_size=filter_size)
                accepted = plan_accepts(cfg, input_shape)
                outcomes.add(accepted)
                if accepted != torch_accepts(cfg, input_shape):
                    disagree.append((input_shape, filter_size, values))
    assert not disagree
    assert outcomes == {True, False}  # both kinds of config were tried


# --------------------------------------------------------------------------------------
# Configs: what each key builds
# --------------------------------------------------------------------------------------
def test_count_parameters_of_the_default_cnn() -> None:
    conv1 = 32 * (1 * 3 * 3) + 32
    conv2 = 64 * (32 * 3 * 3) + 64
    fc = 1600 * 10 + 10
    assert count_parameters(build_model(ModelConfig(), MNIST, 10)) == conv1 + conv2 + fc == 34826


def test_count_parameters_of_lenet5() -> None:
    cfg = ModelConfig(arch="lenet", filter_size=5)
    expected = (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + \
        (84 * 10 + 10)
    assert count_parameters(build_model(cfg, MNIST, 10)) == expected == 61706


def test_count_parameters_skips_frozen_ones() -> None:
    model = build_model(ModelConfig(arch="mlp", hidden=[]), MNIST, 10)
    assert count_parameters(model) == 784 * 10 + 10
    model.fc.bias.requires_grad_(False)
    assert count_parameters(model) == 784 * 10


def test_cnn_batch_norm() -> None:
    cfg = ModelConfig(batch_norm=True)
    model = build_model(cfg, MNIST, 10)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [n.num_features for n in norms] == [32, 64]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    check_against_plan(model, cfg, MNIST, train=True)
    check_against_plan(model, cfg, MNIST)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in build_model(ModelConfig(), MNIST,
                                                                      10).modules())


def test_cnn_head_layers() -> None:
    cfg = ModelConfig(head=[64, 32], dropout=0.25)
    model = build_model(cfg, MNIST, 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1600, 64), (64, 32),
                                                                  (32, 10)]
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.25}
    assert len([m for m in model.modules() if isinstance(m, nn.Dropout)]) == 3
    check_against_plan(model, cfg, MNIST, train=True)


def test_cnn_pool_one_means_no_pool_and_more_blocks() -> None:
    cfg = ModelConfig(channels=[4, 8, 16], pool=1)
    model = build_model(cfg, MNIST, 10)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [4, 8, 16]
    check_against_plan(model, cfg, MNIST)
    cfg = ModelConfig(channels=[4, 8, 16], pool=3, padding="same", filter_size=5)
    check_against_plan(build_model(cfg, CIFAR, 10), cfg, CIFAR)


@pytest.mark.parametrize(("style", "activation", "pooling"), [
    ("classic", "sigmoid", "avg"), ("modern", "relu", "max"), ("tanh", "tanh", "avg"),
    ("gelu", "gelu", "max"),
])
def test_lenet_activation_and_pooling(style: str, activation: str, pooling: str) -> None:
    cfg = ModelConfig(arch="lenet", filter_size=5, activation=activation, pooling=pooling)
    model = build_model(cfg, MNIST, 10)
    types = {type(m) for m in model.modules()}
    act = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
    pool = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}
    assert act[activation] in types
    assert pool[pooling] in types
    assert not (set(act.values()) - {act[activation]}) & types
    assert not (set(pool.values()) - {pool[pooling]}) & types
    assert sum(isinstance(m, act[activation]) for m in model.modules()) == 4
    check_against_plan(model, cfg, MNIST)


def test_mlp_layers_and_activation() -> None:
    cfg = ModelConfig(arch="mlp", hidden=[64, 32, 16], activation="tanh", dropout=0.1)
    model = build_model(cfg, CIFAR, 7)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (3 * 32 * 32, 64), (64, 32), (32, 16), (16, 7)]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 3
    check_against_plan(model, cfg, CIFAR, 7)


def test_resnet_shortcuts() -> None:
    cfg = ModelConfig(arch="resnet", width=8, blocks=2)
    model = build_model(cfg, MNIST, 10)
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, models.BasicBlock)}
    assert list(blocks) == [f"stage{s}.block{b}" for s in (1, 2, 3) for b in (1, 2)]
    # stage1 keeps width and size: identity shortcuts; stages 2 and 3 open with a strided
    # 1x1 projection, their second blocks are identities again.
    for name, block in blocks.items():
        if name in ("stage2.block1", "stage3.block1"):
            conv = block.shortcut.conv
            assert isinstance(conv, nn.Conv2d)
            assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
            assert isinstance(block.shortcut.bn, nn.BatchNorm2d)
            assert block.conv1.stride == (2, 2)
        else:
            assert isinstance(block.shortcut, nn.Identity)
            assert block.conv1.stride == (1, 1)
    assert model.fc.in_features == 32
    check_against_plan(model, cfg, MNIST, train=True)


def test_resnet_with_an_even_filter_is_infeasible() -> None:
    with pytest.raises(InfeasibleConfig, match=r"^model\.filter_size=4: stage1\.block1 "):
        build_model(ModelConfig(arch="resnet", filter_size=4), MNIST, 10)


@pytest.mark.parametrize("arch", list(ARCH_KEYS))
def test_each_arch_reads_only_its_own_keys(arch: str) -> None:
    others = {"dropout": 0.3, "filter_size": 5, "channels": [4, 8], "padding": "same",
              "pool": 1, "batch_norm": True, "head": [16], "hidden": [8],
              "activation": "tanh", "pooling": "avg", "width": 4, "blocks": 2}
    unread = {k: v for k, v in others.items() if k not in ARCH_KEYS[arch]}
    base = ModelConfig(arch=arch, width=8) if "width" in unread else ModelConfig(arch=arch)
    changed = base.model_copy(update=unread)
    assert unread
    assert repr(build_model(base, MNIST, 10)) == repr(build_model(changed, MNIST, 10))


# --------------------------------------------------------------------------------------
# Fast paths: channels_last and bf16 autocast must keep working
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_channels_last_and_bf16_autocast_on_cpu(variant: str) -> None:
    cfg = config(variant, batch_norm=True)
    model = build_model(cfg, MNIST, 10).to(memory_format=torch.channels_last)
    x = torch.randn(2, *MNIST).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert out.shape == (2, 10)
    assert torch.isfinite(out.float()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_channels_last_and_bf16_autocast_on_cuda(variant: str) -> None:
    cfg = config(variant, batch_norm=True)
    model = build_model(cfg, CIFAR, 10).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, *CIFAR, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert out.shape == (8, 10)
    assert torch.isfinite(out.float()).all()


def test_models_imports_no_optuna_mlflow_or_data() -> None:
    code = ("import sys, sweeper.ml.models; "
            "bad = [m for m in ('optuna', 'mlflow', 'sweeper.ml.data', 'torchvision') "
            "if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("values", [
    {"activation": "leaky_relu", "pooling": "avg"},
    {"channels": [8, 16, 16], "pool_blocks": [1, 2], "head": [12]},
    {"channels": [8, 16], "pool_blocks": [2], "batch_norm": True, "padding": "same"},
    {"arch": "mlp", "hidden": [16, 8], "batch_norm": True, "activation": "gelu"},
    {"arch": "resnet", "batch_norm": False, "head": [12]},
    {"arch": "resnet", "blocks": 2, "width": 8},
    {"arch": "resnet", "shortcut": "long", "width": 8, "batch_norm": False, "head": [16]},
    {"arch": "resnet", "shortcut": "long", "width": 8, "blocks": 2},
], ids=["cnn-leaky-avg", "cnn-pool-blocks-head", "cnn-bn-last-pool", "mlp-bn", "resnet-no-bn",
        "resnet-2-blocks", "resnet-long", "resnet-long-bn-2"])
@pytest.mark.parametrize("input_shape", [MNIST, CIFAR], ids=["mnist", "cifar"])
def test_new_options_match_their_plan_and_parameter_count(
        values: dict[str, Any], input_shape: tuple[int, int, int]) -> None:
    from sweeper.spec.shapes import parameter_count

    cfg = ModelConfig(**values)
    model = build_model(cfg, input_shape, 10)
    check_against_plan(model, cfg, input_shape, train=True)
    assert parameter_count(plan(cfg, input_shape, 10)) == count_parameters(model)


def test_long_shortcut_too_deep_is_one_line() -> None:
    with pytest.raises(InfeasibleConfig, match=r"^model\.blocks=4: post3\.pool "):
        build_model(ModelConfig(arch="resnet", shortcut="long", blocks=4), MNIST, 10)
