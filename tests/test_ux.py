"""What users of the command line and the API meet: JSON output, quiet/verbose, logs without carriage
returns, metrics without labels, result objects, figures a hardware engineer can read."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cimc
from cimc import builtin
from cimc.data import Dataset, load_dataset
from cimc.plots import _layer_style, plot_drift, plot_occupancy
from tests.models import MatMulMlp, export_onnx


@pytest.fixture(scope="module")
def mnist_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    d = tmp_path_factory.mktemp("ux")
    data = load_dataset(builtin.mnist_test())
    calib = Dataset(data.x[-128:], data.y[-128:], "calib")
    cimc.compile(builtin.mnist_model(), "aon-cim", calibration=calib, out_dir=d / "build")
    return d / "build", data


def test_api_exports_only_the_api() -> None:
    assert set(cimc.__all__) == {"CimcError", "compile", "diagnose", "finetune", "harden", "inspect", "load",
                                 "load_compiled", "run", "simulate", "sweep"}
    assert all(callable(getattr(cimc, name)) for name in cimc.__all__)


def test_no_command_exits_2_with_usage(run_cli) -> None:  # type: ignore[no-untyped-def]
    res = run_cli()
    assert res.code == 2 and "usage: cimc" in res.err and res.out == ""


def test_flags_after_the_subcommand(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = export_onnx(MatMulMlp(), torch.randn(1, 20), tmp_path / "mlp.onnx")
    res = run_cli("inspect", path, "--debug", "-v", "--json")
    assert res.code == 0 and json.loads(res.out)["totals"]["analog_nodes"] >= 1
    res = run_cli("inspect", path, "--log-level", "error", "-q")
    assert res.code == 0 and res.out == ""
    res = run_cli("inspect", tmp_path / "missing.onnx", "-q")
    assert res.code == 2 and res.out == "" and "missing.onnx" in res.err  # errors still shown


def test_simulate_json_metrics_and_per_class(mnist_build, run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    build, data = mnist_build
    res = run_cli("simulate", build, "--data", builtin.mnist_test(), "--drift", "1h", "--instances", "2",
                  "--samples", "48", "--json", "-o", tmp_path / "sim")
    assert res.code == 0, res.err
    doc = json.loads(res.out)  # stdout is exactly one JSON document
    assert doc["metric"] == "accuracy" and doc["target"] == "aon-cim"
    assert len(doc["per_class"]["float"]) == 10 and len(doc["series"][0]["points"][0]["per_class"]) == 10
    # Unlabelled data: agreement with the float model.
    np.savez(tmp_path / "x.npz", x=data.x[:32])
    res = run_cli("simulate", build, "--data", tmp_path / "x.npz", "--drift", "1s,1M", "--instances", "2",
                  "--json", "--metric", "snr", "--no-compare")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    pts = doc["series"][0]["points"]
    assert doc["metric"] == "snr" and [p["label"] for p in pts] == ["1s", "1mo"]
    assert 0 < pts[1]["mean"] < pts[0]["mean"] + 3  # dB; a month of drift is not better than a second
    assert 0 < pts[0]["relerr"] < 1
    res = run_cli("simulate", build, "--data", tmp_path / "x.npz", "--metric", "accuracy")
    assert res.code == 2 and "needs integer labels" in res.err


def test_cosine_on_unlabelled_embedding_model(tmp_path: Path) -> None:
    """A conv embedding net without softmax (no classes at all): cosine agreement and relative error."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv1d(4, 16, 5, padding=2), torch.nn.ReLU(), torch.nn.Conv1d(16, 16, 3),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(),
                              torch.nn.Linear(16, 32)).eval()
    path = export_onnx(net, torch.randn(1, 4, 40), tmp_path / "embed.onnx")
    x = np.random.default_rng(0).standard_normal((40, 4, 40)).astype(np.float32)
    c = cimc.compile(path, "aon-cim", calibration=Dataset(x, None, "calib"))
    r = cimc.simulate(c, Dataset(x, None, "clips"), drift="1s,1y", instances=2, compare_gdc=False)
    assert r.data["metric"] == "cosine" and "float_accuracy" not in r.data
    a, b = (p["mean"] for p in r.data["series"][0]["points"])
    assert 0.5 < b <= a <= 1.0
    assert "cosine" in r.table()
    df = r.to_pandas()
    assert list(df["time"]) == ["1s", "1y"] and set(df.columns) >= {"mean", "std", "series"}
    fig = plot_drift(r.data)  # figures are drawn by the face (cimc.plots), not by the result object
    assert "cosine" in fig.axes[0].get_ylabel()


