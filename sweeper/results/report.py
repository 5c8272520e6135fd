"""`sweeper report`: one self-contained interactive page about a study.

How the search went (optimization history, parameter importances, parallel coordinates),
how each architecture fared, and the best trial in depth (training history, confusion
matrix and ROC curves on the test split). The study figures come from the Optuna storage;
the best trial's come from its MLflow run (its per-epoch metrics and the tables it
logged), so the page needs neither the data nor the model. What cannot be drawn (too few
trials, a run without tracking) is left out and said in `ReportSummary.notes`.
"""

from __future__ import annotations

import html
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper.errors import SweeperError
from sweeper.keys import ATTR_CONFIG, study_spec, trial_record
from sweeper.render import plots
from sweeper.render.formats import fmt_value
from sweeper.results.read import TrialResult, best_trials, load_study, objective_names

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go

    from sweeper.tracking.reader import TrackingReader

# The study figures a report shows, in order (multi-objective studies: per objective).
STUDY_FIGURES = ("pareto_front", "optimization_history", "param_importances",
                 "parallel_coordinate")


@dataclass
class ReportSummary:
    path: Path
    figures: list[str]
    best: TrialResult
    notes: list[str] = field(default_factory=list)  # what was left out, and why


def build_report(study: str, output: str | Path, *, storage: str | None = None,
                 tracking_uri: str | None = None) -> ReportSummary:
    """Write the report of `study` to `output` (an .html file) and say what it holds."""
    optuna_study = load_study(study, storage)
    best = best_trials(optuna_study, top=1, tracking_uri=tracking_uri)[0]
    names = objective_names(study_spec(optuna_study),
                            len(optuna_study.directions))
    notes: list[str] = []
    figures: dict[str, go.Figure] = {}
    for name, figure in plots.study_figures(optuna_study, objective_names=names).items():
        if name.startswith(STUDY_FIGURES):
            figures[name] = figure
    for wanted in ("optimization_history", "param_importances", "parallel_coordinate"):
        if not any(n.startswith(wanted) for n in figures):
            notes.append(f"{wanted.replace('_', ' ')}: not enough complete trials that "
                         f"differ to draw it")
    figures["architectures"] = plots.architecture_figure(_arch_rows(optuna_study),
                                                         objective=names[0])
    figures.update(_trial_histories(optuna_study, tracking_uri, notes))
    figures.update(_best_trial_figures(best, tracking_uri, notes))
    target = Path(output)
    plots.write_page(target, figures, title=f"sweeper report: {optuna_study.study_name}",
                     intro=_intro(optuna_study, best, names))
    return ReportSummary(target, list(figures), best, notes)


# Up to this many completed trials, their training histories are overlaid in one figure
# (a grid study's one-factor comparison); beyond it the figure would be unreadable.
MAX_OVERLAID = 12


def _trial_histories(study: optuna.Study, tracking_uri: str | None,
                     notes: list[str]) -> dict[str, go.Figure]:
    from sweeper.results.read import trial_results
    from sweeper.tracking.reader import TrackingReader

    done = [t for t in trial_results(study, tracking_uri=tracking_uri)
            if t.state == "COMPLETE" and t.run_id]
    if not 2 <= len(done) <= MAX_OVERLAID:
        return {}
    reader = TrackingReader(tracking_uri)
    histories: dict[str, list[dict[str, float]]] = {}
    try:
        for trial in done:
            assert trial.run_id is not None
            label = f"#{trial.number} " + ", ".join(
                f"{k.split('.')[-1]}={v}" for k, v in trial.params.items())
            history = reader.history(trial.run_id)
            if history:
                histories[label] = history
    except SweeperError as exc:
        notes.append(f"trial histories: {exc}")
        return {}
    return {"trial_histories": plots.histories_figure(histories)} if histories else {}


def _arch_rows(study: optuna.Study) -> list[tuple[str, str, float | None]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if not trial.state.is_finished():
            continue
        arch = trial_record(trial, ATTR_CONFIG).get("model.arch", "?")
        value = trial.values[0] if trial.values else None
        rows.append((str(arch), trial.state.name, value))
    return rows


def _best_trial_figures(best: TrialResult, tracking_uri: str | None,
                        notes: list[str]) -> dict[str, go.Figure]:
    """Training history, confusion matrix and ROC of the best trial, from its run."""
    from sweeper.tracking.reader import TrackingReader

    if best.run_id is None:
        notes.append(f"best trial #{best.number}: no MLflow run (tracking was off), so no "
                     f"training history, confusion matrix or ROC curves")
        return {}
    reader = TrackingReader(tracking_uri)
    figures: dict[str, go.Figure] = {}
    try:
        history = reader.history(best.run_id)
        if history:
            figures["best_trial_history"] = plots.history_figure(history)
        with tempfile.TemporaryDirectory(prefix="sweeper-report-") as tmp:
            figures.update(_tables(reader, best, Path(tmp), notes))
    except SweeperError as exc:
        notes.append(f"best trial #{best.number}: {exc}")
    return figures


def _tables(reader: TrackingReader, best: TrialResult, tmp: Path,
            notes: list[str]) -> dict[str, go.Figure]:
    import csv

    assert best.run_id is not None
    figures: dict[str, go.Figure] = {}
    confusion = reader.download(best.run_id, "tables/confusion_matrix_test.csv", tmp)
    if confusion is not None:
        with confusion.open(newline="") as f:
            header, *rows = list(csv.reader(f))
        classes = header[1:]
        counts = [[int(v) for v in row[1:]] for row in rows]
        figures["best_trial_confusion_matrix"] = plots.confusion_figure(
            counts, classes, title=f"Confusion matrix (test), trial #{best.number}")
    else:
        notes.append(f"best trial #{best.number}: its run has no confusion matrix table")
    roc = reader.download(best.run_id, "tables/roc_test.csv", tmp)
    if roc is not None:
        curves, aucs = plots.read_roc_csv(roc)
        figures["best_trial_roc"] = plots.roc_figure(
            curves, aucs, title=f"ROC curves (test), trial #{best.number}")
    else:
        notes.append(f"best trial #{best.number}: its run has no ROC table (logged by an "
                     f"older sweeper)")
    return figures


def _intro(study: optuna.Study, best: TrialResult, names: list[str]) -> str:
    """A summary table: the study, its trials by state, the best trial and its metrics."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    values = ", ".join(f"{n}={fmt_value(v)}" for n, v in
                       zip(names, best.values or [], strict=False))
    rows: list[tuple[str, Any]] = [
        ("trials", ", ".join(f"{n} {s.lower()}" for s, n in counts.items())),
        ("best trial", f"#{best.number}: {values}"),
        ("params", ", ".join(f"{k}={fmt_value(v) if isinstance(v, float) else v}"
                             for k, v in best.params.items()) or "-"),
        ("test", ", ".join(f"{k.removeprefix('test_')}={fmt_value(v)}"
                           for k, v in best.metrics.items() if k.startswith("test_"))),
        ("MLflow run", best.run_url or best.run_id or "-"),
        ("model", best.model_uri or "-"),
    ]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in rows)
    return f'<table class="summary">{cells}</table>'
