"""ONNX import: what loads (batch fixing, opset conversion, external data) and every way a file can be refused.

Each refusal is checked twice: the API raises the documented :class:`~cimc.errors.CimcError` subclass, and
``cimc inspect`` prints exactly one line on stderr and exits with code 2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import cimc
from cimc.errors import CimcError, InputError, ModelError, UnsupportedOpError
from cimc.frontend import load_model
from cimc.ir import static_shape
from cimc.runtime.executor import Executor
from tests.models import CnnBn, export_onnx, light_model_path, make_onnx_model


def _tiny_matmul(opset: int = 13) -> onnx.ModelProto:
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    return make_onnx_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [("x", (1, 4))], ["y"], {"W": weight}, opset=opset
    )


def _save_external(proto: onnx.ModelProto, model_path: Path, location: str) -> Path:
    """Save with every initializer in an external file, then point the references at ``location``."""
    model_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(
        proto, model_path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=0
    )
    target = (model_path.parent / location).resolve()
    if target != (model_path.parent / "w.bin").resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        (model_path.parent / "w.bin").replace(target)
    saved = onnx.load(model_path, load_external_data=False)
    for tensor in saved.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(saved, model_path)
    return model_path


# ------------------------------------------------------------------------------------------ what loads
def test_batch_dimension_is_fixed_and_shapes_inferred(tmp_path: Path) -> None:
    path = export_onnx(CnnBn(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", dynamic_batch=True)
    assert onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    model = load_model(path, batch=3)
    assert static_shape(model.graph.inputs[0]) == (3, 3, 16, 16)
    assert model.graph.meta["cimc.batch"] == 3
    conv_outputs = [v for node in model.graph if node.op_type == "Conv" for v in node.outputs]
    assert conv_outputs and all((static_shape(v) or ())[:2] == (3, 8) for v in conv_outputs)
    # The flatten's Reshape target is computed from Shape; once folded, every shape is known.
    canonical = cimc.load(path, batch=3)
    for node in canonical.graph:
        assert all(static_shape(v) is not None for v in node.outputs), node.name
    assert static_shape(canonical.graph.outputs[0]) == (3, 10)


def test_old_opset_is_converted_and_initializer_inputs_dropped() -> None:
    """The light models are IR v3 / opset 9 and list every weight as a graph input too."""
    path = light_model_path("squeezenet")
    proto = onnx.load(path)
    assert proto.opset_import[0].version < 13 and len(proto.graph.input) > 1
    model = load_model(path)
    assert model.opset_imports[""] == 13
    assert [v.name for v in model.graph.inputs] == ["data_0"]


def test_external_data_inside_the_folder_loads(tmp_path: Path) -> None:
    path = _save_external(_tiny_matmul(), tmp_path / "m.onnx", "data/w.bin")
    model = cimc.load(path)
    weight = next(iter(model.graph)).inputs[1].const_value.numpy()
    np.testing.assert_array_equal(weight, np.arange(12, dtype=np.float32).reshape(4, 3))
    with torch.no_grad():
        (y,) = Executor(model)(torch.ones(1, 4))
    np.testing.assert_allclose(y.numpy(), weight.sum(axis=0, keepdims=True))


def test_load_is_deterministic_for_a_given_file(tmp_path: Path) -> None:
    path = export_onnx(CnnBn(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    first, second = cimc.load(path), cimc.load(path)
    assert [n.op_type for n in first.graph] == [n.op_type for n in second.graph]
    for name, value in first.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), second.graph.initializers[name].const_value.numpy())


# ------------------------------------------------------------------------------------------ what is refused
BadFile = Callable[[Path], Path]


def _missing(tmp: Path) -> Path:
    return tmp / "does_not_exist.onnx"


def _directory(tmp: Path) -> Path:
    (tmp / "folder.onnx").mkdir()
    return tmp / "folder.onnx"


def _text_file(tmp: Path) -> Path:
    path = tmp / "notes.onnx"
    path.write_text("this is a CSV file,not a model\n1,2,3\n")
    return path


def _truncated(tmp: Path) -> Path:
    good = export_onnx(CnnBn(), torch.randn(1, 3, 16, 16), tmp / "good.onnx").read_bytes()
    path = tmp / "truncated.onnx"
    path.write_bytes(good[: len(good) // 2])
    return path


def _empty(tmp: Path) -> Path:
    path = tmp / "empty.onnx"
    path.write_bytes(b"")
    return path


def _dynamic_feature_dim(tmp: Path) -> Path:
    proto = make_onnx_model([helper.make_node("Relu", ["audio"], ["y"])], [("audio", ("N", 10, "frames"))], ["y"])
    onnx.save(proto, tmp / "dyn.onnx")
    return tmp / "dyn.onnx"


def _external_outside(tmp: Path) -> Path:
    return _save_external(_tiny_matmul(), tmp / "model" / "m.onnx", "../w.bin")


def _external_missing(tmp: Path) -> Path:
    path = _save_external(_tiny_matmul(), tmp / "m.onnx", "w.bin")
    (tmp / "w.bin").unlink()
    return path


def _opset_too_old(tmp: Path) -> Path:
    onnx.save(_tiny_matmul(opset=8), tmp / "old.onnx")
    return tmp / "old.onnx"


# case: (builder, error class, fragments the one-line message must contain)
BAD_FILES: dict[str, tuple[BadFile, type[CimcError], tuple[str, ...]]] = {
    "missing": (_missing, InputError, ("does_not_exist.onnx", "no such file")),
    "directory": (_directory, InputError, ("folder.onnx", "folder")),
    "text_file": (_text_file, InputError, ("notes.onnx",)),
    "truncated": (_truncated, InputError, ("truncated.onnx", "truncated")),
    "empty": (_empty, InputError, ("empty.onnx", "empty")),
    "dynamic_feature_dim": (_dynamic_feature_dim, ModelError, ("'audio'", "dimension 2", "frames")),
    "external_data_outside_folder": (_external_outside, InputError, ("../w.bin", "outside the model's folder")),
    "external_data_missing": (_external_missing, InputError, ("w.bin", "missing")),
    "opset_too_old": (_opset_too_old, ModelError, ("opset 8", "9..")),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_raises_a_one_line_cimc_error(case: str, tmp_path: Path) -> None:
    build, error, fragments = BAD_FILES[case]
    path = build(tmp_path)
    with pytest.raises(error) as info:
        cimc.load(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gives_one_stderr_line_and_exit_2(case: str, tmp_path: Path, run_cli) -> None:
    build, _, fragments = BAD_FILES[case]
    result = run_cli("inspect", build(tmp_path))
    assert result.code == 2
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cimc inspect: error: ")
    assert fragments[0] in lines[0]
    assert "Traceback" not in result.err


def test_batch_below_one_is_refused(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_tiny_matmul(), path)
    with pytest.raises(InputError, match="batch size"):
        cimc.load(path, batch=0)
    result = run_cli("inspect", path, "--batch", "0")
    assert result.code == 2 and len(result.err.splitlines()) == 1


# ------------------------------------------------------------------------------------------ unsupported ops
def _unsupported_model(tmp: Path) -> Path:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["selected"], name="nms_1"),
        helper.make_node("FancyNorm", ["h"], ["z"], name="custom_1", domain="com.example"),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ]
    proto = make_onnx_model(
        nodes,
        [("x", (1, 4)), ("boxes", (1, 3, 4)), ("scores", (1, 1, 3))],
        [("y", (1, 4)), ("selected", ("n", 3), TensorProto.INT64)],
        {"W": np.ones((4, 4), np.float32)},
        extra_opsets={"com.example": 1},
    )
    onnx.save(proto, tmp / "unsupported.onnx")
    return tmp / "unsupported.onnx"


def test_unsupported_ops_are_listed_all_at_once(tmp_path: Path) -> None:
    model = cimc.load(_unsupported_model(tmp_path))  # importing works: the error comes when it must run
    with pytest.raises(UnsupportedOpError) as info:
        Executor(model)
    err = info.value
    assert sorted((name, op) for name, op, _ in err.offending) == [
        ("custom_1", "FancyNorm"),
        ("nms_1", "NonMaxSuppression"),
    ]
    message = str(err)
    assert "\n" not in message
    assert "NonMaxSuppression x1 ('nms_1')" in message and "FancyNorm x1 ('custom_1')" in message
    assert "com.example" in message


def test_inspect_marks_unsupported_nodes(tmp_path: Path, run_cli) -> None:
    result = run_cli("inspect", _unsupported_model(tmp_path))
    assert result.code == 0
    rows = {line.split()[0]: line for line in result.out.splitlines() if line.strip()}
    assert "UNSUPPORTED" in rows["nms_1"] and "UNSUPPORTED" in rows["custom_1"]
    assert "UNSUPPORTED" not in rows["mm"] and "analog" in rows["mm"]
    assert "2 unsupported" in result.out


def test_unsupported_op_message_names_each_op_type_once() -> None:
    """45 offending nodes of 3 op types: one short line, each type once with its count and a few names."""
    offending = [(f"conv_{i}", "ConvInteger", "no implementation in cimc's digital unit") for i in range(20)]
    offending += [(f"dq_{i}", "DynamicQuantizeLinear", "no implementation in cimc's digital unit") for i in range(20)]
    offending += [(f"lstm_{i}", "DynamicQuantizeLSTM", "custom domain 'com.microsoft'") for i in range(5)]
    message = str(UnsupportedOpError(offending))
    assert "\n" not in message and len(message) < 600
    assert message.startswith("45 unsupported node(s) of 3 op type(s)")
    assert "ConvInteger x20 ('conv_0', 'conv_1', 'conv_2' and 17 more)" in message
    assert "DynamicQuantizeLSTM x5 ('lstm_0', 'lstm_1', 'lstm_2' and 2 more): custom domain 'com.microsoft'" in message
    assert message.count("ConvInteger") == 1 and "conv_3" not in message
