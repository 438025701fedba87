"""Canonicalisation: bring an imported graph to the form the mapper expects.

Passes (each an onnx-ir pass; :data:`CANONICALIZE` runs them in this order):

0. :class:`~cimc.passes.dequantize.DequantizePass` — quantised models (ConvInteger, MatMulInteger, QLinear*,
   com.microsoft quantised ops): constant integer weights become float initializers (``passes/dequantize.py``).
1. :class:`FoldToFixpointPass` — repeats, until nothing changes:
   :class:`FoldConstantsPass` (every node whose inputs are all constant is evaluated by cimc's own op table,
   the code the executor runs, and replaced by an initializer; ``Shape`` of a statically shaped value becomes
   a constant: ``Constant``, ``ConstantOfShape`` and shape arithmetic become initializers — except the
   entries that follow the batch (:func:`batch_dependent_axes`), which stay shape arithmetic the executor
   evaluates at run time, so the compiled model runs at any batch: an attention block's
   ``Shape → Gather → Concat → Reshape``),
   :class:`InlineConstantIfPass` (an ``If`` whose condition is now a constant is replaced by the branch it
   takes) and ONNX shape inference (a folded shape makes the next shapes known, which makes more folding
   possible). One round is not enough for shape computations that depend on earlier folds.
   Then :class:`~cimc.passes.embedding.OneHotMatMulToGatherPass` — ``MatMul(OneHot(i), W)`` → ``Gather(W, i)``.
   :class:`PredicateIfPass` — an ``If`` still there depends on data: both branches are computed and
   ``Where`` selects per sample (if-conversion), then folding runs again.
2. :class:`RemoveNoOpsPass` — ``Identity`` and inference-mode ``Dropout`` disappear.
3. :class:`~cimc.passes.recurrent.ExpandRecurrentPass` — ``LSTM``/``GRU``/``RNN`` become MatMuls with constant
   weights (analog: the input projection of all steps, and one recurrent product per step reading one shared
   weight) and element-wise gates (digital);
   :class:`~cimc.passes.conv_transpose.ConvTransposeToConvPass` — a ``ConvTranspose`` with a constant weight
   becomes zero insertion + ``Conv`` (analog).
4. :class:`FoldBatchNormPass` — ``BatchNormalization`` directly after a ``Conv`` or ``Gemm`` (whose output
   nothing else reads) is folded into its weights and bias (onnxscript's rewrite rules).
5. :class:`MatMulAddToGemmPass` — ``Add(MatMul(x, W), b)`` with constant 2-D ``W`` and constant ``b`` becomes
   one ``Gemm`` (onnxscript's rule, restricted to constant operands).
6. :class:`CleanupPass` — unused nodes, initializers and opsets are removed; nodes are sorted topologically.

1-D convolutions need no rewrite: they map like 2-D ones (K = C_in·k rows) and the executor runs them
natively.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx_ir.passes.common import (
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
    ShapeInferencePass,
    TopologicalSortPass,
)
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter.rules.common import fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_gemm_rule
from onnxscript.rewriter.rules.common._matmul_add_to_gemm import MatMulAddToGemm

from cimc.ir import RECURRENT_OPS, constant_array, graph_inputs_upstream, name_nodes, node_attrs, static_shape
from cimc.passes.conv_transpose import ConvTransposeToConvPass
from cimc.passes.dequantize import DequantizePass
from cimc.passes.embedding import OneHotMatMulToGatherPass
from cimc.ops import OPS
from cimc.passes.recurrent import ExpandRecurrentPass
from cimc.pipeline import CimcPass, CompileContext, register_pass

__all__ = [
    "BatchProbe",
    "CANONICALIZE",
    "CanonicalizePass",
    "CleanupPass",
    "FoldBatchNormPass",
    "FoldConstantsPass",
    "FoldToFixpointPass",
    "InlineConstantIfPass",
    "MarkFixedBatchPass",
    "PredicateIfPass",
    "MatMulAddToGemmPass",
    "RemoveNoOpsPass",
    "batch_dependent_axes",
    "canonicalize",
    "probe_batch",
]

logger = logging.getLogger(__name__)

# Ops whose value depends on more than their inputs; never folded.
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}


def _evaluate(node: ir.Node, inputs: list[Any]) -> list[torch.Tensor]:
    attrs = node_attrs(node)
    attrs["_num_outputs"] = len(node.outputs)
    return OPS[node.op_type](inputs, attrs)


def _replace_with_constant(graph: ir.Graph, value: ir.Value, array: np.ndarray) -> None:
    """Make every use of ``value`` read an initializer holding ``array`` instead."""
    name = value.name
    value.name = f"{name}__folded"
    const = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(const)
    value.replace_all_uses_with(const)


# A second batch size for the probe: compiled batch b → PROBE_FACTOR·b + 1 (never equal to b, and unlikely to
# coincide with a model dimension that would hide a difference).
_PROBE_FACTOR = 3
# Inputs of recurrent ops that the expansion needs as constants (passes/recurrent.py): a zero initial state or
# full-length sequence_lens built from the batch is folded at the compiled batch as before; the expansion then
# drops it (a zero state, every sequence full), so nothing batch-sized survives.
_RECURRENT_CONST_INPUTS = (4, 5, 6)


@dataclass
class BatchProbe:
    """Which axes of each value follow the batch (``axes``, by value name) and each value's shape at the probe
    batch (``shapes``; None where inference did not know a dimension)."""

    axes: dict[str, frozenset[int]] = field(default_factory=dict)
    shapes: dict[str, list[int | None]] = field(default_factory=dict)


def batch_dependent_axes(model: ir.Model) -> dict[str, frozenset[int]]:
    """For each value (by name), the axes whose size changes with the batch.

    ONNX shape inference, with data propagation through shape arithmetic, of the graph with every input's batch
    axis set to a second size, compared with the shapes at the compiled batch. A value missing from the answer
    (inference does not reach it, or the graph cannot be inferred at another batch because it fixes its batch)
    has no known batch-dependent axis: its shape arithmetic is folded at the compiled batch, as before.
    """
    return probe_batch(model).axes


def probe_batch(model: ir.Model) -> BatchProbe:
    """The :class:`BatchProbe` of a model (see :func:`batch_dependent_axes`)."""
    batch = int(model.graph.meta.get("cimc.batch", 1))
    probe = _PROBE_FACTOR * batch + 1
    axes_by_input = json.loads(model.metadata_props.get("cimc.batch_axes", "{}"))
    proto = ir.to_proto(model)
    del proto.graph.value_info[:]
    for out in proto.graph.output:  # declared at the compiled batch; inference re-derives them
        out.type.tensor_type.ClearField("shape")
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        axis = int(axes_by_input.get(inp.name, 0))
        if axis < len(dims) and dims[axis].HasField("dim_value"):
            dims[axis].dim_value = dims[axis].dim_value // batch * probe
    _drop_large_initializers(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - an uninferable probe means: nothing known to follow the batch
        logger.debug("batch probe: shape inference failed (%s)", exc)
        return BatchProbe()
    probed: dict[str, list[int | None]] = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            probed[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    result: dict[str, frozenset[int]] = {}
    for node in model.graph:
        for value in node.outputs:
            here, there = static_shape(value), probed.get(value.name)
            if here is None or there is None or len(there) != len(here):
                continue
            moved = frozenset(i for i, (a, b) in enumerate(zip(here, there)) if b is not None and a != b)
            if moved:
                result[value.name] = moved
    for value in model.graph.inputs:
        axis = int(axes_by_input.get(value.name, 0))
        if value.shape is not None and axis < len(value.shape):
            result[value.name] = frozenset({axis})
            probed[value.name] = [probe if i == axis else d for i, d in enumerate(static_shape(value) or ())]
    return BatchProbe(result, probed)


def _drop_large_initializers(proto: onnx.ModelProto, max_elements: int = 4096) -> None:
    """Shape inference needs the values of shape-sized constants only: large initializers become graph inputs of
    the same type and shape (no copy of the weights into the inference)."""
    keep = []
    for init in proto.graph.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) <= max_elements:
            keep.append(init)
            continue
        proto.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def _pinned_to_compiled_batch(graph: ir.Graph) -> set[int]:
    """ids of the values that feed (through any chain) a recurrent op's sequence_lens or initial state."""
    seen: set[int] = set()
    stack = [n.inputs[i] for n in graph if n.op_type in RECURRENT_OPS and n.domain in ("", "ai.onnx")
             for i in _RECURRENT_CONST_INPUTS if i < len(n.inputs)]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        producer = v.producer()
        if producer is not None:
            stack.extend(producer.inputs)
    return seen


