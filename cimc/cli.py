"""The ``cimc`` command: a thin layer over the Python API.

Every user error (a :class:`~cimc.errors.CimcError`) is printed as one line on stderr with exit code 2;
``--debug`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cimc.errors import CimcError, InputError

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]
# The real standard output: with --json or -q, a command's stray prints go elsewhere (stderr / nowhere), and
# only _print_json writes here, so stdout holds exactly one JSON document.
_STDOUT: list[Any] = [sys.stdout]
_COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        _COMMANDS[name] = fn
        return fn

    return register


# ------------------------------------------------------------------------------------------ shared options
def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _print_json(data: Any) -> None:
    """Exactly one JSON document on the real standard output."""
    out = _STDOUT[0]
    out.write(json.dumps(_json_safe(data), indent=2, default=str) + "\n")
    out.flush()


def _progress_enabled(args: argparse.Namespace) -> bool:
    return not (getattr(args, "quiet", False) or getattr(args, "json", False))


def _add_batch_size(p: Any, help_text: str, default: int | None) -> None:
    """``--batch-size`` everywhere; ``--batch`` stays as a hidden alias for earlier scripts."""
    p.add_argument("--batch-size", dest="batch_size", type=int, default=default, help=help_text)
    p.add_argument("--batch", dest="batch_size", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _add_output_flags(p: Any, json_help: str | None = None) -> None:
    if json_help:
        p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (no table, no progress)")


def _add_common(p: Any, top: bool = False) -> None:
    """Logging flags, accepted before or after the subcommand (``cimc --debug compile`` = ``cimc compile
    --debug``). On subcommands the default is SUPPRESS so a flag given before the subcommand is kept."""
    have = set(p._option_string_actions)
    kw: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    if "--debug" not in have:
        p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging", **kw)
    if "-v" not in have:
        p.add_argument("-v", "--verbose", action="count", help="more log output (-v info, -vv debug)",
                       **({"default": 0} if top else kw))
    if "--log-level" not in have:
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], type=str.lower,
                       help="log level (default warning)", **({"default": None} if top else kw))
    if "-q" not in have and "--quiet" not in have:
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors", **kw)


# ------------------------------------------------------------------------------------------ inspect
@command("inspect")
def _inspect(args: argparse.Namespace) -> int:
    import cimc

    report = cimc.inspect(args.model, batch=args.batch_size, canonicalize=not args.raw, **_fixed_inputs(args))
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.table())
    return 0


def _add_input_options(p: Any) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="fix a dynamic input's shape, e.g. --input-shape audio=1,16000 (repeatable)")
    p.add_argument("--input-value", action="append", default=[], metavar="NAME=VALUE|FILE.npy",
                   help="freeze an input to a constant, e.g. --input-value sr=16000 (repeatable); what depends "
                   "on it is folded away")


def _add_stream_option(p: Any) -> None:
    p.add_argument("--stream", action="append", default=[], metavar="OUTPUT=INPUT|auto",
                   help="run sequences chunk by chunk, feeding the state OUTPUT back to INPUT at the next chunk "
                   "(repeatable; 'auto' finds the pairs by name and shape); data [sequences, chunks, ...], states "
                   "start at zeros unless given")


def _stream(args: argparse.Namespace) -> str | list[str] | None:
    items = [t for t in getattr(args, "stream", []) or []]
    if [t.strip().lower() for t in items] == ["auto"]:
        return "auto"
    if any(t.strip().lower() == "auto" for t in items):
        raise InputError("--stream auto finds every state pair: give it alone, or name each pair as OUTPUT=INPUT")
    return items or None


def _fixed_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """``input_shapes``/``input_values`` keyword arguments from the repeatable command-line options."""
    from cimc.frontend import parse_input_shape, parse_input_value

    shapes = dict(parse_input_shape(t) for t in args.input_shape)
    values = dict(parse_input_value(t) for t in args.input_value)
    both = sorted(set(shapes) & set(values))
    if both:
        raise InputError(f"input {both[0]!r} has both --input-shape and --input-value; a frozen input needs no shape")
    return {"input_shapes": shapes or None, "input_values": values or None}


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show a model's nodes, shapes, parameters, MACs and what maps to analog")
    p.add_argument("model", help="path to an .onnx file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_batch_size(p, "batch size to fix a dynamic batch dimension (default 1)", 1)
    p.add_argument("--raw", action="store_true", help="inspect the imported graph without canonicalisation")
    _add_input_options(p)


# ------------------------------------------------------------------------------------------ targets
@command("targets")
def _targets(args: argparse.Namespace) -> int:
    from cimc.report import format_table
    from cimc.targets import list_targets, load_target, preset_text, schema_json, target_yaml

    if args.action == "show":
        if not args.name:
            raise InputError("'cimc targets show' needs a target name or YAML path, e.g. 'cimc targets show aon-cim'")
        target = load_target(args.name)  # validates, for presets too
        text = preset_text(args.name)
        if text is None:  # a user's file: the resolved target (base merged, every default filled in)
            text = f"# {args.name} resolved: every field cimc uses, base merged, defaults filled in\n" + target_yaml(target)
        print(text, end="")
    elif args.action == "schema":
        print(schema_json())
    else:
        rows = []
        for name, description in list_targets():
            t = load_target(name)
            rows.append([name, f"{t.array.count or 'any'} x {t.array.rows}x{t.array.cols}", t.execution, t.device.model,
                         description])
        print(format_table(["target", "arrays (rows x device cols)", "execution", "device", "description"], rows))
        print("\nA YAML file works wherever a target name does. Derive one by writing only what differs, e.g. "
              "my-chip.yaml:\n  base: aon-cim\n  converters: {adc_bits: 6}\nthen '--target my-chip.yaml' "
              "(the target is named my-chip).")
    return 0


def _add_targets(sub: Any) -> None:
    p = sub.add_parser("targets", help="list hardware targets, show one as YAML, or print the target JSON Schema")
    p.add_argument("action", nargs="?", choices=["list", "show", "schema"], default="list")
    p.add_argument("name", nargs="?", help="target name or YAML path (for 'show')")


def _add_threads_option(p: Any) -> None:
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default 0: the cores this process may run on)")


def _threads(args: argparse.Namespace) -> None:
    from cimc.threads import set_torch_threads

    set_torch_threads(args.threads)


# ------------------------------------------------------------------------------------------ compile
def _add_force(p: Any) -> None:
    p.add_argument("--force", action="store_true",
                   help="write into an existing folder that is not a cimc output of this kind (its other files are "
                        "kept; never an input or the current folder)")


def _add_file_force(p: Any) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace an existing -o file that cimc did not write (never an input)")


def _add_target_options(p: Any) -> None:
    p.add_argument("--target", "-t", default="aon-cim", help="target preset name or YAML file (default aon-cim)")
    p.add_argument("--dac-bits", type=int, help="override the target's DAC (input) bits; 0 = no quantisation")
    p.add_argument("--adc-bits", type=int, help="override the target's ADC (output) bits; 0 = no quantisation")
    p.add_argument("--arrays", type=int, metavar="N",
                   help="override the target's number of arrays/cores (same geometry): a larger chip of the same kind")


@command("compile")
def _compile(args: argparse.Namespace) -> int:
    from cimc.compiler import compile_model

    _threads(args)
    out = args.output or f"{Path(args.model).stem}.cimc"
    compiled = compile_model(
        args.model, args.target, pipeline=args.pipeline, calibration=args.calib, training=args.finetune,
        validation=args.val, dac_bits=args.dac_bits, adc_bits=args.adc_bits, arrays=args.arrays,
        batch=args.batch_size, seed=args.seed, progress=_progress_enabled(args), out_dir=out, force=args.force,
        digital=args.digital or (), replicate=_replicas(args.replicate), stream=_stream(args), **_fixed_inputs(args),
    )
    files = json.loads((Path(out) / "manifest.json").read_text())["files"] + ["manifest.json"]
    if args.json:
        _print_json({**compiled.report(), "target_given": args.target, "output": out, "files": files})
        return 0
    if not args.quiet:
        print(compiled.summary_table())
        print(f"\nwrote {out}/ ({', '.join(files)})")
        if not any("cimc.quant" in n.metadata_props for n in compiled.analog_nodes()):
            print("note: compiled without --calib: the DAC/ADC converters are not modelled (ideal); add --calib "
                  "DATA.npz to calibrate them", file=sys.stderr)
    return 0


def _replicas(items: list[str] | None) -> dict[str, int]:
    """``--replicate LAYER=R`` options as ``{layer: r}`` (one-line error for a malformed one)."""
    out: dict[str, int] = {}
    for item in items or ():
        name, sep, count = item.rpartition("=")
        if not sep or not name or not count.strip().isdigit():
            raise InputError(f"--replicate {item}: write LAYER=R with an integer R, e.g. --replicate conv1=4")
        if name in out:
            raise InputError(f"--replicate {name} is given twice; give each layer once")
        out[name] = int(count)
    return out


def _add_compile(sub: Any) -> None:
    p = sub.add_parser("compile", help="map an ONNX model onto a target: placement, schedule, cost (TOPS/W)")
    p.add_argument("model", help="path to an .onnx file")
    _add_target_options(p)
    p.add_argument("-o", "--output", help="output directory (default: MODEL.cimc next to where you run)")
    _add_force(p)
    p.add_argument("--pipeline", help="pass list, e.g. 'canonicalize,quantize{percentile=99.9},map,schedule'")
    p.add_argument("--calib", help="calibration data (.npz with x, y) for DAC/ADC ranges (enables 'quantize'); "
                   "without it the converters are not modelled")
    p.add_argument("--finetune", metavar="TRAIN_NPZ", help="noise-aware fine-tuning data (enables 'finetune')")
    p.add_argument("--val", help="validation data for fine-tuning (default: a split of the training data)")
    p.add_argument("--digital", action="append", metavar="LAYER",
                   help="keep this analog layer off the crossbar (float, on the digital unit); repeatable; "
                   "'cimc diagnose' says which layers to keep digital")
    p.add_argument("--replicate", action="append", metavar="LAYER=R",
                   help="map this analog layer R times on independent devices and average the R results "
                   "digitally (noise falls about sqrt(R); R x its crossbar space, MVMs and energy); repeatable")
    _add_batch_size(p, "batch size to fix a dynamic batch dimension (default 1)", 1)
    _add_input_options(p)
    _add_stream_option(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (fine-tuning)")
    _add_threads_option(p)
    _add_output_flags(p, json_help="print the compile report (report.json content) as one JSON document")


# ------------------------------------------------------------------------------------ simulate / run
_METRIC_HELP = ("end metric: {names}; topK; auc or auc[COLUMN] and detect@THRESHOLD or detect@T[COLUMN] (labels "
                "needed; a one-value output is the score, positives labelled 1); or module:function, a Python "
                "function(outputs, labels or float outputs) -> float. Default: accuracy with labels (auc for a "
                "one-value output); without labels cosine to the float model, snr for outputs of 8 values or fewer")

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

    _threads(args)
    out = args.output or str(Path(args.compiled) / "simulation")
    times = api.parse_times(args.drift)  # bad times fail here, before any work
    result = api.simulate(
        args.compiled, args.data, drift=times, instances=args.instances, seed=args.seed, samples=args.samples,
        batch_size=args.batch_size, compare_gdc=not args.no_compare, progress=_progress_enabled(args), out_dir=out,
        force=args.force, metric=args.metric, workers=args.workers, ray=args.ray, yield_target=args.yield_target,
        stream=_stream(args),
    )
    if args.json:
        _print_json({**result.data, "output": out})
    elif not args.quiet:
        print(result.table())
        print(f"\nwrote {out}/ (results.json, timings.json, drift.png)")
    return 0


def _add_simulate(sub: Any) -> None:
    from cimc.vocabulary import DURATION_HELP, METRICS

    p = sub.add_parser("simulate", help="Monte Carlo accuracy (or any metric) over time under PCM noise and drift")
    p.add_argument("compiled", help="compiled-model directory from 'cimc compile'")
    p.add_argument("--data", required=True, help=".npz with x (inputs) and optionally y (labels), or a builtin "
                   "name (kws-test)")
    p.add_argument("--drift", default="1s,1h,24h,30d,1y",
                   help=f"comma-separated times after programming (default 1s,1h,24h,30d,1y); {DURATION_HELP}")
    p.add_argument("--metric", help=_METRIC_HELP.format(names=", ".join(METRICS)))
    p.add_argument("--yield-target", metavar="VALUE",
                   help="also report the chip yield: the share of chip instances whose metric meets VALUE (in the "
                   "metric's units; 0.9 or 90%% for shares) at each time")
    p.add_argument("--instances", type=int, default=25, help="chip instances (Monte Carlo draws, default 25)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same numbers")
    p.add_argument("--samples", type=int, help="use only the first N samples of the data")
    _add_batch_size(p, "inputs per forward pass; each chip instance runs every batch on its own (default 64)", 64)
    p.add_argument("--no-compare", action="store_true", help="skip the run without drift compensation")
    _add_stream_option(p)
    _add_threads_option(p)
    _add_backend_options(p, "chip instances")
    p.add_argument("-o", "--output", help="output directory (default DIR/simulation)")
    _add_force(p)
    _add_output_flags(p, json_help="print results.json's content as one JSON document")


# ------------------------------------------------------------------------------------------ diagnose
@command("diagnose")
def _diagnose(args: argparse.Namespace) -> int:
    from cimc.diagnosis import diagnose

    _threads(args)
    out = args.output or str(Path(args.compiled) / "diagnose")
    result = diagnose(args.compiled, args.data, time=args.time, instances=args.instances, seed=args.seed,
                      samples=args.samples, batch_size=args.batch_size, metric=args.metric,
                      progress=_progress_enabled(args), out_dir=out, force=args.force, try_advice=args.try_advice,
                      calibration=args.calib, stream=_stream(args))
    if args.json:
        _print_json({**result.data, "output": out})
    elif not args.quiet:
        print(result.table())
        print(f"\nwrote {out}/ (diagnose.json, diagnose.png)")
    return 0


def _add_diagnose(sub: Any) -> None:
    from cimc.vocabulary import DURATION_HELP, METRICS

    p = sub.add_parser("diagnose", help="per-layer SNR by cause (DAC, ADC, programming, drift, read noise) and "
                       "what to change")
    p.add_argument("compiled", help="compiled-model directory from 'cimc compile'")
    p.add_argument("--data", required=True, help=".npz with x (and optionally y), or a builtin name (kws-test)")
    p.add_argument("--time", default="24h", help=f"time after programming to diagnose at (default 24h); {DURATION_HELP}")
    p.add_argument("--instances", type=int, default=5, help="chip instances (Monte Carlo draws, default 5)")
    p.add_argument("--metric", help=_METRIC_HELP.format(names=", ".join(METRICS)))
    p.add_argument("--samples", type=int, default=512, help="use the first N samples (default 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same numbers")
    _add_batch_size(p, "inputs per forward pass (default 64)", 64)
    p.add_argument("--calib", help="calibration data for the advice that maps the model again (default: --data)")
    p.add_argument("--no-try", dest="try_advice", action="store_false",
                   help="do not try the advice on the simulator (no measured gains; faster)")
    _add_threads_option(p)
    _add_stream_option(p)
    p.add_argument("-o", "--output", help="output directory (default DIR/diagnose)")
    _add_force(p)
    _add_output_flags(p, json_help="print diagnose.json's content as one JSON document")


# ------------------------------------------------------------------------------------------ harden
@command("harden")
def _harden(args: argparse.Namespace) -> int:
    import cimc.api as api

    _threads(args)
    goal = None if args.goal is None else _goal_number(args.goal)
    result = api.harden(args.compiled, args.data, time=args.time, goal=goal, drop=args.drop, metric=args.metric,
                        instances=args.instances, seed=args.seed, samples=args.samples, batch_size=args.batch_size,
                        calibration=args.calib, training=args.finetune, validation=args.val,
                        finetune_method=args.method, max_rounds=args.rounds, progress=_progress_enabled(args),
                        out_dir=args.output, force=args.force)
    if args.json:
        _print_json({**result.data, "output": args.output})
    elif not args.quiet:
        print(result.table())
        print(f"\nwrote {args.output}/ (the hardened compiled model) and {args.output}/harden/ (harden.json, "
              "harden.png, harden.txt)")
    return 0


def _goal_number(text: str) -> float:
    """``--goal``: a number in the metric's units, or a percentage ("97%" = 0.97)."""
    t = text.strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise InputError(f"--goal {text!r} is not a number; write e.g. 0.97 or 97%") from None


