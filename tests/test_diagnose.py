"""``cimc diagnose`` (per-layer SNR by cause on the simulator's own chip) and ``--digital`` layers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cimc
from cimc.data import Dataset
from cimc.diagnosis import CAUSES, diagnose
from cimc.errors import InputError
from cimc.runtime.executor import Executor
from tests.models import GroupedConcatNet, export_onnx

DEPTHWISE = "/depthwise/Conv"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    d = tmp_path_factory.mktemp("diag")
    path = export_onnx(GroupedConcatNet(), torch.randn(1, 8, 12, 12), d / "g.onnx")
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((24, 8, 12, 12)), 0).astype(np.float32)
    return path, Dataset(x, None, "random")


@pytest.fixture(scope="module")
def compiled(net: tuple[Path, Dataset]) -> cimc.artifact.CompiledModel:
    path, data = net
    return cimc.compile(path, "aon-cim", calibration=data)


def test_diagnose_splits_snr_by_cause(compiled, net, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, data = net
    # The output has 6 values per sample: the default would be snr; cosine keeps the numbers in [-1, 1].
    r = diagnose(compiled, data, time="24h", instances=2, out_dir=tmp_path / "d", metric="cosine")
    d = r.data
    assert d["metric"] == "cosine" and d["target"] == "aon-cim" and d["time"] == "1d"
    names = [layer["name"] for layer in d["layers"]]
    assert sorted(names) == sorted(["/grouped/Conv", DEPTHWISE, "/pointwise/Conv", "/branch/Conv", "/fc/Gemm"])
    assert [layer["rank"] for layer in d["layers"]] == list(range(1, 6))
    for layer in d["layers"]:
        snr = layer["snr_db"]
        assert all(snr[c] is not None and np.isfinite(snr[c]) for c in (*CAUSES, "all"))
        # Every non-ideality together is worse than the weakest alone (errors add, they do not cancel).
        assert snr["all"] < min(snr[c] for c in CAUSES) + 1.0
        assert 0 <= layer["adc"]["clip_rate"] <= 1 and 0 < layer["adc"]["levels_used"] <= 1
        assert -1 <= layer["metric_only_this_layer"] <= 1
    assert 0 < d["chip_metric"] <= 1 and d["float_metric"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert saved["layers"][0]["name"] == d["layers"][0]["name"]
    assert (tmp_path / "d" / "diagnose.png").stat().st_size > 10_000
    assert "SNR" in r.table() and "advice" in r.table()
    # Same seed, same numbers.
    again = diagnose(compiled, data, time="24h", instances=2, metric="cosine", try_advice=False).data
    assert again["layers"] == d["layers"]


def test_fewer_converter_bits_lower_only_that_cause(net) -> None:  # type: ignore[no-untyped-def]
    path, data = net
    by_bits = {}
    for bits in (8, 4):
        c = cimc.compile(path, "aon-cim", calibration=data, dac_bits=bits)
        layers = diagnose(c, data, instances=1, try_advice=False).data["layers"]
        by_bits[bits] = {layer["name"]: layer["snr_db"] for layer in layers}
    for name, snr8 in by_bits[8].items():
        snr4 = by_bits[4][name]
        assert snr4["dac"] < snr8["dac"] - 10  # ~6 dB per bit
        assert snr4["programming"] == pytest.approx(snr8["programming"], abs=1e-6)  # same devices, same seed


def test_ideal_devices_have_no_device_error(net) -> None:  # type: ignore[no-untyped-def]
    path, data = net
    c = cimc.compile(path, "ideal", calibration=data)
    d = diagnose(c, data, instances=1, try_advice=False).data
    for layer in d["layers"]:  # float32 rounding only (weights -> conductances -> weights)
        assert all(layer["snr_db"][c] is None or layer["snr_db"][c] > 100 for c in ("programming", "drift", "read"))


def test_uncalibrated_says_converters_not_modelled(net) -> None:  # type: ignore[no-untyped-def]
    path, data = net
    c = cimc.compile(path, "aon-cim")
    d = diagnose(c, data, instances=1, try_advice=False).data
    assert d["converters_modelled"] is False and d["advice"][0]["kind"] == "uncalibrated"
    assert all(layer["snr_db"]["dac"] is None for layer in d["layers"])


def test_digital_layer_runs_in_float_off_the_crossbar(net, compiled) -> None:  # type: ignore[no-untyped-def]
    path, data = net
    c = cimc.compile(path, "aon-cim", calibration=data, digital=[DEPTHWISE])
    analog = [n.name for n in c.analog_nodes()]
    assert DEPTHWISE not in analog and len(analog) == 4
    assert DEPTHWISE not in {s.name for s in Executor(c.model).analog_steps}
    layer_cost = {layer.name: layer for layer in c.cost.layers}
    assert layer_cost[DEPTHWISE].kind == "digital" and layer_cost[DEPTHWISE].energy_j["digital"] > 0
    assert c.cost.macs < compiled.cost.macs  # its MACs left the arrays
    d = diagnose(c, data, instances=1, try_advice=False).data
    assert DEPTHWISE not in [layer["name"] for layer in d["layers"]]
    report = cimc.inspect(c.model)
    assert any(n.name == DEPTHWISE and n.kind == "digital" and "--digital" in n.reason for n in report.nodes)
    with pytest.raises(InputError, match="no such layer"):
        cimc.compile(path, "aon-cim", digital=["/nope/Conv"])
    with pytest.raises(InputError, match="not an analog layer"):
        cimc.compile(path, "aon-cim", digital=["/Relu"])


def test_cli_diagnose_json_and_digital(net, tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path, data = net
    np.savez(tmp_path / "x.npz", x=data.x)
    res = run_cli("compile", path, "--calib", tmp_path / "x.npz", "--digital", DEPTHWISE, "-o", tmp_path / "c", "-q")
    assert res.code == 0 and res.out == "", res.err
    res = run_cli("diagnose", tmp_path / "c", "--data", tmp_path / "x.npz", "--instances", "1", "--time", "1h",
                  "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["format"] == "cimc-diagnose/1" and doc["time"] == "1h" and len(doc["layers"]) == 4
    assert (tmp_path / "c" / "diagnose" / "diagnose.png").is_file()
    res = run_cli("diagnose", tmp_path / "c", "--data", tmp_path / "x.npz", "--time", "0")
    assert res.code == 2 and "positive time" in res.err


def test_adc_range_too_small_is_advised(net) -> None:  # type: ignore[no-untyped-def]
    path, data = net
    c = cimc.compile(path, "aon-cim", calibration=data,
                     pipeline="canonicalize,map,quantize{percentile=80,clip=percentile},schedule")
    d = diagnose(c, data, instances=1, try_advice=False).data
    clipped = [layer for layer in d["layers"] if layer["adc"]["clip_rate"] > 0.01]
    assert clipped  # a range at the 80th percentile clips about a fifth of the conversions
    advised = {a["layer"] for a in d["advice"] if a["kind"] == "adc-clipping"}
    assert advised == {layer["name"] for layer in clipped}
    assert all("raise the ADC range percentile" in a["text"] for a in d["advice"] if a["kind"] == "adc-clipping")
    good = diagnose(cimc.compile(path, "aon-cim", calibration=data), data, instances=1, try_advice=False).data
    for layer in good["layers"]:  # the default calibration clips rarely and converts better
        bad = next(x for x in d["layers"] if x["name"] == layer["name"])
        assert layer["adc"]["clip_rate"] < bad["adc"]["clip_rate"] and layer["snr_db"]["adc"] > bad["snr_db"]["adc"]