def _shape_entries(value: ir.Value | None, batch_axes: dict[str, frozenset[int]]) -> tuple[np.ndarray, list[bool]] | None:
    """For the output of ``Shape(x)`` with a static x: (its entries, which of them follow the batch)."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Shape" or producer.domain not in ("", "ai.onnx"):
        return None
    x = producer.inputs[0]
    dims = static_shape(x)
    if dims is None or x is None:
        return None
    a = node_attrs(producer)
    rank = len(dims)
    start, end = a.get("start", 0), a.get("end", rank)
    start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
    start, end = max(0, min(start, rank)), max(0, min(end, rank))
    moved = batch_axes.get(x.name, frozenset())
    return np.asarray(dims[start:end], dtype=np.int64), [i in moved for i in range(start, end)]


def _shape_symbols(value: ir.Value | None, probe: BatchProbe, depth: int = 0) -> list[Any] | None:
    """The entries of a 1-D int shape tensor built by shape arithmetic (Shape, Gather, Slice, Unsqueeze, Squeeze,
    Concat, Cast, constants), each an int or ``("dim", value, axis)`` for a batch-dependent dimension; None when
    it is computed otherwise."""
    if value is None or depth > 16:
        return None
    arr = constant_array(value)
    if arr is not None:
        return [int(v) for v in arr.reshape(-1)] if arr.dtype.kind in "iu" and arr.ndim <= 1 else None
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return None
    op = producer.op_type
    if op == "Shape":
        entries = _shape_entries(value, probe.axes)
        if entries is None:
            return None
        dims, moved = entries
        start = _shape_start(producer)
        return [("dim", producer.inputs[0], start + i) if m else int(d) for i, (d, m) in enumerate(zip(dims, moved))]
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        return _shape_symbols(producer.inputs[0], probe, depth + 1)
    if op == "Concat":
        parts = [_shape_symbols(v, probe, depth + 1) for v in producer.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]  # type: ignore[union-attr]
    if op in ("Gather", "Slice"):
        inner = _shape_symbols(producer.inputs[0], probe, depth + 1)
        rest = producer.inputs[1:]
        if inner is None or not all(v is None or constant_array(v) is not None for v in rest):
            return None
        consts = [None if v is None else torch.from_numpy(np.array(constant_array(v))) for v in rest]
        try:
            picked = _evaluate(producer, [torch.arange(len(inner)), *consts])[0].numpy()
        except Exception:  # noqa: BLE001
            return None
        return [inner[int(i)] for i in picked.reshape(-1)]
    return None


def _shape_start(shape_node: ir.Node) -> int:
    rank = len(shape_node.inputs[0].shape or ())
    start = int(node_attrs(shape_node).get("start", 0))
    return max(0, min(start + rank if start < 0 else start, rank))


def _reshape_copy_target(node: ir.Node, probe: BatchProbe) -> np.ndarray | None:
    """A ``Reshape`` target built from shape arithmetic whose only batch-dependent entries each repeat the input's
    own dimension at the same position (``x.view(x.size(0), -1)``, ``q.view(B, T, H, D)`` with B from q's own
    batch): the same target with those entries 0 ("copy the input's dimension"), a constant that holds at any
    batch. None otherwise."""
    if int(node_attrs(node).get("allowzero", 0)) or constant_array(node.inputs[1]) is not None:
        return None
    x = node.inputs[0]
    entries = _shape_symbols(node.inputs[1], probe)
    x_here, x_there = static_shape(x), probe.shapes.get(x.name) if x is not None else None
    if entries is None or x_here is None or x_there is None or not any(isinstance(e, tuple) for e in entries):
        return None
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, tuple):
            if e == 0:
                return None  # a literal 0 copies too; keep the rule simple
            out.append(e)
            continue
        _, y, axis = e
        y_here, y_there = static_shape(y), probe.shapes.get(y.name)
        if (i >= len(x_here) or y_here is None or y_there is None or axis >= len(y_there) or x_there[i] is None
                or y_here[axis] != x_here[i] or y_there[axis] != x_there[i]):
            return None
        out.append(0)
    return np.asarray(out, dtype=np.int64)


def _remove_dead_nodes(graph: ir.Graph) -> None:
    """Remove nodes none of whose outputs is read or a graph output (initializers stay: CleanupPass drops them)."""
    for node in reversed(list(graph)):
        if all(not out.uses() and not out.is_graph_output() for out in node.outputs):
            graph.remove(node, safe=True)


class FoldConstantsPass(ir.passes.InPlacePass):
    """Evaluate every node whose inputs are constant and replace its outputs with initializers.

    Rules:
      1. ``Shape(x)`` where x has a fully static shape → int64 initializer, unless one of the entries it
         returns follows the batch (:func:`batch_dependent_axes`): then it stays and runs at execution time.
      2. ``Gather`` / ``Slice`` of such a kept ``Shape`` with constant indices that pick no batch-dependent entry
         → int64 initializer (the static part of a shape is still folded).
      3. A node of a known, deterministic op whose every (present) input is constant → its outputs become
         initializers, computed with :data:`cimc.ops.OPS`.
      4. Nodes producing graph outputs are left in place (an output stays an output of a node).
      5. A batch-dependent shape that feeds a recurrent op's ``sequence_lens`` or initial state is folded at the
         compiled batch (the expansion needs constants there and drops full lengths and zero states).
      6. ``Reshape(x, target)`` whose target's batch-dependent entries each repeat x's own dimension at that
         position → the target becomes a constant with 0 there (ONNX: copy the input's dimension), e.g.
         ``x.view(x.size(0), -1)`` → ``Reshape(x, [0, -1])``: the shape chain disappears and any batch runs.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        has_shapes = any(n.op_type == "Shape" for n in graph)
        probe = probe_batch(model) if has_shapes else BatchProbe()
        batch_axes = probe.axes
        pinned = _pinned_to_compiled_batch(graph) if batch_axes else set()
        rewired = False
        for node in list(graph):
            if node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and batch_axes:
                target = _reshape_copy_target(node, probe)
                if target is not None:
                    name = f"{node.name}/target"
                    while name in graph.initializers:
                        name += "_"
                    const = ir.Value(name=name, shape=ir.Shape(target.shape), type=ir.TensorType(ir.DataType.INT64),
                                     const_value=ir.tensor(target, name=name))
                    graph.register_initializer(const)
                    node.replace_input_with(1, const)
                    modified = rewired = True
            if node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC:
                continue
            if node.op_type not in OPS or any(out.is_graph_output() for out in node.outputs):
                continue
            results = self._fold(node, batch_axes, pinned)
            if results is None:
                continue
            for out, arr in zip(node.outputs, results):
                if out.uses():
                    _replace_with_constant(graph, out, np.array(arr, order="C"))  # ascontiguousarray makes 0-d 1-d
            graph.remove(node, safe=True)
            modified = True
        if rewired:  # the shape arithmetic that fed a rewired Reshape target is dead now
            _remove_dead_nodes(graph)
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _fold(node: ir.Node, batch_axes: dict[str, frozenset[int]], pinned: set[int]) -> list[np.ndarray] | None:
        """The node's outputs as arrays, or None when it must run at execution time."""
        if node.op_type == "Shape":
            entries = _shape_entries(node.outputs[0], batch_axes)
            if entries is None:
                return None
            dims, moved = entries
            if any(moved) and id(node.outputs[0]) not in pinned:
                return None
            return [dims]
        if node.op_type in ("Gather", "Slice") and constant_array(node.inputs[0]) is None:
            entries = _shape_entries(node.inputs[0], batch_axes)
            rest = node.inputs[1:]
            if entries is None or not all(v is None or constant_array(v) is not None for v in rest):
                return None
            dims, moved = entries
            consts = [None if v is None else torch.from_numpy(np.array(constant_array(v))) for v in rest]
            try:
                picked = _evaluate(node, [torch.arange(len(dims)), *consts])[0].numpy()
            except Exception as exc:  # noqa: BLE001 - left to run at execution time
                logger.debug("not folding %s (%s): %s", node.name, node.op_type, exc)
                return None
            if any(moved[int(i)] for i in picked.reshape(-1)):
                return None
            return [dims[picked]]
        if not all(v is None or constant_array(v) is not None for v in node.inputs):
            return None
        tensors = [None if v is None else torch.from_numpy(np.array(constant_array(v))) for v in node.inputs]
        try:
            return [t.numpy() for t in _evaluate(node, tensors)]
        except Exception as exc:  # an op we cannot fold here is left to run at execution time
            logger.debug("not folding %s (%s): %s", node.name, node.op_type, exc)
            return None

    def ensures(self, model: ir.Model) -> None:
        # ConstantOfShape may legitimately survive (its shape can depend on data); the executor runs it.
        for node in model.graph:
            if node.op_type == "Constant" and not any(o.is_graph_output() for o in node.outputs):
                raise ir.passes.PostconditionError(f"Constant node {node.name!r} was not folded")


class InlineConstantIfPass(ir.passes.InPlacePass):
    """Replace an ``If`` whose condition is a constant by the nodes of the branch it takes.

    Rules:
      1. ``If(cond)`` with a constant ``cond`` → the taken branch's nodes move into the enclosing graph before
         the ``If`` (named ``<if>/<node>``), its initializers become the graph's, and every use of the ``If``'s
         outputs reads the branch's outputs instead. Values the branch reads from the outer graph are the
         same values, so nothing else changes.
      2. A branch output that is a graph output stays one through an ``Identity`` (removed later where legal).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in _if_nodes(graph):
            cond = constant_array(node.inputs[0])
            if cond is None or cond.size != 1:
                continue
            branch_attr = node.attributes.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
            if branch_attr is None:
                continue
            branch: ir.Graph = branch_attr.as_graph()
            _inline_branch(graph, node, branch)
            modified = True
        return ir.passes.PassResult(model, modified)


def _if_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The graph's ``If`` nodes (a list: the passes rewrite the graph while they go)."""
    return [n for n in graph if n.op_type == "If" and n.domain in ("", "ai.onnx")]


def _hoist_branch(graph: ir.Graph, if_node: ir.Node, branch: ir.Graph, tag: str) -> list[ir.Value]:
    """Move a branch's nodes (named ``<if>/<tag>/<node>``) and initializers into ``graph`` before ``if_node``;
    returns the branch's result values. Values the branch reads from the outer graph are the same objects."""
    taken_values = {v.name for v in graph.initializers.values()} | {v.name for v in graph.inputs}
    for n in graph:
        taken_values.update(o.name for o in n.outputs if o.name)
    prefix = f"{if_node.name}/{tag}"
    results = list(branch.outputs)
    branch.outputs.clear()
    inner_nodes = list(branch)
    branch.remove(inner_nodes)
    for inner in inner_nodes:
        inner.name = f"{prefix}/{inner.name or inner.op_type}"
        for out in inner.outputs:
            if out.name in taken_values:  # names must stay unique in the enclosing graph
                out.name = f"{prefix}/{out.name}"
            taken_values.add(out.name)
    for name in list(branch.initializers):
        value = branch.initializers.pop(name)
        if value.name in graph.initializers or value.name in taken_values:
            value.name = f"{prefix}/{value.name}"
        graph.register_initializer(value)
    graph.insert_before(if_node, inner_nodes)
    return results


def _take_place(graph: ir.Graph, old: ir.Value, new: ir.Value, before: ir.Node) -> None:
    """Every use of ``old`` reads ``new``; a graph output keeps its name (through an Identity if needed)."""
    if old.is_graph_output():
        ident = ir.node("Identity", [new], name=f"{before.name}/output_{old.name}")
        graph.insert_before(before, ident)
        old.replace_all_uses_with(ident.outputs[0], replace_graph_outputs=True)
        ident.outputs[0].name, ident.outputs[0].shape, ident.outputs[0].type = old.name, old.shape, old.type
        old.name = f"{old.name}__replaced"
        return
    if new.shape is None and old.shape is not None:
        new.shape = old.shape
    if new.type is None and old.type is not None:
        new.type = old.type
    old.replace_all_uses_with(new)


def _inline_branch(graph: ir.Graph, if_node: ir.Node, branch: ir.Graph) -> None:
    results = _hoist_branch(graph, if_node, branch, "taken")
    for old, new in zip(if_node.outputs, results):
        _take_place(graph, old, new, if_node)
    graph.remove(if_node, safe=False)


def _has_subgraphs(g: ir.Graph) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in g for a in n.attributes.values())


