"""Run a checker (``lint-imports``, ``mypy``) on cimc's sources laid out as cimc is installed.

In the source tree ``passes/``, ``targets/`` and ``runtime/`` stand beside ``cimc/`` (setuptools' package-dir makes
them ``cimc.passes`` ...). import-linter and mypy read a package from one folder, so this copies the sources into
a temporary folder in the installed layout (nothing is imported or installed), runs the command there with
pyproject.toml's configuration, and prints its output with the paths of the source tree::

    python .ci/installed_layout.py lint-imports     # the layer contract, pyproject.toml [tool.importlinter]
    python .ci/installed_layout.py mypy             # pyproject.toml [tool.mypy]
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("passes", "targets", "runtime")  # pyproject.toml [tool.setuptools] package-dir
CONFIG = {"lint-imports": ["{config}", "--no-cache"], "mypy": ["--config-file", "{config}"]}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in CONFIG:
        print(f"usage: python .ci/installed_layout.py {{{','.join(CONFIG)}}} [options]", file=sys.stderr)
        return 2
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.onnx", "*.npz")
    with tempfile.TemporaryDirectory(prefix="cimc-layout-") as tmp:
        package = Path(tmp) / "cimc"
        shutil.copytree(ROOT / "cimc", package, ignore=ignore)
        for name in SUBPACKAGES:
            shutil.copytree(ROOT / name, package / name, ignore=ignore)
        config = str(ROOT / "pyproject.toml")
        command = [argv[0], *(a.format(config=config) for a in CONFIG[argv[0]]), *argv[1:]]
        # Both tools look packages up from their working folder first, so ``cimc`` is this copy.
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        out = done.stdout + done.stderr
        for name in SUBPACKAGES:  # cimc/passes/x.py -> passes/x.py
            out = re.sub(rf"(?<![\w/.]){re.escape('cimc/' + name)}/", f"{name}/", out)
        print(out.replace(tmp + "/", ""), end="")
        return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
