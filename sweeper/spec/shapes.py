"""Each architecture's layer-by-layer output shapes, as plain arithmetic.

`sweeper validate` looks for infeasible corners of a study's space (a filter bigger than
the feature map it slides over, a pool that shrinks a side to nothing) and must start
instantly, so this module never imports torch. `models.build_model` calls `plan` first,
so an infeasible trial fails with one readable line, before any module is built, instead
of with a torch shape error deep inside the first forward pass.

The arithmetic mirrors `models.py` exactly (tests hold the two together): a convolution
of kernel F, padding P and stride S maps a side n to (n + 2P - F) // S + 1 and needs
n + 2P >= F; a pool of size k (stride k, no padding) maps n to n // k.
"""

from __future__ import annotations

from dataclasses import dataclass

from sweeper.errors import InfeasibleConfig
from sweeper.spec.config import ModelConfig

Shape = tuple[int, int, int]

# LeNet-5's fixed widths: two conv blocks, then three dense layers.
LENET_CHANNELS = (6, 16)
LENET_DENSE = (120, 84)
LENET_POOL = 2


@dataclass(frozen=True)
class Layer:
    """One shape-changing layer and its output for a single image.

    Flat outputs (flatten, dense layers) are written (n, 1, 1) so every shape has three
    sides; `name` is the module's name in the built model (`model.get_submodule(name)`).
    """

    name: str  # e.g. "conv1", "pool1", "stage2.block1", "flatten", "fc1", "fc"
    shape: Shape  # (C, H, W) output of that layer
    params: int = 0  # trainable scalars of the layer (its BatchNorm included)

    @property
    def flat(self) -> bool:
        return self.name == "flatten" or self.name.startswith("fc")

    def __str__(self) -> str:
        return f"{self.name} {self.shape[0]}" if self.flat else f"{self.name} {_fmt(self.shape)}"


def parameter_count(layers: list[Layer]) -> int:
    """Trainable parameters of a planned network (equal to `models.count_parameters` of
    the built one; a test holds the two together)."""
    return sum(layer.params for layer in layers)


def plan(cfg: ModelConfig, input_shape: tuple[int, int, int],
         num_classes: int | None = None) -> list[Layer]:
    """The output shape of every shape-changing layer of `cfg.arch` on `input_shape`.

    With `num_classes`, the classifier `fc` is the last layer; without it, the plan ends
    at the last hidden layer (feasibility never depends on the class count).
    Raises InfeasibleConfig, in one line naming the key, the layer, the sizes and the path
    so far, when a layer does not fit its input.
    """
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) with every side >= 1, but got "
                         f"{input_shape!r}")
    walk = _Walk(cfg, (int(input_shape[0]), int(input_shape[1]), int(input_shape[2])))
    planner = _PLANNERS.get(cfg.arch)
    if planner is None:
        raise ValueError(f"unknown arch {cfg.arch!r}; choose one of {', '.join(_PLANNERS)}")
    planner(walk)
    if num_classes is not None:
        walk.dense("fc", num_classes)
    return walk.layers


# --------------------------------------------------------------------------------------
# One plan per architecture
# --------------------------------------------------------------------------------------
def _plan_mlp(walk: _Walk) -> None:
    walk.flatten()
    for i, width in enumerate(walk.cfg.hidden, 1):
        walk.dense(f"fc{i}", width, batch_norm=bool(walk.cfg.batch_norm))


def cnn_pools(cfg: ModelConfig, block: int) -> bool:
    """Whether conv block `block` (1-based) of a cnn is followed by a pool."""
    if cfg.pool <= 1:
        return False
    return cfg.pool_blocks is None or block in cfg.pool_blocks


def _plan_cnn(walk: _Walk) -> None:
    cfg = walk.cfg
    kernel, pool = _kernel(cfg), cfg.pool
    padding = kernel // 2 if cfg.padding == "same" else 0
    for i, channels in enumerate(cfg.channels, 1):
        later = i > 1
        walk.conv(f"conv{i}", channels, kernel, padding, key="filter_size", hint=_hint(
            kernel > 1 and "a smaller filter_size",
            cfg.padding == "valid" and "padding: same",
            later and pool > 1 and "a smaller pool",
            later and "fewer conv blocks"), batch_norm=bool(cfg.batch_norm))
        if cnn_pools(cfg, i):
            walk.pool(f"pool{i}", pool, key="pool", hint=_hint(
                "a smaller pool",
                cfg.padding == "valid" and kernel > 1 and "a smaller filter_size",
                cfg.padding == "valid" and kernel > 1 and "padding: same",
                later and "fewer conv blocks"))
    walk.flatten()
    for i, width in enumerate(cfg.head, 1):
        walk.dense(f"fc{i}", width)


