"""The SQL the read side asks gives Optuna's own answers, on SQLite and PostgreSQL, for a
study holding every state, ties, failed trials without values and two objectives."""

from __future__ import annotations

from collections import Counter

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sweeper.results.read import _pareto_front
from sweeper.search.queries import StudyQueries
from sweeper.search.storage import open_storage

STATES = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE,
          TrialState.COMPLETE, TrialState.WAITING, TrialState.COMPLETE]
VALUES = [0.5, None, None, 0.9, 0.5, None, 0.7]  # a tie at 0.5: the lower number first


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path) -> optuna.storages.RDBStorage:
    if request.param == "sqlite":
        return open_storage(f"sqlite:///{tmp_path / 'q.db'}")
    return open_storage(request.getfixturevalue("postgres_url"))


def build(storage: optuna.storages.RDBStorage, name: str, directions: list[str]
          ) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, directions=directions)
    for number, (state, value) in enumerate(zip(STATES, VALUES, strict=True)):
        values = None if value is None else [value, float(10 - number)][:len(directions)]
        study.add_trial(create_trial(state=state, values=values, params={"x": number / 10},
                                     distributions={"x": FloatDistribution(0, 1)}))
    return study


def test_counts_order_and_lookups_match_optuna(storage: optuna.storages.RDBStorage) -> None:
    study = build(storage, "single", ["maximize"])
    build(storage, "other", ["minimize"])  # another study in the same tables
    queries = StudyQueries(storage, study._study_id)
    assert queries.counts() == dict(Counter(t.state.name for t in study.trials))
    best_first = queries.trials(queries.trial_ids(states=["COMPLETE"], by_value=True,
                                                  descending=True))
    assert [t.number for t in best_first] == [3, 6, 0, 4]
    assert best_first[0].number == study.best_trial.number
    assert [t.number for t in queries.trials(queries.trial_ids(by_value=True))] == [
        0, 4, 6, 3, 1, 2, 5]  # ascending, trials without a value last
    assert [t.number for t in queries.trials(queries.trial_ids(descending=True, limit=3))
            ] == [6, 5, 4]
    assert queries.trial_ids(states=["FAIL", "PRUNED"]) == [
        t._trial_id for t in study.trials if t.state.name in ("FAIL", "PRUNED")]
    assert queries.trials([queries.trial_id_of(3)])[0] == study.trials[3]
    assert queries.trial_id_of(99) is None
    stamps = [t.datetime_complete or t.datetime_start for t in study.trials]
    assert queries.last_activity() == max(s for s in stamps if s is not None)


def test_complete_values_give_optunas_pareto_front(storage: optuna.storages.RDBStorage
                                                   ) -> None:
    study = build(storage, "pair", ["maximize", "minimize"])
    queries = StudyQueries(storage, study._study_id)
    values = queries.complete_values()
    assert values == {t._trial_id: t.values for t in study.trials if t.state.name == "COMPLETE"}
    front = _pareto_front(values, ["maximize", "minimize"])
    assert sorted(front) == sorted(t._trial_id for t in study.best_trials)
