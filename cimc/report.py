"""Terminal tables, JSON and file output shared by the commands."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_table", "human", "write_bytes_atomic", "write_json_atomic", "write_text_atomic", "atomic_dir"]


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


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file so readers never see half of it (temp file in the same folder, then rename)."""
    from cimc.outputs import temporary_file

    p = Path(path)
    fd, tmp = temporary_file(p)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
    os.replace(tmp, p)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    from cimc.outputs import temporary_file

    p = Path(path)
    fd, tmp = temporary_file(p)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, p)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


class atomic_dir:
    """Context manager: build an output folder under a temporary name, move it into place on success.

    This replaces the whole destination; the commands' ``-o`` folders use :class:`cimc.outputs.output_dir`,
    which checks the destination first and keeps the user's files.

    On an exception the temporary folder is removed and an existing folder at the destination is left
    untouched; nothing half-written remains.
    """

    def __init__(self, dest: str | os.PathLike[str]):
        self.dest = Path(dest)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        from cimc.outputs import TMP_PREFIX, clean_stale_temporaries

        self.dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(self.dest.parent)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{self.dest.name}.{os.getpid()}.", dir=self.dest.parent))
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        import shutil

        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.chmod(self.tmp, 0o755)
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.dest, old)
            os.replace(self.tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)