def _plan_lenet(walk: _Walk) -> None:
    kernel = _kernel(walk.cfg)
    hint = _hint(kernel > 1 and "a smaller filter_size",
                 "another arch (LeNet-5 is made for images of about 28x28)")
    # conv1 is padded (classic LeNet sees 28x28 digits padded to 32x32); conv2 is not.
    for i, (channels, padding) in enumerate(zip(LENET_CHANNELS, (kernel // 2, 0), strict=True), 1):
        walk.conv(f"conv{i}", channels, kernel, padding, key="filter_size", hint=hint)
        walk.pool(f"pool{i}", LENET_POOL, key="filter_size", hint=hint)
    walk.flatten()
    for i, width in enumerate(LENET_DENSE, 1):
        walk.dense(f"fc{i}", width)


# The long-shortcut residual net: stem conv + pool, then a main path of
# conv(2w), pool, conv(2w), pool, conv(4w) added to one 1x1 conv(4w) of stride 4 over it,
# then `blocks` x (conv(4w) + pool). Pools round up (Keras' "same" pooling), so that the
# shortcut's ceil(n/4) side meets the main path's twice-halved side.
LONG_SHORTCUT_STRIDE = 4


def _plan_resnet(walk: _Walk) -> None:
    cfg = walk.cfg
    kernel = _kernel(cfg)
    padding = kernel // 2
    hint = ("use an odd filter_size (padding F//2 keeps a side unchanged only for odd F, "
            "and a residual block must add equal shapes)")
    if cfg.shortcut == "long":
        _plan_resnet_long(walk, kernel, padding, hint)
    else:
        walk.conv("stem", cfg.width, kernel, padding, key="filter_size", hint=hint,
                  batch_norm=bool(cfg.batch_norm))
        for stage, (mult, stride) in enumerate(zip((1, 2, 4), (1, 2, 2), strict=True), 1):
            for block in range(1, cfg.blocks + 1):
                walk.residual(f"stage{stage}.block{block}", cfg.width * mult, kernel,
                              stride if block == 1 else 1, hint=hint,
                              batch_norm=bool(cfg.batch_norm))
        walk.add("gap", (walk.shape[0], 1, 1))
    walk.flatten()
    for i, width in enumerate(cfg.head, 1):
        walk.dense(f"fc{i}", width)


def _plan_resnet_long(walk: _Walk, kernel: int, padding: int, hint: str) -> None:
    w, bn = walk.cfg.width, bool(walk.cfg.batch_norm)
    pool_hint = "use fewer blocks or shortcut: projection"
    walk.conv("stem", w, kernel, padding, key="filter_size", hint=hint, batch_norm=bn)
    walk.pool("stem_pool", 2, key="blocks", hint=pool_hint, ceil=True)
    _, h, wd = walk.shape
    stride = LONG_SHORTCUT_STRIDE
    short = (4 * w, _side(h, 1, 0, stride), _side(wd, 1, 0, stride))
    for name, channels, pooled in (("add.main.conv1", 2 * w, True), ("add.main.conv2", 2 * w, True),
                                   ("add.main.conv3", 4 * w, False)):
        walk.conv(name, channels, kernel, padding, key="filter_size", hint=hint,
                  batch_norm=bn)
        if pooled:
            walk.pool(name.replace("conv", "pool"), 2, key="blocks", hint=pool_hint,
                      ceil=True)
    if walk.shape != short:
        raise walk.fail("filter_size", f"the main path's {_fmt(walk.shape)} cannot be added "
                                       f"to the long shortcut's {_fmt(short)}", "add", hint)
    walk.add("add", short, params=_conv_params(w, 4 * w, 1, bn))  # the shortcut's 1x1 conv
    for block in range(1, walk.cfg.blocks + 1):
        walk.conv(f"post{block}.conv", 4 * w, kernel, padding, key="filter_size", hint=hint,
                  batch_norm=bn)
        walk.pool(f"post{block}.pool", 2, key="blocks", hint=pool_hint, ceil=True)


def _kernel(cfg: ModelConfig) -> int:
    assert cfg.filter_size is not None  # filled from the arch's default on validation
    return cfg.filter_size


def _plan_resnet18(walk: _Walk) -> None:
    """torchvision's ResNet-18: 7x7/2 conv, 3x3/2 max pool, four stages of two blocks."""
    hint = "use another arch (ResNet-18 needs inputs of at least 4x4)"
    c, h, w = walk.shape
    if h < 4 or w < 4:
        raise walk.fail("arch", f"conv1 needs an input of at least 4x4 but gets {h}x{w}",
                        "conv1", hint)
    walk.add("conv1", (64, _side(h, 7, 3, 2), _side(w, 7, 3, 2)), _conv_params(c, 64, 7, True))
    walk.add("maxpool", (64, _side(walk.shape[1], 3, 1, 2), _side(walk.shape[2], 3, 1, 2)))
    for stage, channels in enumerate((64, 128, 256, 512), 1):
        for block in range(2):
            walk.residual(f"layer{stage}.{block}", channels, 3,
                          2 if stage > 1 and block == 0 else 1, hint=hint)
    walk.add("avgpool", (walk.shape[0], 1, 1))
    walk.flatten()


_PLANNERS = {"mlp": _plan_mlp, "cnn": _plan_cnn, "lenet": _plan_lenet,
             "resnet": _plan_resnet, "resnet18": _plan_resnet18}


# --------------------------------------------------------------------------------------
# The walk: current shape, layers so far, and the one-line failure
# --------------------------------------------------------------------------------------
class _Walk:
    def __init__(self, cfg: ModelConfig, input_shape: Shape) -> None:
        self.cfg = cfg
        self.input = input_shape
        self.shape = input_shape
        self.layers: list[Layer] = []

    def add(self, name: str, shape: Shape, params: int = 0) -> None:
        self.layers.append(Layer(name, shape, params))
        self.shape = shape

    def conv(self, name: str, channels: int, kernel: int, padding: int, *, key: str,
             hint: str, batch_norm: bool = False) -> None:
        _, h, w = self.shape
        need = kernel - 2 * padding
        if h < need or w < need:
            raise self.fail(key, f"{name} needs an input of at least {need}x{need} but gets "
                                 f"{h}x{w}", name, hint)
        self.add(name, (channels, _side(h, kernel, padding), _side(w, kernel, padding)),
                 _conv_params(self.shape[0], channels, kernel, batch_norm))

    def pool(self, name: str, size: int, *, key: str, hint: str, ceil: bool = False) -> None:
        """A pool of stride `size`; `ceil` keeps a partial window at the edge."""
        c, h, w = self.shape
        if h < size or w < size:
            raise self.fail(key, f"{name} ({size}x{size}) would reduce {c}x{h}x{w} to "
                                 f"{c}x{h // size}x{w // size}", name, hint)
        if ceil:
            self.add(name, (c, -(-h // size), -(-w // size)))
        else:
            self.add(name, (c, h // size, w // size))

    def residual(self, name: str, channels: int, kernel: int, stride: int, *,
                 hint: str, batch_norm: bool = True) -> None:
        """A BasicBlock: two FxF convs (the first strided) plus a shortcut, added."""
        c, h, w = self.shape
        padding = kernel // 2
        need = kernel - 2 * padding
        if h < need or w < need:
            raise self.fail("filter_size", f"{name} needs an input of at least "
                                           f"{need}x{need} but gets {h}x{w}", name, hint)
        main = [_side(_side(n, kernel, padding, stride), kernel, padding) for n in (h, w)]
        projected = stride != 1 or c != channels
        short = [_side(n, 1, 0, stride) for n in (h, w)] if projected else [h, w]
        if main != short:
            raise self.fail("filter_size", f"{name} cannot add its main path "
                                           f"{channels}x{main[0]}x{main[1]} to its shortcut "
                                           f"{channels}x{short[0]}x{short[1]}", name, hint)
        params = (_conv_params(c, channels, kernel, batch_norm)
                  + _conv_params(channels, channels, kernel, batch_norm)
                  + (_conv_params(c, channels, 1, batch_norm) if projected else 0))
        self.add(name, (channels, main[0], main[1]), params)

    def flatten(self) -> None:
        c, h, w = self.shape
        self.add("flatten", (c * h * w, 1, 1))

    def dense(self, name: str, width: int, batch_norm: bool = False) -> None:
        # Linear (no bias before BatchNorm, whose shift replaces it) + BN's scale and shift.
        self.add(name, (width, 1, 1), self.shape[0] * width + (2 if batch_norm else 1) * width)

    def fail(self, key: str, what: str, name: str, hint: str) -> InfeasibleConfig:
        path = " → ".join([f"input {_fmt(self.input)}", *map(str, self.layers),
                           f"{name} ..."])
        return InfeasibleConfig(f"model.{key}={getattr(self.cfg, key)}: {what} ({path}); "
                                f"{hint}")


def _conv_params(in_channels: int, out_channels: int, kernel: int, batch_norm: bool) -> int:
    """Weights of a conv, plus its bias, or BatchNorm's scale and shift in place of it."""
    return in_channels * out_channels * kernel * kernel + (2 if batch_norm else 1) * out_channels


def _side(n: int, kernel: int, padding: int, stride: int = 1) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def _fmt(shape: Shape) -> str:
    return "x".join(map(str, shape))


def _hint(*options: str | bool) -> str:
    """'use a, b or c' from the options that apply (False ones are dropped)."""
    chosen = [o for o in options if isinstance(o, str)]
    if len(chosen) > 1:
        return f"use {', '.join(chosen[:-1])} or {chosen[-1]}"
    return f"use {chosen[0]}" if chosen else "use another arch"
