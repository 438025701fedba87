"""Recurrent layers (``LSTM``, ``GRU``, ``RNN``) expanded into primitive ONNX ops the mapper and executor know.

A recurrent layer is, per direction and time step, two matrix products — the input's ``W·x_t`` and the
recurrent ``R·h_{t-1}`` — plus element-wise gates. After this pass the products are ``MatMul`` s with
constant weights (analog: programmed onto the crossbar once, read once per step) and the gates are
``Sigmoid``/``Tanh``/``Mul``/``Add`` on the digital unit.

Rules (:class:`ExpandRecurrentPass`; gate order and equations exactly as the ONNX operator specification):

1. Per direction (``fw``, ``bw``), the input projection of all T steps is ONE ``MatMul`` of the sequence,
   batch-major ``[B, T, I]`` (a ``Transpose`` first when ``layout`` = 0), with the constant ``W^T`` ``[I,
   gates·H]``: an analog layer performing T MVMs per inference. The biases ``Wb + Rb`` (for GRU with
   ``linear_before_reset`` = 1, ``Rb_h`` stays inside the reset product) are added digitally, then a
   ``Split`` along time and ``Squeeze`` give each step's ``[B, gates·H]`` slice. Batch-major rows keep every
   sample's (and every Monte Carlo instance's) rows together, as the analog hook expects.
2. Per step, ``MatMul(h_{t-1}, R^T)`` reads ONE constant ``R^T`` ``[H, gates·H]`` initializer shared by every
   step of the direction (one weight tensor, T uses). Steps run t = 0…T−1 (forward) or T−1…0 (reverse).
3. LSTM (gates i, o, f, c): ``i = f(X_i + R_i h + P_i ⊙ c)``, ``f = f(X_f + R_f h + P_f ⊙ c)`` (``1 − i`` with
   ``input_forget``), ``g = g(X_c + R_c h)``, ``c' = f ⊙ c + i ⊙ g``, ``o = f(X_o + R_o h + P_o ⊙ c')``,
   ``h' = o ⊙ h(c')``. GRU (gates z, r, h): ``z``, ``r`` likewise; ``linear_before_reset`` = 0:
   ``h~ = g(X_h + (r ⊙ h) R_h^T)`` — a second shared constant ``R_h^T``, so still analog —; = 1:
   ``h~ = g(X_h + r ⊙ (h R_h^T + Rb_h))``; ``h' = h~ + z ⊙ (h − h~)``. RNN: ``h' = f(X + R h)``.
   ``clip`` bounds every activation's input to [−clip, clip].
4. Initial states: an absent or all-zero ``initial_h``/``initial_c`` is a zero state, so step 0 has no
   recurrent product (and no peephole term); a constant one is sliced per direction at compile time; one
   computed at run time (a graph input) is split per direction with ``Split``/``Squeeze``. A constant state
   whose batch is 1 broadcasts over any run-time batch.
5. Outputs: ``Y`` is the ``Unsqueeze``/``Concat`` of the steps' ``h`` in time order (``[T, D, B, H]`` or
   ``[B, T, D, H]`` for ``layout`` = 1), ``Y_h``/``Y_c`` the last step's ``h``/``c``; only the outputs that
   are read are built. Graph outputs keep their names.

Every op is shape-agnostic in the batch (no ``Reshape`` with the batch baked in), so a model imported with
batch 1 runs with any batch. New nodes are named from the layer's name: ``<lstm>/fw/x_proj``,
``<lstm>/fw/t3/r_proj``, ``<lstm>/bw/t0/h`` … Layers :func:`cimc.ir.recurrent_refusal` refuses (variable
sequence lengths, non-constant weights, unknown activations) stay in place; :func:`cimc.ir.classify`
reports them as unsupported with that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from cimc.ir import RECURRENT_ACTIVATIONS, RECURRENT_OPS, constant_array, node_attrs, recurrent_refusal, static_shape

__all__ = ["ExpandRecurrentPass", "expand_recurrent"]

logger = logging.getLogger(__name__)

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
# Activation parameters: which of (alpha, beta) each function reads, and the value it gets when the attribute
# lists run out. These follow onnxruntime (the reference cimc is held to), which defaults Affine, ScaledTanh
# and ThresholdedRelu to 0 rather than to the stand-alone ops' defaults.
_PARAMS: dict[str, tuple[float | None, float | None]] = {
    "Affine": (0.0, 0.0),
    "LeakyRelu": (0.01, None),
    "ThresholdedRelu": (0.0, None),
    "ScaledTanh": (0.0, 0.0),
    "HardSigmoid": (0.2, 0.5),
    "Elu": (1.0, None),
}
_CANONICAL_NAME = {n.lower(): n for n in RECURRENT_ACTIVATIONS}


@dataclass(frozen=True)
class _Activation:
    name: str
    alpha: float | None = None
    beta: float | None = None


def _activations(op: str, attrs: dict, directions: int) -> list[list[_Activation]]:
    """Per direction, the gate functions (f, g, h) with their alpha/beta.

    ``activation_alpha``/``activation_beta`` are consumed in the order of the functions, each list only by
    the functions that take that parameter (as onnxruntime does); a function whose value is not given gets
    its default.
    """
    per_dir = len(_DEFAULT_ACTIVATIONS[op])
    names = list(attrs.get("activations") or _DEFAULT_ACTIVATIONS[op] * directions)
    alphas = list(attrs.get("activation_alpha") or [])
    betas = list(attrs.get("activation_beta") or [])
    funcs = []
    for given in names:
        name = _CANONICAL_NAME[given.lower()]  # names are matched case-insensitively, as onnxruntime does
        default_alpha, default_beta = _PARAMS.get(name, (None, None))
        alpha = beta = None
        if default_alpha is not None:
            alpha = float(alphas.pop(0)) if alphas else default_alpha
        if default_beta is not None:
            beta = float(betas.pop(0)) if betas else default_beta
        funcs.append(_Activation(name, alpha, beta))
    return [funcs[d * per_dir : (d + 1) * per_dir] for d in range(directions)]


class _Builder:
    """Creates the expansion's nodes and initializers in front of the recurrent node, with shapes."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, prefix: str):
        self.graph = graph
        self.anchor = anchor
        self.prefix = prefix
        # Value names must stay unique (SSA): every name the graph already uses, and each new one as it is made.
        self._taken = {v.name for v in graph.inputs} | set(graph.initializers)
        self._taken.update(out.name for n in graph for out in n.outputs if out.name)
        self._scalars: dict[float, ir.Value] = {}
        self._axes: dict[tuple[int, ...], ir.Value] = {}

    def _unique(self, name: str) -> str:
        out, k = name, 1
        while out in self._taken:
            out, k = f"{name}_{k}", k + 1
        self._taken.add(out)
        return out

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        name = self._unique(f"{self.prefix}/{suffix}")
        array = np.ascontiguousarray(array)
        dtype = ir.DataType.from_numpy(array.dtype)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype),
                         const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def scalar(self, x: float) -> ir.Value:
        """A float32 scalar constant (shared within the layer)."""
        if x not in self._scalars:
            self._scalars[x] = self.const(f"const_{len(self._scalars)}", np.array(x, dtype=np.float32))
        return self._scalars[x]

    def ints(self, values: Sequence[int]) -> ir.Value:
        """An int64 1-D constant (axes, split sizes), shared within the layer."""
        key = tuple(int(v) for v in values)
        if key not in self._axes:
            self._axes[key] = self.const(f"ints_{len(self._axes)}", np.array(key, dtype=np.int64))
        return self._axes[key]

    def op(self, op_type: str, inputs: Sequence[ir.Value], name: str,
           shapes: Sequence[Sequence[int]] | None = None, **attrs: object) -> list[ir.Value]:
        """Insert ``op_type`` named ``<prefix>/<name>``; ``shapes`` per output (default: inputs broadcast)."""
        if shapes is None:
            shapes = [np.broadcast_shapes(*(tuple(static_shape(v) or ()) for v in inputs))]
        full = f"{self.prefix}/{name}"
        node = ir.node(op_type, list(inputs), attrs or None, num_outputs=len(shapes), name=full)
        for i, (out, shape) in enumerate(zip(node.outputs, shapes)):
            out.name = self._unique(full if len(shapes) == 1 else f"{full}:{i}")
            out.shape = ir.Shape([int(d) for d in shape])
            out.type = ir.TensorType(ir.DataType.FLOAT)
        self.graph.insert_before(self.anchor, node)
        return list(node.outputs)

    def one(self, op_type: str, inputs: Sequence[ir.Value], name: str,
            shape: Sequence[int] | None = None, **attrs: object) -> ir.Value:
        return self.op(op_type, inputs, name, None if shape is None else [shape], **attrs)[0]

    def split(self, x: ir.Value, axis: int, sizes: Sequence[int], name: str) -> list[ir.Value]:
        shape = list(static_shape(x) or ())
        shapes = [shape[:axis] + [s] + shape[axis + 1 :] for s in sizes]
        if len(sizes) == 1:
            return [x]
        return self.op("Split", [x, self.ints(sizes)], name, shapes, axis=axis)

    def squeeze(self, x: ir.Value, axis: int, name: str) -> ir.Value:
        shape = list(static_shape(x) or ())
        return self.one("Squeeze", [x, self.ints([axis])], name, shape[:axis] + shape[axis + 1 :])

    def unsqueeze(self, x: ir.Value, axes: Sequence[int], name: str) -> ir.Value:
        shape = list(static_shape(x) or ())
        for a in sorted(axes):
            shape.insert(a, 1)
        return self.one("Unsqueeze", [x, self.ints(axes)], name, shape)

    def concat(self, xs: Sequence[ir.Value], axis: int, name: str) -> ir.Value:
        if len(xs) == 1:
            return xs[0]
        shape = list(static_shape(xs[0]) or ())
        shape[axis] = sum((static_shape(x) or ())[axis] for x in xs)
        return self.one("Concat", list(xs), name, shape, axis=axis)

    # -- activations -----------------------------------------------------------------------------------
    def activation(self, act: _Activation, x: ir.Value, name: str, clip: float | None) -> ir.Value:
        """``act(clip(x))`` with primitive ops."""
        if clip is not None:
            x = self.one("Clip", [x, self.scalar(-clip), self.scalar(clip)], f"{name}_clip")
        n, a, b = act.name, act.alpha, act.beta
        if n in ("Relu", "Tanh", "Sigmoid", "Softplus"):
            return self.one(n, [x], name)
        if n == "LeakyRelu":
            return self.one(n, [x], name, alpha=float(a))
        if n == "Elu":
            return self.one(n, [x], name, alpha=float(a))
        if n == "HardSigmoid":
            return self.one(n, [x], name, alpha=float(a), beta=float(b))
        if n == "Affine":
            scaled = self.one("Mul", [x, self.scalar(float(a))], f"{name}_scale")
            return self.one("Add", [scaled, self.scalar(float(b))], name)
        if n == "ScaledTanh":
            inner = self.one("Mul", [x, self.scalar(float(b))], f"{name}_in")
            tanh = self.one("Tanh", [inner], f"{name}_tanh")
            return self.one("Mul", [tanh, self.scalar(float(a))], name)
        if n == "ThresholdedRelu":
            keep = self.one("Greater", [x, self.scalar(float(a))], f"{name}_mask")
            keep.type = ir.TensorType(ir.DataType.BOOL)
            return self.one("Where", [keep, x, self.scalar(0.0)], name)
        if n == "Softsign":
            mag = self.one("Abs", [x], f"{name}_abs")
            den = self.one("Add", [mag, self.scalar(1.0)], f"{name}_den")
            return self.one("Div", [x, den], name)
        raise AssertionError(f"activation {n} passed recurrent_refusal")  # pragma: no cover


