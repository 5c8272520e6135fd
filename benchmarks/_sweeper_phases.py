"""`sweeper run ...` with clocks around its phases, for `vs_hand_loop.py`.

    python benchmarks/_sweeper_phases.py OUT.json run STUDY.yaml [options]

Runs the real command line (`sweeper.cli.main`) unchanged. Clocks are attached to sweeper's
functions only once their modules are imported by sweeper itself (an import hook), so the
process imports exactly what `sweeper run` imports, in the same order. Only the main
thread's time counts: work sweeper hands to its background thread overlaps training.
At exit, OUT.json holds the seconds per phase and when the first training batch started.
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import importlib.util
import json
import sys
import threading
import time

OUT = sys.argv.pop(1)
PHASES = {"data": 0.0, "train+validation": 0.0, "validation": 0.0, "final evaluation": 0.0,
          "tracking": 0.0}
FIRST_BATCH: list[float] = []
_inside: set[str] = set()  # phases being timed now (nested calls count once)


def clocked(fn, name):  # type: ignore[no-untyped-def]
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        if threading.current_thread() is not threading.main_thread() or name in _inside:
            return fn(*args, **kwargs)
        _inside.add(name)
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[name] += time.perf_counter() - started
            _inside.discard(name)
    return wrapper


def first_batch(fn):  # type: ignore[no-untyped-def]
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not FIRST_BATCH and kwargs.get("shuffle"):
            FIRST_BATCH.append(time.time())
        return fn(*args, **kwargs)
    return wrapper


# What to clock in each sweeper module, once sweeper imports it.
def _patch_data(module):  # type: ignore[no-untyped-def]
    module.load_dataset = clocked(module.load_dataset, "data")


def _patch_train(module):  # type: ignore[no-untyped-def]
    module.fit = clocked(module.fit, "train+validation")
    module._validate = clocked(module._validate, "validation")
    module.batches = first_batch(module.batches)


def _patch_evaluate(module):  # type: ignore[no-untyped-def]
    for name in ("evaluate", "evaluate_probabilities", "predict_proba"):
        if hasattr(module, name):
            setattr(module, name, clocked(getattr(module, name), "final evaluation"))


def _patch_tracker(module):  # type: ignore[no-untyped-def]
    end_study = module.MlflowTracker.end_study

    @functools.wraps(end_study)
    def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return end_study(self, *args, **kwargs)
        finally:
            # The tracker's own accounting of its main-thread calls; the nested clocks
            # inside end_study are already part of it.
            PHASES["tracking"] += sum(v for k, v in self.seconds.items()
                                      if k not in ("end_study.wait", "parent.figures"))
    module.MlflowTracker.end_study = wrapper


PATCHES = {"sweeper.ml.data": _patch_data, "sweeper.ml.train": _patch_train,
           "sweeper.ml.metrics": _patch_evaluate, "sweeper.tracking.tracker": _patch_tracker}


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module):  # type: ignore[no-untyped-def]
            exec_module(module)
            PATCHES[name](module)
        spec.loader.exec_module = patched  # type: ignore[method-assign]
        return spec


@atexit.register
def _write() -> None:
    with open(OUT, "w") as f:
        json.dump({"first_batch": FIRST_BATCH[0] if FIRST_BATCH else None,
                   "phases": PHASES}, f)


sys.meta_path.insert(0, _Hook())
from sweeper.cli import main  # noqa: E402

sys.argv[0] = "sweeper"
main()
