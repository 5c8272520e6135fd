"""Train several models of one shape at once: trial packing.

Small image classifiers leave a device mostly idle; K of them, stacked, keep it busy. Here
K models of the same architecture (the *members* of a pack) train as one network whose
every weight has a leading dimension K:

- convolutions run as one grouped convolution (the K members' channels side by side,
  `groups=K`), so pooling, activations and BatchNorm act on the K members' channels in
  one call, each channel with its own statistics: BatchNorm stays per member;
- dense layers run as one batched matrix product (`baddbmm`), the K members' inputs
  stacked on a leading dimension;
- dropout draws each member's mask from its own generator, seeded with its own
  `train.seed`, in the order and shape a member trained alone draws it, so that a packed
  member sees exactly the masks of its lone run (on the CPU: bit for bit the same draws);
- each member keeps its own learning rate, weight decay, momentum/betas/alpha/eps,
  optimizer state (a functional optimizer over the stacked tensors, with the maths of
  torch.optim for each optimizer sweeper offers), batch order and augmentation draws.

A member leaves the pack when it is pruned (its `on_epoch` hook asks to stop), when it
diverges, or when its epochs are done; its weights are written back into its own
`nn.Module` (a normal single model) before `on_leave` hears of it, and the remaining
members go on as a smaller pack whose numbers are unchanged by the departure.

This module knows nothing of Optuna or MLflow (a test parses its imports to keep it so).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sweeper.errors import Diverged, SweeperError
from sweeper.ml.data import augment as augment_batch
from sweeper.ml.metrics import cross_entropy_sum, eval_batch_size
from sweeper.ml.models import BasicBlock, LongResidual, build_model
from sweeper.ml.train import FitResult, training_loss
from sweeper.spec import shapes
from sweeper.spec.config import AugmentConfig, ModelConfig, TrainConfig, TrialConfig

if TYPE_CHECKING:
    from sweeper.ml.data import Dataset, Split

# Keys a member of a pack keeps for itself; every other key of the trial config (the arch
# and all that shapes its tensors, batch size, epochs, dataset, optimizer, schedule, loss)
# is the pack's, shared by all members.
MEMBER_KEYS = frozenset({
    "train.lr", "train.weight_decay", "train.momentum", "train.alpha", "train.betas",
    "train.eps", "train.nesterov", "train.seed", "model.dropout", "dataset.augment.rotate",
    "dataset.augment.shift",
})
PACKABLE_ARCHS = ("mlp", "cnn", "lenet", "resnet")
# Share of the free device memory a pack may plan to use (see `pack_size`).
MEMORY_SHARE = 0.5

# (member index in the original list, epoch starting at 1, its metrics) -> stop it now?
MemberHook = Callable[[int, int, dict[str, float]], bool]


@dataclass
class MemberResult:
    """How one member's training ended: a history (as `train.fit` returns it) or the
    exception that ended it (`Diverged`)."""

    index: int
    result: FitResult | None = None
    error: BaseException | None = None


LeaveHook = Callable[[MemberResult], None]


def pack_key(config: TrialConfig) -> str:
    """What members of one pack must share: the trial config without `MEMBER_KEYS`."""
    import json

    flat = {k: v for k, v in config.flat().items() if k not in MEMBER_KEYS}
    # dropout 0 or not changes no tensor shape: a template with dropout everywhere serves
    # both (see `_template`)
    return json.dumps(flat, sort_keys=True, default=str)


def packable(config: TrialConfig) -> bool:
    return config.model.arch in PACKABLE_ARCHS


# --------------------------------------------------------------------------------------
# How many members fit
# --------------------------------------------------------------------------------------
def member_bytes(config: TrialConfig, input_shape: tuple[int, int, int],
                 num_classes: int) -> int:
    """Estimated training memory of one member: weights, gradients and two optimizer
    states (4 copies of every parameter), plus, per image of a batch, every layer's output
    kept for the backward pass and its gradient (2 copies, and 2 more for the
    activations and the pools sweeper's plan does not list)."""
    layers = shapes.plan(config.model, input_shape, num_classes)
    params = shapes.parameter_count(layers)
    per_image = sum(math.prod(layer.shape) for layer in layers) + math.prod(input_shape)
    batch = config.train.batch_size
    return 4 * (4 * params + 4 * per_image * batch)


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now: CUDA's own count, or the host's available memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def pack_size(requested: int, config: TrialConfig, input_shape: tuple[int, int, int],
              num_classes: int, device: torch.device) -> int:
    """The members to pack: `requested`, or as many as fit in `MEMORY_SHARE` of the free
    memory by `member_bytes` (at least 1: a lone trial runs whatever the estimate). A
    pack that still runs out of memory is split by the caller (`packed_trials`)."""
    if requested <= 1 or not packable(config):
        return 1
    need = member_bytes(config, input_shape, num_classes)
    fits = int(MEMORY_SHARE * free_memory(device) // max(need, 1))
    return max(1, min(requested, fits))


# --------------------------------------------------------------------------------------
# The stacked network
# --------------------------------------------------------------------------------------
def _template(model_cfg: ModelConfig, input_shape: tuple[int, int, int],
              num_classes: int) -> nn.Module:
    """The network's structure with a dropout layer wherever any member may have one
    (members without dropout skip it), built on the meta device: no memory, no RNG."""
    cfg = model_cfg.model_copy(update={"dropout": 0.5})
    with torch.device("meta"):
        return build_model(cfg, input_shape, num_classes)


class PackedNet:
    """K networks of one structure as stacked tensors, run as one.

    Layouts between layers: images as (B, K*C, H, W) (member k's channels at k*C..), flat
    features as (K, B, F).
    """

    def __init__(self, template: nn.Module, members: Sequence[nn.Module],
                 dropouts: Sequence[float], generators: Sequence[torch.Generator],
                 device: torch.device, channels_last: bool) -> None:
        self.template = template
        self.device = device
        self.channels_last = channels_last
        self.k = len(members)
        self.dropouts = list(dropouts)
        self.generators = list(generators)
        names = [n for n, _ in template.named_parameters()]
        buffers = [n for n, _ in template.named_buffers()]
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        states = [m.state_dict() for m in members]
        # Dense weights are kept as (K, in, out): the batched product then reads them in
        # place and their gradients come out in the same layout (no copy per step).
        self.transposed = {f"{path}.weight" for path, m in template.named_modules()
                           if isinstance(m, nn.Linear)}
        # Convolution weights are kept so that the grouped weight (K*out, in, kh, kw) is a
        # channels_last view, as `train.fit` converts a lone model: otherwise oneDNN runs
        # a first layer of one input channel in NCHW and the whole network follows
        # (measured 3-10x slower convolutions and pools on the CPU).
        self.channels_last_weights = {
            f"{path}.weight" for path, m in template.named_modules()
            if isinstance(m, nn.Conv2d)} if channels_last else set()
        for name in names:
            stacked = torch.stack([self._layout(name, s[name].detach().to(device,
                                                                          torch.float32))
                                   for s in states])
            self.params[name] = self._stored(name, stacked).requires_grad_(True)
        for name in buffers:
            self.buffers[name] = torch.stack([s[name].detach().to(device)
                                              for s in states]).contiguous()
        self.training = True

    def _layout(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if name in self.transposed else tensor

    def _grouped(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Convolution weight (K, out, in, kh, kw) as the grouped (K*out, in, kh, kw).
        Stored channels_last, it is viewed with explicit strides: a dimension of size 1
        (one input channel) would otherwise get strides that make oneDNN choose NCHW."""
        k, out, cin, kh, kw = w.shape
        if name in self.channels_last_weights:
            return w.as_strided((k * out, cin, kh, kw), (kh * kw * cin, 1, kw * cin, cin))
        return w.reshape(k * out, cin, kh, kw)

    def _stored(self, name: str, stacked: torch.Tensor) -> torch.Tensor:
        """`stacked` (K, ...) in the memory layout the step reads it in."""
        if name in self.channels_last_weights:  # (K, out, in, kh, kw), `in` innermost
            return stacked.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        return stacked.contiguous()

    # -- membership ---------------------------------------------------------------------
    def keep(self, rows: list[int]) -> None:
        """Keep only the members at `rows` (positions in the current pack)."""
        index = torch.tensor(rows, device=self.device)
        for name, p in self.params.items():
            self.params[name] = self._stored(name, p.detach().index_select(0, index)) \
                .requires_grad_(True)
        for name, b in self.buffers.items():
            self.buffers[name] = b.index_select(0, index).contiguous()
        self.dropouts = [self.dropouts[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        self.k = len(rows)

    def write_back(self, row: int, model: nn.Module) -> None:
        """Member `row`'s weights and buffers into its own single model."""
        state = {name: self._layout(name, p[row].detach()).clone()
                 for name, p in self.params.items()}
        state.update({name: b[row].clone() for name, b in self.buffers.items()})
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in state.items()
                               if k in own})

    # -- forward ------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (K, B, classes) of member k on `x[k]` (K, B, C, H, W), or of every
        member on the same images `x` (B, C, H, W)."""
        shared = x.ndim == 4
        first = next(iter(self.template.children()))
        if isinstance(first, nn.Flatten):  # an mlp: dense from the start
            flat = x.flatten(1) if shared else x.flatten(2)
            h: torch.Tensor = flat.unsqueeze(0).expand(self.k, *flat.shape) if shared \
                else flat
            return self._run_children(self.template, "", h, dense=True)[0]
        if shared:
            h = x.repeat(1, self.k, 1, 1)
        else:
            k, b, c, hh, ww = x.shape
            h = x.transpose(0, 1).reshape(b, k * c, hh, ww)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        out, dense = self._run_children(self.template, "", h, dense=False)
        assert dense, "the network must end in dense layers"
        return out

    def _run_children(self, module: nn.Module, prefix: str, h: torch.Tensor, *, dense: bool
                      ) -> tuple[torch.Tensor, bool]:
        for name, child in module.named_children():
            h, dense = self._run(child, f"{prefix}{name}", h, dense)
        return h, dense

    def _run(self, m: nn.Module, path: str, h: torch.Tensor, dense: bool
             ) -> tuple[torch.Tensor, bool]:
        k = self.k
        if isinstance(m, nn.Sequential):
            return self._run_children(m, f"{path}.", h, dense=dense)
        if isinstance(m, nn.Flatten):
            if dense:
                return h, True
            b = h.shape[0]
            return h.reshape(b, k, -1).transpose(0, 1), True
        if isinstance(m, nn.Linear):
            w = self.params[f"{path}.weight"]
            bias = self.params.get(f"{path}.bias")
            if bias is None:
                return torch.bmm(h, w), True
            return torch.baddbmm(bias.unsqueeze(1), h, w), True
        if isinstance(m, nn.Conv2d):
            w = self.params[f"{path}.weight"]
            bias = self.params.get(f"{path}.bias")
            out = F.conv2d(h, self._grouped(f"{path}.weight", w),
                           None if bias is None else bias.reshape(-1), m.stride, m.padding,
                           m.dilation, k * m.groups)
            return out, False
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            return self._batch_norm(m, path, h, dense), dense
        if isinstance(m, nn.Dropout):
            return self._dropout(h, dense), dense
        if isinstance(m, BasicBlock):
            out, _ = self._run(m.conv1, f"{path}.conv1", h, False)
            out, _ = self._run(m.bn1, f"{path}.bn1", out, False)
            out = F.relu(out)
            out, _ = self._run(m.conv2, f"{path}.conv2", out, False)
            out, _ = self._run(m.bn2, f"{path}.bn2", out, False)
            short, _ = self._run(m.shortcut, f"{path}.shortcut", h, False)
            return F.relu(out + short), False
        if isinstance(m, LongResidual):
            main, _ = self._run(m.main, f"{path}.main", h, False)
            short, _ = self._run(m.shortcut, f"{path}.shortcut", h, False)
            return main + short, False
        if isinstance(m, _ELEMENTWISE):
            return m(h), dense  # per element (activations) or per channel (pools)
        raise SweeperError(f"trial packing cannot run a {type(m).__name__} layer ({path})")

    def _batch_norm(self, m: nn.Module, path: str, h: torch.Tensor, dense: bool
                    ) -> torch.Tensor:
        """Every member's channels as channels of one BatchNorm: per member statistics."""
        assert isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)
        mean = self.buffers[f"{path}.running_mean"]
        var = self.buffers[f"{path}.running_var"]
        w, b = self.params.get(f"{path}.weight"), self.params.get(f"{path}.bias")
        if self.training:
            self.buffers[f"{path}.num_batches_tracked"].add_(1)
        args = (mean.view(-1), var.view(-1), None if w is None else w.reshape(-1),
                None if b is None else b.reshape(-1), self.training, m.momentum, m.eps)
        if not dense:
            return F.batch_norm(h, *args)
        k, batch, feat = h.shape
        out = F.batch_norm(h.transpose(0, 1).reshape(batch, k * feat), *args)
        return out.reshape(batch, k, feat).transpose(0, 1)

    def _dropout(self, h: torch.Tensor, dense: bool) -> torch.Tensor:
        """Member k's mask drawn from its own generator, as `F.dropout` draws it on the
        CPU (`bernoulli_(1 - p)` on a tensor of the member's shape, scaled by 1/(1-p))."""
        if not self.training or not any(self.dropouts):
            return h
        if not dense:
            raise SweeperError("trial packing supports dropout on dense features only")
        masks = torch.ones(h.shape, dtype=h.dtype, device=h.device)
        for row, (p, gen) in enumerate(zip(self.dropouts, self.generators, strict=True)):
            if p > 0:
                masks[row].bernoulli_(1 - p, generator=gen).div_(1 - p)
        return h * masks


_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.MaxPool2d,
                nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity)