def _state_per_direction(b: _Builder, value: ir.Value | None, layout: int, directions: int,
                         label: str) -> list[ir.Value | None]:
    """An initial state ``[D, B, H]`` (``[B, D, H]`` for layout 1) as one ``[B, H]`` value per direction.

    None (a zero state) when absent or an all-zero constant.
    """
    if value is None:
        return [None] * directions
    axis = 1 if layout == 1 else 0
    arr = constant_array(value)
    if arr is not None:
        if not np.any(arr):
            return [None] * directions
        return [b.const(f"{('fw', 'bw')[d]}/{label}0", np.take(arr, d, axis=axis).astype(np.float32))
                for d in range(directions)]
    parts = b.split(value, axis, [1] * directions, f"{label}0_split")
    return [b.squeeze(p, axis, f"{('fw', 'bw')[d]}/{label}0") for d, p in enumerate(parts)]


def _expand(graph: ir.Graph, node: ir.Node, prefix: str) -> None:
    op = node.op_type
    a = node_attrs(node)
    ins = list(node.inputs) + [None] * (8 - len(node.inputs))
    x, w_val, r_val, b_val, _, h0_val, c0_val, p_val = ins
    layout = int(a.get("layout", 0))
    direction = a.get("direction", "forward")
    directions = 2 if direction == "bidirectional" else 1
    tags = ["bw"] if direction == "reverse" else ["fw", "bw"][:directions]
    clip = float(a["clip"]) if "clip" in a else None
    lbr = int(a.get("linear_before_reset", 0))
    input_forget = int(a.get("input_forget", 0))
    x_shape = static_shape(x)
    assert x_shape is not None
    seq, batch, _ = (x_shape[1], x_shape[0], x_shape[2]) if layout == 1 else x_shape
    w_all = constant_array(w_val).astype(np.float32)  # [D, gates·H, I]
    r_all = constant_array(r_val).astype(np.float32)  # [D, gates·H, H]
    gates = _GATES[op]
    hidden = int(a.get("hidden_size", r_all.shape[-1]))
    b_all = constant_array(b_val) if b_val is not None else None
    p_all = constant_array(p_val) if p_val is not None else None
    acts = _activations(op, a, directions)

    bld = _Builder(graph, node, prefix)
    h0 = _state_per_direction(bld, h0_val, layout, directions, "h")
    c0 = _state_per_direction(bld, c0_val, layout, directions, "c") if op == "LSTM" else [None] * directions
    # Batch-major sequence for the input projection: rows of one sample (one Monte Carlo instance) together.
    x_bm = x if layout == 1 else _batch_major(bld, x, (batch, seq, x_shape[2]))

    y_parts, yh_parts, yc_parts = [], [], []
    for d, tag in enumerate(tags):
        gh = gates * hidden
        proj = bld.one("MatMul", [x_bm, bld.const(f"{tag}/W_T", w_all[d].T)], f"{tag}/x_proj", (batch, seq, gh))
        if b_all is not None:
            wb, rb = b_all[d, :gh].astype(np.float32), b_all[d, gh:].astype(np.float32)
            bias = wb + rb
            if op == "GRU" and lbr:
                bias[2 * hidden :] = wb[2 * hidden :]  # Rb_h is added inside r ⊙ (R_h h + Rb_h)
            if np.any(bias):
                proj = bld.one("Add", [proj, bld.const(f"{tag}/bias", bias)], f"{tag}/x_proj_bias")
        steps = [bld.squeeze(s, 1, f"{tag}/t{t}/x") for t, s in
                 enumerate(bld.split(proj, 1, [1] * seq, f"{tag}/x_steps"))]
        # ONE initializer per weight, read by every step. GRU without linear_before_reset multiplies the
        # candidate's weights by r ⊙ h, so its R splits into R_zr (with h) and R_h (with r ⊙ h).
        if op == "GRU" and not lbr:
            r_t = bld.const(f"{tag}/R_zr_T", r_all[d, : 2 * hidden].T)
            r_h_t = bld.const(f"{tag}/R_h_T", r_all[d, 2 * hidden :].T)
        else:
            r_t, r_h_t = bld.const(f"{tag}/R_T", r_all[d].T), None
        peep = None
        if p_all is not None:  # [3H] in the order i, o, f
            pd = p_all[d].astype(np.float32)
            peep = tuple(bld.const(f"{tag}/P_{g}", pd[k * hidden : (k + 1) * hidden]) for k, g in enumerate("iof"))
        rb_h = None
        if op == "GRU" and lbr and b_all is not None and np.any(b_all[d, gh + 2 * hidden :]):
            rb_h = bld.const(f"{tag}/Rb_h", b_all[d, gh + 2 * hidden :].astype(np.float32))
        h, c = h0[d], c0[d]
        order = range(seq - 1, -1, -1) if tag == "bw" else range(seq)
        hs: dict[int, ir.Value] = {}
        for t in order:
            s = f"{tag}/t{t}"
            if op == "LSTM":
                h, c = _lstm_step(bld, s, steps[t], h, c, r_t, peep, hidden, acts[d], clip, input_forget)
            elif op == "GRU":
                h = _gru_step(bld, s, steps[t], h, r_t, r_h_t, rb_h, hidden, acts[d], clip)
            else:
                pre = steps[t] if h is None else bld.one(
                    "Add", [steps[t], bld.one("MatMul", [h, r_t], f"{s}/r_proj", (batch, hidden))], f"{s}/gates")
                h = bld.activation(acts[d][0], pre, f"{s}/h", clip)
            hs[t] = h
        if _read(node, 0):
            axes = [1, 2] if layout == 1 else [0, 1]
            ups = [bld.unsqueeze(hs[t], axes, f"{tag}/t{t}/y") for t in range(seq)]
            y_parts.append(bld.concat(ups, 1 if layout == 1 else 0, f"{tag}/y"))
        if _read(node, 1):
            yh_parts.append(bld.unsqueeze(h, [1 if layout == 1 else 0], f"{tag}/y_h"))
        if _read(node, 2):
            yc_parts.append(bld.unsqueeze(c, [1 if layout == 1 else 0], f"{tag}/y_c"))
    results = {
        0: bld.concat(y_parts, 2 if layout == 1 else 1, "y") if y_parts else None,
        1: bld.concat(yh_parts, 1 if layout == 1 else 0, "y_h") if yh_parts else None,
        2: bld.concat(yc_parts, 1 if layout == 1 else 0, "y_c") if yc_parts else None,
    }
    for idx, new in results.items():
        if new is None:
            continue
        old = node.outputs[idx]
        if old.is_graph_output():  # the graph output keeps its name (and its position)
            name = old.name
            old.name = f"{name}__expanded"
            new.name = name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def _batch_major(bld: _Builder, x: ir.Value, shape: tuple[int, int, int]) -> ir.Value:
    """``x`` [T, B, I] as [B, T, I]: the input of a ``Transpose(perm=[1, 0, 2])`` that produced it (exporters
    of batch-first models write one), else a new ``Transpose``."""
    producer = x.producer()
    if (producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx")
            and list(node_attrs(producer).get("perm", [])) == [1, 0, 2] and static_shape(producer.inputs[0]) == shape):
        return producer.inputs[0]  # type: ignore[return-value]
    return bld.one("Transpose", [x], "x_batch_major", shape, perm=[1, 0, 2])


