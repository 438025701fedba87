"""The quantised digital twin: a compiled model as plain ONNX with QuantizeLinear/DequantizeLinear pairs.

It reads the converter ranges the ``quantize`` pass stored in ``cimc.quant`` (through
:func:`cimc.runtime.analog.layer_plans`) and writes standard ONNX that onnxruntime runs, so the compiled
artefact (``model.qdq.onnx``), the tests and the pass itself share one builder below the passes.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from cimc.ir import constant_array, is_analog, node_attrs
from cimc.runtime.analog import layer_plans, levels

__all__ = ["build_qdq_twin"]

logger = logging.getLogger(__name__)


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _qdq(graph: ir.Graph, x: ir.Value, x_max: np.ndarray, bits: int, signed: bool, axis: int, prefix: str,
         before: ir.Node) -> ir.Value:
    """Insert clip (Min/Max) + QuantizeLinear + DequantizeLinear on ``x``; returns the dequantised value."""
    x_max = np.asarray(x_max, dtype=np.float32)
    n_levels = levels(bits, signed)
    scale = (x_max / n_levels).astype(np.float32)
    zp_dtype = np.int8 if signed else np.uint8
    rank = len(x.shape) if x.shape is not None else 2
    bshape = [1] * rank
    if x_max.ndim == 1:
        bshape[axis] = x_max.shape[0]
    hi = _const(graph, f"{prefix}_hi", x_max.reshape(bshape))
    lo = _const(graph, f"{prefix}_lo", (-x_max if signed else np.zeros_like(x_max)).reshape(bshape))
    sc = _const(graph, f"{prefix}_scale", scale)
    zp = _const(graph, f"{prefix}_zp", np.zeros(scale.shape, dtype=zp_dtype))
    attrs = {"axis": axis} if x_max.ndim == 1 else {}
    nodes = [
        ir.node("Min", [x, hi], name=f"{prefix}_min", num_outputs=1),
    ]
    nodes.append(ir.node("Max", [nodes[-1].outputs[0], lo], name=f"{prefix}_max", num_outputs=1))
    nodes.append(ir.node("QuantizeLinear", [nodes[-1].outputs[0], sc, zp], attributes=attrs, name=f"{prefix}_q",
                         num_outputs=1))
    nodes.append(ir.node("DequantizeLinear", [nodes[-1].outputs[0], sc, zp], attributes=attrs, name=f"{prefix}_dq",
                         num_outputs=1))
    code_type = ir.TensorType(ir.DataType.INT8 if signed else ir.DataType.UINT8)
    for i, n in enumerate(nodes):
        n.outputs[0].name = f"{prefix}_{['min', 'max', 'q', 'dq'][i]}_out"
        # Typed values: full_check shape inference and every downstream tool need them.
        n.outputs[0].shape = x.shape
        n.outputs[0].type = code_type if i == 2 else x.type
    graph.insert_before(before, nodes)
    return nodes[-1].outputs[0]


def _matrix_mask_to_weight(node: ir.Node, weight_shape: tuple[int, ...], mask: np.ndarray) -> np.ndarray:
    """A [G, K, N] matrix-view mask in the ONNX weight's layout (inverse of weight_to_matrix)."""
    a = node_attrs(node)
    if node.op_type == "Conv":
        return mask.transpose(0, 2, 1).reshape(weight_shape)
    mat = mask[0]
    if node.op_type == "Gemm":
        return mat.T if a.get("transB", 0) else mat
    return mat


