"""Tests of the PCM device model against the formulas of the IBM statistical model (HARDWARE.md).

Expected values are computed here from the published formulas, independently of runtime/devices.py, and
compared with statistics of 1e5-2e5 sampled devices.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from cimc.runtime.devices import (
    DeviceModel,
    IdealDevice,
    PCMDevice,
    ProgrammedArray,
    build_device,
    conductances_to_weights,
    device_model_names,
    gdc_factor,
    register_device_model,
    weights_to_conductances,
)

from cimc.errors import InputError, TargetError

T_24H_S = 86400.0


@dataclasses.dataclass(frozen=True)
class PCMTestParams:
    """Same field names and defaults as the target schema's pcm-ibm device section."""

    model: str = "pcm-ibm"
    g_max_us: float = 25.0
    t0_s: float = 20.0
    t_read_s: float = 250e-9
    prog_noise_coeffs_us: tuple[float, float, float] = (0.26348, 1.9650, -1.1731)
    prog_noise_scale: float = 1.0
    drift_nu_mean_coeffs: tuple[float, float] = (-0.0155, 0.0244)
    drift_nu_mean_range: tuple[float, float] = (0.049, 0.1)
    drift_nu_std_coeffs: tuple[float, float] = (-0.0125, -0.0059)
    drift_nu_std_range: tuple[float, float] = (0.008, 0.045)
    drift_scale: float = 1.0
    read_noise_q_coeff: float = 0.0088
    read_noise_q_exponent: float = 0.65
    read_noise_q_max: float = 0.2
    read_noise_scale: float = 1.0
    g_min_clip: float = 1e-7
    gdc: str = "layer"
    weight_scale: str = "layer"


@dataclasses.dataclass(frozen=True)
class IdealTestParams:
    model: str = "ideal"
    g_max_us: float = 25.0


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pcm() -> PCMDevice:
    device = build_device(PCMTestParams())
    assert isinstance(device, PCMDevice)
    return device


# ---- reference formulas, written out from HARDWARE.md ----------------------------------------------------


def sigma_prog_ref_us(g_rel: float, g_max_us: float = 25.0) -> float:
    return (0.26348 + 1.9650 * g_rel - 1.1731 * g_rel**2) * g_max_us / 25.0


def nu_normal_ref(g_rel: float) -> tuple[float, float]:
    log_g = math.log(max(g_rel, 1e-7))
    mu = min(max(-0.0155 * log_g + 0.0244, 0.049), 0.1)
    sd = min(max(-0.0125 * log_g - 0.0059, 0.008), 0.045)
    return mu, sd


def folded_normal_mean_std(mu: float, sd: float) -> tuple[float, float]:
    """Mean and std of |X|, X ~ N(mu, sd^2)."""
    phi = 0.5 * (1.0 + math.erf(-mu / (sd * math.sqrt(2.0))))  # P(X < 0)
    mean = sd * math.sqrt(2.0 / math.pi) * math.exp(-(mu**2) / (2 * sd**2)) + mu * (1.0 - 2.0 * phi)
    return mean, math.sqrt(mu**2 + sd**2 - mean**2)


def read_sigma_rel_ref(g_prog_us: torch.Tensor, t_s: float) -> torch.Tensor:
    q_s = (0.0088 / ((g_prog_us / 25.0) ** 0.65).clamp(min=1e-3)).clamp(max=0.2)
    return q_s * math.sqrt(math.log((t_s + 20.0 + 250e-9) / (2 * 250e-9)))


# ---- programming noise ----------------------------------------------------------------------------------


def test_sigma_prog_formula_values(pcm: PCMDevice) -> None:
    g_us = torch.tensor([0.0, 12.5, 25.0], dtype=torch.float64)
    expected = [sigma_prog_ref_us(g) for g in (0.0, 0.5, 1.0)]
    assert pcm.prog_sigma_us(g_us).tolist() == pytest.approx(expected, rel=1e-9)
    # g_max = 50 uS scales sigma by 50/25 at the same relative level.
    pcm50 = build_device(PCMTestParams(g_max_us=50.0))
    assert float(pcm50.prog_sigma_us(torch.tensor(50.0))) == pytest.approx(
        2 * sigma_prog_ref_us(1.0), rel=1e-6
    )


