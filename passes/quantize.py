"""Calibrate the target's DACs and ADCs on data, per analog layer (and per tile).

Rules:
  1. DAC: the layer's inputs are clipped to a full scale ``x_max`` = the ``percentile`` of |input| over the
     calibration batch (the input tensor itself, before convolution padding) and quantised to ``dac_bits``; unsigned when no calibration input is negative (after
     ReLU), symmetric signed otherwise.
     With ``clip=mse`` (default) the full scale is then lowered to the fraction of that percentile with the
     least quantisation error at the DAC's bits (few-bit converters gain from clipping a rare tail).
  2. ADC: each tile's partial sums (row splits are converted separately, as on the chip) are clipped to
     ``y_max`` = the ``percentile`` of their |value| and quantised to ``adc_bits`` (signed, symmetric). One gain
     per tile for the whole layer (AON-CIM's fixed ADC gain) or per column where the target says
     ``converters.adc_gain: column``.
  3. Drift: a PCM chip's conductances shrink after programming (about 0.6x after a day), and drift
     compensation rescales digitally *after* the ADC, so a fixed ADC gain set for freshly programmed weights
     wastes levels for the rest of the chip's life. With ``drift_window`` (default ``1s..1y``) the ADC's
     partial sums are pooled over read times log-spaced in that window, each scaled by the layer's drift at
     that time (the target's device model, one seeded instance, measured with the simulator's GDC probe),
     and the full scale is chosen on the pool: one gain that serves the whole window. ``drift_window=none``
     calibrates on the programmed weights alone; devices without drift give the same ranges either way.
  4. Calibration is sequential in one forward pass: each layer sees the already-quantised outputs of the
     layers before it.

Durable result: node ``metadata_props["cimc.quant"]`` (see :class:`cimc.runtime.analog.QuantSpec`).
:func:`build_qdq_twin` turns a calibrated model into its digital twin with standard QuantizeLinear /
DequantizeLinear pairs, which onnxruntime runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from cimc.data import Feed, bind
from cimc.errors import DataError, InputError, ModelError
from cimc.pipeline import CimcPass, CompileContext, register_pass
from cimc.runtime.analog import LayerPlan, QuantSpec, analog_mvm, dac, layer_plans, levels, probe_response
from cimc.runtime.executor import Executor
from cimc.runtime.streaming import feed_forward, unroll_stream
from cimc.runtime.twin import build_qdq_twin  # re-exported: the twin's builder lives in runtime
from cimc.vocabulary import parse_duration

__all__ = ["DEFAULT_WINDOW", "QuantizePass", "build_qdq_twin", "calibrate", "calibration_inputs", "parse_window"]

logger = logging.getLogger(__name__)

_SAMPLE_LIMIT = 1 << 20  # percentiles are taken on at most this many values (a seeded subsample)


def _percentile(values: torch.Tensor, pct: float, dim_last: bool = False) -> torch.Tensor:
    """Percentile of ``values`` (all of it, or per last-axis column), on a seeded subsample when large.

    numpy's percentile partitions instead of sorting: linear time, which matters on calibration batches.
    """
    rng = np.random.default_rng(0)
    if dim_last:
        flat = values.detach().reshape(-1, values.shape[-1]).numpy()
        if flat.size > _SAMPLE_LIMIT:
            flat = flat[rng.integers(0, flat.shape[0], max(1, _SAMPLE_LIMIT // flat.shape[1]))]
        return torch.from_numpy(np.percentile(flat, pct, axis=0).astype(np.float32))
    flat = values.detach().reshape(-1).numpy()
    if flat.size > _SAMPLE_LIMIT:
        flat = flat[rng.integers(0, flat.size, _SAMPLE_LIMIT)]
    return torch.tensor(np.percentile(flat, pct), dtype=torch.float32)


_WINDOW_POINTS = 7  # read times pooled for the ADC range (log-spaced over the drift window)
_WINDOW_SEED = 4099
DEFAULT_WINDOW = (1.0, 31557600.0)  # 1 s .. 1 y
_CLIP_CANDIDATES = tuple(float(0.95**i) for i in range(40))  # 1 .. 0.14, 5 % apart


def _mse_range(abs_values: torch.Tensor, upper: torch.Tensor, bits: int | None, signed: bool) -> torch.Tensor:
    """The full scale, among fractions of ``upper``, with the least quantisation MSE on ``abs_values``.

    Few-bit converters lose more to coarse steps than to clipping a rare tail, so the best full scale sits
    below the percentile; at 8 bits the search mostly keeps the percentile. Per column when ``upper`` is 1-D.
    """
    if bits is None:
        return upper
    flat = abs_values.detach().reshape(-1, abs_values.shape[-1] if upper.dim() else 1)
    if flat.shape[0] > 65536:
        idx = torch.randint(0, flat.shape[0], (65536,), generator=torch.Generator().manual_seed(0))
        flat = flat[idx]
    n = levels(bits, signed)
    cands = torch.tensor(_CLIP_CANDIDATES).reshape(-1, 1, 1) * upper.reshape(1, 1, -1)  # [C, 1, cols|1]
    # One candidate at a time: the same numbers as all at once, without a [C, rows, cols] tensor (gigabytes
    # for a 257-column layer calibrated per column)
    err = torch.stack([((torch.round(torch.minimum(flat, c) / (c / n)) * (c / n) - flat) ** 2).mean(dim=0)
                       for c in cands[:, 0]])  # [C, cols|1]
    best = cands[err.argmin(dim=0), 0, torch.arange(err.shape[1])]
    return best.reshape(upper.shape)


def _positive(x: torch.Tensor) -> torch.Tensor:
    """A full scale must be positive: dead (all-zero) signals get 1.0.

    So do signals of denormal size (~1e-43): their step (full scale / 2^(bits-1)) would underflow to 0 and
    x / step give NaN where onnxruntime computes finite values; at full scale 1.0 they quantise to 0.
    """
    return torch.where(x > _NEGLIGIBLE_RANGE, x, torch.ones_like(x))


_NEGLIGIBLE_RANGE = 1e-30  # smallest full scale kept: its step stays a normal float32 up to 16 bits


def parse_window(text: str) -> tuple[float, float] | None:
    """``"1s..1y"`` → (1.0, 31557600.0); ``"none"`` → None (ranges for the programmed weights alone)."""
    if text.strip().lower() in ("none", "0", ""):
        return None
    lo, sep, hi = text.partition("..")
    try:
        window = (parse_duration(lo), parse_duration(hi if sep else lo))
    except InputError as exc:  # parse_duration's own message names the bad token
        raise DataError(f"quantize: drift_window must look like 1s..24h or none (got {text!r}): {exc}") from None
    if not 0 < window[0] <= window[1]:
        raise DataError(f"quantize: drift_window must be a positive range, earliest first (got {text!r})")
    return window


def _window_times(window: tuple[float, float], points: int = _WINDOW_POINTS) -> list[float]:
    lo, hi = np.log10(window[0]), np.log10(window[1])
    return [float(t) for t in np.unique(np.logspace(lo, hi, points if hi > lo else 1))]


def _drift_shrink(device: object, plan: LayerPlan, matrix: torch.Tensor, times: list[float],
                  per_column: bool) -> list[float]:
    """How much the layer's output magnitude has shrunk at each read time (1 / the GDC factor), on one seeded
    device instance, with the simulator's probe: what the ADC sees before compensation scales it back."""
    from cimc.runtime.devices import gdc_factor

    gen = torch.Generator().manual_seed(_WINDOW_SEED + plan.rows)
    w = matrix.detach().float()
    programmed = device.program_weights(w if per_column else w.reshape(1, -1, w.shape[-1]), 1, gen,  # type: ignore[attr-defined]
                                        per_column=per_column)

    def probe_out(t_s: float) -> torch.Tensor:
        return probe_response(plan, programmed.read(t_s, gen).float().reshape(1, *w.shape))

    ref = probe_out(0.0)
    return [float(1.0 / gdc_factor(ref, probe_out(t)).reshape(-1)[0]) for t in times]


