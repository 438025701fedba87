"""CPU threads for torch: as many as the cores this process may run on, and no busy-waiting.

Two settings decide how a simulation behaves on a machine it shares with other jobs:

* **The thread count.** torch starts one intra-op thread per physical core of the machine, whatever the
  process's CPU affinity (``taskset``, a container's cpuset, a batch scheduler). :func:`set_torch_threads`
  uses the cores this process is given (``os.sched_getaffinity``) unless told otherwise (``--threads``).
* **The OpenMP wait policy.** torch's CPU build runs its parallel regions on GNU OpenMP, whose idle workers
  spin at each barrier by default. When another process holds one of the cores, a spinning worker and the
  worker it waits for fight for the same core, and every small parallel region pays for it: a batched KWS
  simulation step measured 0.7-1.0 s with two threads instead of 29 ms with ``OMP_WAIT_POLICY=PASSIVE``
  (``benchmarks/simulate_speed.py`` measures both). libgomp reads the variable once, when torch is first
  imported, so :func:`prefer_passive_openmp` must run before that: ``import cimc`` calls it (and so does the
  ``cimc`` command, whose entry point imports the package first). A value already set in the environment
  wins; importing torch before cimc keeps torch's default.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["available_cores", "prefer_passive_openmp", "set_torch_threads"]

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Number of CPU cores this process may run on (its affinity mask; all cores where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def prefer_passive_openmp() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless set already; True when it takes effect (torch not yet imported)."""
    if "torch" in sys.modules:
        return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE"


def set_torch_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (None or 0: the cores this process is given); returns it."""
    from cimc.errors import InputError

    if threads is not None and (isinstance(threads, bool) or int(threads) != threads or threads < 0):
        raise InputError(f"--threads {threads!r} is invalid; give a whole number >= 1 (0 = the cores available)")
    n = int(threads) if threads else available_cores()
    import torch

    torch.set_num_threads(n)
    logger.debug("torch intra-op threads: %d (OMP_WAIT_POLICY=%s)", n, os.environ.get("OMP_WAIT_POLICY", "unset"))
    return n
