"""Hostile and broken input: every class is refused with one line and exit code 2 (cimc.validate, cimc.data)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from tests.models import run_ort

RNG = np.random.default_rng(0)
W_CONV = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
W_FC = RNG.normal(size=(8, 4)).astype(np.float32)


def _model(nodes: list[onnx.NodeProto], x_shape: list[int], inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", T.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    try:  # give the output the type the checker wants (inference may refuse a malformed model: keep a rank)
        inferred = onnx.shape_inference.infer_shapes(model)
        model.graph.output[0].CopyFrom(inferred.graph.output[0])
    except onnx.shape_inference.InferenceError:
        pass
    if not model.graph.output[0].type.tensor_type.HasField("shape"):
        model.graph.output[0].type.tensor_type.shape.dim.add().dim_param = "n"
    return model


def conv(**attrs: object) -> onnx.ModelProto:
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c", **attrs)], [1, 3, 8, 8], {"w": W_CONV})


def gemm(**attrs: object) -> onnx.ModelProto:
    return _model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", **attrs)], [1, 8], {"w": W_FC})


def _raw_short() -> onnx.ModelProto:
    m = gemm()
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-4]
    return m


def _typed_short() -> onnx.ModelProto:
    m = gemm()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.float_data.extend([1.0] * 31)
    return m


def _dtype(code: int) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        m = gemm()
        m.graph.initializer[0].data_type = code
        return m

    return build


def _complex_weight() -> onnx.ModelProto:
    m = gemm()
    t = m.graph.initializer[0]
    t.data_type = T.COMPLEX64
    t.raw_data = t.raw_data * 2
    return m


def _string_weight() -> onnx.ModelProto:
    m = gemm()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_type = T.STRING
    t.string_data.extend([b"a"] * 32)
    return m


def _maxpool_too_big() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="c"),
             helper.make_node("MaxPool", ["h"], ["y"], name="pool", kernel_shape=[9, 9])]
    return _model(nodes, [1, 3, 8, 8], {"w": W_CONV})


def _flatten_axis() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="c"),
             helper.make_node("Flatten", ["h"], ["y"], name="flat", axis=7)]
    return _model(nodes, [1, 3, 8, 8], {"w": W_CONV})


def _no_outputs() -> onnx.ModelProto:
    m = gemm()
    del m.graph.output[:]
    return m


def _constant_of_shape_bomb() -> onnx.ModelProto:
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["big"], name="cos",
                              value=helper.make_tensor("v", T.FLOAT, [1], [1.0])),
             helper.make_node("Add", ["x", "big"], ["y"], name="add")]
    return _model(nodes, [1, 1], {"s": np.array([1 << 20, 1 << 20], np.int64)})


def _range_bomb() -> onnx.ModelProto:
    nodes = [helper.make_node("Range", ["a", "b", "c"], ["r"], name="rng"),
             helper.make_node("Cast", ["r"], ["rf"], to=T.FLOAT, name="cast"),
             helper.make_node("Add", ["x", "rf"], ["y"], name="add")]
    return _model(nodes, [1], {"a": np.array(0, np.int64), "b": np.array(1 << 40, np.int64),
                               "c": np.array(1, np.int64)})


CASES: dict[str, tuple[Callable[[], onnx.ModelProto], str]] = {
    "raw_data length": (_raw_short, "raw_data size (124 bytes) is too small"),  # onnx's checker words it
    "typed data count": (_typed_short, "float_data size (31) is too small"),
    "unknown data_type": (_dtype(99), "initializer 'w' has an unknown data_type 99"),
    "complex weight": (_complex_weight, "initializer 'w' has type COMPLEX64, which cimc cannot compute with"),
    "string weight": (_string_weight, "initializer 'w' has type STRING, which cimc cannot compute with"),
    "conv group=0": (lambda: conv(group=0), "node 'c' (Conv) has group=0; it must be 1 or more"),
    "group vs channels": (lambda: conv(group=2), "node 'c' (Conv) gets 3 input channels but its weight"),
    "kernel_shape vs weight": (lambda: conv(kernel_shape=[2, 2]), "has kernel_shape=[2, 2] but its weight is"),
    "strides 0": (lambda: conv(strides=[0, 1]), "node 'c' (Conv) has strides=[0, 1]"),
    "dilations 0": (lambda: conv(dilations=[1, 0]), "node 'c' (Conv) has dilations=[1, 0]"),
    "negative pads": (lambda: conv(pads=[-1, 0, 0, 0]), "node 'c' (Conv) has pads=[-1, 0, 0, 0]"),
    "maxpool kernel > input": (_maxpool_too_big, "node 'pool' (MaxPool): kernel [9, 9] is larger than its padded"),
    "gemm transA": (lambda: gemm(transA=1), "node 'fc' (Gemm) has transA=1 on a computed input"),
    "flatten axis": (_flatten_axis, "node 'flat' (Flatten) has axis=7 outside [-4, 4]"),
    "no outputs": (_no_outputs, "the graph has no outputs"),
    "ConstantOfShape bomb": (_constant_of_shape_bomb, "node 'cos' (ConstantOfShape) output 'big' needs 4.1e+03 GiB, "
                                                      "over the memory budget"),
    "Range bomb": (_range_bomb, "node 'rng' (Range) output 'r' needs"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_model_is_one_line(case: str, tmp_path: Path, run_cli) -> None:
    build, message = CASES[case]
    path = tmp_path / "m.onnx"
    onnx.save(build(), path)
    for command in (("inspect", path), ("compile", path, "-t", "ideal", "-o", tmp_path / "out")):
        res = run_cli(*command)
        assert res.code == 2, (case, res.err)
        lines = res.err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (case, res.err)
    assert not (tmp_path / "out").exists()


def test_memory_budget_flag_and_environment(tmp_path: Path, run_cli, monkeypatch) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(conv(), path)  # a 4 x 3 x 3 x 3 weight, 4 x 6 x 6 output: a few hundred bytes
    assert run_cli("inspect", path).code == 0
    res = run_cli("--memory-budget", "100", "inspect", path)
    assert res.code == 2 and "over the memory budget of" in res.err
    res = run_cli("inspect", path, "--memory-budget", "100")  # after the command name too
    assert res.code == 2 and "over the memory budget of" in res.err
    monkeypatch.setenv("CIMC_MEMORY_BUDGET", "100")
    assert run_cli("inspect", path).code == 2
    assert run_cli("--memory-budget", "1G", "inspect", path).code == 0  # the flag wins
    res = run_cli("--memory-budget", "lots", "inspect", path)
    assert res.code == 2 and "is not a size" in res.err


def _external(tmp_path: Path, entries: dict[str, str]) -> Path:
    m = gemm()
    t = m.graph.initializer[0]
    (tmp_path / "w.bin").write_bytes(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = T.EXTERNAL
    for key, value in entries.items():
        e = t.external_data.add()
        e.key, e.value = key, value
    onnx.save(m, tmp_path / "m.onnx")
    return tmp_path / "m.onnx"


@pytest.mark.parametrize(("entries", "message"), [
    ({"location": "w.bin", "offset": "-4"}, "external data 'offset' is '-4', not a non-negative whole number"),
    ({"location": "w.bin", "length": "lots"}, "external data 'length' is 'lots'"),
    ({"location": "w.bin", "offset": str(1 << 62)}, f"external data offset {1 << 62} is past the end of 'w.bin'"),
    ({"location": "w.bin", "offset": "0", "length": "99999"}, "(offset 0, length 99999) runs past the end"),
    ({"location": "w.bin", "offset": "64"}, "external data has 64 bytes but dims [8, 4] of FLOAT need 128"),
    ({"location": "w\x00.bin"}, "external data location 'w\\x00.bin' contains a NUL byte"),
])
def test_hostile_external_data_is_one_line(entries: dict[str, str], message: str, tmp_path: Path, run_cli) -> None:
    res = run_cli("inspect", _external(tmp_path, entries))
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1 and message in res.err, res.err


def test_non_utf8_name_is_one_line(tmp_path: Path, run_cli) -> None:
    data = gemm().SerializeToString()
    assert data.count(b"\x1a\x02fc") == 1  # NodeProto.name (field 3) = "fc"
    (tmp_path / "m.onnx").write_bytes(data.replace(b"\x1a\x02fc", b"\x1a\x02\xff\xfe"))
    res = run_cli("inspect", tmp_path / "m.onnx")
    assert res.code == 2 and "name '\ufffd\ufffd' is not valid UTF-8" in res.err, res.err


def test_no_analog_layer_is_refused_by_compile_not_inspect(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [1, 8], {}), path)
    assert run_cli("inspect", path).code == 0
    res = run_cli("compile", path, "-t", "ideal", "-o", tmp_path / "out")
    assert res.code == 2 and "no layer maps onto the crossbars" in res.err


def test_denormal_weights_match_onnxruntime(tmp_path: Path, run_cli) -> None:
    """~1e-43 weights: g_max / max|w| overflowed to inf and the read-back gave NaN; onnxruntime is finite."""
    path = tmp_path / "m.onnx"
    m = gemm()
    m.graph.initializer[0].raw_data = np.full((8, 4), 1e-43, np.float32).tobytes()
    onnx.save(m, path)
    x = np.ones((2, 8), np.float32)
    np.save(tmp_path / "x.npy", x)
    (reference,) = run_ort(path, {"x": x[:1]})
    for target in ("ideal", "aon-cim"):
        build = tmp_path / target
        assert run_cli("compile", path, "-t", target, "-o", build, "-q").code == 0
        for extra in ((), ("--ideal",)):
            res = run_cli("run", build, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy", *extra)
            assert res.code == 0, res.err
            y = np.load(tmp_path / "y.npy")
            assert np.isfinite(y).all(), (target, extra, y)
            if target == "ideal":
                np.testing.assert_allclose(y, np.broadcast_to(reference, y.shape), atol=1e-30)


# ------------------------------------------------------------------------------------------ run inputs
@pytest.fixture(scope="module")
def mlp_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cimc.compiler import compile_model

    folder = tmp_path_factory.mktemp("mlp")
    onnx.save(gemm(), folder / "m.onnx")
    compile_model(folder / "m.onnx", "ideal", out_dir=folder / "build")
    return folder / "build"


@pytest.mark.parametrize(("array", "message"), [
    (np.ones(8, np.float32), "shape (8,) does not match the model's input [N, 8]"),
    (np.ones((2, 2, 4), np.float32), "shape (2, 2, 4) does not match the model's input [N, 8]"),
    (np.float32(1.0), "a scalar"),
    (np.ones((0, 8), np.float32), "no samples"),
    (np.array([["a"] * 8]), "is not numeric"),
    (np.full((2, 8), np.nan, np.float32), "non-finite value(s)"),
])
def test_run_inputs_are_checked(array: np.ndarray, message: str, mlp_build: Path, tmp_path: Path, run_cli) -> None:
    np.save(tmp_path / "x.npy", array)
    res = run_cli("run", mlp_build, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1 and message in res.err, res.err


def test_run_refuses_npz_and_objects(mlp_build: Path, tmp_path: Path, run_cli) -> None:
    np.savez(tmp_path / "x.npz", x=np.ones((2, 8), np.float32))
    (tmp_path / "x.npy").write_bytes((tmp_path / "x.npz").read_bytes())  # an .npz under a .npy name
    res = run_cli("run", mlp_build, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert res.code == 2 and "is an .npz archive" in res.err
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    res = run_cli("run", mlp_build, "--input", tmp_path / "o.npy", "-o", tmp_path / "y.npy")
    assert res.code == 2 and "Python objects" in res.err


def test_run_follows_a_model_that_moves_the_batch_axis(tmp_path: Path, run_cli) -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="c"),
             helper.make_node("Flatten", ["h"], ["y"], name="flat", axis=2)]
    onnx.save(_model(nodes, [1, 3, 8, 8], {"w": W_CONV}), tmp_path / "m.onnx")
    assert run_cli("compile", tmp_path / "m.onnx", "-t", "ideal", "-o", tmp_path / "b", "-q").code == 0
    # `run` finds the axis the samples went to (here rows 0-3 are sample 0, rows 4-7 sample 1) and gives what
    # the model gives for each sample: the same numbers as onnxruntime sample by sample.
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = run_cli("run", tmp_path / "b", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert res.code == 0, res.err
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    expected = np.concatenate([sess.run(None, {"x": x[i : i + 1]})[0] for i in range(2)])
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-6)


def test_run_memory_is_bounded_by_the_budget(tmp_path: Path, run_cli) -> None:
    """Conv pads 300 on an 8x8 input: a 5.9 MB output per sample; a 40 MB budget runs two samples per pass."""
    onnx.save(conv(pads=[300] * 4), tmp_path / "m.onnx")
    assert run_cli("compile", tmp_path / "m.onnx", "-t", "ideal", "-o", tmp_path / "b", "-q").code == 0
    np.save(tmp_path / "x.npy", np.ones((3, 3, 8, 8), np.float32))
    res = run_cli("--memory-budget", "40M", "run", tmp_path / "b", "--input", tmp_path / "x.npy", "-o",
                  tmp_path / "y.npy")
    assert res.code == 0, res.err
    assert np.load(tmp_path / "y.npy").shape == (3, 4, 606, 606)
    res = run_cli("--memory-budget", "8M", "run", tmp_path / "b", "--input", tmp_path / "x.npy", "-o",
                  tmp_path / "y.npy")
    assert res.code == 2 and "one sample on 1 chip instance(s) needs" in res.err


# ------------------------------------------------------------------------------------------ data files
def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_data_header_is_checked_before_reading(tmp_path: Path) -> None:
    """A .npy header claiming 1 TiB is refused from the header alone (no allocation)."""
    import zipfile

    from cimc.data import load_dataset
    from cimc.errors import ResourceError

    header = {"descr": "<f4", "fortran_order": False, "shape": (1 << 28, 1024)}
    buf = bytearray()
    import io

    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, header)
    buf += stream.getvalue() + b"\0" * 64
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as z:
        z.writestr("x.npy", bytes(buf))
    with pytest.raises(ResourceError, match=r"'x' \[268435456, 1024\] needs 1.02e\+03 GiB"):
        load_dataset(tmp_path / "bomb.npz")


def test_samples_limit_reads_only_what_it_needs(tmp_path: Path) -> None:
    from cimc.data import load_dataset

    x = RNG.normal(size=(100, 8)).astype(np.float32)
    path = _npz(tmp_path / "d.npz", x=x, y=np.arange(100) % 4)
    ds = load_dataset(path, samples=7)
    assert ds.x.shape == (7, 8) and np.array_equal(ds.x, x[:7]) and list(ds.y) == [0, 1, 2, 3, 0, 1, 2]
    assert ds.x.flags.writeable


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.full((4, 8), np.nan, np.float32), "y": np.zeros(4, np.int64)}, "non-finite value(s)"),
    ({"x": np.zeros((0, 8), np.float32)}, "has no samples"),
    ({"x": np.ones((4, 8), np.float32), "y": np.array([0, 1, 2, 9])}, "labels span 0..9 but the model has 4 classes"),
    ({"x": np.ones((4, 3), np.float32), "y": np.zeros(4, np.int64)}, "per sample but the model"),
])
def test_calibration_and_simulation_data_are_checked(arrays: dict[str, np.ndarray], message: str, mlp_build: Path,
                                                     tmp_path: Path, run_cli) -> None:
    data = _npz(tmp_path / "d.npz", **arrays)
    res = run_cli("simulate", mlp_build, "--data", data, "--instances", "1", "--drift", "1s", "-o", tmp_path / "s")
    assert res.code == 2 and message in res.err, res.err
    if "labels" not in message:
        res = run_cli("compile", mlp_build.parent / "m.onnx", "-t", "aon-cim", "--calib", data, "-o", tmp_path / "b")
        assert res.code == 2 and len(res.err.strip().splitlines()) == 1, res.err


def test_results_json_is_byte_identical_across_runs(mlp_build: Path, tmp_path: Path, run_cli) -> None:
    data = _npz(tmp_path / "d.npz", x=RNG.normal(size=(8, 8)).astype(np.float32), y=np.arange(8) % 4)
    outs = []
    for name in ("a", "b"):
        res = run_cli("simulate", mlp_build, "--data", data, "--instances", "2", "--drift", "1s,1h", "-q", "-o",
                      tmp_path / name)
        assert res.code == 0, res.err
        outs.append((tmp_path / name / "results.json").read_bytes())
        assert "wall_time_s" in json.loads((tmp_path / name / "timings.json").read_text())
    assert outs[0] == outs[1] and b"wall_time" not in outs[0]


@pytest.mark.parametrize("name", ["", "same"])
def test_duplicate_and_empty_node_names_compile(name: str, tmp_path: Path, run_cli) -> None:
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name=name), helper.make_node("Relu", ["h"], ["a"], name=name),
             helper.make_node("Gemm", ["a", "w2"], ["y"], name=name)]
    onnx.save(_model(nodes, [1, 8], {"w": W_FC, "w2": RNG.normal(size=(4, 4)).astype(np.float32)}),
              tmp_path / "m.onnx")
    res = run_cli("compile", tmp_path / "m.onnx", "-t", "aon-cim", "-o", tmp_path / "b", "-q")
    assert res.code == 0, res.err


def test_compiled_folder_pointing_outside_is_refused(mlp_build: Path, tmp_path: Path, run_cli) -> None:
    """A compiled model.onnx whose weights are external data outside the folder is refused, not read."""
    import shutil

    folder = tmp_path / "build"
    shutil.copytree(mlp_build, folder)
    model = onnx.load(folder / "model.onnx")
    t = next(t for t in model.graph.initializer if t.name == "w")
    (tmp_path / "outside.bin").write_bytes(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = T.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", "../outside.bin"
    onnx.save(model, folder / "model.onnx")
    np.save(tmp_path / "x.npy", np.ones((1, 8), np.float32))
    res = run_cli("run", folder, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert res.code == 2 and "outside the model's folder" in res.err, res.err
    (folder / "manifest.json").write_text("{not json")
    res = run_cli("run", folder, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert res.code == 2 and "manifest.json: not valid JSON" in res.err, res.err


def test_a_model_pinning_the_batch_axis_is_refused_when_batched(tmp_path: Path, run_cli) -> None:
    """Expand to a constant [1000, 8]: fine for one sample, but calibration runs many at once."""
    nodes = [helper.make_node("Expand", ["x", "s"], ["e"], name="expand"),
             helper.make_node("Gemm", ["e", "w"], ["y"], name="fc")]
    onnx.save(_model(nodes, [1, 8], {"s": np.array([1000, 1], np.int64), "w": W_FC}), tmp_path / "m.onnx")
    data = _npz(tmp_path / "d.npz", x=np.ones((4, 8), np.float32), y=np.zeros(4, np.int64))
    res = run_cli("compile", tmp_path / "m.onnx", "-t", "aon-cim", "--calib", data, "-o", tmp_path / "b")
    assert res.code == 2 and "node 'expand' (Expand) fails on a batch of 4" in res.err, res.err
    assert len(res.err.strip().splitlines()) == 1


def test_inner_dimension_mismatch_is_refused(tmp_path: Path, run_cli) -> None:
    """ReduceMean with keepdims leaves [1, 5, 1, 1]; a [5, 2] MatMul weight does not fit its last axis."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], name="mean", axes=[2, 3], keepdims=1),
             helper.make_node("MatMul", ["m", "w"], ["y"], name="mm")]
    model = _model(nodes, [1, 5, 3, 3], {"w": RNG.normal(size=(5, 2)).astype(np.float32)})
    onnx.save(model, tmp_path / "m.onnx")
    res = run_cli("inspect", tmp_path / "m.onnx")
    assert res.code == 2 and "node 'mm' (MatMul) multiplies an input with 1 columns by a weight 'w' [5, 2]" in res.err, \
        res.err


def test_calibration_refuses_non_finite_activations(tmp_path: Path, run_cli) -> None:
    """Reciprocal of an input that is 0 gives inf before the Gemm: no DAC range fits, say so in one line."""
    nodes = [helper.make_node("Reciprocal", ["x"], ["r"], name="recip"),
             helper.make_node("Gemm", ["r", "w"], ["y"], name="fc")]
    onnx.save(_model(nodes, [1, 8], {"w": W_FC}), tmp_path / "m.onnx")
    data = _npz(tmp_path / "d.npz", x=np.zeros((4, 8), np.float32), y=np.zeros(4, np.int64))
    res = run_cli("compile", tmp_path / "m.onnx", "-t", "aon-cim", "--calib", data, "-o", tmp_path / "b")
    assert res.code == 2 and "the input of analog layer 'fc' is not finite" in res.err, res.err
    assert len(res.err.strip().splitlines()) == 1
