"""``ConvTranspose`` with a constant weight → zero insertion + ``Conv``, so it maps onto the crossbar.

A transposed convolution with stride s, dilation d, pads (p_b, p_e) and output padding o equals an
ordinary convolution, stride 1, dilation d, of the input with s − 1 zeros inserted between neighbouring
elements and padded by d·(k − 1) − p_b in front and d·(k − 1) − p_e + o behind, with the kernel flipped in
every spatial axis and its input/output channel axes swapped (per group). The zero insertion is
expressed with ONNX ops (``Unsqueeze`` → ``Pad`` → ``Reshape``) and the padding with one ``Pad`` (negative
amounts crop), so the rewritten graph is plain ONNX that onnxruntime runs too.

The ``Conv`` then is an analog op like any other: K = (C_in / g)·∏k rows, N = C_out / g columns, one MVM per
output position. The MVM count includes the inserted zeros (s^dims times the input's positions): this is
the cost of running a transposed convolution on a crossbar as a convolution.

Only nodes with a constant weight and a static input shape are rewritten; any other ``ConvTranspose`` stays
and runs on the digital unit.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from cimc.ir import constant_array, node_attrs, static_shape
from cimc.ops import conv_transpose_pads

__all__ = ["ConvTransposeToConvPass", "flipped_conv_weight"]

logger = logging.getLogger(__name__)


def flipped_conv_weight(weight: np.ndarray, groups: int) -> np.ndarray:
    """ConvTranspose weight [C_in, C_out/g, *k] → the equivalent Conv weight [C_out, C_in/g, *k]."""
    c_in, c_out_g = weight.shape[:2]
    kernel = weight.shape[2:]
    w = weight.reshape(groups, c_in // groups, c_out_g, *kernel)
    w = np.swapaxes(w, 1, 2).reshape(groups * c_out_g, c_in // groups, *kernel)
    return np.ascontiguousarray(np.flip(w, axis=tuple(range(2, w.ndim))))


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 1
    while name in graph.initializers:  # unnamed nodes would otherwise share their constants' names
        name, i = f"{base}_{i}", i + 1
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _typed(value: ir.Value, shape: list[int], like: ir.Value) -> None:
    """Give a new intermediate value its (static) shape and the element type of ``like``."""
    value.shape = ir.Shape(shape)
    value.type = like.type


class ConvTransposeToConvPass(ir.passes.InPlacePass):
    """Rewrite every ``ConvTranspose`` with a constant weight and a static input into zero insertion + ``Conv``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx"):
                continue
            weight = constant_array(node.inputs[1])
            x_shape = static_shape(node.inputs[0])
            if weight is None or x_shape is None:
                continue
            self._rewrite(graph, node, weight, list(x_shape))
            modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _rewrite(graph: ir.Graph, node: ir.Node, weight: np.ndarray, x_shape: list[int]) -> None:
        a = node_attrs(node)
        a.setdefault("kernel_shape", list(weight.shape[2:]))
        groups = int(a.get("group", 1))
        spatial = len(x_shape) - 2
        kernel = list(weight.shape[2:])
        strides, dilations, pads, out_pad, _ = conv_transpose_pads(x_shape, list(weight.shape), a)
        base = node.name or "ConvTranspose"
        new_nodes: list[ir.Node] = []
        x = node.inputs[0]
        if any(s > 1 for s in strides):
            # [N, C, D1, ..] → [N, C, D1, 1, D2, 1, ..] → pad each new axis to s → [N, C, D1·s1, D2·s2, ..]
            axes = [3 + 2 * i for i in range(spatial)]
            unsq = ir.Node("", "Unsqueeze", [x, _const(graph, f"{base}_zi_axes", np.array(axes, np.int64))],
                           name=f"{base}_zi_unsqueeze")
            rank = len(x_shape) + spatial
            zpads = [0] * (2 * rank)
            for i, ax in enumerate(axes):
                zpads[rank + ax] = strides[i] - 1
            padded = ir.Node("", "Pad", [unsq.outputs[0], _const(graph, f"{base}_zi_pads", np.array(zpads, np.int64))],
                             name=f"{base}_zi_pad")
            target = x_shape[:2] + [x_shape[2 + i] * strides[i] for i in range(spatial)]
            # 0 = "the input's size": the batch stays free, as in the model the user exported
            flat = ir.Node("", "Reshape", [padded.outputs[0], _const(graph, f"{base}_zi_shape",
                                                                        np.array([0, *target[1:]], np.int64))],
                           name=f"{base}_zi_reshape")
            unsq_shape = list(x_shape[:2])
            for d in x_shape[2:]:
                unsq_shape += [d, 1]
            _typed(unsq.outputs[0], unsq_shape, x)
            _typed(padded.outputs[0], [d if i < 2 or i % 2 == 0 else strides[(i - 3) // 2]
                                       for i, d in enumerate(unsq_shape)], x)
            _typed(flat.outputs[0], target, x)
            new_nodes += [unsq, padded, flat]
            x = flat.outputs[0]
            x_shape = target
        # the zero-inserted input has s − 1 trailing zeros too many per axis; the end padding absorbs them
        begin = [dilations[i] * (kernel[i] - 1) - pads[i] for i in range(spatial)]
        end = [dilations[i] * (kernel[i] - 1) - pads[spatial + i] + out_pad[i] - (strides[i] - 1)
               for i in range(spatial)]
        if any(begin) or any(end):
            full = [0, 0] + begin + [0, 0] + end
            pad = ir.Node("", "Pad", [x, _const(graph, f"{base}_pads", np.array(full, np.int64))], name=f"{base}_pad")
            _typed(pad.outputs[0], x_shape[:2] + [x_shape[2 + i] + begin[i] + end[i] for i in range(spatial)], x)
            new_nodes.append(pad)
            x = pad.outputs[0]
        w = _const(graph, f"{base}_conv_weight", flipped_conv_weight(weight, groups).astype(weight.dtype))
        inputs = [x, w] + ([node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] is not None else [])
        conv = ir.Node("", "Conv", inputs, [ir.AttrInt64s("dilations", dilations), ir.AttrInt64("group", groups),
                                            ir.AttrInt64s("kernel_shape", kernel),
                                            ir.AttrInt64s("strides", [1] * spatial)],
                       name=f"{base}_as_conv")
        new_nodes.append(conv)
        old_out = node.outputs[0]
        conv.outputs[0].shape = old_out.shape
        conv.outputs[0].type = old_out.type
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [old_out], [conv.outputs[0]])
        logger.debug("ConvTranspose %r rewritten as zero insertion + Conv", node.name)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type == "ConvTranspose" and constant_array(node.inputs[1]) is not None \
                    and static_shape(node.inputs[0]) is not None:
                raise ir.passes.PostconditionError(f"ConvTranspose {node.name!r} was not rewritten")
