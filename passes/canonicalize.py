"""Canonicalisation: bring an imported graph to the form the mapper expects.

Passes (each an onnx-ir pass; :data:`CANONICALIZE` runs them in this order):

0. :class:`~cimc.passes.dequantize.DequantizePass` — quantised models (ConvInteger, MatMulInteger, QLinear*,
   com.microsoft quantised ops): constant integer weights become float initializers (``passes/dequantize.py``).
1. :class:`FoldToFixpointPass` — repeats, until nothing changes:
   :class:`FoldConstantsPass` (every node whose inputs are all constant is evaluated by cimc's own op table,
   the code the executor runs, and replaced by an initializer; ``Shape`` of a statically shaped value becomes
   a constant: ``Constant``, ``ConstantOfShape`` and shape arithmetic become initializers),
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

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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

from cimc.ir import constant_array, graph_inputs_upstream, name_nodes, node_attrs, static_shape
from cimc.passes.conv_transpose import ConvTransposeToConvPass
from cimc.passes.dequantize import DequantizePass
from cimc.passes.embedding import OneHotMatMulToGatherPass
from cimc.ops import OPS
from cimc.passes.recurrent import ExpandRecurrentPass
from cimc.pipeline import CimcPass, CompileContext, register_pass

__all__ = [
    "CANONICALIZE",
    "CanonicalizePass",
    "CleanupPass",
    "FoldBatchNormPass",
    "FoldConstantsPass",
    "FoldToFixpointPass",
    "InlineConstantIfPass",
    "PredicateIfPass",
    "MatMulAddToGemmPass",
    "RemoveNoOpsPass",
    "canonicalize",
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


class FoldConstantsPass(ir.passes.InPlacePass):
    """Evaluate every node whose inputs are constant and replace its outputs with initializers.

    Rules:
      1. ``Shape(x)`` where x has a fully static shape → int64 initializer.
      2. A node of a known, deterministic op whose every (present) input is constant → its outputs become
         initializers, computed with :data:`cimc.ops.OPS`.
      3. Nodes producing graph outputs are left in place (an output stays an output of a node).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC:
                continue
            if node.op_type not in OPS or any(out.is_graph_output() for out in node.outputs):
                continue
            results: list[np.ndarray] | None = None
            if node.op_type == "Shape" and static_shape(node.inputs[0]) is not None:
                dims = list(static_shape(node.inputs[0]) or ())
                a = node_attrs(node)
                results = [np.asarray(dims[a.get("start", 0) : a.get("end", len(dims))], dtype=np.int64)]
            elif all(v is None or constant_array(v) is not None for v in node.inputs):
                tensors = [None if v is None else torch.from_numpy(np.array(constant_array(v))) for v in node.inputs]
                try:
                    results = [t.numpy() for t in _evaluate(node, tensors)]
                except Exception as exc:  # an op we cannot fold here is left to run at execution time
                    logger.debug("not folding %s (%s): %s", node.name, node.op_type, exc)
                    continue
            if results is None:
                continue
            for out, arr in zip(node.outputs, results):
                if out.uses():
                    _replace_with_constant(graph, out, np.array(arr, order="C"))  # ascontiguousarray makes 0-d 1-d
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)

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
