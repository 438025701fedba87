"""Weight replication (``--replicate LAYER=R``) and the cost of a whole inference (system vs analog TOPS/W).

One small CNN with a 9-row first convolution (the few-row layer replication is for), whose output is also a
graph output so its noise can be measured directly: compiled on ``aon-cim`` with calibration, once plain and
once with the first convolution replicated 4 times.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import cimc
from cimc.compiler import compile_model
from cimc.errors import FitError, InputError
from cimc.export import export_mapping, verify_bundle

R = 4
SAMPLES = 16
INSTANCES = 32


def _cnn(path: Path) -> Path:
    """x [N,1,12,12] -> conv1 (9 rows x 16) -> h; ReLU -> conv2 (144 x 8) -> GAP -> fc (8 x 4) -> y."""
    rng = np.random.default_rng(0)
    init = {
        "w1": (rng.standard_normal((16, 1, 3, 3)) * 0.5).astype(np.float32),
        "b1": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((8, 16, 3, 3)) * 0.2).astype(np.float32),
        "wf": (rng.standard_normal((4, 8)) * 0.5).astype(np.float32),
        "bf": np.zeros(4, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 16, 12, 12])],
        [numpy_helper.from_array(v, k) for k, v in init.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("replicate")
    model = _cnn(tmp / "cnn.onnx")
    x = np.random.default_rng(1).random((2 * SAMPLES, 1, 12, 12)).astype(np.float32)
    np.savez(tmp / "calib.npz", x=x[:SAMPLES])
    plain = compile_model(model, "aon-cim", calibration=tmp / "calib.npz", out_dir=tmp / "plain")
    rep = compile_model(model, "aon-cim", calibration=tmp / "calib.npz", replicate={"conv1": R}, out_dir=tmp / "rep")
    return {"tmp": tmp, "model": model, "x": x[SAMPLES:], "plain": plain, "rep": rep}


def test_rewrite_is_exact_on_ideal_devices(setup: dict) -> None:
    """r copies plus their mean compute what the layer computed: every output equals onnxruntime's."""
    compiled = compile_model(setup["model"], "ideal", replicate={"conv1": 3})
    names = [n.name for n in compiled.model.graph]
    assert [n for n in names if n.startswith("conv1/")] == [
        "conv1/rep0", "conv1/rep1", "conv1/rep2", "conv1/rep_sum1", "conv1/rep_sum2", "conv1/rep_mean"]
    weights = {n.inputs[1].name for n in compiled.model.graph if n.name.startswith("conv1/rep") and n.op_type == "Conv"}
    assert len(weights) == 3  # three independently programmed device sets
    ref = ort.InferenceSession(str(setup["model"])).run(None, {"x": setup["x"]})
    out = cimc.run(compiled, setup["x"], ideal=True, all_outputs=True)
    for name, expected in zip(("y", "h"), ref):
        assert np.abs(out[name] - expected).max() <= 1e-5 * np.abs(expected).max()


def _noise(compiled, x: np.ndarray, ref: np.ndarray, time: str) -> float:
    """Std over chip instances of the layer output's error, averaged over elements, relative to the signal's std."""
    ys = np.stack([cimc.run(compiled, x, time=time, instance=k, instances=INSTANCES, all_outputs=True)["h"]
                   for k in range(INSTANCES)])
    return float((ys - ref).std(axis=0).mean() / ref.std())


def test_replication_cuts_the_layer_noise_by_sqrt_r(setup: dict) -> None:
    """Programming, drift, read and output noise are drawn per device set and per conversion, so the mean of
    4 copies has half the noise std (√4); the converters' rounding, common to the copies, keeps it a little
    above half (1.96x-2.0x measured over seeds and times)."""
    ref = ort.InferenceSession(str(setup["model"])).run(["h"], {"x": setup["x"]})[0]
    for time in ("24h", "1y"):
        plain = _noise(setup["plain"], setup["x"], ref, time)
        rep = _noise(setup["rep"], setup["x"], ref, time)
        assert plain > 0.05  # the layer is noisy enough for the test to mean something
        assert 1.9 <= plain / rep <= 2.2, (time, plain, rep)


