"""Cycle-level latency and energy model of a target running a workload.

Pure functions of a :class:`~cimc.targets.schema.Target` and a :class:`Workload` (layers in execution
order). Every number comes from the target file; nothing is fitted here.

Events per matrix-vector product (MVM) of an analog layer, per placed tile:

- ``dac``: one row-driver conversion per non-zero input row (``input_density``), energy scaled by bits;
- ``array``: every active device conducts for its input's share of the pulse:
  ``device_power_w · t_pulse · mean_input_magnitude`` (pulse-width inputs);
- ``adc``: one conversion per active weight column; when a tile has more columns than the array has ADCs,
  conversions run in turns (time-multiplexed). A conversion costs a per-conversion energy scaled by bits
  (``adc_energy_ref_j`` + ``adc_sense_energy_ref_j``) plus the converter's power ``adc_power_w`` times the
  time it runs: its own conversion time after the pulse, or the whole integration window when it converts
  during the integration (CCO) - so each chip's own timing sets its conversion energy;
- ``periphery``: the fixed cost of an MVM that does not shrink with the bit width: ``column_energy_j`` per
  active column (bit-line precharge, integrator reset, read-out) plus ``mvm_energy_j`` per tile (decoders,
  sequencing);
- ``digital``: scale and bias per output (``postprocess_ops_per_output``) plus one add per partial sum of
  a row split;
- ``sram``: the input vector read (``dac_bits``/8 bytes per row) and the outputs written (``adc_bits``/8);
- ``static``: leakage and bias power times the time the inference occupies the chip.

With ``converters.mvm_phases`` > 1 (HERMES's four-phase mode) every phase repeats the input pulse and the
conversions: time, ``dac``, ``array``, ``adc`` and ``periphery`` energy are paid once per phase.

Time per MVM: tiles on different arrays run in parallel, tiles on the same array take turns (different
row ranges cannot be driven at once without mixing currents); each tile needs ``settle_time_s`` + the input
pulse + its ADC turns (overlapped with the pulse for CCO-type ADCs); then the digital unit post-processes
(after the MVM, or overlapped with the next one when ``digital.overlapped``; one unit per array used when
``digital.per_array``).
Digital layers (ReLU, pooling, ...) cost ``ops`` on the digital unit and an SRAM read and write.

Execution modes: ``layer-serial`` - latency is the sum of the layers, one inference after another;
``pipelined`` - every core is a pipeline stage: latency is the sum of the layers, throughput is set by the
busiest core (the uses placed on one core - small layers packed together, or the several uses of one shared
weight - run on it in turn, so its busy time is the sum of theirs) or the slowest digital op.

Two efficiencies, both over the **whole inference's energy** (every component, digital unit included):

* ``tops_per_w`` (analog, the paper-comparable figure): **ops = 2 × MACs executed in the analog arrays** (one
  multiply and one add per weight use; every replica of a replicated layer counts). Moving a layer to the
  digital unit removes its MACs from the ops, so this figure can *rise* when the chip does less.
* ``system_tops_per_w``: **ops = 2 × the model's MACs wherever they run** (analog layers, layers kept
  digital, activation × activation products), each layer once (replicas are one layer's work). The same model
  always has the same ops, so a mitigation that costs energy (a layer kept digital, replication) lowers it.

Element-wise digital ops (ReLU, pooling, the replicas' adds) are spent energy, not counted as ops. Both are
derived from the energy breakdown, never computed on the side.

Data-dependent variant: pass measured per-layer :class:`LayerActivity` (fraction of non-zero inputs, mean
input magnitude, optionally the mean largest input which shortens pulse-width integration) to
:func:`estimate_cost`; layers without a measurement use the target's ``activity`` defaults.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from cimc.targets.schema import Target

__all__ = [
    "ENERGY_COMPONENTS",
    "SYSTEM_OPS_DEFINITION",
    "AnalogLayerWork",
    "CostReport",
    "DigitalOpWork",
    "LayerActivity",
    "LayerCost",
    "TileShape",
    "Workload",
    "estimate_cost",
    "explain_measured",
    "tiles_from_placements",
]

logger = logging.getLogger(__name__)

ENERGY_COMPONENTS = ("dac", "array", "adc", "periphery", "digital", "sram", "static")
SYSTEM_OPS_DEFINITION = "2 x the model's MACs, analog and digital, each layer once (replicas not counted again)"


@dataclass(frozen=True)
class TileShape:
    """A placed piece of an analog layer: weight rows × weight columns on array ``array_index``."""

    rows: int
    cols: int
    array_index: int = 0


@dataclass(frozen=True)
class AnalogLayerWork:
    """An analog layer: K (``rows``) × N (``cols``) weights, ``mvms`` products per inference.

    ``tiles`` are the placed pieces; empty means one tile of ``rows × cols`` on array 0.
    """

    name: str
    rows: int
    cols: int
    mvms: int
    tiles: tuple[TileShape, ...] = ()
    layer: str = ""  # the crossbar block it reads ("" = its own); uses of one shared weight name the same block
    replicas: int = 1  # copies of one model layer computing the same product (weight replication), this one of them

    @property
    def macs(self) -> int:
        """Multiply-accumulates per inference."""
        return self.rows * self.cols * self.mvms

    @property
    def model_macs(self) -> int:
        """The model's own multiply-accumulates this use stands for: a replica carries 1/r of its layer's."""
        return self.macs // max(self.replicas, 1)

    def placed_tiles(self) -> tuple[TileShape, ...]:
        return self.tiles or (TileShape(self.rows, self.cols, 0),)


@dataclass(frozen=True)
class DigitalOpWork:
    """A digital-unit op: ``elements`` outputs computed with ``ops`` arithmetic ops.

    ``input_elements`` (default: ``elements``) is what it reads from SRAM. ``macs``: the multiply-accumulates
    of a matrix product run on the digital unit (a layer kept digital, an activation × activation product), the
    model's work that the system efficiency counts.
    """

    name: str
    op_type: str
    elements: int
    ops: int
    input_elements: int | None = None
    macs: int = 0


LayerWork = AnalogLayerWork | DigitalOpWork


@dataclass(frozen=True)
class Workload:
    """Layers of one inference in execution order."""

    layers: tuple[LayerWork, ...]
    name: str = ""
    execution: str | None = None  # "layer-serial" | "pipelined"; None = the target's own mode

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers if isinstance(layer, AnalogLayerWork))


@dataclass(frozen=True)
class LayerActivity:
    """Measured input statistics of one analog layer, as fractions of the DAC full scale.

    ``input_density``: fraction of non-zero inputs; ``mean_input_magnitude``: mean |x| / full scale over
    all inputs; ``mean_max_input_magnitude``: mean over MVMs of the largest |x| / full scale (a pulse-width
    integration can stop after the longest pulse), None to keep the full-scale pulse.
    """

    input_density: float
    mean_input_magnitude: float
    mean_max_input_magnitude: float | None = None

    @classmethod
    def from_inputs(cls, inputs: np.ndarray, full_scale: float) -> LayerActivity:
        """Statistics of DAC inputs shaped (mvms, rows) - or anything whose last axis is the rows."""
        x = np.abs(np.asarray(inputs, dtype=np.float64)).reshape(-1, np.shape(inputs)[-1]) / full_scale
        x = np.clip(x, 0.0, 1.0)
        return cls(
            input_density=float(np.count_nonzero(x) / x.size),
            mean_input_magnitude=float(x.mean()),
            mean_max_input_magnitude=float(x.max(axis=1).mean()),
        )


@dataclass
class LayerCost:
    """Cost of one layer per inference. ``energy_j`` maps component name → joules."""

    name: str
    kind: str
    cycles: int
    latency_s: float
    energy_j: dict[str, float]
    macs: int = 0
    mvms: int = 0
    model_macs: int = 0  # the model's MACs this op stands for (analog or digital; a replica's share)

    @property
    def total_energy_j(self) -> float:
        return sum(self.energy_j.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_energy_j"] = self.total_energy_j
        return out


@dataclass
class CostReport:
    """Per-inference cost: layers, latency, period between inferences, energy breakdown."""

    target: str
    execution: str
    layers: list[LayerCost]
    latency_s: float
    period_s: float
    clock_hz: float
    settings: dict[str, Any] = field(default_factory=dict)
    core_busy_s: dict[int, float] = field(default_factory=dict)  # array/core -> analog time per inference
    core_users: dict[int, list[str]] = field(default_factory=dict)  # array/core -> analog uses that run there

    @property
    def shared_cores(self) -> dict[int, list[str]]:
        """Pipelined: cores that several analog uses take turns on (core -> use names, in execution order).
        Empty when layer-serial (every use takes its turn anyway)."""
        if self.execution != "pipelined":
            return {}
        return {k: v for k, v in self.core_users.items() if len(v) > 1}

    @property
    def energy_j(self) -> dict[str, float]:
        """Energy per inference by component (sum over layers)."""
        return {c: sum(layer.energy_j.get(c, 0.0) for layer in self.layers) for c in ENERGY_COMPONENTS}

    @property
    def total_energy_j(self) -> float:
        return sum(self.energy_j.values())

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def ops(self) -> int:
        """Analog ops per inference: 2 × MACs executed in the arrays (replicas each count)."""
        return 2 * self.macs

    @property
    def model_macs(self) -> int:
        """The model's MACs per inference wherever they run (analog or digital), each layer counted once."""
        return sum(layer.model_macs for layer in self.layers)

    @property
    def system_ops(self) -> int:
        """The model's ops per inference: 2 × its MACs, analog and digital, replicas counted once."""
        return 2 * self.model_macs

    @property
    def system_tops_per_w(self) -> float:
        """System efficiency: the model's ops over the whole inference's energy (digital work included)."""
        energy = self.total_energy_j
        return self.system_ops / energy / 1e12 if energy > 0 else math.inf

    @property
    def cycles(self) -> int:
        return sum(layer.cycles for layer in self.layers)

    @property
    def inferences_per_s(self) -> float:
        return 1.0 / self.period_s if self.period_s > 0 else math.inf

    @property
    def tops_per_w(self) -> float:
        """Analog efficiency (the paper-comparable figure): analog ops over the whole inference's energy."""
        energy = self.total_energy_j
        return self.ops / energy / 1e12 if energy > 0 else math.inf

    @property
    def tops(self) -> float:
        """Throughput in tera-ops per second at the pipeline's (or the serial) rate."""
        return self.ops * self.inferences_per_s / 1e12

    @property
    def average_power_w(self) -> float:
        return self.total_energy_j * self.inferences_per_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "execution": self.execution,
            "settings": dict(self.settings),
            "ops_definition": "2 x MACs executed in the analog arrays",
            "system_ops_definition": SYSTEM_OPS_DEFINITION,
            "latency_s": self.latency_s,
            "period_s": self.period_s,
            "cycles": self.cycles,
            "inferences_per_s": self.inferences_per_s,
            "energy_j": self.energy_j,
            "total_energy_j": self.total_energy_j,
            "macs": self.macs,
            "ops": self.ops,
            "tops_per_w": self.tops_per_w,
            "model_macs": self.model_macs,
            "system_ops": self.system_ops,
            "system_tops_per_w": self.system_tops_per_w,
            "tops": self.tops,
            "average_power_w": self.average_power_w,
            "core_busy_s": {str(k): v for k, v in sorted(self.core_busy_s.items())},
            "shared_cores": {str(k): v for k, v in sorted(self.shared_cores.items())},
            "layers": [layer.to_dict() for layer in self.layers],
        }


