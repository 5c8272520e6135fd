"""The space block against a real Optuna study: conditional sub-spaces are only sampled
with their parent option, sampled configs are validated, grids and corners are right."""

from __future__ import annotations

import optuna
import pytest

from sweeper.errors import DuplicateGridPoint
from sweeper.search import samplers
from sweeper.spec import config, space
from sweeper.spec.config import ARCH_KEYS

ARCH_SPACE = """
name: arch
dataset: {name: mnist}
space:
  train.lr: {float: [1.0e-4, 1.0e-1], log: true}
  model.arch:
    choice:
      mlp:
        model.hidden: {choice: [[64], [128, 64]]}
      cnn:
        model.channels: {choice: [[8, 16], [16, 32]]}
        model.filter_size: {choice: [3, 5]}
      lenet:
        model.activation: {choice: [relu, sigmoid]}
        model.filter_size: {choice: [3, 5, 7]}
      resnet:
        model.width: {int: [16, 64], step: 16}
"""


def sample(text: str, n: int, sampler: optuna.samplers.BaseSampler | None = None
           ) -> list[tuple[optuna.trial.FrozenTrial, config.TrialConfig]]:
    spec = config.loads(text)
    study = optuna.create_study(sampler=sampler or optuna.samplers.RandomSampler(seed=0),
                                directions=spec.directions)
    out = []
    for _ in range(n):
        trial = study.ask()
        cfg = space.suggest(trial, spec)
        study.tell(trial, 0.5)
        out.append((study.trials[-1], cfg))
    return out


def test_sub_spaces_are_sampled_only_with_their_option() -> None:
    samples = sample(ARCH_SPACE, 80)
    branch_params = {
        "mlp": {"model.hidden"},
        "cnn": {"model.channels", "model.filter_size[cnn]"},
        "lenet": {"model.activation", "model.filter_size[lenet]"},
        "resnet": {"model.width"},
    }
    seen = set()
    for frozen, cfg in samples:
        arch = frozen.params["model.arch"]
        seen.add(arch)
        assert cfg.model.arch == arch
        assert set(frozen.params) == {"train.lr", "model.arch"} | branch_params[arch]
        # Only the chosen architecture's keys reach the logged params.
        assert {k.removeprefix("model.") for k in cfg.flat() if k.startswith("model.")} \
            == set(ARCH_KEYS[arch])
    assert seen == set(branch_params), "random sampling visits every architecture"


def test_sampled_values_land_in_the_trial_config() -> None:
    for frozen, cfg in sample(ARCH_SPACE, 40):
        assert cfg.train.lr == frozen.params["train.lr"]
        if cfg.model.arch == "mlp":
            assert cfg.model.hidden in ([64], [128, 64])
            # List-valued options travel through Optuna as JSON text.
            assert frozen.params["model.hidden"] in ("[64]", "[128, 64]")
        if cfg.model.arch == "lenet":
            assert cfg.model.filter_size == frozen.params["model.filter_size[lenet]"]
        if cfg.model.arch == "resnet":
            assert cfg.model.width in (16, 32, 48, 64)


def test_params_to_values_round_trip() -> None:
    spec = config.loads(ARCH_SPACE)
    for frozen, cfg in sample(ARCH_SPACE, 20):
        values = space.params_to_values(spec, frozen.params)
        assert spec.resolve(values) == cfg


def test_tpe_with_conditional_space_runs() -> None:
    spec = config.loads(ARCH_SPACE + "sampler: {name: tpe, seed: 1, startup_trials: 4}\n")
    samples = sample(ARCH_SPACE, 12, samplers.build_sampler(spec))
    assert len(samples) == 12


@pytest.mark.parametrize("name", ["tpe", "random", "cmaes", "gp", "qmc", "nsga2"])
def test_every_sampler_builds_and_samples(name: str) -> None:
    text = ("name: s\ndataset: {name: mnist}\nspace:\n"
            "  train.lr: {float: [1.0e-4, 1.0e-1], log: true}\n"
            "  model.dropout: {float: [0.0, 0.5]}\n"
            "  train.optimizer: {choice: [adam, sgd]}\n"
            f"sampler: {{name: {name}, seed: 0, startup_trials: 2}}\n")
    spec = config.loads(text)
    samples = sample(text, 5, samplers.build_sampler(spec))
    assert all(1e-4 <= cfg.train.lr <= 1e-1 for _, cfg in samples)