def test_cost_counts_every_replica(setup: dict) -> None:
    plain, rep = setup["plain"].cost, setup["rep"].cost
    by_name = {c.name: c for c in plain.layers}
    rep_by_name = {c.name: c for c in rep.layers}
    layer = by_name["conv1"]
    for i in range(R):  # each copy: the layer's MVMs, conversions and energy
        c = rep_by_name[f"conv1/rep{i}"]
        assert (c.mvms, c.macs, c.cycles) == (layer.mvms, layer.macs, layer.cycles)
        assert c.energy_j["adc"] == pytest.approx(layer.energy_j["adc"], rel=1e-12)
    adds = [rep_by_name[f"conv1/rep_sum{i}"] for i in range(1, R)] + [rep_by_name["conv1/rep_mean"]]
    assert all(a.kind == "digital" and a.cycles > 0 for a in adds)
    extra_s = (R - 1) * layer.latency_s + sum(a.latency_s for a in adds)
    assert rep.latency_s == pytest.approx(plain.latency_s + extra_s, rel=1e-9)  # layer-serial: they add up
    dynamic = {k: v for k, v in layer.energy_j.items() if k != "static"}
    extra_j = (R - 1) * sum(dynamic.values()) + sum(a.energy_j["digital"] + a.energy_j["sram"] for a in adds)
    static_j = rep.energy_j["static"] - plain.energy_j["static"]  # static power over the longer inference
    assert static_j == pytest.approx(setup["rep"].target.static_power_w * extra_s, rel=1e-9)
    assert rep.total_energy_j == pytest.approx(plain.total_energy_j + extra_j + static_j, rel=1e-9)
    # Golden numbers (aon-cim, 8-bit, target activity defaults): a diff here is a cost-model change to read.
    assert layer.mvms == 144 and layer.macs == 144 * 9 * 16
    assert plain.total_energy_j == pytest.approx(GOLDEN["plain_energy_j"], rel=1e-6)
    assert rep.total_energy_j == pytest.approx(GOLDEN["rep_energy_j"], rel=1e-6)
    assert plain.latency_s == pytest.approx(GOLDEN["plain_latency_s"], rel=1e-6)
    assert rep.latency_s == pytest.approx(GOLDEN["rep_latency_s"], rel=1e-6)
    # Analog ops count every copy; the model's ops (system efficiency) count the layer once.
    assert rep.macs == plain.macs + (R - 1) * layer.macs
    assert rep.system_ops == plain.system_ops == plain.ops
    assert rep.system_tops_per_w < plain.system_tops_per_w


GOLDEN = {"plain_energy_j": 0.499500e-6, "rep_energy_j": 1.400714e-6, "plain_latency_s": 163.828e-6,
          "rep_latency_s": 418.132e-6}


def test_placement_report_and_table_show_the_replicas(setup: dict) -> None:
    rep = setup["rep"]
    report = json.loads((setup["tmp"] / "rep" / "report.json").read_text())
    assert report["replication"] == {"conv1": R}
    assert report["crossbar_layers"] == 2 + R
    assert report["weights_placed"] == json.loads((setup["tmp"] / "plain" / "report.json").read_text())[
        "weights_placed"] + (R - 1) * 9 * 16
    tiles = [json.loads(n.metadata_props["cimc.placement"])[0] for n in rep.analog_nodes() if "rep" in n.name]
    windows = {(t["array"], t["row0"], t["col0"]) for t in tiles}
    assert len(windows) == R  # distinct devices
    table = rep.summary_table()
    assert "conv1/rep3" in table and "replicated (copies averaged on the digital unit): conv1 x4" in table
    assert "system efficiency" in table and "analog" in table


