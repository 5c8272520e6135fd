"""How values, params, durations and trial states look in every table sweeper prints."""

from __future__ import annotations

import math
from typing import Any

STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan",
               "WAITING": "dim"}


def fmt_value(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1e5 else f"{value:.0f}"
    return f"{value:.3g}"


def fmt_params(params: dict[str, Any], width: int = 70) -> str:
    text = ", ".join(f"{k}={fmt_value(v) if isinstance(v, float) else v}"
                     for k, v in params.items())
    return text if len(text) <= width else text[: width - 1] + "…"


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
