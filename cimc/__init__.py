"""cimc: a compiler toolchain for analog compute-in-memory accelerators."""

from __future__ import annotations

__version__ = "0.1.0"
