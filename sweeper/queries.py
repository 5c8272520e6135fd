"""What the read side asks an Optuna RDB storage in SQL, so that a study of thousands of
trials answers in a fraction of a second: trials by state, the K best, the objective
values, one trial by number, the last activity.

Optuna's public API has one way to list trials: load every trial with every param,
attribute and intermediate value (about 0.6 ms a trial on SQLite, so 1.2 s for 2,000).
These queries read only the columns they need and load in full only the trials a command
shows. They use Optuna's table models (`optuna.storages._rdb.models`, stable since Optuna
3); `tests/test_queries.py` checks every answer against Optuna's own API.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna
    from sqlalchemy.orm import Session


class StudyQueries:
    """SQL over one study of an `RDBStorage`."""

    def __init__(self, storage: optuna.storages.RDBStorage, study_id: int) -> None:
        self.storage = storage
        self.study_id = study_id

    @contextmanager
    def _session(self) -> Iterator[Session]:
        session = self.storage.scoped_session()
        try:
            yield session
        finally:
            session.close()

    def counts(self) -> dict[str, int]:
        """Trials by state name."""
        from optuna.storages._rdb import models
        from sqlalchemy import func

        with self._session() as session:
            rows = (session.query(models.TrialModel.state, func.count())
                    .filter(models.TrialModel.study_id == self.study_id)
                    .group_by(models.TrialModel.state).all())
        return {state.name: int(n) for state, n in rows}

    def last_activity(self) -> datetime | None:
        """When a trial last started or finished."""
        from optuna.storages._rdb import models
        from sqlalchemy import func

        trial = models.TrialModel
        with self._session() as session:
            started, completed = (session.query(func.max(trial._datetime_start_utc),
                                                func.max(trial._datetime_complete_utc))
                                  .filter(trial.study_id == self.study_id).one())
        stamps = [s for s in (started, completed) if s is not None]
        return max(stamps) if stamps else None

    def trial_ids(self, *, states: Sequence[str] | None = None, by_value: bool = False,
                  descending: bool = False, limit: int | None = None) -> list[int]:
        """Trial ids in order of trial number, or of the first objective (`by_value`:
        trials without a value last, ties by number), `limit` of them."""
        import sqlalchemy
        from optuna.storages._rdb import models
        from optuna.trial import TrialState

        trial = models.TrialModel
        with self._session() as session:
            query = session.query(trial.trial_id).filter(trial.study_id == self.study_id)
            if states is not None:
                query = query.filter(trial.state.in_([TrialState[s] for s in states]))
            if by_value:
                value = models.TrialValueModel
                query = query.outerjoin(value, sqlalchemy.and_(
                    value.trial_id == trial.trial_id, value.objective == 0))
                ordered = value.value.desc() if descending else value.value.asc()
                query = query.order_by(sqlalchemy.nullslast(ordered), trial.number.asc())
            else:
                query = query.order_by(trial.number.desc() if descending else
                                       trial.number.asc())
            if limit is not None:
                query = query.limit(limit)
            return [row[0] for row in query.all()]

    def complete_values(self) -> dict[int, list[float]]:
        """trial id → objective values, for every complete trial (for Pareto fronts)."""
        from optuna.storages._rdb import models
        from optuna.trial import TrialState

        value, trial = models.TrialValueModel, models.TrialModel
        out: dict[int, dict[int, float]] = {}
        with self._session() as session:
            rows = (session.query(value.trial_id, value.objective, value.value,
                                  value.value_type)
                    .join(trial, trial.trial_id == value.trial_id)
                    .filter(trial.study_id == self.study_id,
                            trial.state == TrialState.COMPLETE).all())
        for trial_id, objective, stored, kind in rows:
            out.setdefault(trial_id, {})[objective] = value.stored_repr_to_value(stored, kind)
        return {tid: [v[i] for i in sorted(v)] for tid, v in out.items()}

    def trial_id_of(self, number: int) -> int | None:
        from optuna.storages._rdb import models

        trial = models.TrialModel
        with self._session() as session:
            row = (session.query(trial.trial_id)
                   .filter(trial.study_id == self.study_id, trial.number == number).first())
        return None if row is None else int(row[0])

    def trials(self, trial_ids: Sequence[int]) -> list[optuna.trial.FrozenTrial]:
        """The trials, in full, in the order given."""
        return [self.storage.get_trial(trial_id) for trial_id in trial_ids]

