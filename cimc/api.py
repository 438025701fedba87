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

__all__ = ["load", "inspect", "compile", "simulate", "diagnose", "run", "load_compiled", "finetune"]

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
    metric: str | None = None,
) -> Any:
    """A metric over time on the simulated chip (program → drift → read), Monte Carlo over instances.

    ``data``: a :class:`cimc.data.Dataset`, an ``.npz`` path or a builtin name; ``y`` is optional.
    ``drift``: comma-separated times ("1s,1h,24h,6mo") or seconds. ``metric``: accuracy, top5, cosine, mse,
    snr or relerr (see :mod:`cimc.runtime.metrics`; default accuracy with labels, cosine agreement with the
    float model without). With ``out_dir``, ``results.json`` and ``drift.png`` are written there.
    """
    from cimc.data import Dataset, load_dataset
    from cimc.plots import plot_drift
    from cimc.report import atomic_dir, write_json_atomic
    from cimc.runtime.simulator import simulate as run_simulation

    c = load_compiled(compiled)
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    times = parse_times(drift)
    x, y = (ds.x, ds.y) if samples is None else (ds.x[:samples], None if ds.y is None else ds.y[:samples])
    result = run_simulation(c, x, y, times, instances=instances, seed=seed, batch_size=batch_size,
                            compare_gdc=compare_gdc, progress=progress, metric=metric)
    result.data["data"] = ds.name
    if out_dir is not None:
        with atomic_dir(out_dir) as tmp:
            write_json_atomic(tmp / "results.json", result.data)
            plot_drift(result.data, tmp / "drift.png")
    return result


def diagnose(compiled: Any, data: Any, **options: Any) -> Any:
    """Per-layer SNR by cause, the single-layer end metric and advice; see :func:`cimc.diagnosis.diagnose`
    for the options (``time="24h"``, ``instances``, ``samples``, ``metric``, ``out_dir`` ...)."""
    from cimc.diagnosis import diagnose as run_diagnosis

    return run_diagnosis(compiled, data, **options)


def parse_times(drift: str | float | Sequence[float | str]) -> list[float]:
    """Times after programming in seconds from "1s,24h,6mo" or a list of seconds/strings; all must be > 0."""
    from cimc.runtime.simulator import check_time, parse_duration

    items = drift.split(",") if isinstance(drift, str) else [drift] if isinstance(drift, (int, float)) else drift
    return [parse_duration(t) if isinstance(t, str) else check_time(float(t)) for t in items]


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

    from cimc.errors import InputError
    from cimc.runtime.simulator import Chip, ideal_hook, parse_duration, use

    c = load_compiled(compiled)
    if isinstance(inputs, (str, os.PathLike)):
        p = Path(inputs)
        if not p.is_file():
            raise InputError(f"{p}: no such file; give a .npy array of inputs (first axis = samples)")
        try:
            x = np.load(p, allow_pickle=False)
        except ValueError as exc:
            raise InputError(f"{p}: not a .npy array ({exc}); save inputs with numpy.save") from exc
    else:
        x = np.asarray(inputs)
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
    with torch.no_grad():
        for start in range(0, len(x), 64):
            xb = torch.from_numpy(np.ascontiguousarray(x[start : start + 64], dtype=np.float32))
            reps = 1 if ideal else n
            y = chip.executor(xb.repeat(reps, *([1] * (xb.dim() - 1))))[0]
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
    from cimc.passes.finetune import DEFAULT_METHOD, save_finetuned
    from cimc.passes.finetune import finetune as run_finetune

    tuned, history = run_finetune(model, target, train, val, method=method or DEFAULT_METHOD, epochs=epochs,
                                  seed=seed, progress=progress, **options)
    if output is not None:
        save_finetuned(tuned, output)
    return tuned, history


