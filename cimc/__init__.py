"""cimc: a compiler toolchain for analog compute-in-memory accelerators.

The public API (the command line calls exactly these):

* :func:`cimc.load` — import and canonicalise an ONNX model;
* :func:`cimc.inspect` — what a model contains and what maps onto the crossbar;
* :func:`cimc.compile` — map, quantise and schedule onto a target (a :class:`~cimc.artifact.CompiledModel`);
* :func:`cimc.simulate` — accuracy (or any metric) over time on simulated chips; :func:`cimc.run` — raw outputs;
* :func:`cimc.diagnose` — which layer and which non-ideality cost the accuracy, and what to change;
* :func:`cimc.harden` — try mitigations on the simulator until the model meets a goal on the chip;
* :func:`cimc.sweep` — accuracy vs TOPS/W over a grid of target variations.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cimc.threads import prefer_passive_openmp

# Before anything below imports torch: OpenMP workers that sleep instead of spinning (cimc/threads.py).
prefer_passive_openmp()

# In a source checkout, passes/, targets/ and runtime/ stand beside cimc/ (the layout users asked for) and are
# installed as cimc.passes, cimc.targets, cimc.runtime by setuptools' package-dir. When this package is
# imported from the checkout itself (the tests, a notebook next to the repository), make them importable
# the same way. An installed cimc has them inside the package and this does nothing.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
if (_SOURCE_ROOT / "pyproject.toml").is_file() and (_SOURCE_ROOT / "targets" / "__init__.py").is_file():
    __path__.append(str(_SOURCE_ROOT))  # type: ignore[name-defined]  # noqa: F821

from cimc.errors import CimcError

__version__ = "0.2.0"
# The API and its error type only; modules (cimc.api, cimc.data, ...) stay importable by name.
__all__ = ["CimcError", "compile", "diagnose", "finetune", "harden", "inspect", "load", "load_compiled", "run", "simulate",
           "sweep"]

logging.getLogger("cimc").addHandler(logging.NullHandler())

# The API pulls in torch, onnxruntime and onnxscript (seconds); ``cimc --version``, ``--help`` and ``targets``
# need none of them. The API functions are therefore imported on first use (PEP 562).
_API = frozenset({"compile", "diagnose", "finetune", "harden", "inspect", "load", "load_compiled", "run", "simulate",
                  "sweep"})


def __getattr__(name: str) -> object:
    if name in _API:
        if name == "sweep":
            from cimc import sweeps as api  # the sweep runner lives beside the API, not in it
        else:
            from cimc import api
        value = getattr(api, name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'cimc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
