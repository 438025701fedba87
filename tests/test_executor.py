"""Golden tests: cimc's torch executor against onnxruntime, and the analog (hook) path against the native one.

The reference is onnxruntime on the model file (the original export, or the canonical model saved back to
ONNX); the executor runs the model cimc imported and canonicalised. Agreement is a relative L2 error of
at most 1e-5 in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import helper

import cimc
from cimc.errors import UnsupportedOpError
from cimc.ir import is_analog
from cimc.runtime.executor import AnalogStep, Executor
from tests.models import (
    LIGHT_MODELS,
    AudioNet1d,
    CnnBn,
    GroupedConcatNet,
    MatMulMlp,
    MobileNetV3Like,
    export_onnx,
    light_model_any_batch,
    light_model_path,
    make_ir_model,
    randomize_initializers,
    rel_l2,
    run_ort,
    strip_final_softmax,
)

RTOL = 1e-5

# (builder, input shape without batch, opset)
TORCH_CASES = {
    "cnn_bn_opset13": (CnnBn, (3, 16, 16), 13),
    "cnn_bn_opset17": (CnnBn, (3, 16, 16), 17),
    "cnn_bn_opset9": (CnnBn, (3, 16, 16), 9),  # converted to opset 13 on import
    "audio1d_opset13": (AudioNet1d, (10, 49), 13),
    "audio1d_opset11": (AudioNet1d, (10, 49), 11),
    "mlp_matmul_opset13": (MatMulMlp, (20,), 13),
    "grouped_concat_opset17": (GroupedConcatNet, (8, 12, 12), 17),
}


def _run(executor: Executor, *inputs: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in executor(*(torch.from_numpy(x) for x in inputs))]


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def _ideal_hook(calls: list[str]) -> Callable[[AnalogStep, torch.Tensor, torch.Tensor], torch.Tensor]:
    def hook(step: AnalogStep, cols: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        calls.append(step.name)
        return torch.einsum("bmgk,gkn->bmgn", cols, mat)

    return hook


# ------------------------------------------------------------------------------------------ torch exports
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each TORCH_CASES model exported once (fixed batch 1) for the tests of this module."""
    folder = tmp_path_factory.mktemp("exports")
    paths = {}
    for case, (builder, shape, opset) in TORCH_CASES.items():
        paths[case] = export_onnx(builder(), torch.randn(1, *shape), folder / f"{case}.onnx", opset=opset)
    return paths


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_torch_export_matches_onnxruntime(case: str, exported: dict[str, Path], seeded: int) -> None:
    _, shape, _ = TORCH_CASES[case]
    x = np.random.default_rng(seeded).standard_normal((1, *shape)).astype(np.float32)
    (expected,) = run_ort(exported[case], {"x": x})
    model = cimc.load(exported[case])
    (actual,) = _run(Executor(model), x)
    assert rel_l2(actual, expected) <= RTOL
    assert float(np.std(expected)) > 1e-3  # a degenerate reference would prove nothing


@pytest.mark.parametrize("case", ["cnn_bn_opset13", "cnn_bn_opset9", "audio1d_opset11"])
def test_batchnorm_is_folded_into_conv(case: str, exported: dict[str, Path]) -> None:
    raw = cimc.load(exported[case], canonicalize=False)
    assert "BatchNormalization" in _ops(raw)
    ops = _ops(cimc.load(exported[case]))
    assert "BatchNormalization" not in ops
    assert not {"Shape", "Gather", "Concat", "Constant", "Identity"} & set(ops)  # view-flatten folded


def test_matmul_add_becomes_gemm(exported: dict[str, Path]) -> None:
    raw_ops = _ops(cimc.load(exported["mlp_matmul_opset13"], canonicalize=False))
    assert raw_ops.count("MatMul") == 2 and raw_ops.count("Add") == 2
    ops = _ops(cimc.load(exported["mlp_matmul_opset13"]))
    assert ops.count("Gemm") == 2 and "MatMul" not in ops and "Add" not in ops


def test_opset9_model_is_converted_to_13(exported: dict[str, Path]) -> None:
    model = cimc.load(exported["cnn_bn_opset9"])
    assert model.opset_imports[""] == 13


