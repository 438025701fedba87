"""Property-based tests: layer geometry × crossbar geometry × target × code path, enumerated by hypothesis.

Every drawn model (one analog layer of a drawn kind and size, then a small Gemm head) goes through every path
a user can take on it: compile (with calibration), ``run`` on an ideal target (= onnxruntime), ``simulate``
with several chip instances and both drift-compensation granularities, one fine-tuning step of every method,
and ``export`` + ``verify``. The arrays are tiny, so layers split by rows, by columns, or both, and every
group of a grouped convolution lands in tiles of its own.

CI runs the bounded ``ci`` profile (12 examples); ``HYPOTHESIS_PROFILE=long python -m pytest
tests/test_properties.py`` runs 300 random ones by hand (``CIMC_PROPERTY_EXAMPLES=N`` for another count).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import cimc
from cimc.data import Dataset
from cimc.export import export_mapping, verify_bundle
from cimc.passes.finetune import METHODS, finetune
from cimc.runtime.simulator import simulate as run_simulation
from cimc.targets import load_target
from tests.models import rel_l2, run_ort

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=int(os.environ.get("CIMC_PROPERTY_EXAMPLES", "300")), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

CLASSES = 3
KINDS = ("gemm", "matmul_right", "matmul_left", "conv1d", "conv2d", "grouped", "depthwise")


@dataclass(frozen=True)
class Geometry:
    """A drawn analog layer and crossbar: ``k``/``n`` are the layer's matrix rows/columns per group."""

    kind: str
    rows: int  # crossbar rows
    weight_cols: int  # crossbar columns in weights (device columns = 2x)
    k_rel: str  # below / equal / above the array's rows
    n_rel: str
    groups: int
    seed: int


