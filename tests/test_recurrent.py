"""Recurrent layers (LSTM, GRU, RNN): the expansion into MatMuls and gates, held to onnxruntime.

Graphs are built with ``onnx.helper`` (every attribute the expansion handles) and exported from torch
(``nn.LSTM``/``GRU``/``RNN``, batch-first or not, bidirectional, two layers, with and without initial states).
onnxruntime runs the original model; cimc's executor runs the canonicalised one. onnxruntime does not
implement ``layout`` = 1, so its reference for a batch-first node is the same node with ``layout`` = 0 between
Transposes (the operator specification defines layout 1 exactly so).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper, shape_inference
from torch import nn

import cimc
from cimc.errors import UnsupportedOpError
from cimc.ir import analog_matrix, classify, is_analog
from cimc.passes.canonicalize import canonicalize
from cimc.passes.recurrent import ExpandRecurrentPass
from cimc.runtime.executor import Executor, run_model
from tests.models import rel_l2, run_ort

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
OUTPUTS = {"LSTM": ["Y", "Y_h", "Y_c"], "GRU": ["Y", "Y_h"], "RNN": ["Y", "Y_h"]}
TOL = 1e-5


# ------------------------------------------------------------------------------------------ graph builders
def _recurrent(
    op: str,
    *,
    direction: str = "forward",
    hidden: int = 3,
    input_size: int = 2,
    seq: int = 4,
    batch: int = 2,
    layout: int = 0,
    lbr: int = 0,
    state: str = "none",  # none | input | constant | zeros
    clip: float | None = None,
    peephole: bool = False,
    input_forget: int = 0,
    bias: bool = True,
    activations: list[str] | None = None,
    alpha: list[float] | None = None,
    beta: list[float] | None = None,
    seq_lens: str | None = None,  # None | full | short | input
    outputs: list[str] | None = None,
    seed: int = 0,
) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
    """(model, onnxruntime reference model, feeds) for one recurrent node named ``rec``."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    inits: dict[str, np.ndarray] = {
        "W": (rng.standard_normal((dirs, g * hidden, input_size)) * 0.6).astype(np.float32),
        "R": (rng.standard_normal((dirs, g * hidden, hidden)) * 0.6).astype(np.float32),
    }
    if bias:
        inits["B"] = (rng.standard_normal((dirs, 2 * g * hidden)) * 0.3).astype(np.float32)
    x_shape = [batch, seq, input_size] if layout else [seq, batch, input_size]
    state_shape = [batch, dirs, hidden] if layout else [dirs, batch, hidden]
    graph_inputs = [("X", x_shape)]
    feeds = {"X": rng.standard_normal(x_shape).astype(np.float32)}
    names = ["X", "W", "R", "B" if bias else "", "", "", "", ""]
    if seq_lens == "input":
        graph_inputs.append(("seq_lens", [batch]))
    elif seq_lens is not None:
        inits["seq_lens"] = np.full(batch, seq if seq_lens == "full" else max(seq - 1, 1), dtype=np.int32)
    if seq_lens is not None:
        names[4] = "seq_lens"
    for idx, label in ((5, "h0"), (6, "c0")):
        if label == "c0" and op != "LSTM":
            continue
        if state == "input":
            graph_inputs.append((label, state_shape))
            feeds[label] = rng.standard_normal(state_shape).astype(np.float32)
        elif state in ("constant", "zeros"):
            value = rng.standard_normal(state_shape) if state == "constant" else np.zeros(state_shape)
            inits[label] = value.astype(np.float32)
        if state != "none":
            names[idx] = label
    if peephole:
        inits["P"] = (rng.standard_normal((dirs, 3 * hidden)) * 0.5).astype(np.float32)
        names[7] = "P"
    while names[-1] == "":
        names.pop()
    outs = outputs or OUTPUTS[op]
    attrs: dict[str, Any] = {"hidden_size": hidden, "direction": direction}
    if clip is not None:
        attrs["clip"] = clip
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    if op == "LSTM" and input_forget:
        attrs["input_forget"] = input_forget
    if activations is not None:
        attrs["activations"] = activations
    if alpha is not None:
        attrs["activation_alpha"] = alpha
    if beta is not None:
        attrs["activation_beta"] = beta

    def make(node_layout: int, wrap: bool) -> onnx.ModelProto:
        nodes = []
        node_in = list(names)
        node_out = list(outs)
        if wrap:  # a layout-1 graph computed by a layout-0 node between Transposes
            nodes.append(helper.make_node("Transpose", ["X"], ["X_t"], perm=[1, 0, 2]))
            node_in[0] = "X_t"
            for idx, label in ((5, "h0"), (6, "c0")):
                if idx < len(node_in) and node_in[idx]:
                    nodes.append(helper.make_node("Transpose", [label], [f"{label}_t"], perm=[1, 0, 2]))
                    node_in[idx] = f"{label}_t"
            node_out = [f"{o}_t" if o else "" for o in outs]
            for o in filter(None, outs):
                perm = [2, 0, 1, 3] if o == "Y" else [1, 0, 2]
                nodes.append(helper.make_node("Transpose", [f"{o}_t"], [o], perm=perm))
        rec = helper.make_node(op, node_in, node_out, name="rec", **attrs, **({"layout": 1} if node_layout else {}))
        nodes.insert(len(nodes) - len([o for o in outs if o]) if wrap else 0, rec)
        graph = helper.make_graph(
            nodes, "rec_graph",
            [helper.make_tensor_value_info(n, TensorProto.INT32 if n == "seq_lens" else TensorProto.FLOAT, s)
             for n, s in graph_inputs],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs if o],
            [numpy_helper.from_array(v, name=k) for k, v in inits.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)
        return shape_inference.infer_shapes(model, strict_mode=True)

    model = make(layout, wrap=False)
    reference = make(0, wrap=True) if layout else model
    if seq_lens == "input":
        feeds["seq_lens"] = np.full(batch, seq, dtype=np.int32)
    return model, reference, feeds


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _ir(model: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(shape_inference.infer_shapes(model, strict_mode=True, data_prop=True))


def _execute(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in Executor(model)(*(torch.from_numpy(feeds[v.name]) for v in model.graph.inputs))]


def _check_expanded_graph(model: ir.Model) -> None:
    """The expansion is a valid ONNX graph whose shapes ONNX's own inference agrees with."""
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    declared = {v.name: list(v.shape) for n in model.graph for v in n.outputs if v.shape is not None}
    inferred = shape_inference.infer_shapes(proto, strict_mode=True)
    for info in inferred.graph.value_info:
        if info.name in declared and info.type.tensor_type.HasField("shape"):
            dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
            assert dims == declared[info.name], f"{info.name}: ONNX infers {dims}, expansion {declared[info.name]}"


def _assert_matches(model: onnx.ModelProto, reference: onnx.ModelProto, feeds: dict[str, np.ndarray],
                    *, check_graph: bool = True) -> ir.Model:
    """canonicalise + cimc's executor == onnxruntime on the reference, for every output; returns the model."""
    expected = _ort(reference, feeds)
    canonical = canonicalize(_ir(model))
    assert not any(n.op_type in GATES for n in canonical.graph)
    got = _execute(canonical, feeds)
    assert len(got) == len(expected)
    for name, g, e in zip([v.name for v in canonical.graph.outputs], got, expected):
        assert rel_l2(g, e) <= TOL, f"output {name}: rel. L2 {rel_l2(g, e):.2e}"
    if check_graph:
        _check_expanded_graph(canonical)
        # The digital twin of a compiled model runs in onnxruntime: so must the expansion.
        inputs = {i.name for i in canonical.graph.inputs}
        twin = _ort(ir.to_proto(canonical), {k: v for k, v in feeds.items() if k in inputs})
        for g, e in zip(twin, expected):
            assert rel_l2(g, e) <= TOL
    return canonical


def _r_proj_nodes(model: ir.Model, tag: str = "fw") -> list[ir.Node]:
    return [n for n in model.graph if n.name.startswith(f"rec/{tag}/t") and n.name.endswith("/r_proj")]


# ------------------------------------------------------------------------------------------ the expansion
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("state", ["none", "input"])
def test_cells_match_onnxruntime(op: str, direction: str, state: str) -> None:
    for lbr in ((0, 1) if op == "GRU" else (0,)):
        model, ref, feeds = _recurrent(op, direction=direction, state=state, lbr=lbr, seq=5, hidden=4, input_size=3)
        _assert_matches(model, ref, feeds)


def test_structure_one_projection_and_one_shared_recurrent_weight() -> None:
    seq = 6
    model, _, _ = _recurrent("LSTM", direction="bidirectional", seq=seq, state="input", hidden=4, input_size=3)
    m = _ir(model)
    result = ExpandRecurrentPass()(m)
    assert result.modified
    assert not any(n.op_type == "LSTM" for n in m.graph)
    for tag in ("fw", "bw"):
        proj = m.graph.node(f"rec/{tag}/x_proj")
        assert is_analog(proj) and analog_matrix(proj, batch=2).mvms == seq  # T MVMs of W per sample
        assert analog_matrix(proj, batch=2).rows == 3 and analog_matrix(proj, batch=2).cols == 16
        steps = _r_proj_nodes(m, tag)
        assert len(steps) == seq  # one recurrent product per step (the initial state is an input)
        weights = {id(n.inputs[1]) for n in steps}
        assert len(weights) == 1  # ONE initializer, many uses
        r_t = steps[0].inputs[1]
        assert r_t.is_initializer() and list(r_t.shape) == [4, 16]
        assert all(analog_matrix(n, batch=2).mvms == 1 for n in steps)
    # Deterministic names: the forward direction's steps in time order, the reverse one's backwards.
    order = [n.name for n in m.graph if n.name.endswith("/r_proj")]
    assert order[:seq] == [f"rec/fw/t{t}/r_proj" for t in range(seq)]
    assert order[seq:] == [f"rec/bw/t{t}/r_proj" for t in reversed(range(seq))]
    assert not ExpandRecurrentPass()(m).modified  # nothing left to expand


def test_zero_initial_state_needs_no_step_zero_product() -> None:
    for state in ("none", "zeros"):
        model, ref, feeds = _recurrent("GRU", seq=4, state=state, lbr=1)
        canonical = _assert_matches(model, ref, feeds)
        assert [n.name for n in _r_proj_nodes(canonical)] == [f"rec/fw/t{t}/r_proj" for t in (1, 2, 3)]


def test_gru_without_linear_before_reset_keeps_the_reset_product_analog() -> None:
    model, ref, feeds = _recurrent("GRU", seq=3, state="input", lbr=0)
    canonical = _assert_matches(model, ref, feeds)
    rh = [n for n in canonical.graph if n.name.endswith("/rh_proj")]
    assert len(rh) == 3 and all(is_analog(n) for n in rh)
    assert len({id(n.inputs[1]) for n in rh}) == 1  # R_h^T: one shared initializer too


@pytest.mark.parametrize("layout", [0, 1])
def test_layout_constant_state_and_batch_broadcast(layout: int) -> None:
    model, ref, feeds = _recurrent("LSTM", direction="bidirectional", layout=layout, state="constant", batch=3)
    _assert_matches(model, ref, feeds)


def test_lstm_peepholes_input_forget_and_clip() -> None:
    for peephole, input_forget, clip in ((True, 0, None), (True, 1, None), (False, 1, 0.4), (True, 0, 0.3)):
        for state in ("none", "input"):
            model, ref, feeds = _recurrent("LSTM", direction="bidirectional", peephole=peephole,
                                           input_forget=input_forget, clip=clip, state=state)
            _assert_matches(model, ref, feeds)


def test_without_bias_and_with_full_constant_sequence_lens() -> None:
    model, ref, feeds = _recurrent("RNN", bias=False, seq_lens="full", state="input")
    _assert_matches(model, ref, feeds)


def test_only_the_outputs_read_are_built() -> None:
    model, ref, feeds = _recurrent("LSTM", outputs=["", "Y_h"], seq=3)
    canonical = _assert_matches(model, ref, feeds)
    assert [v.name for v in canonical.graph.outputs] == ["Y_h"]
    assert not any(n.name.endswith("/y") for n in canonical.graph)


def test_new_value_names_never_clash_with_existing_ones() -> None:
    model, ref, feeds = _recurrent("RNN", state="input")
    # The sequence reaches the layer through a Relu whose output already bears an expansion-style name.
    assert ref is model  # layout 0: the model is its own reference
    for m in (model,):
        relu = helper.make_node("Relu", ["X"], ["rec/fw/x_proj"], name="pre")
        m.graph.node.insert(0, relu)
        for node in m.graph.node:
            if node.name != "pre":
                node.input[:] = ["rec/fw/x_proj" if i == "X" else i for i in node.input]
    canonical = _assert_matches(model, ref, feeds)  # onnxruntime runs the expanded graph: names are unique
    names = [v.name for n in canonical.graph for v in n.outputs]
    assert len(names) == len(set(names))


ACTIVATIONS = ["Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "HardSigmoid",
               "Elu", "Softsign", "Softplus"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_rnn_activations_with_and_without_parameters(activation: str) -> None:
    for alpha, beta in ((None, None), ([0.7], [0.3])):
        model, ref, feeds = _recurrent("RNN", activations=[activation], alpha=alpha, beta=beta, state="input")
        if activation in ("Affine", "ScaledTanh") and alpha is None:
            # onnxruntime's default alpha is 0 here: all-zero outputs, compare them exactly
            canonical = canonicalize(_ir(model))
            assert all(not np.any(o) for o in _execute(canonical, feeds))
            assert all(not np.any(o) for o in _ort(ref, feeds))
            continue
        _assert_matches(model, ref, feeds, check_graph=False)


def test_activation_parameters_are_consumed_in_order() -> None:
    # alpha/beta go to the functions that take them, in order; missing ones get the defaults.
    cases = [
        ("LSTM", "forward", ["HardSigmoid", "Tanh", "ScaledTanh"], [0.3, 0.8], [0.4, 1.7]),
        ("LSTM", "forward", ["Tanh", "LeakyRelu", "Affine"], [0.3, 0.8], [0.4]),
        ("GRU", "bidirectional", ["HardSigmoid", "Elu", "Sigmoid", "Affine"], [0.3, 0.8, 0.5], [0.4, 0.1]),
        ("GRU", "bidirectional", ["HardSigmoid", "Elu", "Sigmoid", "Affine"], [0.3], [0.4]),
        ("LSTM", "forward", ["sigmoid", "tanh", "relu"], None, None),  # case-insensitive, as onnxruntime's LSTM
    ]
    for op, direction, acts, alpha, beta in cases:
        model, ref, feeds = _recurrent(op, direction=direction, activations=acts, alpha=alpha, beta=beta,
                                       state="input")
        _assert_matches(model, ref, feeds, check_graph=False)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    op=st.sampled_from(["LSTM", "GRU", "RNN"]),
    direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
    hidden=st.integers(1, 6),
    input_size=st.integers(1, 5),
    seq=st.integers(1, 5),
    batch=st.integers(1, 3),
    layout=st.sampled_from([0, 1]),
    lbr=st.sampled_from([0, 1]),
    state=st.sampled_from(["none", "input", "constant"]),
    clip=st.one_of(st.none(), st.floats(0.25, 3.0)),
    seed=st.integers(0, 2**16),
)
def test_property_matches_onnxruntime(op: str, direction: str, hidden: int, input_size: int, seq: int, batch: int,
                                      layout: int, lbr: int, state: str, clip: float | None, seed: int) -> None:
    model, ref, feeds = _recurrent(op, direction=direction, hidden=hidden, input_size=input_size, seq=seq,
                                   batch=batch, layout=layout, lbr=lbr, state=state, clip=clip, seed=seed)
    canonical = _assert_matches(model, ref, feeds)
    dirs = 2 if direction == "bidirectional" else 1
    projections = [n for n in canonical.graph if n.name.endswith("/x_proj")]
    assert len(projections) == dirs
    # One recurrent weight per direction (two for GRU without linear_before_reset), read by every step.
    recurrent = {id(n.inputs[1]) for n in canonical.graph if is_analog(n) and "/t" in n.name}
    per_dir = 2 if op == "GRU" and not lbr else 1
    if state == "input" or seq > 1:
        expected = dirs * per_dir
    elif state == "constant" and per_dir == 2:
        expected = dirs  # h0·R_zr^T folds to a constant; (r ⊙ h0)·R_h^T still needs the crossbar
    else:
        expected = 0  # one step from a zero (or folded constant) state: no recurrent product at all
    assert len(recurrent) == expected


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_lens": "input"}, "sequence_lens is not a constant"),
        ({"seq_lens": "short"}, "differs from the full length 4"),
        ({"activations": ["Gelu", "Tanh", "Tanh"]}, "activation(s) Gelu not supported"),
        ({"activations": ["Sigmoid", "Tanh"]}, "activations lists 2 functions, expected 3"),
    ],
)
def test_refused_layers_are_reported_in_one_line(kwargs: dict[str, Any], message: str, tmp_path: Path,
                                                  run_cli) -> None:  # type: ignore[no-untyped-def]
    model, _, _ = _recurrent("LSTM", **kwargs)
    path = tmp_path / "refused.onnx"
    onnx.save(model, path)
    canonical = cimc.load(path)
    assert any(n.op_type == "LSTM" for n in canonical.graph)  # left in place for classification to report
    (cls,) = [c for c in classify(canonical) if c.op_type == "LSTM"]
    assert cls.kind == "unsupported" and message in cls.reason
    with pytest.raises(UnsupportedOpError, match="'rec' \\(LSTM\\)"):
        cimc.compile(path, "ideal")
    result = run_cli("compile", path, "--target", "ideal", "-o", tmp_path / "out")
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "'rec' (LSTM)" in lines[0] and message in lines[0]
    inspected = run_cli("inspect", path)
    assert inspected.code == 0 and "UNSUPPORTED" in inspected.out and message in inspected.out