def _add_harden(sub: Any) -> None:
    from cimc.vocabulary import DURATION_HELP, METRICS

    p = sub.add_parser("harden", help="try mitigations on the simulator (digital layers, converter ranges, per-column "
                       "scales, drift compensation, replication, fine-tuning) until the model meets a goal")
    p.add_argument("compiled", help="compiled-model directory from 'cimc compile'")
    p.add_argument("--data", required=True, help=".npz with x (and optionally y) the metric is measured on")
    p.add_argument("--time", default="24h", help=f"time after programming to harden for (default 24h); {DURATION_HELP}")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--goal", help="metric value to reach, e.g. 0.97 or 97%% (default: improve until nothing helps)")
    goal.add_argument("--drop", help="or the most the chip may lose against the float model, e.g. 1%% (= 0.01)")
    p.add_argument("--metric", help=_METRIC_HELP.format(names=", ".join(METRICS)))
    p.add_argument("--instances", type=int, default=5, help="chip instances each step is measured on (default 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same steps")
    p.add_argument("--samples", type=int, help="use only the first N samples of --data")
    p.add_argument("--calib", help="calibration data for steps that map the model again (default: --data)")
    p.add_argument("--finetune", metavar="TRAIN", help="training data: noise-aware fine-tuning is the last step")
    p.add_argument("--val", help="validation data for the fine-tuning")
    p.add_argument("--method", help="fine-tuning method (default: the fine-tuner's; see cimc finetune --help)")
    p.add_argument("--rounds", type=int, default=3, help="diagnose-and-try rounds at most (default 3)")
    _add_batch_size(p, "inputs per forward pass (default 64)", 64)
    _add_threads_option(p)
    p.add_argument("-o", "--output", required=True, help="directory for the hardened compiled model")
    _add_force(p)
    _add_output_flags(p, json_help="print harden.json's content as one JSON document")