def test_export_lists_the_replicas_and_verifies(setup: dict) -> None:
    bundle = export_mapping(setup["tmp"] / "rep", setup["tmp"] / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["replication"] == {"conv1": R}
    replicas = [layer["replica"] for layer in manifest["layers"] if "replica" in layer]
    assert replicas == [{"of": "conv1", "index": i, "count": R} for i in range(R)]
    assert len({layer["weight"]["initializer"] for layer in manifest["layers"] if "replica" in layer}) == R
    report = verify_bundle(bundle)
    assert report.ok, report.problems


def test_refusals_name_the_problem(setup: dict) -> None:
    with pytest.raises(InputError, match="did you mean conv1"):
        compile_model(setup["model"], "ideal", replicate={"Conv1": 2})
    with pytest.raises(InputError, match="not an analog layer"):
        compile_model(setup["model"], "ideal", replicate={"relu": 2})
    with pytest.raises(InputError, match="integer from 1 to 64"):
        compile_model(setup["model"], "ideal", replicate={"conv1": 0})
    with pytest.raises(InputError, match="not an analog layer"):  # kept digital and replicated: say which
        compile_model(setup["model"], "ideal", replicate={"conv1": 2}, digital=["conv1"])
    # conv2 is 144 x 8 weights; 64 copies need 73,728 of the 1 array of 16 x 256 weights: refused with the numbers
    small = {"base": "aon-cim", "name": "small", "array": {"rows": 160, "cols": 64}}
    path = setup["tmp"] / "small.yaml"
    path.write_text(json.dumps(small))
    compile_model(setup["model"], path)  # fits without replicas
    with pytest.raises(FitError, match=r"--replicate conv2=8 does not fit: the replicas add conv2 \+8,064 weights"):
        compile_model(setup["model"], path, replicate={"conv2": 8})


def test_cli(setup: dict, run_cli) -> None:
    tmp = setup["tmp"]
    res = run_cli("compile", setup["model"], "--target", "ideal", "--replicate", "conv1=2", "-o", tmp / "cli")
    assert res.code == 0, res.err
    assert "conv1/rep1" in res.out and "conv1 x2" in res.out
    bad = run_cli("compile", setup["model"], "--target", "ideal", "--replicate", "conv1", "-o", tmp / "cli2")
    assert bad.code == 2 and "LAYER=R" in bad.err and "Traceback" not in bad.err
    typo = run_cli("compile", setup["model"], "--target", "ideal", "--replicate", "Conv1=2", "-o", tmp / "cli3")
    assert typo.code == 2 and "did you mean conv1" in typo.err


def test_system_efficiency_counts_layers_kept_digital(setup: dict) -> None:
    """Keeping a layer digital removes its MACs from the analog ops but not from the model's ops."""
    plain = setup["plain"].cost
    digital = compile_model(setup["model"], "aon-cim", digital=["conv1"]).cost
    assert digital.ops == plain.ops - 2 * 144 * 9 * 16
    assert digital.system_ops == plain.system_ops
    assert digital.system_tops_per_w == pytest.approx(digital.system_ops / digital.total_energy_j / 1e12)
    assert digital.system_tops_per_w < digital.tops_per_w * plain.system_ops / digital.ops + 1e-9


def test_converters_off_never_lower_the_efficiency(setup: dict) -> None:
    """Issue 22: ADC off (adc_bits 0) is free, so the same model's TOPS/W can only rise."""
    on = compile_model(setup["model"], "aon-cim").cost
    off = compile_model(setup["model"], "aon-cim", adc_bits=0).cost
    assert off.energy_j["adc"] == 0 and off.total_energy_j < on.total_energy_j
    assert off.tops_per_w > on.tops_per_w and off.system_tops_per_w > on.system_tops_per_w


def test_simulate_states_the_whole_inference_and_why_it_differs(setup: dict) -> None:
    """Issue 22: on `ideal` the cost counted on data differs from compile's estimate; simulate says why."""
    np.savez(setup["tmp"] / "test.npz", x=setup["x"])
    compiled = compile_model(setup["model"], "ideal")
    result = cimc.simulate(compiled, setup["tmp"] / "test.npz", drift="1s", instances=1)
    cost = result.data["cost"]
    for kind in ("static", "measured"):
        assert {"energy_per_inference_j", "latency_s", "system_tops_per_w", "tops_per_w"} <= set(cost[kind])
    assert "compile assumed the target's input activity" in cost["why_measured_differs"]
    table = result.table()
    assert "per inference:" in table and "system" in table and "why they differ:" in table
