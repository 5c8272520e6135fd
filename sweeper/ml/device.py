"""The torch device a trial trains on: `--device`, or CUDA when there is one."""

from __future__ import annotations

import torch

from sweeper.errors import SweeperError


def resolve_device(name: str | None = None) -> torch.device:
    """The torch device a name asks for; `None`/"auto" picks CUDA when there is one.

    Checked here, before any study is written, so that `--device cuda` on a machine
    without CUDA is one clear line instead of a traceback deep inside the first trial.
    """
    if name is None or name.strip().lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name.strip().lower())
    except (RuntimeError, ValueError):
        raise SweeperError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise SweeperError(f"device {name!r} is not supported; sweeper trains on cpu or cuda "
                           f"(use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise SweeperError(f"device {name!r} asked for, but CUDA is not available on this "
                           f"machine; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise SweeperError(f"device {name!r} does not exist: this machine has {count} CUDA "
                           f"device(s), cuda:0 to cuda:{count - 1}")
    return device


def free_device_memory(device: torch.device) -> None:
    """Give a finished trial's device memory back before the next one (CUDA keeps freed
    blocks cached; reference cycles may still hold tensors)."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
