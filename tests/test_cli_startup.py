"""The commands that need no model start without torch or onnxruntime: ``--version``, ``--help``, ``targets``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import sys
import cimc.cli
try:
    code = cimc.cli.main({argv!r})
except SystemExit as exc:  # argparse exits after --version / --help
    code = exc.code
heavy = sorted(m for m in ("torch", "onnxruntime", "onnxscript") if m in sys.modules)
assert code in (0, None), code
assert not heavy, f"imported {{heavy}}"
print("light")
"""


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["targets"], ["targets", "show", "aon-cim"]])
def test_light_commands_do_not_import_torch(argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _PROBE.format(argv=argv)], capture_output=True, text=True,
                            env=env, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("light")


def test_api_is_still_reachable_from_the_package() -> None:
    """The lazy package attributes resolve to the API functions (and are cached after the first use)."""
    import cimc
    import cimc.api

    assert cimc.load is cimc.api.load and cimc.compile is cimc.api.compile
    assert "simulate" in dir(cimc)
    with pytest.raises(AttributeError):
        cimc.no_such_function  # noqa: B018