@command("run")
def _run(args: argparse.Namespace) -> int:
    import cimc.api as api

    to_stdout = args.output == "-"
    outs = api.run(args.compiled, args.input, None if to_stdout else args.output, time=args.time,
                   instance=args.instance, instances=args.instances, seed=args.seed, ideal=args.ideal,
                   all_outputs=True, force=args.force, stream=_stream(args))
    if to_stdout:  # binary on stdout, for a pipe: .npy for one output, .npz for several
        import io

        import numpy as np

        buf = io.BytesIO()
        if len(outs) == 1:
            np.save(buf, next(iter(outs.values())))
        else:
            np.savez(buf, **outs)
        stream = _STDOUT[0] if _STDOUT[0] is not None else sys.stdout
        stream.flush()
        stream.buffer.write(buf.getvalue())
        stream.buffer.flush()
        return 0
    shapes = ", ".join(f"{name} {list(a.shape)}" for name, a in outs.items())
    print(f"wrote {args.output} ({shapes})")
    return 0


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="raw outputs of a compiled model on one simulated chip instance")
    p.add_argument("compiled", help="compiled-model directory")
    p.add_argument("--input", required=True,
                   help=".npy with inputs (one-input models) or .npz with one array per input name (first axis = samples)")
    p.add_argument("-o", "--output", required=True,
                   help=".npy (one output) or .npz (every output, by name); '-' writes them to stdout (.npy bytes for "
                   "one output, .npz for several)")
    p.add_argument("--time", default="1s", help="time after programming (default 1s)")
    p.add_argument("--instance", type=int, default=0, help="which chip instance (0-based)")
    p.add_argument("--instances", type=int, help="instances to draw (default instance+1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ideal", action="store_true", help="ideal devices, quantised converters (the digital twin)")
    _add_file_force(p)
    _add_stream_option(p)


