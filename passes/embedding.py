"""Embedding lookups written as one-hot × matrix become a ``Gather``.

Some exporters express an embedding as ``MatMul(OneHot(indices), W)``: a ``[…, depth]`` one-hot tensor times a
``[depth, N]`` matrix. Multiplying by a one-hot row selects a row of ``W``, so the product is ``Gather(W,
indices)``, without the one-hot tensor (for 2048 bytes and 257 classes that tensor alone is 2 MB of activation
memory) and without an MVM per position on the crossbar: the lookup is a digital memory read.

Rewrite rules (:class:`OneHotMatMulToGatherPass`):

1. ``MatMul(OneHot(i, depth, [off, on], axis=-1), W)``, ``W`` a ``[depth, N]`` matrix → ``Gather(W', i)`` with
   ``W' = (on − off)·W + off·Σ_k W[k]`` (= ``W`` for the usual off = 0, on = 1; the folded form keeps other
   values exact). ``depth`` and the values must be constant; ``W`` too unless the values are 0 and 1.
2. A ``Cast`` between the ``OneHot`` and the ``MatMul`` (one-hot made in an integer type, cast to float) is
   looked through: the ``Gather`` reads ``W`` in the MatMul's type.
3. Non-integer indices are cast to int64 first (the ``OneHot`` specification does the same); negative indices
   count from the end in both ops.
4. The comparison form some exporters write instead of ``OneHot`` (jax2tf's ``one_hot``):
   ``MatMul(Cast(Equal(i, arange(depth))), W)``, ``i`` integer with a trailing axis of 1 (``[…, 1]``), the other
   operand a constant ``0, 1, …, depth−1`` along its last axis (every other axis 1) → ``Gather(W, Reshape(i,
   […]))``. An index outside ``[0, depth)`` compares equal to nothing (a zero row) and is not rewritten
   correctly, as in rule 1; negative indices are not counted from the end here, so the rule needs them absent
   as well: it applies to integer index tensors only, the case of byte-valued inputs.

Difference from ONNX: an index outside ``[-depth, depth)`` makes ``OneHot`` an all-``off`` row, whereas
``Gather`` rejects it; a model that relies on out-of-range indices giving zeros is not rewritten correctly.

Requires: ``depth`` folded to a constant (run after constant folding). Ensures: no ``MatMul`` reads a
``OneHot`` (directly or through a ``Cast``) or an ``Equal`` one-hot whose depth, values and matrix satisfy rule 1
or rule 4: no one-hot tensor is left to hold in activation memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from cimc.ir import constant_array, node_attrs

__all__ = ["OneHotMatMulToGatherPass"]

logger = logging.getLogger(__name__)

_DEFAULT = ("", "ai.onnx")
_INTEGER = {ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64, ir.DataType.UINT8,
            ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64}


@dataclass(frozen=True)
class _OneHot:
    """A one-hot operand of a MatMul: the index tensor, the depth, the off/on values, and how it was written."""

    indices: ir.Value
    depth: ir.Value | int  # the OneHot's depth input (rule 1) or the comparison's length (rule 4)
    values: ir.Value | None  # the OneHot's values input; None: 0 and 1 (rule 4)
    axis: int
    comparison: bool  # rule 4: the indices carry a trailing axis of 1 to drop


def _one_hot_source(matmul: ir.Node) -> _OneHot | None:
    """The one-hot tensor feeding the MatMul's left operand (directly or through one Cast), or None."""
    producer = matmul.inputs[0].producer() if matmul.inputs[0] is not None else None
    cast = producer is not None and producer.op_type == "Cast" and producer.domain in _DEFAULT
    if cast:
        producer = producer.inputs[0].producer()
    if producer is None or producer.domain not in _DEFAULT:
        return None
    if producer.op_type == "OneHot":
        return _OneHot(producer.inputs[0], producer.inputs[1], producer.inputs[2],
                       int(node_attrs(producer).get("axis", -1)), False)
    if producer.op_type == "Equal" and cast:
        return _comparison_one_hot(producer)
    return None


def _comparison_one_hot(equal: ir.Node) -> _OneHot | None:
    """Rule 4: ``Equal(i[…, 1], arange(depth))`` (either operand order), or None."""
    for idx_value, ref_value in ((equal.inputs[0], equal.inputs[1]), (equal.inputs[1], equal.inputs[0])):
        ref = constant_array(ref_value)
        if ref is None or ref.ndim < 1 or idx_value is None or idx_value.dtype not in _INTEGER:
            continue
        shape = idx_value.shape
        if shape is None or len(shape) < 1 or not all(isinstance(d, int) for d in shape) or shape[-1] != 1:
            continue
        depth = ref.shape[-1]
        if any(d != 1 for d in ref.shape[:-1]) or len(ref.shape) > len(shape) or depth < 2:
            continue
        if not np.array_equal(ref.reshape(-1), np.arange(depth)):
            continue
        return _OneHot(idx_value, depth, None, -1, True)
    return None


