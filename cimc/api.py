"""The typed Python API; the command line is a thin layer over these functions.

>>> import cimc
>>> model = cimc.load("model.onnx")          # import + canonicalise (onnx-ir model)
>>> print(cimc.inspect(model).table())
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import onnx_ir as ir

from cimc.frontend import load_model
from cimc.inspection import InspectReport, inspect_model

__all__ = ["load", "inspect", "compile", "simulate", "run", "load_compiled", "finetune"]

logger = logging.getLogger(__name__)

def load(path: str | os.PathLike[str], *, batch: int = 1, canonicalize: bool = True) -> ir.Model:
    """Import an ONNX file: validate, fix the batch size, infer shapes and (by default) canonicalise.

    Raises a :class:`cimc.errors.CimcError` subclass with a one-line message on any bad input, including
    every unsupported node at once.
    """
    from cimc.passes.canonicalize import canonicalize as run_canonicalize

    model = load_model(path, batch=batch)
    model.graph.meta["cimc.source"] = str(path)
    if canonicalize:
        run_canonicalize(model)
    return model


def inspect(model: str | os.PathLike[str] | ir.Model, *, batch: int = 1, canonicalize: bool = True) -> InspectReport:
    """Per-node report of a model: shapes, parameters, MACs, and whether it runs analog or digital."""
    name = ""
    if not isinstance(model, ir.Model):
        name = Path(model).name
        model = load(model, batch=batch, canonicalize=canonicalize)
    return inspect_model(model, name=name)


def compile(model: str | os.PathLike[str], target: Any = "aon-cim", **options: Any) -> Any:  # noqa: A001
    """Compile an ONNX model for a target; see :func:`cimc.compiler.compile_model` for the options."""
    from cimc.compiler import compile_model

    return compile_model(model, target, **options)


def load_compiled(path: Any) -> Any:
    """A :class:`cimc.artifact.CompiledModel` from a directory (or the object itself)."""
    from cimc.artifact import CompiledModel

    return path if isinstance(path, CompiledModel) else CompiledModel.load(path)


def simulate(
    compiled: Any,
    data: Any,
    *,
    drift: str | Sequence[float] = "1s,1h,24h,30d,1y",
    instances: int = 25,
    seed: int = 0,
    samples: int | None = None,
    batch_size: int = 64,
    compare_gdc: bool = True,
    progress: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Any:
    """Accuracy over time on the simulated chip (program → drift → read), Monte Carlo over instances.

    ``data``: a :class:`cimc.data.Dataset`, an ``.npz`` path or a builtin name. ``drift``: comma-separated
    times ("1s,1h,24h") or seconds. With ``out_dir``, ``results.json`` and ``drift.png`` are written there.
    """
    from cimc.data import Dataset, load_dataset
    from cimc.plots import plot_drift
    from cimc.outputs import check_output_dir, output_dir
    from cimc.report import write_json_atomic
    from cimc.runtime.simulator import parse_duration
    from cimc.runtime.simulator import simulate as run_simulation

    inputs = [compiled, data]
    if out_dir is not None:  # refuse a destructive -o before the simulation runs
        check_output_dir(out_dir, "simulation", inputs, force=force)
    c = load_compiled(compiled)
    ds = data if isinstance(data, Dataset) else load_dataset(data, samples=samples)
    times = [parse_duration(t) for t in drift.split(",")] if isinstance(drift, str) else list(drift)
    x, y = (ds.x, ds.y) if samples is None else (ds.x[:samples], None if ds.y is None else ds.y[:samples])
    result = run_simulation(c, x, y, times, instances=instances, seed=seed, batch_size=batch_size,
                            compare_gdc=compare_gdc, progress=progress)
    result.data["data"] = ds.name
    if out_dir is not None:
        with output_dir(out_dir, "simulation", inputs, force=force) as tmp:
            write_json_atomic(tmp / "results.json", result.data)
            write_json_atomic(tmp / "timings.json", result.timings)
            plot_drift(result.data, tmp / "drift.png")
    return result


def run(
    compiled: Any,
    inputs: Any,
    output: str | os.PathLike[str] | None = None,
    *,
    time: str | float = "1s",
    instance: int = 0,
    instances: int | None = None,
    seed: int = 0,
    ideal: bool = False,
) -> np.ndarray:
    """Raw first output of the compiled model for ``inputs`` (array or .npy) on one chip instance at ``time``."""
    import torch

    from cimc.data import check_input_array, load_npy
    from cimc.errors import InputError
    from cimc.runtime.simulator import Chip, check_batch_axis, ideal_hook, parse_duration, use
    from cimc.validate import samples_per_pass

    if output is not None:
        from cimc.outputs import check_output_file

        check_output_file(output, ".npy", [compiled, inputs])
    c = load_compiled(compiled)
    first = c.model.graph.inputs[0]
    expected = tuple(first.shape)[1:] if first.shape is not None else None
    if isinstance(inputs, (str, os.PathLike)):
        x = check_input_array(load_npy(inputs), expected, f"--input {inputs}")
    else:
        x = check_input_array(inputs, expected, f"input '{first.name}'")
    n = (instances or instance + 1)
    if not 0 <= instance < n:
        raise InputError(f"--instance {instance} is outside 0..{n - 1}; raise --instances")
    chip = Chip(c, n, seed)
    t_s = parse_duration(time) if isinstance(time, str) else float(time)
    if ideal:
        use(chip, ideal_hook(chip))
    else:
        state = chip.at(t_s)
        use(chip, chip.hook(state), state=state)
    outs = []
    reps = 1 if ideal else n
    step = samples_per_pass(c.model, reps, 64)
    with torch.no_grad():
        for start in range(0, len(x), step):
            xb = torch.from_numpy(np.ascontiguousarray(x[start : start + step], dtype=np.float32))
            y = chip.executor(xb.repeat(reps, *([1] * (xb.dim() - 1))))[0]
            check_batch_axis(y, reps * len(xb), c.model.graph.outputs[0].name)
            outs.append(y.reshape(reps, len(xb), *y.shape[1:])[0 if ideal else instance].numpy())
    result = np.concatenate(outs)
    if output is not None:
        from cimc.report import write_bytes_atomic
        import io

        buf = io.BytesIO()
        np.save(buf, result)
        write_bytes_atomic(output, buf.getvalue())
    return result


def finetune(
    model: str | os.PathLike[str] | ir.Model,
    target: Any = "aon-cim",
    train: Any = None,
    val: Any = None,
    *,
    method: str | None = None,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = False,
    output: str | os.PathLike[str] | None = None,
    **options: Any,
) -> tuple[ir.Model, dict[str, Any]]:
    """Noise-aware fine-tuning; returns ``(model, history)`` and writes ``output`` (.onnx, atomically) if given.

    See :func:`cimc.passes.finetune.finetune` for the methods and options (``dac_bits``, ``lr``, ``eta`` ...).
    """
    from cimc.outputs import check_output_file
    from cimc.passes.finetune import DEFAULT_METHOD, save_finetuned
    from cimc.passes.finetune import finetune as run_finetune

    sources = [model, train, val]
    if output is not None:  # refuse a bad -o before the training, not after it
        check_output_file(output, ".onnx", sources)
    tuned, history = run_finetune(model, target, train, val, method=method or DEFAULT_METHOD, epochs=epochs,
                                  seed=seed, progress=progress, **options)
    if output is not None:
        save_finetuned(tuned, output, sources)
    return tuned, history