def tiles_from_placements(placements: Iterable[Any], block: str) -> tuple[TileShape, ...]:
    """Tile shapes of ``block`` from packing placements (objects with block, rows, cols, array_index)."""
    return tuple(TileShape(p.rows, p.cols, p.array_index) for p in placements if p.block == block)


def estimate_cost(
    target: Target, workload: Workload, activity: Mapping[str, LayerActivity] | None = None
) -> CostReport:
    """Latency and energy of one inference of ``workload`` on ``target``.

    ``activity`` maps analog layer names to measured input statistics; missing layers use the target's
    ``activity`` defaults.
    """
    activity = activity or {}
    default = LayerActivity(target.activity.input_density, target.activity.mean_input_magnitude)
    layers: list[LayerCost] = []
    for work in workload.layers:
        if isinstance(work, AnalogLayerWork):
            layers.append(_analog_layer(target, work, activity.get(work.name, default)))
        else:
            layers.append(_digital_layer(target, work))
    execution = workload.execution or target.execution
    if execution == "auto":  # not resolved by a map pass: pipelined when there are several cores
        execution = "layer-serial" if target.array.count == 1 else "pipelined"
    busy, users = _core_busy(workload, layers)
    latency_s = sum(layer.latency_s for layer in layers)
    if execution == "pipelined":
        # Every core is a pipeline stage; uses that share a core run in turn, so a core is busy for the sum
        # of its uses' times; digital ops are stages of their own. The slowest stage sets the period.
        digital = max((c.latency_s for c in layers if c.kind == "digital"), default=0.0)
        period_s = max(max(busy.values(), default=0.0), digital)
    else:
        period_s = latency_s
    _add_static(target, layers, latency_s, period_s)
    settings = {"dac_bits": target.converters.dac_bits, "adc_bits": target.converters.adc_bits}
    return CostReport(target.name, execution, layers, latency_s, period_s, target.clock_hz, settings, busy, users)


