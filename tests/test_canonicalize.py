"""Canonicalisation passes on tiny graphs built in code: the rewritten graph, its numbers, ``result.modified``."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cimc.passes.canonicalize import (
    CANONICALIZE,
    CleanupPass,
    FoldBatchNormPass,
    FoldConstantsPass,
    MatMulAddToGemmPass,
    RemoveNoOpsPass,
    canonicalize,
)
from cimc.runtime.executor import Executor
from tests.models import make_ir_model, rel_l2

RNG = np.random.default_rng(5)


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def _run(model: ir.Model, *inputs: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in Executor(model)(*(torch.from_numpy(x) for x in inputs))]


def _randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _bn_params(prefix: str, n: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_scale": RNG.uniform(0.5, 1.5, n).astype(np.float32),
        f"{prefix}_bias": _randn(n),
        f"{prefix}_mean": _randn(n),
        f"{prefix}_var": RNG.uniform(0.5, 1.5, n).astype(np.float32),
    }


def _bn(x: str, y: str, prefix: str) -> ir.Node:
    ins = [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean", f"{prefix}_var"]
    return helper.make_node("BatchNormalization", ins, [y], name=prefix, epsilon=1e-3)


# ------------------------------------------------------------------------------------------ constant folding
def test_constant_node_becomes_initializer() -> None:
    c = _randn(2, 3)
    model = make_ir_model(
        [
            helper.make_node("Constant", [], ["c"], name="const", value=numpy_helper.from_array(c)),
            helper.make_node("Add", ["x", "c"], ["y"], name="add"),
        ],
        [("x", (2, 3))],
        ["y"],
    )
    assert FoldConstantsPass()(model).modified
    assert _ops(model) == ["Add"]
    add = next(iter(model.graph))
    np.testing.assert_array_equal(add.inputs[1].const_value.numpy(), c)
    assert add.inputs[1].is_initializer()
    assert not FoldConstantsPass()(model).modified


def test_constant_of_shape_is_folded() -> None:
    model = make_ir_model(
        [
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["c"],
                name="cos",
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.5]),
            ),
            helper.make_node("Mul", ["x", "c"], ["y"], name="mul"),
        ],
        [("x", (2, 3))],
        ["y"],
        {"shape": np.array([2, 3], dtype=np.int64)},
    )
    result = FoldConstantsPass()(model)
    assert result.modified
    assert _ops(model) == ["Mul"]
    folded = next(iter(model.graph)).inputs[1].const_value.numpy()
    assert folded.shape == (2, 3) and folded.dtype == np.float32
    np.testing.assert_array_equal(folded, np.full((2, 3), 1.5, np.float32))


def _flatten_chain_model() -> ir.Model:
    """What torch exports for ``x.view(x.size(0), -1)``: Shape → Gather → Unsqueeze → Concat → Reshape."""
    return make_ir_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Shape", ["r"], ["s"], name="shape"),
            helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
            helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze"),
            helper.make_node("Concat", ["n1", "minus_one"], ["target"], name="concat", axis=0),
            helper.make_node("Reshape", ["r", "target"], ["y"], name="reshape"),
        ],
        [("x", (2, 3, 4))],
        ["y"],
        {
            "zero": np.array(0, dtype=np.int64),  # a scalar index: Gather's output is 0-d
            "axes0": np.array([0], dtype=np.int64),
            "minus_one": np.array([-1], dtype=np.int64),
        },
    )


def test_shape_gather_concat_reshape_chain_is_folded() -> None:
    model = _flatten_chain_model()
    assert FoldConstantsPass()(model).modified
    assert _ops(model) == ["Relu", "Reshape"]
    reshape = list(model.graph)[1]
    # The batch entry copies the input's own first dimension (0), so the folded target holds at any batch.
    np.testing.assert_array_equal(reshape.inputs[1].const_value.numpy(), [0, -1])
    for batch in (2, 5):
        x = _randn(batch, 3, 4)
        (y,) = _run(model, x)
        np.testing.assert_array_equal(y, np.maximum(x, 0).reshape(batch, 12))


def test_cleanup_drops_the_initializers_folding_left_unused() -> None:
    model = _flatten_chain_model()
    FoldConstantsPass()(model)
    assert {"zero", "axes0", "minus_one"} <= set(model.graph.initializers)
    assert CleanupPass()(model).modified
    assert not {"zero", "axes0", "minus_one"} & set(model.graph.initializers)
    assert not CleanupPass()(model).modified


def test_graph_output_producer_is_not_folded() -> None:
    """Rule 3: a node whose output is a graph output stays (the output must remain a node's output)."""
    model = make_ir_model(
        [helper.make_node("Add", ["a", "b"], ["y"], name="add")],
        [("x", (1,))],
        ["y"],
        {"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)},
    )
    assert not FoldConstantsPass()(model).modified
    assert _ops(model) == ["Add"]


# ------------------------------------------------------------------------------------------ no-ops
def test_identity_and_dropout_are_removed() -> None:
    model = make_ir_model(
        [
            helper.make_node("Identity", ["x"], ["a"], name="id1"),
            helper.make_node("Relu", ["a"], ["b"], name="relu1"),
            helper.make_node("Dropout", ["b"], ["c"], name="drop"),
            helper.make_node("Relu", ["c"], ["d"], name="relu2"),
            helper.make_node("Identity", ["d"], ["y"], name="id2"),
        ],
        [("x", (2, 5))],
        ["y"],
    )
    assert RemoveNoOpsPass()(model).modified
    assert _ops(model) == ["Relu", "Relu"]
    assert model.graph.outputs[0].name == "y"  # the graph output keeps its name
    x = _randn(2, 5)
    np.testing.assert_array_equal(_run(model, x)[0], np.maximum(x, 0))
    assert not RemoveNoOpsPass()(model).modified


def test_dropout_whose_mask_is_read_stays() -> None:
    model = make_ir_model(
        [
            helper.make_node("Dropout", ["x"], ["a", "mask"], name="drop"),
            helper.make_node("Cast", ["mask"], ["m"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("Add", ["a", "m"], ["y"], name="add"),
        ],
        [("x", (2, 5))],
        ["y"],
    )
    assert not RemoveNoOpsPass()(model).modified
    assert "Dropout" in _ops(model)


# ------------------------------------------------------------------------------------------ BatchNorm
@pytest.mark.parametrize("conv_bias", [True, False])
def test_batchnorm_folds_into_conv(conv_bias: bool) -> None:
    inits = {"W": _randn(6, 4, 3, 3), **_bn_params("bn", 6)}
    conv_inputs = ["x", "W"]
    if conv_bias:
        inits["B"] = _randn(6)
        conv_inputs.append("B")
    model = make_ir_model(
        [
            helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]),
            _bn("c", "b", "bn"),
            helper.make_node("Relu", ["b"], ["y"], name="relu"),
        ],
        [("x", (2, 4, 7, 7))],
        ["y"],
        inits,
    )
    x = _randn(2, 4, 7, 7)
    (before,) = _run(model, x)
    assert FoldBatchNormPass()(model).modified
    assert _ops(model) == ["Conv", "Relu"]
    conv = next(iter(model.graph))
    assert len(conv.inputs) == 3 and conv.inputs[2].const_value is not None  # BN's shift became the bias
    (after,) = _run(model, x)
    assert rel_l2(after, before) <= 1e-5
    assert not FoldBatchNormPass()(model).modified


def test_batchnorm_folds_into_gemm() -> None:
    inits = {"W": _randn(5, 8), "C": _randn(5), **_bn_params("bn", 5)}
    model = make_ir_model(
        [
            helper.make_node("Gemm", ["x", "W", "C"], ["g"], name="gemm", transB=1),
            _bn("g", "y", "bn"),
        ],
        [("x", (3, 8))],
        ["y"],
        inits,
    )
    x = _randn(3, 8)
    (before,) = _run(model, x)
    assert FoldBatchNormPass()(model).modified
    assert _ops(model) == ["Gemm"]
    (after,) = _run(model, x)
    assert rel_l2(after, before) <= 1e-5


def test_batchnorm_stays_when_conv_output_has_another_consumer() -> None:
    inits = {"W": _randn(6, 4, 3, 3), "B": _randn(6), **_bn_params("bn", 6)}
    model = make_ir_model(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
            _bn("c", "y1", "bn"),
            helper.make_node("Relu", ["c"], ["y2"], name="relu"),  # a second reader of the conv output
        ],
        [("x", (1, 4, 6, 6))],
        ["y1", "y2"],
        inits,
    )
    weight_before = model.graph.initializers["W"].const_value.numpy().copy()
    assert not FoldBatchNormPass()(model).modified
    assert sorted(_ops(model)) == ["BatchNormalization", "Conv", "Relu"]
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), weight_before)


