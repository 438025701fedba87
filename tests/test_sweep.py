"""cimc sweep: grid validation, points that do not fit or fail, outputs, resume after SIGKILL, backends."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cimc
from cimc.data import save_dataset
from cimc.errors import InputError, TargetError
from cimc.sweeps import _run_point, expand_grid, pareto_front, parse_vary
from tests.models import export_onnx

DRIFT = "1s,24h"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-layer MLP and a labelled .npz (labels = the float model's predictions): calibration and test data."""
    folder = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 4)).eval()
    model = export_onnx(net, torch.randn(1, 16), folder / "mlp.onnx")
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
    data = save_dataset(folder / "data.npz", x.numpy(), y.numpy().astype(np.int64))
    return model, data


def _args(model: Path, data: Path, out: Path, *extra: str, quiet: bool = True) -> list[str]:
    return ["sweep", str(model), "--vary", "converters.adc_bits,converters.dac_bits=4,8", "--calib", str(data),
            "--data", str(data), "--drift", DRIFT, "--instances", "2", "-o", str(out), *(["-q"] if quiet else []),
            *extra]


def _csv(out: Path) -> str:
    return (out / "sweep.csv").read_text()


def test_grid_parsing_and_front() -> None:
    assert parse_vary("converters.adc_bits,converters.dac_bits=4,6") == (
        ("converters.adc_bits", "converters.dac_bits"), [4, 6])
    assert parse_vary("device.gdc=layer,none")[1] == ["layer", "none"]
    assert parse_vary("device.weight_scale=column")[1] == ["column"]
    grid = expand_grid([(("a",), [1, 2]), (("b", "c"), [True])], points=[{"d": 0}, {"d": 1}], fixed={"e": 5})
    assert grid[0] == {"e": 5, "d": 0, "a": 1, "b": True, "c": True} and len(grid) == 4
    assert pareto_front([(0.9, 10.0), (0.8, 20.0), (0.7, 15.0), (0.9, 10.0)]) == [True, True, False, True]
    with pytest.raises(InputError, match="FIELD=V1"):
        parse_vary("converters.adc_bits")


