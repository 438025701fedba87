"""Terminal tables, JSON and file output shared by the commands."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# The terminal helpers live in the core (runtime prints progress too); re-exported for the face.
from cimc.console import format_table, human, progress_bar, use_color
from cimc.outputs import temporary_file

__all__ = ["progress_bar", "use_color", "format_table", "human", "json_ready", "write_bytes_atomic", "write_json_atomic",
           "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file so readers never see half of it (temp file in the same folder, then rename)."""
    p = Path(path)
    fd, tmp = temporary_file(p)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
    os.replace(tmp, p)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    p = Path(path)
    fd, tmp = temporary_file(p)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, p)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def json_ready(value: Any) -> Any:
    """JSON has no infinity or NaN: such numbers become null (in nested dicts, lists and tuples too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
