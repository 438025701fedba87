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
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cimc.errors import DataError, InputError, ModelError
from cimc.runtime.analog import analog_conv, analog_mvm, conv_weights, dac, layer_plans, probe_response
from cimc.runtime.cost import LayerActivity, estimate_cost
from cimc.runtime.devices import build_device, gdc_factor
from cimc.runtime.executor import AnalogStep, Executor
from cimc.runtime.metrics import (LABEL_METRICS, MetricAccumulator, check_labels, check_metric, default_metric,
                                  format_score, higher_is_better, is_percent)
from cimc.runtime.workload import model_workload
from cimc.vocabulary import _UNITS, DURATION_HELP, check_time, format_duration, parse_duration  # re-exported

__all__ = ["DURATION_HELP", "Chip", "ChipState", "SimulationResult", "check_batch_axis", "check_time",
           "format_duration", "ideal_hook", "parse_duration", "run_outputs", "simulate", "use"]

logger = logging.getLogger(__name__)



@dataclass
class ChipState:
    """Conductances of every instance read at ``t_s``, as effective weights, plus the GDC factors."""

    t_s: float
    instances: int
    weights: dict[str, torch.Tensor]  # crossbar block (layer) → [I, G, K, N]
    gdc: dict[str, torch.Tensor] = field(default_factory=dict)  # use (node) → [I, 1, 1|G, 1|N]
    # Output (ADC input) noise is drawn per conversion, so per forward pass: its own stream per read time.
    noise_generator: torch.Generator | None = None


