"""What the read commands print: tables for people, JSON lines and CSV for programs.

`sweeper studies`, `trials`, `best`, `evaluate` and `ensemble` render here; the numbers
come from `sweeper.results.read` and `sweeper.results.scoring`. JSON output is one object per line
(one per study or trial), so `sweeper best STUDY --json | jq .params` works for one
trial and many alike.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from sweeper.render.formats import STATE_STYLE, fmt_params, fmt_seconds, fmt_value

if TYPE_CHECKING:
    from sweeper.results.read import StudySummary, TrialResult
    from sweeper.results.scoring import EnsembleScore, TrialScore


def json_lines(items: Sequence[Any]) -> str:
    """One compact JSON object per item (`as_dict()`), one per line."""
    return "\n".join(json.dumps(item.as_dict(), default=str) for item in items)


# --------------------------------------------------------------------------------------
# Studies
# --------------------------------------------------------------------------------------
def studies_table(summaries: Sequence[StudySummary], where: str) -> Table:
    table = Table(title=f"studies in {where}", title_justify="left")
    for column, justify in (("study", "left"), ("objective", "left"), ("trials", "right"),
                            ("by state", "left"), ("best", "left"),
                            ("last activity", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for s in summaries:
        objective = ", ".join(f"{n} ({d[:3]})" for n, d in
                              zip(s.objectives, s.directions, strict=True))
        states = ", ".join(f"{n} {state.lower()}" for state, n in s.counts.items())
        if s.best_values is not None:
            best = f"{fmt_value(s.best_values[0])} (#{s.best_number})"
        elif s.pareto_size is not None:
            best = f"{s.pareto_size} on the Pareto front"
        else:
            best = "-"
        table.add_row(Text(s.name), Text(objective), str(s.n_trials), Text(states), best,
                      _when(s.last_activity))
    return table


def _when(stamp: datetime | None) -> str:
    return stamp.strftime("%Y-%m-%d %H:%M") if stamp else "-"


# --------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------
def trials_table(results: Sequence[TrialResult], objectives: Sequence[str], *,
                 title: str) -> Table:
    """Number, state, value(s), params, duration, run id (and the reason for the rest)."""
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("state")
    for name in objectives:
        table.add_column(name, justify="right")
    table.add_column("params")
    table.add_column("time", justify="right")
    table.add_column("run id")
    table.add_column("note", overflow="fold")
    for r in results:
        values = r.values or [None] * len(objectives)
        table.add_row(str(r.number), Text(r.state, style=STATE_STYLE.get(r.state, "")),
                      *[fmt_value(v) for v in values], Text(fmt_params(r.params, 60)),
                      fmt_seconds(r.duration_s), r.run_id or "-", Text(r.reason or ""))
    return table


def trials_csv(results: Sequence[TrialResult], objectives: Sequence[str]) -> str:
    """One row per trial; params and metrics as `params.<key>` / `metrics.<key>` columns."""
    params = sorted({k for r in results for k in r.params})
    metrics = sorted({k for r in results for k in r.metrics})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["number", "state", *objectives, *(f"params.{k}" for k in params),
                     *(f"metrics.{k}" for k in metrics), "duration_s", "run_id", "model_uri",
                     "reason"])
    for r in results:
        values = r.values or [None] * len(objectives)
        writer.writerow([r.number, r.state, *_cells(values),
                         *_cells(r.params.get(k) for k in params),
                         *_cells(r.metrics.get(k) for k in metrics),
                         _cell(r.duration_s), r.run_id or "", r.model_uri or "",
                         r.reason or ""])
    return out.getvalue().rstrip("\n")


def _cells(values: Any) -> list[str]:
    return [_cell(v) for v in values]


def _cell(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------
# The best trial(s)
# --------------------------------------------------------------------------------------
def best_lines(results: Sequence[TrialResult], objectives: Sequence[str]) -> list[str]:
    """A short block per trial: values, params, test metrics, run, model."""
    lines: list[str] = []
    for r in results:
        values = ", ".join(f"{n}={fmt_value(v)}" for n, v in
                           zip(objectives, r.values or [], strict=False))
        lines.append(f"trial #{r.number} of {r.study}: {values}")
        lines.append(f"  params: {fmt_params(r.params, 200) or '-'}")
        for split in ("val", "test"):
            shown = {k.removeprefix(f"{split}_"): v for k, v in r.metrics.items()
                     if k.startswith(f"{split}_")}
            if shown:
                lines.append(f"  {split}: " + ", ".join(
                    f"{k}={fmt_value(v)}" for k, v in shown.items()))
        lines.append(f"  run: {r.run_url or r.run_id or '- (tracking was off)'}")
        lines.append(f"  model: {r.model_uri or '- (not logged)'}")
    return lines


# --------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------
def evaluation_table(score: TrialScore, title: str | None = None) -> Table:
    table = Table(title=title or f"trial #{score.trial.number} of {score.trial.study} on its "
                                 f"test split", title_justify="left")
    for column in ("metric", "now", "logged", "difference"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    differences = score.differences()
    for key, value in score.metrics.items():
        if key not in score.logged:
            continue
        table.add_row(key, f"{value:.6f}", f"{score.logged[key]:.6f}",
                      f"{differences[key]:+.2g}")
    return table


def ensemble_table(score: EnsembleScore) -> Table:
    from sweeper.results.scoring import HEADLINE

    shown = [k for k in HEADLINE if k != "loss"]
    table = Table(title=f"{score.best_single.study}: the {len(score.members)} best models "
                        f"voting on the test split", title_justify="left")
    table.add_column("model")
    table.add_column("trials")
    for key in shown:
        table.add_column(key, justify="right")
    best = score.best_single

    def row(name: str, trials: str, metrics: dict[str, float]) -> None:
        table.add_row(name, trials, *[fmt_value(metrics.get(k)) for k in shown])

    row(f"best single (#{best.number})", str(best.number), score.member_metrics[0])
    members = ",".join(str(m.number) for m in score.members)
    row("soft vote (mean probability)", members, score.soft)
    row("hard vote (majority class)", members, score.hard)
    for member, metrics in list(zip(score.members, score.member_metrics, strict=True))[1:]:
        row(f"  member #{member.number}", str(member.number), metrics)
    return table
