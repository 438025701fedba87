"""Models as users bring them: dynamic dimensions fixed at compile time, inputs frozen to constants, ``If`` on
a known condition inlined, several inputs and outputs through ``run``, outputs that are not batch-first,
unnamed and duplicate-named nodes. onnxruntime on the original model is the reference throughout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cimc
from cimc.errors import InputError, ModelError
from tests.models import light_model_path, rel_l2, run_ort


def _vad_like(path: Path, seed: int = 0) -> Path:
    """A voice-activity-detector-shaped graph: audio of dynamic length, a sample-rate input that selects a
    front end through ``If``, a state input passed through, two outputs (probability and new state)."""
    rng = np.random.default_rng(seed)

    def branch(name: str, kernel: int, stride: int) -> onnx.GraphProto:
        w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 1, kernel)).astype(np.float32), f"{name}_w")
        b = numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), f"{name}_b")
        nodes = [
            helper.make_node("Conv", ["x3", f"{name}_w", f"{name}_b"], [f"{name}_c"], strides=[stride]),
            helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"]),
            helper.make_node("ReduceMean", [f"{name}_r"], [f"{name}_feat"], axes=[2], keepdims=0),
        ]
        out = helper.make_tensor_value_info(f"{name}_feat", TensorProto.FLOAT, None)
        return helper.make_graph(nodes, name, [], [out], initializer=[w, b])

    wg = rng.normal(0, 0.5, (8, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["input", "axis1"], ["x3"]),
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
        helper.make_node("If", ["is16k"], ["feat"], then_branch=branch("k16", 16, 8), else_branch=branch("k8", 8, 4)),
        helper.make_node("Gemm", ["feat", "wg"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["output"]),
        helper.make_node("Mul", ["state", "half"], ["stateN"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vad",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "samples"]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 16]),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 16]),
        ],
        initializer=[
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array(16000, np.int64), "sr16k"),
            numpy_helper.from_array(wg, "wg"),
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def _seq_first(path: Path, seed: int = 0) -> Path:
    """A CRNN-shaped tail: Conv1d features, then time-major [T, B, C] logits (the batch is axis 1)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 1]),
        helper.make_node("MatMul", ["t", "wo"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "crnn_tail",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 20])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [20, "batch", 37])],
        initializer=[
            numpy_helper.from_array(rng.normal(0, 0.3, (12, 4, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.normal(0, 0.1, (12,)).astype(np.float32), "b"),
            numpy_helper.from_array(rng.normal(0, 0.3, (12, 37)).astype(np.float32), "wo"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def _vad_inputs(samples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "input": rng.normal(0, 0.1, (samples, 512)).astype(np.float32),
        "state": rng.normal(0, 1, (2, samples, 16)).astype(np.float32),
    }


def test_dynamic_dimension_error_names_the_flag(tmp_path: Path, run_cli) -> None:
    path = _vad_like(tmp_path / "vad.onnx")
    with pytest.raises(ModelError, match=r"--input-shape input=1,samples"):
        cimc.load(path, input_values={"sr": 16000})
    res = run_cli("compile", path, "--target", "ideal", "-o", tmp_path / "b", "-q")
    assert res.code == 2 and "Traceback" not in res.err and "--input-shape" in res.err
    assert len(res.err.strip().splitlines()) == 1


@pytest.mark.parametrize("sr", [16000, 8000])
def test_if_on_a_frozen_input_is_inlined_and_matches_onnxruntime(tmp_path: Path, sr: int) -> None:
    path = _vad_like(tmp_path / "vad.onnx")
    model = cimc.load(path, input_shapes={"input": [1, 512]}, input_values={"sr": sr})
    ops = [n.op_type for n in model.graph]
    assert "If" not in ops and "Equal" not in ops
    assert [v.name for v in model.graph.inputs] == ["input", "state"]
    report = cimc.inspect(path, input_shapes={"input": [1, 512]}, input_values={"sr": sr})
    assert report.totals["analog_nodes"] == 2  # the taken branch's Conv and the Gemm head, none left in a subgraph
    compiled = cimc.compile(path, "ideal", input_shapes={"input": [1, 512]}, input_values={"sr": sr})
    rng = np.random.default_rng(1)
    feeds = _vad_inputs(1, rng)
    ours = cimc.run(compiled, feeds, all_outputs=True)
    ref = run_ort(path, {**feeds, "sr": np.array(sr, np.int64)})
    assert set(ours) == {"output", "stateN"}
    assert rel_l2(ours["output"], ref[0]) < 1e-5
    assert rel_l2(ours["stateN"], ref[1]) < 1e-5


def test_run_cli_takes_an_npz_per_input_and_writes_every_output(tmp_path: Path, run_cli) -> None:
    path = _vad_like(tmp_path / "vad.onnx")
    out = tmp_path / "b"
    res = run_cli("compile", path, "--target", "ideal", "--input-shape", "input=1,512", "--input-value", "sr=16000",
                  "-o", out, "-q")
    assert res.code == 0, res.err
    rng = np.random.default_rng(2)
    feeds = _vad_inputs(1, rng)
    np.savez(tmp_path / "in.npz", **feeds)
    res = run_cli("run", out, "--input", tmp_path / "in.npz", "-o", tmp_path / "y.npz")
    assert res.code == 0, res.err
    with np.load(tmp_path / "y.npz") as y:
        ref = run_ort(path, {**feeds, "sr": np.array(16000, np.int64)})
        assert rel_l2(y["output"], ref[0]) < 1e-5 and rel_l2(y["stateN"], ref[1]) < 1e-5
    # A .npy cannot hold two outputs; a missing input is named.
    res = run_cli("run", out, "--input", tmp_path / "in.npz", "-o", tmp_path / "y.npy")
    assert res.code == 2 and ".npz" in res.err
    np.savez(tmp_path / "half.npz", input=feeds["input"])
    res = run_cli("run", out, "--input", tmp_path / "half.npz", "-o", tmp_path / "y.npz")
    assert res.code == 2 and "missing state" in res.err and "Traceback" not in res.err


def test_bad_input_options_are_one_line_errors(tmp_path: Path, run_cli) -> None:
    path = _vad_like(tmp_path / "vad.onnx")
    for args, needle in [
        (["--input-shape", "nosuch=1,2"], "does not have"),
        (["--input-shape", "input=1"], "has 1 dimensions"),
        (["--input-shape", "input=1,abc"], "positive integers"),
        (["--input-shape", "input=1,512", "--input-value", "sr=fast"], "is not a number"),
        (["--input-shape", "input=1,512", "--input-value", "state=1"], "one number for an input"),
    ]:
        res = run_cli("inspect", path, *args)
        assert res.code == 2 and needle in res.err and "Traceback" not in res.err, (args, res.err)
    with pytest.raises(InputError):
        cimc.load(path, input_shapes={"input": [1, 0]}, input_values={"sr": 1})


def test_outputs_that_are_not_batch_first_run_through_the_cli(tmp_path: Path, run_cli) -> None:
    path = _seq_first(tmp_path / "crnn.onnx")
    out = tmp_path / "b"
    assert run_cli("compile", path, "--target", "ideal", "-o", out, "-q").code == 0
    x = np.random.default_rng(3).normal(size=(5, 4, 20)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = run_cli("run", out, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert res.code == 0, res.err
    y = np.load(tmp_path / "y.npy")
    ref = run_ort(path, {"x": x})[0]
    assert y.shape == (20, 5, 37) and rel_l2(y, ref) < 1e-5
    # On a noisy target, one chip instance: finite, and the right shape.
    noisy = cimc.compile(path, "aon-cim")
    y_chip = cimc.run(noisy, x, time="24h", instances=3, instance=1)
    assert y_chip.shape == (20, 5, 37) and np.isfinite(y_chip).all()


def test_unnamed_nodes_compile_and_match(tmp_path: Path) -> None:
    """onnx's light_squeezenet has empty node names (and duplicates are legal ONNX)."""
    compiled = cimc.compile(light_model_path("squeezenet"), "ideal")
    names = [n.name for n in compiled.model.graph]
    assert all(names) and len(set(names)) == len(names)
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="same"), helper.make_node("Gemm", ["a", "w"], ["b"], name="same"),
             helper.make_node("Relu", ["b"], ["y"], name="")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              initializer=[numpy_helper.from_array(rng.normal(size=(6, 3)).astype(np.float32), "w")])
    path = tmp_path / "dup.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    compiled = cimc.compile(path, "aon-cim")
    # onnxruntime refuses repeated node names; the same graph with distinct names is the reference.
    ref_model = onnx.load(path)
    for i, node in enumerate(ref_model.graph.node):
        node.name = f"n{i}"
    onnx.save(ref_model, tmp_path / "ref.onnx")
    x = rng.normal(size=(1, 6)).astype(np.float32)
    assert rel_l2(cimc.run(compiled, x, ideal=True), run_ort(tmp_path / "ref.onnx", {"x": x})[0]) < 1e-5


def test_if_on_a_live_input_maps_both_branches_and_says_how_to_keep_one(tmp_path: Path, run_cli,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    path = _vad_like(tmp_path / "vad.onnx")
    res = run_cli("compile", path, "--target", "ideal", "--input-shape", "input=1,512", "-o", tmp_path / "b")
    assert res.code == 0, res.err
    assert "depends on input(s) sr" in caplog.text and "--input-value" in caplog.text  # the warning says what to freeze
    compiled = cimc.load_compiled(tmp_path / "b")
    assert sum(1 for n in compiled.model.graph if n.op_type == "Conv") == 2  # both front ends are mapped
    rng = np.random.default_rng(3)
    for sr in (16000, 8000):
        feeds = _vad_inputs(1, rng)
        ours = cimc.run(compiled, {**feeds, "sr": np.array([sr], np.int64)}, all_outputs=True)
        ref = run_ort(path, {**feeds, "sr": np.array(sr, np.int64)})
        assert rel_l2(ours["output"], ref[0]) < 1e-5 and rel_l2(ours["stateN"], ref[1]) < 1e-5


def _verifier_like(path: Path, seed: int = 0) -> Path:
    """A first score; only when it passes 0.5 a verifier head (a Gemm inside the then-branch) replaces it:
    control flow that depends on the data, as in openWakeWord's models with a verifier."""
    rng = np.random.default_rng(seed)
    then_nodes = [helper.make_node("Gemm", ["x", "wv", "bv"], ["v"]), helper.make_node("Sigmoid", ["v"], ["p2"])]
    then_b = helper.make_graph(then_nodes, "verify", [], [helper.make_tensor_value_info("p2", TensorProto.FLOAT, None)],
                               initializer=[numpy_helper.from_array(rng.normal(0, 1, (6, 1)).astype(np.float32), "wv"),
                                            numpy_helper.from_array(np.zeros(1, np.float32), "bv")])
    else_b = helper.make_graph([helper.make_node("Identity", ["p1"], ["p1_out"])], "pass", [],
                               [helper.make_tensor_value_info("p1_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["s"]), helper.make_node("Sigmoid", ["s"], ["p1"]),
             helper.make_node("GreaterOrEqual", ["p1", "half"], ["c"]),
             helper.make_node("If", ["c"], ["score"], then_branch=then_b, else_branch=else_b)]
    graph = helper.make_graph(nodes, "verifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1])],
                              initializer=[numpy_helper.from_array(rng.normal(0, 1, (6, 1)).astype(np.float32), "w1"),
                                           numpy_helper.from_array(np.array([[0.5]], np.float32), "half")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_if_on_data_computes_both_branches_and_selects_per_sample(tmp_path: Path) -> None:
    path = _verifier_like(tmp_path / "ww.onnx")
    compiled = cimc.compile(path, "ideal")
    ops = [n.op_type for n in compiled.model.graph]
    assert "If" not in ops and "Where" in ops and ops.count("Gemm") == 2  # the verifier head is mapped too
    x = np.random.default_rng(1).normal(0, 3, (16, 6)).astype(np.float32)
    ref = np.concatenate([run_ort(path, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    first = 1 / (1 + np.exp(-(x @ numpy_helper.to_array(onnx.load(path).graph.initializer[0]))))
    assert 0 < (first >= 0.5).sum() < len(x)  # both branches are taken in this batch
    assert rel_l2(cimc.run(compiled, x), ref) < 1e-5


def test_run_writes_to_stdout_for_a_pipe(tmp_path: Path, run_cli) -> None:
    import subprocess
    import sys

    path = _seq_first(tmp_path / "crnn.onnx")
    assert run_cli("compile", path, "--target", "ideal", "-o", tmp_path / "b", "-q").code == 0
    x = np.random.default_rng(7).normal(size=(2, 4, 20)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-m", "cimc.cli", "run", str(tmp_path / "b"), "--input", str(tmp_path / "x.npy"),
                           "-o", "-"], capture_output=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import io

    y = np.load(io.BytesIO(proc.stdout))
    ref = np.concatenate([run_ort(path, {"x": x[i : i + 1]})[0] for i in range(2)], axis=1)
    assert y.shape == (20, 2, 37) and rel_l2(y, ref) < 1e-5


def _two_inputs(path: Path) -> Path:
    """y = W1 x + W2 h: a sample input and a state-like second input, both batch-first."""
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array(rng.normal(0, 0.5, (8, 4)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.5, (8, 4)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["h", "w2"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["y"])],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
                helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], initializer=[w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_data_commands_on_a_two_input_model(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    """Calibration, simulation and diagnosis feed one array: a model with a second input is refused in one
    line naming the flag that freezes it; frozen, the same commands run."""
    path = _two_inputs(tmp_path / "two.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(16, 8)).astype(np.float32), y=rng.integers(0, 4, 16))
    res = run_cli("compile", path, "--target", "aon-cim", "--calib", tmp_path / "d.npz", "-o", tmp_path / "c")
    assert res.code == 2 and "--input-value h=" in res.err and "Traceback" not in res.err
    assert len(res.err.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
    res = run_cli("compile", path, "--target", "aon-cim", "-o", tmp_path / "u", "-q")
    assert res.code == 0
    res = run_cli("simulate", tmp_path / "u", "--data", tmp_path / "d.npz", "--instances", "2", "--drift", "1s")
    assert res.code == 2 and "--input-value h=" in res.err
    np.save(tmp_path / "h0.npy", np.zeros((1, 8), np.float32))
    res = run_cli("compile", path, "--target", "aon-cim", "--calib", tmp_path / "d.npz", "--input-value",
                  f"h={tmp_path / 'h0.npy'}", "-o", tmp_path / "f", "-q")
    assert res.code == 0, res.err
    res = run_cli("simulate", tmp_path / "f", "--data", tmp_path / "d.npz", "--instances", "2", "--drift", "1s",
                  "--json")
    assert res.code == 0, res.err