# --------------------------------------------------------------------------------------
# The functional optimizers: torch.optim's single-tensor maths, one value per member
# --------------------------------------------------------------------------------------
class PackedOptimizer:
    """`train.build_optimizer`'s optimizers over stacked parameters: each member is stepped
    by torch.optim's own functional implementation on its slices of the stacked tensors,
    with its own hyperparameters and its own state. Fused kernels (one pass over each
    tensor, no temporaries) where torch has them for the device (adam, adamw, sgd,
    momentum, adagrad), torch's single-tensor code otherwise (rmsprop): the same maths as
    a lone trial's optimizer, to float rounding."""

    FUSED = ("adam", "adamw", "sgd", "momentum", "adagrad")

    def __init__(self, name: str, params: dict[str, torch.Tensor],
                 cfgs: Sequence[TrainConfig]) -> None:
        self.name = name
        self.cfgs = list(cfgs)
        self.base_lr = [c.lr for c in cfgs]
        self.lr = list(self.base_lr)
        self.fused = name in self.FUSED
        # per member: state name -> one tensor per parameter (in `params` order)
        self.state: list[dict[str, list[Any]]] = [self._fresh(params, k)
                                                  for k in range(len(self.cfgs))]

    def _fresh(self, params: dict[str, torch.Tensor], k: int) -> dict[str, list[Any]]:
        tensors = [p[k] for p in params.values()]
        cfg = self.cfgs[k]

        def zeros() -> list[torch.Tensor]:
            return [torch.zeros_like(t, memory_format=torch.preserve_format) for t in tensors]

        def steps() -> list[torch.Tensor]:
            return [torch.zeros((), dtype=torch.float32, device=t.device) for t in tensors]

        name = self.name
        if name in ("adam", "adamw"):
            # One step count for all of a member's tensors (the fused kernel only reads
            # it): one increment per step instead of one per tensor.
            step = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
            return {"exp_avg": zeros(), "exp_avg_sq": zeros(), "step": [step] * len(tensors)}
        if name == "rmsprop":
            momentum = float(cfg.momentum or 0.0)
            return {"square_avg": zeros(), "step": steps(),
                    "momentum_buffer": zeros() if momentum > 0 else []}
        if name == "adagrad":
            return {"sum": zeros(), "step": steps()}
        return {"momentum_buffer": [None] * len(tensors)}

    def keep(self, rows: list[int]) -> None:
        self.state = [self.state[r] for r in rows]
        self.cfgs = [self.cfgs[r] for r in rows]
        self.base_lr = [self.base_lr[r] for r in rows]
        self.lr = [self.lr[r] for r in rows]

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor]) -> None:
        from torch.optim import adagrad, rmsprop, sgd

        stacked = list(params.values())
        for k, (cfg, state, lr) in enumerate(zip(self.cfgs, self.state, self.lr,
                                                 strict=True)):
            ps = [p[k] for p in stacked]
            grads = [p.grad[k] if p.grad is not None else torch.zeros_like(p[k])
                     for p in stacked]
            wd = cfg.weight_decay
            momentum = float(cfg.momentum or 0.0)
            eps = float(cfg.eps or 1e-8)
            name = self.name
            if name in ("adam", "adamw"):
                # What `torch.optim.adam.adam(..., fused=True)` calls, without its grouping
                # of tensors by device and dtype (ours share both): a step counts here.
                state["step"][0].add_(1)
                kernel = torch._fused_adamw_ if name == "adamw" else torch._fused_adam_
                kernel(ps, grads, state["exp_avg"], state["exp_avg_sq"], [], state["step"],
                       amsgrad=False, lr=lr, beta1=cfg.betas[0], beta2=cfg.betas[1],
                       weight_decay=wd, eps=eps, maximize=False, grad_scale=None,
                       found_inf=None)
            elif name in ("sgd", "momentum"):
                m = momentum if name == "momentum" else 0.0
                sgd.sgd(ps, grads, state["momentum_buffer"], fused=True, weight_decay=wd,
                        momentum=m, lr=lr, dampening=0.0,
                        nesterov=bool(cfg.nesterov and m > 0), maximize=False)
            elif name == "rmsprop":
                rmsprop.rmsprop(ps, grads, state["square_avg"], [], state["momentum_buffer"],
                                state["step"], foreach=False, lr=lr, alpha=cfg.alpha,
                                eps=eps, weight_decay=wd, momentum=momentum, centered=False)
            elif name == "adagrad":
                adagrad.adagrad(ps, grads, state["sum"], state["step"], fused=True, lr=lr,
                                weight_decay=wd, lr_decay=0.0, eps=float(cfg.eps or 1e-10),
                                maximize=False)
            else:
                raise SweeperError(f"unknown optimizer {name!r}")


