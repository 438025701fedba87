"""The cost model's view of a mapped graph: execution order and per-op work.

Shared by the ``schedule`` pass (which lays ops out in time), :class:`~cimc.artifact.CompiledModel` (which
re-derives the cost when a compiled folder is loaded) and the simulator (which re-counts the cost on measured
activity). It lives in ``runtime`` because ``runtime`` must not import ``passes``.

* :func:`execution_order` — topological order of the graph, ties broken by graph position (deterministic);
* :func:`build_workload` — one :class:`~cimc.runtime.cost.AnalogLayerWork` per analog *use* (node) with the
  tiles of the crossbar block it reads (several uses of one shared weight name the same ``layer`` and the
  same tiles), one :class:`~cimc.runtime.cost.DigitalOpWork` per other op;
* :func:`model_workload` — the same for a whole model, with the execution mode the ``map`` pass chose.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import networkx as nx
import onnx_ir as ir

from cimc.ir import is_analog, layer_of, node_attrs, placements_of, static_shape, to_networkx
from cimc.runtime.cost import AnalogLayerWork, DigitalOpWork, TileShape, Workload

__all__ = ["REPLICA_KEY", "activation_bytes", "build_workload", "digital_ops", "execution_order", "model_execution",
           "model_workload"]

logger = logging.getLogger(__name__)

REPLICA_KEY = "cimc.replica"  # node metadata of weight replication (cimc.passes.replicate): {"of", "index", "count"}
_MATRIX_OPS = {"MatMul", "Gemm", "Conv", "Einsum", "ConvTranspose"}  # their digital ops are 2 x MACs
_MOVES = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Concat", "Split", "Slice",
          "Gather", "Expand", "Tile", "Pad", "Cast", "Shape", "GatherElements", "GatherND", "DepthToSpace",
          "SpaceToDepth", "Trilu", "OneHot", "Size", "Range", "ConstantOfShape", "EyeLike", "CastLike"}
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
    if node.op_type == "Conv":  # a convolution kept digital: C_in/groups · kernel MACs per output
        w = static_shape(node.inputs[1]) if len(node.inputs) > 1 else None
        return 2 * out * math.prod(w[1:]) if w else 0
    if node.op_type in ("MatMul", "Gemm"):  # activation × activation products stay digital
        a = static_shape(node.inputs[0]) or (1,)
        trans_a = node.op_type == "Gemm" and node_attrs(node).get("transA", 0)
        k = a[0] if trans_a and len(a) == 2 else a[-1]
        return 2 * out * k
    if node.op_type == "Einsum":  # a multiply and an add for every point of the joint index space
        return 2 * _einsum_points(node)
    if node.op_type == "ConvTranspose":  # every input element times its C_out/g × kernel weights
        w = static_shape(node.inputs[1]) or (1, 1)
        return 2 * _numel(node.inputs[0]) * w[1] * math.prod(w[2:])
    if node.op_type == "Resize":  # interpolation taps per resized axis (nearest only moves data)
        mode = node_attrs(node).get("mode", "nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        return out * {"nearest": 0, "linear": 3, "cubic": 7}.get(mode, 1) * 2
    return out * _OPS_PER_ELEMENT.get(node.op_type, 1)


def _einsum_points(node: ir.Node) -> int:
    """Size of an Einsum's joint index space (M·N·K for a matrix product), from its equation and shapes."""
    equation = node_attrs(node).get("equation", "")
    equation = equation.decode() if isinstance(equation, bytes) else equation
    terms = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for term, value in zip(terms, node.inputs):
        shape = static_shape(value)
        if shape is None:
            return 0
        if "..." in term:  # the broadcast dimensions count once, as one joint index
            head, tail = term.split("...")
            n_ell = len(shape) - len(head) - len(tail)
            sizes["..."] = max(sizes.get("...", 1), math.prod(shape[len(head) : len(head) + n_ell]))
            term, shape = head + tail, shape[: len(head)] + shape[len(head) + n_ell :]
        for letter, dim in zip(term, shape):
            sizes[letter] = max(sizes.get(letter, 1), int(dim))
    return math.prod(sizes.values())


def build_workload(order: list[ir.Node], name: str = "", execution: str | None = None) -> Workload:
    """The cost model's view of the scheduled ops (analog uses with their block's placed tiles, digital ops).

    ``execution``: the execution mode to cost (None: the target's own).
    """
    layers: list[Any] = []
    for node in order:
        if is_analog(node) and "cimc.matrix" in node.metadata_props:
            m = json.loads(node.metadata_props["cimc.matrix"])
            tiles = tuple(TileShape(t["rows"], t["cols"], t["array"]) for t in placements_of(node))
            replica = json.loads(node.metadata_props.get(REPLICA_KEY) or "{}")
            layers.append(AnalogLayerWork(node.name, m["rows"], m["cols"] * m["groups"], m["mvms"], tiles,
                                          layer=layer_of(node), replicas=int(replica.get("count", 1))))
        else:
            ins = sum(_numel(v) for v in node.inputs if v is not None and not v.is_initializer())
            ops = digital_ops(node)
            macs = ops // 2 if node.op_type in _MATRIX_OPS else 0
            layers.append(DigitalOpWork(node.name, node.op_type, _numel(node.outputs[0]), ops, ins, macs))
    return Workload(tuple(layers), name=name, execution=execution)


def model_execution(model: ir.Model) -> str | None:
    """The execution mode the ``map`` pass chose for a compiled model (None when it did not record one)."""
    raw = model.metadata_props.get("cimc.mapping")
    return json.loads(raw).get("execution") if raw else None


def model_workload(model: ir.Model) -> Workload:
    """:func:`build_workload` of a mapped model in :func:`execution_order`, with its recorded execution mode."""
    return build_workload(execution_order(model.graph), name=model.graph.name or "", execution=model_execution(model))
