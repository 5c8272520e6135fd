"""Predictions → the numbers and curves a trial reports: accuracy, loss, precision, recall,
F1 (per class, macro, weighted), ROC curves and AUC (one-vs-rest, micro and macro) and the
confusion matrix.

The maths lives in `evaluate_probabilities`, which takes plain NumPy arrays, so that an
ensemble (averaged probabilities of several trials) is scored by exactly the same code as
one model. Every metric is a finite float: where a number is undefined (the AUC of a class
absent from the labels) it is left out rather than reported as NaN, which MLflow and
Optuna would both choke on.

Everything is NumPy (the forward pass is torch, on the model's device): scikit-learn would
cost a trial seconds of import for numbers that are a few lines each; a test checks them
against scikit-learn's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from sweeper.ml.data import Split

# For probabilities given as such (an ensemble's average), the loss is the cross-entropy of
# those probabilities, clipped to [EPS, 1] before the log: a confident wrong prediction
# costs -log(EPS) ≈ 27.6 instead of infinity. One model's loss comes from its logits
# (`evaluate_logits`), exactly as during training.
EPS = 1e-12

# Evaluation batch size per device type, when the study file sets none. Measured with
# benchmarks/eval_batch.py (forward passes of the default ConvNet over 10,000 MNIST
# images, channels_last): on 2 quiet CPU cores 256 is 3-6x faster than 2048 (0.48 s vs
# 1.70 s per 10k images with filter 3). The likely reason: at 256 images the largest
# activation (32 x 28 x 28 floats an image, 26 MB) stays under glibc's 32 MB mmap
# threshold, so buffers are reused instead of mapped and faulted in afresh every batch.
# A GPU wants large batches.
EVAL_BATCH_SIZE = {"cpu": 256, "cuda": 2048}


@dataclass
class Evaluation:
    """Everything one split's predictions say about a model."""

    # accuracy, loss, {precision,recall,f1}_{macro,weighted}, auc_{macro,micro}, and per
    # class {precision,recall,f1,auc}_<class name>. All finite; undefined AUCs are absent.
    metrics: dict[str, float]
    confusion: np.ndarray  # (K, K) int64 counts, rows = true class, columns = predicted
    roc: dict[str, tuple[np.ndarray, np.ndarray]]  # micro, macro, <class name> → (fpr, tpr)
    report: dict[str, Any]  # sklearn classification_report(output_dict=True)
    probabilities: np.ndarray  # (N, K) float32
    labels: np.ndarray  # (N,) int64


def cross_entropy_sum(logits: Tensor, y: Tensor) -> Tensor:
    """Summed cross-entropy of `logits` against labels: log-softmax in float32.

    The one definition of every reported loss (train_loss, per-epoch and final val_loss,
    test_loss): divide by the number of images for the mean.
    """
    return F.cross_entropy(logits.float(), y, reduction="sum")


def eval_batch_size(device: torch.device | str, requested: int | None = None) -> int:
    """`requested`, else the measured default for the device's type (`EVAL_BATCH_SIZE`)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"`batch_size >= 1` must hold, but got batch_size={requested}")
        return requested
    return EVAL_BATCH_SIZE.get(torch.device(device).type, EVAL_BATCH_SIZE["cuda"])


def wants_channels_last(model: nn.Module) -> bool:
    """Conv nets run in channels_last everywhere (training and evaluation alike): oneDNN's
    NHWC kernels on the CPU, tensor cores on CUDA. Inputs in another layout than the
    weights would be converted inside every convolution."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def predict_proba(model: nn.Module, x: Tensor, *, batch_size: int | None = None) -> Tensor:
    """Softmax probabilities of `model` on `x`, float32 on the CPU (see `predict_logits`)."""
    return torch.softmax(predict_logits(model, x, batch_size=batch_size), dim=1)


