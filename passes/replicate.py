"""Weight replication: map a few-row analog layer r times and average the r results digitally.

A layer with few rows (a first convolution of 9 or 27 inputs) has a weak signal per column against the
chip's per-conversion output noise, read noise and programming noise. Programming it on ``r`` independent
device sets and averaging the ``r`` results keeps the signal and divides the standard deviation of every
independent noise by about √r (quantisation of the converters, which is the same in every copy, does not fall).

**How: a canonical graph rewrite.** Before placement (:class:`~cimc.passes.mapping.MapPass` calls
:func:`replicate_layers` first), every analog node ``N`` named in ``replicate={N: r}`` becomes

1. ``r`` copies of the node, ``N/rep0 .. N/rep<r-1>``, each reading its **own weight initializer**
   (``<weight>/rep<i>``, same values) and the same input and bias, so each copy is a crossbar block of its
   own: placed, programmed (own programming noise, drift and read noise), quantised (own DAC/ADC ranges),
   scheduled, costed (its MVMs and conversions) and exported like any other layer;
2. ``r − 1`` digital ``Add`` nodes (``N/rep_sum<i>``) that sum the copies' outputs, and
3. one digital ``Mul`` by the constant 1/r (``N/rep_mean``) that writes the original output value, so
   everything downstream is unchanged (a bias is in every copy, so the mean carries it once).

The rewrite was chosen over teaching the mapper, the simulator and the export about replicas: every stage
already counts what a graph of ordinary ops does, so replicas are counted everywhere by construction and the
simulator's kernel needs no change. A layer that several nodes read (a shared weight, e.g. an unrolled
recurrent layer) is replicated for every use: each use gets ``r`` copies reading the same ``r`` weight copies.

Durable results: node ``metadata_props["cimc.replica"]`` = ``{"of": N, "index": i, "count": r}`` on each
copy, ``{"of": N, "role": "sum" | "mean", "count": r}`` on the digital nodes; model
``metadata_props["cimc.replication"]`` = ``{N: r}``.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from cimc.errors import InputError
from cimc.ir import is_analog, weight_value
from cimc.runtime.workload import REPLICA_KEY

__all__ = ["MAX_REPLICAS", "REPLICA_KEY", "REPLICATION_KEY", "replicate_layers", "replication_of"]

logger = logging.getLogger(__name__)

REPLICATION_KEY = "cimc.replication"
MAX_REPLICAS = 64  # far beyond what pays (√r): a larger r is a typo


def replication_of(model: ir.Model) -> dict[str, int]:
    """``{layer: r}`` of a compiled (or rewritten) model; empty when nothing is replicated."""
    raw = model.metadata_props.get(REPLICATION_KEY)
    return {k: int(v) for k, v in json.loads(raw).items()} if raw else {}


def _targets(model: ir.Model, name: str) -> list[ir.Node]:
    """The analog nodes a replication name designates: the node of that name, or every analog node that reads
    the weight tensor of that name (a shared layer's name). Refuses unknown or digital names in one line."""
    nodes = list(model.graph)
    analog = [n for n in nodes if is_analog(n)]
    by_node = [n for n in analog if n.name == name]
    if by_node:
        return by_node
    by_weight = [n for n in analog if weight_value(n).name == name]
    if by_weight:
        return by_weight
    if any(n.name == name for n in nodes):
        raise InputError(f"--replicate {name}: not an analog layer (it runs on the digital unit); only Conv, Gemm and "
                         "MatMul layers with constant weights on the crossbar can be replicated")
    names = [n.name for n in analog]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
    raise InputError(f"--replicate {name}: no such analog layer; {hint}analog layers are: {shown}")


def _copy_weight(graph: ir.Graph, value: ir.Value, index: int) -> ir.Value:
    """A new initializer with the same values as ``value``: a device set of its own on the chip."""
    array = np.array(value.const_value.numpy(), copy=True)  # type: ignore[union-attr]
    base = f"{value.name}/rep{index}"
    name, k = base, 1
    while name in graph.initializers:
        name, k = f"{base}_{k}", k + 1
    copy = ir.Value(name=name, shape=ir.Shape(array.shape), type=value.type, const_value=ir.tensor(array, name=name))
    graph.register_initializer(copy)
    return copy


def _scalar(graph: ir.Graph, name: str, number: float, like: ir.Value) -> ir.Value:
    dtype = like.dtype.numpy() if like.dtype is not None else np.float32
    array = np.array(number, dtype=dtype)
    value = ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _typed(value: ir.Value, like: ir.Value) -> None:
    value.shape = like.shape
    value.type = like.type


def _replicate_node(graph: ir.Graph, node: ir.Node, weights: list[ir.Value], label: str, r: int) -> None:
    """Rewrite one analog node into r copies reading ``weights``, r − 1 Adds and a Mul by 1/r."""
    widx = next(i for i, v in enumerate(node.inputs) if v is weight_value(node))
    out = node.outputs[0]
    base = node.name
    new_nodes: list[ir.Node] = []
    copies: list[ir.Value] = []
    for i, w in enumerate(weights):
        inputs = list(node.inputs)
        inputs[widx] = w
        copy = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()), name=f"{base}/rep{i}")
        for key, val in node.metadata_props.items():
            if not key.startswith("cimc."):  # durable cimc results are written by later passes
                copy.metadata_props[key] = val
        copy.metadata_props[REPLICA_KEY] = json.dumps({"of": label, "index": i, "count": r})
        _typed(copy.outputs[0], out)
        new_nodes.append(copy)
        copies.append(copy.outputs[0])
    total = copies[0]
    for i, y in enumerate(copies[1:], start=1):
        add = ir.Node("", "Add", [total, y], name=f"{base}/rep_sum{i}")
        add.metadata_props[REPLICA_KEY] = json.dumps({"of": label, "role": "sum", "count": r})
        _typed(add.outputs[0], out)
        new_nodes.append(add)
        total = add.outputs[0]
    mean = ir.Node("", "Mul", [total, _scalar(graph, f"{base}/rep_inv", 1.0 / r, out)], name=f"{base}/rep_mean")
    mean.metadata_props[REPLICA_KEY] = json.dumps({"of": label, "role": "mean", "count": r})
    _typed(mean.outputs[0], out)
    new_nodes.append(mean)
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [out], [mean.outputs[0]])


