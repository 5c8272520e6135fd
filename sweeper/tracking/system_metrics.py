"""System metrics while a trial trains: CPU, memory and, on a CUDA device, GPU memory and
utilisation, sampled on a small thread and sent as `system/...` metrics (MLflow's own
names, so its UI shows them in the run's "System metrics" tab).

Not MLflow's `SystemMetricsMonitor`: that one asks the store for the run at every sample
and logs on its own client, outside the tracker's queue and its handling of a store that
went away. Here a sample is a few psutil calls (measured by
`benchmarks/system_metrics_cost.py`) and its metrics join the run's upload queue.

On by default; MLflow's own switches apply: `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`
turns it off, `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` sets the seconds between samples.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

ENABLE_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
INTERVAL_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
DEFAULT_INTERVAL_S = 5.0
PREFIX = "system/"
MIN_LAST_SAMPLE_S = 1.0  # a trial that ran this long since the last sample gets one more


def enabled() -> bool:
    """On unless `$MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING` says false (or psutil is missing)."""
    if os.environ.get(ENABLE_ENV, "").strip().lower() in ("false", "0", "no", "off"):
        return False
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def interval_s() -> float:
    try:
        value = float(os.environ.get(INTERVAL_ENV) or DEFAULT_INTERVAL_S)
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value > 0 else DEFAULT_INTERVAL_S


def sample(device: str | None) -> dict[str, float]:
    """One reading: memory of the machine and of this process; the GPU's memory and (with
    nvidia-ml-py installed) utilisation when `device` is a CUDA device. (CPU use is a rate
    between two readings: `SystemSampler` adds it.)"""
    import psutil

    memory = psutil.virtual_memory()
    process = psutil.Process()
    out = {
        "system_memory_usage_megabytes": memory.used / 1e6,
        "system_memory_usage_percentage": memory.used / memory.total * 100,
        "process_memory_usage_megabytes": process.memory_info().rss / 1e6,
    }
    if device and device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        out[f"gpu_{index}_memory_usage_megabytes"] = torch.cuda.memory_reserved(index) / 1e6
        total = torch.cuda.get_device_properties(index).total_memory
        out[f"gpu_{index}_memory_usage_percentage"] = (torch.cuda.memory_reserved(index)
                                                       / total * 100)
        with contextlib.suppress(Exception):  # needs nvidia-ml-py
            out[f"gpu_{index}_utilization_percentage"] = float(torch.cuda.utilization(index))
    return out


class SystemSampler:
    """Samples every `interval` seconds on a daemon thread and hands each reading to `send`
    (`{name: value}`, step, timestamp in ms), which must not block. `stop` ends the thread
    and takes a last reading if the trial ran on since the previous one."""

    def __init__(self, send: Callable[[dict[str, float], int, int], Any],
                 device: str | None, interval: float | None = None) -> None:
        self.send = send
        self.device = device
        self.interval = interval or interval_s()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._step = 0
        self._last = 0.0
        self._lock = threading.Lock()
        self._cpu_times = (0.0, 0.0)  # (idle, total) seconds of all CPUs at the last reading

    def _cpu_percent(self) -> float:
        """The machine's CPU use since the last reading, in percent of all its CPUs.
        (psutil.cpu_percent keeps its last reading per thread; the last reading of a
        trial is taken on another thread than the others.)"""
        import psutil

        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
        (last_idle, last_total), self._cpu_times = self._cpu_times, (idle, total)
        elapsed = total - last_total
        if elapsed <= 0:
            return 0.0
        return max(0.0, min(100.0, 100.0 * (1.0 - (idle - last_idle) / elapsed)))

    def start(self) -> None:
        self._cpu_percent()  # the first reading of CPU use is since this call
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="sweeper-system-metrics",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def _take(self) -> None:
        with self._lock:
            try:
                values = {"cpu_utilization_percentage": self._cpu_percent(),
                          **sample(self.device)}
                reading = {PREFIX + k: v for k, v in values.items()}
                self.send(reading, self._step, int(time.time() * 1000))
            except Exception as exc:  # a reading is never worth a trial
                log.debug("system metrics sample failed: %s", exc)
            self._step += 1
            self._last = time.monotonic()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        # One more reading for a trial that ran on since the last one, and always one for
        # a trial shorter than the interval: every run shows what its trial used.
        if self._step == 0 or time.monotonic() - self._last >= MIN_LAST_SAMPLE_S:
            self._take()
