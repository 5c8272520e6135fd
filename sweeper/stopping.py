"""How a worker is asked to stop: Ctrl-C (SIGINT) or SIGTERM (`docker stop`, a batch
scheduler preempting it). The running trial ends FAIL with the reason ("interrupted",
"terminated (SIGTERM)") and its run KILLED, then the worker exits.

The signal handler raises `Stopped` at once, so that a long epoch stops now; it also
records the request, and the study loop calls `raise_if_stopped` at safe points (every
epoch, before every trial). Python drops an exception raised while it runs a garbage
collector callback ("Exception ignored in ..."), and a stop must not be lost that way.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


class Stopped(KeyboardInterrupt):
    """A request to stop, the way Ctrl-C stops; `reason` is what the trial records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_requested: str | None = None  # the reason of the first signal, while handlers are installed


def raise_if_stopped() -> None:
    """Raise `Stopped` if a signal asked this process to stop."""
    if _requested is not None:
        raise Stopped(_requested)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM stop the worker as described above. A second
    Ctrl-C interrupts whatever the worker is doing to record the first (a tracking server
    that does not answer, say); a second SIGTERM is ignored."""
    global _requested

    def handler(signum: int, frame: Any) -> None:
        global _requested
        if _requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        _requested = ("interrupted" if signum == signal.SIGINT else
                      f"terminated ({signal.Signals(signum).name})")
        raise Stopped(_requested)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _requested = None