def _read(node: ir.Node, index: int) -> bool:
    """True when output ``index`` of the node exists and something reads it."""
    if index >= len(node.outputs):
        return False
    out = node.outputs[index]
    return bool(out.name) and (bool(out.uses()) or out.is_graph_output())


def _lstm_step(bld: _Builder, s: str, x_t: ir.Value, h: ir.Value | None, c: ir.Value | None, r_t: ir.Value,
               peep: tuple[ir.Value, ir.Value, ir.Value] | None, hidden: int, acts: list[_Activation],
               clip: float | None, input_forget: int) -> tuple[ir.Value, ir.Value]:
    """One LSTM step (gates i, o, f, c); ``h``/``c`` None is a zero state. Returns (h', c')."""
    f_act, g_act, h_act = acts
    batch = (static_shape(x_t) or (1,))[0]
    pre = x_t
    if h is not None:
        rec = bld.one("MatMul", [h, r_t], f"{s}/r_proj", (batch, 4 * hidden))
        pre = bld.one("Add", [x_t, rec], f"{s}/gates")
    i_pre, o_pre, f_pre, c_pre = bld.split(pre, 1, [hidden] * 4, f"{s}/split")
    if peep is not None and c is not None:
        i_pre = bld.one("Add", [i_pre, bld.one("Mul", [c, peep[0]], f"{s}/peep_i")], f"{s}/i_pre")
    i = bld.activation(f_act, i_pre, f"{s}/i", clip)
    g = bld.activation(g_act, c_pre, f"{s}/g", clip)
    ig = bld.one("Mul", [i, g], f"{s}/ig")
    if c is None:  # f ⊙ 0 vanishes
        c_new = ig
    else:
        if input_forget:  # coupled gates
            f = bld.one("Sub", [bld.scalar(1.0), i], f"{s}/f")
        else:
            if peep is not None:
                f_pre = bld.one("Add", [f_pre, bld.one("Mul", [c, peep[2]], f"{s}/peep_f")], f"{s}/f_pre")
            f = bld.activation(f_act, f_pre, f"{s}/f", clip)
        c_new = bld.one("Add", [bld.one("Mul", [f, c], f"{s}/fc"), ig], f"{s}/c")
    if peep is not None:
        o_pre = bld.one("Add", [o_pre, bld.one("Mul", [c_new, peep[1]], f"{s}/peep_o")], f"{s}/o_pre")
    o = bld.activation(f_act, o_pre, f"{s}/o", clip)
    h_new = bld.one("Mul", [o, bld.activation(h_act, c_new, f"{s}/hc", None)], f"{s}/h")
    return h_new, c_new