def predict_logits(model: nn.Module, x: Tensor, *, batch_size: int | None = None) -> Tensor:
    """The raw class scores of `model` on `x`, float32 on the CPU.

    Eval and inference mode; bf16 autocast on CUDA, channels_last for conv nets, as in
    training. `batch_size` defaults to the device's (`eval_batch_size`). Batches are moved
    to the model's device one at a time, so `x` may live on the CPU while the model is on
    a GPU. The results stay on the device until the end: one host transfer, not one per
    batch. The model's train/eval mode is restored afterwards.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else x.device
    return predict_on_device(model, x, batch_size=eval_batch_size(device, batch_size)).cpu()


def predict_on_device(model: nn.Module, x: Tensor, *, batch_size: int) -> Tensor:
    """`predict_logits`, left on the model's device."""
    if batch_size < 1:
        raise ValueError(f"`batch_size >= 1` must hold, but got batch_size={batch_size}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else x.device
    autocast: contextlib.AbstractContextManager[object] = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
        else contextlib.nullcontext())
    channels_last = x.dim() == 4 and wants_channels_last(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    chunks: list[Tensor] = []
    try:
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size].to(device, non_blocking=True)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with autocast:
                    logits = model(xb)
                chunks.append(logits.float())
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty((0, 0), dtype=torch.float32, device=device)
    return torch.cat(chunks)


def evaluate(model: nn.Module, split: Split, *, classes: list[str],
             batch_size: int | None = None) -> Evaluation:
    """Score `model` on a split (validation or test)."""
    logits = predict_logits(model, split.x, batch_size=batch_size)
    return evaluate_logits(logits, split.y, classes)


def evaluate_logits(logits: Tensor, labels: Tensor, classes: list[str]) -> Evaluation:
    """`evaluate_probabilities` of the softmax of `logits`, with the loss taken from the
    logits themselves: the same cross-entropy as the per-epoch figures (log-softmax in
    float32), not the log of clipped probabilities, so one model has one loss."""
    logits = logits.detach().float().cpu()
    labels = labels.detach().cpu()
    result = evaluate_probabilities(torch.softmax(logits, dim=1).numpy(), labels.numpy(),
                                    classes)
    if labels.numel():
        result.metrics["loss"] = float(cross_entropy_sum(logits, labels)) / labels.numel()
    return result


