"""Stateful models as streams: chunk by chunk, the state carried on the chip, equal to onnxruntime on `ideal`;
named multi-input data for calibration, simulation and run; the batch axis of a state input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import cimc
from cimc.data import bind, find_state_pairs
from cimc.errors import DataError

HIDDEN, FEATURES, CLASSES = 16, 8, 4


def _rnn(path: Path, state_batch_axis: int = 1, batch: str | int = "batch") -> Path:
    """An Elman cell: h' = tanh(x W + h U + b), y = h' V + c. The state is ``h_in`` [1, batch, H] (batch on
    axis 1, as ONNX's RNN/GRU/LSTM and silero-vad lay their states out), returned as ``h_out``."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in {
        "W": rng.normal(0, 0.5, (FEATURES, HIDDEN)), "U": rng.normal(0, 0.4, (HIDDEN, HIDDEN)),
        "b": rng.normal(0, 0.1, (HIDDEN,)), "V": rng.normal(0, 0.5, (HIDDEN, CLASSES)),
        "c": rng.normal(0, 0.1, (CLASSES,))}.items()]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "ax0"))
    state_shape = [1, batch, HIDDEN] if state_batch_axis == 1 else [batch, 1, HIDDEN]
    squeeze_axis = 0 if state_batch_axis == 1 else 1
    inits.append(numpy_helper.from_array(np.array([squeeze_axis], np.int64), "sq"))
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Squeeze", ["h_in", "sq"], ["h"]),
        helper.make_node("MatMul", ["h", "U"], ["hu"]),
        helper.make_node("Add", ["xw", "hu"], ["s0"]),
        helper.make_node("Add", ["s0", "b"], ["s1"]),
        helper.make_node("Tanh", ["s1"], ["hn"]),
        helper.make_node("Unsqueeze", ["hn", "sq"], ["h_out"]),
        helper.make_node("MatMul", ["hn", "V"], ["yv"]),
        helper.make_node("Add", ["yv", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "rnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, FEATURES]),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, state_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, CLASSES]),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, state_shape)], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _sequences(s: int = 5, c: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (s, c, FEATURES)).astype(np.float32)


def _ort_stream(path: Path, x: np.ndarray, h0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime, chunk by chunk, one sequence at a time: per-chunk outputs [S, C, K], final states [1, S, H]."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ys, hs = [], []
    for s in range(x.shape[0]):
        h = np.zeros((1, 1, HIDDEN), np.float32) if h0 is None else h0[:, s : s + 1]
        per = []
        for c in range(x.shape[1]):
            y, h = sess.run(None, {"x": x[s, c : c + 1], "h_in": h})
            per.append(y[0])
        ys.append(np.stack(per))
        hs.append(h)
    return np.stack(ys), np.concatenate(hs, axis=1)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def test_state_pairs_found_by_name_and_shape(tmp_path: Path) -> None:
    model = cimc.load(_rnn(tmp_path / "rnn.onnx"))
    pairs = find_state_pairs(model)
    assert [(p.output, p.input) for p in pairs] == [("h_out", "h_in")]


def test_stream_equals_onnxruntime_on_ideal_chunk_by_chunk(tmp_path: Path) -> None:
    path = _rnn(tmp_path / "rnn.onnx")
    compiled = cimc.compile(path, "ideal")
    x = _sequences()
    out = cimc.run(compiled, {"x": x}, stream="auto", all_outputs=True, ideal=True)
    ref_y, ref_h = _ort_stream(path, x)
    assert out["y"].shape == (5, 7, CLASSES) and out["h_out"].shape == (1, 5, HIDDEN)
    assert _rel(out["y"], ref_y) < 1e-5 and _rel(out["h_out"], ref_h) < 1e-5
    # on the ideal target the programmed chip at any time is the same: still equal
    chip = cimc.run(compiled, {"x": x}, stream=["h_out=h_in"], time="24h", all_outputs=True)
    assert _rel(chip["y"], ref_y) < 1e-5
    # a given initial state is used instead of zeros
    h0 = np.random.default_rng(1).normal(0, 0.5, (1, 5, HIDDEN)).astype(np.float32)
    given = cimc.run(compiled, {"x": x, "h_in": h0}, stream="auto", ideal=True)
    assert _rel(given, _ort_stream(path, x, h0)[0]) < 1e-5
    # the state matters: without carrying it (every chunk from zeros) the outputs differ
    flat = cimc.run(compiled, {"x": x.reshape(-1, FEATURES), "h_in": np.zeros((1, 35, HIDDEN), np.float32)},
                    ideal=True).reshape(5, 7, CLASSES)
    assert _rel(flat, ref_y) > 0.05


def test_stream_on_a_noisy_chip_carries_each_instance_state(tmp_path: Path) -> None:
    """On a drifted chip each instance runs the whole stream with its own devices and state: simulate's
    per-instance metric equals the one computed from that chip's `run` outputs, and differs between chips."""
    path = _rnn(tmp_path / "rnn.onnx")
    x = _sequences(6, 5)
    compiled = cimc.compile(path, "aon-cim", calibration={"x": _sequences(8, 5, seed=3)}, stream="auto")
    result = cimc.simulate(compiled, {"x": x}, drift="1y", instances=3, stream="auto", compare_gdc=False,
                           metric="cosine")
    assert result.data["stream"] == {"pairs": ["h_out=h_in"], "chunks": 5}
    assert result.data["metric"] == "cosine"
    per_instance = result.data["series"][0]["points"][0]["per_instance"]
    ref_y = cimc.run(compiled, {"x": x}, stream="auto", ideal=True).reshape(6, -1)
    ort_y, _ = _ort_stream(path, x)
    assert _rel(ref_y, ort_y.reshape(6, -1)) < 0.05  # 8-bit converters only
    for k in range(3):
        chip = cimc.run(compiled, {"x": x}, stream="auto", time="1y", instance=k, instances=3).reshape(6, -1)
        cos = (chip * ort_y.reshape(6, -1)).sum(1) / np.linalg.norm(chip, axis=1) / np.linalg.norm(ort_y.reshape(6, -1), axis=1)
        assert abs(float(cos.mean()) - per_instance[k]) < 1e-4
    assert len(set(np.round(per_instance, 6))) == 3


def test_calibration_sees_the_real_states(tmp_path: Path) -> None:
    """With --stream, calibration runs the float model over the sequences: the DAC range of the state's
    layer (h U) is set by the states the model really produces, not by zeros."""
    path = _rnn(tmp_path / "rnn.onnx")
    calib = _sequences(8, 6, seed=3)
    compiled = cimc.compile(path, "aon-cim", calibration={"x": calib}, stream="auto")
    import json

    quant = {n.name: json.loads(n.metadata_props["cimc.quant"]) for n in compiled.model.graph
             if "cimc.quant" in n.metadata_props}
    state_layer = next(n.name for n in compiled.model.graph if n.op_type == "MatMul" and n.inputs[1].name == "U")
    assert 0.3 < quant[state_layer]["x_max"] <= 1.0  # tanh states: |h| up to ~1
    # a zero state (no stream) leaves that layer's input all zero: no range can be measured from it
    zero = cimc.compile(path, "aon-cim", calibration={"x": calib.reshape(-1, FEATURES),
                                                       "h_in": np.zeros((1, 48, HIDDEN), np.float32)})
    zq = json.loads(next(n for n in zero.model.graph if n.name == state_layer).metadata_props["cimc.quant"])
    assert zq["x_max"] != quant[state_layer]["x_max"]


def test_named_inputs_errors_name_the_input(tmp_path: Path) -> None:
    model = cimc.load(_rnn(tmp_path / "rnn.onnx"))
    x = _sequences()
    with pytest.raises(DataError, match=r"missing h_in \[1, N, 16\].*--stream auto"):
        bind({"x": x[:, 0]}, model)
    with pytest.raises(DataError, match=r"not inputs of the model: 'extra'"):
        bind({"x": x, "extra": x}, model, stream="auto")
    with pytest.raises(DataError, match=r"input 'x': shape \[5, 8\].*\[N, C, 8\]"):
        bind({"x": x[:, 0]}, model, stream="auto")
    with pytest.raises(DataError, match=r"input 'h_in': shape \[5, 1, 16\]"):
        bind({"x": x[:, 0], "h_in": np.zeros((5, 1, HIDDEN), np.float32)}, model)
    with pytest.raises(DataError, match="'nope' is not an output"):
        bind({"x": x}, model, stream=["nope=h_in"])
    feed = bind({"x": x[:, 0], "h_in": np.zeros((1, 5, HIDDEN), np.float32)}, model)
    assert len(feed) == 5 and not feed.streaming


def test_input_shape_fixing_the_batch_keeps_the_state_batch_axis(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    """``--input-shape h_in=1,1,16`` fixes the batch symbol to 1: axis 1 stays the state's batch, so 3 samples
    with a [1, 3, 16] state run (they used to count 1 sample and refuse)."""
    path = _rnn(tmp_path / "rnn.onnx")
    res = run_cli("compile", path, "--target", "ideal", "--input-shape", "h_in=1,1,16", "--input-shape", "x=1,8",
                  "-o", tmp_path / "c", "-q")
    assert res.code == 0, res.err
    x = _sequences(3, 1)[:, 0]
    h = np.random.default_rng(2).normal(0, 0.5, (1, 3, HIDDEN)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x, h_in=h)
    res = run_cli("run", tmp_path / "c", "--input", tmp_path / "in.npz", "-o", tmp_path / "out.npz")
    assert res.code == 0, res.err
    out = np.load(tmp_path / "out.npz")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref_y, ref_h = sess.run(None, {"x": x, "h_in": h})
    assert _rel(out["y"], ref_y) < 1e-5 and out["h_out"].shape == (1, 3, HIDDEN) and _rel(out["h_out"], ref_h) < 1e-5


def test_cli_stream_run_and_simulate(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path = _rnn(tmp_path / "rnn.onnx")
    np.savez(tmp_path / "seq.npz", x=_sequences(4, 6))
    res = run_cli("compile", path, "--target", "hermes", "--calib", tmp_path / "seq.npz", "--stream", "auto",
                  "-o", tmp_path / "c", "-q")
    assert res.code == 0, res.err
    res = run_cli("run", tmp_path / "c", "--input", tmp_path / "seq.npz", "--stream", "h_out=h_in", "--ideal",
                  "-o", tmp_path / "o.npz")
    assert res.code == 0, res.err
    assert np.load(tmp_path / "o.npz")["y"].shape == (4, 6, CLASSES)
    res = run_cli("simulate", tmp_path / "c", "--data", tmp_path / "seq.npz", "--stream", "auto", "--instances", "2",
                  "--drift", "24h", "--threads", "1", "-o", tmp_path / "s", "-q")
    assert res.code == 0, res.err
    # without --stream the missing state is named, with the flag that runs it as a stream
    res = run_cli("simulate", tmp_path / "c", "--data", tmp_path / "seq.npz", "--instances", "1", "--drift", "1s")
    assert res.code == 2 and "missing h_in" in res.err and "--stream auto" in res.err and "Traceback" not in res.err
    res = run_cli("run", tmp_path / "c", "--input", tmp_path / "seq.npz", "--stream", "bad", "-o", tmp_path / "x.npz")
    assert res.code == 2 and "OUTPUT=INPUT" in res.err


def test_diagnose_runs_a_stream(tmp_path: Path) -> None:
    """diagnose feeds every chunk with its carried state: per-layer SNRs for both layers of the cell."""
    path = _rnn(tmp_path / "rnn.onnx")
    compiled = cimc.compile(path, "aon-cim", calibration={"x": _sequences(8, 5, seed=3)}, stream="auto")
    result = cimc.diagnose(compiled, {"x": _sequences(4, 5)}, stream="auto", instances=2, metric="relerr",
                           try_advice=False)
    names = {row["name"] for row in result.data["layers"]}
    assert len(names) == 3 and result.data["data"] == "inputs"
    assert all(row["snr_db"]["all"] is not None for row in result.data["layers"])


def test_diagnose_tries_its_advice_on_a_stream(tmp_path: Path) -> None:
    """With the advice tried (the default), the variants are calibrated on the stream's data as bound (they used
    to fail: the bound feed was read as a file name)."""
    path = _rnn(tmp_path / "rnn.onnx")
    compiled = cimc.compile(path, "aon-cim", calibration={"x": _sequences(8, 5, seed=3)}, stream="auto")
    result = cimc.diagnose(compiled, {"x": _sequences(4, 5)}, stream="auto", instances=1, metric="relerr",
                           max_trials=2)
    tried = result.data["tried"]
    assert tried and all(t.get("error") is None for t in tried)
    assert all(t["after"]["value"] is not None and t["gain"] is not None for t in tried)
