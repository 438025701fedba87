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
    files = json.loads((Path(out) / "manifest.json").read_text())["files"] + ["manifest.json"]
    print(f"\nwrote {out}/ ({', '.join(files)})")
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


# ------------------------------------------------------------------------------------ simulate / run
def _add_backend_options(p: Any, what: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--workers", type=int, metavar="N",
                       help=f"split the {what} over N local processes (same numbers for any N)")
    group.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                       help=f"split the {what} over Ray: 'auto' (default) starts or joins a local Ray, or a "
                       "cluster address; needs pip install \"cimc[ray]\"")


@command("simulate")
def _simulate(args: argparse.Namespace) -> int:
    import cimc.api as api

    out = args.output or str(Path(args.compiled) / "simulation")
    result = api.simulate(
        args.compiled, args.data, drift=args.drift, instances=args.instances, seed=args.seed, samples=args.samples,
        batch_size=args.batch_size, compare_gdc=not args.no_compare, progress=not args.quiet, out_dir=out,
        workers=args.workers, ray=args.ray,
    )
    print(result.table())
    print(f"\nwrote {out}/ (results.json, drift.png)")
    return 0


def _add_simulate(sub: Any) -> None:
    p = sub.add_parser("simulate", help="Monte Carlo accuracy over time under PCM noise and drift, with cost counted")
    p.add_argument("compiled", help="compiled-model directory from 'cimc compile'")
    p.add_argument("--data", required=True, help=".npz with x (inputs) and y (labels), or a builtin name (kws-test)")
    p.add_argument("--drift", default="1s,1h,24h,30d,1y", help="times after programming (default 1s,1h,24h,30d,1y)")
    p.add_argument("--instances", type=int, default=25, help="chip instances (Monte Carlo draws, default 25)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same numbers")
    p.add_argument("--samples", type=int, help="use only the first N samples of the data")
    p.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass, all instances together")
    p.add_argument("--no-compare", action="store_true", help="skip the run without drift compensation")
    _add_backend_options(p, "chip instances")
    p.add_argument("-o", "--output", help="output directory (default DIR/simulation)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


@command("run")
def _run(args: argparse.Namespace) -> int:
    import cimc.api as api

    api.run(args.compiled, args.input, args.output, time=args.time, instance=args.instance, instances=args.instances,
            seed=args.seed, ideal=args.ideal)
    print(f"wrote {args.output}")
    return 0


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="raw outputs of a compiled model on one simulated chip instance")
    p.add_argument("compiled", help="compiled-model directory")
    p.add_argument("--input", required=True, help=".npy with inputs (first axis = samples)")
    p.add_argument("-o", "--output", required=True, help=".npy to write the first model output to")
    p.add_argument("--time", default="1s", help="time after programming (default 1s)")
    p.add_argument("--instance", type=int, default=0, help="which chip instance (0-based)")
    p.add_argument("--instances", type=int, help="instances to draw (default instance+1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ideal", action="store_true", help="ideal devices, quantised converters (the digital twin)")


# ------------------------------------------------------------------------------------------ sweep
@command("sweep")
def _sweep(args: argparse.Namespace) -> int:
    import cimc.sweeps as sw

    rows = sw.sweep(
        args.model, args.target, vary=args.vary or [], grid=args.grid, calib=args.calib, data=args.data,
        drift=args.drift, instances=args.instances, seed=args.seed, samples=args.samples, batch_size=args.batch_size,
        finetune=args.finetune, pareto_time=args.pareto_time, out_dir=args.output, workers=args.workers,
        ray=args.ray, progress=not args.quiet,
    )
    print(rows.table(color=sw.color_allowed(sys.stdout)))
    print(f"\nwrote {args.output}/ (sweep.csv, sweep.json, pareto.png, points/)")
    return 0