def replicate_layers(model: ir.Model, replicate: Mapping[str, int]) -> dict[str, int]:
    """Rewrite the named analog layers into ``r`` replicas each (see the module docstring); returns ``{name: r}``
    of the layers replicated (``r = 1`` entries are ignored). Raises :class:`InputError` for a name that is not an
    analog layer (with the closest names) or an ``r`` outside 1 .. :data:`MAX_REPLICAS`."""
    wanted = {}
    for name, r in replicate.items():
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= int(r) <= MAX_REPLICAS:
            raise InputError(f"--replicate {name}={r}: the replica count must be an integer from 1 to {MAX_REPLICAS} "
                             "(e.g. --replicate conv1=4)")
        if int(r) > 1:
            wanted[name] = int(r)
    if not wanted:
        return {}
    graph = model.graph
    plan = [(name, r, _targets(model, name)) for name, r in wanted.items()]
    claimed: dict[str, str] = {}
    for name, _, nodes in plan:
        for n in nodes:
            if n.name in claimed:
                raise InputError(f"--replicate {name} and --replicate {claimed[n.name]} both name layer {n.name}; "
                                 "give each layer once")
            claimed[n.name] = name
    for name, r, nodes in plan:
        copies: dict[int, list[ir.Value]] = {}
        for node in nodes:
            value = weight_value(node)
            if id(value) not in copies:
                copies[id(value)] = [_copy_weight(graph, value, i) for i in range(r)]
            _replicate_node(graph, node, copies[id(value)], name, r)
        for value_id in copies:  # the original weight is read by nobody now
            for init_name, init in list(graph.initializers.items()):
                if id(init) == value_id and not init.uses() and not init.is_graph_output():
                    graph.initializers.pop(init_name)
        logger.info("replicated %s x%d (%d node(s)): partial results averaged on the digital unit", name, r, len(nodes))
    model.metadata_props[REPLICATION_KEY] = json.dumps(wanted, sort_keys=True)
    return wanted