def test_grid_covers_every_point_once() -> None:
    text = ("name: g\ndataset: {name: mnist}\nsampler: {name: grid}\nspace:\n"
            "  model.filter_size: {choice: [3, 5]}\n"
            "  model.channels: {choice: [[8], [8, 16]]}\n"
            "  train.lr: {float: [0.01, 0.03], step: 0.01}\n")
    spec = config.loads(text)
    assert space.size(spec) == 12
    study = optuna.create_study(sampler=samplers.build_sampler(spec))
    samples = []
    while samplers.grid_points_left(study):
        trial = study.ask()
        samples.append((trial, space.suggest(trial, spec)))
        study.tell(trial, 1.0)
    assert len(samples) == 12
    points = {(c.model.filter_size, tuple(c.model.channels), round(c.train.lr, 4))
              for _, c in samples}
    assert len(points) == 12


def grid_id(study: optuna.Study, trial: optuna.Trial) -> int:
    return study._storage.get_trial_system_attrs(trial._trial_id)["grid_id"]


def test_a_grid_point_held_by_another_trial_is_not_trained_again() -> None:
    """Two workers that ask for the grid's last point at once: the later trial yields."""
    text = ("name: g\ndataset: {name: mnist}\nsampler: {name: grid}\nspace:\n"
            "  model.filter_size: {choice: [3, 5]}\n")
    spec = config.loads(text)
    study = optuna.create_study(sampler=samplers.build_sampler(spec))
    first, second = study.ask(), study.ask()
    for trial in (first, second):
        space.suggest(trial, spec)
    samplers.check_grid_point(study, first)
    samplers.check_grid_point(study, second)  # trial numbers 0 and 1: grid points 0 and 1
    # The race: the second trial was handed the first's point.
    study._storage.set_trial_system_attr(second._trial_id, "grid_id",
                                         grid_id(study, first))
    samplers.check_grid_point(study, first)  # the lower number keeps it
    with pytest.raises(DuplicateGridPoint, match="already taken by trial 0"):
        samplers.check_grid_point(study, second)
    study.tell(first, 1.0)
    third = study.ask()
    study._storage.set_trial_system_attr(third._trial_id, "grid_id",
                                         grid_id(study, first))
    with pytest.raises(DuplicateGridPoint):  # completed by trial 0
        samplers.check_grid_point(study, third)


def test_grid_refuses_conditional_space() -> None:
    with pytest.raises(config.ConfigError, match="grid sampler needs one fixed set"):
        config.loads(ARCH_SPACE.replace("{float: [1.0e-4, 1.0e-1], log: true}",
                                        "{choice: [0.001, 0.01]}") + "sampler: {name: grid}\n")


def test_every_pruner_builds() -> None:
    for name in ("none", "median", "hyperband", "successive_halving"):
        spec = config.loads(f"name: p\ndataset: {{name: mnist}}\npruner: {{name: {name}}}\n")
        assert isinstance(samplers.build_pruner(spec), optuna.pruners.BasePruner)


def test_describe_and_size() -> None:
    spec = config.loads(ARCH_SPACE)
    rows = space.describe(spec)
    assert [r.name for r in rows][:2] == ["train.lr", "model.arch"]
    conditions = {r.name: r.condition for r in rows}
    assert conditions["model.width"] == "model.arch=resnet"
    assert space.size(spec) is None  # train.lr is continuous
    no_lr = config.loads(ARCH_SPACE.replace("  train.lr: {float: [1.0e-4, 1.0e-1], log: true}\n",
                                            ""))
    assert space.size(no_lr) == 2 + 4 + 6 + 4


def test_infeasible_corners_are_found_without_torch() -> None:
    spec = config.loads("name: c\ndataset: {name: mnist}\nspace:\n"
                        "  model.filter_size: {int: [3, 13], step: 2}\n"
                        "  model.padding: {choice: [valid, same]}\n")
    corners = space.infeasible_corners(spec)
    assert corners, "filter 13 with valid padding cannot fit a 28x28 input twice"
    found = dict((v["model.filter_size"], reason) for v, reason in corners
                 if v["model.padding"] == "valid")
    assert 13 in found and "conv2" in found[13]
    assert all(v["model.padding"] == "valid" for v, _ in corners)
    assert 3 not in found
    feasible = config.loads("name: c\ndataset: {name: mnist}\nspace:\n"
                            "  model.filter_size: {choice: [3, 5]}\n")
    assert space.infeasible_corners(feasible) == []