# ------------------------------------------------------------------------------------------ MatMul + Add
def _matmul_add(weight_is_const: bool, bias_is_const: bool) -> ir.Model:
    inits: dict[str, np.ndarray] = {}
    inputs = [("x", (3, 8))]
    if weight_is_const:
        inits["W"] = _randn(8, 5)
    else:
        inputs.append(("W", (8, 5)))
    if bias_is_const:
        inits["b"] = _randn(5)
    else:
        inputs.append(("b", (5,)))
    return make_ir_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
            helper.make_node("Add", ["m", "b"], ["y"], name="add"),
        ],
        inputs,
        ["y"],
        inits,
    )


def test_matmul_add_with_constants_becomes_gemm() -> None:
    model = _matmul_add(True, True)
    x = _randn(3, 8)
    (before,) = _run(model, x)
    assert MatMulAddToGemmPass()(model).modified
    assert _ops(model) == ["Gemm"]
    (after,) = _run(model, x)
    assert rel_l2(after, before) <= 1e-6
    assert not MatMulAddToGemmPass()(model).modified


@pytest.mark.parametrize(("weight_is_const", "bias_is_const"), [(False, True), (True, False), (False, False)])
def test_matmul_add_with_an_activation_operand_stays(weight_is_const: bool, bias_is_const: bool) -> None:
    model = _matmul_add(weight_is_const, bias_is_const)
    assert not MatMulAddToGemmPass()(model).modified
    assert _ops(model) == ["MatMul", "Add"]


