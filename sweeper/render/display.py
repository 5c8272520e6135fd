"""What `sweeper run` and `sweeper validate` show: a progress bar, trial lines and tables.

On a terminal the run shows a live bar (trials done/total, best so far, elapsed, ETA);
elsewhere (CI, logs) one plain line per finished trial, so logs stay readable.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sweeper.keys import ATTR_REASON
from sweeper.render.formats import STATE_STYLE, fmt_params, fmt_seconds, fmt_value

if TYPE_CHECKING:
    import optuna
    from rich.progress import Progress, TaskID

    from sweeper.search.study import RunReport, TrialOutcome
    from sweeper.spec.config import StudySpec

def best_text(study: optuna.Study) -> str:
    """'0.9871 (#12)' for one objective, '3 on the Pareto front' for several."""
    try:
        if len(study.directions) > 1:
            return f"{len(study.best_trials)} on the Pareto front"
        best = study.best_trial
        return f"{fmt_value(best.value)} (#{best.number})"
    except ValueError:
        return "-"


class RunDisplay:
    """The progress callback of `study.Worker`: live bar on a terminal, lines elsewhere."""

    def __init__(self, spec: StudySpec, console: Console | None = None) -> None:
        self.spec = spec
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.started = time.monotonic()
        self.total: int | None = None

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        getattr(self, f"_on_{event.replace('-', '_')}")(info)

    def _on_start(self, info: dict[str, Any]) -> None:
        finished, target, more = info["finished"], info["target"], info["more"]
        if more is not None:
            self.total = more
        elif target is not None:
            self.total = max(target - finished, 0)
        objective = ", ".join(f"{o.metric} ({o.direction})" for o in self.spec.objective_list)
        budget = f"{target} trials" if target is not None else f"{more} more trials"
        if target is not None and finished:
            budget += f", {finished} done before"
        if info.get("workers", 1) > 1:
            budget += f", {info['workers']} workers"
        self.console.print(f"[bold]{self.spec.name}[/]: {budget}, "
                           f"{self.spec.budget.epochs} epochs each, objective {objective}",
                           highlight=False)
        if self.total == 0:
            return
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(),
                TextColumn("best {task.fields[best]}"), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("trials", total=self.total,
                                               best=best_text(info["study"]), status="")

    def _on_epoch(self, info: dict[str, Any]) -> None:
        if self.progress is None or self.task is None:
            return
        metrics = info["metrics"]
        status = (f"#{info['trial']} epoch {info['epoch']}/{info['epochs']} "
                  f"val_acc {metrics.get('val_accuracy', float('nan')):.4f}")
        self.progress.update(self.task, status=status)

    def _on_trial(self, info: dict[str, Any]) -> None:
        outcome: TrialOutcome = info["outcome"]
        best = best_text(info["study"])
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=1, best=best, status="")
            return
        values = ", ".join(fmt_value(v) for v in outcome.values or []) or "-"
        reason = f" - {outcome.reason}" if outcome.reason else ""
        style = STATE_STYLE.get(outcome.state, "")
        self.console.print(f"trial {outcome.number:>4} [{style}]{outcome.state:<8}[/] "
                           f"value {values:<10} {fmt_seconds(outcome.seconds):>7}  best {best}"
                           f"{reason}", highlight=False, markup=True)

    def _on_end(self, info: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def run_table(study: optuna.Study, *, limit: int = 20, highlight: Sequence[int] = ()
                 ) -> Table:
    """The study's latest trials: number, state, values, params, duration, reason."""
    trials = study.get_trials(deepcopy=False)[-limit:]
    names = [f"value {i}" for i in range(len(study.directions))] \
        if len(study.directions) > 1 else ["value"]
    table = Table(title=f"{study.study_name}: last {len(trials)} trials", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("state")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("params")
    table.add_column("time", justify="right")
    table.add_column("note", overflow="fold")
    for trial in trials:
        values = trial.values or [None] * len(names)
        seconds = trial.duration.total_seconds() if trial.duration else None
        state = trial.state.name
        number = f"[bold]{trial.number}[/]" if trial.number in highlight else str(trial.number)
        table.add_row(number, Text(state, style=STATE_STYLE.get(state, "")),
                      *[fmt_value(v) for v in values], Text(fmt_params(trial.params)),
                      fmt_seconds(seconds), Text(str(trial.user_attrs.get(ATTR_REASON, ""))))
    return table


def print_summary(report: RunReport, study: optuna.Study, console: Console) -> None:
    """The table of trials, then the best trial(s) and how the run ended."""
    console.print(run_table(study, highlight=[o.number for o in report.outcomes]))
    counts: dict[str, int] = {}
    for outcome in report.outcomes:
        counts[outcome.state] = counts.get(outcome.state, 0) + 1
    ran = ", ".join(f"{n} {state.lower()}" for state, n in counts.items()) or "no trials"
    console.print(f"this run: {ran}; stopped by {report.stopped_by}", highlight=False)
    try:
        if len(study.directions) > 1:
            front = study.best_trials
            console.print(f"Pareto front: {len(front)} trials: "
                          + "; ".join(f"#{t.number} {[fmt_value(v) for v in t.values]}"
                                      for t in front[:10]), highlight=False)
        else:
            best = study.best_trial
            console.print(f"best: trial #{best.number} value {fmt_value(best.value)}"
                          f"  {fmt_params(best.params, 200)}", markup=False, soft_wrap=True)
    except ValueError:
        console.print("no completed trial yet", highlight=False)


def print_space(spec: StudySpec, rows: Sequence[Any], size: int | None,
                infeasible: Sequence[tuple[dict[str, Any], str]], console: Console) -> None:
    """`sweeper validate`: the study at a glance, its dimensions, grid size, bad corners."""
    objective = ", ".join(f"{o.metric} ({o.direction})" for o in spec.objective_list)
    budget = spec.budget
    limits = [f"{budget.trials} trials" if budget.trials else "no trial limit",
              f"{budget.epochs} epochs each"]
    if budget.timeout:
        limits.append(f"timeout {fmt_seconds(budget.timeout)}")
    console.print(f"{spec.source}: OK - study {spec.name} on {spec.dataset.name}, "
                  f"{spec.model.arch} by default; {', '.join(limits)}; objective {objective}; "
                  f"sampler {spec.sampler.name}, pruner {spec.pruner.name}", markup=False,
                  soft_wrap=True)
    if not rows:
        console.print("space: empty (every trial trains the fixed config)")
    else:
        table = Table(title=f"space: {len(rows)} dimensions", title_justify="left")
        for column in ("parameter", "kind", "values", "only when"):
            table.add_column(column)
        for row in rows:
            # Text, not markup: values such as `[mlp]` are data, not rich tags.
            table.add_row(*(Text(v) for v in (row.name, row.kind, row.values,
                                               row.condition or "-")))
        console.print(table)
    console.print(f"grid size: {size:,} points" if size is not None
                  else "grid size: infinite (continuous dimensions)")
    if not infeasible:
        console.print("infeasible corners: none (every model fits the input "
                      f"{'x'.join(map(str, spec.dataset.input_shape))})")
        return
    console.print(f"infeasible corners: {len(infeasible)} (such trials end FAIL untrained)")
    for values, reason in infeasible:
        where = ", ".join(f"{k}={v}" for k, v in values.items()) or "the fixed model"
        console.print(f"  - {where}: {reason}", markup=False, soft_wrap=True)


def print_networks(networks: Sequence[tuple[str, str, int | None]], console: Console) -> None:
    """`sweeper validate`: per arch option, the network its fixed values build."""
    console.print("networks (at the fixed values; searched keys change them):")
    for arch, layers, params in networks:
        count = f"{params:,} params" if params is not None else "cannot be built"
        console.print(f"  {arch}: {layers} ({count})", markup=False, soft_wrap=True)
