"""Figures from small inputs, study figures from a tiny in-memory Optuna study, and the
self-contained HTML page (its embedded plotly.js unpacks to the real one)."""

from __future__ import annotations

import base64
import gzip
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from sweeper.render import plots

HISTORY = [
    {"epoch": 1, "train_loss": 1.2, "train_accuracy": 0.5, "val_loss": 1.0,
     "val_accuracy": 0.6, "lr": 1e-3},
    {"epoch": 2, "train_loss": 0.7, "train_accuracy": 0.8, "val_loss": 0.8,
     "val_accuracy": 0.7, "lr": 1e-3},
]


def test_history_figure_has_train_and_val_per_panel() -> None:
    fig = plots.history_figure(HISTORY)
    names = [(t.name, t.xaxis) for t in fig.data]
    assert names == [("train", "x"), ("val", "x"), ("train", "x2"), ("val", "x2")]
    assert list(fig.data[1].y) == [1.0, 0.8]  # val loss


def test_confusion_figure_counts_and_row_shares() -> None:
    confusion = np.array([[8, 2, 0], [0, 0, 0], [1, 1, 3]])
    fig = plots.confusion_figure(confusion, ["a", "b", "c"], title="val")
    heatmap = fig.data[0]
    assert np.asarray(heatmap.customdata).tolist() == confusion.tolist()
    shares = np.asarray(heatmap.z)
    assert shares[0].tolist() == pytest.approx([0.8, 0.2, 0.0])
    assert shares[1].tolist() == [0.0, 0.0, 0.0], "an absent class divides by nothing"
    assert list(heatmap.x) == ["a", "b", "c"] and fig.layout.title.text == "val"
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        plots.confusion_figure(confusion, ["a", "b"])


def test_roc_figure_orders_averages_first_and_thins_long_curves() -> None:
    fpr = np.linspace(0, 1, 50_000)
    roc = {"cat": (fpr, np.sqrt(fpr)), "micro": (fpr, fpr ** 0.3), "macro": (fpr, fpr ** 0.4)}
    fig = plots.roc_figure(roc, {"micro": 0.9, "cat": 0.75})
    labels = [t.name for t in fig.data]
    assert labels == ["micro (AUC 0.900)", "macro", "cat (AUC 0.750)", "chance"]
    assert len(fig.data[0].x) <= plots.ROC_MAX_POINTS + 2
    assert fig.data[0].x[0] == 0.0 and fig.data[0].x[-1] == 1.0


def test_trial_figures_from_evaluations() -> None:
    ev = SimpleNamespace(confusion=np.eye(2, dtype=int) * 5,
                         roc={"micro": (np.array([0.0, 1.0]), np.array([0.0, 1.0]))},
                         metrics={"auc_micro": 0.5})
    figures = plots.trial_figures(HISTORY, {"val": ev, "test": ev}, ["x", "y"])
    assert list(figures) == ["history", "confusion_matrix_val", "confusion_matrix_test",
                             "roc_test"]


def _tiny_study(directions: list[str], n_trials: int, params: int = 2) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=directions,
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        x = trial.suggest_float("train.lr", 1e-4, 1e-1, log=True)
        y = trial.suggest_categorical("model.arch", ["mlp", "cnn"]) if params > 1 else "mlp"
        if len(directions) == 1:
            trial.report(x, 1)
        value = x * (2 if y == "cnn" else 1)
        return value if len(directions) == 1 else (value, 1 / value)

    study.optimize(objective, n_trials=n_trials)
    return study


def test_study_figures_single_objective() -> None:
    figures = plots.study_figures(_tiny_study(["maximize"], 6), objective_names=["val_acc"])
    assert {"optimization_history", "param_importances", "parallel_coordinate", "slice",
            "contour", "intermediate_values"} <= set(figures)


def test_study_figures_are_robust_to_too_few_trials() -> None:
    assert plots.study_figures(optuna.create_study()) == {}
    one = plots.study_figures(_tiny_study(["minimize"], 1, params=1))
    assert "optimization_history" in one
    assert "param_importances" not in one and "contour" not in one


def test_study_figures_multi_objective_has_pareto_front() -> None:
    figures = plots.study_figures(_tiny_study(["maximize", "minimize"], 5),
                                  objective_names=["val_accuracy", "train_seconds"])
    assert "pareto_front" in figures
    assert "optimization_history_val_accuracy" in figures
    assert "optimization_history_train_seconds" in figures


def test_html_page_is_self_contained(tmp_path: Path) -> None:
    from plotly.offline import get_plotlyjs

    path = plots.write_page(tmp_path / "sub" / "page.html",
                            {"history": plots.history_figure(HISTORY),
                             "a</script>b": plots.history_figure(HISTORY)}, title="t <x>")
    page = path.read_text()
    assert "cdn.plot.ly" not in page and "<script src" not in page, "no network needed"
    assert "t &lt;x&gt;" in page
    packed = re.search(r'id="sweeper-plotlyjs"[^>]*>([^<]+)</script>', page)
    assert packed is not None
    assert gzip.decompress(base64.b64decode(packed.group(1))).decode() == get_plotlyjs()
    payload = re.search(r'id="sweeper-figures"[^>]*>(.*?)</script>', page, re.S)
    assert payload is not None
    figures = json.loads(payload.group(1))
    assert list(figures) == ["figure-0", "figure-1"]
    assert len(page) < 2.5e6, "compressed plotly.js: about 2 MB, not 4.8 MB"