@pytest.mark.parametrize("g_rel", [0.1, 0.3, 0.6, 1.0])
def test_programming_noise_mean_and_std(pcm: PCMDevice, g_rel: float) -> None:
    n = 100_000
    programmed = pcm.program(torch.full((n,), 25.0 * g_rel), instances=1, generator=gen(1))
    g = programmed.g_prog_us.double()
    sigma = sigma_prog_ref_us(g_rel)
    # At g >= 0.1 the target is > 5 sigma above 0, so clipping does not bias the moments.
    assert abs(float(g.mean()) - 25.0 * g_rel) < 5 * sigma / math.sqrt(n)
    assert float(g.std()) == pytest.approx(sigma, rel=0.02)


# ---- drift exponent ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("g_rel", [0.0, 1e-3, 0.05, 0.3, 1.0])
def test_drift_exponent_is_folded_normal(pcm: PCMDevice, g_rel: float) -> None:
    n = 100_000
    programmed = pcm.program(torch.full((n,), 25.0 * g_rel), instances=1, generator=gen(2))
    assert programmed.nu is not None
    nu = programmed.nu.double()
    mean_ref, std_ref = folded_normal_mean_std(*nu_normal_ref(g_rel))
    assert bool((nu >= 0).all())
    assert abs(float(nu.mean()) - mean_ref) < 5 * std_ref / math.sqrt(n)
    assert float(nu.std()) == pytest.approx(std_ref, rel=0.03)


def test_drift_exponent_drawn_once_and_scaled() -> None:
    base = build_device(PCMTestParams()).program(torch.full((1000,), 10.0), 2, gen(3))
    doubled = build_device(PCMTestParams(drift_scale=2.0)).program(torch.full((1000,), 10.0), 2, gen(3))
    assert base.nu is not None and doubled.nu is not None
    assert base.nu.shape == (2, 1000)
    torch.testing.assert_close(doubled.nu, 2.0 * base.nu)


# ---- drift and read noise at 24 h ---------------------------------------------------------------------------


def test_mean_conductance_after_24h_is_066(pcm: PCMDevice) -> None:
    n = 200_000
    programmed = pcm.program(torch.full((n,), 25.0), instances=1, generator=gen(4))
    ratio = float(programmed.read(T_24H_S, gen(5)).double().mean()) / 25.0
    assert ratio == pytest.approx(0.66, abs=0.01)  # HARDWARE.md figure
    # Exact expectation: nu ~ N(0.049, 0.008) (no folding at 6 sigma), E[x^-nu] is lognormal.
    log_x = math.log((T_24H_S + 20.0) / 20.0)
    expected = math.exp(-0.049 * log_x + 0.5 * (0.008 * log_x) ** 2)
    assert ratio == pytest.approx(expected, rel=0.003)


def test_read_noise_after_24h_is_45_percent_at_gmax(pcm: PCMDevice) -> None:
    n = 200_000
    programmed = pcm.program(torch.full((n,), 25.0), instances=1, generator=gen(6))
    assert programmed.nu is not None
    g_read = programmed.read(T_24H_S, gen(7)).double()
    g_prog = programmed.g_prog_us.double()
    g_drift = g_prog * ((T_24H_S + 20.0) / 20.0) ** (-programmed.nu.double())
    rel = g_read / g_drift - 1.0
    assert float(rel.std()) == pytest.approx(0.045, abs=0.002)  # HARDWARE.md figure


@pytest.mark.parametrize("g_rel", [0.1, 0.3, 1.0])
def test_read_noise_follows_q_s_of_programmed_conductance(pcm: PCMDevice, g_rel: float) -> None:
    n = 100_000
    programmed = pcm.program(torch.full((n,), 25.0 * g_rel), instances=1, generator=gen(38))
    assert programmed.nu is not None
    g_prog = programmed.g_prog_us.double()
    g_drift = g_prog * ((T_24H_S + 20.0) / 20.0) ** (-programmed.nu.double())
    sigma_ref = read_sigma_rel_ref(g_prog, T_24H_S)
    keep = sigma_ref < 0.25  # devices far (> 4 sigma) from the clip at 0, which would truncate the noise
    rel = programmed.read(T_24H_S, gen(39)).double()[keep] / g_drift[keep] - 1.0
    z = rel / sigma_ref[keep]
    assert z.numel() > 5000
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel())
    assert float(z.std()) == pytest.approx(1.0, rel=0.01)