class PredicateIfPass(ir.passes.InPlacePass):
    """If-conversion: an ``If`` whose condition is only known at run time computes both branches and selects.

    Rules:
      1. ``If(c)`` whose branches have no nested control flow → the nodes of both branches move into the
         enclosing graph (``<if>/then/…``, ``<if>/else/…``) and each output becomes ``Where(c, then, else)``.
         Both branches' layers are mapped and both are costed (the chip computes both; a conservative cost).
      2. The condition broadcasts against the outputs, so a batch of samples (and Monte Carlo instances) selects
         per sample — what running each sample on its own would give.
    A wake-word model that runs a verifier head only when the first score passes a threshold is the typical case.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in _if_nodes(graph):
            then_attr, else_attr = node.attributes.get("then_branch"), node.attributes.get("else_branch")
            if then_attr is None or else_attr is None:
                continue
            then_g, else_g = then_attr.as_graph(), else_attr.as_graph()
            if _has_subgraphs(then_g) or _has_subgraphs(else_g) or len(then_g.outputs) != len(else_g.outputs):
                continue
            cond = node.inputs[0]
            inputs = graph_inputs_upstream(cond)
            logger.warning("If '%s': its condition depends on %s, so both branches are mapped and computed and the "
                           "result is selected per sample%s", node.name,
                           f"input(s) {', '.join(inputs)}" if inputs else "the data",
                           "; freeze them with --input-value NAME=VALUE to map only the branch taken" if inputs else "")
            if cond is not None and cond.dtype is not None and cond.dtype != ir.DataType.BOOL:
                cast = ir.node("Cast", [cond], attributes={"to": ir.DataType.BOOL}, name=f"{node.name}/cond")
                graph.insert_before(node, cast)
                cond = cast.outputs[0]
            then_out = _hoist_branch(graph, node, then_g, "then")
            else_out = _hoist_branch(graph, node, else_g, "else")
            for k, (old, a, b) in enumerate(zip(node.outputs, then_out, else_out)):
                select = ir.node("Where", [cond, a, b], name=f"{node.name}/select{k}")
                graph.insert_before(node, select)
                select.outputs[0].name = f"{node.name}/selected{k}"
                _take_place(graph, old, select.outputs[0], node)
            graph.remove(node, safe=False)
            modified = True
        return ir.passes.PassResult(model, modified)


class FoldToFixpointPass(ir.passes.InPlacePass):
    """Constant folding, constant-``If`` inlining and shape inference, repeated until nothing changes.

    Shape computations often need several rounds: a ``Reshape`` target folded in round 1 gives a shape that
    ONNX shape inference propagates in round 2, which makes a ``ConstantOfShape`` foldable in round 3.
    Bounded by ``max_rounds`` (a model needing more keeps what is left for the executor to run).
    """

    def __init__(self, max_rounds: int = 8):
        super().__init__()
        self.max_rounds = max_rounds

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        any_change = False
        for _ in range(self.max_rounds):
            changed = FoldConstantsPass()(model).modified
            changed |= InlineConstantIfPass()(model).modified
            if not changed:
                break
            any_change = True
            ShapeInferencePass()(model)
        return ir.passes.PassResult(model, any_change)



def _mask_needed(dropout: ir.Node) -> bool:
    """True when a Dropout's mask output is read by a node or is itself a graph output."""
    mask = dropout.outputs[1] if len(dropout.outputs) > 1 else None
    return mask is not None and (bool(mask.uses()) or mask.is_graph_output())


