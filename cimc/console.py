"""Terminal text shared by every layer: tables, SI numbers, progress bars and the colour rule.

It holds no cimc types and imports nothing of cimc, so the runtime and the core may print progress and tables;
drawing results (figures, report files) stays in the face (:mod:`cimc.plots`, :mod:`cimc.report`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "human", "progress_bar", "use_color"]


def use_color(stream: Any = None) -> bool:
    """Colour only on a terminal and only when ``NO_COLOR`` is unset (https://no-color.org)."""
    import sys

    stream = sys.stderr if stream is None else stream
    return not os.environ.get("NO_COLOR") and bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(total: int, desc: str, unit: str = "it", **kwargs: Any) -> Any:
    """A tqdm bar on stderr. On a terminal it redraws in place; in a log (not a TTY) it stays silent for jobs
    shorter than 30 s and then writes a plain line at most every 30 s instead of carriage-return updates; it
    never colours when ``NO_COLOR`` is set."""
    import sys

    from tqdm import tqdm

    tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
    options: dict[str, Any] = {"leave": False, "dynamic_ncols": True} if tty else {
        "mininterval": 30.0, "maxinterval": 60.0, "ncols": 80, "ascii": True, "leave": True, "delay": 30.0}
    if not use_color():
        options["colour"] = None
    options.update(kwargs)
    stream = sys.stderr if tty else _LineWriter(sys.stderr)
    return tqdm(total=total, desc=desc, unit=unit, file=stream, **options)


class _LineWriter:
    """A stream for tqdm in logs: every status update becomes its own line, no carriage returns."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").replace("\x1b[A", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def human(n: float, unit: str = "") -> str:
    """1234567 → '1.23 M' (SI prefixes; small numbers unchanged)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {prefix}{unit}".rstrip()
    return f"{n:.4g} {unit}".rstrip() if isinstance(n, float) else f"{n} {unit}".rstrip()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain-text table; columns whose index is in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