def _cosine_lr(base: float, step: int, total: int) -> float:
    """CosineAnnealingLR's closed form (eta_min 0) after `step` of `total` steps."""
    return base * (1 + math.cos(math.pi * step / total)) / 2


# --------------------------------------------------------------------------------------
# Host memory: keep freed pages for the next step
# --------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # mallopt's parameters
_tuned = False


def keep_freed_memory() -> None:
    """Ask glibc's allocator to keep freed memory in the process (once per process).

    A pack's activations are K times a lone trial's: tens of MB that are freed and
    allocated again every step. By default glibc hands such blocks back to the kernel
    (large ones mmap'd, the heap trimmed above 128 KB of free space at its top), and
    the next step pays for zeroed pages again: measured 20-40% of a packed LeNet-5 step
    on 2 CPU cores (benchmarks/packing.py). Other C libraries are left as they are."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    # Blocks above 32 MB (glibc's ceiling for the mmap threshold; a ConvNet pack's
    # activations are larger) would still be mmap'd and unmapped each time: no mmap at
    # all keeps them in the heap too (measured on 2 CPU cores: a pack of 4 default
    # ConvNets from 0.5x to 0.94x of lone trials' speed, of 8 from 0.6x to 1.0x).
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    mallopt(_M_TOP_PAD, 64 << 20)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------
@dataclass
class _Member:
    index: int
    model: nn.Module
    cfg: TrainConfig
    augment: AugmentConfig | None
    order_rng: torch.Generator
    augment_rng: torch.Generator
    history: list[dict[str, float]] = field(default_factory=list)


def fit_packed(models: Sequence[nn.Module], configs: Sequence[TrialConfig], data: Dataset, *,
               device: torch.device, on_epoch: MemberHook | None = None,
               on_leave: LeaveHook | None = None) -> list[MemberResult]:
    """Train `models[i]` with `configs[i]` together, as `train.fit` trains each alone.

    Every config must have the same `pack_key`. Each epoch, `on_epoch(i, epoch,
    metrics)` is called for every member still in the pack (in order); True stops that
    member (`stopped_early`). A member whose losses are not finite leaves with
    `Diverged`. `on_leave` hears of each member as it leaves, its weights already in
    `models[i]`. Returns one `MemberResult` per model, in order.
    """
    if not models or len(models) != len(configs):
        raise ValueError("give one config per model, and at least one model")
    keys = {pack_key(c) for c in configs}
    if len(keys) != 1:
        raise ValueError("the members of a pack must share every key but "
                         f"{sorted(MEMBER_KEYS)}")
    first = configs[0]
    if not packable(first):
        raise SweeperError(f"arch {first.model.arch} cannot be packed; it trains alone")
    epochs, batch_size = first.epochs, first.train.batch_size
    if device.type == "cpu":
        keep_freed_memory()
    started = time.perf_counter()
    cuda = device.type == "cuda"
    train, val = _on_device(data.train, device), _on_device(data.val, device)
    n_train, n_val = int(train.y.shape[0]), int(val.y.shape[0])
    if n_train == 0 or n_val == 0:
        raise SweeperError(f"cannot train with {n_train} training and {n_val} validation "
                           f"images; the dataset's splits are empty")
    template = _template(first.model, data.input_shape, data.num_classes)
    channels_last = cuda or any(isinstance(m, nn.Conv2d) for m in template.modules())
    members = [
        _Member(i, model, cfg.train, cfg.dataset.augment,
                torch.Generator().manual_seed(cfg.train.seed),
                torch.Generator(device=train.x.device).manual_seed(cfg.train.seed))
        for i, (model, cfg) in enumerate(zip(models, configs, strict=True))]
    dropout_gens = [torch.Generator(device=device).manual_seed(c.train.seed) for c in configs]
    for model in models:
        model.to(device)
    net = PackedNet(template, models, [float(c.model.dropout or 0.0) for c in configs],
                    dropout_gens, device, channels_last)
    optimizer = PackedOptimizer(first.train.optimizer, net.params,
                                [c.train for c in configs])
    steps_per_epoch = math.ceil(n_train / batch_size)
    total_steps = epochs * steps_per_epoch
    cosine = first.train.scheduler == "cosine"
    autocast: contextlib.AbstractContextManager[object] = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext())
    eval_batch = eval_batch_size(device, first.train.eval_batch_size)
    loss_name = first.train.loss
    results: dict[int, MemberResult] = {}
    active = list(members)

    def leave(rows_out: dict[int, MemberResult]) -> None:
        nonlocal active
        for row in sorted(rows_out):
            net.write_back(row, active[row].model)
        keep = [r for r in range(len(active)) if r not in rows_out]
        gone = [active[r] for r in sorted(rows_out)]
        if keep:
            net.keep(keep)
            optimizer.keep(keep)
        active = [active[r] for r in keep]
        for member, row in zip(gone, sorted(rows_out), strict=True):
            outcome = rows_out[row]
            results[member.index] = outcome
            if on_leave is not None:
                on_leave(outcome)

    step = 0
    for epoch in range(1, epochs + 1):
        epoch_started = time.perf_counter()
        lrs = list(optimizer.lr)
        k = len(active)
        # -- train: each member's own permutation, one gather for all ------------------
        net.training = True
        orders = torch.stack([torch.randperm(n_train, generator=m.order_rng,
                                             device=m.order_rng.device)
                              for m in active]).to(train.x.device)
        loss_sum = torch.zeros(k, dtype=torch.float32, device=device)
        correct = torch.zeros(k, dtype=torch.int64, device=device)
        for start in range(0, n_train, batch_size):
            index = orders[:, start:start + batch_size]
            flat = index.reshape(-1)  # index_select: see `data.batches`
            x = train.x.index_select(0, flat).view(k, -1, *train.x.shape[1:])  # (K,B,C,H,W)
            y = train.y.index_select(0, flat).view(k, -1)  # (K, B)
            if any(_augments(m.augment) for m in active):
                x = torch.stack([augment_batch(x[r], m.augment, generator=m.augment_rng)
                                 if _augments(m.augment) else x[r]
                                 for r, m in enumerate(active)])
            with autocast:
                logits = net(x)  # (K, B, classes)
            b = y.shape[1]
            if loss_name == "cross_entropy":
                per = F.cross_entropy(logits.float().reshape(k * b, -1), y.reshape(-1),
                                      reduction="none").reshape(k, b).sum(1) / b
            else:
                per = torch.stack([training_loss(logits[r], y[r], loss_name)
                                   for r in range(k)])
            for p in net.params.values():
                p.grad = None
            per.sum().backward()
            optimizer.step(net.params)
            step += 1
            if cosine:
                optimizer.lr = [_cosine_lr(base, step, total_steps)
                                for base in optimizer.base_lr]
            with torch.no_grad():
                detached = logits.detach()
                if loss_name == "cross_entropy":
                    loss_sum += per.detach() * b
                else:
                    loss_sum += F.cross_entropy(detached.float().reshape(k * b, -1),
                                                y.reshape(-1), reduction="none"
                                                ).reshape(k, b).sum(1)
                correct += (detached.argmax(dim=2) == y).sum(1)

        # -- validate: every member on the same images ---------------------------------
        net.training = False
        val_loss = torch.zeros(k, dtype=torch.float32, device=device)
        val_correct = torch.zeros(k, dtype=torch.int64, device=device)
        chunks = []
        with torch.inference_mode():
            for vstart in range(0, n_val, eval_batch):
                vx, vy = val.x[vstart:vstart + eval_batch], val.y[vstart:vstart + eval_batch]
                with autocast:
                    vlogits = net(vx)
                vb = vy.shape[0]
                val_loss += F.cross_entropy(vlogits.float().reshape(k * vb, -1),
                                            vy.repeat(k), reduction="none"
                                            ).reshape(k, vb).sum(1)
                val_correct += (vlogits.argmax(dim=2) == vy).sum(1)
                chunks.append(vlogits.float())
        val_logits = torch.cat(chunks, dim=1)
        sums = torch.stack([loss_sum, correct.float(), val_loss, val_correct.float()]).tolist()
        seconds = time.perf_counter() - epoch_started

        # -- per member: divergence, the hook, leaving ---------------------------------
        leaving: dict[int, MemberResult] = {}
        for row, member in enumerate(active):
            train_loss = sums[0][row] / n_train
            v_loss = sums[2][row] / n_val
            if not (math.isfinite(train_loss) and math.isfinite(v_loss)):
                leaving[row] = MemberResult(member.index, error=Diverged(epoch))
                continue
            metrics = {"epoch": epoch, "train_loss": train_loss,
                       "train_accuracy": sums[1][row] / n_train, "val_loss": v_loss,
                       "val_accuracy": sums[3][row] / n_val, "epoch_seconds": seconds,
                       "lr": float(lrs[row])}
            member.history.append(metrics)
            stop = on_epoch is not None and on_epoch(member.index, epoch, dict(metrics))
            if stop or epoch == epochs:
                leaving[row] = MemberResult(member.index, FitResult(
                    member.history, bool(stop), time.perf_counter() - started,
                    val_logits[row].clone()))
        if leaving:
            leave(leaving)
        if not active:
            break
    return [results[i] for i in range(len(models))]


def _augments(cfg: AugmentConfig | None) -> bool:
    return cfg is not None and (cfg.rotate > 0 or cfg.shift > 0)


def _on_device(split: Split, device: torch.device) -> Split:
    from dataclasses import replace

    if split.x.device == device and split.y.device == device:
        return split
    return replace(split, x=split.x.to(device), y=split.y.to(device))


__all__ = ["MEMBER_KEYS", "MemberResult", "PackedNet", "PackedOptimizer", "cross_entropy_sum",
           "fit_packed", "member_bytes", "pack_key", "pack_size", "packable"]