def _add_sweep(sub: Any) -> None:
    p = sub.add_parser("sweep", help="design-space sweep: accuracy over time vs TOPS/W over target variations")
    p.add_argument("model", help="path to an .onnx file")
    p.add_argument("--target", "-t", default="aon-cim", help="base target preset or YAML file (default aon-cim)")
    p.add_argument("--vary", action="append", metavar="FIELD=V1,V2",
                   help="a target field by dotted path and its values, e.g. converters.adc_bits=4,6,8; "
                   "'F1,F2=V1,V2' varies two fields together; repeat for a product")
    p.add_argument("--grid", metavar="SWEEP_YAML", help="sweep file with 'vary:', 'points:' and/or 'fixed:'")
    p.add_argument("--calib", required=True, help="calibration data for the converter ranges (.npz or builtin name)")
    p.add_argument("--data", required=True, help="test data with labels (.npz or builtin name)")
    p.add_argument("--drift", default="1s,24h,1y", help="times after programming (default 1s,24h,1y)")
    p.add_argument("--instances", type=int, default=10, help="chip instances per point (default 10)")
    p.add_argument("--samples", type=int, help="use only the first N test samples")
    p.add_argument("--seed", type=int, default=0, help="random seed (chips and fine-tuning)")
    p.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass, all instances together")
    p.add_argument("--finetune", metavar="TRAIN", help="noise-aware fine-tuning data: fine-tune at every point")
    p.add_argument("--pareto-time", default="24h", help="time whose accuracy the Pareto front uses (default 24h)")
    _add_backend_options(p, "points")
    p.add_argument("-o", "--output", required=True, help="output folder (resumable: finished points are kept)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


# --- export / verify ---
@command("export")
def _export(args: argparse.Namespace) -> int:
    from cimc.export import export_mapping

    out = args.output or f"{Path(args.compiled).name}.mapping"
    export_mapping(args.compiled, out, csv=args.csv)
    files = "manifest.json, array_<i>.npz" + (", array_<i>.csv" if args.csv else "") + ", biases.npz, gdc.npz, schema.json"
    print(f"wrote {out}/ ({files}); check it with 'cimc verify {out}'")
    return 0


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="write the mapping bundle a hardware team programs from (conductances in uS)")
    p.add_argument("compiled", help="compiled-model directory (from 'cimc compile')")
    p.add_argument("-o", "--output", help="bundle directory (default: DIR.mapping next to where you run)")
    p.add_argument("--csv", action="store_true", help="also write one CSV of conductances per crossbar")


@command("verify")
def _verify(args: argparse.Namespace) -> int:
    from cimc.export import verify_bundle

    report = verify_bundle(args.bundle, model=args.model, data=args.data)
    if report.ok:
        print(report.summary())
        return 0
    for problem in report.problems:
        print(problem)
    return 1


def _add_verify(sub: Any) -> None:
    p = sub.add_parser("verify", help="check a mapping bundle: schema, overlaps, and that it reproduces the model")
    p.add_argument("bundle", help="bundle directory (from 'cimc export')")
    p.add_argument("--model", help="compiled-model directory or its model.onnx (default: the one recorded in the bundle)")
    p.add_argument("--data", help="inputs to compare on (.npz with x); default: seeded random inputs")


# ------------------------------------------------------------------------------------------ demo
@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from cimc.demo import run_demo

    run_demo(args.output, instances=args.instances, samples=args.samples, target=args.target, progress=not args.quiet)
    return 0


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="the whole story on the built-in keyword-spotting model (no data needed)")
    p.add_argument("-o", "--output", default="cimc-demo", help="output folder (default ./cimc-demo)")
    p.add_argument("--instances", type=int, default=5, help="chip instances to simulate (default 5)")
    p.add_argument("--samples", type=int, help="test clips to use (default: all 1,200 shipped)")
    p.add_argument("--target", default="aon-cim", help="target preset or YAML (default aon-cim)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


# --- finetune ---
@command("finetune")
def _finetune(args: argparse.Namespace) -> int:
    import torch

    from cimc.passes.finetune import finetune, save_finetuned

    if not args.output.endswith(".onnx"):
        raise InputError(f"-o {args.output!r} must name an .onnx file, e.g. -o model.ft.onnx")
    # One intra-op thread by default: on a shared 2-core machine torch's spinning workers slow im2col 10x+.
    torch.set_num_threads(args.threads)
    options = {k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size)) if v is not None}
    model, history = finetune(
        args.model, args.target, args.data, args.val, method=args.method, epochs=args.epochs, seed=args.seed,
        progress=not args.quiet, dac_bits=args.dac_bits, adc_bits=args.adc_bits, **options,
    )
    save_finetuned(model, args.output)
    first, best = history["history"][0], history["history"][history["best_epoch"]]
    print(f"method {history['method']}: noisy validation accuracy ({history['validation']}) "
          f"{100 * first['val_noisy_acc']:.2f} % -> {100 * best['val_noisy_acc']:.2f} % (epoch {history['best_epoch']}), "
          f"{history['train_time_s']:.0f} s")
    print(f"wrote {args.output}; compile it with 'cimc compile {args.output} --target {args.target} --calib DATA.npz'")
    return 0


def _add_finetune(sub: Any) -> None:
    from cimc.passes.finetune import DEFAULT_METHOD, METHODS

    p = sub.add_parser("finetune", help="noise-aware fine-tuning (PCM noise, converters, adversarial); ONNX out")
    p.add_argument("model", help="path to an .onnx file")
    _add_target_options(p)
    p.add_argument("--data", required=True, help="training data (.npz with x, y) or a builtin name (kws-train)")
    p.add_argument("--val", help="validation data (default: a seeded 10 %% split of the training data)")
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"{', '.join(METHODS)}, combined with '+' (default {DEFAULT_METHOD})")
    p.add_argument("--epochs", type=int, help="training epochs (default 8)")
    p.add_argument("--lr", type=float, help="Adam learning rate, cosine-decayed")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same weights")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


_PARSER_BUILDERS: list[Callable[[Any], None]] = [_add_inspect, _add_targets, _add_compile, _add_simulate, _add_sweep, _add_run, _add_export, _add_verify, _add_demo, _add_finetune]


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