# ------------------------------------------------------------------------------------------ sweep
@command("sweep")
def _sweep(args: argparse.Namespace) -> int:
    import cimc.sweeps as sw

    rows = sw.sweep(
        args.model, args.target, vary=args.vary or [], grid=args.grid, calib=args.calib, data=args.data,
        drift=args.drift, instances=args.instances, seed=args.seed, samples=args.samples, batch_size=args.batch_size,
        finetune=args.finetune, pareto_time=args.pareto_time, out_dir=args.output, workers=args.workers,
        ray=args.ray, progress=_progress_enabled(args), force=args.force,
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
    _add_force(p)
    _add_output_flags(p)


# --- export / verify ---
@command("export")
def _export(args: argparse.Namespace) -> int:
    from cimc.export import export_mapping

    out = args.output or f"{Path(args.compiled).name}.mapping"
    export_mapping(args.compiled, out, csv=args.csv, force=args.force)
    files = "manifest.json, array_<i>.npz" + (", array_<i>.csv" if args.csv else "") + ", biases.npz, gdc.npz, schema.json"
    print(f"wrote {out}/ ({files}); check it with 'cimc verify {out}'")
    return 0


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="write the mapping bundle a hardware team programs from (conductances in uS)")
    p.add_argument("compiled", help="compiled-model directory (from 'cimc compile')")
    p.add_argument("-o", "--output", help="bundle directory (default: DIR.mapping next to where you run)")
    p.add_argument("--csv", action="store_true", help="also write one CSV of conductances per crossbar")
    _add_force(p)


