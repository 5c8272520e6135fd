"""The failure breaker and the upload queue that every MLflow call of a study goes through.

Tracking must never cost an Optuna result. Every call is guarded: a failure is a one-line
warning, and after `max_failures` failures in a row the store is taken to be *away*: calls
are skipped (none waits on a server that is down) and the store is asked again every
`REPROBE_S`. One background thread sends, in order, everything that need not block
training. The time spent is summed by operation in `seconds`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from sweeper.errors import is_disk_full
from sweeper.tracking.common import one_line
from sweeper.tracking.priority import lower_this_thread

log = logging.getLogger(__name__)

T = TypeVar("T")
REPROBE_S = 10.0  # while the store is away, how often it is asked again


class CallGuard:
    """Guarded calls, the background queue and the timing of one tracking store.

    `where` names the store in warnings; `probe()` (a quick request, no retries) is what
    `available` asks while the store is away: subclasses give it."""

    def __init__(self, where: str, *, max_failures: int = 3) -> None:
        self.where = where
        self.max_failures = max_failures
        self.disabled = False
        self.failures: list[str] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self.disk_full: str | None = None  # a tracking write that found the disk full
        self._consecutive_failures = 0
        self._reprobe_at = 0.0  # while `disabled` (the store is away): when to ask again
        self._queued: list[Future[Any]] = []  # background calls not yet waited for
        self._executor: ThreadPoolExecutor | None = None

    def probe(self) -> None:
        """Raise if the store does not answer."""
        raise NotImplementedError

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - started

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """`fn(*args, **kwargs)`, or None with a warning when it fails (never raises)."""
        if self.disabled:
            return None
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            self.failed(what, exc)
            return None
        self._consecutive_failures = 0
        return result

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run `fn` on the tracker's one background thread (calls keep their order)."""
        if self._executor is None:
            # Lowest CPU priority: the uploads run while training leaves a core idle,
            # instead of slowing every parallel op of the next trial (`priority`).
            self._executor = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="sweeper-mlflow",
                                                initializer=lower_this_thread)
        return self._executor.submit(fn, *args, **kwargs)

    def queue(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """`call(what, fn, ...)` on the background thread: a failure is a warning there."""
        if not self.disabled:
            self._queued.append(self.submit(self.call, what, fn, *args, **kwargs))

    def after_writes(self, fn: Callable[[], None]) -> None:
        """Call `fn` on the background thread once every call queued so far has run; now,
        when nothing runs there or tracking is off."""
        if self.disabled or self._executor is None:
            fn()
        else:
            self.submit(fn)

    def wait_queued(self) -> None:
        """Block until every background call queued so far has run."""
        queued, self._queued = self._queued, []
        for future in queued:
            future.result()

    def failed(self, what: str, exc: BaseException) -> None:
        """Record a tracking failure; switch tracking off after too many in a row."""
        message = f"MLflow ({self.where}): could not {what}: {one_line(exc)}"
        self.failures.append(message)
        if is_disk_full(exc) and self.disk_full is None:
            self.disk_full = message  # the study loop stops: every trial would lose this
        self._consecutive_failures += 1
        log.warning("%s", message)
        if self._consecutive_failures >= self.max_failures and not self.disabled:
            self.disabled = True
            self._reprobe_at = time.monotonic() + REPROBE_S
            log.warning("MLflow (%s) is not answering after %d failures in a row: the study "
                        "goes on and Optuna keeps every result; tracking resumes when it "
                        "answers, and what it missed is filled in", self.where,
                        self._consecutive_failures)

    def available(self) -> bool:
        """Whether tracking is on: true unless the store is away; then it is asked again
        (quickly, no retries) once `REPROBE_S` has passed since the last time."""
        if not self.disabled:
            return True
        if time.monotonic() < self._reprobe_at:
            return False
        try:
            self.probe()
        except Exception as exc:
            self._reprobe_at = time.monotonic() + REPROBE_S
            log.debug("MLflow still away: %s", one_line(exc))
            return False
        self.disabled = False
        self._consecutive_failures = 0
        log.warning("MLflow (%s) answers again: tracking resumes", self.where)
        return True

    def shutdown(self) -> None:
        """Stop the background thread; while the store is away, what is queued is dropped
        rather than waited for."""
        if self._executor is not None:
            self._executor.shutdown(wait=not self.disabled, cancel_futures=self.disabled)
            self._executor = None