def build_qdq_twin(model: ir.Model) -> ir.Model:
    """The calibrated model as plain ONNX with QuantizeLinear/DequantizeLinear pairs (onnxruntime runs it).

    Per analog layer: DAC = clip + Q/DQ on its input; each tile = the op with the weight masked to the tile's
    rows and columns, no bias, then clip + Q/DQ at the ADC's full scale; tiles are summed and the bias added.
    Layers with converters wider than 8 bits, or ``W @ x`` MatMuls, keep float semantics there.
    """
    twin = ir.from_proto(ir.to_proto(model))
    graph = twin.graph
    plans = layer_plans(twin)
    for node in list(graph):
        plan = plans.get(node.name)
        if plan is None or plan.quant is None or not is_analog(node):
            continue
        q = plan.quant
        if node.op_type == "MatMul" and constant_array(node.inputs[1]) is None:
            logger.warning("twin: %s (W @ x) keeps float converters", node.name)
            continue
        prefix = node.name.replace("/", "_")
        x = node.inputs[0]
        if q.dac_bits is not None and q.dac_bits <= 8:
            x = _qdq(graph, x, np.float32(q.x_max), q.dac_bits, q.dac_signed, 1, f"{prefix}_dac", node)
        out = node.outputs[0]
        weight_value = node.inputs[1]
        weight = constant_array(weight_value)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        axis = 1 if node.op_type in ("Conv", "Gemm") else len(out.shape) - 1
        tile_outs: list[ir.Value] = []
        attrs = dict(node.attributes)
        n_out = plan.groups * plan.cols
        if plan.whole_groups:  # one node, per-channel ADC scales cover every group
            pieces = [(weight_value, [np.broadcast_to(np.asarray(q.y_max[i], np.float32), (plan.cols,))
                                      for i in range(len(plan.tiles))])]
        else:
            pieces = []
            for i, t in enumerate(plan.tiles):
                mask = np.zeros((plan.groups, plan.rows, plan.cols), dtype=np.float32)
                mask[t.group, t.r0 : t.r1, t.c0 : t.c1] = 1.0
                w_t = (weight * _matrix_mask_to_weight(node, weight.shape, mask)).astype(np.float32)
                full = np.ones(n_out, dtype=np.float32)  # columns outside the tile read zero: any scale works
                full[t.group * plan.cols + t.c0 : t.group * plan.cols + t.c1] = q.y_max[i]
                pieces.append((_const(graph, f"{prefix}_tile{i}_w", w_t), [full]))
        for i, (w_val, y_max_parts) in enumerate(pieces):
            tile_node = ir.node(node.op_type, [x, w_val], attributes=attrs, name=f"{prefix}_tile{i}", num_outputs=1)
            tile_node.outputs[0].name = f"{prefix}_tile{i}_out"
            graph.insert_before(node, [tile_node])
            y = tile_node.outputs[0]
            y.shape = out.shape
            y.type = out.type
            if q.adc_bits is not None and q.adc_bits <= 8:
                y_max = np.concatenate([np.asarray(p, np.float32).reshape(-1) for p in y_max_parts])
                if plan.whole_groups and plan.groups == 1 and np.ndim(q.y_max[0]) == 0:
                    y_max = np.float32(y_max[0])  # one ADC gain for the layer: a per-tensor scale
                y = _qdq(graph, y, y_max, q.adc_bits, True, axis, f"{prefix}_tile{i}_adc", node)
            tile_outs.append(y)
        total = tile_outs[0]
        if len(tile_outs) > 1:
            s = ir.node("Sum", tile_outs, name=f"{prefix}_tiles_sum", num_outputs=1)
            s.outputs[0].name = f"{prefix}_tiles_sum_out"
            graph.insert_before(node, [s])
            total = s.outputs[0]
        if bias is not None:
            b_arr = constant_array(bias).astype(np.float32)
            if node.op_type == "Conv":
                b_arr = b_arr.reshape(1, -1, *([1] * (len(out.shape) - 2)))
            else:
                b_arr = b_arr * float(node_attrs(node).get("beta", 1.0))
            add = ir.node("Add", [total, _const(graph, f"{prefix}_bias", b_arr)], name=f"{prefix}_bias_add",
                          num_outputs=1)
            add.outputs[0].name = f"{prefix}_bias_out"
            graph.insert_before(node, [add])
            total = add.outputs[0]
        total.shape, total.type = out.shape, out.type
        out.replace_all_uses_with(total, replace_graph_outputs=True)
        total_name = out.name
        out.name = f"{total_name}__analog"
        total.name = total_name
        graph.remove(node, safe=True)
    # The analog nodes' own weights and biases were replaced by tile weights and bias constants.
    for name in [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.outputs]:
        graph.initializers.pop(name)
    batch = int(model.graph.meta.get("cimc.batch", 1)) if hasattr(model.graph, "meta") else 1
    first = graph.inputs[0].shape[0] if graph.inputs and graph.inputs[0].shape is not None else batch
    twin.doc_string = ("cimc digital twin of the compiled model: DAC and per-tile ADC as QuantizeLinear/DequantizeLinear pairs; "
                       f"batch dimension fixed at {first} (the compiled batch size; compile with --batch-size N "
                       "for another)")
    return twin