@command("verify")
def _verify(args: argparse.Namespace) -> int:
    from cimc.export import verify_bundle

    report = verify_bundle(args.bundle, model=args.model, data=args.data)
    if args.json:
        _print_json({"bundle": report.bundle, "ok": report.ok, "problems": report.problems,
                     "layers_checked": report.layers_checked, "output_rel_err": report.output_rel_err})
        return 0 if report.ok else 1
    if report.ok:
        if not args.quiet:
            print(report.summary())
        return 0
    for problem in report.problems:
        print(problem, file=sys.stderr if args.quiet else sys.stdout)
    return 1


def _add_verify(sub: Any) -> None:
    p = sub.add_parser("verify", help="check a mapping bundle: schema, overlaps, and that it reproduces the model")
    p.add_argument("bundle", help="bundle directory (from 'cimc export')")
    p.add_argument("--model", help="compiled-model directory or its model.onnx (default: the one recorded in the bundle)")
    p.add_argument("--data", help="inputs to compare on (.npz with x); default: seeded random inputs")
    _add_output_flags(p, json_help="print the verification result as one JSON document")


# ------------------------------------------------------------------------------------------ demo
@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from cimc.demo import run_demo

    _threads(args)
    run_demo(args.output, instances=args.instances, samples=args.samples, target=args.target, progress=not args.quiet,
             force=args.force)
    return 0


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="the whole story on the built-in keyword-spotting model (no data needed)")
    p.add_argument("-o", "--output", default="cimc-demo", help="output folder (default ./cimc-demo)")
    _add_force(p)
    p.add_argument("--instances", type=int, default=5, help="chip instances to simulate (default 5)")
    p.add_argument("--samples", type=int, help="test clips to use (default: all 1,200 shipped)")
    p.add_argument("--target", default="aon-cim", help="target preset or YAML (default aon-cim)")
    _add_threads_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (no progress bar)")