def _core_busy(workload: Workload, layers: Sequence[LayerCost]) -> tuple[dict[int, float], dict[int, list[str]]]:
    """Per array/core: the time its analog uses keep it busy per inference, and which uses those are."""
    busy: dict[int, float] = {}
    users: dict[int, list[str]] = {}
    for work, cost in zip(workload.layers, layers):
        if not isinstance(work, AnalogLayerWork):
            continue
        for core in sorted({t.array_index for t in work.placed_tiles()}):
            busy[core] = busy.get(core, 0.0) + cost.latency_s
            users.setdefault(core, []).append(work.name)
    return busy, users


# --- analog layers ----------------------------------------------------------------------------------------


def _activation_bytes(bits: int | None) -> float:
    # Packed activations; "quantisation off" is costed as 8-bit traffic.
    return (bits or 8) / 8.0


def _pulse_s(target: Target, act: LayerActivity) -> float:
    conv = target.converters
    # With the DAC off the array still integrates for the reference pulse; only the converter is free.
    scale = conv.scale(conv.dac_bits) if conv.dac_bits is not None else 1.0
    pulse = conv.dac_time_ref_s * scale
    if act.mean_max_input_magnitude is not None:
        pulse *= act.mean_max_input_magnitude
    return pulse


def _converter_on_s(target: Target, pulse_s: float) -> float:
    """Time one column converter draws ``adc_power_w`` per conversion, s.

    A converter that works after the pulse (ramp / single-slope: the column charge sits passively on its
    integration capacitor meanwhile) runs for its own conversion time. One that converts during the
    integration (a current-controlled oscillator *is* the integrator, its counter counts the whole input
    window) runs for the whole window: the longer of the pulse and its conversion time.
    """
    conv = target.converters
    if conv.adc_bits is None:  # quantisation off: ideal and free
        return 0.0
    adc_s = conv.adc_time_ref_s * conv.scale(conv.adc_bits)
    return max(pulse_s, adc_s) if conv.adc_during_integration else adc_s


