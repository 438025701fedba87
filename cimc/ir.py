"""The IR: onnx-ir's model, plus cimc's views of it.

cimc does not define a graph class of its own: a model is an :class:`onnx_ir.Model`. This module adds what
the compiler needs to ask of it:

* :func:`node_attrs` — a node's attributes as plain Python values;
* :func:`constant_array` — the constant value of a tensor (initializer or folded), if it has one;
* :func:`classify` — for every node: ``analog`` (Conv, Gemm, MatMul with a constant operand), ``digital``
  (any other op the executor implements) or ``unsupported``, with the reason;
* :func:`recurrent_refusal` — why a recurrent layer (``LSTM``/``GRU``/``RNN``) cannot be expanded into
  primitive ops by canonicalisation (:mod:`cimc.passes.recurrent`), or None when it can;
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
    "DIGITAL_KEY",
    "AnalogMatrix",
    "RECURRENT_ACTIVATIONS",
    "RECURRENT_OPS",
    "NodeClass",
    "analog_matrix",
    "classify",
    "constant_array",
    "is_analog",
    "graph_inputs_upstream",
    "layer_of",
    "name_nodes",
    "node_attrs",
    "placements_of",
    "recurrent_refusal",
    "static_shape",
    "to_networkx",
    "weight_to_matrix",
    "weight_value",
]

ANALOG_OPS = ("Conv", "Gemm", "MatMul")
# Recurrent layers: canonicalisation expands them into MatMuls (analog) and element-wise gates (digital).
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
# Activation functions the ONNX recurrent ops name (spec spelling), all expressible with primitive ops.
RECURRENT_ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh",
                         "HardSigmoid", "Elu", "Softsign", "Softplus")
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_ACTIVATIONS_PER_DIRECTION = {"LSTM": 3, "GRU": 2, "RNN": 1}


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


DIGITAL_KEY = "cimc.digital"


def is_analog(node: ir.Node) -> bool:
    """True when the node's weights live on a crossbar: a constant weight, float data, and not kept digital
    by the user (``--digital NAME``: metadata ``cimc.digital``)."""
    if node.metadata_props.get(DIGITAL_KEY):
        return False
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


def recurrent_refusal(node: ir.Node) -> str | None:
    """Why canonicalisation cannot expand this ``LSTM``/``GRU``/``RNN`` node into primitive ops (None: it can).

    Expandable: static input shape; constant ``W``, ``R`` (and ``B``, ``P`` when given); ``sequence_lens``
    absent or a constant equal to the full sequence length for every batch entry; known ``direction`` and
    ``layout``; every activation one of :data:`RECURRENT_ACTIVATIONS`, one list entry per gate function and
    direction.
    """
    a = node_attrs(node)
    op = node.op_type
    direction = a.get("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        return f"direction {direction!r} is not forward, reverse or bidirectional"
    layout = int(a.get("layout", 0))
    if layout not in (0, 1):
        return f"layout {layout} is not 0 or 1"
    ins = list(node.inputs) + [None] * (8 - len(node.inputs))
    names = ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P")
    for idx in (1, 2, 3, 7):
        if ins[idx] is not None and constant_array(ins[idx]) is None:
            return f"input {names[idx]} is not a constant (weights must be initializers to be programmed)"
    x_shape = static_shape(ins[0])
    if x_shape is None or len(x_shape) != 3:
        return "input X has no static [seq, batch, input] shape; fix the input shapes at import"
    seq = x_shape[1] if layout == 1 else x_shape[0]
    if ins[4] is not None:
        lens = constant_array(ins[4])
        if lens is None:
            return ("sequence_lens is not a constant: variable-length sequences are not supported; export with "
                    "full-length sequences and no sequence_lens")
        if lens.size == 0 or np.any(lens.reshape(-1) != seq):
            return (f"sequence_lens {lens.reshape(-1).tolist()} differs from the full length {seq}: only "
                    "full-length sequences are supported; export without sequence_lens")
    dtype = ins[0].dtype
    if dtype is not None and dtype != ir.DataType.FLOAT:
        return f"input X is {dtype}, not float32"
    if op == "GRU" and int(a.get("linear_before_reset", 0)) not in (0, 1):
        return f"linear_before_reset {a['linear_before_reset']} is not 0 or 1"
    acts = a.get("activations")
    if acts is not None:
        known = {n.lower() for n in RECURRENT_ACTIVATIONS}
        unknown = sorted({f for f in acts if f.lower() not in known})
        if unknown:
            return (f"activation(s) {', '.join(unknown)} not supported (supported: "
                    f"{', '.join(RECURRENT_ACTIVATIONS)})")
        expected = _ACTIVATIONS_PER_DIRECTION[op] * (2 if direction == "bidirectional" else 1)
        if len(acts) != expected:
            return f"activations lists {len(acts)} functions, expected {expected} (one per gate function and direction)"
    return None


def classify(model: ir.Model, *, canonical: bool = True) -> list[NodeClass]:
    """Classify every node of the main graph, in graph order.

    ``canonical=False`` classifies a graph as imported, before canonicalisation: a recurrent layer that
    canonicalisation will expand is then reported as supported (``digital``, with what it becomes). In a
    canonical graph (the default) any recurrent layer left is unsupported: the executor cannot run it.
    """
    out = []
    for node in model.graph:
        name = node.name or f"<{node.op_type}>"
        if node.op_type in RECURRENT_OPS and node.domain in ("", "ai.onnx"):
            refusal = recurrent_refusal(node)
            if refusal is not None:
                out.append(NodeClass(name, node.op_type, "unsupported", refusal))
            elif canonical:
                out.append(NodeClass(name, node.op_type, "unsupported",
                                     "not expanded into primitive ops: canonicalise the model first"))
            else:
                out.append(NodeClass(name, node.op_type, "digital", _recurrent_summary(node)))
        elif is_analog(node):
            out.append(NodeClass(name, node.op_type, "analog", "constant weight maps onto the crossbar"))
        elif node.domain not in ("", "ai.onnx"):
            out.append(NodeClass(name, node.op_type, "unsupported", f"custom domain {node.domain!r}"))
        elif node.op_type in OPS:
            why = (
                "kept digital (--digital): runs in float on the digital unit"
                if node.metadata_props.get(DIGITAL_KEY)
                else "both operands are activations (no constant weight to program): multiply-accumulates on the "
                "digital unit, costed there"
                if node.op_type in ANALOG_OPS or (node.op_type == "Einsum" and _activation_operands(node) > 1)
                else "an Einsum with a constant operand: not mapped (cimc maps MatMul, Gemm and Conv); runs on the "
                "digital unit — export the projection as a Linear layer to put it on the crossbar"
                if node.op_type == "Einsum"
                else "runs on the digital unit"
            )
            out.append(NodeClass(name, node.op_type, "digital", why))
        elif node.op_type == "If":
            inputs = graph_inputs_upstream(node.inputs[0])
            why = (f"its condition depends on input(s) {', '.join(inputs)}: freeze them with --input-value NAME=VALUE "
                   "(input_values= in the API) so the branch is known at compile time") if inputs else (
                   "its condition is only known at run time; cimc compiles one fixed dataflow graph")
            out.append(NodeClass(name, node.op_type, "unsupported", why))
        elif node.op_type in ("Loop", "Scan"):
            out.append(NodeClass(name, node.op_type, "unsupported",
                                 "loops with a data-dependent trip count cannot be mapped; export the model unrolled"))
        else:
            out.append(NodeClass(name, node.op_type, "unsupported", "no implementation in cimc's digital unit"))
    return out


def _activation_operands(node: ir.Node) -> int:
    """How many of a node's inputs are not constants (activations)."""
    return sum(1 for v in node.inputs if v is not None and constant_array(v) is None)