def test_non_constant_weight_is_refused() -> None:
    model, _, _ = _recurrent("GRU")
    # W becomes a graph input: nothing to program onto the crossbar.
    w = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.initializer.remove(w)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.dims)))
    m = canonicalize(_ir(model))
    (cls,) = [c for c in classify(m) if c.op_type == "GRU"]
    assert cls.kind == "unsupported" and "input W is not a constant" in cls.reason


def test_executor_refuses_an_unexpanded_layer_cleanly() -> None:
    model, _, _ = _recurrent("LSTM")
    raw = _ir(model)
    with pytest.raises(UnsupportedOpError, match="canonicalise the model first"):
        Executor(raw)
    (cls,) = classify(raw, canonical=False)
    assert cls.kind == "digital" and "expanded at canonicalisation" in cls.reason


# ------------------------------------------------------------------------------------------ torch exports
class _Seq(nn.Module):
    """A torch recurrent layer; returns every output (sequence, final h, final c for an LSTM)."""

    def __init__(self, cls: type[nn.Module], batch_first: bool, bidirectional: bool, layers: int, state: bool):
        super().__init__()
        torch.manual_seed(3)
        self.rnn = cls(5, 6, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.state = state
        self.eval()

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.state:
            hx = (states[0], states[1]) if isinstance(self.rnn, nn.LSTM) else states[0]
            out, h = self.rnn(x, hx)
        else:
            out, h = self.rnn(x)
        return (out, *h) if isinstance(h, tuple) else (out, h)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], outputs: list[str], path: Path,
            dynamic_batch: bool = False) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), opset_version=14, dynamo=False, input_names=names,
                          output_names=outputs,
                          dynamic_axes={names[0]: {0: "batch"}, outputs[0]: {0: "batch"}} if dynamic_batch else None)
    return path