class MarkFixedBatchPass(ir.passes.InPlacePass):
    """Mark the ``Reshape`` nodes with which a model itself fixes its batch, before any folding.

    Rule: in a model whose file leaves the batch free (a dynamic first input dimension), a ``Reshape`` whose
    target is a constant in the file, starts with the compiled batch and reshapes a value whose first axis
    follows the batch gets ``cimc.fixed_batch`` in its metadata: onnxruntime cannot run it at another batch
    either, and the executor then refuses other batches with its one-line message instead of guessing.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if not graph.meta.get("cimc.dynamic_batch"):
            return ir.passes.PassResult(model, False)
        batch = int(graph.meta.get("cimc.batch", 1))
        reshapes = [n for n in graph if n.op_type == "Reshape" and n.domain in ("", "ai.onnx")]
        candidates = [n for n in reshapes if (t := _file_constant(n.inputs[1])) is not None and t.ndim == 1
                      and len(t) and int(t[0]) == batch]
        if not candidates:
            return ir.passes.PassResult(model, False)
        axes = batch_dependent_axes(model)
        modified = False
        for node in candidates:
            x = node.inputs[0]
            if x is not None and 0 in axes.get(x.name, frozenset()):
                node.metadata_props["cimc.fixed_batch"] = "1"
                logger.warning("Reshape '%s' fixes the batch to %d with a constant target: the model runs only at "
                               "that batch (as in onnxruntime)", node.name, batch)
                modified = True
        return ir.passes.PassResult(model, modified)


def _file_constant(value: ir.Value | None) -> np.ndarray | None:
    """A value's contents when the file holds it as a constant (an initializer or a ``Constant`` node)."""
    arr = constant_array(value)
    if arr is not None or value is None:
        return arr
    producer = value.producer()
    if producer is None or producer.op_type != "Constant" or producer.domain not in ("", "ai.onnx"):
        return None
    attr = producer.attributes.get("value")
    if attr is None or attr.type != ir.AttributeType.TENSOR:
        return None
    return attr.as_tensor().numpy()


