"""`sweeper report` on the shipped digits study: the page holds every figure it promises,
and headless Chromium draws each of them from the page alone (plotly.js embedded)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sweeper.cli import app
from sweeper.results.report import build_report
from sweeper.search.study import RunOptions, run_study
from sweeper.spec import config

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FIGURES = ("optimization_history", "param_importances", "parallel_coordinate",
           "architectures", "best_trial_history", "best_trial_confusion_matrix",
           "best_trial_roc", "trial_histories")


def stores(root: Path) -> list[str]:
    return ["--storage", f"sqlite:///{root / 'mlruns' / 'optuna.db'}",
            "--tracking-uri", f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"]


def test_report_holds_the_search_the_architectures_and_the_best_trial(
        digits_smoke: Path, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    shown = runner.invoke(app, ["report", "digits-smoke", "-o", str(target),
                                *stores(digits_smoke)])
    assert shown.exit_code == 0, shown.output
    assert f"wrote {target}" in shown.output and "8 figures" in shown.output
    page = target.read_text()
    for name in FIGURES:
        assert f'id="{name}"' in page, name
    assert "cdn.plot.ly" not in page and "sweeper-plotlyjs" in page  # works offline
    # Both architectures of the study file are compared, with their counts.
    assert re.search(r"cnn \(\d/\d complete\)", page) and re.search(r"mlp \(\d/\d complete\)",
                                                                    page)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(apt-get install chromium; .ci/run installs it)")
def test_report_renders_every_figure_in_a_browser(digits_smoke: Path, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    summary = build_report("digits-smoke", target,
                           storage=stores(digits_smoke)[1], tracking_uri=stores(digits_smoke)[3])
    assert summary.notes == []
    assert CHROMIUM is not None
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'p'}",
         "--virtual-time-budget=30000", "--window-size=1300,900", "--dump-dom",
         target.as_uri()], capture_output=True, text=True, timeout=180, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<pre>figures could not be drawn" not in dom.stdout  # the loader's error note
    # Each figure's <div> holds the SVG plotly drew into it.
    divs = re.split(r'<div id="figure-\d+" class="figure[^"]*', dom.stdout)[1:]
    assert len(divs) == len(summary.figures) == len(FIGURES)
    for name, div in zip(summary.figures, divs, strict=True):
        assert 'class="main-svg"' in div.split("</section>")[0], f"{name} was not drawn"


def test_report_of_an_untracked_study_says_what_it_left_out(tmp_path: Path) -> None:
    spec = config.loads("""
name: untracked
dataset: {name: synthetic, synthetic: {train_size: 256, test_size: 64, image_size: 8}}
model: {arch: mlp, hidden: [8]}
budget: {trials: 3, epochs: 1}
sampler: {name: random, seed: 0}
space:
  train.lr: {float: [1.0e-3, 1.0e-1], log: true}
""")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    run_study(spec, RunOptions(storage=storage, device="cpu"))
    summary = build_report("untracked", tmp_path / "r.html", storage=storage,
                           tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "optimization_history" in summary.figures and "architectures" in summary.figures
    assert not any(name.startswith("best_trial") for name in summary.figures)
    assert any("no MLflow run (tracking was off)" in note for note in summary.notes)
    assert not (tmp_path / "mlflow.db").exists(), "the report asked MLflow nothing"