def test_progress_in_logs_has_no_carriage_returns(mnist_build, run_cimc_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    build, _ = mnist_build
    res = run_cimc_process("simulate", build, "--data", builtin.mnist_test(), "--drift", "1s", "--instances", "1",
                           "--samples", "32", "-o", tmp_path / "s")
    assert res.code == 0, res.err
    assert "\r" not in res.err and "\x1b" not in res.err + res.out  # not a TTY: plain lines, no colour


def test_drift_figure_keeps_a_fixed_span(mnist_build) -> None:  # type: ignore[no-untyped-def]
    results = {"metric": "accuracy", "float_accuracy": 0.95, "quantized_accuracy": 0.945, "instances": 3,
               "samples": 100, "model": "m", "target": "t",
               "series": [{"label": "GDC", "points": [{"label": "1s", "t_s": 1.0, "mean": 0.94, "std": 0.003},
                                                      {"label": "1y", "t_s": 3.15e7, "mean": 0.93, "std": 0.004}]}]}
    fig = plot_drift(results)
    lo, hi = fig.axes[0].get_ylim()
    assert lo == pytest.approx(65.0) and hi == pytest.approx(97.0)  # float - 30 .. float + 2 points
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("float model (95.00") for t in labels)
    assert any(t.startswith("quantised, ideal devices (94.50") for t in labels)


def test_occupancy_one_legend_entry_and_style_per_layer(tmp_path: Path) -> None:
    styles = {_layer_style(i) for i in range(140)}
    assert len(styles) == 140  # distinct for up to 140 layers (then names are written in the tiles too)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(24):
        layers += [torch.nn.Linear(32, 32), torch.nn.ReLU()]
    path = export_onnx(torch.nn.Sequential(*layers).eval(), torch.randn(1, 32), tmp_path / "deep.onnx")
    c = cimc.compile(path, "hermes")
    fig = plot_occupancy(c)
    legend = fig.legends[0]
    names = [t.get_text() for t in legend.get_texts()]
    assert names == [n.name for n in c.analog_nodes()] and len(names) == 24
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == c.mapping["arrays_used"]
    assert all(ax.get_title().startswith("core ") for ax in panels)
    assert all(len(ax.get_xticks()) > 1 and len(ax.get_yticks()) > 1 for ax in panels)  # coordinates shown
    assert "hermes" in fig._suptitle.get_text()
    assert "occupancy" not in os.listdir(tmp_path)


def test_verify_json_and_export_warns_uncalibrated(mnist_build, run_cli, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    build, _ = mnist_build
    res = run_cli("export", build, "-o", tmp_path / "bundle", "-q")
    assert res.code == 0 and res.out == ""
    res = run_cli("verify", tmp_path / "bundle", "--json", "--model", build)  # not beside it: named
    doc = json.loads(res.out)
    assert res.code == 0 and doc["ok"] is True and doc["problems"] == [] and doc["layers_checked"] >= 1
    plain = cimc.compile(builtin.mnist_model(), "aon-cim", out_dir=tmp_path / "plain")
    from cimc.export import export_mapping

    with caplog.at_level("WARNING", logger="cimc.export"):
        export_mapping(plain, tmp_path / "plain-bundle")
    assert "not calibrated" in caplog.text


def _readme_python_snippet() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    match = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.DOTALL)
    assert match, "README.md has a '## Python API' section with a python block"
    return match.group(1)


