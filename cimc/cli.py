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
from pathlib import Path
from typing import Any

from cimc.errors import CimcError, InputError

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


# ------------------------------------------------------------------------------------------ targets
@command("targets")
def _targets(args: argparse.Namespace) -> int:
    from cimc.report import format_table
    from cimc.targets import list_targets, load_target, schema_json, target_yaml

    if args.action == "show":
        if not args.name:
            raise InputError("'cimc targets show' needs a target name or YAML path, e.g. 'cimc targets show aon-cim'")
        print(target_yaml(load_target(args.name)), end="")
    elif args.action == "schema":
        print(schema_json())
    else:
        rows = []
        for name, description in list_targets():
            t = load_target(name)
            rows.append([name, f"{t.array.count or 'any'} x {t.array.rows}x{t.array.cols}", t.execution, t.device.model,
                         description])
        print(format_table(["target", "arrays (rows x device cols)", "execution", "device", "description"], rows))
        print("\nA YAML file works wherever a target name does: 'cimc targets show aon-cim > my-chip.yaml', edit, then "
              "'--target my-chip.yaml'.")
    return 0


def _add_targets(sub: Any) -> None:
    p = sub.add_parser("targets", help="list hardware targets, show one as YAML, or print the target JSON Schema")
    p.add_argument("action", nargs="?", choices=["list", "show", "schema"], default="list")
    p.add_argument("name", nargs="?", help="target name or YAML path (for 'show')")


# ------------------------------------------------------------------------------------------ compile
def _add_target_options(p: Any) -> None:
    p.add_argument("--target", "-t", default="aon-cim", help="target preset name or YAML file (default aon-cim)")
    p.add_argument("--dac-bits", type=int, help="override the target's DAC (input) bits; 0 = no quantisation")
    p.add_argument("--adc-bits", type=int, help="override the target's ADC (output) bits; 0 = no quantisation")


@command("compile")
def _compile(args: argparse.Namespace) -> int:
    from cimc.compiler import compile_model

    out = args.output or f"{Path(args.model).stem}.cimc"
    compiled = compile_model(
        args.model, args.target, pipeline=args.pipeline, calibration=args.calib, training=args.finetune,
        validation=args.val, dac_bits=args.dac_bits, adc_bits=args.adc_bits, batch=args.batch, seed=args.seed,
        progress=not args.quiet, out_dir=out,
    )
    if not args.quiet:
        print(compiled.summary_table())
    print(f"\nwrote {out}/ (model.onnx, report.json, occupancy.png, schedule.trace.json, target.yaml, manifest.json)")
    return 0


def _add_compile(sub: Any) -> None:
    p = sub.add_parser("compile", help="map an ONNX model onto a target: placement, schedule, cost (TOPS/W)")
    p.add_argument("model", help="path to an .onnx file")
    _add_target_options(p)
    p.add_argument("-o", "--output", help="output directory (default: MODEL.cimc next to where you run)")
    p.add_argument("--pipeline", help="pass list, e.g. 'canonicalize,quantize{percentile=99.9},map,schedule'")
    p.add_argument("--calib", help="calibration data (.npz with x, y) for DAC/ADC ranges (enables 'quantize')")
    p.add_argument("--finetune", metavar="TRAIN_NPZ", help="noise-aware fine-tuning data (enables 'finetune')")
    p.add_argument("--val", help="validation data for fine-tuning (default: a split of the training data)")
    p.add_argument("--batch", type=int, default=1, help="batch size to fix a dynamic batch dimension")
    p.add_argument("--seed", type=int, default=0, help="random seed (fine-tuning)")
    p.add_argument("-q", "--quiet", action="store_true", help="no table, no progress")


_PARSER_BUILDERS: list[Callable[[Any], None]] = [_add_inspect, _add_targets, _add_compile]


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
