"""Plotly figures of one trial (training history, confusion matrix, ROC) and of a whole study
(Optuna's optimization history, importances, parallel coordinates, slice, contour, Pareto
front), and self-contained HTML pages that show them without a network.

Why the HTML is written here rather than with `fig.write_html`: the MLflow UI shows an
`.html` artifact in a sandboxed iframe loaded from a `blob:` URL, so a page can neither
load plotly.js from the tracking server (relative URLs do not resolve, artifacts are sent
as `nosniff` attachments) nor, offline, from a CDN. The only page that renders everywhere
carries plotly.js itself, and plotly.min.js is 4.8 MB. `html_page` therefore embeds it
gzip-compressed and base64-encoded (about 2.0 MB) and unpacks it in the browser with the
standard `DecompressionStream` (every current browser), then draws all the page's figures:
one such page per trial holds all of that trial's figures (about 2 MB a trial, instead of
4.8 MB a figure).

No mlflow and no torch here (`tests/test_boundaries.py`): inputs are NumPy arrays, lists
and Optuna studies, so the figures can be built and tested anywhere.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import html
import json
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go

log = logging.getLogger(__name__)

# A ROC curve of N test images has up to N points (100k for the micro curve of MNIST's
# 10 classes); this many are plenty on screen and keep a page's JSON small.
ROC_MAX_POINTS = 400
# Above this many classes, confusion-matrix cells carry no printed numbers (hover only).
ANNOTATE_MAX_CLASSES = 20
# Contour plots are a params x params grid of subplots: keep the most important few.
CONTOUR_MAX_PARAMS = 4


# --------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------
def history_figure(history: Sequence[Mapping[str, float]]) -> go.Figure:
    """Loss and accuracy per epoch, training beside validation (two panels)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    epochs = [int(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    colors = {"train": "#1f77b4", "val": "#ff7f0e"}
    for col, metric in ((1, "loss"), (2, "accuracy")):
        for split in ("train", "val"):
            key = f"{split}_{metric}"
            values = [h.get(key) for h in history]
            if all(v is None for v in values):
                continue
            fig.add_trace(go.Scatter(x=epochs, y=values, mode="lines+markers", name=split,
                                     legendgroup=split, showlegend=col == 1,
                                     line={"color": colors[split]}),
                          row=1, col=col)
        fig.update_xaxes(title_text="epoch", dtick=1 if len(epochs) <= 20 else None,
                         row=1, col=col)
    fig.update_layout(title="Training history", height=420, margin={"t": 80})
    return fig


def histories_figure(histories: Mapping[str, Sequence[Mapping[str, float]]]) -> go.Figure:
    """Several trials' training histories overlaid (a one-factor grid study at a glance):
    loss and accuracy per epoch, one colour per trial, validation solid, training dashed."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    palette = qualitative.Plotly
    for index, (label, history) in enumerate(histories.items()):
        color = palette[index % len(palette)]
        epochs = [int(h.get("epoch", i + 1)) for i, h in enumerate(history)]
        for col, metric in ((1, "loss"), (2, "accuracy")):
            for split, dash in (("val", "solid"), ("train", "dash")):
                values = [h.get(f"{split}_{metric}") for h in history]
                if all(v is None for v in values):
                    continue
                fig.add_trace(go.Scatter(
                    x=epochs, y=values, mode="lines+markers", name=f"{label} ({split})",
                    legendgroup=label, showlegend=col == 2,
                    line={"color": color, "dash": dash}), row=1, col=col)
            fig.update_xaxes(title_text="epoch", row=1, col=col)
    fig.update_layout(title="Training histories of the trials (validation solid, training "
                            "dashed)", height=480, margin={"t": 80})
    return fig


def confusion_shares(confusion: np.ndarray | Sequence[Sequence[int]], classes: Sequence[str]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A confusion matrix's counts (K, K) and each count's share of its true class (a row
    with no images: zeros), for the interactive and the static figure alike."""
    counts = np.asarray(confusion, dtype=np.int64)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"a confusion matrix for {k} classes must have shape ({k}, {k}), "
                         f"but got {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64),
                       where=totals > 0)
    return counts, shares


def confusion_figure(confusion: np.ndarray | Sequence[Sequence[int]], classes: Sequence[str],
                     *, title: str = "Confusion matrix") -> go.Figure:
    """A heatmap of counts (rows: true class, columns: predicted), coloured by the share
    of each true class, so that a rare class's mistakes are as visible as a common one's."""
    import plotly.graph_objects as go

    counts, shares = confusion_shares(confusion, classes)
    k = len(classes)
    names = [str(c) for c in classes]
    heatmap = go.Heatmap(
        z=shares, x=names, y=names, customdata=counts, colorscale="Blues", zmin=0, zmax=1,
        colorbar={"title": "share of row"},
        hovertemplate="true %{y}<br>predicted %{x}<br>%{customdata} images "
                      "(%{z:.1%} of the true class)<extra></extra>")
    if k <= ANNOTATE_MAX_CLASSES:
        heatmap.update(text=counts, texttemplate="%{text}")
    fig = go.Figure(heatmap)
    fig.update_layout(title=title, xaxis={"title": "predicted", "type": "category"},
                      yaxis={"title": "true", "type": "category", "autorange": "reversed"},
                      height=max(420, 28 * k + 160))
    return fig


def roc_figure(roc: Mapping[str, tuple[np.ndarray, np.ndarray]],
               aucs: Mapping[str, float], *, title: str = "ROC curves (one-vs-rest)"
               ) -> go.Figure:
    """ROC curves, micro and macro averages first and drawn thicker, AUC in each legend
    entry. Curves are thinned to `ROC_MAX_POINTS` points."""
    import plotly.graph_objects as go

    fig = go.Figure()
    order = [n for n in ("micro", "macro") if n in roc] + [
        n for n in roc if n not in ("micro", "macro")]
    for name in order:
        fpr, tpr = thin_curve(*roc[name])
        auc = aucs.get(name)
        label = f"{name} (AUC {auc:.3f})" if auc is not None and math.isfinite(auc) else name
        average = name in ("micro", "macro")
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=label,
                                 line={"width": 3 if average else 1.5,
                                       "dash": "dot" if name == "macro" else None}))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                             line={"color": "grey", "dash": "dash", "width": 1}))
    fig.update_layout(title=title, xaxis={"title": "false positive rate", "range": [0, 1]},
                      yaxis={"title": "true positive rate", "range": [0, 1.02]}, height=520)
    return fig


