"""One-hot × matrix embedding lookups become a Gather, and still equal onnxruntime on the original model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import cimc
from cimc.ir import is_analog
from cimc.runtime.executor import Executor
from tests.models import rel_l2, run_ort

DEPTH, N = 257, 64


def _model(path: Path, values: tuple[float, float], cast: bool, index_type: int, bias: bool = False,
           depth_type: type = np.int64) -> Path:
    """indices [2, 48] → OneHot(depth 257) [2, 48, 257] (→ Cast) → MatMul W [257, 64] (→ Add b)."""
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(np.array(DEPTH, depth_type), "depth"),
        onnx.numpy_helper.from_array(np.array(values, np.int64 if cast else np.float32), "values"),
        onnx.numpy_helper.from_array(rng.standard_normal((DEPTH, N)).astype(np.float32), "W"),
        onnx.numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b"),
    ]
    nodes = [helper.make_node("OneHot", ["idx", "depth", "values"], ["oh"], name="onehot", axis=-1)]
    if cast:
        nodes.append(helper.make_node("Cast", ["oh"], ["ohf"], name="cast", to=TensorProto.FLOAT))
    nodes.append(helper.make_node("MatMul", ["ohf" if cast else "oh", "W"], ["mm" if bias else "y"], name="embed"))
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"], name="bias"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("idx", index_type, [2, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48, N])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


# (values, Cast between, index type, bias Add, depth type): type combinations onnxruntime implements
CASES = {
    "int64_indices": ((0.0, 1.0), False, TensorProto.INT64, False, np.int64),
    "int64_one_hot_cast_and_bias": ((0, 1), True, TensorProto.INT64, True, np.int64),
    "float_indices_other_values": ((0.25, 2.0), False, TensorProto.FLOAT, False, np.float32),
    "int32_indices_other_values": ((-1.0, 3.0), False, TensorProto.INT32, False, np.float32),
    "int64_one_hot_cast_other_values": ((-1, 3), True, TensorProto.INT64, False, np.int64),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_hot_matmul_becomes_gather(case: str, tmp_path: Path) -> None:
    values, cast, index_type, bias, depth_type = CASES[case]
    path = _model(tmp_path / "embed.onnx", values, cast, index_type, bias, depth_type)
    model = cimc.load(path)
    ops = [n.op_type for n in model.graph]
    assert "Gather" in ops and "OneHot" not in ops and "MatMul" not in ops
    assert not any(is_analog(n) for n in model.graph)  # a lookup: nothing left to program on the crossbar
    rng = np.random.default_rng(1)
    idx = rng.integers(-DEPTH, DEPTH, (2, 48))  # negative indices count from the end in both forms
    idx = idx.astype(np.float32 if index_type == TensorProto.FLOAT else np.int32 if index_type == TensorProto.INT32
                     else np.int64)
    (expected,) = run_ort(path, {"idx": idx})
    with torch.no_grad():
        (actual,) = Executor(model)(torch.from_numpy(idx))
    assert rel_l2(actual.numpy(), expected) <= 1e-6


def test_one_hot_on_another_axis_is_left_alone(tmp_path: Path) -> None:
    """axis=0 puts the one-hot dimension first: the MatMul does not contract it, so no rewrite."""
    from onnx_ir.passes.common import ShapeInferencePass

    from passes.embedding import OneHotMatMulToGatherPass

    inits = [onnx.numpy_helper.from_array(np.array(4, np.int64), "depth"),
             onnx.numpy_helper.from_array(np.array([0, 1], np.float32), "values"),
             onnx.numpy_helper.from_array(np.ones((3, 5), np.float32), "W")]
    nodes = [helper.make_node("OneHot", ["idx", "depth", "values"], ["oh"], name="onehot", axis=0),
             helper.make_node("MatMul", ["oh", "W"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("idx", TensorProto.INT64, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2, 5])], inits)
    import onnx_ir as ir

    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    ShapeInferencePass()(model)
    assert not OneHotMatMulToGatherPass()(model).modified
    assert [n.op_type for n in model.graph] == ["OneHot", "MatMul"]


def test_comparison_one_hot_becomes_gather(tmp_path: Path) -> None:
    """jax2tf's one_hot: Equal(indices[..., None], arange(depth)) → Cast → MatMul (magika, issue 22): no one-hot
    tensor is left (on hermes it alone outgrew the 1 MiB SRAM), and the lookup equals onnxruntime."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(np.array([2, 48, 1], np.int64), "shape"),
             onnx.numpy_helper.from_array(np.arange(DEPTH, dtype=np.int32), "iota"),
             onnx.numpy_helper.from_array(rng.standard_normal((DEPTH, N)).astype(np.float32), "W")]
    nodes = [helper.make_node("Reshape", ["idx", "shape"], ["col"], name="col"),
             helper.make_node("Equal", ["col", "iota"], ["eq"], name="eq"),
             helper.make_node("Cast", ["eq"], ["oh"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["oh", "W"], ["y"], name="embed")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("idx", TensorProto.INT32, [2, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48, N])], inits)
    path = tmp_path / "cmp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    model = cimc.load(path)
    ops = [n.op_type for n in model.graph]
    assert "Gather" in ops and not {"Equal", "Cast", "MatMul"} & set(ops)
    assert all(DEPTH not in (v.shape or ()) for n in model.graph for v in n.outputs)  # no [.., 257] tensor
    idx = rng.integers(0, DEPTH, (2, 48)).astype(np.int32)
    (expected,) = run_ort(path, {"idx": idx})
    with torch.no_grad():
        (actual,) = Executor(model)(torch.from_numpy(idx))
    assert rel_l2(actual.numpy(), expected) <= 1e-6