TORCH_CASES = [  # (cell, batch_first, bidirectional, layers, initial states as inputs)
    (cls, bf, bi, layers, state)
    for cls in (nn.LSTM, nn.GRU, nn.RNN)
    for bf, bi, layers, state in ((True, True, 2, False), (False, False, 1, True), (True, False, 2, True),
                                  (False, True, 2, True))
]


@pytest.mark.parametrize(("cls", "batch_first", "bidirectional", "layers", "state"), TORCH_CASES,
                         ids=[f"{c.__name__}-bf{int(b)}-bi{int(d)}-l{n}-s{int(s)}" for c, b, d, n, s in TORCH_CASES])
def test_torch_exports_match_onnxruntime(cls: type[nn.Module], batch_first: bool, bidirectional: bool, layers: int,
                                         state: bool, tmp_path: Path) -> None:
    module = _Seq(cls, batch_first, bidirectional, layers, state)
    batch, seq = 2, 7
    x = torch.randn(batch, seq, 5) if batch_first else torch.randn(seq, batch, 5)
    dirs = 2 if bidirectional else 1
    states = [torch.randn(layers * dirs, batch, 6) for _ in range(2 if cls is nn.LSTM else 1)] if state else []
    names = ["x", "h0", "c0"][: 1 + len(states)]
    outputs = ["y", "h_n", "c_n"][: 3 if cls is nn.LSTM else 2]
    path = _export(module, (x, *states), names, outputs, tmp_path / "rnn.onnx")
    feeds = {"x": x.numpy(), **{n: s.numpy() for n, s in zip(names[1:], states)}}
    expected = run_ort(path, feeds)
    model = cimc.load(path, batch=batch)
    assert not any(n.op_type == cls.__name__ for n in model.graph)
    got = run_model(model, [feeds[v.name] for v in model.graph.inputs])
    for name, g, e in zip(outputs, got, expected):
        assert rel_l2(g, e) <= TOL, f"{name}: {rel_l2(g, e):.2e}"
    with torch.no_grad():  # and torch itself agrees (the export is faithful)
        assert rel_l2(expected[0], module(x, *states)[0]) <= TOL


