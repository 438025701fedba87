"""Target schema: the typed, frozen description of a CIM accelerator.

One target file drives both the noise model (``device``) and the cost model (array geometry, converters,
array read, digital unit, SRAM, clock, execution mode). Every numeric field carries its unit in its name and a
description that says where the default comes from ("HARDWARE.md: ..." or "assumed"); preset YAML files
repeat the source of each value in a comment.

Quantisation off: ``dac_bits`` / ``adc_bits`` set to ``null`` (or ``0``, normalised to ``None``) mean "no
quantisation" - the converter is ideal and costs no time and no energy in the cost model.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .devices import _DEPENDENTS, DeviceParams, DeviceParamsBase

__all__ = [
    "ActivityDefaults",
    "ArrayConfig",
    "ArrayReadConfig",
    "ConverterConfig",
    "DigitalConfig",
    "SramConfig",
    "Target",
]

logger = logging.getLogger(__name__)

# allow_inf_nan=False: a target number is finite (pydantic's floats take inf and NaN by default).
_FROZEN = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

# Upper bounds that keep every time, energy and noise formula of the cost model and the simulator finite
# (sums over millions of conversions stay far below float64's range and noise far below float32's), while
# leaving orders of magnitude of room above any real chip.
_MAX_TIME_S = 1.0  # one conversion, pulse or settle
_MAX_ENERGY_J = 1e-3  # one conversion, op, byte or MVM
_MAX_POWER_W = 1e3
_MAX_DIM = 8192  # rows or device columns of one array (an export writes rows x cols conductances)
_MAX_COUNT = 1 << 20  # arrays, ADCs, ops per cycle


class ArrayConfig(BaseModel):
    """Crossbar geometry: devices per array, devices per weight, number of arrays (cores)."""

    model_config = _FROZEN

    rows: int = Field(gt=0, le=_MAX_DIM, description="Word lines (analog inputs) per array")
    cols: int = Field(gt=0, le=_MAX_DIM, description="Device columns (bit lines) per array")
    devices_per_weight: int = Field(
        2,
        ge=1,
        le=2,
        description="Devices per weight: 2 = differential pair G+ - G- (HARDWARE.md), 1 = single",
    )
    count: int | None = Field(
        1, ge=1, le=_MAX_COUNT,
        description="Number of arrays (cores); null = as many as the model needs (ideal target)"
    )

    @model_validator(mode="after")
    def _cols_hold_whole_weights(self) -> ArrayConfig:
        if self.cols % self.devices_per_weight:
            raise ValueError(
                f"cols ({self.cols}) must be a multiple of devices_per_weight ({self.devices_per_weight})"
            )
        return self

    @property
    def weight_cols(self) -> int:
        """Weight columns per array (device columns / devices per weight)."""
        return self.cols // self.devices_per_weight

    @property
    def weights_per_array(self) -> int:
        """Weights one array holds."""
        return self.rows * self.weight_cols


class ConverterConfig(BaseModel):
    """Input DACs (one per row) and output ADCs (shared by columns), with time and energy laws.

    Per-conversion time and energy are given at ``reference_bits`` and scaled to the configured bit width by
    ``energy_scaling``: ``exp2`` multiplies by 2^(bits - reference_bits) (ramp / pulse-width / counting
    converters, HARDWARE.md: assumed), ``linear`` by bits / reference_bits (SAR-like). One conversion per
    weight column: the differential pair is subtracted in the current domain before the ADC (assumed).
    """

    model_config = _FROZEN

    dac_bits: int | None = Field(
        8,
        ge=2,
        le=16,
        description="Input (DAC) resolution in bits, 2..16 (a signed 1-bit converter has no level but 0); "
        "null/0 = no quantisation, DAC ideal and free",
    )
    adc_bits: int | None = Field(
        8,
        ge=2,
        le=16,
        description="Output (ADC) resolution in bits, 2..16 (signed: 2^(bits-1) - 1 levels each side); "
        "null/0 = no quantisation, ADC ideal and free",
    )
    reference_bits: int = Field(
        8, ge=1, le=16, description="Bit width at which the *_ref_s / *_ref_j values apply"
    )
    energy_scaling: Literal["exp2", "linear"] = Field(
        "exp2", description="How converter time and energy scale with bits (HARDWARE.md: assumed 2^bits)"
    )
    dac_time_ref_s: float = Field(
        256e-9,
        ge=0, le=_MAX_TIME_S,
        description="Full-scale DAC pulse (= array integration time) at reference bits, s (assumed)",
    )
    dac_energy_ref_j: float = Field(
        50e-15, ge=0, le=_MAX_ENERGY_J, description="Energy of one row-driver conversion at reference bits, J (assumed)"
    )
    adc_count: int = Field(
        gt=0, le=_MAX_COUNT, description="ADCs per array; columns beyond this are converted in turns"
    )
    adc_time_ref_s: float = Field(
        256e-9,
        ge=0,
        le=_MAX_TIME_S,
        description="One ADC conversion at reference bits, s (assumed: ramp, 1 ns per LSB)",
    )
    adc_energy_ref_j: float = Field(
        52e-15,
        ge=0, le=_MAX_ENERGY_J,
        description="ADC energy per conversion at reference bits, J (HARDWARE.md: ~52 fJ at 8 bits)",
    )
    adc_sense_energy_ref_j: float = Field(
        52e-15,
        ge=0, le=_MAX_ENERGY_J,
        description="Column current / sense energy per conversion at reference bits, J "
        "(HARDWARE.md: about as much again as the ADC)",
    )
    adc_power_w: float = Field(
        0.0,
        ge=0, le=_MAX_POWER_W,
        description="Power of one column converter while it runs, W. It runs for its own conversion "
        "(adc_time_ref_s at adc_bits) after the input pulse, or for the whole integration window "
        "(max(pulse, conversion)) when adc_during_integration: a current-controlled oscillator integrates by "
        "oscillating, a passive integration capacitor draws nothing",
    )
    adc_during_integration: bool = Field(
        False, description="ADC converts while the input pulse is applied (CCO counting) instead of after it"
    )
    adc_gain: Literal["layer", "column"] = Field(
        "layer", description="ADC gain granularity: one fixed gain per layer (AON-CIM) or per column"
    )
    output_noise: float = Field(
        0.0,
        ge=0, le=100.0,
        description="Std of the additive analog noise on every column sum before its ADC, drawn per conversion, "
        "in units of the output of one device at g_max driven at the DAC's full scale (aihwkit forward.out_noise "
        "uses the same unit; its default is 0.06)",
    )
    mvm_phases: int = Field(
        1,
        ge=1,
        le=16,
        description="Integrate-and-convert phases per MVM (HERMES: 1 = one-phase, 4 = four-phase mode); "
        "each phase repeats the input pulse and the conversions",
    )

    @field_validator("dac_bits", "adc_bits", mode="before")
    @classmethod
    def _zero_means_off(cls, value: Any) -> Any:
        # 0 and null both mean "quantisation off"; store one spelling so code tests `is None` only.
        return None if value == 0 else value

    def scale(self, bits: int | None) -> float:
        """Factor applied to a *_ref value at ``bits``; 0 when the converter is off (ideal, free)."""
        if bits is None:
            return 0.0
        if self.energy_scaling == "exp2":
            return 2.0 ** (bits - self.reference_bits)
        return bits / self.reference_bits


class ArrayReadConfig(BaseModel):
    """Analog read of the crossbar.

    An active device draws ``device_power_w`` while its input pulse is on, so one MVM costs
    ``device_power_w · pulse_s · mean_input_magnitude`` per active device. A lumped figure: Ohm's law alone
    gives V_read² · G_mean (0.2 V, 2.5 µS: 0.1 µW); bit-line charging and column bias come on top.
    """

    model_config = _FROZEN

    device_power_w: float = Field(
        0.1e-6,
        ge=0, le=_MAX_POWER_W,
        description="Mean power of one active device during its pulse, W (assumed: V_read²·G_mean)",
    )
    settle_time_s: float = Field(
        10e-9, ge=0, le=_MAX_TIME_S, description="Fixed per-MVM precharge / integrator reset time, s (assumed)"
    )
    column_energy_j: float = Field(
        0.0,
        ge=0, le=_MAX_ENERGY_J,
        description="Fixed energy per active column per MVM that does not scale with the converter bits "
        "(bit-line precharge, integrator reset, read-out latch), J",
    )
    mvm_energy_j: float = Field(
        0.0,
        ge=0, le=_MAX_ENERGY_J,
        description="Fixed energy per tile per MVM (row decoders, sequencing, clock tree of the array), J",
    )


class DigitalConfig(BaseModel):
    """Digital unit: post-processing of ADC outputs and the non-analog ops (ReLU, pooling, ...)."""

    model_config = _FROZEN

    ops_per_cycle: int = Field(16, gt=0, le=_MAX_COUNT, description="Arithmetic ops per clock cycle (assumed)")
    energy_per_op_j: float = Field(
        0.1e-12, ge=0, le=_MAX_ENERGY_J, description="Energy per 8-16-bit arithmetic op, J (assumed)"
    )
    postprocess_ops_per_output: int = Field(
        2, ge=0, le=1000, description="Ops per ADC output for scale and bias (assumed: one multiply, one add)"
    )
    per_array: bool = Field(
        False, description="One digital unit per array/core (ops_per_cycle each) instead of one shared unit"
    )
    overlapped: bool = Field(
        False, description="Post-processing of an MVM overlaps the next MVM's analog phase (double-buffered)"
    )


class SramConfig(BaseModel):
    """Activation SRAM: inputs read before each MVM, outputs written after."""

    model_config = _FROZEN

    size_bytes: int | None = Field(
        65536, ge=1, le=1 << 50, description="Activation SRAM capacity, bytes; null = unbounded (assumed)"
    )
    read_energy_per_byte_j: float = Field(
        0.1e-12, ge=0, le=_MAX_ENERGY_J, description="SRAM read energy per byte, J (assumed)"
    )
    write_energy_per_byte_j: float = Field(
        0.12e-12, ge=0, le=_MAX_ENERGY_J, description="SRAM write energy per byte, J (assumed)"
    )


class ActivityDefaults(BaseModel):
    """Input statistics the static cost estimate assumes; measured activity replaces them in simulation."""

    model_config = _FROZEN

    input_density: float = Field(
        1.0, ge=0, le=1, description="Fraction of non-zero DAC inputs (drives DAC energy) (assumed)"
    )
    mean_input_magnitude: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Mean |x| / full scale over all inputs: fraction of the full pulse a row conducts (assumed)",
    )


# Device parameters (targets/devices.py) checked here, on the assembled target, against what the device model in
# cimc.runtime computes with: (low, high) for a number, or for each entry of a coefficient tuple. A registered
# device of a user's own is checked for finite numbers only.
_DEVICE_BOUNDS: dict[str, tuple[float, float]] = {
    "g_max_us": (1e-3, 1e6),
    "t0_s": (1e-9, 1e6),
    "t_read_s": (1e-12, 1.0),
    "prog_noise_coeffs_us": (-1e3, 1e3),
    "prog_noise_scale": (0.0, 100.0),
    "drift_nu_mean_coeffs": (-10.0, 10.0),
    "drift_nu_mean_range": (-1.0, 1.0),
    "drift_nu_std_coeffs": (-10.0, 10.0),
    "drift_nu_std_range": (0.0, 1.0),
    "drift_scale": (0.0, 10.0),
    "read_noise_q_coeff": (0.0, 10.0),
    "read_noise_q_exponent": (0.0, 10.0),
    "read_noise_q_max": (0.0, 10.0),
    "read_noise_scale": (0.0, 100.0),
    "g_min_clip": (1e-12, 0.5),
}
_ORDERED_RANGES = ("drift_nu_mean_range", "drift_nu_std_range")


def _check_device(device: BaseModel) -> None:
    """Every device number finite and inside :data:`_DEVICE_BOUNDS`; clip ranges as (low, high)."""
    for name in type(device).model_fields:
        value = getattr(device, name)
        numbers = value if isinstance(value, tuple) else (value,)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            continue
        where = f"device.{name}"
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"{where}: {value!r} is not a finite number")
        low, high = _DEVICE_BOUNDS.get(name, (-math.inf, math.inf))
        if not all(low <= v <= high for v in numbers):
            raise ValueError(f"{where}: {value!r} is outside {low:g}..{high:g}, the range the device model is "
                             "computed for")
        if name in _ORDERED_RANGES and numbers[0] > numbers[1]:
            raise ValueError(f"{where}: {value!r}: give the range as [low, high]")


class Target(BaseModel):
    """A complete hardware target: geometry, device model, converters, costs, execution mode."""

    model_config = _FROZEN

    name: str = Field(min_length=1, description="Short target name")
    description: str = Field("", description="One line shown by `cimc targets`")
    array: ArrayConfig
    device: DeviceParams = Field(description="Device model and its parameters, chosen by `model`")  # type: ignore[valid-type]
    converters: ConverterConfig
    array_read: ArrayReadConfig = ArrayReadConfig()
    digital: DigitalConfig = DigitalConfig()
    sram: SramConfig = SramConfig()
    activity: ActivityDefaults = ActivityDefaults()
    clock_hz: float = Field(1e9, ge=1e3, le=1e12, description="Digital clock frequency, Hz, 1 kHz..1 THz (assumed)")
    static_power_w: float = Field(
        0.0, ge=0, le=_MAX_POWER_W, description="Leakage and bias power while running, W (assumed)"
    )
    execution: Literal["layer-serial", "pipelined", "auto"] = Field(
        "layer-serial",
        description="layer-serial: layers take turns on the arrays; pipelined: every core is a pipeline stage "
        "(small layers may share a core and run in turn); auto: the compiler costs both and picks pipelined "
        "when it gives at least 5 % more throughput",
    )

    @model_validator(mode="after")
    def _device_computable(self) -> Target:
        _check_device(self.device)
        return self

    @property
    def weight_cols(self) -> int:
        """Weight columns per array."""
        return self.array.weight_cols

    @property
    def device_params(self) -> DeviceParamsBase:
        """The device parameter set, typed as the registry base class."""
        return self.device  # type: ignore[return-value]

    def with_overrides(self, **overrides: Any) -> Target:
        """A validated copy with fields replaced.

        Keys are converter fields (``dac_bits=4``), top-level fields (``clock_hz=1e8``) or dotted paths
        (``array.count=4``, ``device.g_max_us=20``). Unknown keys raise ``ValueError``.
        """
        data = self.model_dump(mode="python")
        for key, value in overrides.items():
            path = key.split(".") if "." in key else self._short_path(key)
            node = data
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        return Target.model_validate(data)

    def _short_path(self, key: str) -> list[str]:
        if key in type(self).model_fields:
            return [key]
        if key in ConverterConfig.model_fields:
            return ["converters", key]
        raise ValueError(
            f"unknown target override {key!r}: use a top-level field, a converter field or a dotted path"
        )


_DEPENDENTS.append(Target)
