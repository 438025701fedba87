"""Optional dependencies, imported on use with a one-line error naming how to install them."""

from __future__ import annotations

from typing import Any

from cimc.errors import InputError

__all__ = ["import_pandas"]


def import_pandas() -> Any:
    """The pandas module, for the result objects' ``to_pandas()``; a one-line error if it is not installed."""
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError("to_pandas() needs pandas: pip install pandas") from exc
    return pd
