"""Quantisation, the QDQ digital twin, and the drift simulator (program → drift → read)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

import cimc
from cimc import builtin
from cimc.compiler import compile_model
from cimc.data import Dataset, load_dataset
from cimc.errors import DataError
from cimc.passes.quantize import build_qdq_twin
from cimc.runtime.analog import fake_quant
from cimc.runtime.executor import Executor
from cimc.runtime.simulator import Chip, parse_duration
from tests.models import export_onnx, rel_l2


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset(builtin.mnist_test())


@pytest.fixture(scope="module")
def mnist_compiled(mnist: Dataset) -> cimc.artifact.CompiledModel:
    calib = Dataset(mnist.x[-256:], mnist.y[-256:], "calib")
    return compile_model(builtin.mnist_model(), "aon-cim", calibration=calib)


def _ort_rows(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime on a batch-1 model, one sample at a time."""
    return np.concatenate([_run_first(path, x[i : i + 1]) for i in range(len(x))])


def _run_first(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _assert_agree_up_to_ties(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = np.abs(expected).max()
    per_sample = np.abs(actual - expected).reshape(len(expected), -1).max(axis=1)
    assert (per_sample <= 1e-3 * scale).mean() >= 0.75, per_sample / scale
    assert np.median(np.abs(actual - expected)) <= 1e-5 * scale
    if expected.ndim == 2 and expected.shape[1] > 1:
        assert (actual.argmax(1) == expected.argmax(1)).mean() >= 0.9


def test_fake_quant_levels() -> None:
    x = torch.linspace(-2, 2, 101)
    q = fake_quant(x, 1.0, 4, signed=True)
    assert q.min() == -1 and q.max() == 1
    assert len(torch.unique(q)) == 15  # 2 * (2^3 - 1) + 1
    u = fake_quant(x, 1.0, 4, signed=False)
    assert u.min() == 0 and len(torch.unique(u)) == 16
    assert torch.equal(fake_quant(x, 1.0, None, signed=True), x)


def test_ideal_target_matches_onnxruntime(mnist: Dataset, tmp_path: Path) -> None:
    compiled = compile_model(builtin.mnist_model(), "ideal")
    x = mnist.x[:16]
    ref = _ort_rows(builtin.mnist_model(), x)
    out = cimc.run(compiled, x, time="24h", instances=3, instance=2)
    assert rel_l2(out, ref) <= 1e-5


def test_twin_matches_simulator_and_onnxruntime(mnist_compiled, mnist: Dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    twin = build_qdq_twin(mnist_compiled.model)
    ops = {n.op_type for n in twin.graph}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    path = tmp_path / "twin.onnx"
    ir.save(twin, path)
    x = mnist.x[:16]
    ort_out = _ort_rows(path, x)
    with torch.no_grad():
        ex_out = Executor(twin).eval()(torch.from_numpy(x))[0].numpy()
    quant_out = cimc.run(mnist_compiled, x, ideal=True)
    # Same semantics; float accumulation order differs, so a value on a rounding boundary can land one level
    # apart and carry that into later layers. Allow that for a few samples, never for the predictions.
    _assert_agree_up_to_ties(ex_out, ort_out)
    _assert_agree_up_to_ties(quant_out, ort_out)
    float_out = _ort_rows(builtin.mnist_model(), x)
    assert rel_l2(quant_out, float_out) > 1e-4  # the converters really quantise
    _assert_checker_clean(path)


def _assert_checker_clean(path: Path) -> None:
    """Tools accept the twin: full ONNX check (typed outputs), no unused initializers, batch stated."""
    import onnx

    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in proto.graph.output)
    used = {i for n in proto.graph.node for i in n.input}
    assert [t.name for t in proto.graph.initializer if t.name not in used] == []
    assert "batch dimension fixed at 1" in proto.doc_string


def test_row_split_tiles_in_twin(tmp_path: Path) -> None:
    """A layer taller than a hermes core (256 rows) is split; each tile gets its own ADC."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(600, 40), torch.nn.ReLU(), torch.nn.Linear(40, 10)).eval()
    path = export_onnx(net, torch.randn(1, 600), tmp_path / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((64, 600)).astype(np.float32)
    compiled = compile_model(path, "hermes", calibration=Dataset(x, np.zeros(64, np.int64), "rand"))
    fc = compiled.analog_nodes()[0]
    tiles = json.loads(fc.metadata_props["cimc.placement"])
    assert len(tiles) == 3 and len(json.loads(fc.metadata_props["cimc.quant"])["y_max"]) == 3
    twin_path = tmp_path / "twin.onnx"
    ir.save(build_qdq_twin(compiled.model), twin_path)
    ort_out = _ort_rows(twin_path, x[:8])
    sim_out = cimc.run(compiled, x[:8], ideal=True)
    _assert_agree_up_to_ties(sim_out, ort_out)
    _assert_checker_clean(twin_path)  # row-split tiles replace the layer's weight: it must not linger


def test_program_once_then_drift_same_devices(mnist_compiled) -> None:  # type: ignore[no-untyped-def]
    chip = Chip(mnist_compiled, instances=2, seed=3)
    name = next(iter(chip.ideal))
    early = chip.at(1.0, gdc=False).weights[name]
    late = chip.at(86400.0, gdc=False).weights[name]
    # the same programmed devices: drift shrinks magnitudes, it does not redraw them
    ratio = late.abs().sum() / early.abs().sum()
    assert 0.55 < float(ratio) < 0.8
    assert float(torch.corrcoef(torch.stack([early.flatten(), late.flatten()]))[0, 1]) > 0.9
    # instances differ from each other
    assert not torch.equal(early[0], early[1])


def test_simulation_deterministic_and_gdc_helps(mnist_compiled, mnist: Dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(drift="1s,24h", instances=3, samples=200, seed=5)
    a = cimc.simulate(mnist_compiled, mnist, out_dir=tmp_path / "a", **kwargs)
    b = cimc.simulate(mnist_compiled, mnist, **kwargs)
    assert a.data["series"] == b.data["series"]  # same seed, same numbers
    c = cimc.simulate(mnist_compiled, mnist, **{**kwargs, "seed": 6})
    assert c.data["series"] != a.data["series"]
    gdc, none = a.data["series"]
    assert gdc["label"].startswith("GDC") and none["label"] == "no compensation" and none["gdc"] == "none"
    drop_gdc = a.data["float_accuracy"] - gdc["points"][1]["mean"]
    drop_none = a.data["float_accuracy"] - none["points"][1]["mean"]
    assert drop_gdc < drop_none
    assert a.data["float_accuracy"] > 0.9 and len(gdc["points"][0]["per_instance"]) == 3
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["series"][0]["points"][1]["label"] == "1d"
    assert (tmp_path / "a" / "drift.png").stat().st_size > 10_000
    measured, static = results["cost"]["measured"], results["cost"]["static"]
    assert measured["tops_per_w"] > 0 and measured["energy_per_inference_j"] != static["energy_per_inference_j"]


def test_data_errors(mnist_compiled, mnist: Dataset) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="shape"):
        cimc.simulate(mnist_compiled, Dataset(np.zeros((4, 3, 8, 8), np.float32), np.zeros(4, np.int64), "bad"))
    with pytest.raises(DataError, match="needs integer labels"):
        cimc.simulate(mnist_compiled, Dataset(mnist.x[:4], None, "nolabels"), metric="accuracy")
    with pytest.raises(DataError, match="the model has 10 classes"):
        cimc.simulate(mnist_compiled, Dataset(mnist.x[:4], np.array([0, 1, 2, 10]), "bad labels"), instances=1)


def test_parse_duration() -> None:
    assert parse_duration("24h") == 86400 and parse_duration("1y") == 31557600 and parse_duration("15min") == 900
    assert parse_duration("1M") == parse_duration("1mo") == 31557600 / 12 and parse_duration("1m") == 60
    with pytest.raises(cimc.CimcError, match="cannot read time"):
        parse_duration("soon")
    for bad in ("0", "-1h", "0s"):
        with pytest.raises(cimc.CimcError, match="positive time"):
            parse_duration(bad)


def test_cli_simulate_and_run(mnist_compiled, mnist: Dataset, tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    mnist_compiled.save(tmp_path / "build")
    res = run_cli("simulate", tmp_path / "build", "--data", builtin.mnist_test(), "--drift", "1s,1h", "--instances", "2",
                  "--samples", "64")
    assert res.code == 0, res.err
    assert "GDC" in res.out and "TOPS/W" in res.out and "target aon-cim" in res.out
    assert (tmp_path / "build" / "simulation" / "results.json").is_file()
    np.save(tmp_path / "x.npy", mnist.x[:5])
    res = run_cli("run", tmp_path / "build", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy", "--time", "1h")
    assert res.code == 0 and np.load(tmp_path / "y.npy").shape == (5, 10)
    res = run_cli("simulate", tmp_path / "nowhere", "--data", builtin.mnist_test())
    assert res.code == 2 and "no such folder" in res.err  # issue 22: it does not exist


def test_drift_window_lowers_adc_ranges_only_where_devices_drift(mnist: Dataset) -> None:
    """The ADC gain serves the drifted chip: smaller full scales on PCM, unchanged on drift-free devices."""
    calib = Dataset(mnist.x[-64:], mnist.y[-64:], "calib")

    def ranges(target: str, window: str) -> dict[str, tuple[float, list[object]]]:
        c = compile_model(builtin.mnist_model(), target, calibration=calib, dac_bits=4, adc_bits=4,
                          pipeline=f"canonicalize,map,quantize{{drift_window={window}}},schedule")
        return {n.name: (json.loads(n.metadata_props["cimc.quant"])["x_max"],
                         json.loads(n.metadata_props["cimc.quant"])["y_max"])
                for n in c.model.graph if "cimc.quant" in n.metadata_props}

    fresh, lifetime = ranges("aon-cim", "none"), ranges("aon-cim", "1s..1y")
    assert fresh.keys() == lifetime.keys() and fresh
    first = next(iter(fresh))
    assert fresh[first][0] == lifetime[first][0]  # the first DAC sees the same input (later ones: other ADCs)
    for name in fresh:
        assert all(b < a for a, b in zip(fresh[name][1], lifetime[name][1])), name  # type: ignore[operator]
    assert ranges("ideal", "none") == ranges("ideal", "1s..1y")


@pytest.mark.parametrize("text", ["soon", "24h..1s", "0s..1h"])
def test_drift_window_errors(text: str) -> None:
    from cimc.passes.quantize import parse_window

    with pytest.raises(DataError, match="drift_window"):
        parse_window(text)
    assert parse_window("none") is None and parse_window("1s..1y") == (1.0, 31557600.0)


def test_shared_weight_programmed_once_every_use_reads_the_same_devices(tmp_path: Path) -> None:
    """An unrolled recurrent layer (5 Gemm uses of one weight): one block, programmed once per instance; every
    use computes with that instance's same noisy, drifted conductances."""
    import onnx

    from cimc.runtime.simulator import use
    from tests.models import shared_weight_model

    path = tmp_path / "chain.onnx"
    model = shared_weight_model("gemm-chain")
    onnx.save(model, path)
    compiled = compile_model(path, "aon-cim", dac_bits=0, adc_bits=0)  # converters off: weights are all that differ
    chip = Chip(compiled, 3, seed=5)
    assert list(chip.ideal) == ["W"] and set(chip.layer.values()) == {"W"} and len(chip.layer) == 5
    state = chip.at(86400.0, gdc=False)
    w = state.weights["W"]  # [I, G, K, N]
    assert list(state.weights) == ["W"] and w.shape == (3, 1, 16, 16)
    assert not torch.equal(w[0], w[1])  # instances differ (programming noise) ...
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32))
    use(chip, chip.hook(state), state=state)
    with torch.no_grad():
        got = chip.executor(x.repeat(3, 1))[0].reshape(3, 2, 16)
    use(chip, None)
    biases = {i.name: torch.from_numpy(np.array(onnx.numpy_helper.to_array(i))) for i in model.graph.initializer}
    for inst in range(3):  # ... but within an instance every step multiplies by the same matrix
        h = x
        for step in range(5):
            h = torch.tanh(h @ w[inst, 0] + biases[f"b{step}"])
        assert torch.allclose(got[inst], h, rtol=1e-5, atol=1e-6)
    # Drift compensation is per use, measured on the shared devices: one probe response per use.
    assert chip.gdc_mode == "layer"
    compensated = chip.at(86400.0, gdc=True)
    assert sorted(compensated.gdc) == [f"step{i}" for i in range(5)]
    first = compensated.gdc["step0"]  # same devices, same (unquantised) probe: the same factor for every use
    assert all(torch.allclose(g, first) for g in compensated.gdc.values()) and not torch.allclose(first, torch.ones(1))