def test_dynamic_batch_model_runs_at_batch_4(tmp_path: Path, seeded: int) -> None:
    path = export_onnx(CnnBn(seed=3), torch.randn(1, 3, 16, 16), tmp_path / "dyn.onnx", dynamic_batch=True)
    x = np.random.default_rng(seeded).standard_normal((4, 3, 16, 16)).astype(np.float32)
    (expected,) = run_ort(path, {"x": x})
    model = cimc.load(path, batch=4)
    assert list(model.graph.inputs[0].shape) == [4, 3, 16, 16]
    assert not {"Shape", "Gather", "Unsqueeze", "Concat"} & set(_ops(model))  # the flatten's shape is folded
    (actual,) = _run(Executor(model), x)
    assert actual.shape == (4, 10)
    assert rel_l2(actual, expected) <= RTOL


@pytest.mark.parametrize("case", ["cnn_bn_opset13", "audio1d_opset13", "grouped_concat_opset17"])
def test_runs_at_a_batch_other_than_the_imported_one(case: str, exported: dict[str, Path], seeded: int) -> None:
    """Imported at batch 1 (the flatten's Reshape target has the 1 baked in), run at batch 3."""
    _, shape, _ = TORCH_CASES[case]
    x = np.random.default_rng(seeded).standard_normal((3, *shape)).astype(np.float32)
    expected = np.concatenate([run_ort(exported[case], {"x": x[i : i + 1]})[0] for i in range(3)])
    model = cimc.load(exported[case])
    reshapes = [n for n in model.graph if n.op_type == "Reshape"]
    assert reshapes and int(reshapes[0].inputs[1].const_value.numpy()[0]) == 1
    (actual,) = _run(Executor(model), x)
    assert rel_l2(actual, expected) <= RTOL


# ------------------------------------------------------------------------------------------ light models
@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_matches_onnxruntime(name: str, tmp_path: Path) -> None:
    """Real topologies with seeded random weights; compared on the logits (before any final Softmax)."""
    model = cimc.load(light_model_path(name))
    strip_final_softmax(model)
    assert "Softmax" not in _ops(model)
    assert randomize_initializers(model, seed=7) > 0
    path = tmp_path / f"{name}.onnx"
    ir.save(model, path, external_data=f"{name}.data")  # raw bytes: 0.1 s instead of 8 s for VGG-19's 550 MB
    (inp,) = model.graph.inputs
    x = np.random.default_rng(11).standard_normal(tuple(inp.shape)).astype(np.float32)
    (expected,) = run_ort(path, {inp.name: x})
    (actual,) = _run(Executor(model), x)
    assert float(np.std(expected)) > 1e-3  # random weights: the logits differ from class to class
    assert rel_l2(actual, expected) <= RTOL


# VGG-19 (144 M weights, 45 s here) only at batch 1: its layers are AlexNet's and ZFNet's kinds.
@pytest.mark.parametrize("name", [m for m in LIGHT_MODELS if m != "vgg19"])
def test_light_model_matches_onnxruntime_at_batch_2(name: str, tmp_path: Path) -> None:
    """The same at batch 2 (imported at batch 2): channels-last layouts, in-place ops and the plan's value
    releases must not mix up samples; the two samples differ, so a swap would show."""
    model = cimc.load(light_model_any_batch(name, tmp_path), batch=2)
    strip_final_softmax(model)
    randomize_initializers(model, seed=5)
    path = tmp_path / f"{name}_b2.onnx"
    ir.save(model, path, external_data=f"{name}_b2.data")
    (inp,) = model.graph.inputs
    assert tuple(inp.shape)[0] == 2
    x = np.random.default_rng(12).standard_normal(tuple(inp.shape)).astype(np.float32)
    (expected,) = run_ort(path, {inp.name: x})
    (actual,) = _run(Executor(model), x)
    assert actual.shape == expected.shape and rel_l2(expected[0], expected[1]) > 1e-3
    assert rel_l2(actual, expected) <= RTOL


