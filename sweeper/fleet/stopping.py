"""How a worker is asked to stop: Ctrl-C (SIGINT) or SIGTERM (`docker stop`, a batch
scheduler preempting it). The running trial ends FAIL with the reason ("interrupted",
"terminated (SIGTERM)") and its run KILLED, then the worker exits.

Where a stop takes effect: only in the *interruptible* parts of a worker, the training
loop and the waits (`interruptible()`). Everywhere else (asking Optuna for a trial,
telling it the result, creating and ending an MLflow run, ending the study) the signal is
recorded and takes effect at the next interruptible point or `raise_if_stopped`: a
transaction cut in half would leave a trial RUNNING, or hold a database lock that the
way out then waits on. A second Ctrl-C raises at once wherever the worker is (a store that
does not answer must not keep the user waiting); a second SIGTERM is ignored.

The signal handler also records the request, and the study loop calls `raise_if_stopped`
at safe points (every epoch, before every trial): Python drops an exception raised while it
runs a garbage collector callback ("Exception ignored in ..."), and a stop must not be lost
that way.

Tests inject a signal at a named point (`checkpoint`) through `SWEEPER_TEST_SIGNAL_AT`
(see `checkpoint`); it is for tests only and costs one comparison when unset.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

TEST_SIGNAL_ENV = "SWEEPER_TEST_SIGNAL_AT"


class Stopped(KeyboardInterrupt):
    """A request to stop, the way Ctrl-C stops; `reason` is what the trial records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_requested: str | None = None  # the reason of the first signal, while handlers are installed
_installed = False
_interruptible = True  # outside `stop_on_signals` nothing is deferred (plain Ctrl-C)


def requested() -> str | None:
    """The reason of a stop asked for and not yet acted on, else None."""
    return _requested


def raise_if_stopped() -> None:
    """Raise `Stopped` if a signal asked this process to stop."""
    if _requested is not None:
        raise Stopped(_requested)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block a first SIGINT/SIGTERM is only recorded (bookkeeping that must not
    be torn); it takes effect at the next interruptible point."""
    global _interruptible
    before, _interruptible = _interruptible, False
    try:
        yield
    finally:
        _interruptible = before


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block a signal stops the worker at once (training, waiting); a stop asked
    for before it is acted on when the block starts."""
    global _interruptible
    before, _interruptible = _interruptible, True
    try:
        raise_if_stopped()
        yield
    finally:
        _interruptible = before


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM stop the worker as described above; the block
    itself is deferred (see `interruptible`)."""
    global _requested, _installed, _interruptible

    def handler(signum: int, frame: Any) -> None:
        global _requested
        if _requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt(_requested)
            return
        _requested = ("interrupted" if signum == signal.SIGINT else
                      f"terminated ({signal.Signals(signum).name})")
        if _interruptible:
            raise Stopped(_requested)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    was = _interruptible
    _installed, _interruptible = True, False
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _requested, _installed, _interruptible = None, False, was


# --------------------------------------------------------------------------------------
# Test-only: a signal at a named point
# --------------------------------------------------------------------------------------
def _test_target() -> tuple[str, int, int] | None:
    """`SWEEPER_TEST_SIGNAL_AT=<point>:<SIGNAL>[:<n>]`: send SIGNAL to this process the
    n-th time (default 1) it passes `checkpoint(point)`. For tests only."""
    value = os.environ.get(TEST_SIGNAL_ENV)
    if not value:
        return None
    point, _, rest = value.partition(":")
    name, _, nth = rest.partition(":")
    return point, int(signal.Signals[name or "SIGINT"]), int(nth or 1)


_TEST_TARGET = _test_target()
_test_passes = 0


def checkpoint(point: str) -> None:
    """A named point of the worker where tests may inject a signal (see `_test_target`):
    "after-ask", "in-tell", "in-create-run", "in-end-study", "between-trials"."""
    if _TEST_TARGET is None or _TEST_TARGET[0] != point:
        return
    global _test_passes
    _test_passes += 1
    if _test_passes == _TEST_TARGET[2]:
        os.kill(os.getpid(), _TEST_TARGET[1])
