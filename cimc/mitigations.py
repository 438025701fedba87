"""Mitigations: compiler decisions that make a model work better on the chip, each tried on the simulator.

A mitigation changes the compiled model (the mapping, the converters' ranges, the target's drift
compensation) and has a price (energy, latency) that the compiled model's cost model counts. Each is an
entry of :data:`MITIGATIONS`; given a diagnosis it proposes :class:`Candidate` changes to a
:class:`Decisions` record, which :func:`build` turns into a compiled model:

=================  ==========================================================================================
``digital``        keep a layer off the crossbar (compile's ``digital``): few-row layers (any grouping),
                   layers below 0 dB or that cost the most
``replicate``      map a few-row layer r times and add the partial sums (compile's ``replicate``, where the
                   compiler offers it): output and read noise fall about √r
``replicate-wide`` every layer whose weakest cause is noise that copies average (output, read, programming,
                   drift) mapped twice, as one step, as many as the free arrays hold (costliest first): deep
                   models lose a little in every layer
``adc-range``      one layer's ADC full scale ×0.5 or ×2 (clipping: wider; unused levels or output noise
                   below the ADC's step: narrower)
``percentile``     every layer's converter ranges recalibrated at another percentile
``weight-scale``   per-column weight scale (each column's max|W| to g_max: small columns gain signal)
``gdc``            per-column drift compensation
``gdc-gain``       the compensation factor pulled towards 1 (``device.gdc_gain``), which amplifies output
                   and read noise less than the exact factor
=================  ==========================================================================================

:func:`measure` runs the simulator (several chip instances, fixed seed) at one time after programming and
returns the metric with the cost; :func:`try_candidates` measures candidates against a baseline and ranks
them by the gain they gave.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import logging
import math
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cimc.errors import FitError, InputError
from cimc.metadata import MAPPING

__all__ = [
    "MITIGATIONS",
    "Candidate",
    "Decisions",
    "Measurement",
    "Mitigation",
    "build",
    "candidates_for",
    "measure",
    "register_mitigation",
    "replicate_supported",
    "try_candidates",
]

logger = logging.getLogger(__name__)

LOW_K_ROWS = 32  # a layer with this few rows sums too few products to average its noise out
LOW_SNR_DB = 20.0
GDC_GAINS = (0.5,)  # compensation gains tried (1 = the exact factor)
ADC_FACTORS = (0.5, 2.0)


@dataclass(frozen=True)
class Decisions:
    """What harden varies on top of the compiled model it starts from (empty: the model as compiled)."""

    digital: tuple[str, ...] = ()
    replicate: tuple[tuple[str, int], ...] = ()
    target: tuple[tuple[str, Any], ...] = ()  # target overrides, e.g. ("device.gdc", "column")
    percentile: float | None = None  # converter-range percentile of a recalibration (None: as compiled)
    adc_scale: tuple[tuple[str, float], ...] = ()  # per layer: ADC full scale multiplied by this

    @property
    def structural(self) -> bool:
        """True when the model must be mapped again (not only its target or converter ranges changed)."""
        return bool(self.digital or self.replicate or self.percentile is not None)

    def to_dict(self) -> dict[str, Any]:
        return {"digital": list(self.digital), "replicate": dict(self.replicate), "target": dict(self.target),
                "percentile": self.percentile, "adc_scale": dict(self.adc_scale)}


@dataclass(frozen=True)
class Candidate:
    """One change to try: which mitigation, on which layer (or ""), and the decisions it leads to."""

    kind: str
    layer: str
    text: str  # what to do, in words (with the equivalent option)
    apply: Callable[[Decisions], Decisions] = field(compare=False, repr=False)
    why: str = ""


@dataclass
class Measurement:
    """The metric at one time (mean over chip instances, and each instance), with the compiled model's cost."""

    value: float
    per_instance: list[float]
    float_score: float | None
    energy_j: float
    latency_s: float
    tops_per_w: float
    digital_macs: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"value": _finite(self.value), "per_instance": [_finite(v) for v in self.per_instance],
                "energy_per_inference_j": self.energy_j, "latency_s": self.latency_s,
                "tops_per_w": self.tops_per_w}


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Mitigation:
    """A named source of candidates: ``propose(diagnosis data, decisions, compiled) -> candidates``."""

    name: str
    description: str
    propose: Callable[[dict[str, Any], Decisions, Any], list[Candidate]]


MITIGATIONS: dict[str, Mitigation] = {}