class RemoveNoOpsPass(ir.passes.InPlacePass):
    """Remove ``Identity`` nodes and inference-mode ``Dropout`` (whose mask output nobody reads).

    Rules:
      1. ``Dropout(x)`` with an unused mask output → its uses read ``x`` (unless it feeds a graph output,
         in which case it becomes an ``Identity`` for rule 2 to handle).
      2. ``Identity`` nodes of the main graph are removed (their uses read the input); one whose output is a
         graph output hands that name to its input's value, unless the input is a graph input or constant. Subgraphs (branches of an ``If`` that could not be inlined) are left as they
         are: their outputs belong to the subgraph, and rewiring them to outer values is not legal.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
                continue
            if _mask_needed(node):
                continue
            x, y = node.inputs[0], node.outputs[0]
            if y.is_graph_output():
                node.op_type = "Identity"
                node.resize_inputs(1)
                node.attributes.clear()
                continue
            y.replace_all_uses_with(x)
            graph.remove(node, safe=True)
            modified = True
        for node in list(graph):
            if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
                continue
            x, y = node.inputs[0], node.outputs[0]
            if x is None:
                continue
            if y.is_graph_output():
                producer = x.producer()
                if producer is None or producer.graph is not graph or x.is_graph_output() or x.is_graph_input():
                    continue  # an Identity between a graph input/constant and an output stays (the executor runs it)
                # The producer's value takes the output's place and name.
                name = y.name
                y.replace_all_uses_with(x, replace_graph_outputs=True)
                graph.remove(node, safe=True)
                y.name = f"{name}__removed"
                x.name = name
            else:
                y.replace_all_uses_with(x)
                graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type == "Dropout" and not _mask_needed(node):
                raise ir.passes.PostconditionError(f"Dropout {node.name!r} survived")


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold ``BatchNormalization`` into the ``Conv`` or ``Gemm`` that feeds it.

    Rules (onnxscript's fuse-batchnorm rewrite rules):
      1. ``BN(Conv(x, W, b))`` → ``Conv(x, W·s, (b − mean)·s + β)`` with s = γ / sqrt(var + ε) per output channel.
      2. ``BN(Gemm(x, W, c))`` → the same per output column.
    Only when the Conv/Gemm output feeds nothing but the BN and every parameter is a constant initializer.
    A BN that cannot be folded stays and runs on the digital unit.
    """

    _rules = RewriteRuleSet([fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_gemm_rule])

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = self._rules.apply_to_model(model)
        return ir.passes.PassResult(model, bool(count))


