"""The ``cimc`` command: a thin layer over the Python API.

Every user error (a :class:`~cimc.errors.CimcError`) is printed as one line on stderr with exit code 2;
``--debug`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

from cimc.errors import CimcError

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        _COMMANDS[name] = fn
        return fn

    return register


# ------------------------------------------------------------------------------------------ inspect
@command("inspect")
def _inspect(args: argparse.Namespace) -> int:
    import cimc

    report = cimc.inspect(args.model, batch=args.batch, canonicalize=not args.raw)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
    return 0


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show a model's nodes, shapes, parameters, MACs and what maps to analog")
    p.add_argument("model", help="path to an .onnx file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--batch", type=int, default=1, help="batch size to fix a dynamic batch dimension (default 1)")
    p.add_argument("--raw", action="store_true", help="inspect the imported graph without canonicalisation")


_PARSER_BUILDERS: list[Callable[[Any], None]] = [_add_inspect]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cimc",
        description="Compile ONNX models for analog compute-in-memory (PCM crossbar) accelerators, "
        "simulate them under device noise and drift, and export the mapping.",
    )
    from cimc import __version__

    parser.add_argument("--version", action="version", version=f"cimc {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _PARSER_BUILDERS:
        add(sub)
    return parser


def _quiet_libraries() -> None:
    for name in ("onnxscript", "onnx_ir", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="onnxscript")
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        _quiet_libraries()
    if not args.command:
        parser.print_help()
        return 0
    try:
        return _COMMANDS[args.command](args)
    except CimcError as exc:
        if args.debug:
            raise
        print(f"cimc {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cimc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