def graph_inputs_upstream(value: ir.Value | None) -> list[str]:
    """Names of the graph inputs a value depends on (through any chain of producers)."""
    found: list[str] = []
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input():
            found.append(v.name)
        producer = v.producer()
        if producer is not None:
            stack.extend(producer.inputs)
    return sorted(found)


def _recurrent_summary(node: ir.Node) -> str:
    """What canonicalisation turns an expandable recurrent layer into (for ``inspect --raw``)."""
    a = node_attrs(node)
    x_shape = static_shape(node.inputs[0]) or (0, 0, 0)
    seq = x_shape[1] if int(a.get("layout", 0)) == 1 else x_shape[0]
    w = node.inputs[1].const_value.shape  # [directions, gates·H, I]
    dirs, gh, k = int(w[0]), int(w[1]), int(w[2])
    hidden = gh // _GATES[node.op_type]
    return (f"expanded at canonicalisation into analog MatMuls per direction ({dirs}): W {k}x{gh} "
            f"({seq} MVMs), R {hidden}x{gh} (one MVM per step); gates on the digital unit")


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


def weight_value(node: ir.Node) -> ir.Value:
    """The constant input of an analog node that holds its crossbar weight."""
    if node.op_type == "MatMul":
        idx = _matmul_weight_index(node)
        assert idx is not None, f"{node.name} is not an analog MatMul"
        return node.inputs[idx]  # type: ignore[return-value]
    return node.inputs[1]  # type: ignore[return-value]


def layer_of(node: ir.Node) -> str:
    """The crossbar block (layer) a mapped analog node reads: ``cimc.layer``, else the node's own name.

    Several nodes that use one weight tensor with the same crossbar matrix share one block (programmed once);
    a model compiled before blocks could be shared has no ``cimc.layer`` and every node is its own block.
    """
    return node.metadata_props.get("cimc.layer") or node.name


def placements_of(node: ir.Node) -> list[dict[str, int]]:
    """The tiles of the block a mapped node reads (empty when it was not mapped)."""
    import json

    raw = node.metadata_props.get("cimc.placement")
    return json.loads(raw) if raw else []


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
