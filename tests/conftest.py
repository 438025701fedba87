"""Shared pytest fixtures.

Helpers that are plain functions (model builders, ONNX export, onnxruntime reference runs) live in
``tests/models.py`` (import it as ``tests.models``); this file only holds fixtures. Keep it short and
sorted by topic.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

# tests/ is not a package: test modules import their helpers as ``tests.models``, which needs the
# repository root on the path under the plain ``pytest`` command too (``python -m pytest`` adds it).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)


# ------------------------------------------------------------------------------------------ determinism
@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """One intra-op thread: the test machine's cores are shared, and torch's spinning OpenMP workers
    make a DenseNet forward pass 30x slower when another process holds a core."""
    torch.set_num_threads(1)


@pytest.fixture
def seeded() -> int:
    """Seeds torch and numpy's global generators; returns the seed."""
    seed = 1234
    torch.manual_seed(seed)
    np.random.seed(seed)
    return seed


# ------------------------------------------------------------------------------------------ command line
@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Call ``cimc.cli.main`` in-process: ``run_cli("inspect", path, "--json")`` → CliResult."""
    from cimc.cli import main

    def run(*argv: str | os.PathLike[str]) -> CliResult:
        capsys.readouterr()  # drop anything printed before
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def _cimc_command() -> list[str]:
    """The installed ``cimc`` console script beside this interpreter, else ``python -m cimc.cli``."""
    script = Path(sys.executable).parent / ("cimc.exe" if os.name == "nt" else "cimc")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cimc.cli"]


@pytest.fixture
def run_cimc_process() -> Callable[..., CliResult]:
    """Run the real ``cimc`` program in a subprocess: ``run_cimc_process("inspect", path)`` → CliResult."""

    def run(*argv: str | os.PathLike[str], timeout_s: float = 120.0) -> CliResult:
        proc = subprocess.run(
            [*_cimc_command(), *map(str, argv)], capture_output=True, text=True, timeout=timeout_s, check=False
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


# ------------------------------------------------------------------------------------------ Ray
@pytest.fixture(scope="session")
def ray_session():  # type: ignore[no-untyped-def]
    """One local Ray with 2 CPUs for the whole test session (starting Ray takes seconds); skips without Ray."""
    ray = pytest.importorskip("ray")
    # Ray's workers are new processes: they must import this checkout's cimc, not another installed copy.
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([_ROOT, path]) if path else _ROOT
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cimc's own Ray backend sets for its workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
