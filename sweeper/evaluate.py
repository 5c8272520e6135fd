"""Predictions → the numbers and curves a trial reports: accuracy, loss, precision, recall,
F1 (per class, macro, weighted), ROC curves and AUC (one-vs-rest, micro and macro) and the
confusion matrix.

The maths lives in `evaluate_probabilities`, which takes plain NumPy arrays, so that an
ensemble (averaged probabilities of several trials) is scored by exactly the same code as
one model. Every metric is a finite float: where a number is undefined (the AUC of a class
absent from the labels) it is left out rather than reported as NaN, which MLflow and
Optuna would both choke on.

scikit-learn is imported inside the functions: importing it costs about a second, which
`sweeper validate` and other quick commands should not pay.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from sweeper.train import cross_entropy_sum

if TYPE_CHECKING:
    from sweeper.data import Split

# For probabilities given as such (an ensemble's average), the loss is the cross-entropy of
# those probabilities, clipped to [EPS, 1] before the log: a confident wrong prediction
# costs -log(EPS) ≈ 27.6 instead of infinity. One model's loss comes from its logits
# (`evaluate`), exactly as during training.
EPS = 1e-12


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


def predict_proba(model: nn.Module, x: Tensor, *, batch_size: int = 2048) -> Tensor:
    """Softmax probabilities of `model` on `x`, float32 on the CPU (see `predict_logits`)."""
    return torch.softmax(predict_logits(model, x, batch_size=batch_size), dim=1)


def predict_logits(model: nn.Module, x: Tensor, *, batch_size: int = 2048) -> Tensor:
    """The raw class scores of `model` on `x`, float32 on the CPU.

    Eval mode and no grad; bf16 autocast on CUDA, as in training. Batches are moved to the
    model's device one at a time, so `x` may live on the CPU while the model is on a GPU.
    The results stay on the device until the end: one host transfer, not one per batch.
    The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size >= 1` must hold, but got batch_size={batch_size}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else x.device
    cuda = device.type == "cuda"
    autocast: contextlib.AbstractContextManager[object] = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    chunks: list[Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size].to(device, non_blocking=True)
                if cuda and xb.dim() == 4:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with autocast:
                    logits = model(xb)
                chunks.append(logits.float())
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty((0, 0), dtype=torch.float32)
    return torch.cat(chunks).cpu()


def evaluate(model: nn.Module, split: Split, *, classes: list[str],
             batch_size: int = 2048) -> Evaluation:
    """Score `model` on a split (validation or test)."""
    logits = predict_logits(model, split.x, batch_size=batch_size)
    labels = split.y.detach().cpu()
    result = evaluate_probabilities(torch.softmax(logits, dim=1).numpy(), labels.numpy(),
                                    classes)
    # The same cross-entropy as the per-epoch figures (log-softmax of the logits in float32),
    # not the log of clipped probabilities: one definition of a model's loss.
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
    from sklearn.metrics import (
        auc,
        classification_report,
        precision_recall_fscore_support,
        roc_curve,
    )

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

    # -- precision, recall, F1 -----------------------------------------------------------
    everyone = list(range(k))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            labels, predictions, labels=everyone, average=average, zero_division=0)
        metrics[f"precision_{average}"] = float(p)
        metrics[f"recall_{average}"] = float(r)
        metrics[f"f1_{average}"] = float(f)
    p, r, f, _ = precision_recall_fscore_support(
        labels, predictions, labels=everyone, average=None, zero_division=0)
    for index, name in enumerate(classes):
        metrics[f"precision_{name}"] = float(p[index])
        metrics[f"recall_{name}"] = float(r[index])
        metrics[f"f1_{name}"] = float(f[index])

    # -- ROC and AUC, one-vs-rest ----------------------------------------------------------
    roc: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    onehot = np.zeros((n, k), dtype=np.int8)
    onehot[np.arange(n), labels] = 1
    if k > 1:  # with one class there are no negatives, and no curve
        fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
        roc["micro"] = (fpr, tpr)
        metrics["auc_micro"] = float(auc(fpr, tpr))

    per_class: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for index, name in enumerate(classes):
        positives = int(onehot[:, index].sum())
        if positives == 0 or positives == n:
            continue  # one-vs-rest AUC needs both positives and negatives
        fpr, tpr, _ = roc_curve(onehot[:, index], probs[:, index])
        per_class[name] = (fpr, tpr)
        metrics[f"auc_{name}"] = float(auc(fpr, tpr))
    if per_class:
        # Macro curve: every class's tpr interpolated on the union of their fprs, averaged
        # (the scikit-learn recipe); macro AUC is the mean of the per-class AUCs.
        grid = np.unique(np.concatenate([c[0] for c in per_class.values()]))
        mean_tpr = np.mean([np.interp(grid, c[0], c[1]) for c in per_class.values()], axis=0)
        roc["macro"] = (grid, mean_tpr)
        metrics["auc_macro"] = float(np.mean([metrics[f"auc_{name}"] for name in per_class]))
    roc.update(per_class)

    report = classification_report(labels, predictions, labels=everyone,
                                   target_names=[str(c) for c in classes], output_dict=True,
                                   zero_division=0)
    return Evaluation(metrics=metrics, confusion=confusion.astype(np.int64), roc=roc,
                      report=report, probabilities=probs, labels=labels)


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """`{"accuracy": 0.9}` with prefix "val" → `{"val_accuracy": 0.9}`."""
    return {f"{prefix}_{key}": value for key, value in metrics.items()}