# --- finetune ---
@command("finetune")
def _finetune(args: argparse.Namespace) -> int:
    from cimc.outputs import check_output_file
    from cimc.passes.finetune import finetune, save_finetuned
    from cimc.vocabulary import parse_duration

    sources = [args.model, args.data, args.val]
    check_output_file(args.output, ".onnx", sources, force=args.force)  # before the training, not after it
    # The cores this process is given; OpenMP workers sleep rather than spin (cimc/threads.py), so a shared
    # machine no longer calls for one thread.
    _threads(args)
    options = {k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size), ("keep", args.keep),
                                 ("clip_alpha", args.clip_alpha),
                                 ("verify_times", args.verify_times),
                                 ("val_time", None if args.val_time is None else parse_duration(args.val_time)),
                                 ("output_kinds", args.output_kinds)) if v is not None}
    model, history = finetune(
        args.model, args.target, args.data, args.val, method=args.method, epochs=args.epochs, seed=args.seed,
        progress=not args.quiet, dac_bits=args.dac_bits, adc_bits=args.adc_bits, arrays=args.arrays, **_fixed_inputs(args), **options,
    )
    save_finetuned(model, args.output, sources, force=args.force)
    for line in finetune_summary(history):
        print(line)
    print(f"wrote {args.output}; compile it with 'cimc compile {args.output} --target {args.target} --calib DATA.npz'")
    return 0