class _Classifier(nn.Module):
    """Batch-first LSTM over a feature sequence, a Linear head on the last step: [B, 7, 5] → [B, 4]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.lstm = nn.LSTM(5, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 4)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "lstm_classifier.onnx"
    return _export(_Classifier(), (torch.randn(1, 7, 5),), ["x"], ["y"], path, dynamic_batch=True)


def test_model_imported_with_batch_one_runs_batch_three(classifier_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((3, 7, 5)).astype(np.float32)
    expected = run_ort(classifier_path, {"x": x})[0]
    model = cimc.load(classifier_path)  # batch fixed to 1 at import
    assert model.graph.inputs[0].shape[0] == 1
    assert rel_l2(run_model(model, [x])[0], expected) <= TOL


# ------------------------------------------------------------------------------------------ end to end
def test_compile_ideal_run_equals_onnxruntime(classifier_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((5, 7, 5)).astype(np.float32)
    expected = run_ort(classifier_path, {"x": x})[0]
    compiled = cimc.compile(classifier_path, "ideal")
    assert rel_l2(cimc.run(compiled, x), expected) <= TOL


def test_aon_cim_schedule_counts_one_recurrent_mvm_per_step(classifier_path: Path, tmp_path: Path,
                                                            run_cli) -> None:  # type: ignore[no-untyped-def]
    from cimc.data import Dataset

    rng = np.random.default_rng(3)
    calib = Dataset(rng.standard_normal((16, 7, 5)).astype(np.float32), rng.integers(0, 4, 16), "calib")
    compiled = cimc.compile(classifier_path, "aon-cim", calibration=calib, out_dir=tmp_path / "build")
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    layers = {row["name"]: row for row in report["layers"]}
    lstm = next(n.name for n in cimc.load(classifier_path, canonicalize=False).graph if n.op_type == "LSTM")
    proj = layers[f"{lstm}/fw/x_proj"]
    assert proj["kind"] == "analog" and proj["matrix"]["mvms"] == 7 and proj["mvms"] == 7
    steps = [row for name, row in layers.items() if name.startswith(f"{lstm}/fw/t") and name.endswith("/r_proj")]
    assert len(steps) == 6  # steps 1..6: the zero initial state needs no product at step 0
    assert all(row["kind"] == "analog" and row["matrix"]["mvms"] == 1 and row["mvms"] == 1 for row in steps)
    assert all(row["matrix"]["rows"] == 8 and row["matrix"]["cols"] == 32 for row in steps)
    by_time = sorted(steps, key=lambda r: int(r["name"].split("/t")[-1].split("/")[0]))
    order = [row["schedule"]["step"] for row in by_time]
    assert order == sorted(order)  # steps scheduled in time order
    # R is ONE crossbar block per layer, read by every step: 2 LSTM layers x (W, R) + the head = 5 blocks for
    # 15 analog uses; weights placed = W (5x32, 8x32) + R (8x32 twice) + head (8x4), each once.
    assert report["crossbar_layers"] == 5 and report["analog_uses"] == 15
    assert report["weights_placed"] == 5 * 32 + 8 * 32 + 2 * 8 * 32 + 8 * 4
    assert report["shared_weights"][f"{lstm}/fw/R_T"] == sorted(r["name"] for r in steps)
    assert all(row["schedule"]["layer"] == f"{lstm}/fw/R_T" for row in steps)
    # The compiled ONNX (expanded graph) and its quantised digital twin both run in onnxruntime.
    one = calib.x[:1]  # the compiled files have the batch fixed at import (1)
    source = run_ort(classifier_path, {"x": one})[0]
    assert rel_l2(run_ort(tmp_path / "build" / "model.onnx", {"x": one})[0], source) <= TOL
    twin = run_ort(tmp_path / "build" / "model.qdq.onnx", {"x": one})[0]
    assert np.isfinite(twin).all() and 0 < rel_l2(twin, source) < 0.1  # 8-bit converters: close, not equal
    # noisy chips: finite outputs, accuracy numbers for every time
    result = cimc.simulate(compiled, calib, drift="1s,1d", instances=2, compare_gdc=False)
    assert len(result.data["series"]) >= 1
    y = cimc.run(compiled, calib.x[:4], time="1d", instance=1, instances=2)
    assert y.shape == (4, 4) and np.isfinite(y).all()
    assert rel_l2(y, run_ort(classifier_path, {"x": calib.x[:4]})[0]) < 0.5  # noisy but the same function
    # the mapping a hardware team programs from: exported and rebuilt from the conductances
    assert run_cli("export", tmp_path / "build", "-o", tmp_path / "bundle").code == 0
    verified = run_cli("verify", tmp_path / "bundle")
    assert verified.code == 0 and "OK" in verified.out


class _VadLike(nn.Module):
    """Silero-VAD-like: a strided Conv1d front end on raw audio, an LSTM over frames, a Conv1d + Sigmoid
    head averaged over time. [B, 1, 256] → [B, 1] speech probability."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.frontend = nn.Conv1d(1, 12, 16, stride=8)  # 31 frames
        self.encoder = nn.Conv1d(12, 16, 3, stride=2, padding=1)  # 16 frames
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.decoder = nn.Conv1d(16, 1, 1)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.encoder(torch.relu(self.frontend(x))))  # [B, 16, T]
        h, _ = self.lstm(h.transpose(1, 2))  # [B, T, 16]
        p = torch.sigmoid(self.decoder(torch.relu(h).transpose(1, 2)))  # [B, 1, T]
        return p.mean(dim=2)