# ------------------------------------------------------------------------------------------ whole pipeline
def _small_net() -> ir.Model:
    inits = {
        "W1": _randn(4, 3, 3, 3),
        **_bn_params("bn", 4),
        "W2": _randn(4 * 4 * 4, 6),
        "b2": _randn(6),
        "zero": np.array(0, dtype=np.int64),
        "axes0": np.array([0], dtype=np.int64),
        "minus_one": np.array([-1], dtype=np.int64),
    }
    return make_ir_model(
        [
            helper.make_node("Conv", ["x", "W1"], ["c"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
            _bn("c", "b", "bn"),
            helper.make_node("Relu", ["b"], ["r"], name="relu"),
            helper.make_node("Dropout", ["r"], ["d"], name="drop"),
            helper.make_node("Shape", ["d"], ["s"], name="shape"),
            helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
            helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze"),
            helper.make_node("Concat", ["n1", "minus_one"], ["target"], name="concat", axis=0),
            helper.make_node("Reshape", ["d", "target"], ["f"], name="flatten"),
            helper.make_node("MatMul", ["f", "W2"], ["m"], name="mm"),
            helper.make_node("Add", ["m", "b2"], ["y"], name="add"),
        ],
        [("x", (1, 3, 8, 8))],
        ["y"],
        inits,
    )


def test_canonicalize_pipeline_end_to_end() -> None:
    model = _small_net()
    x = _randn(1, 3, 8, 8)
    (before,) = _run(model, x)
    canonicalize(model)
    assert _ops(model) == ["Conv", "Relu", "Reshape", "Gemm"]
    assert set(model.graph.initializers) == {
        v.name for n in model.graph for v in n.inputs if v is not None and v.is_initializer()
    }
    (after,) = _run(model, x)
    assert rel_l2(after, before) <= 1e-5


def test_second_run_modifies_nothing() -> None:
    model = _small_net()
    assert CANONICALIZE()(model).modified
    ops = _ops(model)
    assert not CANONICALIZE()(model).modified
    for pass_ in (FoldConstantsPass(), RemoveNoOpsPass(), FoldBatchNormPass(), MatMulAddToGemmPass(), CleanupPass()):
        assert not pass_(model).modified, type(pass_).__name__
    assert _ops(model) == ops