def test_sweep_outputs_and_resume(tiny, tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    model, data = tiny
    out = tmp_path / "out"
    res = run_cli(*_args(model, data, out, "--vary", "sram.size_bytes=16,65536", quiet=False))
    assert res.code == 0, res.err
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 4 and {r["converters.adc_bits"] for r in rows} == {"4", "8"}
    small = [r for r in rows if r["sram.size_bytes"] == "16"]
    assert all(r["fits"] == "False" and r["status"] == "does not fit" and r["reason"] for r in small)
    big = [r for r in rows if r["sram.size_bytes"] == "65536"]
    assert all(r["status"] == "ok" and float(r["tops_per_w"]) > 0 for r in big)
    assert all(0 <= float(r["acc_1d_gdc_mean"]) <= 1 and r["acc_1d_nogdc_min"] != "" for r in big)
    assert float(big[0]["tops_per_w"]) > float(big[1]["tops_per_w"])  # 4-bit converters cost less
    assert any(r["front"] == "True" for r in big)
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["fields"] == ["converters.adc_bits", "converters.dac_bits", "sram.size_bytes"] and len(doc["rows"]) == 4
    assert (out / "pareto.png").stat().st_size > 10_000 and len(list((out / "points").glob("*.json"))) == 4
    # the table: the front marked with '*', no escape codes when not on a terminal; the failed points listed
    assert "\033[" not in res.out and any(line.startswith("*") for line in res.out.splitlines())
    assert "does not fit" not in res.out or "not run:" in res.out
    # a rerun computes nothing and writes the same table
    before = {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}
    first = _csv(out)
    assert run_cli(*_args(model, data, out, "--vary", "sram.size_bytes=16,65536")).code == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()} == before and _csv(out) == first


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vary", "converters.adc_bitz=4"], "adc_bitz"),
        (["--vary", "array.nothing.deeper=4"], "nothing"),
        (["--vary", "converters=4"], "is a section"),
        (["--vary", "converters.adc_bits=99"], "converters.adc_bits"),
        (["--vary", "device.gdc=sometimes"], "device"),
        (["--pareto-time", "1y"], "pareto-time"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_bad_sweeps_stop_before_running(tiny, tmp_path: Path, run_cli, extra, message) -> None:  # type: ignore[no-untyped-def]
    model, data = tiny
    res = run_cli(*_args(model, data, tmp_path / "out", *extra))
    assert res.code == 2 and message in res.err and "Traceback" not in res.err, res.err
    assert not (tmp_path / "out" / "sweep.csv").exists()


def test_grid_file_and_python_api(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, data = tiny
    grid = tmp_path / "grid.yaml"
    grid.write_text("fixed: {device.gdc: layer}\npoints:\n  - {converters.adc_bits: 4, converters.dac_bits: 8}\n"
                    "  - {converters.adc_bits: 8, converters.dac_bits: 4}\n")
    rows = cimc.sweep(model, "aon-cim", grid=grid, calib=data, data=data, drift=DRIFT, instances=2,
                      pareto_time="1s")
    assert [(r["converters.adc_bits"], r["converters.dac_bits"]) for r in rows] == [(4, 8), (8, 4)]
    assert all(r["device.gdc"] == "layer" and r["accuracy"] == r["acc_1s_gdc_mean"] for r in rows)
    frame = rows.to_pandas()
    assert list(frame["converters.adc_bits"]) == [4, 8]
    bad = tmp_path / "bad.yaml"
    bad.write_text("vary: {converters.adc_bits: 4}\n")
    with pytest.raises(InputError, match="list"):
        cimc.sweep(model, grid=bad, calib=data, data=data)
    with pytest.raises(TargetError, match="sram.size_bytes"):
        cimc.sweep(model, vary={"sram.size_bytes": [0]}, calib=data, data=data, drift=DRIFT)


def test_point_failing_with_user_error_is_recorded(tiny) -> None:  # type: ignore[no-untyped-def]
    from cimc.targets import load_target

    _, data = tiny
    ds = cimc.data.load_dataset(data)
    shared = {"model": b"not an onnx file", "model_sha256": "0" * 64, "model_name": "broken.onnx", "calib": ds,
              "data": ds, "train": None, "spec": {"seed": 0, "drift": [1.0], "instances": 1, "batch_size": 64}}
    task = {"key": "k", "point": {}, "label": "base", "target": load_target("aon-cim").model_dump(mode="json")}
    record = _run_point(shared, task)
    assert record["status"] == "error" and record["fits"] is True and "\n" not in record["reason"] and record["reason"]


def test_sigkill_midway_then_rerun_gives_the_same_csv(tiny, tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    model, data = tiny
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    extra = ["--vary", "device.gdc=layer,none"]
    cmd = [sys.executable, "-m", "cimc.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    assert run_cli(*_args(model, data, whole, *extra)).code == 0
    proc = subprocess.Popen([*cmd, *_args(model, data, killed, *extra)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((killed / "points").glob("*.json"))) >= 1:
            break
        time.sleep(0.05)
    killed_midway = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((killed / "points").glob("*.json")))
    assert killed_midway and 1 <= done < 4 and not (killed / "sweep.csv").exists()
    subprocess.run([*cmd, *_args(model, data, killed, *extra)], check=True, env=env, capture_output=True, timeout=300)
    assert _csv(killed) == _csv(whole)


def test_workers_and_ray_give_the_same_csv(tiny, tmp_path: Path, run_cli, ray_session) -> None:  # type: ignore[no-untyped-def]
    model, data = tiny
    outputs = {}
    for name, extra in (("in-process", []), ("workers2", ["--workers", "2"]), ("ray", ["--ray"])):
        res = run_cli(*_args(model, data, tmp_path / name, *extra))
        assert res.code == 0, res.err
        outputs[name] = _csv(tmp_path / name)
    assert outputs["workers2"] == outputs["in-process"] == outputs["ray"]


def test_sweep_with_finetuning(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, data = tiny
    kwargs = dict(vary=["converters.adc_bits=4"], calib=data, data=data, drift="1s", pareto_time="1s", instances=1)
    plain = cimc.sweep(model, out_dir=tmp_path / "plain", **kwargs)
    tuned = cimc.sweep(model, finetune=data, out_dir=tmp_path / "tuned", **kwargs)
    assert tuned[0]["status"] == "ok", tuned[0]["reason"]
    assert tuned[0]["key"] != plain[0]["key"]  # fine-tuning data is part of the point's identity
    assert json.loads((tmp_path / "tuned" / "sweep.json").read_text())["finetune"] is True
