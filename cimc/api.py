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
    instance_range: tuple[int, int] | None = None,
    workers: int | None = None,
    ray: str | None = None,
) -> Any:
    """Accuracy over time on the simulated chip (program → drift → read), Monte Carlo over instances.

    ``data``: a :class:`cimc.data.Dataset`, an ``.npz`` path or a builtin name. ``drift``: comma-separated
    times ("1s,1h,24h") or seconds. With ``out_dir``, ``results.json`` and ``drift.png`` are written there.

    ``instance_range=(a, b)``: only chips a..b-1 of the ``instances`` (merge shards with
    :func:`cimc.runtime.simulator.merge_results`). ``workers=N`` splits the instances over N local processes,
    ``ray="auto"`` or an address over Ray; every chip's random stream depends only on (seed, chip index), so
    the numbers are the same, bit for bit, for any split.
    """
    import time as _time

    from cimc.data import Dataset, load_dataset
    from cimc.plots import plot_drift
    from cimc.report import atomic_dir, write_json_atomic
    from cimc.runtime.simulator import check_simulation_inputs, merge_results, parse_duration
    from cimc.runtime.simulator import simulate as run_simulation

    c = load_compiled(compiled)
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    times = [parse_duration(t) for t in drift.split(",")] if isinstance(drift, str) else list(drift)
    x, y = (ds.x, ds.y) if samples is None else (ds.x[:samples], None if ds.y is None else ds.y[:samples])
    if workers is None and ray is None:
        result = run_simulation(c, x, y, times, instances=instances, seed=seed, batch_size=batch_size,
                                compare_gdc=compare_gdc, progress=progress, instance_range=instance_range)
    else:
        from cimc.parallel import get_backend, split_range

        first, stop = check_simulation_inputs(c, x, y, instances, instance_range)
        started = _time.perf_counter()
        with get_backend(workers, ray) as backend:
            ranges = [(first + a, first + b) for a, b in split_range(stop - first, backend.workers)]
            logger.info("simulating %d instance(s) in %d shard(s) on %s", stop - first, len(ranges), backend.describe())
            shared = {"compiled": compiled_payload(c), "x": x, "y": y, "times": times, "instances": instances,
                      "seed": seed, "batch_size": batch_size, "compare_gdc": compare_gdc}
            bar = _shard_bar(len(ranges), progress)
            shards = []
            for _, shard in backend.run(_simulate_shard_task, ranges, shared):
                shards.append(shard)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
        result = merge_results(c, shards)
        result.data["wall_time_s"] = _time.perf_counter() - started
    result.data["data"] = ds.name
    if out_dir is not None:
        with atomic_dir(out_dir) as tmp:
            write_json_atomic(tmp / "results.json", result.data)
            plot_drift(result.data, tmp / "drift.png")
    return result


def compiled_payload(compiled: Any) -> dict[str, Any]:
    """What a worker needs to rebuild a compiled model: ONNX bytes (placement and quantisation are in its
    metadata), the resolved target as data, and a key naming both (workers cache by it)."""
    import hashlib

    from cimc.targets import target_yaml

    blob = ir.serde.serialize_model(compiled.model).SerializeToString()
    target = compiled.target.model_dump(mode="json")
    key = hashlib.sha256(blob + target_yaml(compiled.target).encode()).hexdigest()
    return {"key": key, "model": blob, "target": target, "source": compiled.source,
            "source_sha256": compiled.source_sha256}


_PAYLOAD_CACHE: dict[str, Any] = {}


def compiled_from_payload(payload: dict[str, Any]) -> Any:
    """The :class:`~cimc.artifact.CompiledModel` of :func:`compiled_payload` (cached per worker process)."""
    cached = _PAYLOAD_CACHE.get(payload["key"])
    if cached is not None:
        return cached
    import onnx

    from cimc.artifact import CompiledModel
    from cimc.passes.schedule import build_workload, execution_order
    from cimc.runtime.cost import estimate_cost
    from cimc.targets import Target

    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(payload["model"]))
    target = Target.model_validate(payload["target"])
    cost = estimate_cost(target, build_workload(execution_order(model.graph)))
    compiled = CompiledModel(model, target, cost, payload["source"], payload["source_sha256"])
    _PAYLOAD_CACHE.clear()  # one model per worker at a time: a sweep's points are different models
    _PAYLOAD_CACHE[payload["key"]] = compiled
    return compiled


def _simulate_shard_task(shared: dict[str, Any], instance_range: tuple[int, int]) -> Any:
    """A worker's part of a sharded simulation: chips ``instance_range`` (per-instance numbers)."""
    from cimc.runtime.simulator import simulate_shard

    compiled = compiled_from_payload(shared["compiled"])
    return simulate_shard(compiled, shared["x"], shared["y"], shared["times"], shared["instances"], shared["seed"],
                          shared["batch_size"], shared["compare_gdc"], False, tuple(instance_range))


def _shard_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc="simulating", leave=False, dynamic_ncols=True)


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
    # Chip k's random streams depend only on (seed, k): program that one chip alone.
    chip = Chip(c, 1, seed, first_instance=instance)
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
            outs.append(chip.executor(xb)[0].numpy())
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


