"""A pack of trials, asked, trained together (`packing`) and told one by one.

How trials come to share a shape: the worker asks Optuna for one trial as usual and lets
the sampler suggest all its params. The pack's other members are then created with the
first trial's *shape params* fixed (every searched key but `packing.MEMBER_KEYS`: the
arch and whatever changes a tensor's shape, batch size, optimizer, ...), through Optuna's
`fixed_params` (what `enqueue_trial` uses), but created RUNNING at once so that no other
worker can take them; the sampler still proposes their free params (learning rate, weight
decay, momentum, dropout, seed, augmentation).

Each member stays a trial of its own: its own Optuna trial and heartbeat, its own MLflow
run (per-epoch and final metrics), its own pruning, its own saved model. A member that is
pruned or diverges is told at once and leaves the pack; the others go on. An exception in
the shared training step (out of memory, a bug, Ctrl-C) ends every member still in the
pack the way it ends a lone trial. A worker killed outright leaves its K trials RUNNING:
their heartbeats stop, and each is taken back and re-queued once (`heartbeat`).

`worker` is the `search.study.Worker` that runs the pack (typed `Any`: that module
dispatches to this one, and the import graph has no cycle). This module knows no MLflow:
the tracker's runs come through `Worker._trial_run`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sweeper.errors import ConfigError, StorageError, TrialFailure
from sweeper.fleet import heartbeat, stopping
from sweeper.keys import ATTR_CONFIG, ATTR_HEARTBEAT, ATTR_PACK, ATTR_WORKER, Outcome
from sweeper.search import retrying, samplers
from sweeper.search.endings import (
    COMPLETED,
    TrialEnd,
    TrialOutcome,
    ending_of,
    out_of_memory,
)
from sweeper.search.queries import StudyQueries
from sweeper.search.storage import rdb_of
from sweeper.spec import space
from sweeper.spec.config import StudySpec, TrialConfig, walk_space

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)



@dataclass
class _Slot:
    """One member of the pack while it is open."""

    trial: optuna.Trial
    beat: contextlib.ExitStack
    outcome: TrialOutcome
    started: float = field(default_factory=time.monotonic)
    config: TrialConfig | None = None
    run_context: Any = None  # the tracker's context manager, entered
    run: Any = None
    model: Any = None
    done: bool = False


def member_params(spec: StudySpec) -> set[str]:
    """Optuna param names that each member of a pack chooses for itself."""
    from sweeper.ml.packing import MEMBER_KEYS

    return {dim.name for dim in walk_space(spec.dimensions) if dim.key in MEMBER_KEYS}


def run_pack(worker: Any, study: optuna.Study, room: int) -> list[TrialOutcome]:
    """Ask up to `room` trials of one shape, train them together, tell each. Returns
    their outcomes; raises only KeyboardInterrupt (after telling Optuna about every
    member) and StorageError, as `Worker.run_trial` does."""
    from sweeper.ml.packing import pack_key, pack_size, packable

    first = _open(worker, study, worker._ask(study))
    stopping.checkpoint("after-ask")
    size = 1
    try:
        config = _configure(worker, study, first.trial)
    except (TrialFailure, ConfigError):
        config = None  # `attempt` below fails it with the reason
    if config is not None and packable(config):
        data = worker.dataset(config.dataset)
        size = pack_size(room, config, data.input_shape, data.num_classes, worker.device)
    if size <= 1:
        with first.beat:
            return [worker.attempt(study, first.trial)]
    first.config = config
    fixed = {name: value for name, value in first.trial.params.items()
             if name not in member_params(worker.spec)}
    slots = [first]
    alone: list[_Slot] = []
    outcomes: list[TrialOutcome] = []
    try:
        queries = StudyQueries(rdb_of(study), study._study_id)
        for _ in range(size - 1):
            # Queued trials (lost ones re-queued, enqueued ones) first, as `study.ask`
            # would: one of another shape trains alone after the pack.
            if queries.counts().get("WAITING"):
                trial = worker._ask(study)
            else:
                trial = retrying.retry(lambda: _ask_fixed(study, fixed),
                                       "ask the Optuna storage for a new trial")
            slot = _open(worker, study, trial)
            try:
                slot.config = _configure(worker, study, trial)
            except (TrialFailure, ConfigError) as exc:
                slot.outcome.ended(ending_of(exc))
                outcomes.append(_end(worker, study, slot))
                continue
            if pack_key(slot.config) != pack_key(config):  # a conditional param moved it
                alone.append(slot)
                continue
            slots.append(slot)
        numbers = [s.trial.number for s in slots]
        for slot in slots:
            with contextlib.suppress(Exception):  # a label for the read side only
                slot.trial.set_user_attr(ATTR_PACK, numbers)
        outcomes.extend(_train(worker, study, slots) if len(slots) > 1 else
                        [_alone(worker, study, slots[0])])
        for slot in alone:
            outcomes.append(_alone(worker, study, slot))
    except KeyboardInterrupt as stop:  # every member not yet told is told now
        ended = [o for o in outcomes if o.interrupted]
        for slot in [*slots, *alone]:
            if not slot.done:
                slot.outcome.ended(ending_of(stop))
                ended.append(_end(worker, study, slot, stop))
        if not getattr(stop, "recorded", None):
            stop.recorded = stopped_words(ended)  # type: ignore[attr-defined]
        raise
    except BaseException:
        # An outage while the pack was formed: members not yet told stop beating, and
        # the heartbeat rules take them back (FAIL "worker lost", re-queued once).
        for slot in [*slots, *alone]:
            if not slot.done:
                slot.beat.close()
        raise
    return sorted(outcomes, key=lambda o: o.number)


def stopped_words(ended: list[TrialOutcome]) -> str:
    """What the CLI says of the members a stop ended: recorded, and re-queued."""
    words = (f"the running trials were recorded as FAIL "
             f"({', '.join(f'#{o.number}' for o in ended)})")
    retries = [f"#{o.retry}" for o in ended if o.retry is not None]
    return words + (f" and re-queued ({', '.join(retries)})" if retries else "")


def _open(worker: Any, study: optuna.Study, trial: optuna.Trial) -> _Slot:
    """The member's heartbeat starts (its worker's settings recorded on it)."""
    settings = worker.options.heartbeat
    with contextlib.suppress(StorageError):  # readers fall back to their own settings
        rdb_of(study).set_trial_system_attr(trial._trial_id, ATTR_HEARTBEAT,
                                            settings.as_attr())
    beat = contextlib.ExitStack()
    beat.enter_context(heartbeat.beating(rdb_of(study), trial._trial_id, settings))
    return _Slot(trial, beat, TrialOutcome(trial.number, Outcome.FAIL))


def _configure(worker: Any, study: optuna.Study, trial: optuna.Trial) -> TrialConfig:
    """Suggest the trial's params (fixed ones come back as fixed) and record its config,
    as `Worker.attempt` does; idempotent."""
    trial.set_user_attr(ATTR_WORKER, worker.options.worker)
    config = space.suggest(trial, worker.spec)
    samplers.check_grid_point(study, trial)
    study._storage.set_trial_system_attr(trial._trial_id, ATTR_CONFIG, config.flat())
    return config


def _ask_fixed(study: optuna.Study, fixed: dict[str, Any]) -> optuna.Trial:
    """A new trial, RUNNING at once, whose params in `fixed` are those values (Optuna's
    `fixed_params`, as `enqueue_trial` sets them) and whose others the sampler picks."""
    import optuna
    from optuna.trial import TrialState

    template = optuna.trial.create_trial(state=TrialState.RUNNING,
                                         system_attrs={"fixed_params": dict(fixed)})
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return optuna.Trial(study, trial_id)


def _alone(worker: Any, study: optuna.Study, slot: _Slot) -> TrialOutcome:
    """A member left on its own trains as a lone trial."""
    slot.done = True
    with slot.beat:
        return worker.attempt(study, slot.trial)


def _end(worker: Any, study: optuna.Study, slot: _Slot,
         exc: BaseException | None = None) -> TrialOutcome:
    """Close the member's run (on `exc`: aborted with it), tell Optuna and tracking, stop
    its heartbeat. Its outcome is filled in by the caller."""
    slot.done = True
    outcome = slot.outcome
    outcome.seconds = time.monotonic() - slot.started
    with stopping.deferred():
        try:
            if slot.run_context is not None:
                if exc is None:
                    slot.run_context.__exit__(None, None, None)
                else:
                    slot.run_context.__exit__(type(exc), exc, exc.__traceback__)
            worker._tell(study, slot.trial, outcome)
        finally:
            slot.beat.close()
    return outcome


def _train(worker: Any, study: optuna.Study, slots: list[_Slot]) -> list[TrialOutcome]:
    """Open every member's run, build every member's model from its own seed, train them
    together, and end each as it leaves."""
    import optuna

    from sweeper.ml.device import free_device_memory
    from sweeper.ml.models import build_model
    from sweeper.ml.packing import MemberResult, fit_packed
    from sweeper.ml.train import seed_everything

    outcomes: dict[int, TrialOutcome] = {}
    configs = [s.config for s in slots]
    assert all(c is not None for c in configs)
    data = worker.dataset(slots[0].config.dataset)  # type: ignore[union-attr]
    hooks = []
    try:
        for slot in slots:
            assert slot.config is not None
            slot.outcome.params = dict(slot.trial.params)
            slot.run_context = worker._trial_run(slot.trial, slot.config)
            slot.run = slot.run_context.__enter__()
            if slot.run is not None and hasattr(slot.run, "log_data"):
                slot.run.log_data(data)  # the dataset as the run's input, as alone
                slot.run.log_pack([s.trial.number for s in slots])
            hooks.append(worker.epoch_hook(slot.trial, slot.config, slot.run))
            seed_everything(slot.config.train.seed)  # its initial weights, as alone
            slot.model = build_model(slot.config.model, data.input_shape, data.num_classes,
                                     data_dir=worker.options.data_dir)

        def fit_group(group: list[int]) -> None:
            """Train the members at `group` as one pack. A pack that runs out of memory
            before any member finished an epoch has told nothing and changed no model
            (the pack trains copies of their weights): it is split in two halves, each
            trained in turn, so the members still train exactly as they would alone."""
            reported = False

            def on_epoch(position: int, epoch: int, metrics: dict[str, float]) -> bool:
                nonlocal reported
                reported = True
                return hooks[group[position]](epoch, metrics)

            def on_leave(member: MemberResult) -> None:
                index = group[member.index]
                slot = slots[index]
                with stopping.deferred():
                    _finish(worker, slot, member, optuna.TrialPruned)
                outcomes[index] = _end(worker, study, slot)

            try:
                with stopping.interruptible():
                    fit_packed([slots[i].model for i in group],
                               [configs[i] for i in group],  # type: ignore[misc]
                               data, device=worker.device, on_epoch=on_epoch,
                               on_leave=on_leave)
                return
            except Exception as exc:
                if reported or len(group) == 1 or not out_of_memory(exc):
                    raise
            # Out of the `except` block: the error's traceback, and with it the failed
            # pack's tensors, are gone before the halves allocate theirs.
            free_device_memory(worker.device)
            half = (len(group) + 1) // 2
            log.warning("a pack of %d trials (%s) did not fit in memory on %s; "
                        "training them in packs of %d and %d", len(group),
                        ", ".join(f"#{slots[i].trial.number}" for i in group),
                        worker.device, half, len(group) - half)
            fit_group(group[:half])
            fit_group(group[half:])

        fit_group(list(range(len(slots))))
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (see `stopping`)
        ended = []
        for i, slot in enumerate(slots):
            if slot.done:
                continue
            slot.outcome.ended(ending_of(stop))
            outcomes[i] = _end(worker, study, slot, stop)
            ended.append(outcomes[i])
        stop.recorded = stopped_words(ended)  # type: ignore[attr-defined]
        raise
    except Exception as exc:  # the pack's step failed: every member still in it fails
        end = ending_of(exc, device=worker.device)
        log.debug("pack %s failed:\n%s", [s.trial.number for s in slots], end.detail)
        for i, slot in enumerate(slots):
            if slot.done:
                continue
            slot.outcome.ended(end)
            outcomes[i] = _end(worker, study, slot, exc)
    finally:
        for slot in slots:
            slot.model = None
        free_device_memory(worker.device)
    return [outcomes[i] for i in sorted(outcomes)]


def _finish(worker: Any, slot: _Slot, member: Any, pruned: type[Exception]) -> None:
    """The member's outcome from how its training ended, mapped as a lone trial's is
    (`endings`): COMPLETE after evaluation, PRUNED, or FAIL with reason and cause."""
    outcome = slot.outcome
    if member.error is not None:  # Diverged
        outcome.ended(ending_of(member.error))
        return
    result = member.result
    if result.stopped_early:
        outcome.ended(TrialEnd(Outcome.PRUNED, worker.pruned_reason(result.history)))
        return
    try:
        values, metrics = worker.complete(slot.trial, slot.config, slot.run, slot.model,
                                          worker.dataset(slot.config.dataset), result)
        outcome.values, outcome.metrics = values, metrics
        outcome.ended(COMPLETED)
    except Exception as exc:
        outcome.ended(ending_of(exc, device=worker.device))
