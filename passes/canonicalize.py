"""Canonicalisation: bring an imported graph to the form the mapper expects.

Passes (each an onnx-ir pass; :data:`CANONICALIZE` runs them in this order):

0. :class:`~cimc.passes.dequantize.DequantizePass` — quantised models (ConvInteger, MatMulInteger, QLinear*,
   com.microsoft quantised ops): constant integer weights become float initializers (``passes/dequantize.py``).
1. :class:`FoldConstantsPass` — every node whose inputs are all constant is evaluated (by cimc's own op
   table, the code the executor runs) and replaced by an initializer; ``Shape`` of a statically shaped value
   becomes a constant. This turns ``Constant``, ``ConstantOfShape`` and shape-arithmetic subgraphs into
   initializers.
   Then :class:`~cimc.passes.embedding.OneHotMatMulToGatherPass` — ``MatMul(OneHot(i), W)`` → ``Gather(W, i)``.
2. :class:`RemoveNoOpsPass` — ``Identity`` and inference-mode ``Dropout`` disappear.
3. :class:`FoldBatchNormPass` — ``BatchNormalization`` directly after a ``Conv`` or ``Gemm`` (whose output
   nothing else reads) is folded into its weights and bias (onnxscript's rewrite rules).
4. :class:`MatMulAddToGemmPass` — ``Add(MatMul(x, W), b)`` with constant 2-D ``W`` and constant ``b`` becomes
   one ``Gemm`` (onnxscript's rule, restricted to constant operands).
5. :class:`CleanupPass` — unused nodes, initializers and opsets are removed; nodes are sorted topologically.

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
    IdentityEliminationPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
    ShapeInferencePass,
    TopologicalSortPass,
)
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter.rules.common import fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_gemm_rule
from onnxscript.rewriter.rules.common._matmul_add_to_gemm import MatMulAddToGemm

from cimc.ir import constant_array, node_attrs, static_shape
from cimc.passes.dequantize import DequantizePass
from cimc.passes.embedding import OneHotMatMulToGatherPass
from cimc.ops import OPS
from cimc.pipeline import CimcPass, CompileContext, register_pass

__all__ = [
    "CANONICALIZE",
    "CanonicalizePass",
    "CleanupPass",
    "FoldBatchNormPass",
    "FoldConstantsPass",
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
        for node in model.graph:
            if node.op_type in ("Constant", "ConstantOfShape") and not any(o.is_graph_output() for o in node.outputs):
                raise ir.passes.PostconditionError(f"{node.op_type} node {node.name!r} was not folded")


class RemoveNoOpsPass(ir.passes.InPlacePass):
    """Remove ``Identity`` nodes and inference-mode ``Dropout`` (whose mask output nobody reads).

    Rules:
      1. ``Dropout(x)`` with an unused mask output → its uses read ``x`` (unless it feeds a graph output,
         in which case it becomes an ``Identity`` for rule 2 to handle).
      2. ``Identity`` nodes are removed by onnx-ir's ``IdentityEliminationPass``.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
                continue
            if len(node.outputs) > 1 and node.outputs[1].uses():
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
        result = IdentityEliminationPass()(model)
        return ir.passes.PassResult(model, modified or result.modified)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type == "Dropout" and not (len(node.outputs) > 1 and node.outputs[1].uses()):
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
        FoldConstantsPass(),
        # Folded Reshape targets make shapes after a flatten known; MatMulAddToGemm needs their rank.
        ShapeInferencePass(),
        OneHotMatMulToGatherPass(),  # embedding lookups written as one-hot x matrix (passes/embedding.py)
        RemoveNoOpsPass(),
        FoldBatchNormPass(),
        MatMulAddToGemmPass(),
        FoldConstantsPass(),
        CleanupPass(),
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
