"""Simulate a compiled model on the chip: program, then drift to t, then read; accuracy over time.

The sequence is explicit and cannot be skipped: :class:`Chip` programs every analog layer's conductances once
per Monte Carlo instance (programming noise, per-device drift exponents); :meth:`Chip.at` reads those same
devices at a time t after programming (drift + 1/f read noise) and returns a :class:`ChipState`, the only
thing the analog hook accepts. Each inference then runs DAC → crossbar MVM with the instance's conductances →
ADC per tile → digital sum → drift compensation → bias and digital ops.

Instances run one after another over the same batch of inputs (:meth:`ChipState.instance`,
:func:`run_outputs` with ``per_instance``): every op of instance k sees the shapes it would see if instance k
were simulated alone, so its numbers do not depend on how many instances share the run, and its activations
stay small enough to live in the caches (the elementwise work of DAC, ADC, output noise and compensation is
most of a simulation's time). The hooks also accept an instance-major batch of several instances (used by
``cimc diagnose``), computing each instance's products on its own.

Read noise is drawn once per (instance, time): one read of the array per evaluation time, as when the chip is
read out for a test set in one sitting (a conservative choice: the error is common to every input).

Random streams: instance ``k``'s programming noise and drift exponents come from a generator seeded with a
hash of ``(seed, k, "program")``, its read noise at time t from ``(seed, k, "read", t)``, the GDC reference
read from ``(seed, k, "reference")`` and the converters' output noise at time t from two streams,
``(seed, k, "output", t)`` and ``(seed, k, "output-b", t)`` (each conversion's draws are cut in two halves,
drawn at once on two threads when there are two):
an instance's chip depends on nothing else. Every instance is computed on its own, so
``simulate(..., instance_range=(a, b))`` computes exactly instances a..b-1, and :func:`merge_results` of shards
that cover 0..I-1 gives, bit for bit, the one-process result (the numbers a shard reduces are kept per
instance and reduced once, in instance order, at the merge).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cimc.console import format_table, progress_bar
from cimc.data import reshape_hint
from cimc.errors import DataError, InputError, ModelError
from cimc.optional import import_pandas as _pandas
from cimc.runtime.analog import analog_conv, analog_mvm, conv_weights, dac, layer_plans, onehot_response, probe_response
from cimc.runtime.cost import SYSTEM_OPS_DEFINITION, LayerActivity, estimate_cost, explain_measured
from cimc.runtime.devices import build_device, gdc_factor
from cimc.runtime.executor import AnalogStep, Executor
from cimc.runtime.metrics import (MetricAccumulator, check_metric, check_yield_target, chip_yield, default_metric,
                                  format_score, get_metric, higher_is_better, is_percent, metric_name, needs_labels,
                                  output_size, per_class_accuracy)
from cimc.runtime.workload import model_workload
from cimc.validate import samples_per_pass
from cimc.vocabulary import _UNITS, DURATION_HELP, check_time, format_duration, parse_duration  # re-exported

__all__ = ["DURATION_HELP", "Chip", "ChipState", "ShardResult", "SimulationResult", "check_batch_axis",
           "check_simulation_inputs", "check_time", "format_duration", "ideal_hook", "instance_generators",
           "instance_selectors", "merge_results", "parse_duration", "run_outputs", "simulate", "simulate_shard", "use"]

logger = logging.getLogger(__name__)


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
    weights: dict[str, torch.Tensor]  # crossbar block (layer) → [I, G, K, N]
    gdc: dict[str, torch.Tensor] = field(default_factory=dict)  # use (node) → [I, 1, 1|G, 1|N]
    # Output (ADC input) noise is drawn per conversion, so per forward pass: one stream per instance and read
    # time (instance i's noise comes from noise_generator[i] alone).
    noise_generator: list[tuple[torch.Generator, ...]] | None = None

    def instance(self, k: int) -> ChipState:
        """Instance ``k`` alone: its weights (views), GDC factors and output-noise stream."""
        return ChipState(self.t_s, 1, {n: w[k : k + 1] for n, w in self.weights.items()},
                         {n: g[k : k + 1] for n, g in self.gdc.items()},
                         None if self.noise_generator is None else [self.noise_generator[k]])


class Chip:
    """``instances`` programmed copies of a compiled model's crossbar blocks: chip instances
    ``first_instance`` … ``first_instance + instances - 1`` of the population named by ``seed``.

    A block is programmed once however many nodes use it (a shared weight): every use reads the same devices,
    so the same programming noise and drift. Drift compensation is per use (its probe goes through the use's
    DAC), applied to that use's outputs.
    """

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
        self.gdc_readout = getattr(device, "gdc_readout", "probe")
        self.gdc_gain = float(getattr(device, "gdc_gain", 1.0))
        self.layer = {name: (self.plans[name].layer or name) for name in self.steps}  # use → block
        with torch.no_grad():
            self.ideal: dict[str, torch.Tensor] = {}  # block → [G, K, N], from its first use
            for name, s in self.steps.items():
                if self.layer[name] not in self.ideal:
                    self.ideal[self.layer[name]] = s.matrix(self.executor.weight(s)).detach().float()
        gens = instance_generators(seed, self.instance_ids, "program")
        # Per-layer weight scale (max|W| of the whole layer -> g_max) spans all groups: program [1, G*K, N].
        # Per-column scales are per output column of each group: program [G, K, N] as it is.
        self.per_column = getattr(device, "weight_scale", "layer") == "column"
        to_program = self.ideal if self.per_column else {n: w.reshape(1, -1, w.shape[-1]) for n, w in self.ideal.items()}
        self.programmed = self.device.program_layers(to_program, instances, gens, per_column=self.per_column)
        self._reference: dict[str, torch.Tensor] | None = None
        self.out_noise = self._output_noise_sigma(compiled.target)

    def _output_noise_sigma(self, target: Any) -> dict[str, torch.Tensor]:
        """Per use (node), the std [G, N] of the analog noise on each column sum (``converters.output_noise``, in
        units of one device at g_max driven at the DAC's full scale: x_max x the weight mapped to g_max)."""
        level = float(getattr(target.converters, "output_noise", 0.0) or 0.0)
        if level <= 0:
            return {}
        sigmas = {}
        for name, layer in self.layer.items():
            plan, w = self.plans[name], self.ideal[layer]
            if plan.quant is None or plan.quant.dac_bits is None:
                continue  # converters off (or uncalibrated): no DAC full scale, so no periphery noise either
            x_max = plan.quant.x_max
            w_max = w.abs().amax(dim=1) if self.per_column else w.abs().amax().expand(w.shape[0], w.shape[2])
            sigmas[name] = level * x_max * w_max.clamp_min(torch.finfo(w.dtype).tiny)
        return sigmas

    def _probe_outputs(self, weights: dict[str, torch.Tensor], purpose: str, t_s: float) -> dict[str, torch.Tensor]:
        """Each use's response to its fixed GDC probe (DAC-quantised, ADC not applied: a long average), read
        from its block's devices. With ``device.gdc_readout: onehot``, aihwkit's readout instead (one noisy,
        quantised read of one-hot inputs; output noise from the streams of ``purpose`` and ``t_s``)."""
        if self.gdc_readout == "onehot":
            gens = instance_generators(self.seed, self.instance_ids, purpose, t_s)
            return {name: torch.cat([onehot_response(self.plans[name], weights[layer][i : i + 1],
                                                     self.out_noise.get(name), gens[i])
                                     for i in range(weights[layer].shape[0])])
                    for name, layer in self.layer.items()}
        # Per instance: with the probe broadcast over I instances the product is batched differently for each I.
        return {name: torch.cat([probe_response(self.plans[name], weights[layer][i : i + 1])
                                 for i in range(weights[layer].shape[0])])
                for name, layer in self.layer.items()}

    def _read(self, t_s: float, gens: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """Effective weights [I, G, K, N] of every block, read ``t_s`` after programming."""
        read = self.programmed.read(t_s, gens)
        return {k: v.float().reshape(self.instances, *self.ideal[k].shape) for k, v in read.items()}

    def at(self, t_s: float, gdc: bool = True) -> ChipState:
        """Read every instance's devices ``t_s`` seconds after programming (drift, then read noise)."""
        weights = self._read(t_s, instance_generators(self.seed, self.instance_ids, "read", t_s))
        noise_gens = list(zip(instance_generators(self.seed, self.instance_ids, "output", t_s),
                              instance_generators(self.seed, self.instance_ids, "output-b", t_s))) if self.out_noise else None
        state = ChipState(t_s, self.instances, weights, noise_generator=noise_gens)
        if gdc and self.gdc_mode != "none":
            if self._reference is None:  # the read right after programming (t = 0), same devices
                ref_w = self._read(0.0, instance_generators(self.seed, self.instance_ids, "reference"))
                self._reference = self._probe_outputs(ref_w, "reference-readout", 0.0)
            now = self._probe_outputs(weights, "gdc-readout", t_s)
            per_column = self.gdc_mode == "column"
            for name in now:
                ref, cur = self._reference[name], now[name]  # [I, P, G, N]
                # One instance at a time: a reduction's rounding depends on the shape it reduces, and each
                # instance's factor must not depend on how many instances share the batch.
                state.gdc[name] = torch.cat([gdc_factor(ref[i : i + 1], cur[i : i + 1], per_column=per_column)
                                             for i in range(self.instances)])
                if self.gdc_gain != 1.0:  # shrink towards 1: less noise amplified with the signal
                    state.gdc[name] = 1.0 + self.gdc_gain * (state.gdc[name] - 1.0)
        return state

    def hook(self, state: ChipState) -> Callable[..., torch.Tensor]:
        """The executor's analog hook for this chip state (inputs already through the DAC: :meth:`dac_hook`)."""
        instances = state.instances
        per_instance: dict[str, list[torch.Tensor]] = {}  # block → one [1, G, K, N] buffer per instance
        gens = state.noise_generator

        def run(step: AnalogStep, cols: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
            b, m, g, k = cols.shape
            c = cols.reshape(instances, (b // instances) * m, g, k)
            layer = self.layer[step.name]
            if layer not in per_instance:  # every use of a shared block reads the same devices
                per_instance[layer] = [w.unsqueeze(0).clone() for w in state.weights[layer]]
            w = per_instance[layer]
            sigma = self.out_noise.get(step.name)
            # Instance by instance, each operand in its own (aligned) buffer: a product's kernel, and so its
            # rounding, may depend on the batch shape and on the operands' alignment, and instance i's numbers
            # must not depend on how many instances share the run. Output noise from instance i's stream.
            y = _joined([analog_mvm(self.plans[step.name], _own_buffer(c[i : i + 1]), w[i], out_noise=sigma,
                                    generator=None if gens is None else gens[i]) for i in range(instances)])
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
        gens = state.noise_generator

        def run(step: AnalogStep, x: torch.Tensor) -> torch.Tensor | None:
            plan = self.plans[step.name]
            if step.op_type != "Conv" or not plan.whole_groups:
                return None
            layer = self.layer[step.name]
            if layer not in cache:  # one kernel per block: uses of a shared weight read the same devices
                w, shape = state.weights[layer], self.executor.weight(step).shape[1:]
                cache[layer] = [conv_weights(w[i : i + 1], shape) for i in range(instances)]
            gdc = state.gdc.get(step.name)
            sigma = self.out_noise.get(step.name)
            xs = x.reshape(instances, x.shape[0] // instances, *x.shape[1:])
            return _joined([analog_conv(plan, xs[i], cache[layer][i], 1, plan.groups, step.attrs,
                                        None if gdc is None else gdc[i : i + 1], out_noise=sigma,
                                        generator=None if gens is None else gens[i]) for i in range(instances)])

        return run

    def dac_hook(self, activity: dict[str, list[torch.Tensor]] | None = None,
                 instances: int | None = None) -> Callable[..., torch.Tensor]:
        """The executor's input hook: each analog layer's DAC, optionally recording input activity.

        Activity is recorded per instance (the batch is instance-major, ``instances`` of them, default all of
        the chip's): per forward pass and layer, an ``[I, 3]`` tensor of (fraction of non-zero inputs,
        mean |x| / full scale, mean over MVMs of the peak)."""
        instances = instances or self.instances

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


def _own_buffer(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous at the start of its own (aligned) allocation: copied unless it already is."""
    return t if t.is_contiguous() and t.storage_offset() == 0 else t.clone(memory_format=torch.contiguous_format)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Instance results stacked on the batch axis (no copy for a single instance)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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


Selector = Callable[[Executor], None]


def instance_selectors(chip: Chip, state: ChipState,
                       activity: list[dict[str, list[torch.Tensor]]] | None = None) -> list[Selector]:
    """One callable per instance of ``state`` that points an executor (the chip's, or a copy of it) at that
    instance alone, for :func:`run_outputs`'s ``per_instance``; ``activity``, if given, gets one dict per
    instance. The hooks are made once here, so their per-instance caches (convolution kernels) serve every
    batch."""
    selectors = []
    for k in range(state.instances):
        one = state.instance(k)
        hooks = (chip.hook(one), chip.dac_hook(None if activity is None else activity[k], instances=1),
                 chip.conv_hook(one))

        def select(executor: Executor, hooks: tuple[Any, Any, Any] = hooks) -> None:
            executor.hook, executor.input_hook, executor.direct_hook = hooks

        selectors.append(select)
    return selectors


class _InstanceWorkers:
    """Runs the instances of a batch side by side on ``workers`` threads, each with its own shallow copy of the
    executor (parameters and plan shared; hooks its own) and one torch thread: the cores go to whole
    instances, which scales better than splitting each small operation. An instance's numbers are the same
    whichever thread runs it and however many run at once (each op runs on one thread, on its own tensors)."""

    def __init__(self, executor: Executor, workers: int):
        self.idle: queue.SimpleQueue[Executor] = queue.SimpleQueue()
        for _ in range(workers):
            self.idle.put(copy.copy(executor))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cimc-instance",
                                       initializer=torch.set_num_threads, initargs=(1,))

    def run(self, xb: torch.Tensor, selectors: Sequence[Selector]) -> list[torch.Tensor]:
        def one(select: Selector) -> torch.Tensor:
            executor = self.idle.get()
            try:
                with torch.no_grad():  # grad mode is per thread
                    select(executor)
                    return executor(xb)[0]
            finally:
                self.idle.put(executor)

        return list(self.pool.map(one, selectors))

    def close(self) -> None:
        self.pool.shutdown()


def _finite(v: float) -> float | None:
    """JSON has no infinity: an SNR with no error at all is written as null."""
    return float(v) if math.isfinite(v) else None


def run_outputs(executor: Executor, x: np.ndarray, instances: int, batch_size: int,
                tick: Callable[[int], None] | None = None, per_instance: Sequence[Selector] | None = None) -> Any:
    """Yield ``(start, outputs [instances, batch, ...])`` of the first model output, batch by batch.

    ``per_instance`` (see :func:`instance_selectors`): run the batch once per instance, each selector pointing
    an executor at its instance first; with several torch threads, that many instances run at once, one
    thread each (the thread count is restored afterwards). Otherwise the batch is repeated ``instances``
    times, instance-major, in one pass."""
    threads = torch.get_num_threads()
    workers = min(threads, len(per_instance)) if per_instance is not None else 1
    side_by_side = _InstanceWorkers(executor, workers) if workers > 1 else None
    try:
        yield from _run_batches(executor, x, instances, batch_size, tick, per_instance, side_by_side)
    finally:
        if side_by_side is not None:
            side_by_side.close()
            torch.set_num_threads(threads)


def _run_batches(executor: Executor, x: np.ndarray, instances: int, batch_size: int,
                 tick: Callable[[int], None] | None, per_instance: Sequence[Selector] | None,
                 side_by_side: _InstanceWorkers | None) -> Any:
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))
            if per_instance is not None:
                if side_by_side is not None:
                    outs = side_by_side.run(xb, per_instance)
                else:
                    outs = []
                    for select in per_instance:
                        select(executor)
                        outs.append(executor(xb)[0])
                for out in outs:
                    check_batch_axis(out, len(xb), "the first output")
                yield start, torch.stack(outs)
            else:
                rep = xb.repeat(instances, *([1] * (xb.dim() - 1)))
                out = executor(rep)[0]
                check_batch_axis(out, instances * len(xb), "the first output")
                yield start, out.reshape(instances, len(xb), *out.shape[1:])
            if tick:
                tick(len(xb))


def check_batch_axis(y: torch.Tensor, rows: int, name: str) -> None:
    """The output must keep one row per sample (and instance) on its first axis, as every input does."""
    if y.dim() == 0 or y.shape[0] != rows:
        raise ModelError(
            f"output {name!r} has shape {tuple(y.shape)} for {rows} sample(s) x instance(s): the model does not keep "
            "samples on the first axis (a Reshape/Flatten/Transpose mixes them), so cimc cannot batch it; re-export "
            "it with the batch as the first axis throughout (e.g. Flatten axis=1, Reshape to [-1, ...])"
        )


def _evaluate(executor: Executor, x: np.ndarray, instances: int, batch_size: int, metric: str,
              y: np.ndarray | None, reference: list[torch.Tensor] | None, classes: int,
              tick: Callable[[int], None] | None = None, extra: Sequence[str] = (),
              per_instance: Sequence[Selector] | None = None) -> dict[str, list[MetricAccumulator]]:
    """Accumulate ``metric`` (and ``extra`` agreement metrics) over the data, one accumulator per instance:
    each instance is reduced on its own, so its numbers do not depend on how many instances share the run."""
    accs = {m: [MetricAccumulator(m, 1, classes) for _ in range(instances)] for m in (metric, *extra)}
    for i, (start, out) in enumerate(run_outputs(executor, x, instances, batch_size, tick, per_instance)):
        yb = None if y is None else y[start : start + out.shape[1]]
        ref = None if reference is None else reference[i]
        for instance_accs in accs.values():
            for k, acc in enumerate(instance_accs):
                acc.add(out[k : k + 1], yb, ref)
    return accs


def _values(accs: list[MetricAccumulator]) -> list[float]:
    """One metric value per instance (raw: an SNR without error is +inf)."""
    return [float(v) for acc in accs for v in acc.values()]


def _class_rows(accs: list[MetricAccumulator]) -> list[list[float]] | None:
    """Per instance, the correct predictions per class (None for metrics without classes)."""
    counts = [acc.class_counts() for acc in accs]
    if any(c is None for c in counts):
        return None
    return [[float(v) for v in c[0][0]] for c in counts]  # type: ignore[index]


@dataclass
class ShardResult:
    """What a run over chip instances ``instance_range`` = [a, b) computed, kept per instance so that shards
    merge exactly: metric values ``values[mode][time][k]`` (mode "gdc" and/or "none"), the relative error
    ``relerr[mode][time][k]`` of label-free runs, correct predictions per class
    ``class_correct[mode][time][k][c]`` (accuracy metrics), per-layer input activity ``activity[layer][k]`` =
    (density, mean magnitude, peak), and the instance-free baselines (float and quantised model)."""

    instance_range: tuple[int, int]
    population: int  # instances in the whole run
    seed: int
    times_s: list[float]
    gdc_mode: str
    modes: list[str]
    metric: str
    values: dict[str, list[list[float]]]
    relerr: dict[str, list[list[float]]]
    class_correct: dict[str, list[list[list[float]]]]
    class_total: list[float] | None
    activity: dict[str, list[list[float]]]
    baselines: dict[str, Any]
    samples: int
    wall_time_s: float


@dataclass
class SimulationResult:
    """The metric per time (mean, std, min, per instance), baselines, and the cost the run counted."""

    data: dict[str, Any]
    # Wall-clock figures live apart from ``data`` so the same inputs and seed give the same results.json bytes.
    timings: dict[str, Any] = field(default_factory=dict)
    # The per-instance numbers :func:`merge_results` combines (not written to results.json).
    shard: ShardResult | None = None

    def table(self) -> str:
        d = self.data
        metric = d.get("metric", "accuracy")
        pct = is_percent(metric)
        scale = 100.0 if pct else 1.0
        fmt = (lambda v: f"{scale * v:.2f}") if pct or metric == "snr" else (lambda v: f"{v:.4g}")
        base = d.get("float_score")
        rows = []
        for series in d["series"]:
            for p in series["points"]:
                vs = "" if base is None or p["mean"] is None else f"{scale * (p['mean'] - base):+.2f}" if pct else ""
                rows.append([series["label"], p["label"], *(fmt(p[k]) if p[k] is not None else "inf"
                                                           for k in ("mean", "std", "min")), vs])
                if "yield" in p:
                    rows[-1].append(f"{100 * p['yield']:.0f} %")
        unit = " %" if pct else (" dB" if metric == "snr" else "")
        columns = ["drift compensation", "time", f"{metric} mean{unit}", "std", "min", "vs float"]
        if d.get("yield_target") is not None:
            columns.append(f"yield ({'>=' if d.get('higher_is_better', True) else '<='} "
                           f"{format_score(metric, d['yield_target'])})")
        head = format_table(columns, rows, right=tuple(range(2, len(columns))))
        c = d["cost"]
        if pct:
            baseline = (f"float model: {format_score(metric, d['float_score'])}   quantised, ideal devices: "
                        f"{format_score(metric, d['quantized_score'])}")
        else:
            baseline = (f"{metric} against the float model's outputs; quantised, ideal devices: "
                        f"{format_score(metric, d['quantized_score'])}")
        return (
            f"{head}\n\n{baseline}   ({d['samples']} samples, {d['instances']} instances, seed {d['seed']}, "
            f"target {d['target']})\n"
            f"cost counted on this data, per inference: {_cost_line(c['measured'])}\n"
            f"compile's static estimate: {_cost_line(c['static'])}"
            + (f"\nwhy they differ: {c['why_measured_differs']}" if c.get("why_measured_differs") else "")
        )

    def to_pandas(self) -> Any:
        """One row per (series, time): the metric's mean, std, min, max (needs pandas)."""
        pd = _pandas()
        rows = [{"series": s["label"], "time": p["label"], "t_s": p["t_s"], "metric": self.data.get("metric"),
                 **{k: p[k] for k in ("mean", "std", "min", "max")}}
                for s in self.data["series"] for p in s["points"]]
        return pd.DataFrame(rows)


def simulate(
    compiled: Any,
    x: np.ndarray,
    y: np.ndarray | None,
    times_s: Sequence[float] = (1.0, 3600.0, 86400.0, 30 * 86400.0, _UNITS["y"]),
    instances: int = 25,
    seed: int = 0,
    batch_size: int = 64,
    compare_gdc: bool = True,
    progress: bool = False,
    metric: str | Any | None = None,
    instance_range: tuple[int, int] | None = None,
    yield_target: float | str | None = None,
) -> SimulationResult:
    """Monte Carlo ``metric`` of ``compiled`` on (x, y) at each time after programming.

    ``metric`` (see :mod:`cimc.runtime.metrics`): accuracy by default when ``y`` holds labels, otherwise
    cosine agreement with the float model's outputs; label-free runs also report the relative error.

    ``instances`` chips make the population; ``instance_range=(a, b)`` computes only chips a..b-1 of it (a
    shard; combine shards with :func:`merge_results`). Each instance runs every batch of ``batch_size``
    samples on its own, so a shard runs the same batches as the whole run.
    """
    shard = simulate_shard(compiled, x, y, times_s, instances, seed, batch_size, compare_gdc, progress,
                           instance_range, metric=metric)
    return merge_results(compiled, [shard], yield_target=yield_target)


def check_simulation_inputs(compiled: Any, x: np.ndarray, y: np.ndarray | None, times_s: Sequence[float],
                            instances: int, instance_range: tuple[int, int] | None = None,
                            metric: str | None = None) -> tuple[int, int, str]:
    """Raise the user's error before any work starts; returns the instance range [first, stop) and the metric."""
    metric = metric_name(metric) or default_metric(y, output_size(compiled.model))
    check_metric(metric, y)
    expected = tuple(compiled.model.graph.inputs[0].shape)[1:]
    if tuple(x.shape[1:]) != expected:
        raise DataError(f"data inputs have shape {tuple(x.shape[1:])} per sample but the model takes {expected}"
                        f"{reshape_hint(tuple(x.shape[1:]), expected)}")
    for t in times_s:
        check_time(t)
    if isinstance(instances, bool) or int(instances) != instances or instances < 1:
        raise InputError(f"--instances must be at least 1 (got {instances})")
    first, stop = instance_range if instance_range is not None else (0, instances)
    if not 0 <= first < stop <= instances:
        raise InputError(f"instance range {first}..{stop - 1} is not inside 0..{instances - 1}; "
                         f"give 0 <= a < b <= instances")
    samples_per_pass(compiled.model, 1, 1)  # instances run one after another: one sample must fit the budget
    return int(first), int(stop), metric


def simulate_shard(
    compiled: Any,
    x: np.ndarray,
    y: np.ndarray | None,
    times_s: Sequence[float],
    instances: int,
    seed: int = 0,
    batch_size: int = 64,
    compare_gdc: bool = True,
    progress: bool = False,
    instance_range: tuple[int, int] | None = None,
    metric: str | None = None,
) -> ShardResult:
    """Chips ``instance_range`` (default: all ``instances``) of the population: per-instance numbers."""
    first, stop, metric = check_simulation_inputs(compiled, x, y, times_s, instances, instance_range, metric)
    # Samples per pass; every instance runs the same batches on its own (so a shard runs the whole run's).
    per_run = samples_per_pass(compiled.model, 1, batch_size)
    started = time.perf_counter()
    count = stop - first
    chip = Chip(compiled, count, seed, first)
    gdc_modes = [True, False] if compare_gdc and chip.gdc_mode != "none" else [chip.gdc_mode != "none"]
    total = len(x) * (2 + len(times_s) * len(gdc_modes))
    bar = _progress(total, progress)
    tick = bar.update if bar is not None else None
    executor = chip.executor
    # The float run first: its outputs are the reference of the agreement metrics and fix the class count.
    reference = [out[0] for _, out in run_outputs(executor, x, 1, per_run, tick)]
    classes = int(reference[0].reshape(reference[0].shape[0], -1).shape[1]) if reference else 0
    y = get_metric(metric).check_labels(y, classes)
    extra = ("relerr",) if not needs_labels(metric) and metric != "relerr" else ()

    def evaluate(n: int, progress_tick: Callable[[int], None] | None = tick,
                 per_instance: Sequence[Selector] | None = None) -> dict[str, list[MetricAccumulator]]:
        return _evaluate(executor, x, n, per_run, metric, y, reference, classes, progress_tick, extra, per_instance)

    use(chip, None)
    float_acc = evaluate(1, None)
    use(chip, ideal_hook(chip))
    quant_acc = evaluate(1)
    activity: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(count)]  # per instance: layer → passes
    values: dict[bool, list[list[float]]] = {gdc: [] for gdc in gdc_modes}
    relerr: dict[bool, list[list[float]]] = {gdc: [] for gdc in gdc_modes}
    class_correct: dict[bool, list[list[list[float]]]] = {gdc: [] for gdc in gdc_modes}
    for t in times_s:
        # One read of the devices per time serves both modes: compensation only adds the digital rescale.
        compensated = chip.at(t, gdc=gdc_modes[0])
        for gdc in gdc_modes:
            state = compensated if gdc == gdc_modes[0] else ChipState(
                t, count, compensated.weights, noise_generator=compensated.noise_generator)
            accs = evaluate(count, per_instance=instance_selectors(
                chip, state, activity if (gdc == gdc_modes[0] and t == times_s[0]) else None))
            values[gdc].append(_values(accs[metric]))
            rows = _class_rows(accs[metric])
            if rows is not None:
                class_correct[gdc].append(rows)
            if extra:
                relerr[gdc].append(_values(accs["relerr"]))
    use(chip, None)
    if bar:
        bar.close()
    float_score = _finite(float(float_acc[metric][0].values()[0]))
    quant_score = _finite(float(quant_acc[metric][0].values()[0]))
    counts = float_acc[metric][0].class_counts()
    baselines: dict[str, Any] = {
        "float_score": float_score, "quantized_score": quant_score,
        "per_class": None if counts is None else {"float": float_acc[metric][0].per_class(),
                                                  "quantized": quant_acc[metric][0].per_class()},
        "quantized_relerr": float(quant_acc["relerr"][0].values()[0]) if extra else None,
    }
    def name(gdc: bool) -> str:
        return "gdc" if gdc else "none"

    return ShardResult(
        instance_range=(first, stop), population=instances, seed=seed, times_s=[float(t) for t in times_s],
        gdc_mode=chip.gdc_mode, modes=[name(g) for g in gdc_modes], metric=metric,
        values={name(g): v for g, v in values.items()},
        relerr={name(g): v for g, v in relerr.items()} if extra else {},
        class_correct={name(g): v for g, v in class_correct.items()} if counts is not None else {},
        class_total=None if counts is None else [float(v) for v in counts[1]],
        # per instance: the mean over forward passes, each instance reduced on its own (shape-independent)
        activity={layer: [[float(v) for v in np.stack([b[0].numpy() for b in activity[k][layer]]).mean(axis=0)]
                          for k in range(count)] for layer in activity[0]},
        baselines=baselines, samples=len(x), wall_time_s=time.perf_counter() - started,
    )


def merge_results(compiled: Any, shards: Sequence[ShardResult | SimulationResult],
                  yield_target: float | str | None = None) -> SimulationResult:
    """One result from shards of the same run (any order): per-instance numbers concatenated in instance
    order, then reduced (mean, std, min, max, per class); the same bytes as computing every instance in one
    process. With ``yield_target`` (in the metric's units; "90%" for shares) each point also carries the chip
    yield: the share of instances that meet it."""
    parts = sorted((s.shard if isinstance(s, SimulationResult) else s for s in shards),  # type: ignore[misc]
                   key=lambda r: r.instance_range[0])
    if not parts or any(p is None for p in parts):
        raise InputError("merge_results needs the shard results of simulate(..., instance_range=...)")
    head = parts[0]
    for prev, nxt in zip(parts, parts[1:]):
        if nxt.instance_range[0] != prev.instance_range[1]:
            raise InputError(f"shards do not cover the instances contiguously: {prev.instance_range} then "
                             f"{nxt.instance_range}")
        if (nxt.seed, nxt.times_s, nxt.modes, nxt.samples, nxt.population, nxt.metric) != (
                head.seed, head.times_s, head.modes, head.samples, head.population, head.metric):
            raise InputError("shards come from different runs (seed, times, samples, metric or instances differ)")
    first, stop = head.instance_range[0], parts[-1].instance_range[1]
    n_times = len(head.times_s)

    def joined(field_name: str) -> dict[str, list[list[Any]]]:
        return {m: [sum((getattr(p, field_name)[m][i] for p in parts), []) for i in range(n_times)]
                for m in getattr(head, field_name)}

    merged = ShardResult(
        instance_range=(first, stop), population=head.population, seed=head.seed, times_s=head.times_s,
        gdc_mode=head.gdc_mode, modes=head.modes, metric=head.metric, values=joined("values"),
        relerr=joined("relerr"), class_correct=joined("class_correct"), class_total=head.class_total,
        activity={name: sum((p.activity[name] for p in parts), []) for name in head.activity},
        baselines=head.baselines, samples=head.samples, wall_time_s=max(p.wall_time_s for p in parts),
    )
    metric = merged.metric
    target_value = check_yield_target(metric, yield_target)
    series = []
    for mode in merged.modes:
        points = []
        for i, (t, per_instance) in enumerate(zip(merged.times_s, merged.values[mode])):
            acc = np.asarray(per_instance, dtype=np.float64)
            point = {"label": format_duration(t), "t_s": t, "mean": _finite(acc.mean()), "std": _finite(acc.std()),
                     "min": _finite(acc.min()), "max": _finite(acc.max()), "per_instance": [_finite(a) for a in acc]}
            if target_value is not None:
                point["yield"] = chip_yield(acc, target_value, higher_is_better(metric))
            if merged.class_correct and merged.class_total is not None:
                point["per_class"] = per_class_accuracy(np.asarray(merged.class_correct[mode][i], dtype=np.float64),
                                                        np.asarray(merged.class_total, dtype=np.float64))
            if merged.relerr:
                point["relerr"] = float(np.asarray(merged.relerr[mode][i], dtype=np.float64).mean())
            points.append(point)
        series.append({"label": f"GDC ({merged.gdc_mode})" if mode == "gdc" else "no compensation",
                       "gdc": merged.gdc_mode if mode == "gdc" else "none", "points": points})
    measured = {name: LayerActivity(*[float(v) for v in np.asarray(rows, dtype=np.float64).mean(axis=0)])
                for name, rows in merged.activity.items()}
    workload = model_workload(compiled.model)
    counted = estimate_cost(compiled.target, workload, activity=measured)
    why = explain_measured(compiled.target, compiled.cost, counted, measured)
    b = merged.baselines
    data: dict[str, Any] = {
        "format": "cimc-simulation/1",
        "model": compiled.source,
        "target": compiled.target.name,
        "instances": stop - first,
        "seed": merged.seed,
        "samples": merged.samples,
        "metric": metric,
        "higher_is_better": higher_is_better(metric),
        "float_score": b["float_score"] if needs_labels(metric) else None,
        "quantized_score": b["quantized_score"],
        "percent": is_percent(metric),
    }
    if target_value is not None:
        data["yield_target"] = target_value
    if (first, stop) != (0, merged.population):
        data["instance_range"] = [first, stop]
    if metric == "accuracy":  # the names every earlier results.json used
        data["float_accuracy"], data["quantized_accuracy"] = b["float_score"], b["quantized_score"]
    if b["per_class"] is not None:
        data["per_class"] = b["per_class"]
    if b["quantized_relerr"] is not None:
        data["quantized_relerr"] = b["quantized_relerr"]
    data.update({
        "dac_bits": compiled.target.converters.dac_bits,
        "adc_bits": compiled.target.converters.adc_bits,
        "series": series,
        "cost": {"static": _cost_summary(compiled.cost), "measured": _cost_summary(counted),
                 "activity": {k: vars(v) for k, v in measured.items()},
                 "why_measured_differs": why,
                 "ops_definition": "2 x MACs executed in the analog arrays",
                 "system_ops_definition": SYSTEM_OPS_DEFINITION},
    })
    timings = {"format": "cimc-timings/1", "wall_time_s": merged.wall_time_s}
    return SimulationResult(data, timings, merged)


def _cost_summary(cost: Any) -> dict[str, Any]:
    return {"energy_per_inference_j": cost.total_energy_j, "latency_s": cost.latency_s,
            "system_tops_per_w": cost.system_tops_per_w, "tops_per_w": cost.tops_per_w,
            "cycles": cost.cycles, "inferences_per_s": cost.inferences_per_s, "energy_breakdown_j": cost.energy_j}


def _cost_line(c: dict[str, Any]) -> str:
    """Energy per inference and latency first, then the system and the analog efficiency."""
    system = c.get("system_tops_per_w")
    head = (f"{c['energy_per_inference_j'] * 1e6:.3g} uJ, {c['latency_s'] * 1e3:.3g} ms"
            + (f", system {system:.3g} TOPS/W" if system is not None else ""))
    return f"{head}, analog {c['tops_per_w']:.3g} TOPS/W"


def _progress(total: int, enabled: bool, desc: str = "simulating") -> Any:
    if not enabled:
        return None
    return progress_bar(total=total, unit="inf", desc=desc)