def test_read_sigma_formula_incl_cap_at_low_conductance(pcm: PCMDevice) -> None:
    g_prog_us = torch.tensor([0.0, 1e-4, 0.1, 2.5, 25.0, 30.0], dtype=torch.float64)
    for t_s in (0.0, 1.0, T_24H_S):
        ours = pcm.read_sigma_rel(g_prog_us, t_s)
        torch.testing.assert_close(ours, read_sigma_rel_ref(g_prog_us, t_s))
    # Q_s is capped at 0.2 for the lowest conductances.
    assert float(pcm.read_sigma_rel(g_prog_us, T_24H_S)[0]) == pytest.approx(
        0.2 * math.sqrt(math.log((T_24H_S + 20.0 + 250e-9) / 500e-9))
    )


def test_read_noise_right_after_programming(pcm: PCMDevice) -> None:
    programmed = pcm.program(torch.full((100_000,), 25.0), instances=1, generator=gen(8))
    rel = programmed.read(0.0, gen(9)).double() / programmed.g_prog_us.double() - 1.0
    expected = float(read_sigma_rel_ref(torch.tensor(25.0, dtype=torch.float64), 0.0))
    assert expected == pytest.approx(0.0368, abs=5e-4)
    assert float(rel.std()) == pytest.approx(expected, rel=0.03)


def test_reads_at_several_times_drift_the_same_devices() -> None:
    quiet = build_device(PCMTestParams(read_noise_scale=0.0))
    programmed = quiet.program(torch.linspace(0.5, 25.0, 500), instances=3, generator=gen(10))
    assert programmed.nu is not None
    times = [0.0, 1.0, 3600.0, T_24H_S, 3.15e7]
    reads = [programmed.read(t, gen(11 + i)) for i, t in enumerate(times)]
    torch.testing.assert_close(reads[0], programmed.g_prog_us)
    for earlier, later in itertools.pairwise(reads):
        assert bool((later <= earlier).all())
    # Per device: ln(G(t2)/G(t1)) = -nu * ln((t2 + t0) / (t1 + t0)) with the nu drawn at programming.
    positive = reads[0] > 1e-3
    log_ratio = torch.log(reads[3][positive] / reads[2][positive]).double()
    expected = -programmed.nu[positive].double() * math.log((T_24H_S + 20.0) / (3600.0 + 20.0))
    torch.testing.assert_close(log_ratio, expected, rtol=1e-4, atol=1e-5)


# ---- clipping, determinism, validation -------------------------------------------------------------------


def test_zero_targets_clip_at_zero(pcm: PCMDevice) -> None:
    programmed = pcm.program(torch.zeros(100_000), instances=1, generator=gen(12))
    g_prog = programmed.g_prog_us
    assert bool((g_prog >= 0).all())
    # sigma_prog(0) > 0, so about half the devices clip to exactly 0 uS.
    assert float((g_prog == 0).double().mean()) == pytest.approx(0.5, abs=0.01)
    loud = build_device(PCMTestParams(read_noise_scale=50.0))
    reads = loud.program(torch.full((10_000,), 5.0), 1, gen(13)).read(T_24H_S, gen(14))
    assert float(reads.min()) == 0.0
    assert float((reads == 0).double().mean()) > 0.05


def test_same_seed_identical_different_seed_differs(pcm: PCMDevice) -> None:
    targets = torch.rand(64, 32, generator=gen(15)) * 25.0

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = gen(seed)
        programmed = pcm.program(targets, instances=4, generator=g)
        return programmed.g_prog_us, programmed.read(3600.0, g)

    (a_prog, a_read), (b_prog, b_read), (c_prog, c_read) = run(21), run(21), run(22)
    assert a_read.dtype == torch.float32 and a_read.shape == (4, 64, 32)
    assert torch.equal(a_prog, b_prog) and torch.equal(a_read, b_read)
    assert not torch.equal(a_prog, c_prog) and not torch.equal(a_read, c_read)
    # Instances are independent draws, not copies.
    assert not torch.equal(a_prog[0], a_prog[1])


