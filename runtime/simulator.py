"""Simulate a compiled model on the chip: program, then drift to t, then read; accuracy over time.

The sequence is explicit and cannot be skipped: :class:`Chip` programs every analog layer's conductances once
per Monte Carlo instance (programming noise, per-device drift exponents); :meth:`Chip.at` reads those same
devices at a time t after programming (drift + 1/f read noise) and returns a :class:`ChipState`, the only
thing the analog hook accepts. Each inference then runs DAC → crossbar MVM with the instance's conductances →
ADC per tile → digital sum → drift compensation → bias and digital ops.

Instances are a batch dimension: inputs are repeated ``instances`` times (instance-major) and every analog
op multiplies each instance's slice with that instance's weights in one batched product.

Read noise is drawn once per (instance, time): one read of the array per evaluation time, as when the chip is
read out for a test set in one sitting (a conservative choice: the error is common to every input).

Random streams: instance ``k``'s programming noise and drift exponents come from a generator seeded with a
hash of ``(seed, k, "program")``, its read noise at time t from ``(seed, k, "read", t)`` (and the GDC
reference read from ``(seed, k, "reference")``): an instance's chip depends on nothing else. So
``simulate(..., instance_range=(a, b))`` computes exactly instances a..b-1, and :func:`merge_results` of
shards that cover 0..I-1 gives, bit for bit, the one-process result (the numbers a shard reduces are kept
per instance and reduced once, in instance order, at the merge).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cimc.errors import DataError, InputError
from cimc.runtime.analog import analog_conv, analog_mvm, conv_weights, dac, layer_plans, probe_response
from cimc.runtime.cost import LayerActivity, estimate_cost
from cimc.runtime.devices import build_device, gdc_factor
from cimc.runtime.executor import AnalogStep, Executor

__all__ = ["Chip", "ChipState", "ShardResult", "SimulationResult", "format_duration", "ideal_hook", "instance_generators",
           "check_simulation_inputs", "merge_results", "parse_duration", "simulate", "simulate_shard", "use"]

logger = logging.getLogger(__name__)

_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, "y": 31557600.0}


def parse_duration(text: str) -> float:
    """'1s', '15min', '24h', '30d', '1y', '3600' → seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(s|m|min|h|d|w|y)?\s*", text.lower())
    if not m:
        raise InputError(f"cannot read time {text!r}; write e.g. 1s, 15min, 1h, 24h, 30d, 1y")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def format_duration(t_s: float) -> str:
    for unit, size in (("y", _UNITS["y"]), ("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if t_s >= size and abs(t_s / size - round(t_s / size)) < 1e-9:
            return f"{round(t_s / size)}{unit}"
    return f"{t_s:g}s"


def instance_generators(seed: int, instances: Sequence[int], purpose: str, t_s: float | None = None
                        ) -> list[torch.Generator]:
    """One generator per chip instance, seeded from a hash of (seed, instance, purpose, time): the stream of
    instance k is the same whichever process draws it and whichever other instances are drawn with it."""
    gens = []
    for k in instances:
        key = f"cimc-chip/{int(seed)}/{int(k)}/{purpose}/{'' if t_s is None else float(t_s).hex()}"
        digest = hashlib.sha256(key.encode()).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)))
    return gens


@dataclass
class ChipState:
    """Conductances of every instance read at ``t_s``, as effective weights, plus the GDC factors."""

    t_s: float
    instances: int
    weights: dict[str, torch.Tensor]  # layer → [I, G, K, N]
    gdc: dict[str, torch.Tensor] = field(default_factory=dict)  # layer → [I, 1, 1|G, 1|N]


