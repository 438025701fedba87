"""Order the ops, size the activation SRAM, and lay the ops out in time with the cost model.

1. A networkx dependency graph of the ops; the execution order is its topological order, ties broken by the
   graph's own order (deterministic).
2. ``layer-serial`` (AON-CIM): ops run one after another; each analog layer performs its MVMs on the array
   with only its own rows and columns active; digital ops run on the digital unit. ``pipelined`` (multi-core):
   each analog layer is a stage on its own cores; the digital ops that follow it belong to its stage.
3. Buffer liveness: a tensor lives from the step that produces it to the last step that reads it; the peak of
   live bytes (activations at the converters' precision) is the SRAM needed. More than the target's SRAM is a
   :class:`~cimc.errors.FitError` with the numbers.
4. The cost model (:mod:`cimc.runtime.cost`) gives each op's cycles; the schedule records each op's cycle
   window.

Durable results: node ``metadata_props["cimc.schedule"]`` = ``{"step", "unit", "stage", "start_cycle",
"end_cycle"}``; model ``metadata_props["cimc.schedule"]`` = order, SRAM peak, execution mode; the cost report
goes to ``ctx.results["cost"]``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import onnx_ir as ir

from cimc.errors import FitError
from cimc.ir import is_analog, node_attrs, static_shape, to_networkx
from cimc.passes.mapping import placements_of
from cimc.pipeline import CimcPass, CompileContext, register_pass
from cimc.runtime.cost import AnalogLayerWork, DigitalOpWork, TileShape, Workload, estimate_cost

__all__ = ["SchedulePass", "build_workload", "execution_order", "activation_bytes", "digital_ops"]

logger = logging.getLogger(__name__)

_MOVES = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Concat", "Split", "Slice",
          "Gather", "Expand", "Tile", "Pad", "Cast", "Shape"}
_OPS_PER_ELEMENT = {"Softmax": 4, "LogSoftmax": 5, "BatchNormalization": 2, "LRN": 6, "Sigmoid": 4, "Tanh": 4,
                    "HardSwish": 3, "HardSigmoid": 2, "LayerNormalization": 5, "InstanceNormalization": 5}


def execution_order(graph: ir.Graph) -> list[ir.Node]:
    """Topological order of the graph's nodes, ties broken by their position in the graph."""
    nodes = list(graph)
    position = {n.name: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    dep = to_networkx(graph)
    return [by_name[name] for name in nx.lexicographical_topological_sort(dep, key=lambda n: position[n])]


def activation_bytes(target: Any) -> int:
    """Bytes per stored activation: the wider of the converters, rounded up to bytes (float32 when ideal)."""
    bits = [b for b in (target.converters.dac_bits, target.converters.adc_bits) if b]
    return math.ceil(max(bits) / 8) if bits else 4


def _numel(value: ir.Value | None) -> int:
    shape = static_shape(value)
    return math.prod(shape) if shape is not None else 0


def digital_ops(node: ir.Node) -> int:
    """Arithmetic ops the digital unit spends on a node (data movement counts zero)."""
    out = _numel(node.outputs[0]) if node.outputs else 0
    if node.op_type in _MOVES:
        return 0
    if node.op_type in ("MaxPool", "AveragePool"):
        return out * math.prod(node_attrs(node).get("kernel_shape", [1]))
    if node.op_type in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax"):
        return _numel(node.inputs[0])
    if node.op_type == "Conv":  # a convolution kept digital: K = C_in/groups · kernel products per output
        w = static_shape(node.inputs[1]) if len(node.inputs) > 1 else None
        k = math.prod(w[1:]) if w else 1
        return 2 * out * k
    if node.op_type in ("MatMul", "Gemm"):  # activation × activation products, or a layer kept digital
        x = static_shape(node.inputs[0]) or (1,)
        k = x[0] if node.op_type == "Gemm" and node_attrs(node).get("transA", 0) else x[-1]
        return 2 * out * k
    return out * _OPS_PER_ELEMENT.get(node.op_type, 1)


def build_workload(order: list[ir.Node], name: str = "") -> Workload:
    """The cost model's view of the scheduled ops (analog layers with their placed tiles, digital ops)."""
    layers: list[Any] = []
    for node in order:
        if is_analog(node):
            m = json.loads(node.metadata_props["cimc.matrix"])
            tiles = tuple(TileShape(t["rows"], t["cols"], t["array"]) for t in placements_of(node))
            layers.append(AnalogLayerWork(node.name, m["rows"], m["cols"] * m["groups"], m["mvms"], tiles))
        else:
            ins = sum(_numel(v) for v in node.inputs if v is not None and not v.is_initializer())
            layers.append(DigitalOpWork(node.name, node.op_type, _numel(node.outputs[0]), digital_ops(node), ins))
    return Workload(tuple(layers), name=name)


def _sram_peak_bytes(graph: ir.Graph, order: list[ir.Node], bytes_per_value: int) -> tuple[int, int]:
    """(peak live bytes, step at which it occurs) over the execution order."""
    step_of = {n.name: i for i, n in enumerate(order)}
    last = len(order)
    intervals: list[tuple[int, int, int]] = []
    for v in graph.inputs:
        users = [step_of[u.name] for u, _ in v.uses() if u.name in step_of]
        intervals.append((0, max(users, default=0), _numel(v) * bytes_per_value))
    for node in order:
        for v in node.outputs:
            users = [step_of[u.name] for u, _ in v.uses() if u.name in step_of]
            end = last if v.is_graph_output() else max(users, default=step_of[node.name])
            intervals.append((step_of[node.name], end, _numel(v) * bytes_per_value))
    live = [0] * (last + 1)
    for start, end, size in intervals:
        for s in range(start, end + 1):
            live[s] += size
    peak = max(live)
    return peak, live.index(peak)


@register_pass("schedule")
@dataclass
class SchedulePass(CimcPass):
    """Order ops, check the SRAM, and lay them out in time (see the module docstring)."""

    ctx: CompileContext = field(repr=False)

    def requires(self, model: ir.Model) -> None:
        for node in model.graph:
            if is_analog(node) and not placements_of(node):
                raise ir.passes.PreconditionError(f"analog op {node.name!r} is not mapped: run 'map' before 'schedule'")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        target = self.ctx.target
        graph = model.graph
        order = execution_order(graph)
        per_value = activation_bytes(target)
        peak, at_step = _sram_peak_bytes(graph, order, per_value)
        sram = target.sram.size_bytes
        if sram is not None and peak > sram:
            raise FitError(
                f"activations need {peak:,} bytes of SRAM at step {at_step} ({order[min(at_step, len(order) - 1)].name}) "
                f"but target '{target.name}' has {sram:,}; use a smaller input or fewer channels, or a target with more SRAM"
            )
        cost = estimate_cost(target, build_workload(order, name=graph.name or ""))
        stage = -1
        cycle = 0
        for step, (node, layer) in enumerate(zip(order, cost.layers)):
            analog = is_analog(node)
            if analog:
                stage += 1
            window = {
                "step": step,
                "unit": "array" if analog else "digital",
                "stage": max(stage, 0),
                "start_cycle": cycle,
                "end_cycle": cycle + layer.cycles,
            }
            node.metadata_props["cimc.schedule"] = json.dumps(window)
            cycle += layer.cycles
        model.metadata_props["cimc.schedule"] = json.dumps(
            {"execution": target.execution, "order": [n.name for n in order], "sram_peak_bytes": peak,
             "sram_bytes": sram, "bytes_per_activation": per_value, "cycles": cycle}
        )
        self.ctx.results["cost"] = cost
        self.ctx.results["order"] = order
        return ir.passes.PassResult(model, True)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if "cimc.schedule" not in node.metadata_props:
                raise ir.passes.PostconditionError(f"op {node.name!r} has no schedule slot")