def test_vad_like_model_end_to_end(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path = _export(_VadLike(), (torch.randn(1, 1, 256),), ["x"], ["y"], tmp_path / "vad.onnx", dynamic_batch=True)
    x = np.random.default_rng(4).standard_normal((6, 1, 256)).astype(np.float32)
    expected = run_ort(path, {"x": x})[0]
    compiled = cimc.compile(path, "ideal", out_dir=tmp_path / "vad_build")
    assert rel_l2(cimc.run(compiled, x), expected) <= TOL
    np.save(tmp_path / "x.npy", x)
    result = run_cli("run", tmp_path / "vad_build", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert result.code == 0, result.err
    assert rel_l2(np.load(tmp_path / "y.npy"), expected) <= TOL
    # inspect shows the expansion: the input projection with its 16 MVMs, the recurrent products with 1 each
    table = run_cli("inspect", path)
    proj_rows = [line for line in table.out.splitlines() if "/fw/x_proj " in line]
    assert len(proj_rows) == 1 and proj_rows[0].split()[-2:] == ["16", "analog"]  # MVMs, runs on
    r_rows = [line for line in table.out.splitlines() if line.split() and line.split()[0].endswith("/r_proj")]
    assert len(r_rows) == 15 and all(line.split()[-2:] == ["1", "analog"] for line in r_rows)
    nodes = json.loads(run_cli("inspect", path, "--json").out)["nodes"]
    assert [n["matrix"]["mvms"] for n in nodes if n["name"].endswith("/x_proj")] == [16]
    assert [n["matrix"]["mvms"] for n in nodes if n["name"].endswith("/r_proj")] == [1] * 15
    raw = run_cli("inspect", path, "--raw")
    lstm_rows = [line for line in raw.out.splitlines() if " LSTM " in line]
    assert len(lstm_rows) == 1 and "expanded: analog MatMuls + digital gates" in lstm_rows[0]
    assert "0 unsupported" in raw.out


class _VadWithRate(nn.Module):
    """Silero-VAD-like with what the real one has around its LSTM: a sample-rate input choosing the front end
    (an ``If`` in ONNX), the LSTM state as inputs and outputs, a dynamic number of samples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.frontend16k = nn.Conv1d(1, 12, 16, stride=8)
        self.frontend8k = nn.Conv1d(1, 12, 8, stride=4)
        self.encoder = nn.Conv1d(12, 16, 3, stride=2, padding=1)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.decoder = nn.Conv1d(16, 1, 1)
        self.eval()

    def forward(self, x: torch.Tensor, sr: torch.Tensor, h: torch.Tensor,
                c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if bool(sr == 16000):
            f = self.frontend16k(x)
        else:
            f = self.frontend8k(x)
        z = torch.relu(self.encoder(torch.relu(f)))
        out, (hn, cn) = self.lstm(z.transpose(1, 2), (h, c))
        p = torch.sigmoid(self.decoder(torch.relu(out).transpose(1, 2)))
        return p.mean(dim=2), hn, cn


def test_vad_with_sample_rate_and_state_inputs(tmp_path: Path) -> None:
    path = tmp_path / "vad_sr.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(_VadWithRate())  # scripting keeps the sample-rate branch as an If
        torch.onnx.export(scripted, (torch.randn(1, 1, 256), torch.tensor(16000), torch.zeros(1, 1, 16),
                                     torch.zeros(1, 1, 16)),
                          str(path), opset_version=14, dynamo=False, input_names=["x", "sr", "h", "c"],
                          output_names=["p", "hn", "cn"], dynamic_axes={"x": {2: "samples"}})
    assert {"If", "LSTM"} <= {n.op_type for n in onnx.load(path).graph.node}
    compiled = cimc.compile(path, "ideal", input_shapes={"x": [1, 1, 512]}, input_values={"sr": 16000})
    assert [v.name for v in compiled.model.graph.inputs] == ["x", "h", "c"]
    assert not any(n.op_type in ("If", "LSTM") for n in compiled.model.graph)
    rng = np.random.default_rng(5)
    feeds = {"x": rng.standard_normal((1, 1, 512)).astype(np.float32),
             "h": rng.standard_normal((1, 1, 16)).astype(np.float32),
             "c": rng.standard_normal((1, 1, 16)).astype(np.float32)}
    expected = run_ort(path, {**feeds, "sr": np.array(16000)})
    got = cimc.run(compiled, feeds, all_outputs=True)
    for name, e in zip(["p", "hn", "cn"], expected):
        assert rel_l2(got[name], e) <= TOL, name


def test_finetune_trains_the_shared_recurrent_weight(tmp_path: Path) -> None:
    from cimc.data import Dataset
    from cimc.passes.finetune import save_finetuned

    class _Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.gru = nn.GRU(4, 6, batch_first=True)
            self.fc = nn.Linear(6, 2)
            self.eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.gru(x)[0][:, -1])

    path = _export(_Tiny(), (torch.randn(1, 3, 4),), ["x"], ["y"], tmp_path / "gru.onnx", dynamic_batch=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3, 4)).astype(np.float32)
    data = Dataset(x, (x[:, :, 0].mean(1) > 0).astype(np.int64), "train")
    before = cimc.load(path)
    tuned, history = cimc.finetune(path, "aon-cim", data, data, method="pcm+qat", epochs=1, select="last",
                                   val_instances=1, val_samples=16, batch_size=16)
    r_name = next(n.inputs[1].name for n in tuned.graph if n.name.endswith("/t1/r_proj"))
    steps = [n for n in tuned.graph if n.name.endswith("/r_proj")]
    assert len(steps) == 2 and all(n.inputs[1].name == r_name for n in steps)  # still one tensor, trained once
    old, new = (m.graph.initializers[r_name].const_value.numpy() for m in (before, tuned))
    assert not np.allclose(old, new)
    out = save_finetuned(tuned, tmp_path / "tuned.onnx")
    y = run_ort(out, {"x": x[:1]})[0]
    assert y.shape == (1, 2) and np.isfinite(y).all()