def test_invalid_time_instances_and_targets(pcm: PCMDevice) -> None:
    programmed = pcm.program(torch.full((10,), 5.0), 1, gen())
    with pytest.raises(InputError, match="read time"):
        programmed.read(-1.0, gen())
    with pytest.raises(InputError, match="instances"):
        pcm.program(torch.full((10,), 5.0), 0, gen())
    with pytest.raises(InputError, match=">= 0 uS"):
        pcm.program(torch.tensor([-1.0, 2.0]), 1, gen())


# ---- ideal device and the registry ---------------------------------------------------------------------------


def test_ideal_device_is_exact() -> None:
    ideal = build_device(IdealTestParams())
    assert isinstance(ideal, IdealDevice)
    targets = torch.rand(16, 8, generator=gen(16)) * 25.0
    programmed = ideal.program(targets, instances=3, generator=gen(17))
    for t_s in (0.0, T_24H_S, 3.15e7):
        read = programmed.read(t_s, gen(18))
        assert read.shape == (3, 16, 8)
        assert torch.equal(read, targets.expand(3, 16, 8))
    w = torch.randn(16, 8, generator=gen(19))
    torch.testing.assert_close(ideal.program_weights(w, 2, gen()).read(T_24H_S, gen())[1], w)


def test_registry_builds_user_models_and_rejects_unknown() -> None:
    @register_device_model("test-stuck-at-gmax")
    class StuckDevice(DeviceModel):
        def program(self, g_target_us, instances, generator):  # type: ignore[no-untyped-def]
            g = torch.full((instances, *g_target_us.shape), self.g_max_us)
            return ProgrammedArray(g_target_us=g_target_us, g_prog_us=g, nu=None, device=self)

        def read_programmed(self, programmed, t_s, generator):  # type: ignore[no-untyped-def]
            return programmed.g_prog_us

    assert "test-stuck-at-gmax" in device_model_names()
    device = build_device(IdealTestParams(model="test-stuck-at-gmax", g_max_us=7.0))
    assert isinstance(device, StuckDevice)
    assert float(device.program(torch.zeros(3), 2, gen()).read(1.0, gen()).max()) == 7.0
    with pytest.raises(TargetError, match="unknown device model 'memristor-x'"):
        build_device(IdealTestParams(model="memristor-x"))
    with pytest.raises(TargetError, match="missing field"):
        build_device(IdealTestParams(model="pcm-ibm"))
    with pytest.raises(TargetError, match="gdc"):
        build_device(PCMTestParams(gdc="row"))
    with pytest.raises(TargetError, match="g_max_us"):
        build_device(PCMTestParams(g_max_us=0.0))


# ---- weights <-> conductances ------------------------------------------------------------------------------


@pytest.mark.parametrize("per_column", [False, True])
def test_weights_conductances_round_trip(per_column: bool) -> None:
    w = torch.randn(3, 40, 12, generator=gen(20))  # 3 matrices of K=40 x N=12
    w[0, :, 5] = 0.0  # an all-zero column must not produce nan
    g_pos, g_neg, scale = weights_to_conductances(w, 25.0, per_column=per_column)
    assert scale.shape == ((3, 1, 12) if per_column else (3, 1, 1))
    assert bool((g_pos >= 0).all() and (g_neg >= 0).all())
    assert bool(((g_pos > 0) == (w > 0)).all() and ((g_neg > 0) == (w < 0)).all())
    assert float((g_pos * g_neg).abs().max()) == 0.0  # one device of each pair stays at 0 uS
    g_max_seen = torch.maximum(g_pos, g_neg).amax(dim=(-2,) if per_column else (-2, -1))
    nonzero = g_max_seen > 0
    torch.testing.assert_close(g_max_seen[nonzero], torch.full_like(g_max_seen[nonzero], 25.0))
    torch.testing.assert_close(conductances_to_weights(g_pos, g_neg, scale), w)


# ---- programmed weights, GDC, training noise ------------------------------------------------------------------


