"""cimc: a compiler toolchain for analog compute-in-memory accelerators.

The public API (the command line calls exactly these):

* :func:`cimc.load` — import and canonicalise an ONNX model;
* :func:`cimc.inspect` — what a model contains and what maps onto the crossbar;
* :func:`cimc.compile` — map, quantise and schedule onto a target (a :class:`~cimc.artifact.CompiledModel`);
* :func:`cimc.simulate` — accuracy over time on simulated chips; :func:`cimc.run` — raw outputs.
"""

from __future__ import annotations

import logging

from cimc.api import compile, inspect, load, load_compiled, run, simulate
from cimc.errors import CimcError

__version__ = "0.1.0"
__all__ = ["CimcError", "__version__", "compile", "inspect", "load", "load_compiled", "run", "simulate"]

logging.getLogger("cimc").addHandler(logging.NullHandler())