def test_mobilenet_v3_like_matches_onnxruntime(tmp_path: Path, seeded: int) -> None:
    """Depthwise convolutions, hardswish written as x·HardSigmoid(x) (fused by the executor), squeeze-excite."""
    path = export_onnx(MobileNetV3Like(seed=seeded), torch.randn(1, 3, 96, 96), tmp_path / "mnv3.onnx",
                       dynamic_batch=True)
    x = np.random.default_rng(seeded).standard_normal((3, 3, 96, 96)).astype(np.float32)
    (expected,) = run_ort(path, {"x": x})
    model = cimc.load(path, batch=3)
    assert {"HardSigmoid", "Mul", "GlobalAveragePool"} <= set(_ops(model))
    (actual,) = _run(Executor(model), x)
    assert rel_l2(actual, expected) <= RTOL
    with torch.enable_grad():  # the training path (no in-place ops) computes the same numbers
        (trained_path,) = Executor(model)(torch.from_numpy(x))
    assert rel_l2(trained_path.detach().numpy(), expected) <= RTOL


# ------------------------------------------------------------------------------------------ analog hook path
@pytest.mark.parametrize("case", ["cnn_bn_opset13", "audio1d_opset13", "grouped_concat_opset17", "mlp_matmul_opset13"])
def test_ideal_hook_equals_native_on_exports(case: str, exported: dict[str, Path], seeded: int) -> None:
    _, shape, _ = TORCH_CASES[case]
    x = np.random.default_rng(seeded).standard_normal((2, *shape)).astype(np.float32)
    model = cimc.load(exported[case], batch=2)
    (native,) = _run(Executor(model), x)
    calls: list[str] = []
    (hooked,) = _run(Executor(model, hook=_ideal_hook(calls)), x)
    assert len(calls) == sum(is_analog(n) for n in model.graph) > 0
    assert rel_l2(hooked, native) <= RTOL


@pytest.mark.parametrize("name", ["shufflenet", "squeezenet"])
def test_ideal_hook_equals_native_on_light_model(name: str) -> None:
    """Real topologies: ShuffleNet's grouped 1×1 and depthwise convs, SqueezeNet's fire modules."""
    model = cimc.load(light_model_path(name))
    randomize_initializers(model, seed=3)
    x = np.random.default_rng(4).standard_normal(tuple(model.graph.inputs[0].shape)).astype(np.float32)
    (native,) = _run(Executor(model), x)
    calls: list[str] = []
    (hooked,) = _run(Executor(model, hook=_ideal_hook(calls)), x)
    assert len(calls) == sum(is_analog(n) for n in model.graph) > 20
    assert rel_l2(hooked, native) <= RTOL