def _gru_step(bld: _Builder, s: str, x_t: ir.Value, h: ir.Value | None, r_t: ir.Value, r_h_t: ir.Value | None,
              rb_h: ir.Value | None, hidden: int, acts: list[_Activation], clip: float | None) -> ir.Value:
    """One GRU step (gates z, r, h). ``r_h_t`` given: linear_before_reset = 0 (``r_t`` is R_zr^T); else
    ``r_t`` is the whole R^T and ``rb_h`` the recurrent candidate bias. ``h`` None is a zero state."""
    f_act, g_act = acts
    batch = (static_shape(x_t) or (1,))[0]
    x_z, x_r, x_h = bld.split(x_t, 1, [hidden] * 3, f"{s}/x_split")
    rec_h = None
    if h is None:
        z_pre, r_pre = x_z, x_r
    elif r_h_t is not None:
        rec = bld.one("MatMul", [h, r_t], f"{s}/r_proj", (batch, 2 * hidden))
        rec_z, rec_r = bld.split(rec, 1, [hidden] * 2, f"{s}/r_split")
        z_pre = bld.one("Add", [x_z, rec_z], f"{s}/z_pre")
        r_pre = bld.one("Add", [x_r, rec_r], f"{s}/r_pre")
    else:
        rec = bld.one("MatMul", [h, r_t], f"{s}/r_proj", (batch, 3 * hidden))
        rec_z, rec_r, rec_h = bld.split(rec, 1, [hidden] * 3, f"{s}/r_split")
        z_pre = bld.one("Add", [x_z, rec_z], f"{s}/z_pre")
        r_pre = bld.one("Add", [x_r, rec_r], f"{s}/r_pre")
    z = bld.activation(f_act, z_pre, f"{s}/z", clip)
    r = bld.activation(f_act, r_pre, f"{s}/r", clip)
    if r_h_t is not None:  # h~ = g(X_h + (r ⊙ h) R_h^T): the reset state goes through the crossbar
        h_pre = x_h
        if h is not None:
            rh = bld.one("Mul", [r, h], f"{s}/rh")
            h_pre = bld.one("Add", [x_h, bld.one("MatMul", [rh, r_h_t], f"{s}/rh_proj", (batch, hidden))],
                            f"{s}/h_pre")
    else:  # h~ = g(X_h + r ⊙ (h R_h^T + Rb_h))
        lin = rec_h
        if rb_h is not None:
            lin = rb_h if lin is None else bld.one("Add", [lin, rb_h], f"{s}/rec_h")
        h_pre = x_h if lin is None else bld.one("Add", [x_h, bld.one("Mul", [r, lin], f"{s}/r_rec_h")], f"{s}/h_pre")
    cand = bld.activation(g_act, h_pre, f"{s}/cand", clip)
    if h is None:  # (1 − z) ⊙ h~
        return bld.one("Sub", [cand, bld.one("Mul", [z, cand], f"{s}/z_cand")], f"{s}/h")
    diff = bld.one("Sub", [h, cand], f"{s}/h_minus_cand")
    return bld.one("Add", [cand, bld.one("Mul", [z, diff], f"{s}/z_diff")], f"{s}/h")