def calibrate(model: ir.Model, x: np.ndarray | Feed, target: object, percentile: float, clip: str = "mse",
              drift_window: tuple[float, float] | None = DEFAULT_WINDOW) -> dict[str, QuantSpec]:
    """Measure DAC and ADC ranges layer by layer (see the module docstring); returns a spec per layer.

    ``clip``: ``percentile`` uses the percentile as the full scale; ``mse`` (default) searches fractions of it
    for the least quantisation error at the converter's bits. ``drift_window``: (earliest, latest) read time
    in seconds the ADC gain must serve, or None.
    """
    if clip not in ("mse", "percentile"):
        raise DataError(f"quantize: clip must be 'mse' or 'percentile' (got {clip!r})")
    device = None
    times: list[float] = []
    if drift_window is not None:
        from cimc.runtime.devices import build_device

        device = build_device(target.device)  # type: ignore[attr-defined]
        times = _window_times(drift_window)
        weight_scale_column = getattr(target.device, "weight_scale", "layer") == "column"  # type: ignore[attr-defined]

    def full_scale(abs_values: torch.Tensor, bits: int | None, signed: bool, per_col: bool) -> torch.Tensor:
        upper = _positive(_percentile(abs_values, percentile, dim_last=per_col))
        return upper if clip == "percentile" else _positive(_mse_range(abs_values, upper, bits, signed))

    plans = layer_plans(model)
    conv = target.converters  # type: ignore[attr-defined]
    per_column = conv.adc_gain == "column"
    specs: dict[str, QuantSpec] = {}

    def input_hook(step, x):  # type: ignore[no-untyped-def]
        plan = plans[step.name]
        if not bool(torch.isfinite(x).all()):  # a DAC range from inf/NaN is NaN: every later number would be too
            raise ModelError(
                f"calibration: the input of analog layer '{step.name}' is not finite (inf or NaN) on the calibration "
                "data, so no DAC range fits it; the model overflows before this layer: check the model and the data"
            )
        signed = bool((x < 0).any())
        x_max = float(full_scale(x.abs(), conv.dac_bits, signed, False))
        plan.quant = QuantSpec(conv.dac_bits, signed, x_max, conv.adc_bits, conv.adc_gain, [], percentile)
        return dac(plan, x)

    def hook(step, cols, matrix):  # type: ignore[no-untyped-def]
        plan = plans[step.name]
        b, m, g, k = cols.shape
        cq = cols.reshape(1, b * m, g, k)
        w = matrix.unsqueeze(0)
        shrink = (_drift_shrink(device, plan, matrix, times, weight_scale_column)
                  if device is not None else None)
        if shrink is not None and all(abs(s - 1.0) < 1e-6 for s in shrink):
            shrink = None  # no drift (ideal devices): the same ranges as without a window, bit for bit
        y_max: list[object] = []
        for t in plan.tiles:
            part = torch.matmul(cq[:, :, t.group, t.r0 : t.r1], w[:, t.group, t.r0 : t.r1, t.c0 : t.c1]).abs()
            if shrink is not None:  # the same sums as the drifted chip would see them across the window
                part = part.reshape(-1, part.shape[-1])
                if part.shape[0] * len(shrink) > _SAMPLE_LIMIT:
                    keep = max(1, _SAMPLE_LIMIT // len(shrink))
                    idx = torch.randint(0, part.shape[0], (keep,), generator=torch.Generator().manual_seed(0))
                    part = part[idx]
                part = torch.cat([part * s for s in shrink])
            if per_column:
                y_max.append([float(v) for v in full_scale(part, conv.adc_bits, True, True)])
            else:
                y_max.append(float(full_scale(part, conv.adc_bits, True, False)))
        plan.quant.y_max = y_max
        specs[step.name] = plan.quant
        return analog_mvm(plan, cq, w).reshape(b, m, g, -1)

    executor = Executor(model, hook=hook, input_hook=input_hook).eval()
    with torch.no_grad():
        if isinstance(x, Feed):
            feed_forward(executor, x)
        else:
            executor(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return specs


def calibration_inputs(model: ir.Model, data: Any, samples: int) -> np.ndarray | Feed:
    """At most ``samples`` calibration samples bound to the model's inputs (:func:`cimc.data.bind`): one array
    for a one-input model (as before), a :class:`Feed` otherwise. A stream is first run through the float model
    so that every chunk is calibrated with the state it really sees (:func:`unroll_stream`); its samples are
    then taken evenly over the sequences and chunks, not from the first sequence alone."""
    feed = data if isinstance(data, Feed) else bind(data, model)
    if feed.single is not None:
        return feed.single[:samples]
    if feed.streaming:
        feed = unroll_stream(Executor(model).eval(), feed)
        if len(feed) > samples:
            return feed.subset(np.unique(np.linspace(0, len(feed) - 1, samples).round().astype(np.int64)))
    return feed.take(0, samples)


@register_pass("quantize")
@dataclass
class QuantizePass(CimcPass):
    """Set every analog layer's DAC and ADC ranges from calibration data (see the module docstring)."""

    ctx: CompileContext = field(repr=False)
    percentile: float = 99.99
    samples: int = 256
    clip: str = "mse"  # "mse": least-error full scale below the percentile; "percentile": the percentile itself
    drift_window: str = "1s..1y"  # read times the fixed ADC gain must serve ("none": programmed weights only)

    def requires(self, model: ir.Model) -> None:
        if "cimc.mapping" not in model.metadata_props:
            raise ir.passes.PreconditionError("quantize needs the tiles: run 'map' before 'quantize'")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not any("cimc.placement" in n.metadata_props for n in model.graph):
            return ir.passes.PassResult(model, False)  # every layer digital: no converters to set
        data = self.ctx.calibration
        if data is None:
            raise DataError("the 'quantize' pass needs calibration data: add --calib DATA.npz (arrays x, y)")
        x = calibration_inputs(model, data, self.samples)
        specs = calibrate(model, x, self.ctx.target, self.percentile, self.clip, parse_window(self.drift_window))
        for node in model.graph:
            if node.name in specs:
                node.metadata_props["cimc.quant"] = specs[node.name].to_json()
        model.metadata_props["cimc.quantization"] = (
            f'{{"dac_bits": {_js(self.ctx.target.converters.dac_bits)}, "adc_bits": {_js(self.ctx.target.converters.adc_bits)}, '
            f'"percentile": {self.percentile}, "samples": {len(x)}, '
            f'"clip": "{self.clip}", "drift_window": "{self.drift_window}"}}'
        )
        return ir.passes.PassResult(model, True)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if "cimc.placement" in node.metadata_props and "cimc.quant" not in node.metadata_props:
                raise ir.passes.PostconditionError(f"analog op {node.name!r} has no quantisation ranges")


def _js(v: object) -> str:
    return "null" if v is None else str(v)