def _tile_time_s(target: Target, tile: TileShape, pulse_s: float) -> float:
    conv = target.converters
    adc_s = conv.adc_time_ref_s * conv.scale(conv.adc_bits)
    turns = math.ceil(tile.cols / conv.adc_count)
    if conv.adc_during_integration:
        convert_s = max(pulse_s, adc_s) + (turns - 1) * adc_s
    else:
        convert_s = pulse_s + turns * adc_s
    return conv.mvm_phases * (target.array_read.settle_time_s + convert_s)


def _analog_layer(target: Target, work: AnalogLayerWork, act: LayerActivity) -> LayerCost:
    conv, read, dig, sram = target.converters, target.array_read, target.digital, target.sram
    tiles = work.placed_tiles()
    rows = np.array([t.rows for t in tiles], dtype=np.float64)
    cols = np.array([t.cols for t in tiles], dtype=np.float64)
    pulse_s = _pulse_s(target, act)

    device_j = read.device_power_w * pulse_s * act.mean_input_magnitude
    partial_sum_adds = float(cols.sum() - work.cols)  # one add per extra partial sum of a row split
    digital_ops = dig.postprocess_ops_per_output * work.cols + partial_sum_adds
    phases = conv.mvm_phases
    per_mvm_j = {
        "dac": phases * act.input_density * rows.sum() * conv.dac_energy_ref_j * conv.scale(conv.dac_bits),
        "array": phases * float((rows * cols).sum()) * target.array.devices_per_weight * device_j,
        "adc": phases * cols.sum() * (
            (conv.adc_energy_ref_j + conv.adc_sense_energy_ref_j) * conv.scale(conv.adc_bits)
            + conv.adc_power_w * _converter_on_s(target, pulse_s)
        ),
        "periphery": phases * (cols.sum() * read.column_energy_j + len(tiles) * read.mvm_energy_j),
        "digital": digital_ops * dig.energy_per_op_j,
        "sram": rows.sum() * _activation_bytes(conv.dac_bits) * sram.read_energy_per_byte_j
        + work.cols * _activation_bytes(conv.adc_bits) * sram.write_energy_per_byte_j,
    }

    # Arrays work in parallel; tiles sharing an array take turns.
    per_array_s: dict[int, float] = {}
    for tile in tiles:
        per_array_s[tile.array_index] = per_array_s.get(tile.array_index, 0.0) + _tile_time_s(
            target, tile, pulse_s
        )
    units = len(per_array_s) if dig.per_array else 1
    digital_s = math.ceil(digital_ops / (dig.ops_per_cycle * units)) / target.clock_hz
    analog_s = max(per_array_s.values())
    mvm_s = max(analog_s, digital_s) if dig.overlapped else analog_s + digital_s
    latency_s = work.mvms * mvm_s
    energy = {c: float(v) * work.mvms for c, v in per_mvm_j.items()}
    return LayerCost(work.name, "analog", _cycles(latency_s, target), latency_s, energy, work.macs, work.mvms,
                     work.model_macs)


