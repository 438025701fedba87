"""The IR: onnx-ir's model, plus cimc's views of it.

cimc does not define a graph class of its own: a model is an :class:`onnx_ir.Model`. This module adds what
the compiler needs to ask of it:

* :func:`node_attrs` — a node's attributes as plain Python values;
* :func:`constant_array` — the constant value of a tensor (initializer or folded), if it has one;
* :func:`classify` — for every node: ``analog`` (Conv, Gemm, MatMul with a constant operand), ``digital``
  (any other op the executor implements) or ``unsupported``, with the reason;
* :class:`AnalogMatrix` — the matrix view of an analog op: a weight matrix of ``rows`` (K = C_in·kh·kw per
  group) × ``cols`` (N = outputs per group), ``groups`` of them, and ``mvms`` matrix-vector products per
  inference;
* :func:`to_networkx` — the data-dependency graph for the analyses that are graph algorithms.

Durable annotations live in ``metadata_props`` under keys prefixed ``cimc.`` (so they survive ONNX
serialisation); scratch analysis lives in ``node.meta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
import onnx_ir as ir

from cimc.ops import OPS

__all__ = [
    "ANALOG_OPS",
    "AnalogMatrix",
    "NodeClass",
    "analog_matrix",
    "classify",
    "constant_array",
    "is_analog",
    "name_nodes",
    "node_attrs",
    "static_shape",
    "to_networkx",
    "weight_to_matrix",
]

ANALOG_OPS = ("Conv", "Gemm", "MatMul")


def node_attrs(node: ir.Node) -> dict[str, Any]:
    """The node's attributes as plain Python values (ints, floats, strings, lists, numpy arrays)."""
    out: dict[str, Any] = {}
    for name, attr in node.attributes.items():
        value = attr.value
        if isinstance(value, ir.TensorProtocol):
            value = value.numpy()
        elif isinstance(value, (list, tuple)):
            value = list(value)
        out[name] = value
    return out


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (an initializer or a folded constant), or None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape if every dimension is a known integer, else None."""
    if value is None or value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if not isinstance(d, int):
            return None
        dims.append(d)
    return tuple(dims)


def _matmul_weight_index(node: ir.Node) -> int | None:
    """Index of MatMul's constant 2-D operand (1 = right, as in x @ W), or None."""
    for idx in (1, 0):
        arr = constant_array(node.inputs[idx])
        if arr is not None and arr.ndim == 2:
            other = node.inputs[1 - idx]
            if constant_array(other) is None:
                return idx
    return None


