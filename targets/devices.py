"""Device parameters of a target: parameter sets keyed by the ``model:`` discriminator.

A target file says ``device: {model: pcm-ibm, g_max_us: 25.0}``. The ``model`` value selects a registered
parameter class (frozen, validated numbers). These classes are the ``Params`` of the device models in
:mod:`cimc.runtime.devices`, which add the behaviour (program, drift, read); the built-in ones are defined here so
that reading a target needs no torch.

To add a device model, write one :class:`cimc.runtime.devices.DeviceModel` subclass with a nested ``Params``
class and decorate it with ``register_device_model("my-rram")``: that one registration also registers its
``Params`` here (see :mod:`cimc.runtime.devices`). :func:`register_device` alone registers parameters only
(a target can then be read and validated, but not simulated).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema

__all__ = [
    "DeviceParams",
    "DeviceParamsBase",
    "IdealDevice",
    "PcmIbmDevice",
    "device_class",
    "device_models",
    "register_device",
]

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type[DeviceParamsBase]] = {}
# Models whose schema embeds DeviceParams; rebuilt when a device is registered so the union sees it.
_DEPENDENTS: list[type[BaseModel]] = []

_D = TypeVar("_D", bound="type[DeviceParamsBase]")


class DeviceParamsBase(BaseModel):
    """Common base of device parameter sets: frozen, unknown keys rejected, a conductance range."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    g_max_us: float = Field(
        25.0, gt=0, description="Maximum programmable conductance in µS (HARDWARE.md: IBM PCM default 25 µS)"
    )


def register_device(name: str) -> Callable[[_D], _D]:
    """Class decorator: make ``name`` a valid ``device.model`` value in target files."""

    def decorate(cls: _D) -> _D:
        field = cls.model_fields.get("model")
        if field is None or field.default != name:
            raise TypeError(f"device class {cls.__name__} needs `model: Literal[{name!r}] = {name!r}`")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            logger.warning("device model %r re-registered by %s", name, cls.__name__)
        _REGISTRY[name] = cls
        for dependent in _DEPENDENTS:
            dependent.model_rebuild(force=True)
        return cls

    return decorate


def device_models() -> list[str]:
    """Names accepted as ``device.model``, sorted."""
    return sorted(_REGISTRY)


def device_class(name: str) -> type[DeviceParamsBase]:
    """The parameter class registered for ``name`` (KeyError if unknown)."""
    return _REGISTRY[name]


class DeviceParams:
    """Annotation for a target's ``device`` field: a tagged union over the registry at build time.

    Validation errors carry the model name in their location (``device.pcm-ibm.g_max_us``) so a user sees
    which parameter set was meant.
    """

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        choices = {name: handler.generate_schema(model) for name, model in sorted(_REGISTRY.items())}
        return core_schema.tagged_union_schema(choices, discriminator="model")

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        out = handler(schema)
        out.setdefault("description", f"Device model, selected by `model`: one of {device_models()}")
        return out


@register_device("pcm-ibm")
class PcmIbmDevice(DeviceParamsBase):
    """IBM phase-change-memory statistical model (HARDWARE.md, "IBM PCM statistical model").

    Conductances in µS; g = G / g_max in [0, 1]. Coefficient pairs ``(slope on ln g, intercept)``.
    """

    model: Literal["pcm-ibm"] = "pcm-ibm"
    t0_s: float = Field(
        20.0, gt=0, description="Drift reference time after programming, s (HARDWARE.md: 20 s)"
    )
    t_read_s: float = Field(
        250e-9, gt=0, description="Read pulse duration for 1/f noise, s (HARDWARE.md: 250 ns)"
    )
    prog_noise_coeffs_us: tuple[float, float, float] = Field(
        (0.26348, 1.9650, -1.1731),
        description="σ_prog(g) = c0 + c1·g + c2·g² in µS at g_max = 25 µS, scaled by g_max/25 "
        "(HARDWARE.md: programming noise)",
    )
    prog_noise_scale: float = Field(1.0, ge=0, description="Multiplier on σ_prog (1 = HARDWARE.md model)")
    drift_nu_mean_coeffs: tuple[float, float] = Field(
        (-0.0155, 0.0244), description="μ_ν = a·ln g + b (HARDWARE.md: drift)"
    )
    drift_nu_mean_range: tuple[float, float] = Field(
        (0.049, 0.1), description="Clip range of μ_ν (HARDWARE.md: drift)"
    )
    drift_nu_std_coeffs: tuple[float, float] = Field(
        (-0.0125, -0.0059), description="σ_ν = a·ln g + b (HARDWARE.md: drift)"
    )
    drift_nu_std_range: tuple[float, float] = Field(
        (0.008, 0.045), description="Clip range of σ_ν (HARDWARE.md: drift)"
    )
    drift_scale: float = Field(1.0, ge=0, description="Multiplier on ν (1 = HARDWARE.md model, 0 = no drift)")
    read_noise_q_coeff: float = Field(
        0.0088, ge=0, description="Q_s = coeff / g^exponent (HARDWARE.md: read noise)"
    )
    read_noise_q_exponent: float = Field(
        0.65, ge=0, description="Exponent on g in Q_s (HARDWARE.md: read noise)"
    )
    read_noise_q_max: float = Field(0.2, ge=0, description="Upper clip of Q_s (HARDWARE.md: read noise)")
    read_noise_scale: float = Field(1.0, ge=0, description="Multiplier on read noise (1 = HARDWARE.md model)")
    g_min_clip: float = Field(1e-7, gt=0, description="Lower clip of g inside ln g (HARDWARE.md: g ≥ 1e-7)")
    gdc: Literal["layer", "column", "none"] = Field(
        "layer", description="Global drift compensation granularity (HARDWARE.md: GDC, per-column variant)"
    )
    gdc_readout: Literal["probe", "onehot"] = Field(
        "probe",
        description="How GDC measures the drift: 'probe' = a fixed calibration input (32 vectors uniform over "
        "the DAC range) read without ADC, as a chip's averaged calibration read; 'onehot' = aihwkit's "
        "GlobalDriftCompensation readout (each row alone at input 1.0 in layer units, one read through DAC, "
        "output noise and ADC), for comparison (docs/fidelity.md)",
    )
    weight_scale: Literal["layer", "column"] = Field(
        "layer", description="Granularity at which max|W| maps to g_max (HARDWARE.md: mapping, per layer)"
    )
    gdc_gain: float = Field(
        1.0, ge=0, le=1,
        description="Share of the measured drift-compensation factor that is applied: factor' = 1 + gdc_gain x "
        "(factor - 1). 1 = the exact factor (default); below 1 the factor is pulled towards 1, which amplifies the "
        "output and read noise less than the exact factor does (docs/hardening.md)",
    )


@register_device("ideal")
class IdealDevice(DeviceParamsBase):
    """Noise-free, drift-free device: conductances are exactly the targets (for debugging and golden tests)."""

    model: Literal["ideal"] = "ideal"
    weight_scale: Literal["layer", "column"] = Field(
        "layer", description="Granularity at which max|W| maps to g_max (assumed: per layer)"
    )
