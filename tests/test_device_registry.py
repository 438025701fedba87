"""A device model added in one place: this file defines one, registers it once, compiles and simulates with it.

``LognormalDriftDevice`` is a made-up technology (lognormal programming noise, one drift exponent shared by
every device). Everything cimc needs from it is in the class below: its target-file parameters (``Params``)
and its behaviour (``program``, ``read_programmed``). No other file knows its name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
import yaml
from pydantic import Field

import cimc
from cimc.data import Dataset
from cimc.errors import TargetError
from cimc.runtime.devices import DeviceModel, Generators, ProgrammedArray, randn_instances, register_device_model
from cimc.targets import DeviceParamsBase, device_models, load_target
from tests.models import export_onnx


@register_device_model("test-lognormal-drift")
class LognormalDriftDevice(DeviceModel):
    """G_prog = G_target · exp(σ·z); G(t) = G_prog · ((t + t0) / t0)^(−ν), one ν for every device."""

    class Params(DeviceParamsBase):
        model: Literal["test-lognormal-drift"] = "test-lognormal-drift"
        sigma_log: float = Field(0.0, ge=0, description="σ of ln G after programming (made up)")
        nu: float = Field(0.0, ge=0, description="drift exponent shared by all devices (made up)")
        t0_s: float = Field(1.0, gt=0, description="drift reference time, s")
        gdc: Literal["layer", "column", "none"] = Field("none", description="global drift compensation")

    def program(self, g_target_us: torch.Tensor, instances: int, generator: Generators) -> ProgrammedArray:
        g = g_target_us.to(torch.float32)
        z = randn_instances((instances, *g.shape), generator, g.dtype)
        g_prog = g * torch.exp(float(self.params.sigma_log) * z)
        return ProgrammedArray(g_target_us=g, g_prog_us=g_prog, nu=None, device=self)

    def read_programmed(self, programmed: ProgrammedArray, t_s: float, generator: Generators) -> torch.Tensor:
        p = self.params
        return programmed.g_prog_us * math.exp(-float(p.nu) * math.log((t_s + p.t0_s) / p.t0_s))


def _target(tmp_path: Path, **device: Any) -> Path:
    path = tmp_path / f"lognormal-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"base": "aon-cim", "device": {"model": "test-lognormal-drift", **device}}))
    return path


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10)).eval()
    path = export_onnx(net, torch.randn(1, 32), tmp_path_factory.mktemp("dev") / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    return path, Dataset(x, None, "x")


def _cosine(model: Path, data: Dataset, target: Path, drift: str) -> list[float]:
    compiled = cimc.compile(model, str(target))
    result = cimc.simulate(compiled, data, drift=drift, instances=2, seed=3, compare_gdc=False)
    assert result.data["metric"] == "cosine"
    return [p["mean"] for p in result.data["series"][0]["points"]]


def test_the_target_schema_knows_the_new_model(tmp_path: Path) -> None:
    assert "test-lognormal-drift" in device_models()
    target = load_target(_target(tmp_path, sigma_log=0.1, g_max_us=40.0))
    assert isinstance(target.device, LognormalDriftDevice.Params)
    assert (target.device.sigma_log, target.device.g_max_us) == (0.1, 40.0)
    with pytest.raises(TargetError, match="sigma_lg"):  # its own fields are checked like a built-in's
        load_target(_target(tmp_path, sigma_lg=0.1))


def test_compile_and_simulate_with_the_new_model(model_and_data: tuple[Path, Dataset], tmp_path: Path) -> None:
    model, data = model_and_data
    exact = _cosine(model, data, _target(tmp_path), "1s,1y")
    assert exact == pytest.approx([1.0, 1.0], abs=1e-5)  # no noise, no drift: the float model
    noisy = _cosine(model, data, _target(tmp_path, sigma_log=0.3), "1s")
    assert 0.5 < noisy[0] < 0.995  # programming noise costs agreement
    assert _cosine(model, data, _target(tmp_path, sigma_log=0.3), "1s") == noisy  # same seed, same chips
    # A drift exponent shared by every device scales each layer's analog output by one factor over time: the
    # layer's global drift compensation undoes it exactly; without compensation the outputs shrink against the
    # digital biases (measured under load: relative error 0.13 at 1 s, 0.95 at 1 y).
    compiled = cimc.compile(model, str(_target(tmp_path, nu=0.1, gdc="none")))
    result = cimc.simulate(compiled, data, drift="1s,1y", instances=1, seed=3, compare_gdc=False)
    relerr = [p["relerr"] for p in result.data["series"][0]["points"]]
    assert relerr[1] > relerr[0] + 0.5
    compensated = cimc.compile(model, str(_target(tmp_path, nu=0.1, gdc="layer")))
    result = cimc.simulate(compensated, data, drift="1s,1y", instances=1, seed=3, compare_gdc=False)
    relerr = [p["relerr"] for p in result.data["series"][0]["points"]]
    assert relerr == pytest.approx([0.0, 0.0], abs=1e-4)