def finetune_summary(history: dict[str, Any]) -> list[str]:
    """What a fine-tuning run did, in a few lines: the noisy validation, and which model was kept and why."""
    first, best = history["history"][0], history["history"][history["best_epoch"]]
    metric = history.get("metric", "accuracy")
    lines = [(f"method {history['method']}: noisy validation {metric} ({history['validation']}) "
              f"{100 * first['val_noisy']:.2f} % -> {100 * best['val_noisy']:.2f} % (epoch {history['best_epoch']}), "
              f"{history['train_time_s']:.0f} s")]
    check = history.get("verification")
    if check is not None:  # a worse fine-tuned model is also a logged warning (stderr), even with -q
        shown = (f"{100 * check['input']['score']:.2f} % -> {100 * check['fine-tuned']['score']:.2f} % on "
                 f"{check['instances']} fresh chips at {', '.join(f'{t:g} s' for t in check['times_s'])}")
        verdict = ("worse: wrote the input model's weights unchanged" if history["kept"] == "input"
                   else "not worse: wrote it")
        lines.append(f"keep-the-better check ({shown}): the fine-tuned model is {verdict}")
    elif history["best_epoch"] == 0 and history["history"][1:]:
        lines.append("no epoch beat the input model on the noisy validation: wrote the input model's weights unchanged")
    return lines


