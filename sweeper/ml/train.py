"""Train one model on one dataset: the optimizer, the epoch loop and the divergence check.

`fit` is a plain callable that a sweep drives (cifar10-airbench style): the dataset is
already a set of tensors on the device, so an epoch is a permutation, index gathers and the
model's own work, with no DataLoader, no worker processes and no per-sample Python. The
loop is written out in one place with labelled stages (nanoGPT style) so that a reader
sees every step a batch goes through.

What the caller gets after each epoch is a dict of plain floats, passed to `on_epoch`;
the study's hook logs it and asks the pruner whether to stop. This module knows nothing
of Optuna or MLflow (a test parses its imports to keep it so).

Precision and layout: on CUDA the forward pass runs under bf16 autocast (tensor cores, no
loss scaling needed with bf16); on the CPU everything is fp32 and, for a given `cfg.seed`,
deterministic: two fits of the same initial model give the same history except for the
timings. Conv nets train in `channels_last` on both (on the CPU oneDNN's NHWC kernels are
10-25% faster per step for every architecture here); `fit` leaves the model in that
layout, which changes no result, only strides.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sweeper.errors import Diverged, SweeperError
from sweeper.ml.data import augment as augment_batch
from sweeper.ml.data import batches
from sweeper.ml.device import resolve_device  # noqa: F401 - where trainers have found it
from sweeper.ml.metrics import cross_entropy_sum, eval_batch_size
from sweeper.spec.config import AugmentConfig, TrainConfig

if TYPE_CHECKING:
    from sweeper.ml.data import Dataset, Split

# (epoch starting at 1, that epoch's metrics) -> stop now?
EpochHook = Callable[[int, dict[str, float]], bool]


@dataclass
class FitResult:
    """What one `fit` produced besides the model it trained in place."""

    # One dict per epoch run: epoch, train_loss, train_accuracy, val_loss, val_accuracy,
    # epoch_seconds (training and validation of that epoch), lr (at the epoch's start).
    history: list[dict[str, float]]
    stopped_early: bool  # the hook asked to stop (a pruned trial)
    train_seconds: float  # wall time of the whole fit, validation passes included
    # Logits (N_val, K) of the last epoch's validation pass, on the device: the final
    # evaluation of the validation split is these, not a second forward pass.
    val_logits: torch.Tensor | None = None


# --------------------------------------------------------------------------------------
# Device, optimizer, seeds
# --------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names, with `cfg.lr` and `cfg.weight_decay` on all.

    Each optimizer reads its own keys only (`config.OPTIMIZER_KEYS`), whose defaults are
    that optimizer's canonical values (`config.OPTIMIZER_DEFAULTS`):

    - sgd: plain SGD, no momentum.
    - momentum: SGD with `cfg.momentum` (0.9); `cfg.nesterov` turns on Nesterov momentum
      (only when momentum > 0, since torch rejects Nesterov without momentum).
    - rmsprop: RMSprop with `cfg.alpha` (0.99), `cfg.eps` (1e-8) and `cfg.momentum` (0).
    - adagrad: `cfg.eps` (1e-10). adam: `cfg.betas` (0.9, 0.999), `cfg.eps` (1e-8); weight
      decay is the coupled L2 penalty.
    - adamw: decoupled weight decay of exactly `cfg.weight_decay` (0 unless set, not
      torch's 0.01 default, so that the study file stays the single source of defaults).

    Weight decay applies to every parameter, biases and norm weights included: simple and
    predictable in a sweep, which searches the value anyway.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    lr, wd = cfg.lr, cfg.weight_decay
    name = cfg.optimizer
    momentum = float(cfg.momentum or 0.0)
    eps = float(cfg.eps or 1e-8)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd,
                               nesterov=cfg.nesterov and momentum > 0)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=cfg.alpha, eps=eps,
                                   momentum=momentum, weight_decay=wd)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=eps, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=cfg.betas, eps=eps, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, eps=eps, weight_decay=wd)
    raise SweeperError(f"unknown optimizer {name!r}; choose one of sgd, momentum, rmsprop, "
                       f"adagrad, adam, adamw")


# --------------------------------------------------------------------------------------
# Loss: one definition for training figures, per-epoch and final validation and test
# --------------------------------------------------------------------------------------
def training_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """The mean cost minimised: cross-entropy, or (`mse`) the quadratic cost
    1/2 ||softmax(z) - onehot(y)||^2 of the lecture notes, averaged over the batch."""
    if loss == "mse":
        probs = torch.softmax(logits.float(), dim=1)
        target = F.one_hot(y, probs.shape[1]).float()
        return 0.5 * ((probs - target) ** 2).sum(dim=1).mean()
    return cross_entropy_sum(logits, y) / y.shape[0]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) in one call.

    Call it before `build_model` so that the initial weights, too, follow the seed; `fit`
    itself reseeds torch with `cfg.seed` for dropout and the batch order.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------
def fit(model: nn.Module, data: Dataset, cfg: TrainConfig, *, epochs: int,
        device: torch.device, augment: AugmentConfig | None = None,
        on_epoch: EpochHook | None = None) -> FitResult:
    """Train `model` in place for up to `epochs` epochs; validate after each one.

    Raises `Diverged` as soon as an epoch's mean training loss or its validation loss is
    NaN or infinite, so a returned history never holds a non-finite number. `on_epoch`
    returning True stops training after that epoch (`stopped_early`).
    """
    if epochs < 1:
        raise ValueError(f"`epochs >= 1` must hold, but got epochs={epochs}")
    started = time.perf_counter()

    # -- setup: device, precision, seeds -------------------------------------------------
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)  # dropout masks and anything else drawn from torch's RNG
    model.to(device)
    # NHWC convolutions: tensor cores on CUDA, and oneDNN's faster kernels on the CPU
    # (measured 10-25% per step for every conv arch here; see benchmarks/).
    channels_last = cuda or _has_conv(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    train, val = _on_device(data.train, device), _on_device(data.val, device)
    n_train, n_val = int(train.y.shape[0]), int(val.y.shape[0])
    if n_train == 0 or n_val == 0:
        raise SweeperError(f"cannot train with {n_train} training and {n_val} validation "
                           f"images; the dataset's splits are empty")
    autocast = _autocast(device)
    # Seeded generators: the batch order is drawn on the CPU (the same permutations on
    # every machine, one small transfer per epoch); augmentation draws on the data's device
    # so that a CUDA batch needs no host-to-device copy of its random angles and shifts.
    order_rng = torch.Generator().manual_seed(cfg.seed)
    augment_rng = torch.Generator(device=train.x.device).manual_seed(cfg.seed)
    augmenting = augment is not None and (augment.rotate > 0 or augment.shift > 0)

    # -- setup: optimizer and schedule -------------------------------------------------
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    scheduler = None
    if cfg.scheduler == "cosine":
        # Per step rather than per epoch: smooth, and a pruned trial has seen the same lrs
        # as the first epochs of a full one.
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=epochs * steps_per_epoch)

    eval_batch = eval_batch_size(device, cfg.eval_batch_size)
    history: list[dict[str, float]] = []
    stopped_early = False
    val_logits = None
    for epoch in range(1, epochs + 1):
        epoch_started = time.perf_counter()
        lr = float(optimizer.param_groups[0]["lr"])

        # -- train: one pass over a fresh permutation ------------------------------------
        # Loss and correct count stay on the device; the only host sync is after the epoch.
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for x, y in batches(train, cfg.batch_size, shuffle=True, generator=order_rng):
            if augmenting:
                assert augment is not None
                x = augment_batch(x, augment, generator=augment_rng)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = model(x)
            loss = training_loss(logits, y, cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            # The reported training loss is the cross-entropy whatever cost is minimised.
            loss_sum += (loss.detach() * y.shape[0] if cfg.loss == "cross_entropy"
                         else cross_entropy_sum(logits.detach(), y))
            correct += (logits.detach().argmax(dim=1) == y).sum()

        # -- validate: eval and inference mode, the device's evaluation batch size -------
        val_loss_sum, val_correct, val_logits = _validate(
            model, val, eval_batch, autocast, channels_last)

        # -- sync once, check for divergence ---------------------------------------------
        train_loss, train_hits, val_loss, val_hits = torch.stack(
            [loss_sum, correct.float(), val_loss_sum, val_correct.float()]).tolist()
        train_loss /= n_train
        val_loss /= n_val
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise Diverged(epoch)
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_hits / n_train,
            "val_loss": val_loss,
            "val_accuracy": val_hits / n_val,
            "epoch_seconds": time.perf_counter() - epoch_started,
            "lr": lr,
        }
        history.append(metrics)

        # -- report: the hook logs, reports to the pruner and may stop us ----------------
        if on_epoch is not None and on_epoch(epoch, dict(metrics)):
            stopped_early = True
            break

    return FitResult(history=history, stopped_early=stopped_early,
                     train_seconds=time.perf_counter() - started,
                     val_logits=val_logits)


def _validate(model: nn.Module, split: Split, batch_size: int,
              autocast: contextlib.AbstractContextManager[object], channels_last: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy, correct count and float32 logits over a split, as device
    tensors (no sync)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float32, device=split.y.device)
    correct = torch.zeros((), dtype=torch.int64, device=split.y.device)
    all_logits = []
    with torch.inference_mode():
        for x, y in batches(split, batch_size, shuffle=False):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = model(x)
            loss_sum += cross_entropy_sum(logits, y)
            correct += (logits.argmax(dim=1) == y).sum()
            all_logits.append(logits.float())
    return loss_sum, correct, torch.cat(all_logits)


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA (no GradScaler needed); fp32 everywhere else."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _on_device(split: Split, device: torch.device) -> Split:
    """The split itself when already on `device` (the usual case), else a moved copy."""
    if split.x.device == device and split.y.device == device:
        return split
    return replace(split, x=split.x.to(device), y=split.y.to(device))