class ExpandRecurrentPass(ir.passes.InPlacePass):
    """Expand every ``LSTM``/``GRU``/``RNN`` of the main graph into MatMuls and gates (see the module docstring).

    Rules:
      1. A recurrent node :func:`cimc.ir.recurrent_refusal` accepts → per direction one input-projection
         ``MatMul`` (T MVMs) with its bias ``Add``, then per step a recurrent ``MatMul`` reading the shared
         ``R^T`` and the gate ops; its outputs are rebuilt with ``Unsqueeze``/``Concat``.
      2. A refused node stays in place (classification reports it, with the reason).
    """

    def requires(self, model: ir.Model) -> None:
        # Split sizes and Squeeze/Unsqueeze axes are inputs (not attributes) from opset 13 on.
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < 13 and any(n.op_type in RECURRENT_OPS for n in model.graph):
            raise ir.passes.PreconditionError(f"recurrent expansion needs opset >= 13 (model has {opset})")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for index, node in enumerate(list(graph)):
            if node.op_type not in RECURRENT_OPS or node.domain not in ("", "ai.onnx"):
                continue
            reason = recurrent_refusal(node)
            if reason is not None:
                logger.info("%s %s not expanded: %s", node.op_type, node.name, reason)
                continue
            prefix = node.name or f"{node.op_type.lower()}_{index}"
            _expand(graph, node, prefix)
            logger.debug("expanded %s %s", node.op_type, prefix)
            modified = True
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type in RECURRENT_OPS and node.domain in ("", "ai.onnx") and recurrent_refusal(node) is None:
                raise ir.passes.PostconditionError(f"{node.op_type} {node.name!r} was not expanded")


def expand_recurrent(model: ir.Model) -> ir.Model:
    """Run :class:`ExpandRecurrentPass` in place and return the model."""
    ExpandRecurrentPass()(model)
    return model