def _add_finetune(sub: Any) -> None:
    from cimc.passes.finetune_methods import DEFAULT_METHOD, LABEL_FREE_METHOD, METHODS

    p = sub.add_parser("finetune", help="noise-aware fine-tuning (PCM noise, converters, adversarial); ONNX out")
    p.add_argument("model", help="path to an .onnx file")
    _add_target_options(p)
    p.add_argument("--data", required=True, help="training data (.npz with x, and y if labelled) or a builtin name "
                   "(kws-train); without labels the float model is the teacher (distillation)")
    p.add_argument("--val", help="validation data (default: a seeded 10 %% split of the training data)")
    _add_input_options(p)
    p.add_argument("--method",
                   help=f"{', '.join(METHODS)}, combined with '+' (default {DEFAULT_METHOD}; "
                   f"{LABEL_FREE_METHOD} for data without labels)")
    p.add_argument("--output-kinds", help="distillation distance per model output, '/'-separated: logits, probs, "
                   "logprobs, sigmoid, regression (default: auto, from the op that makes each output)")
    p.add_argument("--val-time", help="read time of the per-epoch noisy validation (default 24h)")
    p.add_argument("--verify-times", help="read times of the final keep-the-better check, e.g. 24h,1y "
                   "(default: the validation time)")
    p.add_argument("--keep", choices=("better", "tuned"), help="'better' (default): write the fine-tuned model only "
                   "if it is not worse than the input on fresh noisy chips; 'tuned': always")
    p.add_argument("--epochs", type=int, help="training epochs (default 8)")
    p.add_argument("--lr", type=float, help="Adam learning rate, cosine-decayed")
    p.add_argument("--clip-alpha", type=float, help="method 'clip': weights clipped to ±ALPHA std per layer (default 2)")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same weights")
    _add_threads_option(p)
    p.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    _add_file_force(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (no progress bar)")


_PARSER_BUILDERS: list[Callable[[Any], None]] = [_add_inspect, _add_targets, _add_compile, _add_simulate, _add_sweep, _add_run, _add_export, _add_verify, _add_demo, _add_finetune]
_PARSER_BUILDERS.insert(_PARSER_BUILDERS.index(_add_simulate) + 1, _add_diagnose)
_PARSER_BUILDERS.insert(_PARSER_BUILDERS.index(_add_diagnose) + 1, _add_harden)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cimc",
        description="Compile ONNX models for analog compute-in-memory (PCM crossbar) accelerators, "
        "simulate them under device noise and drift, and export the mapping.",
    )
    from cimc import __version__

    parser.add_argument("--version", action="version", version=f"cimc {__version__}")
    _add_common(parser, top=True)
    budget_help = ("largest tensor or data array cimc will hold, e.g. 8G (default 4G, or CIMC_MEMORY_BUDGET); "
                   "bigger ones are refused before they are allocated")
    parser.add_argument("--memory-budget", metavar="SIZE", help=budget_help)
    parser.add_argument("--json", action="store_true",
                        help="one JSON document on stdout (compile, simulate, diagnose, verify, inspect)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _PARSER_BUILDERS:
        add(sub)
    for name, subparser in sub.choices.items():  # also accepted after the command name
        _add_common(subparser)
        subparser.add_argument("--memory-budget", metavar="SIZE", default=argparse.SUPPRESS, help=budget_help)
        json_flag = subparser._option_string_actions.get("--json")
        if json_flag is not None:  # keep a --json given before the command (the subparser's default would reset it)
            json_flag.default = argparse.SUPPRESS
            _JSON_COMMANDS.add(name)
    return parser


# Commands that take --json (filled by build_parser).
_JSON_COMMANDS: set[str] = set()

# Commands that load neither onnxruntime nor torch (so they start in a fraction of a second).
_LIGHT_COMMANDS = frozenset({"targets"})


def _quiet_libraries() -> None:
    # Library warnings (numpy's RuntimeWarning on odd data...) would add lines to a one-line error; they go to
    # the logging system instead, shown with --debug.
    logging.captureWarnings(True)
    for name in ("onnxscript", "onnx_ir", "onnxruntime", "py.warnings"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="onnxscript")
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        pass


def _log_level(args: argparse.Namespace) -> int:
    if getattr(args, "debug", False):
        return logging.DEBUG
    if getattr(args, "log_level", None):
        return getattr(logging, args.log_level.upper())
    if getattr(args, "quiet", False):
        return logging.ERROR
    verbose = getattr(args, "verbose", 0) or 0
    return logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    level = _log_level(args)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("cimc").setLevel(level)  # also when the host (a notebook, pytest) configured logging
    if not debug and args.command not in _LIGHT_COMMANDS:
        _quiet_libraries()
    if not args.command:
        parser.print_usage(sys.stderr)
        print("cimc: error: give a command, e.g. 'cimc demo' or 'cimc compile MODEL.onnx'; 'cimc --help' lists "
              "them", file=sys.stderr)
        return 2
    if getattr(args, "json", False) and args.command not in _JSON_COMMANDS:
        print(f"cimc {args.command}: error: --json is not available for '{args.command}'; it works with "
              f"{', '.join(sorted(_JSON_COMMANDS))}", file=sys.stderr)
        return 2
    _STDOUT[0] = sys.stdout
    redirect = None
    if getattr(args, "json", False):
        redirect = sys.stderr  # anything a command prints besides its JSON document goes to stderr
    elif getattr(args, "quiet", False):
        redirect = open(os.devnull, "w")  # noqa: SIM115 - closed below
    saved = sys.stdout
    if redirect is not None:
        sys.stdout = redirect
    try:
        from cimc.validate import set_memory_budget

        set_memory_budget(args.memory_budget)
        return _COMMANDS[args.command](args)
    except CimcError as exc:
        if debug:
            raise
        print(f"cimc {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cimc: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout = saved
        if redirect is not None and redirect is not sys.stderr:
            redirect.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
