"""CPU priority of sweeper's background threads.

Training keeps every core busy (torch's intra-op threads, one per core). Any other CPU work
in the process, such as drawing a finished trial's figures or writing its model while the
next trial trains, takes a core from one of torch's threads, and every parallel operation
then waits for the slowest thread: on two cores, a background thread using half a core
slowed training far more than its own share. A background thread that only runs when a
core is otherwise idle costs training almost nothing, and its work is done by the end of the
study all the same.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

LOWEST_NICE = 19


def lower_this_thread() -> None:
    """Give the calling thread the lowest CPU priority (nice 19). Linux only, where the
    nice value belongs to a thread; elsewhere it would renice the whole process, so this
    does nothing. Never raises: priority is an optimisation."""
    if sys.platform != "linux" or not hasattr(os, "setpriority"):
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_NICE)