def register_mitigation(name: str, description: str) -> Callable[[Callable[..., list[Candidate]]],
                                                                  Callable[..., list[Candidate]]]:
    """Decorator: add a mitigation (its candidates from a diagnosis) to :data:`MITIGATIONS`."""

    def add(fn: Callable[..., list[Candidate]]) -> Callable[..., list[Candidate]]:
        MITIGATIONS[name] = Mitigation(name, description, fn)
        return fn

    return add


def _few_rows(layer: dict[str, Any]) -> bool:
    return int(layer["rows"]) <= LOW_K_ROWS


def _snr_all(layer: dict[str, Any]) -> float:
    v = layer["snr_db"]["all"]
    return math.inf if v is None else float(v)


_REPLICA = re.compile(r"(.*)/rep[0-9]+")


def _weak_layers(data: dict[str, Any], limit: int = 2) -> list[dict[str, Any]]:
    """The layers worth a layer-level change: few rows, below 0 dB, or the most costly (ranked first).
    Replica copies (``N/rep<i>``, made by an earlier replication) are not layers of the model harden starts
    from: they are left alone."""
    layers = [l for l in data["layers"] if not _REPLICA.fullmatch(l["name"])]
    picked = [l for l in layers if _few_rows(l) or _snr_all(l) < 0.0]
    for l in layers[:limit]:
        if l not in picked and (l["cost"] > data.get("cost_warn", 0.0) or _snr_all(l) < LOW_SNR_DB):
            picked.append(l)
    return picked


@register_mitigation("digital", "keep a layer on the digital unit (float), off the crossbar")
def _digital(data: dict[str, Any], d: Decisions, compiled: Any) -> list[Candidate]:
    out = []
    remaining = [l for l in data["layers"] if l["name"] not in d.digital]
    if len(remaining) <= 1:
        return []  # the last analog layer stays: a model with nothing on the crossbar is not a CIM model
    for layer in _weak_layers(data):
        name = layer["name"]
        if name in d.digital:
            continue
        why = (f"{layer['rows']} rows" if _few_rows(layer) else f"SNR {_snr_all(layer):.1f} dB")
        out.append(Candidate("digital", name, f"keep {name} digital (--digital {name})",
                             lambda x, n=name: dataclasses.replace(x, digital=(*x.digital, n)), why))
    return out


def replicate_supported() -> bool:
    """Whether this compiler maps a layer r times (compile's ``replicate`` option)."""
    from cimc.compiler import compile_model

    return "replicate" in inspect.signature(compile_model).parameters