class _ConstantMatMulAddToGemm(MatMulAddToGemm):
    def check(self, context, input_a, input_b, **kwargs):  # type: ignore[override]
        result = super().check(context, input_a, input_b, **kwargs)
        if not result:
            return result
        input_c = kwargs.get("input_c")
        if constant_array(input_b) is None or input_c is None or constant_array(input_c) is None:
            return MatchResult().fail("weight and bias must be constants")
        if constant_array(input_c).ndim > 1 and constant_array(input_c).shape[0] != 1:
            return MatchResult().fail("bias must broadcast over rows")
        return result


class MatMulAddToGemmPass(ir.passes.InPlacePass):
    """``Add(MatMul(x, W), b)`` with constant 2-D ``W`` and a constant row bias ``b`` → ``Gemm(x, W, b)``."""

    _rules = RewriteRuleSet([_ConstantMatMulAddToGemm().rule()])

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = self._rules.apply_to_model(model)
        return ir.passes.PassResult(model, bool(count))


class NameNodesPass(ir.passes.InPlacePass):
    """Every node gets a unique, non-empty name (rewrites and inlining may add unnamed or clashing ones)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, bool(name_nodes(model)))

    def ensures(self, model: ir.Model) -> None:
        names = [n.name for n in model.graph]
        if len(set(names)) != len(names) or not all(names):
            raise ir.passes.PostconditionError("node names are not unique and non-empty")


class CleanupPass(ir.passes.InPlacePass):
    """Remove unused nodes and opsets; drop initializers nothing reads; sort nodes topologically."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = RemoveUnusedNodesPass()(model).modified
        graph = model.graph
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                del graph.initializers[name]
                modified = True
        modified |= RemoveUnusedOpsetsPass()(model).modified
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified)