class Chip:
    """``instances`` programmed copies of a compiled model's analog layers: chip instances
    ``first_instance`` … ``first_instance + instances - 1`` of the population named by ``seed``."""

    def __init__(self, compiled: Any, instances: int, seed: int = 0, first_instance: int = 0):
        if instances < 1:
            raise InputError(f"--instances must be at least 1 (got {instances})")
        if first_instance < 0:
            raise InputError(f"the first chip instance must be >= 0 (got {first_instance})")
        self.compiled = compiled
        self.instances = instances
        self.seed = seed
        self.instance_ids = range(first_instance, first_instance + instances)
        self.executor = Executor(compiled.model).eval()
        self.plans = layer_plans(compiled.model)
        self.steps = {s.name: s for s in self.executor.analog_steps}
        missing = [name for name in self.steps if name not in self.plans]
        if missing:
            raise InputError(f"analog layers {missing} have no placement; compile the model with 'cimc compile'")
        device = compiled.target.device
        self.device = build_device(device)
        self.gdc_mode = getattr(device, "gdc", "none")
        with torch.no_grad():
            self.ideal = {n: s.matrix(self.executor.weight(s)).detach().float() for n, s in self.steps.items()}
        gens = instance_generators(seed, self.instance_ids, "program")
        # Per-layer weight scale (max|W| of the whole layer -> g_max) spans all groups: program [1, G*K, N].
        # Per-column scales are per output column of each group: program [G, K, N] as it is.
        self.per_column = getattr(device, "weight_scale", "layer") == "column"
        to_program = self.ideal if self.per_column else {n: w.reshape(1, -1, w.shape[-1]) for n, w in self.ideal.items()}
        self.programmed = self.device.program_layers(to_program, instances, gens, per_column=self.per_column)
        self._reference: dict[str, torch.Tensor] | None = None

    def _probe_outputs(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each layer's response to its fixed GDC probe (DAC-quantised, ADC not applied: a long average)."""
        # Per instance: with the probe broadcast over I instances the product is batched differently for each I.
        return {name: torch.cat([probe_response(self.plans[name], w[i : i + 1]) for i in range(w.shape[0])])
                for name, w in weights.items()}

    def _read(self, t_s: float, gens: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """Effective weights [I, G, K, N] of every layer, read ``t_s`` after programming."""
        read = self.programmed.read(t_s, gens)
        return {k: v.float().reshape(self.instances, *self.ideal[k].shape) for k, v in read.items()}

    def at(self, t_s: float, gdc: bool = True) -> ChipState:
        """Read every instance's devices ``t_s`` seconds after programming (drift, then read noise)."""
        weights = self._read(t_s, instance_generators(self.seed, self.instance_ids, "read", t_s))
        state = ChipState(t_s, self.instances, weights)
        if gdc and self.gdc_mode != "none":
            if self._reference is None:  # the read right after programming (t = 0), same devices
                ref_w = self._read(0.0, instance_generators(self.seed, self.instance_ids, "reference"))
                self._reference = self._probe_outputs(ref_w)
            now = self._probe_outputs(weights)
            per_column = self.gdc_mode == "column"
            for name in weights:
                ref, cur = self._reference[name], now[name]  # [I, P, G, N]
                # One instance at a time: a reduction's rounding depends on the shape it reduces, and each
                # instance's factor must not depend on how many instances share the batch.
                state.gdc[name] = torch.cat([gdc_factor(ref[i : i + 1], cur[i : i + 1], per_column=per_column)
                                             for i in range(self.instances)])
        return state

    def hook(self, state: ChipState) -> Callable[..., torch.Tensor]:
        """The executor's analog hook for this chip state (inputs already through the DAC: :meth:`dac_hook`)."""
        instances = state.instances
        per_instance: dict[str, list[torch.Tensor]] = {}

        def run(step: AnalogStep, cols: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
            b, m, g, k = cols.shape
            c = cols.reshape(instances, (b // instances) * m, g, k)
            if step.name not in per_instance:
                per_instance[step.name] = [w.unsqueeze(0).clone() for w in state.weights[step.name]]
            w = per_instance[step.name]
            # Instance by instance, each operand in its own (aligned) buffer: a product's kernel, and so its
            # rounding, may depend on the batch shape and on the operands' alignment, and instance i's numbers
            # must not depend on how many instances share the run.
            y = torch.cat([analog_mvm(self.plans[step.name], c[i : i + 1].clone(), w[i]) for i in range(instances)])
            if step.name in state.gdc:  # digital rescale after the ADC: [I, 1, 1, 1|N] broadcasts over mvms, groups
                y = y * state.gdc[step.name]
            return y.reshape(b, m, g, -1)

        return run

    def conv_hook(self, state: ChipState) -> Callable[..., torch.Tensor | None]:
        """Fast path for convolutions whose groups each sit in one tile: a direct (grouped) convolution per
        instance, then the ADC per output channel and GDC. Same arithmetic as the unrolled path, without
        materialising the MVM operands. One convolution per instance rather than one grouped convolution
        over all of them: the convolution library picks its algorithm by channel count, so a convolution
        over I instances rounds differently for different I, and shards of a run must agree bit for bit."""
        instances = state.instances
        cache: dict[str, list[torch.Tensor]] = {}

        def run(step: AnalogStep, x: torch.Tensor) -> torch.Tensor | None:
            plan = self.plans[step.name]
            if step.op_type != "Conv" or not plan.whole_groups:
                return None
            w = state.weights[step.name]
            if step.name not in cache:
                shape = self.executor.weight(step).shape[1:]
                cache[step.name] = [conv_weights(w[i : i + 1], shape) for i in range(instances)]
            gdc = state.gdc.get(step.name)
            xs = x.reshape(instances, x.shape[0] // instances, *x.shape[1:])
            return torch.cat([analog_conv(plan, xs[i], cache[step.name][i], 1, plan.groups, step.attrs,
                                          None if gdc is None else gdc[i : i + 1]) for i in range(instances)])

        return run

    def dac_hook(self, activity: dict[str, list[torch.Tensor]] | None = None) -> Callable[..., torch.Tensor]:
        """The executor's input hook: each analog layer's DAC, optionally recording input activity.

        Activity is recorded per instance (the batch is instance-major): per forward pass and layer, an
        ``[I, 3]`` tensor of (fraction of non-zero inputs, mean |x| / full scale, mean over MVMs of the peak)."""
        instances = self.instances

        def run(step: AnalogStep, x: torch.Tensor) -> torch.Tensor:
            plan = self.plans[step.name]
            xq = dac(plan, x)
            if activity is not None:
                per_instance = xq.detach().abs().reshape(instances, xq.shape[0] // instances, -1).numpy()
                stats = []
                # One instance at a time, with numpy's single-threaded pairwise sums in float64: the same
                # numbers whatever the instance count and torch's thread count (a threaded sum splits differently).
                for a in per_instance:
                    x_max = plan.quant.x_max if plan.quant is not None else max(float(a.max()), 1e-12)
                    a = a.astype(np.float64) / x_max
                    stats.append([np.count_nonzero(a) / a.size, a.mean(), a.max(axis=-1).mean()])
                activity.setdefault(step.name, []).append(torch.tensor(stats, dtype=torch.float64))
            return xq

        return run


def ideal_hook(chip: Chip) -> Callable[..., torch.Tensor]:
    """Quantised converters, ideal devices: the digital twin's numbers (use with :meth:`Chip.dac_hook`)."""

    def run(step: AnalogStep, cols: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        b, m, g, k = cols.shape
        return analog_mvm(chip.plans[step.name], cols.reshape(1, b * m, g, k), matrix.unsqueeze(0)).reshape(b, m, g, -1)

    return run


def use(chip: Chip, hook: Callable[..., torch.Tensor] | None, activity: dict[str, list[torch.Tensor]] | None = None,
        state: ChipState | None = None) -> None:
    """Point the chip's executor at an analog hook (None: the float model), with the DAC in front of it and,
    for a chip state, the direct convolution path."""
    chip.executor.hook = hook
    chip.executor.input_hook = chip.dac_hook(activity) if hook is not None else None
    chip.executor.direct_hook = chip.conv_hook(state) if state is not None else None


def _predictions(executor: Executor, x: np.ndarray, instances: int, batch_size: int,
                 tick: Callable[[int], None] | None = None) -> np.ndarray:
    """Class predictions [instances, samples] (argmax of the first output)."""
    preds = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))
            rep = xb.repeat(instances, *([1] * (xb.dim() - 1)))
            logits = executor(rep)[0]
            preds.append(logits.reshape(instances, len(xb), -1).argmax(-1).numpy())
            if tick:
                tick(len(xb))
    return np.concatenate(preds, axis=1)


@dataclass
class ShardResult:
    """What a run over chip instances ``instance_range`` = [a, b) computed, kept per instance so that shards
    merge exactly: accuracies ``accuracy[mode][time][k]`` (mode "gdc" and/or "none"), per-layer input
    activity ``activity[layer][k]`` = (density, mean magnitude, peak), and the instance-free baselines."""

    instance_range: tuple[int, int]
    population: int  # instances in the whole run (fixes the samples per forward pass)
    seed: int
    times_s: list[float]
    gdc_mode: str
    modes: list[str]
    accuracy: dict[str, list[list[float]]]
    activity: dict[str, list[list[float]]]
    float_accuracy: float
    quantized_accuracy: float
    samples: int
    wall_time_s: float


@dataclass
class SimulationResult:
    """Accuracy per time (mean, std, min, per instance), baselines, and the cost the run counted.

    ``shard`` holds the per-instance numbers :func:`merge_results` combines (not written to results.json)."""

    data: dict[str, Any]
    shard: ShardResult | None = None

    def table(self) -> str:
        from cimc.report import format_table

        rows = []
        for series in self.data["series"]:
            for p in series["points"]:
                rows.append([series["label"], p["label"], f"{100 * p['mean']:.2f}", f"{100 * p['std']:.2f}",
                             f"{100 * p['min']:.2f}", f"{100 * (p['mean'] - self.data['float_accuracy']):+.2f}"])
        head = format_table(["drift compensation", "time", "mean %", "std %", "min %", "vs float"], rows,
                            right=(2, 3, 4, 5))
        d = self.data
        c = d["cost"]
        return (
            f"{head}\n\nfloat model: {100 * d['float_accuracy']:.2f} %   quantised, ideal devices: "
            f"{100 * d['quantized_accuracy']:.2f} %   ({d['samples']} samples, {d['instances']} instances, seed {d['seed']})\n"
            f"cost counted on this data: {c['measured']['tops_per_w']:.3g} TOPS/W, "
            f"{c['measured']['energy_per_inference_j'] * 1e6:.3g} uJ, {c['measured']['latency_s'] * 1e3:.3g} ms per inference "
            f"(compile's static estimate: {c['static']['tops_per_w']:.3g} TOPS/W, "
            f"{c['static']['energy_per_inference_j'] * 1e6:.3g} uJ, {c['static']['latency_s'] * 1e3:.3g} ms)"
        )


def simulate(
    compiled: Any,
    x: np.ndarray,
    y: np.ndarray,
    times_s: Sequence[float] = (1.0, 3600.0, 86400.0, 30 * 86400.0, _UNITS["y"]),
    instances: int = 25,
    seed: int = 0,
    batch_size: int = 64,
    compare_gdc: bool = True,
    progress: bool = False,
    instance_range: tuple[int, int] | None = None,
) -> SimulationResult:
    """Monte Carlo accuracy of ``compiled`` on (x, y) at each time after programming.

    ``instances`` chips make the population; ``instance_range=(a, b)`` computes only chips a..b-1 of it (a
    shard; combine shards with :func:`merge_results`). The samples per forward pass follow ``instances``, so
    a shard runs the same batches as the whole run."""
    shard = simulate_shard(compiled, x, y, times_s, instances, seed, batch_size, compare_gdc, progress,
                           instance_range)
    return merge_results(compiled, [shard])


def check_simulation_inputs(compiled: Any, x: np.ndarray, y: np.ndarray | None, instances: int,
                            instance_range: tuple[int, int] | None = None) -> tuple[int, int]:
    """Raise the user's error before any work starts; returns the instance range [first, stop)."""
    if y is None:
        raise DataError("simulation needs labels: the data file must contain 'y' (integer class labels)")
    expected = tuple(compiled.model.graph.inputs[0].shape)[1:]
    if tuple(x.shape[1:]) != expected:
        raise DataError(f"data inputs have shape {tuple(x.shape[1:])} per sample but the model takes {expected}")
    if isinstance(instances, bool) or int(instances) != instances or instances < 1:
        raise InputError(f"--instances must be at least 1 (got {instances})")
    first, stop = instance_range if instance_range is not None else (0, instances)
    if not 0 <= first < stop <= instances:
        raise InputError(f"instance range {first}..{stop - 1} is not inside 0..{instances - 1}; "
                         f"give 0 <= a < b <= instances")
    return int(first), int(stop)


def simulate_shard(
    compiled: Any,
    x: np.ndarray,
    y: np.ndarray,
    times_s: Sequence[float],
    instances: int,
    seed: int = 0,
    batch_size: int = 64,
    compare_gdc: bool = True,
    progress: bool = False,
    instance_range: tuple[int, int] | None = None,
) -> ShardResult:
    """Chips ``instance_range`` (default: all ``instances``) of the population: per-instance numbers."""
    first, stop = check_simulation_inputs(compiled, x, y, instances, instance_range)
    started = time.perf_counter()
    count = stop - first
    chip = Chip(compiled, count, seed, first)
    per_run = max(1, batch_size // instances) if instances > 1 else batch_size
    gdc_modes = [True, False] if compare_gdc and chip.gdc_mode != "none" else [chip.gdc_mode != "none"]
    total = len(x) * (2 + len(times_s) * len(gdc_modes) * count)
    bar = _progress(total, progress)
    tick = bar.update if bar is not None else None
    y = np.asarray(y)
    executor = chip.executor
    float_pred = _predictions(executor, x, 1, batch_size, tick)[0]
    use(chip, ideal_hook(chip))
    quant_pred = _predictions(executor, x, 1, batch_size, tick)[0]
    activity: dict[str, list[torch.Tensor]] = {}
    accuracy: dict[bool, list[list[float]]] = {gdc: [] for gdc in gdc_modes}
    for t in times_s:
        # One read of the devices per time serves both modes: compensation only adds the digital rescale.
        compensated = chip.at(t, gdc=gdc_modes[0])
        for gdc in gdc_modes:
            state = compensated if gdc == gdc_modes[0] else ChipState(t, count, compensated.weights)
            use(chip, chip.hook(state), activity if (gdc == gdc_modes[0] and t == times_s[0]) else None, state)
            pred = _predictions(executor, x, count, per_run, tick)
            accuracy[gdc].append([float((p == y).mean()) for p in pred])
    use(chip, None)
    if bar:
        bar.close()
    return ShardResult(
        instance_range=(first, stop), population=instances, seed=seed, times_s=[float(t) for t in times_s],
        gdc_mode=chip.gdc_mode, modes=["gdc" if g else "none" for g in gdc_modes],
        accuracy={("gdc" if g else "none"): v for g, v in accuracy.items()},
        # per instance: the mean over forward passes, each instance reduced on its own (shape-independent)
        activity={name: [[float(v) for v in np.stack([b[k].numpy() for b in vals]).mean(axis=0)] for k in range(count)]
                  for name, vals in activity.items()},
        float_accuracy=float((float_pred == y).mean()), quantized_accuracy=float((quant_pred == y).mean()),
        samples=len(x), wall_time_s=time.perf_counter() - started,
    )


def merge_results(compiled: Any, shards: Sequence[ShardResult | SimulationResult]) -> SimulationResult:
    """One result from shards of the same run (any order): per-instance numbers concatenated in instance
    order, then reduced; the same bytes as computing every instance in one process."""
    parts = sorted((s.shard if isinstance(s, SimulationResult) else s for s in shards),  # type: ignore[misc]
                   key=lambda r: r.instance_range[0])
    if not parts or any(p is None for p in parts):
        raise InputError("merge_results needs the shard results of simulate(..., instance_range=...)")
    head = parts[0]
    for prev, nxt in zip(parts, parts[1:]):
        if nxt.instance_range[0] != prev.instance_range[1]:
            raise InputError(f"shards do not cover the instances contiguously: {prev.instance_range} then "
                             f"{nxt.instance_range}")
        if (nxt.seed, nxt.times_s, nxt.modes, nxt.samples, nxt.population) != (
                head.seed, head.times_s, head.modes, head.samples, head.population):
            raise InputError("shards come from different runs (seed, times, samples or instances differ)")
    first, stop = head.instance_range[0], parts[-1].instance_range[1]
    merged = ShardResult(
        instance_range=(first, stop), population=head.population, seed=head.seed, times_s=head.times_s,
        gdc_mode=head.gdc_mode, modes=head.modes,
        accuracy={m: [sum((p.accuracy[m][i] for p in parts), []) for i in range(len(head.times_s))]
                  for m in head.modes},
        activity={name: sum((p.activity[name] for p in parts), []) for name in head.activity},
        float_accuracy=head.float_accuracy, quantized_accuracy=head.quantized_accuracy, samples=head.samples,
        wall_time_s=max(p.wall_time_s for p in parts),
    )
    series = []
    for mode in merged.modes:
        points = []
        for t, per_instance in zip(merged.times_s, merged.accuracy[mode]):
            acc = np.asarray(per_instance, dtype=np.float64)
            points.append({"label": format_duration(t), "t_s": t, "mean": float(acc.mean()), "std": float(acc.std()),
                           "min": float(acc.min()), "max": float(acc.max()), "per_instance": list(per_instance)})
        series.append({"label": f"GDC ({merged.gdc_mode})" if mode == "gdc" else "no compensation",
                       "gdc": merged.gdc_mode if mode == "gdc" else "none", "points": points})
    measured = {name: LayerActivity(*[float(v) for v in np.asarray(rows, dtype=np.float64).mean(axis=0)])
                for name, rows in merged.activity.items()}
    from cimc.passes.schedule import build_workload, execution_order

    workload = build_workload(execution_order(compiled.model.graph))
    counted = estimate_cost(compiled.target, workload, activity=measured)
    data = {
        "format": "cimc-simulation/1",
        "model": compiled.source,
        "target": compiled.target.name,
        "instances": stop - first,
        "seed": merged.seed,
        "samples": merged.samples,
        "float_accuracy": merged.float_accuracy,
        "quantized_accuracy": merged.quantized_accuracy,
        "dac_bits": compiled.target.converters.dac_bits,
        "adc_bits": compiled.target.converters.adc_bits,
        "series": series,
        "cost": {"static": _cost_summary(compiled.cost), "measured": _cost_summary(counted),
                 "activity": {k: vars(v) for k, v in measured.items()},
                 "ops_definition": "2 x MACs executed in the analog arrays"},
        "wall_time_s": merged.wall_time_s,
    }
    if (first, stop) != (0, merged.population):
        data["instance_range"] = [first, stop]
    return SimulationResult(data, merged)


def _cost_summary(cost: Any) -> dict[str, Any]:
    return {"tops_per_w": cost.tops_per_w, "energy_per_inference_j": cost.total_energy_j, "latency_s": cost.latency_s,
            "cycles": cost.cycles, "inferences_per_s": cost.inferences_per_s, "energy_breakdown_j": cost.energy_j}


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="inf", desc="simulating", leave=False, dynamic_ncols=True)
