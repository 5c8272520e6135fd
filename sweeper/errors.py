"""The few exceptions sweeper raises on purpose.

`SweeperError` is a problem the user can fix: the CLI prints its message on one line and
exits with code 2 (a traceback only with ``--debug``). `TrialFailure` is the outcome of
one trial that ends FAIL with the message as its reason; the study goes on.
"""

from __future__ import annotations


class SweeperError(Exception):
    """A problem with the user's input or environment, told in one line."""


class ConfigError(SweeperError):
    """A study file that breaks the contract: names the file, the key path and the fix."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 line: int | None = None) -> None:
        self.file = file
        self.key = key
        self.line = line
        self.detail = message
        where = file or "<study>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


class DataError(SweeperError):
    """A dataset that cannot be found, downloaded or read."""


class StorageError(SweeperError):
    """An Optuna storage that cannot be reached or holds something unexpected."""


class DiskFull(SweeperError):
    """A disk this worker writes to is full: its trials would all fail the same way."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or what caused it, is a full disk (ENOSPC, SQLite's SQLITE_FULL)."""
    import errno

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current).lower()
        if "no space left on device" in text or "database or disk is full" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


class TrackingError(SweeperError):
    """An MLflow tracking store or server that cannot be reached or refuses a request."""


class ResultError(SweeperError):
    """A question about results with no answer: an unknown study, no completed trial, a
    trial whose model was not logged."""


class TrialFailure(SweeperError):
    """One trial cannot go on; it ends FAIL with this message as its reason."""


class InfeasibleConfig(TrialFailure):
    """A model whose layer shapes do not fit its input; found before any training."""


class DuplicateGridPoint(TrialFailure):
    """Another worker holds this trial's grid point; it ends FAIL untrained."""


class Diverged(TrialFailure):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        super().__init__(f"diverged at epoch {epoch}")
