"""Logged models scored again on the test split: one trial (`sweeper evaluate`), or the
best few voting together (`sweeper ensemble`).

Nothing here trains. Members of an ensemble are chosen by their validation objective, as
the study chose them; the test split only scores the result (no peeking). Each model
sees the test split normalised as its own trial saw it (its config rebuilds the dataset),
and all members must have been tested on the same images.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.errors import ResultError
from sweeper.keys import ATTR_EXPERIMENT, ATTR_PARENT_RUN, TAG_MEMBERS
from sweeper.results.read import TrialResult, best_trials, get_trial, load_model
from sweeper.spec.config import TrialConfig

if TYPE_CHECKING:
    from sweeper.ml.data import Dataset

# What `evaluate` compares and `ensemble` reports, in this order.
HEADLINE = ("accuracy", "loss", "f1_macro", "f1_weighted", "precision_macro",
            "recall_macro", "auc_macro", "auc_micro")
# A re-evaluation on the same device reproduces the logged figures exactly; across
# devices (bf16 on a GPU, fp32 on the CPU) they may move in the last digits.
MATCH_TOLERANCE = 1e-4


@dataclass
class TrialScore:
    """A trial's model evaluated again on the test split, beside what was logged."""

    trial: TrialResult
    metrics: dict[str, float]  # test metrics now (`accuracy`, `f1_macro`, ...)
    logged: dict[str, float]  # the same keys as logged when the trial ended

    def differences(self) -> dict[str, float]:
        return {k: self.metrics[k] - self.logged[k] for k in self.logged if k in self.metrics}

    @property
    def matches(self) -> bool:
        return all(abs(d) <= MATCH_TOLERANCE for d in self.differences().values())


@dataclass
class EnsembleScore:
    """The best single model and the K best voting, on the test split."""

    members: list[TrialResult]  # best first, by the validation objective
    member_metrics: list[dict[str, float]]  # each member's test metrics, recomputed
    soft: dict[str, float]  # mean of the members' probabilities
    hard: dict[str, float]  # majority of their predicted classes
    skipped: list[int] = field(default_factory=list)  # better trials with no model
    run_id: str | None = None  # the `ensemble` run in MLflow

    @property
    def best_single(self) -> TrialResult:
        return self.members[0]

    def as_dict(self) -> dict[str, Any]:
        return {"study": self.best_single.study,
                "members": [m.number for m in self.members],
                "member_test_metrics": {m.number: _headline(s) for m, s in
                                        zip(self.members, self.member_metrics, strict=True)},
                "best_single": {"number": self.best_single.number,
                                "test": _headline(self.member_metrics[0])},
                "soft_vote": {"test": _headline(self.soft)},
                "hard_vote": {"test": _headline(self.hard, skip=("loss",))},
                "skipped_without_model": self.skipped, "run_id": self.run_id}


# --------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------
def evaluate_trial(study: str, number: int | None = None, *, storage: str | None = None,
                   tracking_uri: str | None = None, data_dir: str | Path | None = None,
                   device: str | None = None) -> TrialScore:
    """Load trial `number`'s model (default: the best trial) from MLflow, evaluate it on its
    test split and return the metrics beside the logged ones.

    >>> score = evaluate_trial("digits-smoke")
    >>> score.matches, score.metrics["accuracy"] == score.logged["accuracy"]
    (True, True)
    """
    from sweeper.ml.metrics import evaluate

    trial = (get_trial(study, number, storage=storage, tracking_uri=tracking_uri)
             if number is not None else
             best_trials(study, top=1, storage=storage, tracking_uri=tracking_uri)[0])
    device_name = _device(device)
    model = load_model(trial, tracking_uri=tracking_uri, device=device_name)
    data = _dataset(trial, data_dir, device_name)
    result = evaluate(model, data.test, classes=data.classes)
    logged = {k.removeprefix("test_"): v for k, v in trial.metrics.items()
              if k.startswith("test_")}
    return TrialScore(trial, result.metrics, logged)