@register_mitigation("replicate", "map a few-row layer r times on spare rows/arrays and add the partial sums")
def _replicate(data: dict[str, Any], d: Decisions, compiled: Any) -> list[Candidate]:
    if not replicate_supported():
        return []
    rows_per_array = int(compiled.target.array.rows)
    done = dict(d.replicate)
    out = []
    for layer in _weak_layers(data):
        name, rows = layer["name"], int(layer["rows"])
        if name in d.digital or name in done:
            continue
        r = min(4, max(1, rows_per_array // max(rows, 1)))
        if r < 2:
            continue
        out.append(Candidate("replicate", name, f"replicate {name} {r} times (--replicate {name}={r})",
                             lambda x, n=name, k=r: dataclasses.replace(x, replicate=(*x.replicate, (n, k))),
                             f"{rows} rows: output and read noise fall about sqrt({r})"))
    return out


def _free_weights(compiled: Any) -> float:
    """Weights the target has room for beside the mapped model (inf when the mapping does not say)."""
    raw = compiled.model.metadata_props.get(MAPPING)
    if not raw:
        return math.inf
    m = json.loads(raw)
    try:
        total = int(m["arrays_available"]) * int(m["array_rows"]) * int(m["array_weight_cols"])
        return float(total - int(m["weights_placed"]))
    except (KeyError, TypeError, ValueError):
        return math.inf


_AVERAGED = ("output", "read", "programming", "drift")  # causes r independent copies average (not DAC/ADC steps)
WIDE_REPLICAS = 2


@register_mitigation("replicate-wide", "map every layer whose weakest cause averages out twice (one step)")
def _replicate_wide(data: dict[str, Any], d: Decisions, compiled: Any) -> list[Candidate]:
    """Deep models lose a little in every layer rather than much in one: then one layer at a time gains too
    little to be kept, while doubling all of them (on a target with spare arrays) cuts the noise they add up."""
    if not replicate_supported():
        return []
    done = dict(d.replicate)
    free = _free_weights(compiled)
    names = []
    for layer in data["layers"]:  # ranked: the costliest first, so those get the room there is
        name, s = layer["name"], layer["snr_db"]
        if name in d.digital or name in done or _REPLICA.fullmatch(name):
            continue
        causes = {c: s[c] for c in (*_AVERAGED, "dac", "adc") if s.get(c) is not None}
        size = (WIDE_REPLICAS - 1) * int(layer["rows"]) * int(layer["cols"]) * int(layer.get("groups") or 1)
        if causes and min(causes, key=causes.__getitem__) in _AVERAGED and size <= free:
            names.append(name)
            free -= size
    if len(names) < 2:
        return []  # one layer: the per-layer replicate candidate covers it
    return [Candidate("replicate-wide", "", f"replicate the {len(names)} layers whose weakest cause is device or "
                      f"output noise {WIDE_REPLICAS} times each (--replicate LAYER={WIDE_REPLICAS} for each)",
                      lambda x, ns=tuple(names): dataclasses.replace(
                          x, replicate=(*x.replicate, *((n, WIDE_REPLICAS) for n in ns))),
                      f"{len(names)} layers, each losing most to noise that r copies average (about sqrt(r))")]


@register_mitigation("adc-range", "widen or narrow one layer's ADC full scale")
def _adc_range(data: dict[str, Any], d: Decisions, compiled: Any) -> list[Candidate]:
    if not data.get("converters_modelled", True):
        return []
    out = []
    scaled = dict(d.adc_scale)
    for layer in data["layers"][:3]:
        name, adc, s = layer["name"], layer["adc"], layer["snr_db"]
        if name in d.digital or name in scaled or adc.get("clip_rate") is None:
            continue
        clipping = adc["clip_rate"] > 0.01
        unused = (adc.get("levels_used") or 1.0) < 0.10
        weakest = min(("adc", "output"), key=lambda c: math.inf if s.get(c) is None else s[c])
        if clipping:
            factors: tuple[float, ...] = (2.0,)
        elif unused:
            factors = (0.5,)
        elif s.get(weakest) is not None and s[weakest] < LOW_SNR_DB:
            factors = ADC_FACTORS
        else:
            continue
        for f in factors:
            why = ("clips {:.1f} % of conversions".format(100 * adc["clip_rate"]) if clipping else
                   "uses {:.0f} % of its levels".format(100 * (adc.get("levels_used") or 0)) if unused else
                   f"{weakest} SNR {s[weakest]:.1f} dB")
            out.append(Candidate("adc-range", name, f"{'widen' if f > 1 else 'narrow'} the ADC range of {name} "
                                 f"x{f:g}", lambda x, n=name, k=f: dataclasses.replace(
                                     x, adc_scale=(*x.adc_scale, (n, k))), why))
    return out


@register_mitigation("percentile", "recalibrate every converter range at another percentile")
def _percentile(data: dict[str, Any], d: Decisions, compiled: Any) -> list[Candidate]:
    settings = _quantization(compiled)
    if settings is None or d.percentile is not None:
        return []
    clipping = any((l["adc"].get("clip_rate") or 0) > 0.01 for l in data["layers"])
    p = 99.999 if clipping else 99.9
    return [Candidate("percentile", "", f"recalibrate the converter ranges at the {p:g}th percentile "
                      f"(quantize{{percentile={p:g}}})", lambda x, v=p: dataclasses.replace(x, percentile=v),
                      "ADC clipping" if clipping else "narrower ranges: more levels for the common values")]


def _device_field(compiled: Any, name: str) -> Any:
    return getattr(compiled.target.device, name, None)


def _target_value(d: Decisions, compiled: Any, key: str) -> Any:
    overrides = dict(d.target)
    return overrides[key] if key in overrides else _device_field(compiled, key.split(".", 1)[1])


@register_mitigation("weight-scale", "per-column weight scale: each column's max|W| maps to g_max")
def _weight_scale(data: dict[str, Any], d: Decisions, compiled: Any) -> list[Candidate]:
    if _target_value(d, compiled, "device.weight_scale") in (None, "column"):
        return []
    return [Candidate("weight-scale", "", "scale weights per column (device.weight_scale: column)",
                      lambda x: dataclasses.replace(x, target=(*x.target, ("device.weight_scale", "column"))),
                      "columns with small weights gain signal against programming, read and output noise")]


@register_mitigation("gdc", "per-column drift compensation")
def _gdc(data: dict[str, Any], d: Decisions, compiled: Any) -> list[Candidate]:
    if _target_value(d, compiled, "device.gdc") in (None, "column", "none"):
        return []
    return [Candidate("gdc", "", "compensate drift per column (device.gdc: column)",
                      lambda x: dataclasses.replace(x, target=(*x.target, ("device.gdc", "column"))),
                      "columns drift by different amounts")]


@register_mitigation("gdc-gain", "pull the drift-compensation factor towards 1 (device.gdc_gain)")
def _gdc_gain(data: dict[str, Any], d: Decisions, compiled: Any) -> list[Candidate]:
    if _target_value(d, compiled, "device.gdc") in (None, "none") or _target_value(
            d, compiled, "device.gdc_gain") not in (None, 1.0):
        return []
    return [Candidate("gdc-gain", "", f"apply {g:g} of the drift-compensation factor (device.gdc_gain: {g:g})",
                      lambda x, v=g: dataclasses.replace(x, target=(*x.target, ("device.gdc_gain", v))),
                      "the exact factor amplifies output and read noise with the signal")
            for g in GDC_GAINS]


def candidates_for(data: dict[str, Any], decisions: Decisions, compiled: Any,
                   kinds: Sequence[str] | None = None) -> list[Candidate]:
    """Every registered mitigation's candidates for a diagnosis (``data`` of :func:`cimc.diagnosis.diagnose`),
    taken in turn across the mitigations (the first of each, then the second of each, ...), so that a cap on
    the number of trials cuts the long per-layer lists rather than whole mitigations."""
    lists = [m.propose(data, decisions, compiled) for name, m in MITIGATIONS.items() if kinds is None or name in kinds]
    return [c for group in itertools.zip_longest(*lists) for c in group if c is not None]


# ------------------------------------------------------------------------------------------ building
def _quantization(compiled: Any) -> dict[str, Any] | None:
    raw = compiled.model.metadata_props.get("cimc.quantization")
    return json.loads(raw) if raw else None


def _stripped_copy(model: Any) -> Any:
    """A copy of the compiled graph without cimc's metadata: the (canonical, float) model to map again."""
    import onnx_ir as ir

    copy = ir.from_proto(ir.to_proto(model))
    for node in copy.graph:
        for key in [k for k in node.metadata_props if k.startswith("cimc.")]:
            del node.metadata_props[key]
    for key in [k for k in copy.metadata_props if k.startswith("cimc.")]:
        del copy.metadata_props[key]
    return copy


def build(base: Any, decisions: Decisions, calibration: Any = None, source: Any = None,
          seed: int = 0) -> Any:
    """The compiled model ``base`` with ``decisions`` applied.

    Target and ADC-range changes edit a copy of ``base`` (its mapping stays). Structural changes (digital,
    replicate, a new percentile) map the model again with the base's quantisation settings and
    ``calibration`` data; layers whose tiles did not change keep the base's converter ranges, so only what
    was decided changes. ``source``: an ONNX model (ir.Model) to compile instead of the base's own graph
    (fine-tuned weights)."""
    import onnx_ir as ir

    from cimc.artifact import CompiledModel
    from cimc.runtime.cost import estimate_cost
    from cimc.runtime.workload import model_workload

    try:
        target = base.target.with_overrides(**dict(decisions.target)) if decisions.target else base.target
    except ValueError as exc:
        raise InputError(f"harden: the target has no such setting ({exc})") from None
    if decisions.structural or source is not None:
        model = _remap(base, decisions, target, calibration, source, seed)
    else:
        model = ir.from_proto(ir.to_proto(base.model))
    _scale_adc(model, dict(decisions.adc_scale))
    cost = estimate_cost(target, model_workload(model))
    extra = dict(base.extra)
    extra["hardened"] = decisions.to_dict()
    return CompiledModel(model, target, cost, base.source, base.source_sha256, extra)


def _remap(base: Any, decisions: Decisions, target: Any, calibration: Any, source: Any, seed: int) -> Any:
    import onnx_ir as ir

    from cimc.compiler import compile_model

    settings = _quantization(base)
    if settings is not None and calibration is None:
        raise InputError("harden: mapping the model again needs calibration data (--calib or --data)")
    steps = ["canonicalize", "map"]
    if settings is not None:
        pct = decisions.percentile if decisions.percentile is not None else settings.get("percentile", 99.99)
        opts = [f"percentile={pct}", f"clip={settings.get('clip', 'mse')}"]
        if settings.get("drift_window"):
            opts.append(f"drift_window={settings['drift_window']}")
        if settings.get("samples"):
            opts.append(f"samples={settings['samples']}")
        steps.append("quantize{" + ",".join(opts) + "}")
    steps.append("schedule")
    kept = json.loads(base.model.metadata_props.get("cimc.digital", "[]"))  # compiled with --digital already
    options: dict[str, Any] = {"digital": [*kept, *(n for n in decisions.digital if n not in kept)]}
    if decisions.replicate:
        options["replicate"] = dict(decisions.replicate)  # only proposed where compile_model takes it
    graph = source if source is not None else _stripped_copy(base.model)
    with tempfile.TemporaryDirectory(prefix="cimc-harden-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(graph, path)
        compiled = compile_model(path, target, pipeline=",".join(steps),
                                 calibration=calibration if settings is not None else None, seed=seed,
                                 **options)
    model = compiled.model
    if settings is not None and decisions.percentile is None and source is None:
        _keep_ranges(base.model, model)
    return model


def _keep_ranges(old: Any, new: Any) -> None:
    """Copy each layer's converter ranges from ``old`` where the layer kept its tiles (same tile count)."""
    before = {n.name: n.metadata_props.get("cimc.quant") for n in old.graph}
    for node in new.graph:
        raw_old, raw_new = before.get(node.name), node.metadata_props.get("cimc.quant")
        if not raw_old or not raw_new:
            continue
        if len(json.loads(raw_old)["y_max"]) == len(json.loads(raw_new)["y_max"]):
            node.metadata_props["cimc.quant"] = raw_old


def _scale_adc(model: Any, factors: dict[str, float]) -> None:
    for node in model.graph:
        f = factors.get(node.name)
        raw = node.metadata_props.get("cimc.quant")
        if f is None or not raw:
            continue
        spec = json.loads(raw)
        spec["y_max"] = [[v * f for v in y] if isinstance(y, list) else y * f for y in spec["y_max"]]
        node.metadata_props["cimc.quant"] = json.dumps(spec)


# ------------------------------------------------------------------------------------------ measuring
def measure(compiled: Any, x: np.ndarray, y: np.ndarray | None, t_s: float, metric: str, instances: int,
            seed: int = 0, batch_size: int = 64) -> Measurement:
    """The metric at ``t_s`` on ``instances`` simulated chips (fixed seed), with the static cost."""
    from cimc.runtime.simulator import simulate

    r = simulate(compiled, x, y, [t_s], instances=instances, seed=seed, batch_size=batch_size, compare_gdc=False,
                 metric=metric)
    point = r.data["series"][0]["points"][0]
    per = [math.inf if v is None else float(v) for v in point["per_instance"]]
    value = float(np.mean(per)) if per else math.nan
    cost = compiled.cost
    return Measurement(value, per, r.data.get("float_score"), float(cost.total_energy_j), float(cost.latency_s),
                       float(cost.tops_per_w))


def try_candidates(base: Any, before: Measurement, candidates: Sequence[Candidate], decisions: Decisions,
                   evaluate: Callable[[Any], Measurement], calibration: Any, higher: bool, seed: int = 0,
                   tick: Callable[[], None] | None = None, source: Any = None) -> list[dict[str, Any]]:
    """Build and measure each candidate on top of ``decisions``; ranked by the gain it gave (best first).

    Each entry: kind, layer, text, why, before/after (:class:`Measurement` dicts), gain (metric units,
    positive = better), the decisions, and ``error`` when the variant could not be built."""
    out = []
    sign = 1.0 if higher else -1.0
    for cand in candidates:
        entry: dict[str, Any] = {"kind": cand.kind, "layer": cand.layer, "text": cand.text, "why": cand.why,
                                 "before": before.to_dict()}
        new = cand.apply(decisions)
        try:
            variant = build(base, new, calibration, source=source, seed=seed)
            after = evaluate(variant)
        except (InputError, FitError) as exc:  # a variant the compiler refuses (nothing left analog, no room)
            entry.update({"after": None, "gain": None, "error": str(exc)})
            logger.info("candidate %s could not be tried: %s", cand.text, exc)
        else:
            gain = sign * (after.value - before.value) if math.isfinite(after.value - before.value) else (
                math.inf if sign * after.value > sign * before.value else 0.0)
            entry.update({"after": after.to_dict(), "gain": gain, "decisions": new.to_dict()})
            entry["_decisions"], entry["_measurement"], entry["_compiled"] = new, after, variant
        out.append(entry)
        if tick is not None:
            tick()
    out.sort(key=lambda e: -e["gain"] if e["gain"] is not None else math.inf)
    return out