def test_readme_python_snippet_runs_as_a_plain_script(tmp_path: Path) -> None:
    """The README's API snippet, saved as a script without ``if __name__ == "__main__":`` and run with python:
    ``workers=2`` used to make each spawned worker re-run the script and the parent hang (issue 22)."""
    model = MatMulMlp()
    export_onnx(model, torch.randn(1, 20), tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    for name, n in (("val", 32), ("test", 24)):
        x = rng.normal(size=(n, 20)).astype(np.float32)
        y = model(torch.from_numpy(x)).argmax(1).numpy().astype(np.int64)  # the float model's own answers
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    script = tmp_path / "api.py"
    script.write_text(_readme_python_snippet() + "print('SNIPPET DONE', len(rows))\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SNIPPET DONE 3" in proc.stdout and "bootstrapping phase" not in proc.stderr
    assert (tmp_path / "build" / "manifest.json").is_file() and (tmp_path / "sweep" / "sweep.csv").is_file()


def test_script_defined_payload_fails_at_once_in_one_line(tmp_path: Path) -> None:
    """A plain script whose workers would need something defined in the script itself: one line, no hang."""
    script = tmp_path / "s.py"
    script.write_text(
        "from cimc.errors import CimcError\n"
        "from cimc.parallel import LocalBackend\n"
        "class Mine:\n    pass\n"
        "def task(shared, i):\n    return i\n"
        "try:\n"
        "    list(LocalBackend(2, threads=1).run(task, [1, 2], shared=Mine()))\n"
        "except CimcError as exc:\n    print('REFUSED', exc)\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout and "if __name__" in proc.stdout and len(proc.stdout.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ issue 22: small ones
def test_json_before_the_command_and_refused_where_it_does_not_apply(run_cli, tmp_path: Path) -> None:
    path = export_onnx(MatMulMlp(), torch.randn(1, 20), tmp_path / "mlp.onnx")
    res = run_cli("--json", "inspect", path)
    assert res.code == 0 and json.loads(res.out)["totals"]["analog_nodes"] >= 1
    res = run_cli("--json", "run", tmp_path / "nothere", "--input", "x.npy", "-o", tmp_path / "y.npy")
    assert res.code == 2 and res.err.count("\n") == 1 and "--json is not available for 'run'" in res.err


def test_missing_compiled_folder_says_no_such_folder(run_cli, tmp_path: Path) -> None:
    res = run_cli("simulate", tmp_path / "nothere_dir", "--data", "kws-test")
    assert res.code == 2 and "nothere_dir: no such folder" in res.err and res.err.count("\n") == 1


def test_diagnose_takes_threads() -> None:
    from cimc.cli import build_parser

    args = build_parser().parse_args(["diagnose", "build", "--data", "d.npz", "--threads", "1"])
    assert args.threads == 1


def test_no_negative_zero_in_diagnose_costs() -> None:
    from cimc.diagnosis import _cost_text

    assert _cost_text("mse", 1e-9) == "+0.0000" and _cost_text("mse", -1e-9) == "+0.0000"
    assert _cost_text("accuracy", 1e-7) == "+0.00 pts" and _cost_text("accuracy", 0.0123) == "-1.23 pts"


def test_progress_bars_of_sweeps_and_shards_do_not_redraw_into_a_log(monkeypatch) -> None:
    import io

    from cimc.api import _shard_bar
    from cimc.sweeps import _points_bar

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    for bar in (_points_bar(3, 1, True), _shard_bar(3, True)):
        for _ in range(2):
            bar.update(1)
        bar.close()
    assert "\r" not in log.getvalue()


def test_shape_mismatch_names_the_reshape_and_one_hot_labels_are_recognised(mnist_build, tmp_path: Path) -> None:
    from cimc.errors import DataError

    build, data = mnist_build
    flat = tmp_path / "flat.npz"
    np.savez(flat, x=data.x[:8].reshape(8, -1), y=data.y[:8])
    with pytest.raises(DataError, match=r"per sample but the model takes \(1, 28, 28\);.* the sizes agree: reshape it, "
                                        r"x = x\.reshape\(len\(x\), 1, 28, 28\)"):
        cimc.simulate(build, str(flat), drift="1s", instances=1)
    one_hot = tmp_path / "onehot.npz"
    np.savez(one_hot, x=data.x[:8], y=np.eye(10, dtype=np.float32)[data.y[:8]])
    with pytest.raises(DataError, match=r"looks one-hot; store one integer class label per sample: "
                                        r"y = y\.argmax\(axis=1\)"):
        load_dataset(str(one_hot))


def test_ideal_target_does_not_claim_quantised_converters(tmp_path: Path) -> None:
    path = export_onnx(MatMulMlp(), torch.randn(1, 20), tmp_path / "mlp.onnx")
    calib = Dataset(np.random.default_rng(0).normal(size=(16, 20)).astype(np.float32), None, "calib")
    text = cimc.compile(path, "ideal", calibration=calib, out_dir=tmp_path / "b").summary_table()
    assert "nothing is quantised" in text and "quantised twin" not in text
    text = cimc.compile(path, "aon-cim", calibration=calib, out_dir=tmp_path / "c").summary_table()
    assert "converters calibrated (DAC 8 bits, ADC 8 bits; model.qdq.onnx is the quantised twin)" in text


def test_demo_promises_no_duration(monkeypatch, tmp_path: Path) -> None:
    from cimc import demo

    said: list[str] = []
    monkeypatch.setattr(demo, "_say", said.append)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("mine")
    with pytest.raises(cimc.CimcError):
        demo.run_demo(tmp_path / "x", progress=False)  # refused after its first line
    assert said and " min " not in said[0] and "--instances 2" in said[0]
