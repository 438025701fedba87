"""Digital op coverage: every op in cimc's table against onnxruntime, on single-node graphs.

Each case builds a one-node ONNX model with ``onnx.helper`` (data as graph inputs, attribute-like tensors
such as Resize scales or Pad amounts as initializers), imports it with ``cimc.load`` (the user's path:
shape inference, canonicalisation) and runs cimc's executor; onnxruntime (all graph optimisations off) runs
the same file. Float outputs must agree to a relative L2 error of 1e-5 (1e-4 where a transcendental
function's float32 rounding differs); integer and boolean outputs exactly, with the same dtype.
Combinatorial attribute spaces (Resize, ConvTranspose, Pad) are drawn with hypothesis, bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import cimc
from cimc.ir import is_analog
from cimc.runtime.executor import Executor
from tests.models import rel_l2, run_ort

RTOL = 1e-5
_RNG = np.random.default_rng(0)
_HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _model(op: str, inputs: dict[str, np.ndarray], attrs: dict[str, Any] | None = None,
           inits: dict[str, np.ndarray] | None = None, order: Sequence[str] | None = None, n_out: int = 1,
           opset: int = 18) -> onnx.ModelProto:
    inits = inits or {}
    names = list(order) if order is not None else [*inputs, *inits]
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, **(attrs or {}))
    graph = helper.make_graph(
        [node], "single",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
         for k, v in inputs.items()],
        [onnx.ValueInfoProto(name=o) for o in outs],
        [numpy_helper.from_array(np.asarray(v), name=k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for out in model.graph.output:  # ops defined as functions (GroupNormalization-18) may stay untyped
        if not out.type.HasField("tensor_type"):
            first = next(iter(inputs.values()))
            out.type.CopyFrom(helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(first.dtype), first.shape))
    return model


def check(tmp: Path, op: str, inputs: dict[str, np.ndarray], attrs: dict[str, Any] | None = None,
          inits: dict[str, np.ndarray] | None = None, *, order: Sequence[str] | None = None, n_out: int = 1,
          opset: int = 18, rtol: float = RTOL) -> list[np.ndarray]:
    """Run the single-node model in onnxruntime and in cimc; assert they agree on every output."""
    path = tmp / f"{op}.onnx"
    onnx.save(_model(op, inputs, attrs, inits, order, n_out, opset), path)
    want = run_ort(path, inputs)
    model = cimc.load(path)
    ex = Executor(model).eval()
    with torch.no_grad():
        got = ex(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in ex.input_names))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = g.numpy()
        assert g.shape == w.shape, f"{op}: shape {g.shape} != onnxruntime's {w.shape}"
        if np.issubdtype(w.dtype, np.floating):
            assert g.dtype == w.dtype, f"{op}: dtype {g.dtype} != {w.dtype}"
            finite = np.isfinite(w)
            assert np.array_equal(np.isnan(g), np.isnan(w)) and np.array_equal(np.isinf(g), np.isinf(w))
            if finite.any():
                assert rel_l2(g[finite], w[finite]) <= rtol, f"{op} {attrs}: rel. L2 {rel_l2(g[finite], w[finite]):.2e}"
        else:
            assert g.dtype == w.dtype, f"{op}: dtype {g.dtype} != {w.dtype}"
            np.testing.assert_array_equal(g, w)
    return want


def f32(*shape: int, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    return _RNG.uniform(low, high, size=shape).astype(np.float32)


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


# ------------------------------------------------------------------------------------- elementwise
UNARY = ["Sign", "Round", "Ceil", "Floor", "Erf", "Softplus", "Softsign", "Mish", "Sin", "Cos", "Tan", "Atan",
         "Sinh", "Cosh", "Asinh", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Exp", "HardSwish", "Identity"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(tmp_path: Path, op: str) -> None:
    x = np.concatenate([f32(20), np.array([-1.5, -0.5, 0.0, 0.5, 1.5, 2.5], np.float32)])  # Round: halves
    check(tmp_path, op, {"x": x}, rtol=1e-4 if op in ("Mish", "Tan") else RTOL)


@pytest.mark.parametrize("op,low,high", [("Asin", -1, 1), ("Acos", -1, 1), ("Atanh", -0.9, 0.9), ("Acosh", 1, 4),
                                         ("Log", 0.1, 4), ("Sqrt", 0, 4), ("Reciprocal", 0.5, 3)])
def test_unary_domain(tmp_path: Path, op: str, low: float, high: float) -> None:
    check(tmp_path, op, {"x": f32(3, 7, low=low, high=high)})


@pytest.mark.parametrize("op,attrs", [
    ("Gelu", {}), ("Gelu", {"approximate": "tanh"}), ("Selu", {}), ("Selu", {"alpha": 1.5, "gamma": 0.8}),
    ("Celu", {}), ("Celu", {"alpha": 0.5}), ("ThresholdedRelu", {}), ("ThresholdedRelu", {"alpha": 0.3}),
    ("HardSigmoid", {}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}), ("LeakyRelu", {"alpha": 0.2}),
    ("Elu", {"alpha": 0.7}), ("Shrink", {}), ("Shrink", {"bias": 0.3, "lambd": 1.0}),
])
def test_unary_attrs(tmp_path: Path, op: str, attrs: dict[str, Any]) -> None:
    check(tmp_path, op, {"x": f32(4, 9)}, attrs, opset=20 if op == "Gelu" else 18)


def test_isnan_isinf(tmp_path: Path) -> None:
    x = np.array([1.0, np.nan, np.inf, -np.inf, 0.0, -3.0], np.float32)
    check(tmp_path, "IsNaN", {"x": x})
    for pos in (0, 1):
        for neg in (0, 1):
            check(tmp_path, "IsInf", {"x": x}, {"detect_positive": pos, "detect_negative": neg})


@pytest.mark.parametrize("op", ["Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual"])
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64])
def test_comparison(tmp_path: Path, op: str, dtype: type) -> None:
    a = _RNG.integers(-3, 3, size=(4, 5)).astype(dtype)
    b = _RNG.integers(-3, 3, size=(5,)).astype(dtype)  # broadcast
    check(tmp_path, op, {"a": a, "b": b})


@pytest.mark.parametrize("op", ["And", "Or", "Xor", "Equal"])
def test_logic(tmp_path: Path, op: str) -> None:
    a = _RNG.integers(0, 2, size=(3, 4)).astype(bool)
    b = _RNG.integers(0, 2, size=(1, 4)).astype(bool)
    check(tmp_path, op, {"a": a, "b": b})


def test_not_and_bitwise(tmp_path: Path) -> None:
    check(tmp_path, "Not", {"a": _RNG.integers(0, 2, size=(6,)).astype(bool)})
    a, b = _RNG.integers(0, 100, size=(6,)).astype(np.int32), _RNG.integers(0, 100, size=(6,)).astype(np.int32)
    for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor"):
        check(tmp_path, op, {"a": a, "b": b})
    check(tmp_path, "BitwiseNot", {"a": a})


@pytest.mark.parametrize("fmod,dtype", [(0, np.int64), (0, np.int32), (1, np.int32), (1, np.float32)])
def test_mod(tmp_path: Path, fmod: int, dtype: type) -> None:
    a = _RNG.integers(-20, 20, size=(12,)).astype(dtype)
    b = np.array([3, -3, 5, -7] * 3, dtype=dtype)
    if dtype == np.float32:
        a = a + np.float32(0.25)
    check(tmp_path, "Mod", {"a": a, "b": b}, {"fmod": fmod})


@pytest.mark.parametrize("op", ["Min", "Max", "Sum", "Mean"])
def test_variadic(tmp_path: Path, op: str) -> None:
    check(tmp_path, op, {"a": f32(3, 1), "b": f32(1, 4), "c": f32(4)})
    if op in ("Min", "Max"):
        check(tmp_path, op, {"a": i64(1, 5, -2), "b": i64(3, 0, 7)})


def test_where_expand_tile(tmp_path: Path) -> None:
    cond = _RNG.integers(0, 2, size=(3, 1)).astype(bool)
    check(tmp_path, "Where", {"c": cond, "a": f32(1, 4), "b": f32(3, 4)})
    check(tmp_path, "Where", {"c": cond, "a": i64(1, 2, 3, 4), "b": i64(5, 6, 7, 8)})
    check(tmp_path, "Expand", {"x": f32(3, 1)}, inits={"s": i64(2, 1, 4)})
    check(tmp_path, "Expand", {"x": f32(2, 3)}, inits={"s": i64(1, 1)})  # shape smaller than the input's
    check(tmp_path, "Tile", {"x": f32(2, 3)}, inits={"r": i64(3, 2)})


@pytest.mark.parametrize("start,limit,delta,dtype", [(0, 10, 3, np.int64), (5, -3, -2, np.int32),
                                                     (0.5, 4.0, 0.7, np.float32), (3, 3, 1, np.int64)])
def test_range(tmp_path: Path, start: float, limit: float, delta: float, dtype: type) -> None:
    check(tmp_path, "Range", {"s": np.array(start, dtype), "l": np.array(limit, dtype), "d": np.array(delta, dtype)})


def test_cast_castlike_integer_flow(tmp_path: Path) -> None:
    check(tmp_path, "Cast", {"x": _RNG.integers(-9, 9, size=(5,)).astype(np.int32)}, {"to": onnx.TensorProto.FLOAT})
    check(tmp_path, "Cast", {"x": f32(5)}, {"to": onnx.TensorProto.INT64})
    check(tmp_path, "CastLike", {"x": i64(1, 2, 3), "t": f32(1)})
    # an int32 graph input used as indices (a byte-level classifier's input)
    check(tmp_path, "Gather", {"x": f32(257, 4), "i": _RNG.integers(0, 257, size=(1, 16)).astype(np.int32)},
          order=["x", "i"])


# -------------------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("op", ["ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
                                "ReduceMax", "ReduceMin", "ReduceProd", "ReduceMean", "ReduceSum"])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes", [None, [1], [0, -1]])
def test_reduce(tmp_path: Path, op: str, keepdims: int, axes: list[int] | None) -> None:
    x = f32(2, 3, 4, low=0.1, high=2.0)
    check(tmp_path, op, {"x": x}, {"keepdims": keepdims}, inits={"axes": i64(*axes)} if axes else None)


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("keepdims,last,axis", [(1, 0, 0), (0, 0, 1), (1, 1, -1), (0, 1, 1)])
def test_arg(tmp_path: Path, op: str, keepdims: int, last: int, axis: int) -> None:
    x = _RNG.integers(0, 3, size=(4, 5)).astype(np.float32)  # many ties
    check(tmp_path, op, {"x": x}, {"keepdims": keepdims, "select_last_index": last, "axis": axis})


@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("axis", [0, -1])
def test_cumsum(tmp_path: Path, exclusive: int, reverse: int, axis: int) -> None:
    check(tmp_path, "CumSum", {"x": f32(3, 4)}, {"exclusive": exclusive, "reverse": reverse},
          inits={"a": np.array(axis, np.int64)})
    check(tmp_path, "CumSum", {"x": i64(1, 2, 3, 4)}, {"exclusive": exclusive, "reverse": reverse},
          inits={"a": np.array(0, np.int64)})


@pytest.mark.parametrize("largest", [0, 1])
@pytest.mark.parametrize("axis", [0, -1])
def test_topk(tmp_path: Path, largest: int, axis: int) -> None:
    x = _RNG.integers(0, 4, size=(5, 6)).astype(np.float32)  # ties: the lower index first
    check(tmp_path, "TopK", {"x": x}, {"largest": largest, "axis": axis, "sorted": 1}, inits={"k": i64(3)}, n_out=2)


def test_nonzero_size_shape(tmp_path: Path) -> None:
    check(tmp_path, "NonZero", {"x": _RNG.integers(0, 2, size=(3, 4)).astype(np.float32)})
    check(tmp_path, "Size", {"x": f32(3, 4)})
    for attrs in ({}, {"start": 1}, {"end": -1}, {"start": -2, "end": 3}, {"start": -9, "end": 9}):
        check(tmp_path, "Shape", {"x": f32(2, 3, 4, 5)}, attrs)


def test_hardmax_eyelike_trilu(tmp_path: Path) -> None:
    for axis in (0, 1, -1):
        check(tmp_path, "Hardmax", {"x": _RNG.integers(0, 3, size=(3, 4)).astype(np.float32)}, {"axis": axis})
    for k in (-2, 0, 1, 5):
        check(tmp_path, "EyeLike", {"x": f32(3, 4)}, {"k": k})
        for upper in (0, 1):
            check(tmp_path, "Trilu", {"x": f32(2, 3, 4)}, {"upper": upper}, inits={"k": np.array(k, np.int64)})
    check(tmp_path, "Trilu", {"x": f32(4, 4)}, {"upper": 0})


# ------------------------------------------------------------------------------ gather, scatter
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements(tmp_path: Path, axis: int) -> None:
    x = f32(3, 4)
    idx = _RNG.integers(-x.shape[axis], x.shape[axis], size=(3, 4)).astype(np.int64)
    check(tmp_path, "GatherElements", {"x": x, "i": idx}, {"axis": axis})
    check(tmp_path, "Gather", {"x": x, "i": idx[:2, :2]}, {"axis": axis})


@pytest.mark.parametrize("batch_dims,idx_shape", [(0, (2, 2)), (0, (3, 1)), (0, (2, 3)), (1, (2, 1)), (1, (2, 3, 2))])
def test_gather_nd(tmp_path: Path, batch_dims: int, idx_shape: tuple[int, ...]) -> None:
    x = f32(2, 3, 4)
    k = idx_shape[-1]
    bounds = x.shape[batch_dims : batch_dims + k]
    idx = np.stack([_RNG.integers(0, b, size=idx_shape[:-1]) for b in bounds], axis=-1).astype(np.int64)
    if batch_dims and len(idx_shape) == 2:
        idx = idx.reshape(idx_shape)
    check(tmp_path, "GatherND", {"x": x, "i": idx}, {"batch_dims": batch_dims})


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter(tmp_path: Path, reduction: str) -> None:
    x = f32(4, 3)
    idx = i64(2, 0) if reduction == "none" else i64(2, 0, 2)
    check(tmp_path, "ScatterND", {"x": x, "i": idx.reshape(-1, 1), "u": f32(len(idx), 3)}, {"reduction": reduction})
    ie = _RNG.integers(0, 4, size=(2, 3)).astype(np.int64) if reduction != "none" else np.array(
        [[0, 1, 2], [3, 2, 1]], np.int64)
    check(tmp_path, "ScatterElements", {"x": x, "i": ie, "u": f32(2, 3)}, {"axis": 0, "reduction": reduction})


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_one_hot(tmp_path: Path, axis: int) -> None:
    idx = i64(0, 2, -1, 5, 4).reshape(5)  # 5 is out of range: all "off"
    check(tmp_path, "OneHot", {"i": idx}, {"axis": axis},
          inits={"d": np.array(5, np.int64), "v": np.array([0.5, 2.0], np.float32)})


# ----------------------------------------------------------------------------------- rearranging
@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_space(tmp_path: Path, mode: str) -> None:
    check(tmp_path, "DepthToSpace", {"x": f32(1, 8, 2, 3)}, {"blocksize": 2, "mode": mode})
    check(tmp_path, "SpaceToDepth", {"x": f32(1, 2, 4, 6)}, {"blocksize": 2})


@pytest.mark.parametrize("form", ["opset11_attr", "opset13_input", "opset13_equal", "opset18_num_outputs"])
def test_split(tmp_path: Path, form: str) -> None:
    x = f32(2, 7)
    if form == "opset11_attr":
        check(tmp_path, "Split", {"x": x}, {"axis": 1, "split": [2, 5]}, n_out=2, opset=11)
    elif form == "opset13_input":
        check(tmp_path, "Split", {"x": x}, {"axis": 1}, inits={"s": i64(3, 1, 3)}, n_out=3, opset=13)
    elif form == "opset13_equal":
        check(tmp_path, "Split", {"x": f32(6, 2)}, {"axis": 0}, n_out=3, opset=13)
    else:
        check(tmp_path, "Split", {"x": x}, {"axis": 1, "num_outputs": 3}, n_out=3, opset=18)  # 3, 3, 1


@pytest.mark.parametrize("equation,shapes", [
    ("ij,jk->ik", [(3, 4), (4, 5)]), ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("bhid,bhjd->bhij", [(1, 2, 3, 4), (1, 2, 5, 4)]), ("ij->ji", [(3, 4)]), ("i,i->", [(5,), (5,)]),
    ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 2)]), ("ii->i", [(3, 3)]),
])
def test_einsum(tmp_path: Path, equation: str, shapes: list[tuple[int, ...]]) -> None:
    check(tmp_path, "Einsum", {f"x{i}": f32(*s) for i, s in enumerate(shapes)}, {"equation": equation})


# ------------------------------------------------------------------------------- normalisation
def test_normalisations(tmp_path: Path) -> None:
    x = f32(2, 6, 5)
    check(tmp_path, "InstanceNormalization", {"x": x}, {"epsilon": 1e-3}, inits={"s": f32(6), "b": f32(6)})
    for axis in (-1, 1):
        norm = x.shape[axis:] if axis > 0 else x.shape[-1:]
        check(tmp_path, "LayerNormalization", {"x": x}, {"axis": axis}, inits={"s": f32(*norm), "b": f32(*norm)})
        check(tmp_path, "LayerNormalization", {"x": x}, {"axis": axis}, inits={"s": f32(*norm)}, n_out=3)
    check(tmp_path, "GroupNormalization", {"x": x}, {"num_groups": 3}, inits={"s": f32(6), "b": f32(6)}, opset=21)
    for p in (1, 2):
        for axis in (1, -1):
            check(tmp_path, "LpNormalization", {"x": x}, {"p": p, "axis": axis})


def test_dropout_variants(tmp_path: Path) -> None:
    x = f32(3, 4)
    check(tmp_path, "Dropout", {"x": x}, {"ratio": 0.3}, opset=10)  # (onnxruntime's opset-10 mask is all false)
    check(tmp_path, "Dropout", {"x": x}, inits={"r": np.array(0.3, np.float32)}, n_out=2, opset=13)
    check(tmp_path, "Dropout", {"x": x}, opset=13)


# ---------------------------------------------------------------------------------------- Pad
@given(mode=st.sampled_from(["constant", "reflect", "edge", "wrap"]),
       pads=st.lists(st.integers(-1, 2), min_size=6, max_size=6), use_axes=st.booleans(), value=st.floats(-2, 2))
@_HYP
def test_pad(tmp_path: Path, mode: str, pads: list[int], use_axes: bool, value: float) -> None:
    x = f32(2, 3, 4)
    if mode != "constant":  # only constant padding may crop; reflect cannot reach past the far edge
        limit = [s - 1 if mode == "reflect" else 9 for s in x.shape] * 2
        pads = [min(max(p, 0), m) for p, m in zip(pads, limit)]
    inits: dict[str, np.ndarray] = {"p": np.array(pads, np.int64), "v": np.array(value, np.float32)}
    if use_axes:  # pad only the last two axes, the pads given for them
        inits["p"] = np.array(pads[:2] + pads[3:5], np.int64)
        inits["a"] = i64(1, -1)
    check(tmp_path, "Pad", {"x": x}, {"mode": mode}, inits=inits, opset=19)


def test_pad_opset11_attr(tmp_path: Path) -> None:
    check(tmp_path, "Pad", {"x": f32(1, 2, 3, 3)}, {"mode": "reflect", "pads": [0, 0, 1, 2, 0, 0, 2, 1]}, opset=10)


# -------------------------------------------------------------------------------------- Resize
_CTM = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "half_pixel_symmetric",
        "tf_crop_and_resize"]


@given(mode=st.sampled_from(["nearest", "linear", "cubic"]), ctm=st.sampled_from(_CTM),
       nearest=st.sampled_from(["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]),
       h=st.integers(1, 5), w=st.integers(1, 6), by_sizes=st.booleans(),
       sh=st.sampled_from([0.5, 0.6, 1.0, 1.5, 2.0, 3.0]), sw=st.sampled_from([0.4, 1.0, 1.7, 2.0, 3.0]),
       exclude_outside=st.integers(0, 1), cubic_a=st.sampled_from([-0.75, -0.5]))
@_HYP
def test_resize(tmp_path: Path, mode: str, ctm: str, nearest: str, h: int, w: int, by_sizes: bool, sh: float,
                sw: float, exclude_outside: int, cubic_a: float) -> None:
    x = f32(1, 2, h, w)
    attrs: dict[str, Any] = {"mode": mode, "coordinate_transformation_mode": ctm, "nearest_mode": nearest,
                             "exclude_outside": exclude_outside if mode == "cubic" else 0, "cubic_coeff_a": cubic_a, "extrapolation_value": 0.5}
    roi = np.array([0, 0, 0.1, 0.2, 1, 1, 0.8, 0.9], np.float32) if ctm == "tf_crop_and_resize" else np.zeros(0, np.float32)
    if by_sizes:
        sizes = i64(1, 2, max(1, round(h * sh)), max(1, round(w * sw)))
        inits = {"roi": roi, "scales": np.zeros(0, np.float32), "sizes": sizes}
    else:
        inits = {"roi": roi, "scales": np.array([1, 1, sh, sw], np.float32)}
    check(tmp_path, "Resize", {"x": x}, attrs, inits=inits, opset=19)


@pytest.mark.parametrize("policy", ["not_larger", "not_smaller"])
def test_resize_axes_and_aspect(tmp_path: Path, policy: str) -> None:
    x = f32(1, 2, 4, 6)
    check(tmp_path, "Resize", {"x": x}, {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": policy},
          inits={"roi": np.zeros(0, np.float32), "scales": np.zeros(0, np.float32), "sizes": i64(6, 7)},
          order=["x", "roi", "scales", "sizes"], opset=19)


def test_resize_opset11_upsample_style(tmp_path: Path) -> None:
    # The form a detector's FPN exports: nearest x2, asymmetric, floor; opset 11, scales as the third input.
    check(tmp_path, "Resize", {"x": f32(1, 3, 5, 4)},
          {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
          inits={"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)}, opset=11)


# -------------------------------------------------------------------------------- ConvTranspose
@given(spatial=st.sampled_from([1, 2]), k=st.integers(1, 3), stride=st.integers(1, 3), dil=st.integers(1, 2),
       group=st.sampled_from([1, 2]), pad=st.lists(st.integers(0, 2), min_size=4, max_size=4),
       out_pad=st.integers(0, 2), how=st.sampled_from(["pads", "SAME_UPPER", "SAME_LOWER", "VALID", "output_shape"]),
       bias=st.booleans())
@_HYP
def test_conv_transpose(tmp_path: Path, spatial: int, k: int, stride: int, dil: int, group: int, pad: list[int],
                        out_pad: int, how: str, bias: bool) -> None:
    c_in, c_out_per_group = 4, 3
    size = [4, 5][:spatial]
    x = f32(1, c_in, *size)
    wt = f32(c_in, c_out_per_group, *([k] * spatial))
    out_pad = min(out_pad, stride - 1)  # onnxruntime: output_padding < stride
    attrs: dict[str, Any] = {"strides": [stride] * spatial, "dilations": [dil] * spatial, "group": group}
    eff = (k - 1) * dil + 1
    if how == "pads":
        pads = [min(p, eff - 1) for p in pad[:spatial] + pad[2 : 2 + spatial]]
        attrs.update(pads=pads, output_padding=[out_pad] * spatial)
    elif how == "output_shape":
        full = [stride * (s - 1) + eff for s in size]
        attrs["output_shape"] = [max(1, f - p) for f, p in zip(full, pad[:spatial])]
    else:
        attrs["auto_pad"] = how
    inits = {"w": wt, **({"b": f32(c_out_per_group * group)} if bias else {})}
    check(tmp_path, "ConvTranspose", {"x": x}, attrs, inits=inits)
    # a constant weight: rewritten as zero insertion + Conv, which maps onto the crossbar
    model = cimc.load(tmp_path / "ConvTranspose.onnx")
    assert [n.op_type for n in model.graph if is_analog(n)] == ["Conv"]
    assert "ConvTranspose" not in {n.op_type for n in model.graph}
    # a weight that is an activation: stays a ConvTranspose on the digital unit
    check(tmp_path, "ConvTranspose", {"x": x, "w": wt}, attrs, inits={"b": inits["b"]} if bias else None,
          order=["x", "w", *(["b"] if bias else [])])


def test_conv_transpose_compiles_and_runs_on_the_crossbar(tmp_path: Path) -> None:
    """A detector's upsampling ConvTranspose (k 2, stride 2, BN after it) compiled for the ideal target:
    the chip path (DAC → crossbar MVMs → ADC, all ideal) equals onnxruntime."""
    x = f32(2, 8, 5, 6)
    path = tmp_path / "up.onnx"
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], strides=[2, 2], pads=[0, 1, 1, 0]),
             helper.make_node("BatchNormalization", ["t", "g", "beta", "m", "v"], ["y"])]
    graph = helper.make_graph(
        nodes, "up", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8, 5, 6])],
        [onnx.ValueInfoProto(name="y")],
        [numpy_helper.from_array(v, k) for k, v in {
            "w": f32(8, 4, 2, 2), "b": f32(4), "g": f32(4, low=0.5), "beta": f32(4), "m": f32(4),
            "v": f32(4, low=0.5, high=1.5)}.items()])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.save(model, path)
    want = run_ort(path, {"x": x})[0]
    compiled = cimc.compile(path, "ideal", batch=2)
    analog = [n for n in compiled.model.graph if is_analog(n)]
    assert [n.op_type for n in analog] == ["Conv"]  # BatchNormalization folded into it
    got = cimc.run(compiled, x, ideal=True)
    assert rel_l2(got, want) <= RTOL


# ------------------------------------------------------------------------------------- costing
def test_activation_products_are_costed_digitally(tmp_path: Path) -> None:
    """MatMul/Einsum of two activations run on the digital unit and count 2·M·N·K operations."""
    from cimc.ir import classify
    from cimc.passes.schedule import digital_ops

    for op, attrs in (("MatMul", {}), ("Einsum", {"equation": "bij,bjk->bik"})):
        path = tmp_path / f"{op}.onnx"
        onnx.save(_model(op, {"a": f32(2, 3, 4), "b": f32(2, 4, 5)}, attrs), path)
        model = cimc.load(path)
        node = next(iter(model.graph))
        assert [c.kind for c in classify(model)] == ["digital"]
        assert digital_ops(node) == 2 * 2 * 3 * 5 * 4


def test_bitshift_and_legacy_forms(tmp_path: Path) -> None:
    a = _RNG.integers(0, 60, size=(6,)).astype(np.uint8)
    b = np.array([0, 1, 2, 3, 1, 2], np.uint8)
    for direction in ("LEFT", "RIGHT"):
        check(tmp_path, "BitShift", {"a": a, "b": b}, {"direction": direction})
    # opset 9 Upsample and opset 11 reductions with an axes attribute, converted on import
    check(tmp_path, "Upsample", {"x": f32(1, 2, 3, 4)}, {"mode": "nearest"},
          inits={"s": np.array([1, 1, 2, 3], np.float32)}, opset=9)
    check(tmp_path, "ReduceSum", {"x": f32(2, 3, 4)}, {"axes": [1], "keepdims": 0}, opset=11)
    check(tmp_path, "ReduceMean", {"x": f32(2, 3, 4)}, {"axes": [0, 2]}, opset=13)


def test_identity_of_an_outer_value_in_if_branches_imports(tmp_path: Path) -> None:
    """Both branches of an If return Identity(outer value) (as exported voice-activity models do): import
    keeps those Identity nodes instead of crashing, and the If is then refused in one line."""
    from cimc.errors import UnsupportedOpError

    then_g = helper.make_graph([helper.make_node("Identity", ["h"], ["t_out"], name="t_id")], "then", [],
                               [helper.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, [1, 4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["e_out"], name="e_id")], "else", [],
                               [helper.make_tensor_value_info("e_out", onnx.TensorProto.FLOAT, [1, 4])])
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("Greater", ["sr", "k"], ["c"], name="cmp"),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="branch")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]),
                     helper.make_tensor_value_info("sr", onnx.TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(8000, np.int64), "k")])
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    model = cimc.load(path)
    with pytest.raises(UnsupportedOpError, match="If"):
        Executor(model)


def test_cli_inspect_and_compile_a_detector_neck(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    """The command line on an FPN-style neck (Conv → Resize ×2 → Concat → ConvTranspose): inspect lists the
    Resize as digital and the ConvTranspose (now a Conv) as analog; compile onto ideal succeeds."""
    import json

    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Resize", ["c", "", "sc"], ["r"], mode="nearest", name="up"),
             helper.make_node("Resize", ["x", "", "sc"], ["rx"], mode="linear", name="upx"),
             helper.make_node("Concat", ["r", "rx"], ["cat"], axis=1, name="cat"),
             helper.make_node("ConvTranspose", ["cat", "w2"], ["y"], strides=[2, 2], name="deconv")]
    graph = helper.make_graph(
        nodes, "neck", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 6, 6])],
        [onnx.ValueInfoProto(name="y")],
        [numpy_helper.from_array(f32(4, 3, 3, 3), "w1"), numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc"),
         numpy_helper.from_array(f32(7, 2, 2, 2), "w2")])
    path = tmp_path / "neck.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])),
              path)
    res = run_cli("inspect", path, "--json")
    assert res.code == 0, res.err
    kinds = {(n["op_type"], n["kind"]) for n in json.loads(res.out)["nodes"]}
    assert ("Resize", "digital") in kinds and ("Conv", "analog") in kinds
    assert not any(k == "unsupported" for _, k in kinds) and ("ConvTranspose", "digital") not in kinds
    res = run_cli("compile", path, "--target", "ideal", "-o", tmp_path / "build")
    assert res.code == 0, res.err
    got = cimc.run(tmp_path / "build", f32(2, 3, 6, 6, low=0, high=1), ideal=True)
    assert got.shape == (2, 2, 24, 24)