def thin_curve(fpr: np.ndarray, tpr: np.ndarray, max_points: int = ROC_MAX_POINTS
                ) -> tuple[np.ndarray, np.ndarray]:
    """At most ~`max_points` points of a ROC curve, dense near fpr=0 where curves differ."""
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    if fpr.size <= max_points:
        return fpr, tpr
    half = max_points // 2
    grid = np.unique(np.concatenate([np.linspace(0.0, 1.0, half),
                                     np.geomspace(1e-4, 1.0, half), [0.0, 1.0]]))
    grid = grid[(grid >= fpr[0]) & (grid <= fpr[-1])]
    return grid, np.interp(grid, fpr, tpr)


def write_roc_csv(path: str | Path, roc: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  metrics: Mapping[str, float]) -> Path:
    """ROC curves as a table (`curve,fpr,tpr,auc`), thinned like the figure: what a report
    redraws without the model or the data."""
    import csv

    target = Path(path)
    with target.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["curve", "fpr", "tpr", "auc"])
        for name, (fpr, tpr) in roc.items():
            auc = metrics.get(f"auc_{name}", float("nan"))
            for x, y in zip(*thin_curve(fpr, tpr), strict=True):
                writer.writerow([name, f"{x:.6g}", f"{y:.6g}", f"{auc:.6g}"])
    return target


def read_roc_csv(path: str | Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                                           dict[str, float]]:
    """What `write_roc_csv` wrote: (curves, AUC by curve name)."""
    import csv

    points: dict[str, tuple[list[float], list[float]]] = {}
    aucs: dict[str, float] = {}
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            xs, ys = points.setdefault(row["curve"], ([], []))
            xs.append(float(row["fpr"]))
            ys.append(float(row["tpr"]))
            aucs[row["curve"]] = float(row["auc"])
    curves = {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in points.items()}
    return curves, {k: v for k, v in aucs.items() if math.isfinite(v)}


