"""cimc: a compiler toolchain for analog compute-in-memory accelerators.

The public API (the command line calls exactly these):

* :func:`cimc.load` — import and canonicalise an ONNX model;
* :func:`cimc.inspect` — what a model contains and what maps onto the crossbar.
"""

from __future__ import annotations

import logging

from cimc.api import inspect, load
from cimc.errors import CimcError

__version__ = "0.1.0"
__all__ = ["CimcError", "__version__", "inspect", "load"]

logging.getLogger("cimc").addHandler(logging.NullHandler())