class Chip:
    """``instances`` programmed copies of a compiled model's crossbar blocks.

    A block is programmed once however many nodes use it (a shared weight): every use reads the same devices,
    so the same programming noise and drift. Drift compensation is per use (its probe goes through the use's
    DAC), applied to that use's outputs.
    """

    def __init__(self, compiled: Any, instances: int, seed: int = 0):
        if instances < 1:
            raise InputError(f"--instances must be at least 1 (got {instances})")
        self.compiled = compiled
        self.instances = instances
        self.seed = seed
        self.executor = Executor(compiled.model).eval()
        self.plans = layer_plans(compiled.model)
        self.steps = {s.name: s for s in self.executor.analog_steps}
        missing = [name for name in self.steps if name not in self.plans]
        if missing:
            raise InputError(f"analog layers {missing} have no placement; compile the model with 'cimc compile'")
        device = compiled.target.device
        self.device = build_device(device)
        self.gdc_mode = getattr(device, "gdc", "none")
        self.layer = {name: (self.plans[name].layer or name) for name in self.steps}  # use → block
        with torch.no_grad():
            self.ideal: dict[str, torch.Tensor] = {}  # block → [G, K, N], from its first use
            for name, s in self.steps.items():
                if self.layer[name] not in self.ideal:
                    self.ideal[self.layer[name]] = s.matrix(self.executor.weight(s)).detach().float()
        gen = torch.Generator().manual_seed(seed)
        # Per-layer weight scale (max|W| of the whole layer -> g_max) spans all groups: program [1, G*K, N].
        # Per-column scales are per output column of each group: program [G, K, N] as it is.
        self.per_column = getattr(device, "weight_scale", "layer") == "column"
        to_program = self.ideal if self.per_column else {n: w.reshape(1, -1, w.shape[-1]) for n, w in self.ideal.items()}
        self.programmed = self.device.program_layers(to_program, instances, gen, per_column=self.per_column)
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

    def _probe_outputs(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each use's response to its fixed GDC probe (DAC-quantised, ADC not applied: a long average), read
        from its block's devices."""
        return {name: probe_response(self.plans[name], weights[layer]) for name, layer in self.layer.items()}

    def _read(self, t_s: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Effective weights [I, G, K, N] of every layer, read ``t_s`` after programming."""
        read = self.programmed.read(t_s, gen)
        return {k: v.float().reshape(self.instances, *self.ideal[k].shape) for k, v in read.items()}

    def at(self, t_s: float, gdc: bool = True) -> ChipState:
        """Read every instance's devices ``t_s`` seconds after programming (drift, then read noise)."""
        index = int(round(math.log10(max(t_s, 1e-9)) * 1000))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 + index)
        weights = self._read(t_s, gen)
        noise_gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 104_729 + index) if self.out_noise else None
        state = ChipState(t_s, self.instances, weights, noise_generator=noise_gen)
        if gdc and self.gdc_mode != "none":
            if self._reference is None:  # the read right after programming (t = 0), same devices
                ref_gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 17)
                ref_w = self._read(0.0, ref_gen)
                self._reference = self._probe_outputs(ref_w)
            now = self._probe_outputs(weights)
            per_column = self.gdc_mode == "column"
            for name in now:
                ref, cur = self._reference[name], now[name]  # [I, P, G, N]
                state.gdc[name] = gdc_factor(ref, cur, per_column=per_column)
        return state

    def hook(self, state: ChipState) -> Callable[..., torch.Tensor]:
        """The executor's analog hook for this chip state (inputs already through the DAC: :meth:`dac_hook`)."""
        instances = state.instances

        def run(step: AnalogStep, cols: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
            b, m, g, k = cols.shape
            c = cols.reshape(instances, (b // instances) * m, g, k)
            y = analog_mvm(self.plans[step.name], c, state.weights[self.layer[step.name]],
                           out_noise=self.out_noise.get(step.name), generator=state.noise_generator)
            if step.name in state.gdc:  # digital rescale after the ADC: [I, 1, 1, 1|N] broadcasts over mvms, groups
                y = y * state.gdc[step.name]
            return y.reshape(b, m, g, -1)

        return run

    def conv_hook(self, state: ChipState) -> Callable[..., torch.Tensor | None]:
        """Fast path for convolutions whose groups each sit in one tile: one grouped convolution over all
        instances (instance i's weights are group i), then the ADC per output channel and GDC. Same
        arithmetic as the unrolled path, without materialising the MVM operands."""
        instances = state.instances
        cache: dict[str, torch.Tensor] = {}

        def run(step: AnalogStep, x: torch.Tensor) -> torch.Tensor | None:
            plan = self.plans[step.name]
            if step.op_type != "Conv" or not plan.whole_groups:
                return None
            layer = self.layer[step.name]
            if layer not in cache:  # one kernel per block: uses of a shared weight read the same devices
                cache[layer] = conv_weights(state.weights[layer], self.executor.weight(step).shape[1:])
            return analog_conv(plan, x, cache[layer], instances, plan.groups, step.attrs, state.gdc.get(step.name),
                               out_noise=self.out_noise.get(step.name), generator=state.noise_generator)

        return run

    def dac_hook(self, activity: dict[str, list[torch.Tensor]] | None = None) -> Callable[..., torch.Tensor]:
        """The executor's input hook: each analog layer's DAC, optionally recording input activity."""

        def run(step: AnalogStep, x: torch.Tensor) -> torch.Tensor:
            plan = self.plans[step.name]
            xq = dac(plan, x)
            if activity is not None:
                x_max = plan.quant.x_max if plan.quant is not None else float(xq.abs().max().clamp_min(1e-12))
                a = (xq.abs() / x_max).reshape(xq.shape[0], -1)
                activity.setdefault(step.name, []).append(
                    torch.stack([(a > 0).float().mean(), a.mean(), a.amax(dim=-1).mean()])
                )
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


def _finite(v: float) -> float | None:
    """JSON has no infinity: an SNR with no error at all is written as null."""
    return float(v) if math.isfinite(v) else None


def run_outputs(executor: Executor, x: np.ndarray, instances: int, batch_size: int,
                tick: Callable[[int], None] | None = None) -> Any:
    """Yield ``(start, outputs [instances, batch, ...])`` of the first model output, batch by batch."""
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))
            rep = xb.repeat(instances, *([1] * (xb.dim() - 1)))
            out = executor(rep)[0]
            check_batch_axis(out, instances * len(xb), "the first output")
            yield start, out.reshape(instances, len(xb), *out.shape[1:])
            if tick:
                tick(len(xb))


def _evaluate(executor: Executor, x: np.ndarray, instances: int, batch_size: int, metric: str,
              y: np.ndarray | None, reference: list[torch.Tensor] | None, classes: int,
              tick: Callable[[int], None] | None = None, extra: Sequence[str] = ()) -> dict[str, MetricAccumulator]:
    """Accumulate ``metric`` (and ``extra`` agreement metrics) over the data for every instance."""
    accs = {m: MetricAccumulator(m, instances, classes) for m in (metric, *extra)}
    for i, (start, out) in enumerate(run_outputs(executor, x, instances, batch_size, tick)):
        yb = None if y is None else y[start : start + out.shape[1]]
        ref = None if reference is None else reference[i]
        for acc in accs.values():
            acc.add(out, yb, ref)
    return accs


def check_batch_axis(y: torch.Tensor, rows: int, name: str) -> None:
    """The output must keep one row per sample (and instance) on its first axis, as every input does."""
    if y.dim() == 0 or y.shape[0] != rows:
        raise ModelError(
            f"output {name!r} has shape {tuple(y.shape)} for {rows} sample(s) x instance(s): the model does not keep "
            "samples on the first axis (a Reshape/Flatten/Transpose mixes them), so cimc cannot batch it; re-export "
            "it with the batch as the first axis throughout (e.g. Flatten axis=1, Reshape to [-1, ...])"
        )


@dataclass
class SimulationResult:
    """The metric per time (mean, std, min, per instance), baselines, and the cost the run counted."""

    data: dict[str, Any]
    # Wall-clock figures live apart from ``data`` so the same inputs and seed give the same results.json bytes.
    timings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        from cimc.report import format_table

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
        unit = " %" if pct else (" dB" if metric == "snr" else "")
        head = format_table(["drift compensation", "time", f"{metric} mean{unit}", "std", "min", "vs float"], rows,
                            right=(2, 3, 4, 5))
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
            f"cost counted on this data: {c['measured']['tops_per_w']:.3g} TOPS/W, "
            f"{c['measured']['energy_per_inference_j'] * 1e6:.3g} uJ, {c['measured']['latency_s'] * 1e3:.3g} ms per inference "
            f"(compile's static estimate: {c['static']['tops_per_w']:.3g} TOPS/W, "
            f"{c['static']['energy_per_inference_j'] * 1e6:.3g} uJ, {c['static']['latency_s'] * 1e3:.3g} ms)"
        )

    def to_pandas(self) -> Any:
        """One row per (series, time): the metric's mean, std, min, max (needs pandas)."""
        pd = _pandas()
        rows = [{"series": s["label"], "time": p["label"], "t_s": p["t_s"], "metric": self.data.get("metric"),
                 **{k: p[k] for k in ("mean", "std", "min", "max")}}
                for s in self.data["series"] for p in s["points"]]
        return pd.DataFrame(rows)

    def plot(self, path: Any = None) -> Any:
        """The drift figure (a matplotlib Figure; also saved to ``path`` if given)."""
        from cimc.plots import plot_drift

        return plot_drift(self.data, path)


def _pandas() -> Any:
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError("to_pandas() needs pandas: pip install pandas") from exc
    return pd


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
    metric: str | None = None,
) -> SimulationResult:
    """Monte Carlo ``metric`` of ``compiled`` on (x, y) at each time after programming.

    ``metric`` (see :mod:`cimc.runtime.metrics`): accuracy by default when ``y`` holds labels, otherwise
    cosine agreement with the float model's outputs; label-free runs also report the relative error.
    """
    metric = metric or default_metric(y)
    check_metric(metric, y)
    expected = tuple(compiled.model.graph.inputs[0].shape)[1:]
    if tuple(x.shape[1:]) != expected:
        raise DataError(f"data inputs have shape {tuple(x.shape[1:])} per sample but the model takes {expected}")
    for t in times_s:
        check_time(t)
    from cimc.validate import samples_per_pass

    samples_per_pass(compiled.model, instances, 1)  # one sample on every instance must fit the memory budget
    batch_size = samples_per_pass(compiled.model, 1, batch_size)  # rows (samples x instances) per pass
    started = time.perf_counter()
    chip = Chip(compiled, instances, seed)
    per_run = max(1, batch_size // instances) if instances > 1 else batch_size
    gdc_modes = [True, False] if compare_gdc and chip.gdc_mode != "none" else [chip.gdc_mode != "none"]
    total = len(x) * (2 + len(times_s) * len(gdc_modes))
    bar = _progress(total, progress)
    tick = bar.update if bar is not None else None
    executor = chip.executor
    # The float run first: its outputs are the reference of the agreement metrics and fix the class count.
    reference = [out[0] for _, out in run_outputs(executor, x, 1, per_run, tick)]
    classes = int(reference[0].reshape(reference[0].shape[0], -1).shape[1]) if reference else 0
    if metric in LABEL_METRICS:
        y = check_labels(y, classes)
    extra = ("relerr",) if metric not in LABEL_METRICS and metric != "relerr" else ()

    def evaluate(n: int) -> dict[str, MetricAccumulator]:
        return _evaluate(executor, x, n, per_run if n > 1 else per_run, metric, y, reference, classes, tick, extra)

    use(chip, None)
    float_acc = _evaluate(executor, x, 1, per_run, metric, y, reference, classes, None, extra)
    use(chip, ideal_hook(chip))
    quant_acc = evaluate(1)
    activity: dict[str, list[torch.Tensor]] = {}
    points: dict[bool, list[dict[str, Any]]] = {gdc: [] for gdc in gdc_modes}
    for t in times_s:
        # One read of the devices per time serves both modes: compensation only adds the digital rescale.
        compensated = chip.at(t, gdc=gdc_modes[0])
        for gdc in gdc_modes:
            state = compensated if gdc == gdc_modes[0] else ChipState(
                t, instances, compensated.weights, noise_generator=compensated.noise_generator)
            use(chip, chip.hook(state), activity if (gdc == gdc_modes[0] and t == times_s[0]) else None, state)
            accs = evaluate(instances)
            acc = accs[metric].values()
            point = {"label": format_duration(t), "t_s": t, "mean": _finite(acc.mean()), "std": _finite(acc.std()),
                     "min": _finite(acc.min()), "max": _finite(acc.max()), "per_instance": [_finite(a) for a in acc]}
            if accs[metric].per_class() is not None:
                point["per_class"] = accs[metric].per_class()
            if extra:
                point["relerr"] = float(accs["relerr"].values().mean())
            points[gdc].append(point)
    series = [
        {"label": f"GDC ({chip.gdc_mode})" if gdc else "no compensation", "gdc": chip.gdc_mode if gdc else "none",
         "points": points[gdc]}
        for gdc in gdc_modes
    ]
    use(chip, None)
    if bar:
        bar.close()
    measured = {name: LayerActivity(*[float(v) for v in torch.stack(vals).mean(0)]) for name, vals in activity.items()}
    workload = model_workload(compiled.model)
    counted = estimate_cost(compiled.target, workload, activity=measured)
    float_score = _finite(float(float_acc[metric].values()[0]))
    quant_score = _finite(float(quant_acc[metric].values()[0]))
    data: dict[str, Any] = {
        "format": "cimc-simulation/1",
        "model": compiled.source,
        "target": compiled.target.name,
        "instances": instances,
        "seed": seed,
        "samples": len(x),
        "metric": metric,
        "higher_is_better": higher_is_better(metric),
        "float_score": float_score if metric in LABEL_METRICS else None,
        "quantized_score": quant_score,
    }
    if metric == "accuracy":  # the names every earlier results.json used
        data["float_accuracy"], data["quantized_accuracy"] = float_score, quant_score
    if float_acc[metric].per_class() is not None:
        data["per_class"] = {"float": float_acc[metric].per_class(), "quantized": quant_acc[metric].per_class()}
    if extra:
        data["quantized_relerr"] = float(quant_acc["relerr"].values()[0])
    data.update({
        "dac_bits": compiled.target.converters.dac_bits,
        "adc_bits": compiled.target.converters.adc_bits,
        "series": series,
        "cost": {"static": _cost_summary(compiled.cost), "measured": _cost_summary(counted),
                 "activity": {k: vars(v) for k, v in measured.items()},
                 "ops_definition": "2 x MACs executed in the analog arrays"},
    })
    return SimulationResult(data, {"format": "cimc-timings/1", "wall_time_s": time.perf_counter() - started})


def _cost_summary(cost: Any) -> dict[str, Any]:
    return {"tops_per_w": cost.tops_per_w, "energy_per_inference_j": cost.total_energy_j, "latency_s": cost.latency_s,
            "cycles": cost.cycles, "inferences_per_s": cost.inferences_per_s, "energy_breakdown_j": cost.energy_j}


def _progress(total: int, enabled: bool, desc: str = "simulating") -> Any:
    if not enabled:
        return None
    from cimc.report import progress_bar

    return progress_bar(total=total, unit="inf", desc=desc)
