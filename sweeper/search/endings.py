"""How a trial ended, from the exception that ended it (or none): the one place that decides.

The worker loop tells Optuna from this, and the trial's MLflow run is closed from the same
answer (`sweeper.keys.Outcome` maps the state to the run's status): a trial is never
COMPLETE in one store and FAILED in the other.

| ended by | Optuna | MLflow | cause |
|---|---|---|---|
| nothing (the objective returned) | COMPLETE | FINISHED | |
| `optuna.TrialPruned` | PRUNED | KILLED | |
| `TrialFailure`, `ConfigError`, out of memory | FAIL | FAILED | params |
| a full disk | FAIL | FAILED | disk-full |
| any other exception | FAIL | FAILED | environment |
| Ctrl-C, SIGTERM (`KeyboardInterrupt`) | FAIL | KILLED | interrupted (re-queued once) |
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

from sweeper.errors import ConfigError, TrialFailure, is_disk_full
from sweeper.keys import Outcome


@dataclass(frozen=True)
class TrialEnd:
    state: Outcome
    reason: str | None = None
    detail: str | None = None  # the traceback of an unexpected error, for the record
    # Why a FAIL happened: "params" (this config: infeasible, diverged, out of memory),
    # "environment" (anything else: the machine, the storage, a bug), "disk-full" or
    # "interrupted".
    cause: str | None = None

    @property
    def interrupted(self) -> bool:
        return self.cause == "interrupted"

    @property
    def mlflow_status(self) -> str:
        """A stopped trial's run is KILLED: a person stopped it, its config did not fail."""
        return "KILLED" if self.interrupted else self.state.mlflow_status


COMPLETED = TrialEnd(Outcome.COMPLETE)


def ending_of(exc: BaseException, *, device: object | None = None) -> TrialEnd:
    """The end of a trial that `exc` stopped (`device`: where it trained, for the words of
    an out-of-memory reason)."""
    import optuna

    if isinstance(exc, optuna.TrialPruned):
        return TrialEnd(Outcome.PRUNED, str(exc) or "pruned")
    if isinstance(exc, (TrialFailure, ConfigError)):
        return TrialEnd(Outcome.FAIL, str(exc), cause="params")
    if isinstance(exc, Exception):
        detail = "".join(traceback.format_exception(exc))
        if out_of_memory(exc):
            # Too big for this device (batch size, width): the config's fault.
            where = f" on {device}" if device is not None else ""
            return TrialEnd(Outcome.FAIL, f"out of memory{where}: {one_line(str(exc))}",
                            detail, "params")
        return TrialEnd(Outcome.FAIL, f"{type(exc).__name__}: {one_line(str(exc))}", detail,
                        "disk-full" if is_disk_full(exc) else "environment")
    # KeyboardInterrupt (Ctrl-C, or SIGTERM: see `fleet.stopping`), SystemExit
    return TrialEnd(Outcome.FAIL, getattr(exc, "reason", None) or "interrupted",
                    cause="interrupted")


def out_of_memory(exc: BaseException) -> bool:
    """A device out of memory (CUDA, MPS), or the host's memory refused to torch's CPU
    allocator (a RuntimeError "DefaultCPUAllocator: can't allocate memory")."""
    import sys

    torch = sys.modules.get("torch")  # no torch loaded: no torch error either
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


@dataclass
class TrialOutcome:
    """How one trial ended, as shown to the user and told to Optuna."""

    number: int
    state: Outcome  # COMPLETE | PRUNED | FAIL (a str)
    values: list[float] | None = None
    reason: str | None = None
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    detail: str | None = None  # the traceback of an unexpected error, for the record
    interrupted: bool = False  # stopped by Ctrl-C or a signal, not by its config
    retry: int | None = None  # a stopped trial's WAITING copy, trained by the next run
    # Why a FAIL happened: "params" (this config: infeasible, diverged, out of memory),
    # "environment" (anything else: the machine, the storage, a bug) or "interrupted".
    cause: str | None = None

    def ended(self, end: TrialEnd) -> None:
        """Take the state, reason and cause of how the trial ended (see `endings`)."""
        self.state, self.reason, self.detail, self.cause = (end.state, end.reason, end.detail,
                                                            end.cause)
        self.interrupted = end.interrupted