# --- digital layers and static power ----------------------------------------------------------------------


def _digital_layer(target: Target, work: DigitalOpWork) -> LayerCost:
    dig, sram = target.digital, target.sram
    nbytes = _activation_bytes(target.converters.adc_bits)
    inputs = work.elements if work.input_elements is None else work.input_elements
    cycles = math.ceil(work.ops / dig.ops_per_cycle)
    energy = {
        "digital": work.ops * dig.energy_per_op_j,
        "sram": inputs * nbytes * sram.read_energy_per_byte_j
        + work.elements * nbytes * sram.write_energy_per_byte_j,
    }
    return LayerCost(work.name, "digital", cycles, cycles / target.clock_hz, energy, model_macs=work.macs)


def _add_static(target: Target, layers: Sequence[LayerCost], latency_s: float, period_s: float) -> None:
    # Static power is paid for the time an inference holds the chip: its latency when layer-serial, one
    # pipeline period when pipelined (shared out over the stages in proportion to their time).
    if latency_s <= 0:
        return
    for layer in layers:
        layer.energy_j["static"] = target.static_power_w * period_s * layer.latency_s / latency_s


def _cycles(latency_s: float, target: Target) -> int:
    return math.ceil(latency_s * target.clock_hz - 1e-9)


def explain_measured(target: Target, static: CostReport, measured: CostReport,
                     activity: Mapping[str, LayerActivity]) -> str | None:
    """Why the cost counted on measured activity differs from the static estimate, in one sentence.

    The static estimate assumes the target's ``activity`` defaults for every analog layer; a run measures each
    layer's DAC inputs (share of non-zero inputs, mean and largest magnitude), which set the DAC and array
    energy and, for pulse-width inputs, the integration time. Names the components that moved most; None when
    the two agree to 0.1 %.
    """
    diff = {c: measured.energy_j[c] - static.energy_j[c] for c in ENERGY_COMPONENTS}
    total = static.total_energy_j
    if total <= 0 or abs(measured.total_energy_j - total) <= 1e-3 * total:
        return None
    moved = sorted((c for c in diff if abs(diff[c]) > 0.01 * total), key=lambda c: -abs(diff[c]))
    parts = ", ".join(f"{c} {static.energy_j[c] * 1e6:.3g} -> {measured.energy_j[c] * 1e6:.3g} uJ" for c in moved[:3])
    a = target.activity
    if activity:
        dens = [v.input_density for v in activity.values()]
        mag = [v.mean_input_magnitude for v in activity.values()]
        seen = (f"this data drives the DAC inputs {100 * min(dens):.0f}-{100 * max(dens):.0f} % non-zero with mean "
                f"|x| {100 * min(mag):.1f}-{100 * max(mag):.1f} % of full scale")
    else:
        seen = "this run measured no analog layer"
    return (f"compile assumed the target's input activity ({100 * a.input_density:.0f} % non-zero, mean |x| "
            f"{100 * a.mean_input_magnitude:.1f} % of full scale); {seen}" + (f": {parts}" if parts else ""))
