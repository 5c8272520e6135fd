"""Background threads run at the lowest CPU priority, and only themselves."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from sweeper.tracking.priority import LOWEST_NICE, lower_this_thread

linux_only = pytest.mark.skipif(sys.platform != "linux",
                                reason="the nice value is per thread on Linux only")


def _nice_of(native_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, native_id)


@linux_only
def test_lowering_a_thread_leaves_the_main_thread_alone() -> None:
    main_nice = _nice_of(threading.get_native_id())
    seen: dict[str, int] = {}

    def background() -> None:
        lower_this_thread()
        seen["thread"] = _nice_of(threading.get_native_id())

    thread = threading.Thread(target=background)
    thread.start()
    thread.join()
    assert seen["thread"] == LOWEST_NICE
    assert _nice_of(threading.get_native_id()) == main_nice
    assert _nice_of(os.getpid()) == main_nice  # the process's own (main thread's) value


@linux_only
def test_the_trackers_upload_thread_runs_at_the_lowest_priority(tmp_path) -> None:
    from sweeper.tracking.tracker import MlflowTracker

    main_nice = _nice_of(threading.get_native_id())
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db")
    nice = tracker.submit(lambda: _nice_of(threading.get_native_id())).result(timeout=30)
    assert nice == LOWEST_NICE
    assert _nice_of(threading.get_native_id()) == main_nice  # training keeps its priority
