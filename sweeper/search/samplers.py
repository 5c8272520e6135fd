"""Optuna sampler and pruner built from the study file's `sampler:` and `pruner:` blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sweeper.errors import DuplicateGridPoint
from sweeper.keys import GRID_ID
from sweeper.spec import space
from sweeper.spec.config import StudySpec

if TYPE_CHECKING:
    import optuna


def build_sampler(spec: StudySpec, *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler the study file names. `seed_offset` keeps parallel workers that share a
    seed from proposing the same points."""
    import optuna

    cfg = spec.sampler
    seed = None if cfg.seed is None else (cfg.seed + seed_offset) % 2**32
    startup = {} if cfg.startup_trials is None else {"n_startup_trials": cfg.startup_trials}
    samplers = optuna.samplers
    if cfg.name == "tpe":
        # `group` lets multivariate TPE model each architecture's sub-space on its own.
        return samplers.TPESampler(seed=seed, multivariate=cfg.multivariate,
                                   group=cfg.multivariate, constant_liar=True, **startup)
    if cfg.name == "random":
        return samplers.RandomSampler(seed=seed)
    if cfg.name == "grid":
        return _study_grid_sampler()(space.grid(spec), seed=seed)
    if cfg.name == "cmaes":
        return samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, **startup)
    if cfg.name == "gp":
        return samplers.GPSampler(seed=seed, warn_independent_sampling=False, **startup)
    if cfg.name == "qmc":
        return samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False,
                                   warn_asynchronous_seeding=False)
    if cfg.name == "nsga2":
        return samplers.NSGAIISampler(seed=seed)
    raise AssertionError(f"unhandled sampler {cfg.name}")  # config.py rejects others


def fresh_seed_offset() -> int:
    """A seed offset of this process's own (parallel workers, resumed studies)."""
    import secrets

    return 1 + secrets.randbelow(2**31)


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner the study file names; epochs are its steps."""
    import optuna

    cfg = spec.pruner
    epochs = spec.budget.epochs
    if cfg.name == "none":
        return optuna.pruners.NopPruner()
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials,
                                           n_warmup_steps=cfg.warmup_epochs)
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min(cfg.min_epochs, epochs),
                                              max_resource=epochs,
                                              reduction_factor=cfg.reduction_factor)
    if cfg.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min(cfg.min_epochs, epochs),
                                                      reduction_factor=cfg.reduction_factor)
    raise AssertionError(f"unhandled pruner {cfg.name}")


def _study_grid_sampler() -> type[optuna.samplers.GridSampler]:
    import optuna

    class StudyGridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler for an ask/tell loop.

        Optuna's own one calls `study.stop()` when the grid runs out, which raises outside
        `study.optimize`; here the loop asks `grid_points_left` before each trial instead.
        """

        def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        state: optuna.trial.TrialState, values: object) -> None:
            return None

    return StudyGridSampler


def grid_points_left(study: optuna.Study) -> int | None:
    """Grid points no trial has finished or is running; None unless the sampler is a grid."""
    import optuna

    sampler = study.sampler
    if not isinstance(sampler, optuna.samplers.GridSampler):
        return None
    taken = set()
    for trial in study.get_trials(deepcopy=False):
        grid_id = trial.system_attrs.get(GRID_ID)
        if grid_id is not None and (trial.state.is_finished()
                                    or trial.state == optuna.trial.TrialState.RUNNING):
            taken.add(grid_id)
    return len(sampler._all_grids) - len(taken)


def check_grid_point(study: optuna.Study, trial: optuna.Trial) -> None:
    """Raise DuplicateGridPoint if another worker holds this trial's grid point: it has
    completed it, or is running it and asked first (the lower trial number keeps it).

    Optuna's grid sampler hands out points by trial number while the grid lasts, but two
    workers that ask for its last points at the same moment can get the same one; this
    check keeps a grid point from being trained to completion twice.
    """
    import optuna

    if not isinstance(study.sampler, optuna.samplers.GridSampler):
        return
    mine = study._storage.get_trial_system_attrs(trial._trial_id).get(GRID_ID)
    if mine is None:
        return
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    for other in study.get_trials(deepcopy=False, states=states):
        if other.number == trial.number or other.system_attrs.get(GRID_ID) != mine:
            continue
        if other.state == optuna.trial.TrialState.COMPLETE or other.number < trial.number:
            raise DuplicateGridPoint(f"grid point {mine} is already taken by trial "
                                     f"{other.number} (two workers asked at once)")
