"""cimc.data: the .npz dataset format, its round trip and its user-facing errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cimc
from cimc.data import Dataset, batches, bind, load_dataset, save_dataset
from cimc.errors import DataError, InputError


def _arrays(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 1, 4, 3)).astype(np.float32), rng.integers(0, 5, n)


def test_round_trip_is_exact(tmp_path):
    x, y = _arrays()
    path = save_dataset(tmp_path / "d.npz", x, y)
    ds = load_dataset(path)
    assert isinstance(ds, Dataset)
    assert len(ds) == 10 and ds.sample_shape == (1, 4, 3) and ds.name == "d"
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    np.testing.assert_array_equal(ds.x, x)
    np.testing.assert_array_equal(ds.y, y)


def test_float16_storage_loads_as_float32(tmp_path):
    x, y = _arrays()
    ds = load_dataset(save_dataset(tmp_path / "h.npz", x, y, float16=True))
    assert ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.x, x, rtol=1e-3, atol=1e-3)
    assert not np.array_equal(ds.x, x)  # really stored at half precision


def test_save_leaves_no_temporary_files_and_overwrites(tmp_path):
    x, y = _arrays()
    save_dataset(tmp_path / "d.npz", x, y)
    save_dataset(tmp_path / "d.npz", x[:3], y[:3])
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]
    assert len(load_dataset(tmp_path / "d.npz")) == 3


def test_unlabelled_dataset(tmp_path):
    x, _ = _arrays()
    np.savez(tmp_path / "u.npz", x=x)
    ds = load_dataset(tmp_path / "u.npz")
    assert ds.y is None and len(ds) == 10


def test_batches_cover_every_sample_once(tmp_path):
    x, y = _arrays(10)
    ds = Dataset(x=x, y=y, name="t")
    parts = list(batches(ds, 4))
    assert [len(xb) for xb, _ in parts] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in parts]), y)
    with pytest.raises(DataError):
        list(batches(ds, 0))


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_dataset(tmp_path / "absent.npz")


def test_not_an_npz_is_input_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("hello, not numpy")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_dataset(bad)
    npy = tmp_path / "arr.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(InputError, match="single .npy"):
        load_dataset(npy)
    with pytest.raises(InputError, match="folder"):
        load_dataset(tmp_path)


def test_truncated_npz_is_input_error(tmp_path):
    x, y = _arrays(200)
    path = save_dataset(tmp_path / "t.npz", x, y)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError):
        load_dataset(path)


def test_missing_x_is_data_error(tmp_path):
    """A file whose arrays are named after no input of the model: binding names the missing and the extra."""
    np.savez(tmp_path / "nox.npz", inputs=np.zeros((3, 2), np.float32), y=np.zeros(3, np.int64))
    ds = load_dataset(tmp_path / "nox.npz")
    assert sorted(ds.inputs) == ["inputs"]
    model = cimc.load(_gemm_model(tmp_path))
    with pytest.raises(DataError, match=r"missing a \[N, 2\]; not inputs of the model: 'inputs'"):
        bind(ds, model)
    np.savez(tmp_path / "none.npz", y=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="no inputs"):
        load_dataset(tmp_path / "none.npz")


def _gemm_model(tmp_path, inputs=("a",)):  # type: ignore[no-untyped-def]
    """y = sum of x_i W_i over the named inputs, each [n, 2]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(2, 3)).astype(np.float32), f"w{i}") for i in range(len(inputs))]
    nodes = [helper.make_node("MatMul", [n, f"w{i}"], [f"p{i}"]) for i, n in enumerate(inputs)]
    out = "p0"
    for i in range(1, len(inputs)):
        nodes.append(helper.make_node("Add", [out, f"p{i}"], [f"s{i}"]))
        out = f"s{i}"
    nodes.append(helper.make_node("Identity", [out], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 2]) for n in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], initializer=inits)
    path = tmp_path / f"m{len(inputs)}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_named_inputs_bind_in_graph_order_and_errors_name_them(tmp_path):
    model = cimc.load(_gemm_model(tmp_path, ("a", "b")))
    a, b = np.ones((4, 2), np.float32), np.full((4, 2), 2.0, np.float32)
    np.savez(tmp_path / "ab.npz", b=b, a=a, y=np.arange(4))
    feed = bind(load_dataset(tmp_path / "ab.npz"), model)
    assert [s.name for s in feed.specs] == ["a", "b"] and len(feed) == 4 and feed.single is None
    np.testing.assert_array_equal(feed.arrays[1], b)
    np.testing.assert_array_equal(feed.take(1, 3).y, [1, 2])
    with pytest.raises(DataError, match=r"missing b \[N, 2\].*--input-value b=VALUE"):
        bind({"a": a}, model)
    with pytest.raises(DataError, match=r"input 'b': shape \(4, 3\) does not match the model's input \[N, 2\]"):
        bind({"a": a, "b": np.ones((4, 3), np.float32)}, model)
    with pytest.raises(DataError, match=r"different numbers of samples \(4, and 5 for 'b'\)"):
        bind({"a": a, "b": np.ones((5, 2), np.float32)}, model)
    with pytest.raises(DataError, match="4 samples but 3 labels"):
        bind({"a": a, "b": b, "y": np.arange(3)}, model)
    # a one-input file's x still binds to a one-input model, whatever the input is called
    one = cimc.load(_gemm_model(tmp_path / "..", ("a",)))
    assert bind({"x": a}, one).single is not None


def test_non_integer_labels_are_data_error(tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "fy.npz", x=x, y=y.astype(np.float32))
    with pytest.raises(DataError, match="integers"):
        load_dataset(tmp_path / "fy.npz")


def test_length_mismatch_is_data_error(tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "mm.npz", x=x, y=y[:7])
    with pytest.raises(DataError, match="10 samples but 'y' has 7"):
        load_dataset(tmp_path / "mm.npz")
    with pytest.raises(DataError):
        save_dataset(tmp_path / "mm2.npz", x, y[:7])


def test_bad_shapes_are_data_errors(tmp_path):
    np.savez(tmp_path / "flat.npz", x=np.zeros(5, np.float32))
    with pytest.raises(DataError, match="sample axis"):
        load_dataset(tmp_path / "flat.npz")
    np.savez(tmp_path / "y2d.npz", x=np.zeros((5, 2), np.float32), y=np.zeros((5, 1), np.int64))
    with pytest.raises(DataError, match=r"\[N\]"):
        load_dataset(tmp_path / "y2d.npz")


def test_save_needs_npz_suffix(tmp_path):
    x, y = _arrays()
    with pytest.raises(InputError, match=".npz"):
        save_dataset(tmp_path / "d.npy", x, y)


def test_error_messages_are_one_line(tmp_path):
    for call in (lambda: load_dataset(tmp_path / "absent.npz"), lambda: load_dataset("no-such-builtin")):
        with pytest.raises(InputError) as info:
            call()
        assert "\n" not in str(info.value)


def test_builtin_names_resolve():
    ds = load_dataset("mnist-test")
    assert ds.name == "mnist-test" and ds.sample_shape == (1, 28, 28) and len(ds) == 1000
