"""The typed Python API; the command line is a thin layer over these functions.

>>> import cimc
>>> model = cimc.load("model.onnx")          # import + canonicalise (onnx-ir model)
>>> print(cimc.inspect(model).table())
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import onnx_ir as ir

from cimc.artifact import load_compiled  # re-exported: the API's way to open a compiled model
from cimc.compiler import compile_model as compile  # noqa: A004  re-exported under the API's name, typed
from cimc.diagnosis import diagnose  # re-exported: the API function itself
from cimc.frontend import load_model
from cimc.hardening import harden  # re-exported: the API function itself, no wrapper to keep in step
from cimc.inspection import InspectReport, inspect_model
from cimc.vocabulary import parse_times  # re-exported

__all__ = ["load", "inspect", "compile", "simulate", "diagnose", "harden", "run", "load_compiled", "finetune"]

logger = logging.getLogger(__name__)

def load(
    path: str | os.PathLike[str],
    *,
    batch: int = 1,
    canonicalize: bool = True,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_values: Mapping[str, Any] | None = None,
) -> ir.Model:
    """Import an ONNX file: validate, fix the batch size, infer shapes and (by default) canonicalise.

    ``input_shapes`` fixes dynamic input dimensions (``{"audio": [1, 16000]}``); ``input_values`` freezes
    inputs to constants (``{"sr": 16000}``), after which constant folding removes what depends on them.
    Raises a :class:`cimc.errors.CimcError` subclass with a one-line message on any bad input, including
    every unsupported node at once.
    """
    from cimc.passes.canonicalize import canonicalize as run_canonicalize

    model = load_model(path, batch=batch, input_shapes=input_shapes, input_values=input_values)
    model.graph.meta["cimc.source"] = str(path)
    if canonicalize:
        run_canonicalize(model)
    return model


def inspect(
    model: str | os.PathLike[str] | ir.Model,
    *,
    batch: int = 1,
    canonicalize: bool = True,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_values: Mapping[str, Any] | None = None,
) -> InspectReport:
    """Per-node report of a model: shapes, parameters, MACs, and whether it runs analog or digital.

    ``canonicalize=False`` reports the graph as imported (for an :class:`onnx_ir.Model`: says it was loaded
    with ``canonicalize=False``).
    """
    name = ""
    if not isinstance(model, ir.Model):
        name = Path(model).name
        model = load(model, batch=batch, canonicalize=canonicalize, input_shapes=input_shapes,
                     input_values=input_values)
    return inspect_model(model, name=name, canonical=canonicalize)



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
    metric: str | Callable[..., float] | None = None,
    instance_range: tuple[int, int] | None = None,
    workers: int | None = None,
    ray: str | None = None,
    yield_target: float | str | None = None,
    stream: str | Sequence[str] | None = None,
) -> Any:
    """A metric over time on the simulated chip (program → drift → read), Monte Carlo over instances.

    ``data``: a :class:`cimc.data.Dataset`, an ``.npz`` path or a builtin name; ``y`` is optional.
    ``drift``: comma-separated times ("1s,1h,24h,6mo") or seconds. ``metric``: a name (accuracy, top5, auc,
    detect@0.5, cosine, mse, snr, relerr, module:function), a :class:`cimc.runtime.metrics.Metric` or a
    ``callable(outputs, labels_or_reference) -> float`` (see :mod:`cimc.runtime.metrics`; the default fits the
    data and the output). ``yield_target``: also report the share of chip instances meeting this value (metric
    units; "90%" for shares). With ``out_dir``, ``results.json``, ``timings.json`` and ``drift.png`` are written
    there.

    ``data`` may hold one array per model input, by name (:func:`cimc.data.bind`). ``stream``: ``"auto"`` or
    ``["OUT=IN", ...]`` runs each sequence chunk by chunk on every chip instance, the state output fed back to
    the state input (data ``[sequences, chunks, ...]``; the metric compares every chunk's output).

    ``instance_range=(a, b)``: only chips a..b-1 of the ``instances`` (merge shards with
    :func:`cimc.runtime.simulator.merge_results`). ``workers=N`` splits the instances over N local processes,
    ``ray="auto"`` or an address over Ray; every chip's random streams depend only on (seed, chip index), so
    the numbers are the same, bit for bit, for any split.
    """
    import time as _time

    from cimc.data import Dataset, Feed, bind, load_dataset
    from cimc.outputs import check_output_dir, output_dir
    from cimc.report import write_json_atomic
    from cimc.runtime.simulator import check_simulation_inputs, merge_results
    from cimc.runtime.simulator import simulate as run_simulation

    inputs = [compiled, data]
    if out_dir is not None:  # refuse a destructive -o before the simulation runs
        check_output_dir(out_dir, "simulation", inputs, force=force)
    c = load_compiled(compiled)
    ds = data if isinstance(data, (Dataset, Feed, Mapping)) else load_dataset(data, samples=samples)
    times = parse_times(drift)
    feed = ds if isinstance(ds, Feed) else bind(ds, c.model, stream=stream)
    if samples is not None:
        feed = feed.take(0, samples)
    # one plain array for one-input data: the path (and the numbers) of every one-input model stay as they were
    x, y = (feed if feed.single is None else feed.single), feed.y
    if workers is None and ray is None:
        result = run_simulation(c, x, y, times, instances=instances, seed=seed, batch_size=batch_size,
                                compare_gdc=compare_gdc, progress=progress, metric=metric,
                                instance_range=instance_range, yield_target=yield_target)
    else:
        from cimc.parallel import get_backend, split_range

        first, stop, metric = check_simulation_inputs(c, x, y, times, instances, instance_range, metric)
        started = _time.perf_counter()
        with get_backend(workers, ray) as backend:
            ranges = [(first + a, first + b) for a, b in split_range(stop - first, backend.workers)]
            logger.info("simulating %d instance(s) in %d shard(s) on %s", stop - first, len(ranges), backend.describe())
            shared = {"compiled": compiled_payload(c), "x": x, "y": y, "times": times, "instances": instances,
                      "seed": seed, "batch_size": batch_size, "compare_gdc": compare_gdc, "metric": metric}
            bar = _shard_bar(len(ranges), progress)
            shards = []
            for _, shard in backend.run(_simulate_shard_task, ranges, shared):
                shards.append(shard)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
        result = merge_results(c, shards, yield_target=yield_target)
        result.timings["wall_time_s"] = _time.perf_counter() - started
        result.timings["shards"] = len(ranges)
    result.data["data"] = getattr(ds, "name", "inputs")
    if feed.streaming:
        result.data["stream"] = {"pairs": [str(p) for p in feed.pairs], "chunks": feed.chunks}
    if out_dir is not None:
        from cimc.plots import plot_drift  # matplotlib only when a figure is written

        with output_dir(out_dir, "simulation", inputs, force=force) as tmp:
            write_json_atomic(tmp / "results.json", result.data)
            write_json_atomic(tmp / "timings.json", result.timings)
            plot_drift(result.data, tmp / "drift.png")
    return result


def _input_specs(model: ir.Model) -> list[tuple[str, tuple[int, ...], np.dtype, int]]:
    """(name, compiled shape, numpy dtype, batch axis) of every remaining graph input, in graph order."""
    from cimc.data import input_specs

    return [(s.name, s.shape, s.dtype, 0 if s.axis is None else s.axis) for s in input_specs(model)]


def _read_inputs(inputs: Any, model: ir.Model, stream: str | Sequence[str] | None = None) -> Any:
    """The inputs bound to the model (:class:`cimc.data.Feed`) from an array (one-input models), a
    {name: array} mapping, a .npy file (one-input models) or a .npz file with one array per input name."""
    from cimc.data import bind, input_specs, load_npy, load_npz_arrays
    from cimc.errors import InputError

    names = [s.name for s in input_specs(model)]
    if isinstance(inputs, (str, os.PathLike)):
        p = Path(inputs)
        if not p.is_file():
            raise InputError(f"{p}: no such file; give a .npy array (one-input models) or a .npz with one array per "
                             f"input ({', '.join(names)})")
        if p.suffix.lower() != ".npz":
            loaded: Any = load_npy(p)  # header checked (type, memory budget) before reading
        else:
            loaded = load_npz_arrays(p)  # likewise, member by member
        if isinstance(loaded, dict):
            arrays = loaded
            if len(names) == 1 and names[0] not in arrays:
                if len(arrays) == 1 or "x" in arrays:
                    arrays = {names[0]: arrays["x"] if "x" in arrays else next(iter(arrays.values()))}
            inputs = arrays
        else:
            inputs = loaded
    if not isinstance(inputs, Mapping):
        if len(names) != 1 and not stream:
            raise InputError(f"the model has {len(names)} inputs ({', '.join(names)}); give a .npz (or a dict) "
                             "with one array per input name")
        inputs = {"x": inputs}
    return bind({k: v for k, v in inputs.items() if k != "y"}, model, stream=stream)


def _batch_axis(out_shape: Sequence[int], declared: Sequence[int] | None, chunk: int) -> int | None:
    """Which axis of an output grew with the number of samples in the chunk (None: cannot tell)."""
    if declared is None or len(declared) != len(out_shape):
        return None
    grown = [a for a, (o, d) in enumerate(zip(out_shape, declared)) if o != d]
    if len(grown) == 1 and isinstance(declared[grown[0]], int) and out_shape[grown[0]] == declared[grown[0]] * chunk:
        return grown[0]
    return None



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
    from cimc.runtime.cost import estimate_cost
    from cimc.runtime.workload import model_workload
    from cimc.targets import Target

    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(payload["model"]))
    target = Target.model_validate(payload["target"])
    cost = estimate_cost(target, model_workload(model))
    compiled = CompiledModel(model, target, cost, payload["source"], payload["source_sha256"])
    _PAYLOAD_CACHE.clear()  # one model per worker at a time: a sweep's points are different models
    _PAYLOAD_CACHE[payload["key"]] = compiled
    return compiled


def _simulate_shard_task(shared: dict[str, Any], instance_range: tuple[int, int]) -> Any:
    """A worker's part of a sharded simulation: chips ``instance_range`` (per-instance numbers)."""
    from cimc.runtime.simulator import simulate_shard

    compiled = compiled_from_payload(shared["compiled"])
    return simulate_shard(compiled, shared["x"], shared["y"], shared["times"], shared["instances"], shared["seed"],
                          shared["batch_size"], shared["compare_gdc"], False, tuple(instance_range),
                          metric=shared.get("metric"))


def _shard_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from cimc.report import progress_bar

    return progress_bar(total, "simulating", unit="shard")  # redraws only on a terminal


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
    all_outputs: bool = False,
    force: bool = False,
    stream: str | Sequence[str] | None = None,
) -> Any:
    """Raw outputs of the compiled model on one chip instance at ``time`` after programming.

    ``stream``: ``"auto"`` or ``["OUT=IN", ...]`` runs each sequence chunk by chunk (inputs ``[sequences,
    chunks, ...]``, states from zeros or the given initial values), the state carried on the chip; outputs come
    per chunk (``[sequences, chunks, ...]``) and each state output as its value after the last chunk.

    ``inputs``: an array (one-input models), a ``{input name: array}`` mapping, a ``.npy`` file or a ``.npz``
    file with one array per input name; first axis = samples. ``instance`` picks one of ``instances`` chips
    drawn with ``seed`` (the same devices ``simulate`` draws). Returns the first output as an array, or with
    ``all_outputs`` a ``{output name: array}`` dict. ``output``: ``.npy`` (the first output; several outputs
    need ``.npz``) or ``.npz`` (every output, by name), written atomically and marked as cimc's (an existing
    file cimc did not write is replaced only with ``force``: :func:`cimc.outputs.check_output_file`).
    """
    import torch

    from cimc.errors import InputError, ModelError
    from cimc.runtime.simulator import Chip, ideal_hook, parse_duration, use
    from cimc.validate import samples_per_pass

    c = load_compiled(compiled)
    out_path = Path(output) if output is not None else None
    out_names = [v.name for v in c.model.graph.outputs]
    if out_path is not None and out_path.suffix not in (".npy", ".npz"):
        raise InputError(f"-o {out_path}: write outputs to a .npy (first output) or .npz (every output) file")
    if out_path is not None and out_path.suffix == ".npy" and len(out_names) > 1:
        raise InputError(f"the model has {len(out_names)} outputs ({', '.join(out_names)}); use -o FILE.npz to "
                         "save them all")
    if out_path is not None:
        from cimc.outputs import check_output_file

        check_output_file(out_path, out_path.suffix, [compiled, inputs], force=force)
    feed = _read_inputs(inputs, c.model, stream)
    arrays = list(feed.arrays)
    in_axes = [s.axis for s in feed.specs]  # None: a scalar input
    n = instances or instance + 1
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
    declared = [tuple(v.shape) if v.shape is not None else None for v in c.model.graph.outputs]
    lead = next((i for i, ax in enumerate(in_axes) if ax is not None), None)  # the first input with samples
    if lead is None:
        raise InputError("the model has no input with a sample axis; cimc run needs at least one")
    first, lead_axis = c.model.graph.inputs[lead], in_axes[lead]
    compiled_batch = int(first.shape[lead_axis]) if first.shape else 1
    total = arrays[lead].shape[lead_axis]

    def forward(chunk: int) -> list[np.ndarray] | None:
        parts: list[list[np.ndarray]] = [[] for _ in out_names]
        axes: list[int | None] = [0] * len(out_names)
        with torch.no_grad():
            for start in range(0, total, chunk):
                batch = [torch.from_numpy(np.ascontiguousarray(
                    a if ax is None else np.take(a, range(start, min(start + chunk, total)), axis=ax)))
                    for a, ax in zip(arrays, in_axes)]
                outs = chip.executor(*batch)
                for i, y in enumerate(outs):
                    y_np = y.detach().numpy()
                    if start == 0 and chunk != compiled_batch:
                        axes[i] = _batch_axis(y_np.shape, declared[i], batch[lead].shape[lead_axis] // compiled_batch)
                        if axes[i] is None and total > 1:
                            return None  # the output does not follow the batch: run at the compiled batch size
                    parts[i].append(y_np)
        return [np.concatenate(p, axis=axes[i] or 0) if len(p) > 1 else p[0] for i, p in enumerate(parts)]

    results = None
    step = samples_per_pass(c.model, 1, 64)  # within the memory budget
    if feed.streaming:
        results = _run_stream(chip.executor, feed, max(1, step // compiled_batch) * compiled_batch)
    elif total % compiled_batch == 0 and compiled_batch * 2 <= step:
        try:
            results = forward(step // compiled_batch * compiled_batch)
        except (RuntimeError, ModelError) as exc:  # a shape baked in for the compiled batch
            logger.debug("batched run failed (%s); running at the compiled batch size", exc)
    if results is None:
        if total % compiled_batch:
            raise InputError(f"the model was compiled for batches of {compiled_batch}; give a multiple of that "
                             f"many samples (got {total})")
        results = forward(compiled_batch)
        assert results is not None
    named = dict(zip(out_names, results))
    if out_path is not None:
        import io

        from cimc.outputs import mark_npy, mark_npz
        from cimc.report import write_bytes_atomic

        buf = io.BytesIO()
        if out_path.suffix == ".npz":
            np.savez(buf, **named)
            data = mark_npz(buf.getvalue())
        else:
            np.save(buf, results[0])
            data = mark_npy(buf.getvalue())
        write_bytes_atomic(out_path, data)
    return named if all_outputs else results[0]


def _run_stream(executor: Any, feed: Any, step: int) -> list[np.ndarray]:
    """Every output of a stream, ``step`` sequences at a time: per chunk ``[S, C, ...]``, a state output as its
    value after the last chunk (sequences on its input's batch axis)."""
    import torch

    from cimc.runtime.streaming import feed_forward

    axis_of = {p.output: next(s.axis for s in feed.specs if s.name == p.input) for p in feed.pairs}
    parts: list[list[np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, len(feed), step):
            outs = feed_forward(executor, feed.take(start, start + step))
            parts.append([o.detach().numpy() for o in outs])
    names = list(executor.output_names)
    return [np.concatenate([p[i] for p in parts], axis=axis_of.get(name, 0)) for i, name in enumerate(names)]


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
    force: bool = False,
    **options: Any,
) -> tuple[ir.Model, dict[str, Any]]:
    """Noise-aware fine-tuning; returns ``(model, history)`` and writes ``output`` (.onnx, atomically) if given.

    See :func:`cimc.passes.finetune.finetune` for the methods and options (``dac_bits``, ``lr``, ``eta`` ...).
    An existing ``output`` that cimc did not write (no ``cimc.finetune`` metadata) is replaced only with ``force``.
    """
    from cimc.outputs import check_output_file
    from cimc.passes.finetune import DEFAULT_METHOD, save_finetuned
    from cimc.passes.finetune import finetune as run_finetune

    sources = [model, train, val]
    if output is not None:  # refuse a bad -o before the training, not after it
        check_output_file(output, ".onnx", sources, force=force)
    tuned, history = run_finetune(model, target, train, val, method=method or DEFAULT_METHOD, epochs=epochs,
                                  seed=seed, progress=progress, **options)
    if output is not None:
        save_finetuned(tuned, output, sources, force=force)
    return tuned, history