def evaluate_probabilities(probs: np.ndarray, labels: np.ndarray,
                           classes: list[str]) -> Evaluation:
    """The metrics, curves and confusion matrix of (N, K) class probabilities.

    Precision, recall and F1 are computed over all K classes with `zero_division=0`: a
    class never predicted has precision 0, a class absent from the labels recall 0 (and
    weight 0 in the weighted averages). AUC is one-vs-rest and defined only for a class
    that has both positives and negatives in `labels`; `auc_macro` averages the defined
    ones, and is absent, like `auc_<class>`, when none is defined.
    """
    probs = np.asarray(probs, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    k = len(classes)
    if probs.ndim != 2 or probs.shape[1] != k:
        raise ValueError(f"probabilities must have shape (N, {k}) for {k} classes, but got "
                         f"{probs.shape}")
    if probs.shape[0] != labels.shape[0]:
        raise ValueError(f"{probs.shape[0]} rows of probabilities but {labels.shape[0]} "
                         f"labels; they must match")
    if labels.size == 0:
        raise ValueError("cannot evaluate an empty split: no labels")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in [0, {k - 1}] for {k} classes, but got "
                         f"{labels.min()}..{labels.max()}")

    n = labels.shape[0]
    predictions = probs.argmax(axis=1)
    confusion = np.bincount(labels * k + predictions, minlength=k * k).reshape(k, k)
    picked = np.clip(probs[np.arange(n), labels].astype(np.float64), EPS, 1.0)
    metrics: dict[str, float] = {
        "accuracy": float((predictions == labels).mean()),
        "loss": float(-np.log(picked).mean()),
    }

    # -- precision, recall, F1: from the confusion matrix --------------------------------
    true_pos = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)  # images of each true class
    predicted = confusion.sum(axis=0).astype(np.float64)
    p = _ratio(true_pos, predicted)
    r = _ratio(true_pos, support)
    f = _ratio(2 * true_pos, support + predicted)
    for average, weights in (("macro", np.ones(k)), ("weighted", support)):
        for key, values in (("precision", p), ("recall", r), ("f1", f)):
            metrics[f"{key}_{average}"] = float(np.average(values, weights=weights))
    for index, name in enumerate(classes):
        metrics[f"precision_{name}"] = float(p[index])
        metrics[f"recall_{name}"] = float(r[index])
        metrics[f"f1_{name}"] = float(f[index])

    # -- ROC and AUC, one-vs-rest ----------------------------------------------------------
    roc: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    onehot = np.zeros((n, k), dtype=np.int8)
    onehot[np.arange(n), labels] = 1
    if k > 1:  # with one class there are no negatives, and no curve
        fpr, tpr = roc_curve(onehot.ravel(), probs.ravel())
        roc["micro"] = (fpr, tpr)
        metrics["auc_micro"] = area_under(fpr, tpr)

    per_class: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for index, name in enumerate(classes):
        positives = int(onehot[:, index].sum())
        if positives == 0 or positives == n:
            continue  # one-vs-rest AUC needs both positives and negatives
        fpr, tpr = roc_curve(onehot[:, index], probs[:, index])
        per_class[name] = (fpr, tpr)
        metrics[f"auc_{name}"] = area_under(fpr, tpr)
    if per_class:
        # Macro curve: every class's tpr interpolated on the union of their fprs, averaged
        # (the scikit-learn recipe); macro AUC is the mean of the per-class AUCs.
        grid = np.unique(np.concatenate([c[0] for c in per_class.values()]))
        mean_tpr = np.mean([np.interp(grid, c[0], c[1]) for c in per_class.values()], axis=0)
        roc["macro"] = (grid, mean_tpr)
        metrics["auc_macro"] = float(np.mean([metrics[f"auc_{name}"] for name in per_class]))
    roc.update(per_class)

    report: dict[str, Any] = {
        str(name): {"precision": float(p[i]), "recall": float(r[i]), "f1-score": float(f[i]),
                    "support": float(support[i])} for i, name in enumerate(classes)}
    report["accuracy"] = metrics["accuracy"]
    for average in ("macro", "weighted"):
        report[f"{average} avg"] = {"precision": metrics[f"precision_{average}"],
                                    "recall": metrics[f"recall_{average}"],
                                    "f1-score": metrics[f"f1_{average}"],
                                    "support": float(n)}
    return Evaluation(metrics=metrics, confusion=confusion.astype(np.int64), roc=roc,
                      report=report, probabilities=probs, labels=labels)


def roc_curve(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of binary `truth` ranked by `scores`: scikit-learn's `roc_curve` with
    `drop_intermediate=True` (points at tied scores merged, collinear points dropped, the
    curve starting at (0, 0)), in NumPy so that scoring a trial imports nothing more."""
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], truth[order].astype(np.float64)
    last_of_ties = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]
    tps = np.cumsum(hits)[last_of_ties]
    fps = 1 + last_of_ties - tps
    if len(fps) > 2:  # keep only the corners of the curve
        corners = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)),
                                       True])
        fps, tps = fps[corners], tps[corners]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    return fps / fps[-1], tps / tps[-1]


def area_under(x: np.ndarray, y: np.ndarray) -> float:
    """The trapezoidal area under a curve whose `x` never decreases (an ROC curve)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's `zero_division=0`)."""
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """`{"accuracy": 0.9}` with prefix "val" → `{"val_accuracy": 0.9}`."""
    return {f"{prefix}_{key}": value for key, value in metrics.items()}