def _canonicalize_passes() -> ir.passes.Sequential:
    return ir.passes.Sequential(
        MarkFixedBatchPass(),  # before folding: a constant target in the file is the model's own fixed batch
        DequantizePass(),  # quantised models: integer weights become float initializers (passes/dequantize.py)
        FoldToFixpointPass(),
        PredicateIfPass(),  # an If left after folding depends on data: compute both branches, select per sample
        FoldToFixpointPass(),
        # Folded Reshape targets make shapes after a flatten known; MatMulAddToGemm needs their rank.
        ShapeInferencePass(),
        OneHotMatMulToGatherPass(),  # embedding lookups written as one-hot x matrix (passes/embedding.py)
        RemoveNoOpsPass(),
        ConvTransposeToConvPass(),  # before BN folding: a BN after the ConvTranspose then follows a Conv
        # After folding (initial states and sequence_lens built from Shape become constants), before the
        # rewrites that look at MatMuls and the final fold/cleanup.
        ExpandRecurrentPass(),
        FoldBatchNormPass(),
        MatMulAddToGemmPass(),
        FoldConstantsPass(),
        CleanupPass(),
        NameNodesPass(),
    )


CANONICALIZE = _canonicalize_passes


def canonicalize(model: ir.Model) -> ir.Model:
    """Run the canonicalisation passes in place and return the model."""
    _canonicalize_passes()(model)
    return model


@register_pass("canonicalize")
@dataclass
class CanonicalizePass(CimcPass):
    """The canonicalisation passes above, in order, as one named pipeline step."""

    ctx: CompileContext = field(repr=False)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = _canonicalize_passes()(model)
        return ir.passes.PassResult(model, result.modified)
