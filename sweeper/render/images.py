"""A trial's figures as small static PNG images: training history, confusion matrix per
split, test ROC curves.

A trial run gets pictures to glance at, tens of kilobytes each; the interactive plotly
pages (`sweeper.render.plots`, which embeds plotly.js, about 2 MB a page) are for the study:
the parent run's figures and `sweeper report`. Drawn with matplotlib's object API (a
`Figure` with the Agg canvas, no pyplot), which keeps no global state, so the tracker's
background thread can draw while the next trial trains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.render.plots import (  # plotly itself is not imported by this
    confusion_shares,
    thin_curve,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 80
ANNOTATE_MAX_CLASSES = 20  # counts written in the confusion matrix's cells up to this


def write_trial_images(folder: Path, history: Sequence[Mapping[str, float]],
                       evaluations: Mapping[str, Any], classes: Sequence[str]) -> list[Path]:
    """Write history.png, confusion_matrix_<split>.png and roc_test.png into `folder`.

    `evaluations` maps a split name to an object with `confusion`, `roc` and `metrics`
    (duck-typed: `sweeper.ml.metrics.Evaluation`). Returns the files written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=DPI)
        written.append(path)

    if history:
        save(history_image(history), "history")
    for split, ev in evaluations.items():
        save(confusion_image(ev.confusion, classes, title=f"Confusion matrix ({split})"),
             f"confusion_matrix_{split}")
    test = evaluations.get("test")
    if test is not None and test.roc:
        save(roc_image(test.roc, test.metrics, title="ROC curves (test)"), "roc_test")
    return written


def history_image(history: Sequence[Mapping[str, float]]) -> Figure:
    """Loss and accuracy per epoch, training beside validation."""
    fig = _figure(8, 3.2)
    epochs = [int(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    for index, metric in enumerate(("loss", "accuracy"), 1):
        ax = fig.add_subplot(1, 2, index)
        for split in ("train", "val"):
            values = [h.get(f"{split}_{metric}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o",
                        label=split)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_image(confusion: Any, classes: Sequence[str], *, title: str) -> Figure:
    """Counts (rows: true class, columns: predicted), coloured by the share of the row."""
    counts, shares = confusion_shares(confusion, classes)
    k = len(classes)
    side = min(12.0, 2.5 + 0.4 * k)
    fig = _figure(side + 1, side)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(k)
    names = [str(c) for c in classes]
    ax.set_xticks(ticks, names, rotation=90 if k > 10 else 0)
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= ANNOTATE_MAX_CLASSES:
        for i in range(k):
            for j in range(k):
                # in_layout=False: the cells lie inside the axes, and measuring a hundred
                # texts made tight_layout the slowest step of a trial's figures.
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] > 0.5 else "black", in_layout=False)
    fig.tight_layout()
    return fig


def roc_image(roc: Mapping[str, tuple[np.ndarray, np.ndarray]],
              metrics: Mapping[str, float], *, title: str) -> Figure:
    """ROC curves, the micro and macro averages drawn thicker, AUC in the legend."""
    fig = _figure(5.5, 5)
    ax = fig.add_subplot(1, 1, 1)
    order = [n for n in ("micro", "macro") if n in roc] + [
        n for n in roc if n not in ("micro", "macro")]
    for name in order:
        fpr, tpr = thin_curve(*roc[name])
        auc = metrics.get(f"auc_{name}")
        label = f"{name} (AUC {auc:.3f})" if auc is not None else name
        ax.plot(fpr, tpr, label=label, linewidth=2.5 if name in ("micro", "macro") else 1,
                linestyle=":" if name == "macro" else "-")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig

