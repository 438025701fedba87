"""``cimc diagnose``: which layer, which converter, which non-ideality costs the accuracy.

It runs the simulator's own chip (:class:`cimc.runtime.simulator.Chip`, the analog path of
:mod:`cimc.runtime.analog`) with one non-ideality switched on at a time; there is no second noise model.

Per analog layer, signal-to-noise ratio (dB) of the crossbar's output (before the digital bias) against the
ideal float layer, on the same input: every layer is fed the float model's activations, so a layer's number
is its own error and not what earlier layers passed on. Causes:

=============  ============================================================================================
``dac``        DAC quantisation alone (ideal weights, no ADC)
``adc``        ADC quantisation alone (ideal weights, float inputs); with the clipping rate (share of
               conversions at full scale, DAC on as on the chip) and the share of ADC levels used
``programming``programming noise alone (no drift, no read noise, no converters)
``drift``      drift to ``time``, after the target's drift compensation (no other noise)
``read``       1/f read noise at ``time`` (no other noise)
``all``        everything together: the chip at ``time``
=============  ============================================================================================

The device causes are the target's own device model with the other noise sources' scale set to zero
(``prog_noise_scale``, ``drift_scale``, ``read_noise_scale``). SNR = 10·log10(Σ y_float² / Σ (y − y_float)²)
over every sample, output position and instance.

Per layer also the end metric with only that layer analog (the chip at ``time``, every other layer float),
the metric of the whole chip and of the float model; layers are ranked by how much their own analog
execution costs. One-line advice follows where the numbers show the cause.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time as _time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cimc.artifact import load_compiled
from cimc.errors import DataError, InputError
from cimc.report import json_ready as _json_ready
from cimc.vocabulary import CAUSE_LABELS as _CAUSE_LABELS
from cimc.vocabulary import CAUSES, LOW_SNR_DB, parse_times

__all__ = ["CAUSES", "DiagnoseResult", "diagnose"]

logger = logging.getLogger(__name__)

# Device noise sources as target fields: a cause keeps its own scale and zeroes the others.
_DEVICE_SCALES = {"programming": "prog_noise_scale", "drift": "drift_scale", "read": "read_noise_scale"}
# Advice thresholds (explained in docs/diagnose.md).
CLIP_WARN = 0.01  # more than 1 % of conversions at full scale: the ADC range is too small
LEVELS_WARN = 0.10  # fewer than 10 % of the ADC's levels used: the range is too large
LOW_K_ROWS = 32  # a depthwise layer with this few rows sums too few products to average noise out
SNR_GOOD_DB = 40.0  # the reference of the snr metric's costs (the float model's own SNR is infinite)


@dataclass
class _Stats:
    """Per-layer sums over a run: signal and error energy; ADC conversions, clipped ones, codes used."""

    signal: float = 0.0
    error: float = 0.0
    conversions: int = 0
    clipped: int = 0
    codes: torch.Tensor | None = None

    @property
    def snr_db(self) -> float:
        if self.error <= 0:
            return math.inf
        if self.signal <= 0:
            return -math.inf
        return 10 * math.log10(self.signal / self.error)


@dataclass
class DiagnoseResult:
    """Per-layer SNR by cause, ADC use, the single-layer end metric, ranking and advice (``data``)."""

    data: dict[str, Any]
    # The tried variants with their compiled models and measurements (not in ``data``): harden reuses them.
    trials: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def table(self) -> str:
        from cimc.report import format_table
        from cimc.runtime.metrics import format_score

        d = self.data
        metric = d["metric"]

        def db(v: float | None) -> str:
            return "inf" if v is None else f"{v:.1f}"

        rows = []
        for layer in d["layers"]:
            s = layer["snr_db"]
            adc = layer["adc"]
            rows.append([layer["rank"], layer["name"], layer["op_type"], layer["shape"],
                         *(db(s[c]) for c in (*CAUSES, "all")),
                         "-" if adc["clip_rate"] is None else f"{100 * adc['clip_rate']:.2f}",
                         "-" if adc["levels_used"] is None else f"{100 * adc['levels_used']:.0f}",
                         format_score(metric, layer["metric_only_this_layer"]),
                         layer["cost_text"]])
        head = format_table(["rank", "layer", "op", "K x N (x groups)", "dac", "adc", "out", "prog", "drift", "read",
                             "all", "adc clip %", "levels %", f"{metric}, only it analog", "vs float"], rows,
                            right=tuple(range(4, 15)))
        lines = [
            f"SNR (dB) of each analog layer's output against the float layer, one cause at a time, at {d['time']} "
            f"({d['instances']} instances, {d['samples']} samples, target {d['target']})",
            head,
            "",
            f"{metric}: float model {format_score(metric, d['float_metric'])}, whole chip at {d['time']} "
            f"{format_score(metric, d['chip_metric'])}; most to blame: {d['blame']}",
        ]
        tried = d.get("tried") or []
        if tried:
            w = d["tried_with"]
            before = tried[0]["before"]["value"]
            lines.append(f"advice tried on the simulator ({w['instances']} chips at {w['time']}, seed {w['seed']}; "
                         f"{metric} before: {format_score(metric, before)}), ranked by the gain it gave:")
            for i, t in enumerate(tried, 1):
                lines.append("  " + _tried_line(i, t, metric))
        lines += [f"advice: {a['text']}" for a in d["advice"]]
        if not tried and not d["advice"]:
            lines.append("advice: none (every layer is above 0 dB and the chip is close to float)")
        return "\n".join(lines)

    def to_pandas(self) -> Any:
        """One row per layer: SNR per cause, ADC use, single-layer metric (needs pandas)."""
        from cimc.runtime.simulator import _pandas

        pd = _pandas()
        rows = []
        for layer in self.data["layers"]:
            row = {k: layer[k] for k in ("rank", "name", "op_type", "rows", "cols", "groups")}
            row.update({f"snr_{c}_db": layer["snr_db"][c] for c in (*CAUSES, "all")})
            row.update({"adc_clip_rate": layer["adc"]["clip_rate"], "adc_levels_used": layer["adc"]["levels_used"],
                        "metric_only_this_layer": layer["metric_only_this_layer"]})
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, path: Any = None) -> Any:
        """The diagnose figure (a matplotlib Figure; also saved to ``path`` if given)."""
        from cimc.plots import plot_diagnose

        return plot_diagnose(self.data, path)


# ------------------------------------------------------------------------------------------ variants
def _cause_target(target: Any, cause: str) -> Any:
    """The target with only ``cause``'s noise left on: the other device scales 0, and the converters' output
    noise (``converters.output_noise``) only for the ``output`` cause; quantisation is set by the plans."""
    device = target.device
    updates: dict[str, Any] = {f"device.{field}": 0.0 for c, field in _DEVICE_SCALES.items()
                               if c != cause and hasattr(device, field)}
    if cause != "output" and getattr(target.converters, "output_noise", 0.0):
        updates["converters.output_noise"] = 0.0
    return target.with_overrides(**updates) if updates else target


def _plans(plans: dict[str, Any], dac: bool, adc: bool) -> dict[str, Any]:
    """Copies of the layer plans with the DAC and/or ADC switched off (bits None)."""
    out = {}
    for name, plan in plans.items():
        q = plan.quant
        if q is not None and not (dac and adc):
            q = dataclasses.replace(q, dac_bits=q.dac_bits if dac else None, adc_bits=q.adc_bits if adc else None)
            if q.dac_bits is None and q.adc_bits is None:
                q = None
        out[name] = dataclasses.replace(plan, quant=q)
    return out


class _Variant:
    """One configuration of the chip: which converters, which device noise, how many instances."""

    def __init__(self, compiled: Any, cause: str, instances: int, seed: int, t_s: float):
        from cimc.runtime.simulator import Chip

        self.cause = cause
        converters_only = cause in ("dac", "adc")
        self.instances = 1 if converters_only else instances
        target = compiled.target if cause in ("all", "dac", "adc") else _cause_target(compiled.target, cause)
        shim = _CompiledView(compiled.model, target)
        self.chip = Chip(shim, self.instances, seed)
        dac_on = cause in ("dac", "all")
        adc_on = cause in ("adc", "all")
        self.chip.plans = _plans(self.chip.plans, dac_on, adc_on)
        self.state = None if converters_only else self.chip.at(t_s)
        self._kernels: dict[str, torch.Tensor] = {}

    def mvm(self, step: Any, cols: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """The chip's result for MVM operands ``cols`` [instances·batch, mvms, groups, K] (float inputs)."""
        from cimc.runtime.simulator import ideal_hook

        cols = self.chip.dac_hook()(step, cols)
        if self.state is None:
            return ideal_hook(self.chip)(step, cols, matrix)
        return self.chip.hook(self.state)(step, cols, matrix)

    def conv(self, step: Any, x: torch.Tensor) -> torch.Tensor | None:
        """The chip's direct convolution (no bias) for ``x`` [instances·batch, C, ...], or None where the
        simulator would unroll (groups split over tiles)."""
        from cimc.runtime.analog import analog_conv, conv_weights

        plan = self.chip.plans[step.name]
        if step.op_type != "Conv" or not plan.whole_groups:
            return None
        xq = self.chip.dac_hook()(step, x)
        if self.state is not None:
            return self.chip.conv_hook(self.state)(step, xq)
        if self._kernels.get(step.name) is None:
            shape = self.chip.executor.weight(step).shape[1:]
            self._kernels[step.name] = conv_weights(self.chip.ideal[self.chip.layer[step.name]].unsqueeze(0), shape)
        return analog_conv(plan, xq, self._kernels[step.name], 1, plan.groups, step.attrs)


def _float_conv(executor: Any, step: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The float convolution of an analog Conv step without its bias (the executor adds it)."""
    from cimc.ops import OPS

    if step.op_type != "Conv":
        return None
    return OPS["Conv"]([x, executor.weight(step)], step.attrs)[0]


@dataclass
class _CompiledView:
    """What :class:`Chip` reads of a compiled model, with another target (one cause's device settings)."""

    model: Any
    target: Any


def _adc_stats(plan: Any, cols: torch.Tensor, matrix: torch.Tensor, stats: _Stats) -> None:
    """Count each tile's conversions, those at full scale, and the ADC codes used (ideal weights, DAC on)."""
    from cimc.runtime.analog import levels

    q = plan.quant
    if q is None or q.adc_bits is None:
        return
    n = levels(q.adc_bits, True)
    if stats.codes is None:
        stats.codes = torch.zeros(2 * n + 1, dtype=torch.bool)
    for i, t in enumerate(plan.tiles):
        part = torch.matmul(cols[:, :, t.group, t.r0 : t.r1], matrix[t.group, t.r0 : t.r1, t.c0 : t.c1])
        y_max = plan.y_max_tensor(i, part.dtype).reshape(-1)
        code = torch.round(torch.clamp(part / (y_max / n), -n, n)).long()
        stats.conversions += code.numel()
        stats.clipped += int((code.abs() == n).sum())
        stats.codes |= torch.bincount((code + n).reshape(-1), minlength=2 * n + 1) > 0  # linear, no sort


# ------------------------------------------------------------------------------------------ the runs
def _forward(executor: Any, x: np.ndarray, repeat: int, batch_size: int,
             tick: Callable[[int], None] | None = None) -> Any:
    """Yield (start, first output [repeat, batch, ...]) with the inputs repeated ``repeat`` times."""
    from cimc.runtime.simulator import run_outputs

    yield from run_outputs(executor, x, repeat, batch_size, tick)


def _snr_pass(executor: Any, variant: _Variant, x: np.ndarray, batch_size: int, chip: Any | None,
              tick: Callable[[int], None] | None) -> dict[str, _Stats]:
    """One forward pass of the float model: every analog layer also computes ``variant``'s outputs (for all
    its instances) on the same float input and records the error; the float output goes on. With ``chip``
    (the full chip) also the ADC use, counted with that chip's converters (DAC on, as on the chip) and ideal
    weights."""
    stats: dict[str, _Stats] = {}
    rep = variant.instances

    def record(name: str, y_float: torch.Tensor, y: torch.Tensor) -> None:
        s = stats.setdefault(name, _Stats())
        ref = y_float.double().unsqueeze(0)
        s.signal += float(ref.pow(2).sum()) * rep
        s.error += float((y.double().reshape(rep, *y_float.shape) - ref).pow(2).sum())

    def hook(step: Any, cols: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        y_float = torch.einsum("bmgk,gkn->bmgn", cols, matrix)
        record(step.name, y_float, variant.mvm(step, cols.repeat(rep, 1, 1, 1), matrix))
        if chip is not None:
            _adc_stats(chip.plans[step.name], chip.dac_hook()(step, cols), matrix, stats[step.name])
        return y_float

    def direct(step: Any, x: torch.Tensor) -> torch.Tensor | None:
        if chip is not None:
            return None  # the ADC statistics need each tile's partial sums: the unrolled path
        y = variant.conv(step, x.repeat(rep, *([1] * (x.dim() - 1))))
        if y is None:
            return None
        y_float = _float_conv(executor, step, x)
        record(step.name, y_float, y)
        return y_float

    executor.hook, executor.input_hook, executor.direct_hook = hook, None, direct
    try:
        for _ in _forward(executor, x, 1, batch_size, tick):
            pass
    finally:
        executor.hook = executor.input_hook = executor.direct_hook = None
    return stats


def _metric_pass(executor: Any, variant: _Variant, only: str | None, x: np.ndarray, y: np.ndarray | None,
                 reference: list[torch.Tensor], metric: str, classes: int, batch_size: int,
                 tick: Callable[[int], None] | None) -> float:
    """Mean end metric over instances with layer ``only`` on the chip (None: every layer), the rest float."""
    from cimc.runtime.metrics import MetricAccumulator

    def hook(step: Any, cols: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        if only is None or step.name == only:
            return variant.mvm(step, cols, matrix)
        return torch.einsum("bmgk,gkn->bmgn", cols, matrix)

    def direct(step: Any, x: torch.Tensor) -> torch.Tensor | None:
        if only is None or step.name == only:
            return variant.conv(step, x)
        return _float_conv(executor, step, x)

    acc = MetricAccumulator(metric, variant.instances, classes)
    executor.hook, executor.input_hook, executor.direct_hook = hook, None, direct
    try:
        for i, (start, out) in enumerate(_forward(executor, x, variant.instances, batch_size, tick)):
            acc.add(out, None if y is None else y[start : start + out.shape[1]], reference[i])
    finally:
        executor.hook = executor.input_hook = executor.direct_hook = None
    return float(acc.values().mean())


# ------------------------------------------------------------------------------------------ advice
# What each cause's advice says (the measured candidates come from :mod:`cimc.mitigations`).
_CAUSE_FIX = {
    "dac": "recalibrate its input range (quantize{clip=mse} or another percentile) or give the DAC more bits",
    "adc": "search its ADC full scale (wider if it clips, narrower if it uses few levels) or add ADC bits",
    "output": "replicate it (r copies, partial sums added: the periphery noise falls about sqrt(r)), keep it "
              "digital, or change its ADC range",
    "programming": "per-column weight scales (device.weight_scale: column) or noise-aware fine-tuning "
                   "('cimc finetune MODEL.onnx --data TRAIN.npz', then compile the result)",
    "drift": "per-column drift compensation (device.gdc: column) or a compensation factor pulled towards 1 "
             "(device.gdc_gain)",
    "read": "replicate it, or pull the compensation factor towards 1 (device.gdc_gain) so the read noise is "
            "amplified less",
}


def _weakest_cause(layer: dict[str, Any]) -> str | None:
    s = layer["snr_db"]
    causes = [c for c in CAUSES if s.get(c) is not None]
    return min(causes, key=lambda c: s[c]) if causes else None


def _advice(layers: list[dict[str, Any]], data: dict[str, Any]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    chip_loss = (1.0 if data["higher_is_better"] else -1.0) * (data["reference_value"] - data["chip_metric"])
    for layer in layers:
        name, adc, s = layer["name"], layer["adc"], layer["snr_db"]
        low = s["all"] is not None and s["all"] < LOW_SNR_DB
        if adc["clip_rate"] is not None and adc["clip_rate"] > CLIP_WARN:
            out.append({"layer": name, "kind": "adc-clipping", "text": (
                f"layer {name}: ADC clips {100 * adc['clip_rate']:.1f} % of conversions: its range is too small; "
                "recalibrate with more data (--calib) or raise the ADC range percentile "
                "(--pipeline 'canonicalize,map,quantize{percentile=99.999,clip=percentile},schedule')")})
        elif adc["levels_used"] is not None and adc["levels_used"] < LEVELS_WARN and s["adc"] is not None \
                and s["adc"] < LOW_SNR_DB:
            out.append({"layer": name, "kind": "adc-range", "text": (
                f"layer {name}: its ADC uses {100 * adc['levels_used']:.0f} % of its levels: the range is too large "
                "for its outputs; lower the range percentile (quantize{percentile=99.9}) or add ADC bits")})
        # Few rows sum too few products to average the noise out, whatever the layer's grouping.
        if layer["rows"] <= LOW_K_ROWS and (low or layer["cost"] > data["cost_warn"]):
            what = "depthwise layer" if layer["groups"] > 1 else "layer"
            out.append({"layer": name, "kind": "digital", "text": (
                f"{what} {name} has K={layer['rows']} rows: its SNR ({_fmt_db(s['all'])} dB) is low at "
                f"any precision; keep it digital with --digital {name}, or replicate it")})
        cause = _weakest_cause(layer)
        if cause is not None and s["all"] is not None and (s["all"] < 0.0 or (
                low and layer["cost"] > data["cost_warn"])):
            out.append({"layer": name, "kind": f"cause-{cause}", "text": (
                f"layer {name} ({_fmt_db(s['all'])} dB, {layer['cost_text']} when only it is analog): its weakest "
                f"cause is {_CAUSE_LABELS[cause]} ({_fmt_db(s[cause])} dB); {_CAUSE_FIX[cause]}")})
    # The cause with the lowest SNR in most layers, when it is a device effect and the chip loses accuracy.
    weakest = [c for c in (_weakest_cause(l) for l in layers) if c is not None]
    if weakest:
        top = max(set(weakest), key=weakest.count)
        median = float(np.median([l["snr_db"][top] for l in layers if l["snr_db"][top] is not None] or [1e9]))
        if 2 * weakest.count(top) > len(layers) and (median < LOW_SNR_DB or chip_loss > data["cost_warn"]):
            out.append({"layer": "", "kind": "device" if top in _DEVICE_SCALES else f"cause-{top}", "text": (
                f"{_CAUSE_LABELS[top]} is the weakest cause in {weakest.count(top)} of {len(layers)} layers (median "
                f"SNR {median:.1f} dB) and the whole chip {_loss_text(data, chip_loss)}: "
                f"consider {_CAUSE_FIX[top]}")})
    if not out and layers and (chip_loss > data["cost_warn"] or any(
            l["snr_db"]["all"] is not None and l["snr_db"]["all"] < 0.0 for l in layers)):
        worst = layers[0]  # never silent while the chip is far from float or a layer is below 0 dB
        cause = _weakest_cause(worst) or "output"
        out.append({"layer": worst["name"], "kind": f"cause-{cause}", "text": (
            f"the chip {_loss_text(data, chip_loss)}; most to blame: {worst['name']} "
            f"({_fmt_db(worst['snr_db']['all'])} dB), weakest cause {_CAUSE_LABELS[cause]}: {_CAUSE_FIX[cause]}")})
    return out


def _fmt_db(v: float | None) -> str:
    return "inf" if v is None else f"{v:.1f}"


# ------------------------------------------------------------------------------------------ entry point
def diagnose(
    compiled: Any,
    data: Any,
    *,
    time: str | float = "24h",
    instances: int = 5,
    seed: int = 0,
    samples: int | None = None,
    batch_size: int = 64,
    metric: str | Callable[..., float] | None = None,
    progress: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    try_advice: bool = True,
    calibration: Any = None,
    max_trials: int = 8,
    stream: str | Sequence[str] | None = None,
) -> DiagnoseResult:
    """Per-layer SNR by cause, single-layer end metric and advice (see the module docstring).

    ``compiled``: a compiled-model directory or object; ``data``: a Dataset, ``.npz`` path or builtin name
    (labels optional: without them the metric fits the output, see :func:`cimc.runtime.metrics.default_metric`).
    ``time``: when after programming (e.g. "24h"). With ``try_advice`` (default) up to ``max_trials`` mitigations
    (:mod:`cimc.mitigations`) are compiled and simulated on ``instances`` chips at ``time`` and ranked by the
    gain they gave (``tried``); variants that map the model again are calibrated on ``calibration`` (default:
    ``data``). With ``out_dir``, ``diagnose.json`` and ``diagnose.png`` are written there.
    """
    from cimc.data import Dataset, Feed, bind, load_dataset, reshape_hint
    from cimc.runtime.metrics import (
        check_metric,
        default_metric,
        get_metric,
        higher_is_better,
        is_percent,
        metric_name,
        output_size,
    )
    from cimc.runtime.simulator import _progress, format_duration, run_outputs

    started = _time.perf_counter()
    if out_dir is not None:  # refuse a destructive -o before minutes of simulation
        from cimc.outputs import check_output_dir

        check_output_dir(out_dir, "diagnosis", [compiled, data], force=force)
    c = load_compiled(compiled)
    ds = data if isinstance(data, (Dataset, Feed, Mapping)) else load_dataset(data)
    if instances < 1:
        raise InputError(f"--instances must be at least 1 (got {instances})")
    (t_s,) = parse_times(time if isinstance(time, str) else [time])
    feed = ds if isinstance(ds, Feed) else bind(ds, c.model, stream=stream)  # one array per input, by name
    if samples is not None:
        feed = feed.take(0, samples)
    x, y = (feed if feed.single is None else feed.single), feed.y
    if len(x) == 0:
        raise DataError("no samples to diagnose on; give data with at least one sample")
    expected = tuple(c.model.graph.inputs[0].shape)[1:]
    if not isinstance(x, Feed) and tuple(x.shape[1:]) != expected:
        raise DataError(f"data inputs have shape {tuple(x.shape[1:])} per sample but the model takes {expected}"
                        f"{reshape_hint(tuple(x.shape[1:]), expected)}")
    metric = metric_name(metric) or default_metric(y, output_size(c.model))
    check_metric(metric, y)
    calibrated = any("cimc.quant" in n.metadata_props for n in c.analog_nodes())
    variants = {cause: _Variant(c, cause, instances, seed, t_s) for cause in (*CAUSES, "all")}
    executor = variants["all"].chip.executor
    layer_names = [s.name for s in executor.analog_steps]
    if not layer_names:
        raise InputError("the model has no analog layers to diagnose (everything runs on the digital unit)")
    per_run = max(1, batch_size // instances)
    runs = len(x) * (1 + len(variants) + 1 + len(layer_names))  # ticks: samples per forward pass
    bar = _progress(runs, progress, desc="diagnosing")
    tick = bar.update if bar is not None else None
    try:
        executor.hook = None
        reference = [out[0] for _, out in run_outputs(executor, x, 1, per_run, tick)]
        classes = int(reference[0].reshape(reference[0].shape[0], -1).shape[1])
        y = get_metric(metric).check_labels(y, classes)
        full = variants["all"].chip
        snr = {cause: _snr_pass(executor, v, x, per_run, full if cause == "adc" else None, tick)
               for cause, v in variants.items()}
        float_metric = _metric_pass(executor, variants["dac"], "", x, y, reference, metric, classes, per_run, None)
        chip_metric = _metric_pass(executor, variants["all"], None, x, y, reference, metric, classes, per_run, tick)
        single = {name: _metric_pass(executor, variants["all"], name, x, y, reference, metric, classes, per_run, tick)
                  for name in layer_names}
    finally:
        if bar is not None:
            bar.close()
    sign = 1.0 if higher_is_better(metric) else -1.0
    # An agreement metric without a finite float value (snr: the float model has no error) is measured from
    # a good SNR instead, so costs stay finite numbers.
    reference_value = float_metric if math.isfinite(float_metric) else SNR_GOOD_DB
    steps = {s.name: s for s in executor.analog_steps}
    layers = []
    for order, name in enumerate(layer_names):
        st = steps[name]
        adc = snr["adc"][name]
        cost = sign * (reference_value - single[name])
        layers.append({
            "name": name, "order": order, "op_type": st.op_type, "rows": st.rows, "cols": st.cols, "groups": st.groups,
            "shape": f"{st.rows}x{st.cols}" + (f" x{st.groups}" if st.groups > 1 else ""),
            "snr_db": {cause: _json_db(snr[cause][name].snr_db) for cause in (*CAUSES, "all")},
            "adc": {"clip_rate": adc.clipped / adc.conversions if adc.conversions else None,
                    "levels_used": (float(adc.codes.float().mean()) if adc.codes is not None else None),
                    "conversions": adc.conversions},
            "metric_only_this_layer": single[name],
            "cost": cost,
            "cost_text": _cost_text(metric, cost),
        })
    ranked = sorted(layers, key=lambda l: (-l["cost"], l["snr_db"]["all"] if l["snr_db"]["all"] is not None else 1e9))
    for rank, layer in enumerate(ranked, 1):
        layer["rank"] = rank
    worst = ranked[0]
    causes = {cause: worst["snr_db"][cause] for cause in CAUSES if worst["snr_db"][cause] is not None}
    blame_cause = min(causes, key=causes.__getitem__) if causes else None
    blame = (f"{worst['name']} (only it analog: {_cost_text(metric, worst['cost'])}), weakest cause there: "
             f"{_CAUSE_LABELS[blame_cause]} ({causes[blame_cause]:.1f} dB)" if blame_cause else worst["name"])
    result: dict[str, Any] = {
        "format": "cimc-diagnose/1",
        "model": c.source,
        "target": c.target.name,
        "time": format_duration(t_s),
        "t_s": t_s,
        "instances": instances,
        "seed": seed,
        "samples": len(x),
        "data": getattr(ds, "name", "inputs"),
        "metric": metric,
        "higher_is_better": higher_is_better(metric),
        "percent": is_percent(metric),
        "float_metric": float_metric,
        "chip_metric": chip_metric,
        "converters_modelled": calibrated,
        "snr_definition": "10*log10(sum y_float^2 / sum (y - y_float)^2) of the crossbar output before the bias, "
                          "each layer fed the float model's activations",
        "causes": {c_: _CAUSE_LABELS[c_] for c_ in (*CAUSES, "all")},
        "layers": ranked,
        "blame": blame,
    }
    result["reference_value"] = reference_value
    result["cost_warn"] = 0.01 if is_percent(metric) else 0.5 if get_metric(metric).unit == "dB" else 0.001
    result["advice"] = _advice(ranked, result)
    if not calibrated:
        result["advice"].insert(0, {"layer": "", "kind": "uncalibrated", "text": (
            "converters are not modelled (compiled without --calib): DAC/ADC causes are not measured; "
            "compile with --calib DATA.npz")})
    trials: list[dict[str, Any]] = []
    if try_advice:
        calib = calibration if calibration is not None else (feed if feed.streaming else ds)  # a stream keeps its pairs
        calib = calib if isinstance(calib, (Dataset, Feed)) or calib is None else load_dataset(calib)
        trials = _try_advice(c, result, x, y, t_s, instances, seed, batch_size, calib, max_trials, progress)
    result["tried"] = [{k: v for k, v in t.items() if not k.startswith("_")} for t in trials]
    result["tried_with"] = {"instances": instances, "seed": seed, "time": format_duration(t_s)} if try_advice else None
    result = _json_ready(result)
    timings = {"format": "cimc-timings/1", "wall_time_s": _time.perf_counter() - started}
    out = DiagnoseResult(result, trials)
    if out_dir is not None:
        from cimc.outputs import output_dir
        from cimc.plots import plot_diagnose
        from cimc.report import write_json_atomic

        with output_dir(out_dir, "diagnosis", [compiled, data], force=force) as tmp:
            write_json_atomic(tmp / "diagnose.json", result)  # no wall time: same inputs, same bytes
            write_json_atomic(tmp / "timings.json", timings)
            plot_diagnose(result, tmp / "diagnose.png")
    return out


def _try_advice(c: Any, result: dict[str, Any], x: np.ndarray, y: np.ndarray | None, t_s: float, instances: int,
                seed: int, batch_size: int, calibration: Any, max_trials: int, progress: bool) -> list[dict[str, Any]]:
    """Compile and simulate each mitigation the diagnosis suggests; ranked by the measured gain."""
    from cimc.mitigations import Decisions, candidates_for, measure, try_candidates
    from cimc.runtime.simulator import _progress

    candidates = candidates_for(result, Decisions(), c)[:max(0, max_trials)]
    if not candidates:
        return []

    def evaluate(compiled: Any) -> Any:
        return measure(compiled, x, y, t_s, result["metric"], instances, seed, batch_size)

    before = evaluate(c)
    bar = _progress(len(candidates), progress, desc="trying advice")
    try:
        return try_candidates(c, before, candidates, Decisions(), evaluate, calibration, result["higher_is_better"],
                              seed, (lambda: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


def _tried_line(rank: int, t: dict[str, Any], metric: str) -> str:
    """One measured piece of advice: gain, what to do, before -> after, cost before -> after."""
    from cimc.runtime.metrics import format_score, is_percent

    if t.get("after") is None:
        return f"{rank}. (not measured: {t.get('error', 'failed')}) {t['text']}"
    gain = t["gain"]
    gain_text = "inf" if gain is None else (f"{100 * gain:+.2f} pts" if is_percent(metric) else f"{gain:+.4g}")
    b, a = t["before"], t["after"]
    return (f"{rank}. {gain_text}  {t['text']}: {format_score(metric, b['value'])} -> "
            f"{format_score(metric, a['value'])}; energy {b['energy_per_inference_j'] * 1e6:.3g} -> "
            f"{a['energy_per_inference_j'] * 1e6:.3g} uJ, latency {b['latency_s'] * 1e3:.3g} -> "
            f"{a['latency_s'] * 1e3:.3g} ms per inference" + (f"  ({t['why']})" if t.get("why") else ""))


def _json_db(v: float) -> float | None:
    """dB for JSON: no error at all (inf) is null."""
    return None if math.isinf(v) and v > 0 else (-999.0 if math.isinf(v) else round(v, 3))


def _loss_text(data: dict[str, Any], loss: float) -> str:
    """What the whole chip loses against the float model, as a phrase."""
    from cimc.runtime.metrics import get_metric, is_percent

    metric = data["metric"]
    if get_metric(metric).unit == "dB":
        return f"is at {data['chip_metric']:.1f} dB SNR to the float model"
    if is_percent(metric):
        return f"loses {100 * loss:.2f} pts"
    return f"loses {loss:.4g}"


def _cost_text(metric: str, cost: float) -> str:
    from cimc.runtime.metrics import get_metric, is_percent

    if get_metric(metric).unit == "dB":
        return f"{SNR_GOOD_DB - cost:.1f} dB"
    # Rounded first, then + 0.0: a loss that rounds to nothing prints +0.0000, not -0.0000.
    if is_percent(metric):
        return f"{round(-100 * cost, 2) + 0.0:+.2f} pts"
    return f"{round(-cost, 4) + 0.0:+.4f}"
