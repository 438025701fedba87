"""Quantised ONNX models (made by onnxruntime's own quantisation tools) import, map and equal onnxruntime.

Each torch model is exported, quantised with ``onnxruntime.quantization`` (dynamic: ConvInteger/MatMulInteger
with DynamicQuantizeLinear; static QDQ: QuantizeLinear/DequantizeLinear pairs; static QOperator: QLinearConv,
QLinearMatMul and com.microsoft QLinearAdd/QLinearAveragePool/QGemm), imported by cimc and run by its executor.
The integer weights become float initializers (analog ops); the activations' quantisation runs digitally,
so the outputs equal onnxruntime's on the quantised model to within one output quantisation step, while the
float model differs from both by the quantisation error.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import cimc
from cimc.compiler import compile_model
from cimc.ir import is_analog
from cimc.runtime.executor import Executor
from passes.dequantize import DequantizePass
from tests.models import CnnBn, MatMulMlp, export_onnx, make_onnx_model, rel_l2, run_ort

ort_quant = pytest.importorskip("onnxruntime.quantization")

MODELS = {"cnn": (CnnBn, (3, 16, 16)), "mlp": (MatMulMlp, (20,))}
FORMATS = ("dynamic", "qdq", "qoperator")
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd",
               "QLinearAveragePool", "DynamicQuantizeLSTM"}


class _Reader(ort_quant.CalibrationDataReader):
    def __init__(self, shape: tuple[int, ...]):
        rng = np.random.default_rng(5)
        self._data = iter([{"x": rng.standard_normal((1, *shape)).astype(np.float32)} for _ in range(8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._data, None)


def _quantize(src: Path, dst: Path, fmt: str, shape: tuple[int, ...]) -> Path:
    logging.getLogger().setLevel(logging.ERROR)  # the tool's "consider pre-processing" advice
    if fmt == "dynamic":
        ort_quant.quantize_dynamic(str(src), str(dst), weight_type=ort_quant.QuantType.QInt8)
    else:
        quant_format = ort_quant.QuantFormat.QDQ if fmt == "qdq" else ort_quant.QuantFormat.QOperator
        ort_quant.quantize_static(str(src), str(dst), _Reader(shape), quant_format=quant_format)
    return dst


@pytest.fixture(scope="module")
def quantised(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("quantised")
    out = {}
    for name, (builder, shape) in MODELS.items():
        src = export_onnx(builder(), torch.randn(1, *shape), folder / f"{name}.onnx")
        for fmt in FORMATS:
            out[name, fmt] = (src, _quantize(src, folder / f"{name}_{fmt}.onnx", fmt, shape))
    return out


def _output_step(path: Path) -> float:
    """The quantisation step of the model's output (its final DequantizeLinear's scale), 0 for a float output."""
    proto = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    final = next(n for n in proto.graph.node if proto.graph.output[0].name in n.output)
    if final.op_type != "DequantizeLinear":
        return 0.0
    return float(np.max(inits[final.input[1]]))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantised_model_equals_onnxruntime(name: str, fmt: str, quantised: dict, seeded: int) -> None:
    src, path = quantised[name, fmt]
    raw_ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert raw_ops & (INTEGER_OPS | {"DequantizeLinear"})  # the tool really quantised the model
    model = cimc.load(path)
    ops = {n.op_type for n in model.graph}
    assert not ops & INTEGER_OPS
    float_model = cimc.load(src)
    assert sum(is_analog(n) for n in model.graph) == sum(is_analog(n) for n in float_model.graph) > 0
    executor = Executor(model)
    x = np.random.default_rng(seeded).standard_normal((3, *MODELS[name][1])).astype(np.float32)
    for i in range(3):  # one sample per run: a dynamic range is measured over the whole batch
        xi = x[i : i + 1]
        (expected,) = run_ort(path, {"x": xi})
        with torch.no_grad():
            actual = executor(torch.from_numpy(xi))[0].numpy()
        (float_out,) = run_ort(src, {"x": xi})
        step = _output_step(path)
        # Equal within the output's quantisation step (a rounding tie upstream may land one step apart).
        assert np.abs(actual - expected).max() <= step + 1e-5 * np.abs(expected).max()
        assert np.mean(np.abs(actual - expected) > 1e-5 * np.abs(expected).max()) <= 0.25
        assert rel_l2(float_out, expected) > 1e-3  # the quantisation is real: the float model differs


def test_dynamically_quantised_cnn_compiles_on_ideal(quantised: dict) -> None:
    src, path = quantised["cnn", "dynamic"]

    def mapped(p: Path) -> list[int]:
        model = compile_model(p, "ideal").model
        return [math.prod(n.inputs[1].shape) for n in model.graph if "cimc.placement" in n.metadata_props]

    # The same layers with the same weight counts (the quantised Linear maps as MatMul, the float one as Gemm).
    assert len(mapped(path)) == 4 and mapped(path) == mapped(src)


def test_dynamic_quantize_linear_equals_onnxruntime(tmp_path: Path) -> None:
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"], name="dql")]
    proto = make_onnx_model(nodes, [("x", (4, 7))], [("q", (4, 7), TensorProto.UINT8), ("s", (), TensorProto.FLOAT),
                                                     ("z", (), TensorProto.UINT8)])
    onnx.save(proto, tmp_path / "dql.onnx")
    rng = np.random.default_rng(0)
    # Ties: values at exactly (k + 0.5) steps of a range [-1, 1.55] (scale 0.01, zero point 100) round half to even.
    ties = np.concatenate([[-1.0, 1.55], (np.arange(26) + 0.5) * 0.01 * np.float32(2.55 / 2.55)]).astype(np.float32)
    for x in (rng.standard_normal((4, 7)), rng.uniform(0.5, 3.0, (4, 7)), -rng.uniform(0.5, 3.0, (4, 7)),
              np.zeros((4, 7)), ties.reshape(4, 7), rng.standard_normal((4, 7)) * 1e-30):
        x = x.astype(np.float32)
        expected = run_ort(tmp_path / "dql.onnx", {"x": x})
        actual = cimc.ops.OPS["DynamicQuantizeLinear"]([torch.from_numpy(x)], {})
        # onnxruntime's arithmetic exactly: scale = (max - min) / 255 in float32, zero point = round-half-even of
        # clamp(-min / scale), codes = round-half-even(x / scale) + zero point, clamped (issue 22)
        assert actual[1].numpy().tobytes() == np.asarray(expected[1], np.float32).tobytes()
        assert int(actual[2]) == int(expected[2])
        assert np.array_equal(actual[0].numpy(), expected[0])


def test_dynamic_quantize_lstm_becomes_a_float_lstm(tmp_path: Path) -> None:
    """com.microsoft.DynamicQuantizeLSTM → a standard LSTM on dequantised weights (onnxruntime runs both)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lstm = nn.LSTM(8, 16)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.lstm(x)[0])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(5, 1, 8),), str(tmp_path / "lstm.onnx"), dynamo=False,
                          opset_version=13, input_names=["x"], output_names=["y"])
    _quantize(tmp_path / "lstm.onnx", tmp_path / "lstm_dyn.onnx", "dynamic", (5, 1, 8))
    model = ir.load(tmp_path / "lstm_dyn.onnx")
    assert "DynamicQuantizeLSTM" in {n.op_type for n in model.graph}
    assert DequantizePass()(model).modified
    ops = [n.op_type for n in model.graph]
    assert "LSTM" in ops and not set(ops) & INTEGER_OPS
    ir.save(model, tmp_path / "lstm_deq.onnx")
    x = np.random.default_rng(1).standard_normal((5, 1, 8)).astype(np.float32)
    (quant,) = run_ort(tmp_path / "lstm_dyn.onnx", {"x": x})
    (deq,) = run_ort(tmp_path / "lstm_deq.onnx", {"x": x})
    (flt,) = run_ort(tmp_path / "lstm.onnx", {"x": x})
    # onnxruntime's quantised LSTM also quantises the activations: the two differ by about that step.
    assert rel_l2(deq, quant) < 0.02 and rel_l2(deq, quant) < 2 * rel_l2(flt, quant)


def test_integer_op_without_constant_weight_is_refused_with_one_line(tmp_path: Path) -> None:
    nodes = [helper.make_node("MatMulInteger", ["a", "b"], ["y"], name="mmi")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 3]),
                                           helper.make_tensor_value_info("b", TensorProto.UINT8, [3, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "mmi.onnx")
    model = cimc.load(tmp_path / "mmi.onnx")
    with pytest.raises(cimc.errors.UnsupportedOpError, match=r"MatMulInteger x1 \('mmi'\)"):
        Executor(model)


def test_cli_inspects_and_compiles_a_quantised_model(quantised: dict, tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    _, path = quantised["mlp", "qoperator"]
    res = run_cli("inspect", path)
    assert res.code == 0 and "UNSUPPORTED" not in res.out and "analog" in res.out
    res = run_cli("compile", path, "--target", "ideal", "-o", tmp_path / "out")
    assert res.code == 0, res.err
    assert (tmp_path / "out" / "model.onnx").is_file()
