"""Modelling choices behind the aihwkit comparison (output noise per conversion, tile rows), and the
aihwkit side-by-side checks themselves when aihwkit is importable (docs/fidelity.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cimc import builtin
from cimc.compiler import compile_model
from cimc.data import Dataset, load_dataset
from cimc.runtime.analog import LayerPlan, Tile, analog_mvm, onehot_response
from cimc.runtime.simulator import Chip, simulate
from cimc.targets import load_target

_REPO = Path(__file__).resolve().parents[1]


def test_output_noise_is_drawn_per_conversion_and_per_tile():
    # Zero inputs: the column sums are pure output noise. Two row tiles = two conversions per column.
    whole = LayerPlan("l", 8, 16, 1, [Tile(0, 0, 8, 0, 16)], None)
    split = LayerPlan("l", 8, 16, 1, [Tile(0, 0, 4, 0, 16), Tile(0, 4, 8, 0, 16)], None)
    cols = torch.zeros(1, 20_000, 1, 8)
    w = torch.ones(1, 1, 8, 16)
    gen = torch.Generator().manual_seed(0)
    sigma = torch.full((1, 16), 0.25)
    y1 = analog_mvm(whole, cols, w, out_noise=sigma, generator=gen)
    y2 = analog_mvm(split, cols, w, out_noise=sigma, generator=gen)
    assert float(y1.std()) == pytest.approx(0.25, rel=0.02)
    assert float(y2.std()) == pytest.approx(0.25 * np.sqrt(2), rel=0.02)
    assert torch.equal(analog_mvm(whole, cols, w), torch.zeros_like(y1))  # no noise unless asked


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset(builtin.mnist_test())


def test_chip_output_noise_unit_and_determinism(mnist: Dataset):
    calib = Dataset(mnist.x[-128:], mnist.y[-128:], "calib")
    target = load_target("aon-cim").with_overrides(**{"converters.output_noise": 0.05, "device.read_noise_scale": 0})
    compiled = compile_model(builtin.mnist_model(), target, calibration=calib)
    chip = Chip(compiled, 2, seed=3)
    for name, sigma in chip.out_noise.items():  # one device at g_max driven at full scale = x_max * max|W|
        plan = chip.plans[name]
        expected = 0.05 * plan.quant.x_max * float(chip.ideal[name].abs().max())
        assert torch.allclose(sigma, torch.full_like(sigma, expected))
    x, y = mnist.x[:40], mnist.y[:40]
    a = simulate(compiled, x, y, (1.0,), instances=2, seed=3, compare_gdc=False).data["series"][0]["points"]
    b = simulate(compiled, x, y, (1.0,), instances=2, seed=3, compare_gdc=False).data["series"][0]["points"]
    assert a == b
    quiet = compile_model(builtin.mnist_model(), target.with_overrides(**{"converters.output_noise": 0.0}),
                          calibration=calib)
    assert Chip(quiet, 2, seed=3).out_noise == {}


def test_onehot_readout_reads_each_row_through_its_own_tile():
    # No converters: row r of the readout is row r of the weights, each from its own tile (the other tile of
    # the row split is not converted, so it adds no noise: the noise std stays sigma, not sigma * sqrt(2)).
    n = 4000
    split = LayerPlan("l", 8, n, 1, [Tile(0, 0, 4, 0, n), Tile(0, 4, 8, 0, n)], None)
    w = torch.randn(1, 1, 8, n)
    assert torch.equal(onehot_response(split, w), w.reshape(1, 8, 1, n))
    noisy = onehot_response(split, w, out_noise=0.5, generator=torch.Generator().manual_seed(0))
    assert float((noisy - w.reshape(1, 8, 1, n)).std()) == pytest.approx(0.5, rel=0.02)


def test_gdc_readout_onehot_undercompensates_layers_with_wide_input_ranges(mnist: Dataset):
    # aihwkit's readout (input 1.0 in layer units, one quantised noisy read) against cimc's probe, on the same
    # chips: equal drift estimate where the DAC range is 1.0 (the first conv, pixels in [0, 1]), far too small
    # (under-compensation) where the range is ~4-5 (later convs: 1.0 is a fifth of full scale, its outputs
    # a few ADC steps, and output noise adds a drift-independent floor to the mean |output|).
    calib = Dataset(mnist.x[-128:], mnist.y[-128:], "calib")
    base = load_target("aon-cim")
    assert base.device.gdc_readout == "probe"
    factors = {}
    for readout in ("probe", "onehot"):
        compiled = compile_model(builtin.mnist_model(), base.with_overrides(**{"device.gdc_readout": readout}),
                                 calibration=calib)
        chip = Chip(compiled, 2, seed=3)
        factors[readout] = chip.at(31557600.0).gdc
        if readout == "onehot":  # same seed -> same factors, also for instance 1 simulated alone (a shard)
            again = Chip(compiled, 2, seed=3).at(31557600.0).gdc
            assert all(torch.equal(again[k], v) for k, v in factors[readout].items())
            alone = Chip(compiled, 1, seed=3, first_instance=1).at(31557600.0).gdc
            assert all(torch.equal(alone[k], v[1:]) for k, v in factors[readout].items())
            x_max = {name: plan.quant.x_max for name, plan in chip.plans.items()}
    for name, probe in factors["probe"].items():
        ratio = factors["onehot"][name] / probe
        if x_max[name] == 1.0:
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.1), name
        elif x_max[name] > 4.0:
            assert bool((ratio < 0.8).all()), (name, ratio)


# ------------------------------------------------------------------------------------------ with aihwkit
def _compare_module():
    spec = importlib.util.spec_from_file_location("aihwkit_compare", _REPO / "benchmarks" / "aihwkit_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_model_matches_aihwkit_pcm_like_noise_model():
    pytest.importorskip("aihwkit")
    pytest.importorskip("scipy")
    compare = _compare_module()
    rows = compare.device_ks(load_target("aon-cim"), devices=20_000, seed=1, levels=(0.1, 1.0), times_s=(86400.0,))
    assert len(rows) == 2 * 3
    for row in rows:  # same distributions: no KS test rejects at 0.1 %, and the means agree to 2 %
        assert row["p"] > 1e-3, row
        assert row["cimc_mean"] == pytest.approx(row["aihwkit_mean"], rel=0.02, abs=1e-3)


def test_aihwkit_settings_follow_the_target():
    pytest.importorskip("aihwkit")
    compare = _compare_module()
    target = load_target("aon-cim").with_overrides(dac_bits=6, adc_bits=6)
    rpu = compare.aihwkit_config(target, compare.VARIANTS["aihwkit-default"]["aihwkit"], gdc=True)
    assert rpu.forward.inp_res == pytest.approx(1 / 62) and rpu.forward.out_res == pytest.approx(1 / 62)
    assert rpu.noise_model.g_max == target.device.g_max_us and rpu.noise_model.t_0 == target.device.t0_s
    assert "GlobalDriftCompensation" in compare.describe_aihwkit(rpu)


def test_aihwkit_probe_readout_matches_the_exact_drift_factor():
    # The benchmark's aligned-gdc setting: aihwkit's tiles compute cimc's probe estimate, so their alpha is
    # the exact ratio of mean |probe . W| programmed / drifted, where aihwkit's own readout is far below it.
    pytest.importorskip("aihwkit")
    compare = _compare_module()
    torch.manual_seed(0)
    model = compare.MnistCnn().eval()
    target = load_target("aon-cim")
    ranges = [(1.0, 4.0), (8.0, 8.0), (8.0, 8.0), (40.0, 4.0)]  # wide DAC ranges after the first layer
    alphas = {}
    for variant in ("aligned", "aligned-gdc"):
        analog, _ = compare.aihwkit_analog(model, target, compare.VARIANTS[variant]["aihwkit"], True, True, ranges)
        torch.manual_seed(0)
        analog.program_analog_weights()
        analog.drift_analog_weights(31557600.0)
        alphas[variant] = {name: float(tile.alpha) for name, tile in analog.named_analog_tiles()}
    for name, alpha in alphas["aligned-gdc"].items():
        assert 1.6 < alpha < 2.6, (name, alpha)  # ~2x after a year at these levels
    for name, alpha in alphas["aligned"].items():  # aihwkit's own readout: right only at full-scale input
        ratio = alpha / alphas["aligned-gdc"][name]
        assert (0.9 < ratio < 1.1) if name.startswith("conv1") else ratio < (0.7 if name.startswith("fc2") else 0.95), \
            (name, ratio)
