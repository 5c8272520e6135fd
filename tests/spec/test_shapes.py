"""`shapes.plan`: the layer arithmetic `sweeper validate` relies on, checked without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sweeper.errors import InfeasibleConfig, TrialFailure
from sweeper.spec.config import ModelConfig
from sweeper.spec.shapes import Layer, plan

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
DIGITS = (1, 8, 8)


def shapes_of(layers: list[Layer]) -> list[tuple[str, tuple[int, int, int]]]:
    return [(layer.name, layer.shape) for layer in layers]


def infeasible(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> str:
    with pytest.raises(InfeasibleConfig) as info:
        plan(cfg, input_shape)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_importing_shapes_does_not_import_torch() -> None:
    # `sweeper validate` must start in well under a second; torch alone takes seconds.
    code = ("import sys, sweeper.spec.shapes; from sweeper.spec.config import ModelConfig; "
            "sweeper.spec.shapes.plan(ModelConfig(), (1, 28, 28)); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_default_cnn_is_the_classic_mnist_convnet() -> None:
    assert shapes_of(plan(ModelConfig(), MNIST, 10)) == [
        ("conv1", (32, 26, 26)),
        ("pool1", (32, 13, 13)),
        ("conv2", (64, 11, 11)),
        ("pool2", (64, 5, 5)),
        ("flatten", (1600, 1, 1)),
        ("fc", (10, 1, 1)),
    ]


def test_without_num_classes_the_plan_stops_before_the_classifier() -> None:
    assert plan(ModelConfig(), MNIST)[-1] == Layer("flatten", (1600, 1, 1))


def test_cnn_head_same_padding_and_no_pool() -> None:
    cfg = ModelConfig(channels=[8, 16], padding="same", pool=1, head=[64, 32])
    assert shapes_of(plan(cfg, CIFAR, 10)) == [
        ("conv1", (8, 32, 32)),
        ("conv2", (16, 32, 32)),
        ("flatten", (16 * 32 * 32, 1, 1)),
        ("fc1", (64, 1, 1)),
        ("fc2", (32, 1, 1)),
        ("fc", (10, 1, 1)),
    ]


def test_same_padding_with_an_even_filter_grows_each_side_by_one() -> None:
    # padding F//2 = 2 with F = 4: n + 4 - 4 + 1 = n + 1
    layers = plan(ModelConfig(filter_size=4, padding="same"), MNIST)
    assert shapes_of(layers)[:4] == [("conv1", (32, 29, 29)), ("pool1", (32, 14, 14)),
                                     ("conv2", (64, 15, 15)), ("pool2", (64, 7, 7))]


def test_non_square_inputs_are_computed_per_side() -> None:
    assert plan(ModelConfig(), (1, 28, 12))[-1] == Layer("flatten", (64 * 5 * 1, 1, 1))
    message = infeasible(ModelConfig(), (1, 28, 8))
    assert "pool2 (2x2) would reduce 64x11x1 to 64x5x0" in message


def test_lenet5_on_mnist() -> None:
    cfg = ModelConfig(arch="lenet", filter_size=5, activation="sigmoid", pooling="avg")
    assert shapes_of(plan(cfg, MNIST, 10)) == [
        ("conv1", (6, 28, 28)),
        ("pool1", (6, 14, 14)),
        ("conv2", (16, 10, 10)),
        ("pool2", (16, 5, 5)),
        ("flatten", (400, 1, 1)),
        ("fc1", (120, 1, 1)),
        ("fc2", (84, 1, 1)),
        ("fc", (10, 1, 1)),
    ]


def test_resnet_stages_halve_the_sides_and_double_the_width() -> None:
    cfg = ModelConfig(arch="resnet", width=8, blocks=2)
    assert shapes_of(plan(cfg, MNIST, 10)) == [
        ("stem", (8, 28, 28)),
        ("stage1.block1", (8, 28, 28)),
        ("stage1.block2", (8, 28, 28)),
        ("stage2.block1", (16, 14, 14)),
        ("stage2.block2", (16, 14, 14)),
        ("stage3.block1", (32, 7, 7)),
        ("stage3.block2", (32, 7, 7)),
        ("gap", (32, 1, 1)),
        ("flatten", (32, 1, 1)),
        ("fc", (10, 1, 1)),
    ]


@pytest.mark.parametrize("filter_size", [1, 3, 5, 7, 9, 15])
def test_resnet_with_an_odd_filter_fits_even_a_one_pixel_image(filter_size: int) -> None:
    layers = plan(ModelConfig(arch="resnet", filter_size=filter_size), (1, 1, 1))
    assert layers[-1] == Layer("flatten", (64, 1, 1))


@pytest.mark.parametrize("filter_size", [2, 4, 6])
def test_resnet_with_an_even_filter_cannot_add_its_shortcut(filter_size: int) -> None:
    message = infeasible(ModelConfig(arch="resnet", filter_size=filter_size), MNIST)
    assert message.startswith(f"model.filter_size={filter_size}: stage1.block1 cannot add "
                              f"its main path 16x31x31 to its shortcut 16x29x29")
    assert "odd filter_size" in message


@pytest.mark.parametrize("input_shape", [(1, 1, 1), DIGITS, MNIST, (3, 64, 64)])
def test_mlp_is_always_feasible(input_shape: tuple[int, int, int]) -> None:
    cfg = ModelConfig(arch="mlp", hidden=[16, 8], filter_size=15, channels=[1] * 8)
    c, h, w = input_shape
    assert shapes_of(plan(cfg, input_shape, 3)) == [
        ("flatten", (c * h * w, 1, 1)), ("fc1", (16, 1, 1)), ("fc2", (8, 1, 1)),
        ("fc", (3, 1, 1))]


def test_message_names_key_layer_sizes_path_and_fix() -> None:
    message = infeasible(ModelConfig(channels=[32, 64, 128], filter_size=7), MNIST)
    assert message == (
        "model.filter_size=7: conv3 needs an input of at least 7x7 but gets 2x2 "
        "(input 1x28x28 → conv1 32x22x22 → pool1 32x11x11 → conv2 64x5x5 → pool2 64x2x2 → "
        "conv3 ...); use a smaller filter_size, padding: same, a smaller pool or fewer conv "
        "blocks")


def test_the_default_cnn_fits_mnist_up_to_filter_9() -> None:
    # 28 → 22 → 11 → 5 → 2: conv2 sees 11x11, so a 7x7 filter still fits.
    assert shapes_of(plan(ModelConfig(filter_size=7), MNIST))[:4] == [
        ("conv1", (32, 22, 22)), ("pool1", (32, 11, 11)), ("conv2", (64, 5, 5)),
        ("pool2", (64, 2, 2))]
    assert plan(ModelConfig(filter_size=9), MNIST)[-1] == Layer("flatten", (64, 1, 1))
    message = infeasible(ModelConfig(filter_size=10), MNIST)
    assert message.startswith("model.filter_size=10: conv2 needs an input of at least 10x10 "
                              "but gets 9x9 (input 1x28x28 → conv1 32x19x19 → pool1 32x9x9 → "
                              "conv2 ...); ")


def test_infeasible_is_a_trial_failure() -> None:
    # The study records it as the trial's FAIL reason and goes on.
    with pytest.raises(TrialFailure):
        plan(ModelConfig(), DIGITS)


def test_a_pool_that_reduces_a_side_to_zero_is_infeasible() -> None:
    message = infeasible(ModelConfig(), DIGITS)
    assert message.startswith("model.pool=2: pool2 (2x2) would reduce 64x1x1 to 64x0x0 "
                              "(input 1x8x8 → conv1 32x6x6 → pool1 32x3x3 → conv2 64x1x1 → "
                              "pool2 ...); use ")
    assert "a smaller pool" in message


def test_the_first_block_only_suggests_what_could_help() -> None:
    message = infeasible(ModelConfig(channels=[8], pool=4), (1, 5, 5))
    assert message.endswith("; use a smaller pool, a smaller filter_size or padding: same")
    message = infeasible(ModelConfig(channels=[8], filter_size=9), (1, 8, 8))
    assert message.endswith("; use a smaller filter_size or padding: same")


def test_same_padding_keeps_the_digits_cnn_feasible() -> None:
    layers = plan(ModelConfig(padding="same"), DIGITS)
    assert layers[-1] == Layer("flatten", (64 * 2 * 2, 1, 1))


@pytest.mark.parametrize(("filter_size", "layer"), [(4, "pool2"), (5, "conv2"), (7, "conv2")])
def test_lenet_on_digits(filter_size: int, layer: str) -> None:
    message = infeasible(ModelConfig(arch="lenet", filter_size=filter_size), DIGITS)
    assert message.startswith(f"model.filter_size={filter_size}: {layer} ")
    assert "(input 1x8x8 → conv1 6x" in message


def test_layer_reads_as_name_and_shape() -> None:
    assert str(Layer("conv1", (32, 26, 26))) == "conv1 32x26x26"
    assert str(Layer("flatten", (1600, 1, 1))) == "flatten 1600"
    assert str(Layer("fc", (10, 1, 1))) == "fc 10"


@pytest.mark.parametrize("input_shape", [(1, 0, 28), (28, 28), (0, 28, 28)])
def test_bad_input_shapes_are_rejected(input_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="input_shape"):
        plan(ModelConfig(), input_shape)  # type: ignore[arg-type]
