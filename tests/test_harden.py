"""``cimc harden`` and the measured advice of ``cimc diagnose`` on a small digits CNN trained here.

The CNN's first convolution has 9 rows (1 channel, 3x3): the few-row layer the issue names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cimc
from cimc.data import Dataset
from cimc.errors import InputError
from cimc.mitigations import MITIGATIONS, Decisions, build
from tests.models import export_onnx

BAD_RANGES = "canonicalize,map,quantize{percentile=80,clip=percentile},schedule"  # ADC clips a fifth


class _DigitsCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)  # K = 9 rows
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset, Dataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    torch.manual_seed(0)
    net = _DigitsCnn()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xt, yt = torch.from_numpy(x[:1200]), torch.from_numpy(y[:1200])
    for _ in range(60):  # full batch: a few seconds, ~93 % on held-out digits
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    folder = tmp_path_factory.mktemp("digits")
    path = export_onnx(net.eval(), xt[:1], folder / "digits.onnx")
    return path, Dataset(x[:300], y[:300], "digits-calib"), Dataset(x[1200:1400], y[1200:1400], "digits-test")


def test_mitigation_registry_names() -> None:
    assert {"digital", "replicate", "replicate-wide", "adc-range", "percentile", "weight-scale", "gdc",
            "gdc-gain"} <= set(MITIGATIONS)


def test_build_applies_decisions(digits) -> None:  # type: ignore[no-untyped-def]
    path, calib, _ = digits
    c = cimc.compile(path, "hermes", calibration=calib)
    d = build(c, Decisions(digital=("/conv1/Conv",), target=(("device.gdc_gain", 0.5),),
                           adc_scale=(("/fc/Gemm", 2.0),)), calib)
    assert "/conv1/Conv" not in [n.name for n in d.analog_nodes()] and d.target.device.gdc_gain == 0.5
    quant = {n.name: json.loads(n.metadata_props["cimc.quant"]) for n in d.analog_nodes()}
    before = {n.name: json.loads(n.metadata_props["cimc.quant"]) for n in c.analog_nodes()}
    assert quant["/conv2/Conv"] == before["/conv2/Conv"]  # kept its tiles: kept its converter ranges
    assert np.allclose(np.asarray(quant["/fc/Gemm"]["y_max"], dtype=float),
                       2 * np.asarray(before["/fc/Gemm"]["y_max"], dtype=float))
    assert d.cost.latency_s != c.cost.latency_s and d.extra["hardened"]["digital"] == ["/conv1/Conv"]


def test_diagnose_tries_advice_for_the_nine_row_layer(digits) -> None:  # type: ignore[no-untyped-def]
    path, calib, test = digits
    c = cimc.compile(path, "hermes", calibration=calib)
    r = cimc.diagnose(c, test, time="1y", instances=2, calibration=calib)
    d = r.data
    first = next(layer for layer in d["layers"] if layer["name"] == "/conv1/Conv")
    assert first["rows"] == 9 and first["groups"] == 1
    tried = d["tried"]
    assert tried and d["tried_with"] == {"instances": 2, "seed": 0, "time": "1y"}
    mine = [t for t in tried if t["layer"] == "/conv1/Conv" and t["kind"] in ("digital", "replicate")]
    assert mine, [t["text"] for t in tried]
    for t in tried:  # before/after measured on the simulator, ranked by the gain they gave
        if t["after"] is not None:
            assert t["gain"] == pytest.approx(t["after"]["value"] - t["before"]["value"])
    gains = [t["gain"] for t in tried if t["gain"] is not None]
    assert gains == sorted(gains, reverse=True)
    table = r.table()
    assert "ranked by the gain it gave" in table and "keep /conv1/Conv digital" in table and " -> " in table
    assert "no cause stands out" not in table


def test_harden_fixes_clipping_ranges_and_writes_a_compiled_model(digits, tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path, calib, test = digits
    np.savez(tmp_path / "calib.npz", x=calib.x, y=calib.y)
    np.savez(tmp_path / "test.npz", x=test.x, y=test.y)
    res = run_cli("compile", path, "--target", "hermes", "--calib", tmp_path / "calib.npz", "--pipeline", BAD_RANGES,
                  "-o", tmp_path / "c", "-q")
    assert res.code == 0, res.err
    res = run_cli("harden", tmp_path / "c", "--data", tmp_path / "test.npz", "--calib", tmp_path / "calib.npz",
                  "--time", "24h", "--instances", "2", "--rounds", "1", "--threads", "1", "-o", tmp_path / "h",
                  "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    steps = doc["steps"]
    assert doc["format"] == "cimc-harden/1" and doc["metric"] == "accuracy" and doc["time"] == "1d"
    start, final = steps[0]["measurement"]["value"], doc["final"]["value"]
    assert final > start + 0.02, steps  # ranges that clip a fifth of the conversions cost points; harden wins them
    kept = [s for s in steps[1:] if s["kept"]]
    assert kept and all(s["gain"] > 0 for s in kept)
    assert all({"energy_per_inference_j", "latency_s"} <= set(s["measurement"]) for s in steps if s["measurement"])
    saved = json.loads((tmp_path / "h" / "harden" / "harden.json").read_text())
    assert saved["steps"] == steps
    assert (tmp_path / "h" / "harden" / "harden.png").stat().st_size > 10_000
    assert "kept:" in (tmp_path / "h" / "harden" / "harden.txt").read_text()
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert manifest["hardened"] == doc["decisions"]
    # simulate and export accept the hardened model; simulate reproduces harden's number (same seed, instances).
    res = run_cli("simulate", tmp_path / "h", "--data", tmp_path / "test.npz", "--drift", "24h", "--instances", "2",
                  "--no-compare", "--json", "--threads", "1")
    assert res.code == 0, res.err
    assert json.loads(res.out)["series"][0]["points"][0]["mean"] == pytest.approx(final)
    res = run_cli("export", tmp_path / "h", "-o", tmp_path / "bundle", "-q")
    assert res.code == 0, res.err
    # Bad input: one line, exit 2.
    res = run_cli("harden", tmp_path / "c", "--data", tmp_path / "test.npz", "--drop", "lots", "-o", tmp_path / "x")
    assert res.code == 2 and "--drop" in res.err
    with pytest.raises(SystemExit) as exc:  # argparse: the two are mutually exclusive
        run_cli("harden", tmp_path / "c", "--data", tmp_path / "test.npz", "--goal", "0.9", "--drop", "1%", "-o",
                tmp_path / "x")
    assert exc.value.code == 2


def test_harden_api_stops_at_the_goal(digits) -> None:  # type: ignore[no-untyped-def]
    path, calib, test = digits
    c = cimc.compile(path, "hermes", calibration=calib, pipeline=BAD_RANGES)
    r = cimc.harden(c, test, time="24h", goal=0.0, instances=1, calibration=calib)
    assert r.data["stopped"] == "goal met" and len(r.data["steps"]) == 1 and r.data["goal_met"]
    assert r.compiled is not None and "hardened" in r.compiled.extra
    with pytest.raises(InputError, match="--goal or --drop"):
        cimc.harden(c, test, goal=0.9, drop=0.01)


def test_replication_is_a_mitigation(digits, tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    from cimc.mitigations import candidates_for, measure

    path, calib, test = digits
    c = cimc.compile(path, "hermes", calibration=calib)
    data = cimc.diagnose(c, test, time="1y", instances=1, try_advice=False).data
    replicate = {x.layer: x for x in candidates_for(data, Decisions(), c) if x.kind == "replicate"}
    assert "/conv1/Conv" in replicate and "--replicate /conv1/Conv=4" in replicate["/conv1/Conv"].text
    d = build(c, replicate["/conv1/Conv"].apply(Decisions()), calib)
    names = [n.name for n in d.analog_nodes()]
    assert [f"/conv1/Conv/rep{i}" for i in range(4)] == [n for n in names if n.startswith("/conv1/Conv")]
    assert d.cost.total_energy_j > c.cost.total_energy_j and d.extra["hardened"]["replicate"] == {"/conv1/Conv": 4}
    m = measure(d, test.x[:100], test.y[:100], 86400.0, "accuracy", 1)
    assert 0.5 < m.value <= 1 and m.energy_j == pytest.approx(d.cost.total_energy_j)
    # Its replicas are not proposed again; the replicated model simulates and exports like any other.
    again = cimc.diagnose(d, test, time="1y", instances=1, try_advice=False).data
    assert not [x for x in candidates_for(again, Decisions(replicate=(("/conv1/Conv", 4),)), c) if "/rep" in x.layer]
    d.save(tmp_path / "r")
    res = run_cli("export", tmp_path / "r", "-o", tmp_path / "bundle", "-q")
    assert res.code == 0, res.err


def test_wide_replication_and_candidates_in_turn(digits) -> None:  # type: ignore[no-untyped-def]
    """One candidate doubles every layer whose weakest cause is noise that copies average; the candidate list
    takes the mitigations in turn, so a cap on trials never drops a whole mitigation."""
    from cimc.mitigations import candidates_for

    path, calib, test = digits
    c = cimc.compile(path, "hermes", calibration=calib)
    data = cimc.diagnose(c, test, time="24h", instances=1, try_advice=False).data
    noisy = [l["name"] for l in data["layers"]
             if min(("output", "read", "programming", "drift", "dac", "adc"), key=lambda k: l["snr_db"][k])
             in ("output", "read", "programming", "drift")]
    assert len(noisy) >= 2  # this CNN's layers lose most to device and output noise at 24 h
    cands = candidates_for(data, Decisions(), c)
    wide = [x for x in cands if x.kind == "replicate-wide"]
    assert len(wide) == 1 and f"the {len(noisy)} layers" in wide[0].text
    assert dict(wide[0].apply(Decisions()).replicate) == {n: 2 for n in noisy}
    kinds = [x.kind for x in cands]
    first = list(dict.fromkeys(kinds))
    assert kinds[: len(first)] == first  # one of each mitigation before any second one
    d = build(c, wide[0].apply(Decisions()), calib)
    assert len(d.analog_nodes()) == len(c.analog_nodes()) + len(noisy)
    # Nothing more to double once they are: the candidate is not proposed again.
    assert not [x for x in candidates_for(data, wide[0].apply(Decisions()), c) if x.kind == "replicate-wide"]
    # A chip without room for the copies gets no such candidate (and a refused variant is a failed trial, not
    # the end of harden or diagnose).
    import copy
    import json

    full = copy.copy(c)
    full.model = copy.deepcopy(c.model)
    m = json.loads(full.model.metadata_props["cimc.mapping"])
    m["weights_placed"] = m["arrays_available"] * m["array_rows"] * m["array_weight_cols"]
    full.model.metadata_props["cimc.mapping"] = json.dumps(m)
    assert not [x for x in candidates_for(data, Decisions(), full) if x.kind == "replicate-wide"]


def test_harden_takes_arrays_by_input_name(digits) -> None:  # type: ignore[no-untyped-def]
    """Data as the rest of the API takes it: a mapping of arrays by input name (or one array), not only a file."""
    import onnx

    path, calib, test = digits
    name = onnx.load(str(path)).graph.input[0].name
    c = cimc.compile(path, "hermes", calibration={name: calib.x})
    r = cimc.harden(c, {name: test.x[:40], "y": test.y[:40]}, calibration={name: calib.x[:64]}, goal=0.0,
                    instances=1)
    assert r.data["metric"] == "accuracy" and r.data["samples"] == 40 and r.data["goal_met"]
    r = cimc.harden(c, test.x[:40], goal=-1.0, metric="cosine", instances=1)
    assert r.data["metric"] == "cosine" and r.data["samples"] == 40


def test_a_variant_without_room_is_a_failed_trial(digits) -> None:  # type: ignore[no-untyped-def]
    """A replication the chip has no room for is recorded as a trial that could not be run, with the fit
    message; it does not end diagnose or harden (it used to: FitError is not an InputError)."""
    import dataclasses

    from cimc.mitigations import Candidate, measure, try_candidates

    path, calib, test = digits
    c = cimc.compile(path, "aon-cim", calibration=calib)
    big = Candidate("replicate", "/conv2/Conv", "replicate /conv2/Conv 64 times",  # 64 x 72 rows > 1024 rows
                    lambda x: dataclasses.replace(x, replicate=(("/conv2/Conv", 64),)))
    x, y = test.x[:40], test.y[:40]
    before = measure(c, x, y, 86400.0, "accuracy", 1)
    out = try_candidates(c, before, [big], Decisions(), lambda m: measure(m, x, y, 86400.0, "accuracy", 1),
                         calib, True, 0, None)
    assert out[0]["gain"] is None and ("does not fit" in out[0]["error"] or "SRAM" in out[0]["error"])
