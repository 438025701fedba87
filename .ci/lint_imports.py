"""Run ``lint-imports`` (the layer contract in pyproject.toml) on cimc laid out as it is installed.

In the source tree ``passes/``, ``targets/`` and ``runtime/`` stand beside ``cimc/`` (setuptools' package-dir makes
them ``cimc.passes`` ...); import-linter reads packages from one folder, so the contract is checked on a copy of
the sources in the installed layout (a temporary folder; nothing is imported or installed).

    python .ci/lint_imports.py [lint-imports options]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("passes", "targets", "runtime")  # pyproject.toml [tool.setuptools] package-dir


def main(argv: list[str]) -> int:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.onnx", "*.npz")
    with tempfile.TemporaryDirectory(prefix="cimc-lint-imports-") as tmp:
        package = Path(tmp) / "cimc"
        shutil.copytree(ROOT / "cimc", package, ignore=ignore)
        for name in SUBPACKAGES:
            shutil.copytree(ROOT / name, package / name, ignore=ignore)
        # lint-imports puts its working folder first on sys.path, so ``cimc`` is this copy.
        command = ["lint-imports", str(ROOT / "pyproject.toml"), "--no-cache", *argv]
        return subprocess.call(command, cwd=tmp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
