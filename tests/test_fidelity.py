"""Modelling choices behind the aihwkit comparison (output noise per conversion, tile rows).

The side-by-side checks against aihwkit itself need aihwkit, which CI does not build: they are
``python benchmarks/aihwkit_compare.py --part checks`` (docs/fidelity.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cimc import builtin
from cimc.compiler import compile_model
from cimc.data import Dataset, load_dataset
from cimc.runtime.analog import LayerPlan, Tile, analog_mvm, onehot_response
from cimc.runtime.simulator import Chip, simulate
from cimc.targets import load_target


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