def _lookup_table(one_hot: _OneHot, matmul: ir.Node) -> np.ndarray | ir.Value | None:
    """The matrix the Gather reads (rule 1), or None when the pattern does not apply."""
    axis = one_hot.axis
    rank = len(one_hot.indices.shape) if one_hot.indices.shape is not None else None
    if not (axis == -1 or (rank is not None and axis == rank)):
        return None  # the one-hot dimension is not the one the MatMul contracts
    if one_hot.comparison:
        depth, values = np.array(one_hot.depth), np.array([0.0, 1.0])
    else:
        depth, values = constant_array(one_hot.depth), constant_array(one_hot.values)
    w_value = matmul.inputs[1]
    if depth is None or values is None or values.size != 2 or w_value is None or w_value.shape is None:
        return None
    if len(w_value.shape) != 2 or w_value.shape[0] != int(depth.reshape(-1)[0]):
        return None
    off, on = (float(v) for v in values.reshape(-1))
    w = constant_array(w_value)
    if off == 0.0 and on == 1.0:
        return w_value  # any W, constant or not: the product selects rows
    if w is None:
        return None
    table = (on - off) * w.astype(np.float64) + off * w.astype(np.float64).sum(axis=0, keepdims=True)
    return table.astype(w.dtype)


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer named after ``name`` (made unique)."""
    while name in graph.initializers:
        name += "_"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


class OneHotMatMulToGatherPass(ir.passes.InPlacePass):
    """``MatMul(OneHot(i), W)`` → ``Gather(W, i)`` (rules in the module docstring)."""

    def requires(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type == "OneHot" and node.domain in _DEFAULT and any(
                _is_matmul(user) for out in node.outputs for user, _ in _readers(out)
            ) and constant_array(node.inputs[1]) is None:
                raise ir.passes.PreconditionError(f"OneHot {node.name!r}: depth not constant; fold constants first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if not _is_matmul(node):
                continue
            one_hot = _one_hot_source(node)
            if one_hot is None:
                continue
            table = _lookup_table(one_hot, node)
            if table is None:
                logger.info("MatMul %r reads a one-hot tensor but does not match the Gather rewrite", node.name)
                continue
            if isinstance(table, np.ndarray):
                table_value = _constant(graph, f"{node.name or 'onehot'}__table", table)
            else:
                table_value = table
            indices = one_hot.indices
            new_nodes = []
            if one_hot.comparison:  # rule 4: drop the trailing axis of 1 the comparison broadcast over
                dims = np.array(list(indices.shape)[:-1], np.int64)
                reshape = ir.node("Reshape", [indices, _constant(graph, f"{node.name}__index_shape", dims)],
                                  name=f"{node.name}__index_reshape", num_outputs=1)
                reshape.outputs[0].name = f"{node.name}__index_reshape_out"
                reshape.outputs[0].type = indices.type
                reshape.outputs[0].shape = ir.Shape(list(indices.shape)[:-1])
                new_nodes.append(reshape)
                indices = reshape.outputs[0]
            if indices.dtype not in _INTEGER:
                cast = ir.node("Cast", [indices], attributes={"to": ir.DataType.INT64}, name=f"{node.name}__indices",
                               num_outputs=1)
                cast.outputs[0].name = f"{node.name}__indices_out"
                cast.outputs[0].type = ir.TensorType(ir.DataType.INT64)
                cast.outputs[0].shape = indices.shape
                new_nodes.append(cast)
                indices = cast.outputs[0]
            gather = ir.node("Gather", [table_value, indices], attributes={"axis": 0}, name=f"{node.name}__gather",
                             num_outputs=1)
            new_nodes.append(gather)
            out = gather.outputs[0]
            old = node.outputs[0]
            out.type, out.shape = old.type, old.shape
            graph.insert_before(node, new_nodes)
            name = old.name
            old.name = f"{name}__replaced"
            old.replace_all_uses_with(out, replace_graph_outputs=True)
            out.name = name
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if _is_matmul(node) and (one_hot := _one_hot_source(node)) is not None and \
                    _lookup_table(one_hot, node) is not None:
                raise ir.passes.PostconditionError(f"MatMul {node.name!r} still multiplies a one-hot tensor")


def _is_matmul(node: ir.Node) -> bool:
    return node.op_type == "MatMul" and node.domain in _DEFAULT


def _readers(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """Nodes reading ``value``, looking through one Cast."""
    out = []
    for user, idx in value.uses():
        if user.op_type == "Cast" and user.domain in _DEFAULT:
            out.extend(user.outputs[0].uses())
        else:
            out.append((user, idx))
    return out
