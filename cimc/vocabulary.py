"""The words the command line accepts — time units, metric names, diagnosis causes — importable without torch.

``cimc --help`` builds every subcommand's parser; its choices and help texts come from here so that building
the parser imports nothing heavy (the simulator and the metrics re-export these names).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from cimc.errors import InputError

__all__ = ["CAUSES", "CAUSE_LABELS", "DURATION_HELP", "LABEL_METRICS", "LOW_SNR_DB", "METRICS", "check_time",
           "format_duration", "parse_duration", "parse_times"]

LABEL_METRICS = ("accuracy", "top5")
METRICS = ("accuracy", "top5", "cosine", "mse", "snr", "relerr")

# The non-idealities ``cimc diagnose`` separates, in the order its table and figure show them.
CAUSES = ("dac", "adc", "output", "programming", "drift", "read")
CAUSE_LABELS = {"dac": "DAC quantisation", "adc": "ADC quantisation", "output": "output (periphery) noise",
                "programming": "programming noise",
                "drift": "drift (compensated)", "read": "read noise", "all": "all together"}
LOW_SNR_DB = 20.0  # a layer below this output SNR (dB) is flagged by diagnose (docs/diagnose.md)

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0,
          "mo": 2629800.0, "M": 2629800.0, "y": 31557600.0}
DURATION_HELP = "units: s, min (or m), h, d, w, mo (or M: month = 1/12 year), y; a bare number is seconds"


def parse_duration(text: str) -> float:
    """'1s', '15min', '24h', '30d', '6mo', '1y', '3600' → seconds (> 0). ``m`` is minutes, ``M``/``mo`` months."""
    m = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]+)?\s*", str(text))
    unit = None if not m else (m.group(2) or "s")
    if unit is not None and unit not in _UNITS:
        unit = unit.lower() if unit.lower() in _UNITS and unit.lower() != "m" else None
    if not m or unit is None:
        raise InputError(f"cannot read time {text!r}; write e.g. 1s, 15min, 24h, 30d, 6mo, 1y ({DURATION_HELP})")
    return check_time(float(m.group(1)) * _UNITS[unit], text)


def check_time(t_s: float, text: Any = None) -> float:
    """``t_s`` itself if it is a finite time after programming (> 0 s); InputError otherwise."""
    if not (math.isfinite(t_s) and t_s > 0):
        shown = text if text is not None else t_s
        raise InputError(f"time {shown!r} is not after programming; give a positive time, e.g. 1s or 24h")
    return float(t_s)


def format_duration(t_s: float) -> str:
    for unit, size in (("y", _UNITS["y"]), ("mo", _UNITS["mo"]), ("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if t_s >= size and abs(t_s / size - round(t_s / size)) < 1e-9:
            return f"{round(t_s / size)}{unit}"
    return f"{t_s:g}s"


def parse_times(drift: str | float | Sequence[float | str]) -> list[float]:
    """Times after programming in seconds from "1s,24h,6mo" or a list of seconds/strings; all must be > 0."""
    items = drift.split(",") if isinstance(drift, str) else [drift] if isinstance(drift, (int, float)) else drift
    return [parse_duration(t) if isinstance(t, str) else check_time(float(t)) for t in items]