# --------------------------------------------------------------------------------------
# A whole study
# --------------------------------------------------------------------------------------
def study_figures(study: optuna.Study, *, objective_names: Sequence[str] | None = None
                  ) -> dict[str, go.Figure]:
    """Optuna's figures for `study`, by file-friendly name; what cannot be drawn is left out.

    Single objective: optimization_history, param_importances (needs two complete trials
    that differ), parallel_coordinate, slice, contour (two or more parameters; the
    `CONTOUR_MAX_PARAMS` most important), and intermediate_values when trials reported
    epochs. Several objectives: pareto_front (two or three objectives), and the history,
    importances, parallel coordinates and slice of each objective (`<name>_<objective>`).
    A figure that Optuna refuses (too few trials, one distinct value) is skipped with a
    debug message: a study's figures must never fail a sweep.
    """
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return {}
    n_objectives = len(study.directions)
    names = list(objective_names or [])
    if len(names) != n_objectives:
        names = (["objective"] if n_objectives == 1
                 else [f"objective_{i}" for i in range(n_objectives)])
    params = sorted({p for t in complete for p in t.params})
    figures: dict[str, go.Figure] = {}

    def attempt(name: str, build: Any, *args: Any, **kwargs: Any) -> None:
        try:
            with warnings.catch_warnings(), _optuna_quiet():
                warnings.simplefilter("ignore")
                figures[name] = build(*args, **kwargs)
        except Exception as exc:  # optuna raises ValueError/RuntimeError for thin data
            log.debug("study figure %s skipped: %s", name, exc)

    v = _visualization()
    if n_objectives == 1:
        target: dict[str, Any] = {"target_name": names[0]}
        attempt("optimization_history", v.plot_optimization_history, study, **target)
        importances = _importances(study, None) if len(complete) >= 2 else {}
        if importances:
            attempt("param_importances", v.plot_param_importances, study, **target)
        if params:
            attempt("parallel_coordinate", v.plot_parallel_coordinate, study, **target)
            attempt("slice", v.plot_slice, study, **target)
        if len(params) >= 2:
            top = sorted(params, key=lambda p: -importances.get(p, 0.0))[:CONTOUR_MAX_PARAMS]
            attempt("contour", v.plot_contour, study, params=sorted(top), **target)
        if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            attempt("intermediate_values", v.plot_intermediate_values, study)
        return figures

    if n_objectives in (2, 3):
        attempt("pareto_front", v.plot_pareto_front, study, target_names=names)
    for index, objective in enumerate(names):
        target = {"target": _objective(index), "target_name": objective}
        attempt(f"optimization_history_{objective}", v.plot_optimization_history, study,
                **target)
        if len(complete) >= 2:
            attempt(f"param_importances_{objective}", v.plot_param_importances, study,
                    **target)
        if params:
            attempt(f"parallel_coordinate_{objective}", v.plot_parallel_coordinate, study,
                    **target)
            attempt(f"slice_{objective}", v.plot_slice, study, **target)
    return figures


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Optuna logs (not warns) about thin data, e.g. "Param x unique value length is less
    than 2", once per figure: the figure is simply drawn with what there is."""
    import optuna

    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def _visualization() -> Any:
    import optuna.visualization

    return optuna.visualization


def _objective(index: int) -> Any:
    def value(trial: optuna.trial.FrozenTrial) -> float:
        return float(trial.values[index])

    return value


def _importances(study: optuna.Study, target: Any) -> dict[str, float]:
    """Parameter importances, or {} when Optuna cannot compute them."""
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, target=target))
    except Exception as exc:
        log.debug("parameter importances unavailable: %s", exc)
        return {}


def architecture_figure(rows: Sequence[tuple[str, str, float | None]], *,
                        objective: str) -> go.Figure:
    """How each architecture fared: the objective of its complete trials as a box with
    every trial drawn, and how many of its trials completed, in the axis label.

    `rows` holds (architecture, trial state, objective value or None) per trial."""
    import plotly.graph_objects as go

    archs = sorted({arch for arch, _, _ in rows})
    fig = go.Figure()
    for arch in archs:
        values = [v for a, state, v in rows
                  if a == arch and state == "COMPLETE" and v is not None and math.isfinite(v)]
        total = sum(1 for a, _, _ in rows if a == arch)
        fig.add_trace(go.Box(y=values, name=f"{arch} ({len(values)}/{total} complete)",
                             boxpoints="all", jitter=0.4, pointpos=0, boxmean=True))
    fig.update_layout(title=f"{objective} by architecture", yaxis={"title": objective},
                      showlegend=False, height=460)
    return fig


# --------------------------------------------------------------------------------------
# Self-contained HTML
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _plotly_js_gzip_b64() -> str:
    """plotly.min.js of the installed plotly, gzip-compressed and base64-encoded (once)."""
    from plotly.offline import get_plotlyjs

    compressed = gzip.compress(get_plotlyjs().encode("utf-8"), compresslevel=9, mtime=0)
    return base64.b64encode(compressed).decode("ascii")


