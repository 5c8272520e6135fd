"""Riding out a database blip: transient storage errors (a connection dropped, a server
restarting, a backend terminated) are retried with backoff for `STORAGE_RETRY_S`; a lasting
outage is a `StorageError` (one line, exit 2).

Only calls that can safely run twice are retried as they are (`harden` wraps those of an
Optuna RDB storage); asking for a trial and telling its result are retried by the study
loop, which checks first whether the earlier attempt landed.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sweeper.errors import StorageError, is_disk_full
from sweeper.fleet import stopping

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)
T = TypeVar("T")

STORAGE_RETRY_S = 30.0  # how long an outage may last before the worker gives up
STOPPING_RETRY_S = 3.0  # ... when the worker has been asked to stop: leave soon
FIRST_DELAY_S = 0.1
MAX_DELAY_S = 4.0

# Optuna RDB storage methods that can run twice with the same effect.
IDEMPOTENT = (
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_trial", "get_all_trials",
    "get_n_trials", "get_best_trial", "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id", "get_trial_param", "get_trial_params",
    "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies",
    "set_trial_param", "set_trial_user_attr", "set_trial_system_attr",
    "set_trial_intermediate_value", "set_study_user_attr", "set_study_system_attr",
    "record_heartbeat", "get_heartbeat_interval", "_get_trials", "_get_best_trial_id",
    "_set_trial_param",
)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a lost or refused database connection."""
    import sqlalchemy.exc

    if is_disk_full(exc):  # waiting does not free a disk
        return False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (sqlalchemy.exc.OperationalError,
                                sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(current, sqlalchemy.exc.DBAPIError) and current.connection_invalidated:
            return True
        text = str(current).lower()
        if any(sign in text for sign in ("server closed the connection",
                                         "terminating connection", "connection refused",
                                         "could not connect", "database is locked",
                                         "connection already closed")):
            return True
        current = current.__cause__ or current.__context__
    return False


def retry(fn: Callable[[], T], what: str, *, window_s: float | None = None,
          before_retry: Callable[[], T | None] | None = None) -> T:
    """`fn()`, retried with backoff while it fails transiently, for `window_s`
    (`STORAGE_RETRY_S`). `before_retry` may answer instead of the next attempt (it finds
    that the failed attempt landed after all); None means try again. A lasting outage
    raises `StorageError` naming `what`; other errors pass through."""
    window = STORAGE_RETRY_S if window_s is None else window_s
    started = time.monotonic()
    delay = FIRST_DELAY_S
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            elapsed = time.monotonic() - started
            limit = STOPPING_RETRY_S if stopping.requested() else window
            if elapsed + delay > limit:
                raise StorageError(f"could not {what}: the Optuna storage did not answer "
                                   f"for {elapsed:.0f} s ({_one_line(exc)})") from exc
            log.debug("could not %s (%s); trying again in %.1f s", what, _one_line(exc),
                      delay)
        time.sleep(delay)
        delay = min(2 * delay, MAX_DELAY_S)
        if before_retry is not None:
            try:
                answer = before_retry()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                answer = None
            if answer is not None:
                return answer


def harden(storage: optuna.storages.RDBStorage) -> optuna.storages.RDBStorage:
    """Wrap the storage's idempotent methods (`IDEMPOTENT`) in `retry`, on this instance."""
    for name in IDEMPOTENT:
        method = getattr(storage, name, None)
        if method is None or getattr(method, "_sweeper_retried", False):
            continue
        setattr(storage, name, _retried(method, name))
    return storage


def _retried(method: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return retry(lambda: method(*args, **kwargs),
                     f"{name.strip('_').replace('_', ' ')} in the Optuna storage")

    wrapper._sweeper_retried = True  # type: ignore[attr-defined]
    return wrapper


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