def test_program_layers_batches_several_layers(pcm: PCMDevice) -> None:
    weights = {"conv": torch.randn(90, 16, generator=gen(23)), "fc": torch.randn(2, 16, 4, generator=gen(24))}
    programmed = pcm.program_layers(weights, instances=5, generator=gen(25))
    assert programmed.array.g_prog_us.shape == (5, 2 * (90 * 16 + 2 * 16 * 4))
    read = programmed.read(0.0, gen(26))
    assert read["conv"].shape == (5, 90, 16) and read["fc"].shape == (5, 2, 16, 4)
    for name, w in weights.items():
        # Right after programming the weights are the targets plus a few % of max|w| of noise.
        err = (read[name] - w).std() / w.abs().max()
        assert 0.01 < float(err) < 0.1


@pytest.mark.parametrize("per_column", [False, True])
def test_gdc_restores_output_magnitude_after_24h(pcm: PCMDevice, per_column: bool) -> None:
    w = torch.randn(128, 32, generator=gen(27)) * torch.linspace(0.2, 2.0, 32)  # columns of different scale
    x_cal = torch.rand(64, 128, generator=gen(28))
    x_eval = torch.rand(256, 128, generator=gen(29))
    programmed = pcm.program_weights(w, instances=8, generator=gen(30), per_column=per_column)
    w_0, w_t = programmed.read(0.0, gen(31)), programmed.read(T_24H_S, gen(32))
    factor = gdc_factor(x_cal @ w_0, x_cal @ w_t, per_column=per_column)
    assert factor.shape == ((8, 1, 32) if per_column else (8, 1, 1))
    ideal_mag = float((x_eval @ w).abs().mean())
    drifted_mag = float((x_eval @ w_t).abs().mean())
    compensated_mag = float((x_eval @ w_t * factor).abs().mean())
    assert drifted_mag / ideal_mag < 0.8  # drift alone loses about a third of the signal
    assert compensated_mag / ideal_mag == pytest.approx(1.0, abs=0.03)


def test_gdc_factor_shapes_and_values() -> None:
    ref = torch.ones(2, 5, 3)
    drifted = torch.ones(2, 5, 3) * torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(gdc_factor(ref, drifted, per_column=True)[0, 0], torch.tensor([2.0, 1.0, 0.5]))
    torch.testing.assert_close(gdc_factor(ref, drifted).flatten(), torch.full((2,), 3.0 / 3.5))


def test_matches_aihwkit_pcm_like_noise_model(pcm: PCMDevice) -> None:
    try:
        from aihwkit.inference import PCMLikeNoiseModel  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("aihwkit is not installed (optional cross-check; it needs a C++ build)")
    n = 100_000
    g_target = torch.full((n,), 20.0)
    reference = PCMLikeNoiseModel(g_max=25.0)
    torch.manual_seed(0)
    ref_prog = reference.apply_programming_noise_to_conductance(g_target.clone())
    ref_nu = reference.generate_drift_coefficients(g_target.clone())
    ref_read = reference.apply_drift_noise_to_conductance(ref_prog, ref_nu, T_24H_S)
    ours = pcm.program(g_target, 1, gen(36))
    our_read = ours.read(T_24H_S, gen(37))[0]
    for a, b in ((ref_prog, ours.g_prog_us[0]), (ref_read, our_read)):
        assert float(b.mean()) == pytest.approx(float(a.mean()), rel=0.005)
        assert float(b.std()) == pytest.approx(float(a.std()), rel=0.03)


def test_builds_from_the_target_schema() -> None:
    try:
        from cimc.targets.devices import IdealDevice as IdealSchema
        from cimc.targets.devices import PcmIbmDevice
    except ImportError:
        pytest.skip("the target schema (cimc.targets.devices) is not available")
    schema_params = PcmIbmDevice(g_max_us=25.0)
    device = build_device(schema_params)
    assert isinstance(device, PCMDevice)
    # The schema's defaults are the constants these tests check against.
    for f in dataclasses.fields(PCMTestParams):
        assert getattr(schema_params, f.name) == getattr(PCMTestParams(), f.name), f.name
    targets = torch.rand(200, generator=gen(40)) * 25.0
    ours = device.program(targets, 2, gen(41)).read(T_24H_S, gen(42))
    reference = build_device(PCMTestParams()).program(targets, 2, gen(41)).read(T_24H_S, gen(42))
    assert torch.equal(ours, reference)
    assert isinstance(build_device(IdealSchema(g_max_us=25.0)), IdealDevice)