def _size(rel: str, limit: int, unit: int = 1) -> int:
    """A size below, equal to or above ``limit`` (a multiple of ``unit`` when that is possible)."""
    if rel == "below":
        return max(unit, (limit // 2) // unit * unit)
    if rel == "equal":
        return limit
    return limit + max(unit, limit // 2)


@st.composite
def geometries(draw: st.DrawFn) -> Geometry:
    kind = draw(st.sampled_from(KINDS))
    return Geometry(
        kind=kind,
        rows=draw(st.sampled_from([8, 12])),
        weight_cols=draw(st.sampled_from([4, 6])),
        k_rel=draw(st.sampled_from(["below", "equal", "above"])),
        n_rel=draw(st.sampled_from(["below", "equal", "above"])),
        groups=draw(st.sampled_from([2, 3])) if kind == "grouped" else 1,
        seed=draw(st.integers(0, 2**16)),
    )


def _model(g: Geometry, path: Path) -> tuple[Path, tuple[int, ...]]:
    """The drawn layer, ReLU, flatten, a Gemm head to CLASSES logits. Returns (path, input shape per sample)."""
    rng = np.random.default_rng(g.seed)
    n = _size(g.n_rel, g.weight_cols)
    inits = []
    if g.kind in ("gemm", "matmul_right", "matmul_left"):
        k = _size(g.k_rel, g.rows)
        if g.kind == "gemm":
            w = rng.normal(0, 1 / np.sqrt(k), (n, k)).astype(np.float32)
            inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.normal(0, 0.1, n).astype(np.float32), "b")]
            layer = helper.make_node("Gemm", ["x", "w", "b"], ["a"], transB=1)
            in_shape: tuple[int, ...] = (k,)
        elif g.kind == "matmul_right":  # x [B, 2, K] @ W [K, N]: two MVMs per sample
            inits.append(numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(k), (k, n)).astype(np.float32), "w"))
            layer = helper.make_node("MatMul", ["x", "w"], ["a"])
            in_shape = (2, k)
        else:  # W [N, K] @ x [B, K, 2]: each column of x is an MVM
            inits.append(numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(k), (n, k)).astype(np.float32), "w"))
            layer = helper.make_node("MatMul", ["w", "x"], ["a"])
            in_shape = (k, 2)
    else:
        kernel = 3
        if g.kind == "depthwise":
            channels = _size(g.n_rel, g.weight_cols)
            groups, c_in, c_out = channels, channels, channels  # K = 9 rows per group
        else:
            groups = g.groups
            per_group_in = max(1, _size(g.k_rel, g.rows) // (kernel * (kernel if g.kind != "conv1d" else 1)))
            c_in, c_out = per_group_in * groups, n * groups
        spatial = [5] if g.kind == "conv1d" else [5, 4]
        ksize = [kernel] * len(spatial)
        w = rng.normal(0, 0.5, (c_out, c_in // groups, *ksize)).astype(np.float32)
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.normal(0, 0.1, c_out).astype(np.float32), "b")]
        layer = helper.make_node("Conv", ["x", "w", "b"], ["a"], group=groups, pads=[1] * (2 * len(spatial)),
                                 kernel_shape=ksize)
        in_shape = (c_in, *spatial)
    probe = np.zeros((1, *in_shape), np.float32)
    sess_graph = helper.make_graph([layer], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *in_shape])],
                                   [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)], initializer=inits)
    feat = int(np.prod(run_ort_model(helper.make_model(sess_graph, opset_imports=[helper.make_opsetid("", 17)]),
                                     {"x": probe})[0].shape[1:]))
    head = rng.normal(0, 1 / np.sqrt(feat), (feat, CLASSES)).astype(np.float32)
    inits += [numpy_helper.from_array(head, "head"), numpy_helper.from_array(np.zeros(CLASSES, np.float32), "head_b"),
              numpy_helper.from_array(np.array([1, feat], np.int64), "flat")]
    nodes = [layer, helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Reshape", ["r", "flat"], ["f"]),
             helper.make_node("Gemm", ["f", "head", "head_b"], ["logits"])]
    graph = helper.make_graph(nodes, f"prop_{g.kind}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *in_shape])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path, in_shape


def run_ort_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _target(base: str, g: Geometry, gdc: str = "layer", weight_scale: str = "layer"):
    overrides = {"array.rows": g.rows, "array.cols": 2 * g.weight_cols, "array.count": None}
    if base != "ideal":
        overrides.update({"device.gdc": gdc, "device.weight_scale": weight_scale, "converters.adc_count": g.weight_cols,
                          "sram.size_bytes": None})
    t = load_target(base).with_overrides(**overrides)
    return t


def _data(in_shape: tuple[int, ...], samples: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (samples, *in_shape)).astype(np.float32)
    return Dataset(x=x, y=rng.integers(0, CLASSES, samples).astype(np.int64), name="drawn")


@pytest.mark.slow
@settings(settings.get_profile(PROFILE))
@given(g=geometries(), base=st.sampled_from(["aon-cim", "hermes"]), gdc=st.sampled_from(["layer", "column"]))
def test_every_path_on_every_geometry(tmp_path_factory: pytest.TempPathFactory, g: Geometry, base: str, gdc: str) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    path, in_shape = _model(g, tmp / "m.onnx")
    data = _data(in_shape, 6, g.seed)

    # compile onto an ideal crossbar of the same tiny geometry: the splits must not change the numbers
    ideal = cimc.compile(path, _target("ideal", g))
    x1 = data.x[:1]
    assert rel_l2(cimc.run(ideal, x1), run_ort(path, {"x": x1})[0]) < 1e-5

    # compile with calibration onto the drawn PCM target; simulate several chips with each GDC mode
    weight_scale = "column" if gdc == "column" else "layer"
    target = _target(base, g, gdc=gdc, weight_scale=weight_scale)
    compiled = cimc.compile(path, target, calibration=data, out_dir=tmp / "build")
    import json
    import math

    layer = next(n for n in compiled.model.graph if "cimc.placement" in n.metadata_props)
    m = json.loads(layer.metadata_props["cimc.matrix"])
    tiles = json.loads(layer.metadata_props["cimc.placement"])
    expected = m["groups"] * math.ceil(m["rows"] / g.rows) * math.ceil(m["cols"] / g.weight_cols)
    assert len(tiles) == expected, (m, len(tiles))  # split by rows and columns exactly as the geometry demands
    covered = sum(t["rows"] * t["cols"] for t in tiles)
    assert covered == m["rows"] * m["cols"] * m["groups"]
    result = run_simulation(compiled, data.x, data.y, times_s=(1.0, 86400.0), instances=3, seed=g.seed)
    for series in result.data["series"]:
        for point in series["points"]:
            assert len(point["per_instance"]) == 3 and 0.0 <= point["mean"] <= 1.0
    # the same numbers with two instances side by side on two threads, and from a shard holding chip 2 alone
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = run_simulation(compiled, data.x, data.y, times_s=(1.0, 86400.0), instances=3, seed=g.seed)
    finally:
        torch.set_num_threads(before)
    shard = run_simulation(compiled, data.x, data.y, times_s=(1.0, 86400.0), instances=3, seed=g.seed,
                           instance_range=(2, 3))
    for s_one, s_two, s_shard in zip(result.data["series"], two.data["series"], shard.data["series"]):
        for p_one, p_two, p_shard in zip(s_one["points"], s_two["points"], s_shard["points"]):
            assert p_one["per_instance"] == p_two["per_instance"]
            assert p_shard["per_instance"] == p_one["per_instance"][2:]
    y_chip = cimc.run(compiled, data.x, time="24h", instances=3, instance=2)
    assert y_chip.shape == (len(data.x), CLASSES) and np.isfinite(y_chip).all()

    # export + verify the mapping bundle
    bundle = export_mapping(tmp / "build", tmp / "bundle")
    report = verify_bundle(bundle)
    assert report.ok, report.problems

    # one fine-tuning step of every method (noise, PCM, QAT, adversarial, ...)
    for method in METHODS:
        if method == "none":
            continue
        tuned, history = finetune(path, target, data, data, method=method, epochs=1, seed=g.seed, batch_size=4)
        assert history["history"], method
        assert all(np.isfinite(np.asarray(v.const_value.numpy(), dtype=np.float64)).all()
                   for v in tuned.graph.initializers.values() if v.const_value is not None and v.dtype is not None
                   and v.dtype.is_floating_point())
