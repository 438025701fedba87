"""Map analog ops onto the target's crossbars: one crossbar block per weight tensor, placed once.

**Layers and uses.** Each analog op (Conv, Gemm, MatMul with a constant weight) is a *use* of a weight
tensor. The weight's crossbar view is one matrix per group — K rows (C_in/groups · kh · kw inputs) × N
columns (outputs per group). Uses of one weight tensor whose views are identical (same [groups, K, N]
values, Gemm ``alpha`` included) read one *layer*: a block placed, programmed and exported once — an unrolled
recurrent layer whose steps share one weight takes the crossbar space of one step. Uses of one tensor with
different views (``Gemm transB`` beside a ``MatMul``, a different ``alpha``) are placed separately, with a log
line saying so. A layer used once is named after its node; a shared one after its weight tensor.

**Packing** (:mod:`cimc.passes.packing`): blocks larger than an array are split into tiles (row splits give
partial sums the digital unit adds; column splits are free), then every tile gets an array and a
row/column window. The execution mode decides the policy:

* ``layer-serial``: all blocks packed densely over the arrays (MaxRects, first fit);
* ``pipelined`` (multi-core): every layer on cores of its own so that all stages compute at once; when that
  needs more cores than the target has, the lightest single-core layers are packed together onto shared cores
  (two at a time, the pair with the least work first) until it fits — layers on one core run in turn, which
  the schedule and cost model account for; if merging cannot make it fit, dense packing is the last resort;
* ``auto``: both placements are built and costed; pipelined is chosen when it fits and raises throughput by
  at least 5 %, else layer-serial. Both choices' latency and throughput are recorded.

A model larger than the target is a :class:`~cimc.errors.FitError` with the numbers and the ``--arrays N``
override (target field ``array.count``) that makes it fit.

Durable results (saved inside the compiled ONNX file):

* node ``metadata_props["cimc.layer"]`` — the layer (block) the node reads;
* node ``metadata_props["cimc.matrix"]`` — ``{"rows", "cols", "groups", "mvms"}`` (``mvms`` of this use);
* node ``metadata_props["cimc.placement"]`` — the layer's tiles ``{"group", "tile", "array", "row0", "col0",
  "rows", "cols", "src_row0", "src_col0"}`` in weight units (device columns = weight columns ×
  devices per weight; the G+ device of weight column c is device column 2c, G− is 2c+1); every use of a
  layer carries the same tiles;
* model ``metadata_props["cimc.mapping"]`` — arrays used, utilisation (used devices / available devices,
  each layer counted once), layers and uses, shared weights and cores, the execution mode and both choices.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx_ir as ir

from cimc.errors import FitError, InputError, UnsupportedOpError
from cimc.ir import DIGITAL_KEY, AnalogMatrix, analog_matrix, classify, constant_array, is_analog, node_attrs, weight_to_matrix
from cimc.ir import layer_of, placements_of, weight_value
from cimc.passes.packing import ArrayGeometry, Block, Packing, Placement, pack_blocks
from cimc.passes.replicate import REPLICA_KEY, replicate_layers
from cimc.pipeline import CimcPass, CompileContext, register_pass
from cimc.runtime.cost import AnalogLayerWork, TileShape, Workload, estimate_cost
from cimc.runtime.workload import build_workload, execution_order

__all__ = ["MapPass", "SharedLayer", "block_name", "layer_of", "placements_of", "shared_layers"]

logger = logging.getLogger(__name__)

_AUTO_MIN_GAIN = 1.05  # auto picks pipelined only for at least 5 % more throughput than layer-serial


def block_name(layer: str, group: int, groups: int) -> str:
    return layer if groups == 1 else f"{layer}#g{group}"


@dataclass
class SharedLayer:
    """One crossbar block: the weight tensor's crossbar view and every node that uses it."""

    name: str
    weight: str  # name of the weight tensor
    users: list[ir.Node]
    matrix: AnalogMatrix  # of the first user (rows, cols, groups are the same for every user)
    _blocks: list[Block] | None = field(default=None, repr=False, compare=False)

    def blocks(self) -> list[Block]:
        """One block per group, named ``<layer>`` or ``<layer>#g<i>``."""
        if self._blocks is None:
            m = self.matrix
            self._blocks = [Block(block_name(self.name, g, m.groups), m.rows, m.cols) for g in range(m.groups)]
        return self._blocks

    @property
    def weights(self) -> int:
        return self.matrix.weights