CONV_VARIANTS = {
    # name: (input shape, weight shape, attributes)
    "plain": ((2, 4, 9, 9), (6, 4, 3, 3), {}),
    "strided_padded": ((2, 4, 9, 9), (6, 4, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "asymmetric_pads": ((2, 4, 9, 8), (6, 4, 3, 2), {"pads": [0, 1, 2, 0]}),
    "dilated": ((2, 4, 11, 11), (6, 4, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    "grouped": ((2, 6, 8, 8), (9, 2, 3, 3), {"group": 3, "pads": [1, 1, 1, 1]}),
    "depthwise": ((2, 5, 8, 8), (5, 1, 3, 3), {"group": 5, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "same_upper": ((2, 4, 9, 9), (6, 4, 4, 4), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "conv1d": ((2, 4, 20), (6, 4, 5), {"pads": [2, 2]}),
    "conv1d_strided_dilated_grouped": ((2, 4, 21), (6, 2, 3), {"strides": [2], "dilations": [3], "group": 2}),
}


@pytest.mark.parametrize("variant", sorted(CONV_VARIANTS))
def test_ideal_hook_equals_native_conv(variant: str, seeded: int) -> None:
    x_shape, w_shape, attrs = CONV_VARIANTS[variant]
    rng = np.random.default_rng(seeded)
    inits = {
        "W": rng.standard_normal(w_shape).astype(np.float32),
        "B": rng.standard_normal(w_shape[0]).astype(np.float32),
    }
    model = make_ir_model(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", **attrs)], [("x", x_shape)], ["y"], inits
    )
    x = rng.standard_normal(x_shape).astype(np.float32)
    (native,) = _run(Executor(model), x)
    assert tuple(native.shape) == tuple(model.graph.outputs[0].shape)  # the native op obeys ONNX's shape rules
    calls: list[str] = []
    (hooked,) = _run(Executor(model, hook=_ideal_hook(calls)), x)
    assert calls == ["conv"]
    assert rel_l2(hooked, native) <= RTOL


GEMM_VARIANTS = {
    "plain": ({}, (5, 7), (7, 3)),
    "transB": ({"transB": 1}, (5, 7), (3, 7)),
    "alpha_beta": ({"alpha": 0.5, "beta": 2.0}, (5, 7), (7, 3)),
    "transA_transB_alpha_beta": ({"transA": 1, "transB": 1, "alpha": 1.5, "beta": -0.5}, (7, 5), (3, 7)),
}


@pytest.mark.parametrize("variant", sorted(GEMM_VARIANTS))
def test_ideal_hook_equals_native_gemm(variant: str, tmp_path: Path, seeded: int) -> None:
    attrs, x_shape, w_shape = GEMM_VARIANTS[variant]
    rng = np.random.default_rng(seeded)
    inits = {"W": rng.standard_normal(w_shape).astype(np.float32), "C": rng.standard_normal(3).astype(np.float32)}
    model = make_ir_model(
        [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", **attrs)], [("x", x_shape)], ["y"], inits
    )
    x = rng.standard_normal(x_shape).astype(np.float32)
    path = tmp_path / "gemm.onnx"
    ir.save(model, path)
    (expected,) = run_ort(path, {"x": x})
    (native,) = _run(Executor(model), x)
    assert rel_l2(native, expected) <= RTOL
    calls: list[str] = []
    (hooked,) = _run(Executor(model, hook=_ideal_hook(calls)), x)
    assert calls == ["gemm"]
    assert rel_l2(hooked, native) <= RTOL


MATMUL_VARIANTS = {
    # name: (inputs in order, x shape, W shape)
    "right_2d": (["x", "W"], (5, 7), (7, 3)),
    "right_3d": (["x", "W"], (2, 5, 7), (7, 3)),
    "left_2d": (["W", "x"], (7, 4), (3, 7)),
    "left_3d": (["W", "x"], (2, 7, 4), (3, 7)),
}


@pytest.mark.parametrize("variant", sorted(MATMUL_VARIANTS))
def test_ideal_hook_equals_native_matmul(variant: str, tmp_path: Path, seeded: int) -> None:
    operands, x_shape, w_shape = MATMUL_VARIANTS[variant]
    rng = np.random.default_rng(seeded)
    inits = {"W": rng.standard_normal(w_shape).astype(np.float32)}
    model = make_ir_model([helper.make_node("MatMul", operands, ["y"], name="mm")], [("x", x_shape)], ["y"], inits)
    x = rng.standard_normal(x_shape).astype(np.float32)
    path = tmp_path / "mm.onnx"
    ir.save(model, path)
    (expected,) = run_ort(path, {"x": x})
    (native,) = _run(Executor(model), x)
    assert rel_l2(native, expected) <= RTOL
    calls: list[str] = []
    executor = Executor(model, hook=_ideal_hook(calls))
    assert executor.analog_steps[0].weight_input == operands.index("W")
    (hooked,) = _run(executor, x)
    assert calls == ["mm"]
    assert rel_l2(hooked, native) <= RTOL


def test_hook_output_is_what_the_executor_returns(seeded: int) -> None:
    """A hook that doubles every MVM doubles a bias-free layer: the hook's result is really used."""
    rng = np.random.default_rng(seeded)
    inits = {"W": rng.standard_normal((7, 3)).astype(np.float32)}
    model = make_ir_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [("x", (4, 7))], ["y"], inits)
    x = rng.standard_normal((4, 7)).astype(np.float32)
    (native,) = _run(Executor(model), x)
    (doubled,) = _run(Executor(model, hook=lambda s, c, m: 2 * torch.einsum("bmgk,gkn->bmgn", c, m)), x)
    np.testing.assert_allclose(doubled, 2 * native, rtol=1e-5, atol=1e-6)


def test_executor_rejects_unsupported_ops() -> None:
    model = make_ir_model(
        [
            helper.make_node("Relu", ["x"], ["h"], name="relu"),
            helper.make_node("MyOp", ["h"], ["y"], name="mine", domain="com.x"),
        ],
        [("x", (1, 4))],
        [("y", (1, 4))],
        extra_opsets={"com.x": 1},
    )
    with pytest.raises(UnsupportedOpError, match="MyOp x1 \\('mine'\\)"):
        Executor(model)
