"""Durations as the config writes them ("15ms", "10m", "1h30m") and as the agent shows them."""

from __future__ import annotations

import math
import re

# threading/asyncio timers overflow somewhere past ~292 years; ten years is longer than any sane use
MAX_DURATION = 3650 * 86400.0

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_BARE_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?\s*(?:ms|s|m|h|d|w)\s*)+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)")
DURATION_HELP = "a duration such as 15ms, 30s, 10m, 1h, 1d, 1w or 1h30m"


def parse_duration(text: str | int | float) -> float:
    """Seconds in "15ms", "30s", "10m", "1h", "1d", "1w", "1h30m"; a bare number means seconds."""
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}: expected {DURATION_HELP}")
    if isinstance(text, (int, float)):
        seconds = float(text)
    elif isinstance(text, str):
        stripped = text.strip()
        if _BARE_NUMBER.fullmatch(stripped):
            seconds = float(stripped)
        elif _DURATION.fullmatch(stripped):
            seconds = 0.0
            for number, unit in _DURATION_PART.findall(stripped):
                # dividing keeps "15ms" == 0.015 exactly, where 15 * 0.001 would not be
                seconds += float(number) / 1000 if unit == "ms" else float(number) * _UNIT_SECONDS[unit]
        else:
            raise ValueError(f"invalid duration {text!r}: expected {DURATION_HELP}")
    else:
        raise TypeError(f"duration must be a str, int or float, not {type(text).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {text!r}: expected {DURATION_HELP}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact unit for display: 600 -> "10m", 90 -> "90s", 0.015 -> "15ms"."""
    if isinstance(seconds, bool) or not math.isfinite(seconds):
        raise ValueError(f"cannot format {seconds!r} as a duration")
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds == int(seconds):
        whole = int(seconds)
        for unit in ("w", "d", "h", "m"):
            size = int(_UNIT_SECONDS[unit])
            if whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    millis = seconds * 1000
    if abs(millis - round(millis)) < 1e-6:
        return f"{round(millis)}ms"
    return f"{millis:.6f}".rstrip("0").rstrip(".") + "ms"