_LOADER = """
(async () => {
  const figures = JSON.parse(document.getElementById("sweeper-figures").textContent);
  if (typeof Plotly === "undefined") {
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser cannot unpack the embedded plotly.js " +
                      "(no DecompressionStream); open the page in a current browser");
    }
    const packed = document.getElementById("sweeper-plotlyjs").textContent.trim();
    const bytes = Uint8Array.from(atob(packed), (c) => c.charCodeAt(0));
    // Feed and drain the stream by hand: `new Response(stream).text()` did not settle in a
    // sandboxed blob: iframe under headless Chromium 156; this form renders there and in
    // the MLflow 3.17 UI's artifact view.
    const unpack = new DecompressionStream("gzip");
    const writer = unpack.writable.getWriter();
    writer.write(bytes).catch(() => {});  // a corrupt payload fails the read below
    writer.close().catch(() => {});
    const reader = unpack.readable.getReader();
    const decoder = new TextDecoder();
    let code = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      code += decoder.decode(value, {stream: true});
    }
    code += decoder.decode();
    const script = document.createElement("script");
    script.textContent = code;
    document.head.appendChild(script);
  }
  for (const [id, figure] of Object.entries(figures)) {
    await Plotly.newPlot(id, figure.data, figure.layout,
                         {responsive: true, displaylogo: false});
  }
})().catch((error) => {
  const note = document.createElement("pre");
  note.textContent = "figures could not be drawn: " + error;
  document.body.prepend(note);
});
"""


def html_page(figures: Mapping[str, go.Figure], *, title: str, intro: str = "") -> str:
    """One HTML page that draws `figures` (name → figure, in order) with no network access.

    plotly.js is embedded once, compressed (see the module docstring); the figures are
    embedded as JSON. Opens from the MLflow UI's artifact view and from a local file alike.
    `intro` is HTML shown above the figures (the caller escapes what it puts in).
    """
    import plotly.io

    sections = []
    data: dict[str, Any] = {}
    for index, (name, fig) in enumerate(figures.items()):
        div = f"figure-{index}"
        data[div] = json.loads(plotly.io.to_json(fig, validate=False))
        sections.append(f'<section><h2 id="{html.escape(name)}">{html.escape(name)}</h2>'
                        f'<div id="{div}" class="figure"></div></section>')
    nav = " · ".join(f'<a href="#{html.escape(n)}">{html.escape(n)}</a>' for n in figures)
    # Inside <script>, "</" would end the element early: escape it in the JSON.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>\n"
        "<style>body{font-family:system-ui,sans-serif;margin:0 16px}"
        "h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}"
        ".figure{width:100%;min-height:420px}"
        "table.summary{border-collapse:collapse;margin:8px 0}"
        "table.summary td,table.summary th{border:1px solid #ddd;padding:3px 8px;"
        "text-align:left}</style></head>\n<body>"
        f"<h1>{html.escape(title)}</h1>{intro}<nav>{nav}</nav>\n"
        f"{''.join(sections)}\n"
        f'<script id="sweeper-figures" type="application/json">{payload}</script>\n'
        '<script id="sweeper-plotlyjs" type="application/octet-stream">'
        f"{_plotly_js_gzip_b64()}</script>\n"
        f"<script>{_LOADER}</script>\n</body></html>\n"
    )


def write_page(path: str | Path, figures: Mapping[str, go.Figure], *, title: str,
               intro: str = "") -> Path:
    """Write `html_page(figures)` to `path` (parents created); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(html_page(figures, title=title, intro=intro), encoding="utf-8")
    return target


def trial_figures(history: Sequence[Mapping[str, float]], evaluations: Mapping[str, Any],
                  classes: Sequence[str]) -> dict[str, go.Figure]:
    """The figures of one trial: history, confusion matrix per split, test ROC.

    `evaluations` maps a split name to an object with `confusion`, `roc` and `metrics`
    (duck-typed: `sweeper.ml.metrics.Evaluation`, which this module need not import).
    """
    figures: dict[str, go.Figure] = {}
    if history:
        figures["history"] = history_figure(history)
    for split, ev in evaluations.items():
        figures[f"confusion_matrix_{split}"] = confusion_figure(
            ev.confusion, classes, title=f"Confusion matrix ({split})")
    test = evaluations.get("test")
    if test is not None and test.roc:
        aucs = {name: test.metrics[f"auc_{name}"] for name in test.roc
                if f"auc_{name}" in test.metrics}
        figures["roc_test"] = roc_figure(test.roc, aucs, title="ROC curves (test)")
    return figures