def is_analog(node: ir.Node) -> bool:
    """True when the node's weights can live on a crossbar: a constant weight, float data."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ANALOG_OPS:
        return False
    if node.op_type == "MatMul":
        return _matmul_weight_index(node) is not None
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    return constant_array(weight) is not None


@dataclass(frozen=True)
class NodeClass:
    """Where a node runs: 'analog', 'digital' or 'unsupported' (with why)."""

    name: str
    op_type: str
    kind: str
    reason: str


def classify(model: ir.Model) -> list[NodeClass]:
    """Classify every node of the main graph, in graph order."""
    out = []
    for node in model.graph:
        name = node.name or f"<{node.op_type}>"
        if is_analog(node):
            out.append(NodeClass(name, node.op_type, "analog", "constant weight maps onto the crossbar"))
        elif node.domain not in ("", "ai.onnx"):
            out.append(NodeClass(name, node.op_type, "unsupported", f"custom domain {node.domain!r}"))
        elif node.op_type in OPS:
            why = (
                "both operands are activations (no constant weight to program)"
                if node.op_type in ANALOG_OPS
                else "runs on the digital unit"
            )
            out.append(NodeClass(name, node.op_type, "digital", why))
        else:
            out.append(NodeClass(name, node.op_type, "unsupported", "no implementation in cimc's digital unit"))
    return out


@dataclass(frozen=True)
class AnalogMatrix:
    """The crossbar view of an analog op.

    Each group is a weight matrix of ``rows`` × ``cols`` (inputs × outputs) on the array; one inference
    performs ``mvms`` matrix-vector products on each group (output positions × batch of 1).
    ``weight_perm`` says how to get the [groups, rows, cols] matrix from the ONNX weight tensor (see
    :func:`weight_to_matrix`).
    """

    node: str
    op_type: str
    rows: int
    cols: int
    groups: int
    mvms: int
    weight_input: int  # which input of the node holds the weight

    @property
    def weights(self) -> int:
        return self.rows * self.cols * self.groups

    @property
    def macs(self) -> int:
        return self.weights * self.mvms


def analog_matrix(node: ir.Node, batch: int | None = None) -> AnalogMatrix:
    """Matrix view of an analog node (shapes must be known); ``mvms`` counts one inference of one sample.

    ``batch`` is the batch size the shapes were fixed with (default: the one recorded at import).
    """
    if batch is None:  # Gemm/MatMul shapes include the batch; Conv positions do not
        batch = int(node.graph.meta.get("cimc.batch", 1)) if node.graph is not None else 1
    a = node_attrs(node)
    name = node.name or node.op_type
    if node.op_type == "Conv":
        w = node.inputs[1].const_value.shape  # [C_out, C_in/g, *kernel]
        groups = int(a.get("group", 1))
        out_shape = static_shape(node.outputs[0])
        positions = math.prod(out_shape[2:]) if out_shape else 1
        rows = int(w[1] * math.prod(w[2:]))
        return AnalogMatrix(name, "Conv", rows, int(w[0]) // groups, groups, positions, 1)
    if node.op_type == "Gemm":
        w = node.inputs[1].const_value.shape
        k, n = (w[1], w[0]) if a.get("transB", 0) else (w[0], w[1])
        x_shape = static_shape(node.inputs[0])
        m = (x_shape[1] if a.get("transA", 0) else x_shape[0]) if x_shape else batch
        return AnalogMatrix(name, "Gemm", int(k), int(n), 1, int(m) // max(batch, 1) or 1, 1)
    idx = _matmul_weight_index(node)
    w = node.inputs[idx].const_value.shape
    out_shape = static_shape(node.outputs[0]) or (1, w[1])
    if idx == 1:  # x @ W: W is K×N, one MVM per row of x
        k, n = w
        m = math.prod(out_shape[:-1])
    else:  # W @ x: W is M×K; each column of x is an MVM, outputs are W's rows
        n, k = w
        m = math.prod(out_shape[:-2]) * out_shape[-1]
    return AnalogMatrix(name, "MatMul", int(k), int(n), 1, max(1, int(m) // max(batch, 1)), idx)


def weight_to_matrix(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The ONNX weight tensor of an analog node as [groups, rows K, cols N] (input index × output index)."""
    a = node_attrs(node)
    if node.op_type == "Conv":
        groups = int(a.get("group", 1))
        c_out = weight.shape[0]
        per_group = weight.reshape(groups, c_out // groups, -1)  # [g, N, K]
        return np.ascontiguousarray(per_group.transpose(0, 2, 1))
    if node.op_type == "Gemm":
        mat = weight.T if a.get("transB", 0) else weight
        return np.ascontiguousarray(mat)[None]
    idx = _matmul_weight_index(node)
    mat = weight if idx == 1 else weight.T
    return np.ascontiguousarray(mat)[None]


def name_nodes(model: ir.Model) -> int:
    """Give every node of the model (subgraphs included) a unique, non-empty name; returns how many changed.

    Legal ONNX allows empty and repeated node names (onnx's own model zoo has them), but the compiled model
    keys its durable metadata (placement, schedule, export) by node name. Unnamed nodes become
    ``<op_type>_<position>``; a repeated name gets ``_<k>`` appended. Deterministic: graph order decides.
    """
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    taken = {n.name for n in nodes if n.name}
    seen: set[str] = set()
    changed = 0
    for position, node in enumerate(nodes):
        name = node.name
        if name and name not in seen:
            seen.add(name)
            continue
        base = name or f"{node.op_type}_{position}"
        candidate, k = base, 1
        while candidate in seen or (candidate != name and candidate in taken):
            candidate = f"{base}_{k}"
            k += 1
        node.name = candidate
        seen.add(candidate)
        taken.add(candidate)
        changed += 1
    return changed


def to_networkx(graph: ir.Graph) -> nx.DiGraph:
    """Data-dependency graph: one vertex per node (keyed by node name, unique after :func:`name_nodes`),
    an edge per producer→consumer, including values a node's subgraphs read from this graph."""
    g = nx.DiGraph()
    names = set()
    for node in graph:
        if node.name in names:
            raise ValueError(f"two nodes are named {node.name!r}; run cimc.ir.name_nodes first")
        names.add(node.name)
        g.add_node(node.name, op_type=node.op_type)
    for node in graph:
        for out in node.outputs:
            for user, _ in out.uses():
                if user.graph is graph and user is not node:
                    g.add_edge(node.name, user.name, tensor=out.name)
        # Values of this graph read inside the node's subgraphs (If/Loop branches) are dependencies too.
        for attr in node.attributes.values():
            if attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                continue
            subgraphs = attr.value if attr.type == ir.AttributeType.GRAPHS else [attr.value]
            for sub in subgraphs:
                for inner in ir.traversal.RecursiveGraphIterator(sub):
                    for v in inner.inputs:
                        producer = v.producer() if v is not None else None
                        if producer is not None and producer.graph is graph and producer is not node:
                            g.add_edge(producer.name, node.name, tensor=v.name)
    return g