# --------------------------------------------------------------------------------------
# Several trials voting
# --------------------------------------------------------------------------------------
def ensemble(study: str, top: int = 5, *, storage: str | None = None,
             tracking_uri: str | None = None, data_dir: str | Path | None = None,
             device: str | None = None, log: bool = True) -> EnsembleScore:
    """The `top` best completed trials that logged a model vote on the test split, by
    soft voting (mean probability) and hard voting (majority class, ties broken by the
    mean probability; it gives labels only, so it has no AUC and no loss).
    With `log`, the result is an `ensemble` run under the study's parent run.

    >>> score = ensemble("digits-smoke", top=3, log=False)
    >>> [m.number for m in score.members] == [t.number for t in best_trials("digits-smoke",
    ...                                                                      top=3)]
    True
    >>> sorted(score.as_dict()["soft_vote"]["test"])[:3]
    ['accuracy', 'auc_macro', 'auc_micro']
    """
    from sweeper.ml.metrics import evaluate_probabilities, predict_proba

    if top < 2:
        raise ResultError(f"an ensemble needs `--top >= 2` models, but got {top}")
    ranked = best_trials(study, top=10_000, storage=storage, tracking_uri=tracking_uri)
    if len(ranked) > 1 and len(ranked[0].values or []) > 1:
        raise ResultError(f"study {study!r} has several objectives: which models are "
                          f"'best' is a choice on its Pareto front; ensembles need a "
                          f"single-objective study")
    with_model = [t for t in ranked if t.model_uri]
    members = with_model[:top]
    skipped = [t.number for t in ranked[:ranked.index(members[-1]) + 1] if not t.model_uri] \
        if members else []
    if len(members) < 2:
        raise ResultError(f"study {study!r} has {len(with_model)} completed trial(s) with a "
                          f"logged model; an ensemble needs 2 or more (set `models: all` in "
                          f"the study file for new trials)")
    device_name = _device(device)
    probabilities, labels, classes, member_metrics = [], None, None, []
    for member in members:
        data = _dataset(member, data_dir, device_name)
        if labels is None:
            labels, classes = data.test.y.cpu().numpy(), list(data.classes)
        elif not np.array_equal(labels, data.test.y.cpu().numpy()):
            raise ResultError(f"trial {member.number} was tested on other images than trial "
                              f"{members[0].number} (its dataset settings differ): the "
                              f"members cannot vote on one test split")
        model = load_model(member, tracking_uri=tracking_uri, device=device_name)
        probs = predict_proba(model, data.test.x).numpy()
        probabilities.append(probs)
        member_metrics.append(evaluate_probabilities(probs, labels, classes).metrics)
    assert labels is not None and classes is not None
    soft = evaluate_probabilities(soft_vote(probabilities), labels, classes).metrics
    hard = _label_metrics(evaluate_probabilities(hard_vote(probabilities), labels,
                                                 classes).metrics)
    score = EnsembleScore(members, member_metrics, soft, hard, skipped)
    if log:
        score.run_id = _log_ensemble(score, storage=storage, tracking_uri=tracking_uri)
    return score


def _label_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics of predicted labels only: a hard vote gives vote shares, not class
    probabilities, so a ROC curve, an AUC or a cross-entropy of them would measure the
    tie-breaking nudge rather than a model. Accuracy, precision, recall and F1 remain."""
    return {k: v for k, v in metrics.items() if not k.startswith("auc_") and k != "loss"}


def soft_vote(probabilities: list[np.ndarray]) -> np.ndarray:
    """The members' class probabilities, averaged: (N, K)."""
    return np.mean(np.stack(probabilities), axis=0)


def hard_vote(probabilities: list[np.ndarray]) -> np.ndarray:
    """Each member's predicted class is one vote; returns vote shares (N, K) whose argmax
    is the majority class, a tie going to the class with the higher mean probability (a
    nudge far below one vote, 1/len(members))."""
    stacked = np.stack(probabilities)  # (M, N, K)
    members, n, k = stacked.shape
    votes = np.zeros((n, k), dtype=np.float64)
    for predicted in stacked.argmax(axis=2):
        votes[np.arange(n), predicted] += 1.0
    shares = votes / members
    return (shares + 1e-3 / members * stacked.mean(axis=0)).astype(np.float32)


def _log_ensemble(score: EnsembleScore, *, storage: str | None,
                  tracking_uri: str | None) -> str | None:
    from sweeper.results.read import load_study
    from sweeper.tracking.ensemble_run import log_ensemble
    from sweeper.tracking.reader import TrackingReader

    study = load_study(score.best_single.study, storage)
    experiment_id = study.user_attrs.get(ATTR_EXPERIMENT)
    if not experiment_id:
        return None  # the study ran without tracking: nothing to nest the run under
    members = ",".join(str(m.number) for m in score.members)
    summary = score.as_dict()
    metrics = {f"{vote}_test_{k}": v for vote, values in
               (("soft", summary["soft_vote"]), ("hard", summary["hard_vote"]),
                ("best_single", summary["best_single"])) for k, v in values["test"].items()}
    reader = TrackingReader(tracking_uri)
    return log_ensemble(
        reader,
        experiment_id=experiment_id, parent_run_id=study.user_attrs.get(ATTR_PARENT_RUN),
        study=study.study_name,
        params={"top": len(score.members), "members": members,
                "member_runs": ",".join(m.run_id or "" for m in score.members),
                "voting": "soft,hard", "split": "test"},
        metrics=metrics, tags={TAG_MEMBERS: members},
        tables={"ensemble.json": json.dumps(summary, indent=2, default=str)})


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def _dataset(trial: TrialResult, data_dir: str | Path | None, device: str) -> Dataset:
    from sweeper.ml.data import load_dataset

    if not trial.config:
        raise ResultError(f"trial {trial.number} of study {trial.study!r} recorded no config "
                          f"(state {trial.state}): nothing to evaluate")
    cfg = TrialConfig.from_flat(trial.config)
    return load_dataset(cfg.dataset, device=device, data_dir=data_dir)


def _device(name: str | None) -> str:
    from sweeper.ml.device import resolve_device

    return str(resolve_device(name))


def _headline(metrics: dict[str, float], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The headline metrics; `skip` drops those that mean nothing for a vote (the loss of
    vote shares)."""
    return {k: metrics[k] for k in HEADLINE
            if k in metrics and k not in skip and math.isfinite(metrics[k])}