def _crossbar_view(node: ir.Node) -> np.ndarray:
    """The matrices the crossbar holds for this use: [groups, K, N], Gemm's alpha applied."""
    w = np.asarray(constant_array(weight_value(node)))
    view = weight_to_matrix(node, w)
    alpha = float(node_attrs(node).get("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
    return view * alpha if alpha != 1.0 else view


def shared_layers(nodes: list[ir.Node]) -> list[SharedLayer]:
    """Group analog nodes into crossbar blocks: one per (weight tensor, identical crossbar view), in node order."""
    node_names = {n.name for n in nodes}
    by_value: dict[int, list[ir.Node]] = {}
    values: dict[int, ir.Value] = {}
    for node in nodes:
        v = weight_value(node)
        by_value.setdefault(id(v), []).append(node)
        values[id(v)] = v
    layers: list[SharedLayer] = []
    for key, users in by_value.items():
        value = values[key]
        views: list[tuple[np.ndarray, list[ir.Node]]] = []
        for node in users:
            view = _crossbar_view(node) if len(users) > 1 else None
            for seen, group in views:
                if view is not None and seen.shape == view.shape and np.array_equal(seen, view):
                    group.append(node)
                    break
            else:
                views.append((view, [node]))  # type: ignore[arg-type]
        if len(views) > 1:
            logger.info(
                "weight %s is used by %d nodes with %d different crossbar matrices (orientation or alpha differ): "
                "placed %d times", value.name, len(users), len(views), len(views))
        first_shared = True
        for _, group in views:
            if len(group) == 1:
                name = group[0].name
            else:
                name = value.name or group[0].name
                if not first_shared or (name in node_names and name not in {n.name for n in group}):
                    name = f"{name}@{group[0].name}"
                first_shared = False
                logger.info("weight %s: one crossbar block for %d uses (%s)", value.name, len(group),
                            ", ".join(n.name for n in group[:4]) + (", ..." if len(group) > 4 else ""))
            layers.append(SharedLayer(name, value.name or "", group, analog_matrix(group[0])))
    position = {n.name: i for i, n in enumerate(nodes)}
    layers.sort(key=lambda layer: position[layer.users[0].name])
    return layers


# --- placement policies -----------------------------------------------------------------------------------


@dataclass
class _CoreGroup:
    """Layers that share a set of cores in a pipelined placement."""

    layers: list[SharedLayer]
    packing: Packing  # on cores 0 .. cores-1 of its own
    load_s: float  # analog time per inference of every use of these layers

    @property
    def cores(self) -> int:
        return self.packing.arrays_used


def _layer_load_s(target: Any, layer: SharedLayer, packing: Packing) -> float:
    """Time per inference the layer's uses keep its cores busy (cost model, target's activity defaults)."""
    blocks = {b.name for b in layer.blocks()}
    tiles = tuple(TileShape(p.rows, p.cols, p.array_index) for p in packing.placements if p.block in blocks)
    m = layer.matrix
    works = tuple(
        AnalogLayerWork(u.name, m.rows, m.cols * m.groups, analog_matrix(u).mvms, tiles, layer.name) for u in layer.users
    )
    return estimate_cost(target, Workload(works, execution="layer-serial")).latency_s


def _pack_pipelined(layers: list[SharedLayer], geometry: ArrayGeometry, target: Any) -> Packing:
    """Every layer on cores of its own; if that needs too many cores, share cores between small layers."""
    unbounded = ArrayGeometry(geometry.rows, geometry.weight_cols, None)
    everything = [b for layer in layers for b in layer.blocks()]
    if geometry.count is not None and sum(b.weights for b in everything) > geometry.count * geometry.weights_per_array:
        return pack_blocks(everything, geometry)  # raises the FitError with the numbers
    groups = []
    for layer in layers:
        own = pack_blocks(layer.blocks(), unbounded)
        groups.append(_CoreGroup([layer], own, _layer_load_s(target, layer, own)))
    needed = sum(g.cores for g in groups)
    if geometry.count is not None and needed > geometry.count:
        logger.info("one layer per core needs %d cores, the target has %d: packing small layers onto shared cores",
                    needed, geometry.count)
        groups = _merge_small(groups, geometry, needed - geometry.count)
        if sum(g.cores for g in groups) > geometry.count:
            logger.info("sharing whole cores is not enough: packing all layers densely over %d cores", geometry.count)
            return pack_blocks([b for layer in layers for b in layer.blocks()], geometry)
    placements: list[Placement] = []
    utilisation: list[float] = []
    next_core = 0
    for g in groups:
        placements += [replace(p, array_index=p.array_index + next_core) for p in g.packing.placements]
        utilisation += list(g.packing.array_utilisation)
        next_core += g.cores
    if geometry.count is not None:
        utilisation += [0.0] * (geometry.count - next_core)
    order = {b.name: i for i, b in enumerate(b for layer in layers for b in layer.blocks())}
    placements.sort(key=lambda p: (order[p.block], p.tile_index))
    return Packing(placements, geometry, next_core, utilisation)


def _merge_small(groups: list[_CoreGroup], geometry: ArrayGeometry, excess: int) -> list[_CoreGroup]:
    """Merge single-core groups, lightest pair that fits one core first, until ``excess`` cores are freed."""
    one = ArrayGeometry(geometry.rows, geometry.weight_cols, 1)
    per_core = geometry.weights_per_array
    while excess > 0:
        singles = sorted((g for g in groups if g.cores == 1), key=lambda g: g.load_s)
        merged = None
        for i, a in enumerate(singles):
            used_a = a.packing.weights_placed
            for b in singles[i + 1 :]:
                if used_a + b.packing.weights_placed > per_core:
                    continue
                try:
                    packing = pack_blocks([blk for layer in a.layers + b.layers for blk in layer.blocks()], one)
                except FitError:
                    continue
                merged = (a, b, _CoreGroup(a.layers + b.layers, packing, a.load_s + b.load_s))
                break
            if merged is not None:
                break
        if merged is None:
            break
        a, b, new = merged
        at = min(groups.index(a), groups.index(b))
        groups = [g for g in groups if g is not a and g is not b]
        groups.insert(at, new)
        excess -= 1
    return groups


def _min_arrays(blocks: list[Block], geometry: ArrayGeometry) -> int:
    """Arrays of this geometry the blocks need when packed densely (what ``--arrays`` should at least be)."""
    return pack_blocks(blocks, ArrayGeometry(geometry.rows, geometry.weight_cols, None)).arrays_used


def _replica_fit_error(layers: list[SharedLayer], geometry: ArrayGeometry, replicated: dict[str, int]) -> FitError | None:
    """The replicas do not fit: say how many weights they add and what the chip has, in one line (None when the
    model would not fit without them either: then the ordinary refusal applies)."""
    of = {layer.name: json.loads(layer.users[0].metadata_props.get(REPLICA_KEY, "{}")).get("of") for layer in layers}
    total = sum(layer.weights for layer in layers)
    extra = {name: sum(layer.weights for layer in layers if of[layer.name] == name) * (r - 1) // r
             for name, r in replicated.items()}
    available = (geometry.count or 0) * geometry.weights_per_array
    if total - sum(extra.values()) > available and geometry.count is not None:
        return None
    asked = ", ".join(f"{name}={r}" for name, r in replicated.items())
    added = ", ".join(f"{name} +{extra[name]:,}" for name in replicated)
    return FitError(
        f"--replicate {asked} does not fit: the replicas add {added} weights, {total:,} in all, and the target "
        f"has {available:,} ({geometry.count} array(s) of {geometry.rows}x{geometry.weight_cols} weights; "
        f"{total - sum(extra.values()):,} without replication); use a smaller replica count or --arrays N"
    )


def _fit_hint(layers: list[SharedLayer], geometry: ArrayGeometry, target: Any, exc: FitError) -> FitError:
    """The packer's refusal, plus the override that makes the model fit a larger chip of the same kind."""
    n = _min_arrays([b for layer in layers for b in layer.blocks()], geometry)
    kind = "cores" if (geometry.count or 0) > 1 else "arrays"
    own = ""
    if (geometry.count or 0) > 1:
        unbounded = ArrayGeometry(geometry.rows, geometry.weight_cols, None)
        per_layer = sum(pack_blocks(layer.blocks(), unbounded).arrays_used for layer in layers)
        own = f" ({per_layer} for every layer on cores of its own, fully pipelined)"
    return FitError(
        f"{exc}; it fits {n} {kind} of this size{own}: compile with --arrays {n} (API arrays={n}) or set "
        f"'array: {{count: {n}}}' in a target YAML (field array.count) to see it on a larger {target.name}, "
        "or reduce the channels of the largest layers"
    )


# --- the pass ---------------------------------------------------------------------------------------------


def _write(layers: list[SharedLayer], packing: Packing) -> None:
    """Record each use's layer, matrix and its layer's tiles in the node metadata."""
    by_block: dict[str, list[Placement]] = {}  # one pass over the placements (depthwise layers have many blocks)
    for p in packing.placements:
        by_block.setdefault(p.block, []).append(p)
    for layer in layers:
        m = layer.matrix
        tiles = []
        for g in range(m.groups):
            for p in by_block.get(block_name(layer.name, g, m.groups), []):
                tiles.append(
                    {"group": g, "tile": p.tile_index, "array": p.array_index, "row0": p.row0, "col0": p.col0,
                     "rows": p.rows, "cols": p.cols, "src_row0": p.src_row0, "src_col0": p.src_col0}
                )
        placement = json.dumps(tiles)
        for user in layer.users:
            mu = analog_matrix(user)
            user.metadata_props["cimc.layer"] = layer.name
            user.metadata_props["cimc.matrix"] = json.dumps(
                {"rows": mu.rows, "cols": mu.cols, "groups": mu.groups, "mvms": mu.mvms}
            )
            user.metadata_props["cimc.placement"] = placement


def mark_digital(model: ir.Model, names: tuple[str, ...] | list[str]) -> None:
    """Keep the named analog layers off the crossbar: they run in float on the digital unit (and are costed
    there). Names are the compiled model's layer names (as ``cimc inspect``/``diagnose`` show them)."""
    if not names:
        return
    by_name = {n.name: n for n in model.graph}
    analog = [n.name for n in model.graph if is_analog(n)]
    unknown = [name for name in names if name not in by_name]
    if unknown:
        shown = ", ".join(analog[:12]) + (" ..." if len(analog) > 12 else "")
        raise InputError(f"--digital {', '.join(unknown)}: no such layer; analog layers are: {shown}")
    not_analog = [name for name in names if name not in analog and not by_name[name].metadata_props.get(DIGITAL_KEY)]
    if not_analog:
        raise InputError(f"--digital {', '.join(not_analog)}: not an analog layer (it already runs digitally)")
    for name in names:
        by_name[name].metadata_props[DIGITAL_KEY] = "1"
    model.metadata_props[DIGITAL_KEY] = json.dumps(sorted(set(names)))
    logger.info("kept digital: %s", ", ".join(names))


@register_pass("map")
@dataclass
class MapPass(CimcPass):
    """Assign every weight tensor's crossbar block to array windows (see the module docstring)."""

    ctx: CompileContext = field(repr=False)

    def requires(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type == "BatchNormalization" and any(
                p is not None and p.producer() is not None and is_analog(p.producer()) for p in node.inputs[:1]
            ):
                logger.info("BatchNormalization %s after an analog op was not folded", node.name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        unsupported = [(c.name, c.op_type, c.reason) for c in classify(model) if c.kind == "unsupported"]
        if unsupported:  # every offending node at once, before any work
            raise UnsupportedOpError(unsupported)
        mark_digital(model, self.ctx.digital)
        replicated = replicate_layers(model, self.ctx.replicate)
        target = self.ctx.target
        geometry = ArrayGeometry.from_target(target)
        nodes = [n for n in model.graph if is_analog(n)]
        layers = shared_layers(nodes)
        blocks = [b for layer in layers for b in layer.blocks()]
        multi_core = geometry.count != 1
        wanted = target.execution
        candidates: dict[str, Packing] = {}
        failures: dict[str, FitError] = {}
        if (geometry.count or 0) > 1 or (multi_core and wanted == "auto"):
            modes = ["layer-serial", "pipelined"]  # cost both, so the report can compare them
        elif multi_core:
            modes = [wanted]  # unbounded arrays (ideal): only what was asked for
        else:
            modes = ["layer-serial"]
        for mode in modes:
            try:
                candidates[mode] = (
                    _pack_pipelined(layers, geometry, target) if mode == "pipelined" else pack_blocks(blocks, geometry)
                )
            except FitError as exc:
                failures[mode] = exc
        if not candidates:
            refusal = _replica_fit_error(layers, geometry, replicated) if replicated else None
            raise refusal or _fit_hint(layers, geometry, target, next(iter(failures.values())))
        order = execution_order(model.graph)
        choices: dict[str, dict[str, Any]] = {}
        for mode, packing in candidates.items():
            _write(layers, packing)
            cost = estimate_cost(target, build_workload(order, execution=mode))
            choices[mode] = {"arrays_used": packing.arrays_used, "utilization": packing.utilisation,
                             "latency_s": cost.latency_s, "period_s": cost.period_s,
                             "inferences_per_s": cost.inferences_per_s,
                             "shared_cores": _shared_cores(layers, packing) if mode == "pipelined" else {}}
        if wanted == "auto":
            serial, piped = choices.get("layer-serial"), choices.get("pipelined")
            if piped is not None and (serial is None or piped["inferences_per_s"] >= _AUTO_MIN_GAIN * serial["inferences_per_s"]):
                execution = "pipelined"
            else:
                execution = "layer-serial"
        elif wanted == "pipelined" and not multi_core:
            execution = "layer-serial"  # one array: layers take turns whatever the file says
        else:
            execution = wanted
        if execution not in candidates:
            refusal = _replica_fit_error(layers, geometry, replicated) if replicated else None
            raise refusal or _fit_hint(layers, geometry, target, failures[execution])
        packing = candidates[execution]
        _write(layers, packing)
        shared = {layer.name: [u.name for u in layer.users] for layer in layers if len(layer.users) > 1}
        summary = {
            "target": target.name,
            "arrays_used": packing.arrays_used,
            "arrays_available": geometry.count,
            "array_rows": geometry.rows,
            "array_weight_cols": geometry.weight_cols,
            "devices_per_weight": target.array.devices_per_weight,
            "weights_placed": packing.weights_placed,
            "utilization": packing.utilisation,
            "array_utilization": list(packing.array_utilisation),
            "layers": len(layers),
            "analog_nodes": len(nodes),
            "shared_weights": shared,
            "replication": replicated,
            "execution": execution,
            "execution_requested": wanted,
            "shared_cores": choices.get(execution, {}).get("shared_cores", {}),
            "choices": choices,
        }
        model.metadata_props["cimc.mapping"] = json.dumps(summary)
        self.ctx.results["packing"] = packing
        self.ctx.results["layers"] = layers
        logger.info("mapped %d analog ops (%d crossbar blocks) onto %d array(s), %s, utilisation %.1f %%", len(nodes),
                    len(layers), packing.arrays_used, execution, 100 * packing.utilisation)
        return ir.passes.PassResult(model, True)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if is_analog(node) and not placements_of(node):
                raise ir.passes.PostconditionError(f"analog op {node.name!r} has no placement")


def _shared_cores(layers: list[SharedLayer], packing: Packing) -> dict[str, list[str]]:
    """Cores holding tiles of more than one layer (core index as a string -> layer names)."""
    owner = {b.name: layer.name for layer in layers for b in layer.blocks()}
    on_core: dict[int, list[str]] = {}
    for p in packing.placements:
        names = on_core.setdefault(p.array_index, [])
        if owner[p.block] not in names:
            names.append(owner[p.block])
    return {str(k): v for k, v in sorted(on_core.items()) if len(v) > 1}
