"""cimc: a compiler toolchain for analog compute-in-memory accelerators.

The public API (the command line calls exactly these):

* :func:`cimc.load` — import and canonicalise an ONNX model;
* :func:`cimc.inspect` — what a model contains and what maps onto the crossbar;
* :func:`cimc.compile` — map, quantise and schedule onto a target (a :class:`~cimc.artifact.CompiledModel`);
* :func:`cimc.simulate` — accuracy over time on simulated chips; :func:`cimc.run` — raw outputs;
* :func:`cimc.sweep` — accuracy vs TOPS/W over a grid of target variations.
"""

from __future__ import annotations

import logging
from pathlib import Path

# In a source checkout, passes/, targets/ and runtime/ stand beside cimc/ (the layout users asked for) and are
# installed as cimc.passes, cimc.targets, cimc.runtime by setuptools' package-dir. When this package is
# imported from the checkout itself (the tests, a notebook next to the repository), make them importable
# the same way. An installed cimc has them inside the package and this does nothing.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
if (_SOURCE_ROOT / "pyproject.toml").is_file() and (_SOURCE_ROOT / "targets" / "__init__.py").is_file():
    __path__.append(str(_SOURCE_ROOT))  # type: ignore[name-defined]  # noqa: F821

from cimc.api import compile, finetune, inspect, load, load_compiled, run, simulate
from cimc.errors import CimcError
from cimc.sweeps import sweep

__version__ = "0.1.0"
__all__ = ["CimcError", "__version__", "compile", "finetune", "inspect", "load", "load_compiled", "run", "simulate", "sweep"]

logging.getLogger("cimc").addHandler(logging.NullHandler())
