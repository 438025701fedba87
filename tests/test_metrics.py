"""Metrics as registered classes: exact values on small arrays, user metrics, default metric, chip yield."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cimc
from cimc.data import Dataset
from cimc.errors import DataError, InputError
from cimc.runtime.metrics import (
    MetricAccumulator,
    check_yield_target,
    chip_yield,
    default_metric,
    format_score,
    get_metric,
    roc_auc,
)
from tests.models import export_onnx

# Two chip instances, four samples, one score per sample.
SCORES = torch.tensor([[[0.6], [0.4], [0.9], [0.7]],
                       [[0.1], [0.5], [0.2], [0.3]]])
LABELS = np.array([1, 1, 0, 1])


def _values(metric: object, out: torch.Tensor = SCORES, y: np.ndarray | None = LABELS,
            ref: torch.Tensor | None = None) -> list[float]:
    acc = MetricAccumulator(metric, out.shape[0], int(out.reshape(out.shape[0], out.shape[1], -1).shape[-1]))
    acc.add(out, y, ref)
    return [float(v) for v in acc.values()]


def test_auc_exact_with_ties() -> None:
    # 3 positives x 2 negatives = 6 pairs: (0.4 vs 0.1) (0.4 vs 0.4 tie) (0.8 > both) (0.4 tie, 0.4 > 0.1)
    assert roc_auc(np.array([0.1, 0.4, 0.4, 0.8, 0.4]), np.array([0, 0, 1, 1, 1])) == pytest.approx(5 / 6)
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))
    # Instance 0: the negative (0.9) outranks every positive; instance 1: it beats one of three.
    assert _values("auc") == pytest.approx([0.0, 2 / 3])


def test_detection_rate_at_threshold() -> None:
    # Positives score 0.6, 0.4, 0.7 (instance 0) and 0.1, 0.5, 0.3 (instance 1): 2/3 and 1/3 reach 0.5.
    assert _values("detect@0.5") == pytest.approx([2 / 3, 1 / 3])
    assert get_metric("detect@0.5").percent and format_score("detect@0.5", 2 / 3) == "66.67 %"
    # A score column of a multi-value output: positives are the samples labelled with that column.
    two = torch.cat([1 - SCORES, SCORES], dim=-1)
    assert _values("detect@0.5[1]", two) == pytest.approx([2 / 3, 1 / 3])
    assert _values("auc[1]", two) == pytest.approx([0.0, 2 / 3])
    with pytest.raises(InputError, match=r"auc\[1\]"):
        get_metric("auc").check_labels(LABELS, 2)


def test_topk_and_names() -> None:
    out = torch.tensor([[[0.1, 0.5, 0.4], [0.3, 0.2, 0.5]]])  # one instance, two samples
    assert _values("accuracy", out, np.array([2, 2])) == [0.5]
    assert _values("top2", out, np.array([2, 0])) == [1.0]
    assert _values("top1", out, np.array([2, 0])) == [0.0]
    assert get_metric("top5").name == "top5" and get_metric("detect@0.25[3]").name == "detect@0.25[3]"
    with pytest.raises(InputError, match="unknown metric"):
        get_metric("f1")


def test_agreement_metrics_unchanged() -> None:
    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    out = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert _values("cosine", out, None, ref) == pytest.approx([1.0])
    assert _values("mse", out, None, ref) == pytest.approx([0.25])
    assert _values("relerr", out, None, ref) == pytest.approx([math.sqrt(1 / 5)])
    assert _values("snr", out, None, ref) == pytest.approx([10 * math.log10(5)])


def test_callable_metric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def max_score(outputs: np.ndarray, labels: np.ndarray) -> float:
        return float(outputs.max())

    assert _values(max_score) == pytest.approx([0.9, 0.5])
    # By module:function, with its attributes.
    (tmp_path / "my_metrics.py").write_text(
        "import numpy as np\n"
        "def false_alarms(outputs, labels):\n"
        "    return float(((outputs[:, 0] >= 0.5) & (labels == 0)).mean())\n"
        "false_alarms.higher_is_better = False\n"
        "false_alarms.needs_labels = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = get_metric("my_metrics:false_alarms")
    assert m.name == "my_metrics:false_alarms" and not m.higher_is_better and m.needs_labels
    assert _values("my_metrics:false_alarms") == pytest.approx([0.25, 0.0])
    with pytest.raises(InputError, match="cannot import"):
        get_metric("no_such_module_here:f")
    with pytest.raises(InputError, match="has no 'nope'"):
        get_metric("my_metrics:nope")


def test_chip_yield_and_target() -> None:
    assert chip_yield([0.90, 0.95, 0.97], 0.95, True) == pytest.approx(2 / 3)
    assert chip_yield([0.01, 0.03], 0.02, False) == pytest.approx(0.5)
    assert check_yield_target("accuracy", "90%") == pytest.approx(0.9)
    assert check_yield_target("snr", "20") == 20.0
    with pytest.raises(InputError, match="share"):
        check_yield_target("accuracy", "90")


def test_default_metric_fits_the_output() -> None:
    assert default_metric(None, 1) == "snr" and default_metric(None, 8) == "snr"
    assert default_metric(None, 128) == "cosine" and default_metric(None, None) == "cosine"
    assert default_metric(LABELS, 1) == "auc" and default_metric(LABELS, 10) == "accuracy"


class _Detector(nn.Module):
    """A one-output sigmoid detector: the cosine of its output to the float output is always 1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(16, 24)
        self.out = nn.Linear(24, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(torch.relu(self.hidden(x))))


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    d = tmp_path_factory.mktemp("det")
    path = export_onnx(_Detector(), torch.randn(1, 16), d / "det.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    with torch.no_grad():
        score = _Detector()(torch.from_numpy(x)).numpy()[:, 0]
    y = (score > np.median(score)).astype(np.int64)  # the float model separates them perfectly
    return path, Dataset(x, y, "det")


def test_one_output_model_gets_an_error_metric(detector: tuple[Path, Dataset], tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path, data = detector
    c = cimc.compile(path, "hermes", calibration=data)
    r = cimc.simulate(c, Dataset(data.x, None, "x"), drift="24h", instances=2, compare_gdc=False)
    assert r.data["metric"] == "snr" and r.data["series"][0]["points"][0]["mean"] < 60
    r = cimc.simulate(c, data, drift="24h", instances=2, compare_gdc=False, yield_target=0.9)
    point = r.data["series"][0]["points"][0]
    assert r.data["metric"] == "auc" and r.data["float_score"] == pytest.approx(1.0)
    assert point["yield"] == chip_yield(point["per_instance"], 0.9, True) and r.data["yield_target"] == 0.9
    assert "yield (>= 0.9)" in r.table()
    # The CLI: detection rate at a threshold, a yield target, and a module:function metric.
    np.savez(tmp_path / "d.npz", x=data.x, y=data.y)
    c.save(tmp_path / "c")
    res = run_cli("simulate", tmp_path / "c", "--data", tmp_path / "d.npz", "--drift", "1h", "--instances", "2",
                  "--metric", "detect@0.5", "--yield-target", "50%", "--no-compare", "--json", "--threads", "1")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["metric"] == "detect@0.5" and doc["percent"] and 0 <= doc["series"][0]["points"][0]["yield"] <= 1
    res = run_cli("simulate", tmp_path / "c", "--data", tmp_path / "d.npz", "--metric", "accuracy", "--no-compare")
    assert res.code == 2 and "labels" in res.err
    res = run_cli("simulate", tmp_path / "c", "--data", tmp_path / "d.npz", "--metric", "bogus")
    assert res.code == 2 and "unknown metric 'bogus'" in res.err
    res = run_cli("simulate", tmp_path / "c", "--data", tmp_path / "d.npz", "--yield-target", "90", "--no-compare",
                  "--metric", "detect@0.5", "--instances", "1", "--drift", "1s")
    assert res.code == 2 and "90%" in res.err
    with pytest.raises(DataError, match="labels"):
        cimc.simulate(c, Dataset(data.x, None, "x"), drift="1s", instances=1, metric="auc")


def test_gdc_gain_pulls_the_factor_towards_one(detector: tuple[Path, Dataset]) -> None:  # type: ignore[no-untyped-def]
    from cimc.artifact import CompiledModel
    from cimc.runtime.simulator import Chip

    path, data = detector
    c = cimc.compile(path, "hermes", calibration=data)
    exact = Chip(c, 2, seed=3).at(86400.0)
    same = Chip(CompiledModel(c.model, c.target.with_overrides(**{"device.gdc_gain": 1.0}), c.cost), 2, 3).at(86400.0)
    half = Chip(CompiledModel(c.model, c.target.with_overrides(**{"device.gdc_gain": 0.5}), c.cost), 2, 3).at(86400.0)
    assert exact.gdc and set(exact.gdc) == set(half.gdc)
    for name, g in exact.gdc.items():
        assert torch.equal(same.gdc[name], g)  # the default is the exact factor, bit for bit
        assert torch.allclose(half.gdc[name], 1 + 0.5 * (g - 1))
        assert (g > 1).all()  # drift shrinks the conductances: the factor restores the magnitude
