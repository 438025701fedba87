"""Import of quantised ONNX models: integer ops with constant weights become float ops the crossbar can hold.

Quantisation tools (onnxruntime's ``quantize_dynamic`` / ``quantize_static``) store weights as int8/uint8 with a
scale and a zero point and compute in integers. On an analog chip the weights are conductances and the
DAC/ADC quantise anyway, so cimc dequantises constant weights at import into float initializers; the
activations' quantisation (a data-dependent range for dynamic quantisation, fixed scales for static) stays in
the graph as digital ops (``DynamicQuantizeLinear``, ``QuantizeLinear``, ``DequantizeLinear``), so the model
computes what onnxruntime computes, up to float rounding of the integer sums.

Rewrite rules (:class:`DequantizePass`; ``w``: a constant weight, ``zp``: zero point, ``s``: scale):

1. ``ConvInteger(x, w, x_zp, w_zp)`` → ``Conv(Cast(x) − x_zp, w − w_zp)``: a float convolution whose weights
   are the integer weights as floats (the exact integer sums; the scales are already applied by the graph's
   ``Mul`` after the ``Cast`` that follows). The ``Cast`` to float that reads the int32 result is bypassed;
   any other reader gets ``Cast(Round(y), int32)``.
2. ``MatMulInteger(a, b, a_zp, b_zp)`` with a constant ``b`` (or ``a``) → ``MatMul`` likewise.
3. ``QLinearConv(x, s_x, zp_x, w, s_w, zp_w, s_y, zp_y, B)`` → ``QuantizeLinear(Conv(DequantizeLinear(x),
   (w − zp_w)·s_w, B·s_x·s_w), s_y, zp_y)`` (per-output-channel ``s_w`` allowed; ``s_x`` must be constant).
4. ``QLinearMatMul(a, s_a, zp_a, b, s_b, zp_b, s_y, zp_y)`` with a constant ``b`` → ``QuantizeLinear(MatMul(
   DequantizeLinear(a), (b − zp_b)·s_b), s_y, zp_y)``.
5. ``com.microsoft.QGemm`` → ``Gemm`` on the dequantised operands (bias ``C·s_a·s_b``), quantised again when
   the node has an output scale.
6. ``com.microsoft`` element-wise and pooling ops on quantised tensors (``QLinearAdd``, ``QLinearMul``,
   ``QLinearAveragePool``, ``QLinearGlobalAveragePool``, ``QLinearConcat``, ``QLinearSigmoid``,
   ``QLinearLeakyRelu``) → ``DequantizeLinear`` on each input, the float op, ``QuantizeLinear`` on the output.
7. ``com.microsoft.DynamicQuantizeLSTM`` → a standard ``LSTM`` with the dequantised (and transposed back to
   ONNX's ``[directions, 4·hidden, inputs]``) ``W`` and ``R``.
8. QDQ-format models need no rule: a ``DequantizeLinear`` of a constant weight is folded into a float
   initializer by constant folding, the activations' ``QuantizeLinear``/``DequantizeLinear`` pairs run digitally.

A node whose weight is not constant (or whose layout a rule does not cover) is left as it is, and the executor
refuses it with the usual one-line message.

Requires: default-domain opset ≥ 10 (where the integer ops were introduced). Output shapes are copied when
known (``com.microsoft`` ops have none: shape inference after this pass fills them in). Ensures: no ``ConvInteger``,
``MatMulInteger``, ``QLinearConv``, ``QLinearMatMul`` or ``com.microsoft`` quantised op with a constant weight
remains.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from cimc.ir import constant_array, node_attrs

__all__ = ["DequantizePass"]

logger = logging.getLogger(__name__)

_MS = "com.microsoft"
# com.microsoft ops on quantised tensors: op type -> (float op, positions of (x, scale, zero point) triples,
# position of the output scale, variadic).
_QLINEAR_ELEMENTWISE = {
    "QLinearAdd": ("Add", [(0, 1, 2), (3, 4, 5)], 6),
    "QLinearMul": ("Mul", [(0, 1, 2), (3, 4, 5)], 6),
    "QLinearAveragePool": ("AveragePool", [(0, 1, 2)], 3),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", [(0, 1, 2)], 3),
    "QLinearSigmoid": ("Sigmoid", [(0, 1, 2)], 3),
    "QLinearLeakyRelu": ("LeakyRelu", [(0, 1, 2)], 3),
}
_HANDLED_DEFAULT = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul"}
_HANDLED_MS = {"QGemm", "QLinearConcat", "DynamicQuantizeLSTM", *_QLINEAR_ELEMENTWISE}


def _f32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


class _Builder:
    """Inserts new nodes and initializers in front of one node, with names derived from it."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node):
        self.graph = graph
        self.anchor = anchor
        self.prefix = anchor.name or anchor.op_type
        self.count = 0

    def _name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}__{what}{self.count}"

    def const(self, what: str, array: np.ndarray) -> ir.Value:
        name = self._name(what)
        while name in self.graph.initializers:
            name += "_"
        array = np.ascontiguousarray(array)
        value = ir.Value(name=name, shape=ir.Shape(array.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attrs: dict[str, Any] | None = None, *,
           dtype: ir.DataType = ir.DataType.FLOAT, shape: ir.Shape | None = None, num_outputs: int = 1) -> ir.Node:
        node = ir.node(op_type, list(inputs), attributes=attrs or {}, name=self._name(op_type.lower()),
                       num_outputs=num_outputs)
        for i, out in enumerate(node.outputs):
            out.name = f"{node.name}_out{i}"
        node.outputs[0].type = ir.TensorType(dtype)
        if shape is not None:
            node.outputs[0].shape = ir.Shape(shape)
        self.graph.insert_before(self.anchor, node)
        return node

    def out(self, op_type: str, inputs: Sequence[ir.Value | None], attrs: dict[str, Any] | None = None,
            **kw: Any) -> ir.Value:
        return self.op(op_type, inputs, attrs, **kw).outputs[0]

    def dequantize(self, x: ir.Value, scale: ir.Value, zp: ir.Value | None, shape: ir.Shape | None = None) -> ir.Value:
        """Float value of a quantised activation (a DequantizeLinear node, or the folded constant)."""
        arr = constant_array(x)
        if arr is not None and constant_array(scale) is not None and (zp is None or constant_array(zp) is not None):
            return self.const("dq", _dequantize_array(arr, constant_array(scale), constant_array(zp), axis=1))
        inputs = [x, scale] + ([zp] if zp is not None else [])
        return self.out("DequantizeLinear", inputs, shape=shape if shape is not None else x.shape)

    def quantize(self, y: ir.Value, scale: ir.Value, zp: ir.Value | None, like: ir.Value) -> ir.Value:
        inputs = [y, scale] + ([zp] if zp is not None else [])
        dtype = like.dtype
        if dtype is None:
            zp_arr = constant_array(zp)
            dtype = ir.DataType.from_numpy(zp_arr.dtype) if zp_arr is not None else ir.DataType.UINT8
        return self.out("QuantizeLinear", inputs, dtype=dtype, shape=like.shape)


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _per_axis(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A scalar, or a 1-D per-channel array shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    values = np.asarray(values)
    if values.ndim == 0 or values.size == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[axis] = values.size
    return values.reshape(shape)


def _dequantize_array(q: np.ndarray, scale: np.ndarray | None, zp: np.ndarray | None, axis: int) -> np.ndarray:
    x = q.astype(np.float32)
    if zp is not None:
        x = x - _per_axis(zp, q.ndim, axis).astype(np.float32)
    if scale is not None:
        x = x * _per_axis(scale, q.ndim, axis).astype(np.float32)
    return _f32(x)


def _replace_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Make every reader (and a graph output) of ``old`` read ``new`` instead; ``new`` takes over the name."""
    name = old.name
    old.name = f"{name}__replaced"
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    new.name = name


def _integer_result(graph: ir.Graph, b: _Builder, old: ir.Value, y: ir.Value) -> None:
    """Readers of an int32 accumulator ``old`` now get the float ``y``: a Cast to float reads y directly;
    anything else (and a graph output) reads ``Cast(Round(y), int32)``."""
    for user, _ in list(old.uses()):
        cast = user.op_type == "Cast" and user.domain in ("", "ai.onnx") and \
            node_attrs(user).get("to") == ir.DataType.FLOAT
        if cast and not user.outputs[0].is_graph_output():
            user.outputs[0].replace_all_uses_with(y)
            graph.remove(user, safe=True)
    if old.uses() or old.is_graph_output():
        rounded = b.out("Round", [y], shape=old.shape)
        _replace_output(graph, old, b.out("Cast", [rounded], {"to": ir.DataType.INT32}, dtype=ir.DataType.INT32,
                                          shape=old.shape))


def _zero_point_shift(b: _Builder, x: ir.Value, zp: ir.Value | None) -> ir.Value | None:
    """``Cast(x, float) − zp`` for an integer activation; None when a per-row zero point is not scalar."""
    xf = b.out("Cast", [x], {"to": ir.DataType.FLOAT}, shape=x.shape)
    if zp is None:
        return xf
    zp_arr = constant_array(zp)
    if zp_arr is not None:
        if zp_arr.size != 1:
            return None
        if float(zp_arr.reshape(-1)[0]) == 0.0:
            return xf
        return b.out("Sub", [xf, b.const("zp", _f32(zp_arr.reshape(())))], shape=x.shape)
    if zp.shape is not None and len(zp.shape) > 0 and any(d != 1 for d in zp.shape):
        return None
    zpf = b.out("Cast", [zp], {"to": ir.DataType.FLOAT}, shape=zp.shape)
    return b.out("Sub", [xf, zpf], shape=x.shape)


class DequantizePass(ir.passes.InPlacePass):
    """Rewrite quantised ops with constant weights into float ops (rules in the module docstring)."""

    def requires(self, model: ir.Model) -> None:
        # The integer ops exist from opset 10; the float ops written in their place follow opset 13 semantics.
        if any(self._handled(n) for n in model.graph) and model.opset_imports.get("", 13) < 10:
            raise ir.passes.PreconditionError("quantised ops need default-domain opset 10 or newer")

    @staticmethod
    def _handled(node: ir.Node) -> bool:
        if node.domain in ("", "ai.onnx"):
            return node.op_type in _HANDLED_DEFAULT
        return node.domain == _MS and node.op_type in _HANDLED_MS

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if not self._handled(node):
                continue
            rule = getattr(self, f"_rewrite_{node.op_type}", None)
            if rule is None:
                rule = self._rewrite_qlinear_elementwise
            b = _Builder(graph, node)
            if rule(graph, node, b):
                graph.remove(node, safe=True)
                modified = True
                logger.debug("dequantised %s %r", node.op_type, node.name)
            else:
                logger.info("left %s %r as it is (no constant weight, or a layout the rewrite does not cover)",
                            node.op_type, node.name)
        if modified and "" in model.opset_imports and model.opset_imports[""] < 13:
            model.opset_imports[""] = 13
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if not self._handled(node):
                continue
            weights = [v for v in node.inputs if v is not None and v.const_value is not None and v.const_value.dtype
                       in (ir.DataType.INT8, ir.DataType.UINT8) and len(v.shape or ()) >= 2]
            if weights and node.op_type != "DynamicQuantizeLSTM":
                raise ir.passes.PostconditionError(f"{node.op_type} {node.name!r} with a constant weight survived")

    # -- rule 1 ------------------------------------------------------------------------------------------
    def _rewrite_ConvInteger(self, graph: ir.Graph, node: ir.Node, b: _Builder) -> bool:  # noqa: N802
        x, w, x_zp, w_zp = (_input(node, i) for i in range(4))
        w_arr = constant_array(w)
        w_zp_arr = constant_array(w_zp) if w_zp is not None else None
        if w_arr is None or (w_zp is not None and w_zp_arr is None) or x is None:
            return False
        xf = _zero_point_shift(b, x, x_zp)
        if xf is None:
            return False
        weight = b.const("w", _dequantize_array(w_arr, None, w_zp_arr, axis=0))
        attrs = {k: v for k, v in node_attrs(node).items()}
        y = b.out("Conv", [xf, weight], attrs, shape=node.outputs[0].shape)
        _integer_result(graph, b, node.outputs[0], y)
        return True

    # -- rule 2 ------------------------------------------------------------------------------------------
    def _rewrite_MatMulInteger(self, graph: ir.Graph, node: ir.Node, b: _Builder) -> bool:  # noqa: N802
        a, w, a_zp, w_zp = (_input(node, i) for i in range(4))
        if constant_array(w) is not None and constant_array(a) is None:
            w_arr, zp_arr = constant_array(w), constant_array(w_zp) if w_zp is not None else None
            if w_zp is not None and zp_arr is None or w_arr.ndim != 2:
                return False
            af = _zero_point_shift(b, a, a_zp)
            if af is None:
                return False
            weight = b.const("w", _dequantize_array(w_arr, None, zp_arr, axis=1))  # zero point per column
            y = b.out("MatMul", [af, weight], shape=node.outputs[0].shape)
        elif constant_array(a) is not None and constant_array(w) is None:
            a_arr, zp_arr = constant_array(a), constant_array(a_zp) if a_zp is not None else None
            if a_zp is not None and zp_arr is None or a_arr.ndim != 2:
                return False
            wf = _zero_point_shift(b, w, w_zp)
            if wf is None:
                return False
            weight = b.const("w", _dequantize_array(a_arr, None, zp_arr, axis=0))  # zero point per row
            y = b.out("MatMul", [weight, wf], shape=node.outputs[0].shape)
        else:
            return False
        _integer_result(graph, b, node.outputs[0], y)
        return True

    # -- rule 3 ------------------------------------------------------------------------------------------
    def _rewrite_QLinearConv(self, graph: ir.Graph, node: ir.Node, b: _Builder) -> bool:  # noqa: N802
        x, sx, zx, w, sw, zw, sy, zy = (_input(node, i) for i in range(8))
        bias = _input(node, 8)
        w_arr, sw_arr = constant_array(w), constant_array(sw)
        zw_arr = constant_array(zw) if zw is not None else None
        if w_arr is None or sw_arr is None or (zw is not None and zw_arr is None):
            return False
        inputs = [b.dequantize(x, sx, zx), b.const("w", _dequantize_array(w_arr, sw_arr, zw_arr, axis=0))]
        if bias is not None:
            b_arr, sx_arr = constant_array(bias), constant_array(sx)
            if b_arr is None or sx_arr is None:
                return False
            inputs.append(b.const("b", _f32(b_arr.astype(np.float64) * sx_arr.reshape(-1) * sw_arr.reshape(-1))))
        y = b.out("Conv", inputs, node_attrs(node), shape=node.outputs[0].shape)
        _replace_output(graph, node.outputs[0], b.quantize(y, sy, zy, node.outputs[0]))
        return True

    # -- rule 4 ------------------------------------------------------------------------------------------
    def _rewrite_QLinearMatMul(self, graph: ir.Graph, node: ir.Node, b: _Builder) -> bool:  # noqa: N802
        a, sa, za, w, sw, zw, sy, zy = (_input(node, i) for i in range(8))
        if constant_array(w) is not None and constant_array(sw) is not None:
            zw_arr = constant_array(zw) if zw is not None else None
            if zw is not None and zw_arr is None or constant_array(w).ndim != 2:
                return False
            weight = b.const("w", _dequantize_array(constant_array(w), constant_array(sw), zw_arr, axis=1))
            inputs = [b.dequantize(a, sa, za), weight]
        elif constant_array(a) is not None and constant_array(sa) is not None:
            za_arr = constant_array(za) if za is not None else None
            if za is not None and za_arr is None or constant_array(a).ndim != 2:
                return False
            weight = b.const("w", _dequantize_array(constant_array(a), constant_array(sa), za_arr, axis=0))
            inputs = [weight, b.dequantize(w, sw, zw)]
        else:
            return False
        y = b.out("MatMul", inputs, shape=node.outputs[0].shape)
        _replace_output(graph, node.outputs[0], b.quantize(y, sy, zy, node.outputs[0]))
        return True

    # -- rule 5 ------------------------------------------------------------------------------------------
    def _rewrite_QGemm(self, graph: ir.Graph, node: ir.Node, b: _Builder) -> bool:  # noqa: N802
        a, sa, za, w, sw, zw = (_input(node, i) for i in range(6))
        c, sy, zy = _input(node, 6), _input(node, 7), _input(node, 8)
        attrs = node_attrs(node)
        w_arr, sw_arr = constant_array(w), constant_array(sw)
        zw_arr = constant_array(zw) if zw is not None else None
        if w_arr is None or sw_arr is None or (zw is not None and zw_arr is None) or w_arr.ndim != 2:
            return False
        col_axis = 0 if attrs.get("transB", 0) else 1  # per-output-column scales
        inputs = [b.dequantize(a, sa, za), b.const("w", _dequantize_array(w_arr, sw_arr, zw_arr, axis=col_axis))]
        if c is not None:
            c_arr, sa_arr = constant_array(c), constant_array(sa)
            if c_arr is None or sa_arr is None:
                return False
            inputs.append(b.const("c", _f32(c_arr.astype(np.float64) * sa_arr.reshape(-1) * sw_arr.reshape(-1))))
        gemm_attrs = {k: attrs[k] for k in ("alpha", "transA", "transB") if k in attrs}
        y = b.out("Gemm", inputs, gemm_attrs, shape=node.outputs[0].shape)
        _replace_output(graph, node.outputs[0], b.quantize(y, sy, zy, node.outputs[0]) if sy is not None else y)
        return True

    # -- rule 6 ------------------------------------------------------------------------------------------
    def _rewrite_qlinear_elementwise(self, graph: ir.Graph, node: ir.Node, b: _Builder) -> bool:
        op, triples, out_scale = _QLINEAR_ELEMENTWISE[node.op_type]
        attrs = node_attrs(node)
        if attrs.pop("channels_last", 0):
            return False
        floats = [b.dequantize(node.inputs[i], node.inputs[s], _input(node, z)) for i, s, z in triples]
        y = b.out(op, floats, attrs, shape=node.outputs[0].shape)
        q = b.quantize(y, node.inputs[out_scale], _input(node, out_scale + 1), node.outputs[0])
        _replace_output(graph, node.outputs[0], q)
        return True

    def _rewrite_QLinearConcat(self, graph: ir.Graph, node: ir.Node, b: _Builder) -> bool:  # noqa: N802
        sy, zy = node.inputs[0], node.inputs[1]
        rest = list(node.inputs[2:])
        if len(rest) % 3:
            return False
        floats = [b.dequantize(rest[i], rest[i + 1], rest[i + 2]) for i in range(0, len(rest), 3)]
        y = b.out("Concat", floats, {"axis": node_attrs(node)["axis"]}, shape=node.outputs[0].shape)
        _replace_output(graph, node.outputs[0], b.quantize(y, sy, zy, node.outputs[0]))
        return True

    # -- rule 7 ------------------------------------------------------------------------------------------
    def _rewrite_DynamicQuantizeLSTM(self, graph: ir.Graph, node: ir.Node, b: _Builder) -> bool:  # noqa: N802
        # Inputs: X, W, R, B, sequence_lens, initial_h, initial_c, P, W_scale, W_zero_point, R_scale, R_zero_point
        # W: [directions, inputs, 4·hidden], R: [directions, hidden, 4·hidden] (transposed against ONNX LSTM).
        ins = [_input(node, i) for i in range(12)]
        mats = []
        for q, s, z in ((ins[1], ins[8], ins[9]), (ins[2], ins[10], ins[11])):
            q_arr, s_arr = constant_array(q), constant_array(s)
            z_arr = constant_array(z) if z is not None else None
            if q_arr is None or s_arr is None or (z is not None and z_arr is None) or q_arr.ndim != 3:
                return False
            dirs = q_arr.shape[0]
            s3 = np.asarray(s_arr, np.float32).reshape(dirs, 1, -1)  # per direction, or per direction and column
            z3 = np.zeros_like(s3) if z_arr is None else np.asarray(z_arr, np.float32).reshape(dirs, 1, -1)
            mats.append(b.const("w", _f32(((q_arr.astype(np.float32) - z3) * s3).transpose(0, 2, 1))))
        lstm = ir.node("LSTM", [ins[0], mats[0], mats[1], *ins[3:8]], attributes=node_attrs(node),
                       name=b._name("lstm"), num_outputs=len(node.outputs))
        graph.insert_before(node, lstm)
        for old, new in zip(node.outputs, lstm.outputs):
            new.type, new.shape = old.type, old.shape
            _replace_output(graph, old, new)
        return True
