"""Device models: the single noise model of cimc, shared by the drift simulator and noise-aware training.

A weight matrix becomes conductances on a differential pair of devices (G+ for positive weights, G- for
negative ones), and a device goes through exactly one sequence::

    device = build_device(target.device)            # "pcm-ibm", "ideal" or a user-registered model
    programmed = device.program(g_target_us, instances=25, generator=gen)   # programming noise, drift exponent
    g_us = programmed.read(t_s=86400.0, generator=gen)                       # drift to t, then 1/f read noise

``generator`` is one ``torch.Generator`` for the whole batch, or a sequence of generators, one per instance:
instance ``i``'s draws then come from ``generator[i]`` alone (written into slice ``[i]`` of the batched
tensor), so an instance's devices do not depend on how many other instances are drawn with it. The
simulator uses one generator per instance (:func:`cimc.runtime.simulator.instance_generators`), which is
what lets a Monte Carlo run be split across processes and merged bit for bit.

There is no way to read conductances without programming them first, and no way to read without saying
when (seconds after programming); so a forgotten programming or drift step cannot make results look
better than the chip. Reading the same :class:`ProgrammedArray` at several times gives the drift of the
*same* devices. Monte Carlo chip instances are the leading batch dimension ``[I, ...]`` of every tensor.

The PCM model is the IBM statistical model (Nandakumar et al., ICECS 2019; Joshi et al., Nat. Commun. 2020),
with the formulas listed in ``docs/device-model.md``. Conductances are in microsiemens, times in seconds.
Parameters come from the target's device description (any object with the attribute names the model reads;
the target schema's pydantic model is one).

Adding a device model
---------------------
A device model is one class: its parameters (the target file's ``device:`` section, a pydantic class nested
as ``Params``) and its behaviour (:meth:`DeviceModel.program`, :meth:`DeviceModel.read_programmed`), registered
once with :func:`register_device_model`. Nothing else in cimc needs editing::

    from typing import Literal
    import torch
    from pydantic import Field
    from cimc.runtime.devices import DeviceModel, ProgrammedArray, randn_instances, register_device_model
    from cimc.targets import DeviceParamsBase

    @register_device_model("my-rram")
    class MyRram(DeviceModel):
        # lognormal programming noise, no drift
        class Params(DeviceParamsBase):
            model: Literal["my-rram"] = "my-rram"
            sigma_log: float = Field(0.1, ge=0, description="σ of ln G after programming (assumed)")

        def program(self, g_target_us, instances, generator):
            z = randn_instances((instances, *g_target_us.shape), generator, g_target_us.dtype)
            g = g_target_us * torch.exp(self.params.sigma_log * z)
            return ProgrammedArray(g_target_us=g_target_us, g_prog_us=g, nu=None, device=self)

        def read_programmed(self, programmed, t_s, generator):
            return programmed.g_prog_us.clone()

A target file (or ``target.with_overrides``) can then say ``device: {model: my-rram, sigma_log: 0.05}``:
``cimc compile`` validates it against ``Params`` and the simulator, fine-tuning and export build ``MyRram``
from it. The weight mapping onto differential pairs, multi-layer batching and drift compensation come from
the base class and the simulator. ``tests/test_device_registry.py`` is a complete example. The built-in models'
parameter classes live in :mod:`cimc.targets.devices` so that reading a target needs no torch.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import Tensor

from cimc.errors import InputError, TargetError
from cimc.targets.devices import DeviceParamsBase, PcmIbmDevice, device_class, device_models, register_device
from cimc.targets.devices import IdealDevice as IdealParams

__all__ = [
    "DeviceModel",
    "DeviceParams",
    "Generators",
    "IdealDevice",
    "NEGLIGIBLE_WEIGHT",
    "PCMDevice",
    "ProgrammedArray",
    "ProgrammedLayers",
    "ProgrammedWeights",
    "build_device",
    "conductances_to_weights",
    "device_model_names",
    "gdc_factor",
    "randn_instances",
    "register_device_model",
    "weights_to_conductances",
]

logger = logging.getLogger(__name__)

# The programming-noise polynomial of the IBM model was fitted on devices with g_max = 25 uS; other g_max
# values scale sigma proportionally (as aihwkit does).
_PROG_COEFFS_REFERENCE_G_MAX_US = 25.0
# Floor on (g_prog / g_max)^exponent in the read-noise amplitude Q_s, part of the published fit: it keeps
# Q_s finite for devices programmed to (or clipped at) zero conductance.
_READ_NOISE_G_FLOOR = 1e-3

_GDC_MODES = ("layer", "column", "none")
# Devices per instance row are padded to a multiple of this (program_layers): 256 floats = 1 KiB, a multiple of
# every SIMD width and of the row splits of a few threads.
_ROW_ALIGN = 256

# One generator for the whole [I, ...] batch, or one per instance (see the module docstring).
Generators = torch.Generator | Sequence[torch.Generator]
_WEIGHT_SCALE_MODES = ("layer", "column")


class DeviceParams(Protocol):
    """What every device model needs from the target file: its name and the maximum conductance.

    A model's own fields are those of its ``Params`` class (for ``pcm-ibm``: :class:`cimc.targets.PcmIbmDevice`).
    """

    model: str
    g_max_us: float


# --------------------------------------------------------------------------------------------------------
# Weights <-> conductances (differential pair)
# --------------------------------------------------------------------------------------------------------


def _as_float(x: Tensor | Any) -> Tensor:
    """A floating tensor on the CPU: float32 unless the input already is float64."""
    t = torch.as_tensor(x)
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    return t


NEGLIGIBLE_WEIGHT = 1e-30  # a largest |w| below this maps like an all-zero matrix (keeps g_max / max|w| finite)


def weights_to_conductances(
    w: Tensor, g_max_us: float, per_column: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Map weights ``w[..., K, N]`` onto a differential pair of conductances.

    ``scale_us_per_unit = g_max_us / max|w|`` over each matrix (shape ``[..., 1, 1]``; leading dimensions
    are separate matrices) or over each column (shape ``[..., 1, N]``). A positive weight goes on G+, a
    negative one on G-, and the other device of the pair is left at 0 uS. An all-zero matrix or column gets
    scale ``g_max_us`` (any value maps its zeros to zero).

    Returns ``(g_pos_us, g_neg_us, scale_us_per_unit)``.
    """
    w = _as_float(w).detach()
    if w.ndim < 2:
        raise InputError(
            f"weights_to_conductances needs a [..., K, N] weight matrix, got shape {tuple(w.shape)}; "
            "reshape the layer's weights to its matrix view first"
        )
    dims = (-2,) if per_column else (-2, -1)
    w_max = w.abs().amax(dim=dims, keepdim=True)
    # An all-zero column must not produce inf/nan: any finite scale maps 0 to 0 uS. Nor may a column of
    # denormal weights (~1e-43): g_max / 1e-43 overflows float32 to inf, and reading back gives inf/inf = NaN
    # where onnxruntime computes a finite ~1e-43. Below NEGLIGIBLE_WEIGHT a column is treated as zero.
    w_max = torch.where(w_max > NEGLIGIBLE_WEIGHT, w_max, torch.ones_like(w_max))
    scale = float(g_max_us) / w_max
    g = w * scale
    return g.clamp(min=0.0), (-g).clamp(min=0.0), scale


def conductances_to_weights(g_pos_us: Tensor, g_neg_us: Tensor, scale_us_per_unit: Tensor) -> Tensor:
    """Inverse of :func:`weights_to_conductances`: ``(G+ - G-) / scale``; broadcasts over instances."""
    return (g_pos_us - g_neg_us) / scale_us_per_unit


# --------------------------------------------------------------------------------------------------------
# Global drift compensation
# --------------------------------------------------------------------------------------------------------


def gdc_factor(reference_out: Tensor, drifted_out: Tensor, per_column: bool = False) -> Tensor:
    """Global drift compensation: the digital scale restoring the output magnitude after drift.

    Both tensors are outputs ``[I, ..., N]`` of the same calibration input (instances first, columns last):
    ``reference_out`` read right after programming (``t_s = 0``), ``drifted_out`` read at time t.
    Per layer, the factor is ``mean|reference| / mean|drifted|`` over all non-instance dimensions (shape
    ``[I, 1, ..., 1]``); per column it is taken for each output column (shape ``[I, 1, ..., N]``).
    Multiply the layer's drifted outputs by it. A column with zero drifted output gets factor 0.
    """
    if reference_out.ndim < 2 or drifted_out.ndim < 2:
        raise InputError(
            "gdc_factor needs outputs shaped [instances, ..., columns]; "
            f"got {tuple(reference_out.shape)} and {tuple(drifted_out.shape)}"
        )
    last = drifted_out.ndim - 1
    dims = tuple(range(1, last)) if per_column else tuple(range(1, last + 1))
    if not dims:  # [I, N] per column: every element is its own column mean
        ref_mean, drift_mean = reference_out.abs(), drifted_out.abs()
    else:
        ref_mean = reference_out.abs().mean(dim=dims, keepdim=True)
        drift_mean = drifted_out.abs().mean(dim=dims, keepdim=True)
    tiny = torch.finfo(drift_mean.dtype).tiny
    return ref_mean / drift_mean.clamp(min=tiny)


# --------------------------------------------------------------------------------------------------------
# Programmed state
# --------------------------------------------------------------------------------------------------------


def _check_time(t_s: float) -> float:
    t = float(t_s)
    if not math.isfinite(t) or t < 0.0:
        raise InputError(f"read time {t_s!r} s is invalid; give a finite time >= 0 s after programming")
    return t


def randn_instances(shape: tuple[int, ...], generator: Generators, dtype: torch.dtype) -> Tensor:
    """Standard normal draws of ``shape`` = ``[I, ...]``: from one generator, or instance ``i``'s slice from
    ``generator[i]`` (each slice drawn as its own tensor, so it is the same whatever ``I`` is)."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=dtype)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise InputError(f"got {len(gens)} generator(s) for {shape[0]} instance(s); give one per instance")
    out = torch.empty(shape, dtype=dtype)
    for i, gen in enumerate(gens):
        torch.randn(shape[1:], generator=gen, dtype=dtype, out=out[i])
    return out


def _check_instances(instances: int) -> int:
    if isinstance(instances, bool) or int(instances) != instances or instances < 1:
        raise InputError(f"instances={instances!r} is invalid; give a whole number of chip instances >= 1")
    return int(instances)


@dataclass(frozen=True, eq=False)
class ProgrammedArray:
    """Devices after programming; the only thing that can be read.

    ``g_target_us`` has the caller's shape ``[...]``; ``g_prog_us`` and ``nu`` are ``[I, ...]`` (one
    programming per instance, drawn once). ``nu`` is the per-device drift exponent (``None`` for models
    without drift). ``aux`` holds other per-device state a model fixes at programming time (the PCM
    model keeps its read-noise amplitude ``q_s`` there, so each read does not recompute it). Built by
    :meth:`DeviceModel.program`, never by hand.
    """

    g_target_us: Tensor
    g_prog_us: Tensor
    nu: Tensor | None
    device: DeviceModel
    aux: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def instances(self) -> int:
        return int(self.g_prog_us.shape[0])

    def read(self, t_s: float, generator: Generators) -> Tensor:
        """Conductances ``[I, ...]`` in uS read ``t_s`` seconds after programming (fresh read noise)."""
        return self.device.read_programmed(self, _check_time(t_s), generator)


@dataclass(frozen=True, eq=False)
class ProgrammedLayers:
    """Several layers' weights programmed together as one flat batch of differential pairs.

    ``read`` returns, per layer, the effective weights ``[I, *w.shape]`` in the layer's own units
    (``(G+ - G-) / scale``), i.e. what the array computes with at time ``t_s`` before any compensation.
    """

    array: ProgrammedArray
    scales: Mapping[str, Tensor]
    shapes: Mapping[str, torch.Size]
    padding: int = 0  # unused devices at the end of each instance's row (see program_layers)

    @property
    def instances(self) -> int:
        return self.array.instances

    def read(self, t_s: float, generator: Generators) -> dict[str, Tensor]:
        g_us = self.array.read(t_s, generator)  # [I, D_total]
        sizes = [s.numel() for s in self.shapes.values() for _ in (0, 1)] + [self.padding]
        parts = torch.split(g_us, sizes, dim=1)
        out: dict[str, Tensor] = {}
        for i, (name, shape) in enumerate(self.shapes.items()):
            g_pos = parts[2 * i].reshape(self.instances, *shape)
            g_neg = parts[2 * i + 1].reshape(self.instances, *shape)
            out[name] = conductances_to_weights(g_pos, g_neg, self.scales[name])
        return out


@dataclass(frozen=True, eq=False)
class ProgrammedWeights:
    """One weight matrix programmed on differential pairs; ``read`` gives weights ``[I, ..., K, N]``."""

    layers: ProgrammedLayers

    @property
    def instances(self) -> int:
        return self.layers.instances

    @property
    def scale_us_per_unit(self) -> Tensor:
        return self.layers.scales["w"]

    def read(self, t_s: float, generator: Generators) -> Tensor:
        return self.layers.read(t_s, generator)["w"]


# --------------------------------------------------------------------------------------------------------
# Device models and their registry
# --------------------------------------------------------------------------------------------------------

_DEVICE_MODELS: dict[str, type[DeviceModel]] = {}
_D = TypeVar("_D", bound="type[DeviceModel]")


def register_device_model(name: str) -> Callable[[_D], _D]:
    """Class decorator: make a :class:`DeviceModel` subclass buildable from ``model: <name>`` in a target.

    The one registration of a device model: with a ``Params`` class (``model: Literal[name] = name``), its
    parameters also become a valid ``device:`` section of target files (the schema registry of
    :mod:`cimc.targets.devices`, which the built-in models fill torch-free).
    """

    def decorator(cls: _D) -> _D:
        existing = _DEVICE_MODELS.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"device model '{name}' is already registered by {existing.__qualname__}")
        if not (isinstance(cls, type) and issubclass(cls, DeviceModel)):
            raise TypeError(f"@register_device_model('{name}') needs a DeviceModel subclass, got {cls!r}")
        params = cls.Params
        if params is not None and (name not in device_models() or device_class(name) is not params):
            register_device(name)(params)  # checks that Params says model: Literal[name] = name
        cls.name = name
        _DEVICE_MODELS[name] = cls
        return cls

    return decorator


def device_model_names() -> list[str]:
    """Names accepted in a target's ``device.model`` field."""
    return sorted(_DEVICE_MODELS)


def build_device(params: Any) -> DeviceModel:
    """The device model named by ``params.model``, built from ``params``."""
    name = getattr(params, "model", None)
    cls = _DEVICE_MODELS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise TargetError(
            f"unknown device model {name!r}; use one of {device_model_names()} "
            "or register your own with cimc.runtime.devices.register_device_model"
        )
    return cls(params)


def _require(params: Any, fields: tuple[str, ...], model: str) -> None:
    missing = [f for f in fields if not hasattr(params, f)]
    if missing:
        raise TargetError(
            f"device model '{model}' is missing field(s) {missing}; add them to the target file"
        )


class DeviceModel(abc.ABC):
    """A device technology: how target conductances become programmed devices, and how those read over time.

    Subclasses implement :meth:`program` and :meth:`read_programmed`; everything else (weights mapping,
    multi-layer batching, the training-time noise sample) is built on those two.
    """

    name: ClassVar[str] = ""
    # The target file's ``device:`` section for this model (validated when the target is read); None for a model
    # built from any object with the attributes it reads.
    Params: ClassVar[type[DeviceParamsBase] | None] = None

    def __init__(self, params: Any):
        _require(params, ("g_max_us",), self.name or type(self).__name__)
        self.params = params
        self.g_max_us = float(params.g_max_us)
        if not (math.isfinite(self.g_max_us) and self.g_max_us > 0):
            raise TargetError(f"g_max_us={params.g_max_us!r} is invalid; give a positive conductance in uS")
        self.per_column_default = getattr(params, "weight_scale", "layer") == "column"
        self.gdc_mode = getattr(params, "gdc", "none")

    # -- the two steps a model defines -------------------------------------------------------------------

    @abc.abstractmethod
    def program(self, g_target_us: Tensor, instances: int, generator: Generators) -> ProgrammedArray:
        """Program ``instances`` independent copies of the targets ``[...]``; returns ``[I, ...]`` state."""

    @abc.abstractmethod
    def read_programmed(self, programmed: ProgrammedArray, t_s: float, generator: Generators) -> Tensor:
        """Conductances ``[I, ...]`` at ``t_s`` seconds after programming; call via ``programmed.read``."""

    # -- built on the two steps --------------------------------------------------------------------------

    def program_layers(
        self,
        weights: Mapping[str, Tensor],
        instances: int,
        generator: Generators,
        per_column: bool | None = None,
    ) -> ProgrammedLayers:
        """Program every layer's weights ``[..., K, N]`` in one batch (one flat device vector).

        ``per_column`` chooses the weight scale (default: the target's ``weight_scale``). The random draws
        follow the mapping's iteration order, so the same dict order and seed give identical devices.
        """
        per_column = self.per_column_default if per_column is None else per_column
        flat: list[Tensor] = []
        scales: dict[str, Tensor] = {}
        shapes: dict[str, torch.Size] = {}
        for name, w in weights.items():
            g_pos, g_neg, scale = weights_to_conductances(w, self.g_max_us, per_column)
            flat += [g_pos.reshape(-1), g_neg.reshape(-1)]
            scales[name], shapes[name] = scale, g_pos.shape
        if not flat:
            raise InputError("program_layers got no layers; pass a mapping of layer name to weight matrix")
        # With one generator per instance, pad each instance's row of devices to a multiple of _ROW_ALIGN (zero
        # targets, never read back): the vectorised element-wise kernels then treat every instance's devices
        # alike whatever the instance count (an element in a ragged tail takes a scalar path that may round
        # differently), which keeps a sharded Monte Carlo run bit-identical to the one-process run.
        per_instance = not isinstance(generator, torch.Generator)
        padding = -sum(f.numel() for f in flat) % _ROW_ALIGN if per_instance else 0
        flat.append(torch.zeros(padding, dtype=flat[0].dtype))
        array = self.program(torch.cat(flat), instances, generator)
        return ProgrammedLayers(array=array, scales=scales, shapes=shapes, padding=padding)

    def program_weights(
        self, w: Tensor, instances: int, generator: Generators, per_column: bool | None = None
    ) -> ProgrammedWeights:
        """Program one weight matrix ``[..., K, N]`` on differential pairs."""
        return ProgrammedWeights(self.program_layers({"w": w}, instances, generator, per_column))


@register_device_model("ideal")
class IdealDevice(DeviceModel):
    """Exact devices: no programming noise, no drift, no read noise (for debugging and golden tests)."""

    Params = IdealParams

    @torch.no_grad()
    def program(self, g_target_us: Tensor, instances: int, generator: Generators) -> ProgrammedArray:
        g = _as_float(g_target_us)
        g_prog = g.unsqueeze(0).expand(_check_instances(instances), *g.shape).clone()
        return ProgrammedArray(g_target_us=g, g_prog_us=g_prog, nu=None, device=self)

    def read_programmed(self, programmed: ProgrammedArray, t_s: float, generator: Generators) -> Tensor:
        return programmed.g_prog_us.clone()


# The fields the PCM formulas read; gdc, gdc_readout and weight_scale have defaults (read with getattr).
_PCM_FIELDS = tuple(f for f in PcmIbmDevice.model_fields
                    if f not in DeviceParamsBase.model_fields and f not in ("gdc", "gdc_readout", "weight_scale"))


@register_device_model("pcm-ibm")
class PCMDevice(DeviceModel):
    """The IBM PCM statistical model: programming noise, per-device power-law drift, 1/f read noise."""

    Params = PcmIbmDevice

    def __init__(self, params: Any):
        super().__init__(params)
        _require(params, _PCM_FIELDS, "pcm-ibm")
        p = params
        self.t0_s, self.t_read_s = float(p.t0_s), float(p.t_read_s)
        if self.t0_s <= 0 or self.t_read_s <= 0:
            raise TargetError(
                f"t0_s={p.t0_s!r} and t_read_s={p.t_read_s!r} must both be > 0 s; fix the target"
            )
        if self.gdc_mode not in _GDC_MODES:
            raise TargetError(f"gdc={self.gdc_mode!r} is invalid; use one of {list(_GDC_MODES)}")
        if getattr(p, "weight_scale", "layer") not in _WEIGHT_SCALE_MODES:
            raise TargetError(
                f"weight_scale={p.weight_scale!r} is invalid; use one of {list(_WEIGHT_SCALE_MODES)}"
            )
        self.prog_noise_coeffs_us = tuple(float(c) for c in p.prog_noise_coeffs_us)

    # -- the formulas, one function each (also used by tests and docs) -----------------------------------

    def prog_sigma_us(self, g_target_us: Tensor) -> Tensor:
        """sigma_prog(g) = (c0 + c1 g + c2 g^2) * g_max/25 * prog_noise_scale, g = G_target/g_max."""
        g = g_target_us / self.g_max_us
        sigma = torch.zeros_like(g)
        for power, coeff in enumerate(self.prog_noise_coeffs_us):
            sigma = sigma + coeff * g**power
        return sigma * (self.g_max_us / _PROG_COEFFS_REFERENCE_G_MAX_US) * float(self.params.prog_noise_scale)

    def drift_nu_stats(self, g_target_us: Tensor) -> tuple[Tensor, Tensor]:
        """(mu_nu, sigma_nu) of the normal whose absolute value is the drift exponent; clipped fits in ln g."""
        p = self.params
        log_g = torch.log((g_target_us / self.g_max_us).abs().clamp(min=float(p.g_min_clip)))
        (a_mu, b_mu), (a_sd, b_sd) = p.drift_nu_mean_coeffs, p.drift_nu_std_coeffs
        mu = (a_mu * log_g + b_mu).clamp(*map(float, p.drift_nu_mean_range))
        sd = (a_sd * log_g + b_sd).clamp(*map(float, p.drift_nu_std_range))
        return mu, sd

    def drift_factor(self, nu: Tensor, t_s: float) -> Tensor:
        """((t + t0) / t0)^(-nu): 1 at t = 0."""
        return torch.exp(-nu * math.log((t_s + self.t0_s) / self.t0_s))

    def read_noise_q_s(self, g_prog_us: Tensor) -> Tensor:
        """1/f noise amplitude Q_s = min(q_coeff / max((g_prog/g_max)^q_exponent, 1e-3), q_max)."""
        p = self.params
        g_pow = (g_prog_us.abs() / self.g_max_us) ** float(p.read_noise_q_exponent)
        q_s = float(p.read_noise_q_coeff) / g_pow.clamp_(min=_READ_NOISE_G_FLOOR)
        return q_s.clamp_(max=float(p.read_noise_q_max))

    def read_noise_time_factor(self, t_s: float) -> float:
        """sqrt(ln((t + t0 + t_read) / (2 t_read))) * read_noise_scale: the growth of 1/f noise with time."""
        log_term = math.log((t_s + self.t0_s + self.t_read_s) / (2.0 * self.t_read_s))
        return math.sqrt(log_term) * float(self.params.read_noise_scale)

    def read_sigma_rel(self, g_prog_us: Tensor, t_s: float) -> Tensor:
        """Relative read noise sigma_rel(t) = Q_s(g_prog) * sqrt(ln((t + t0 + t_read) / (2 t_read)))."""
        return self.read_noise_q_s(g_prog_us) * self.read_noise_time_factor(t_s)

    # -- program -> read ---------------------------------------------------------------------------------

    @torch.no_grad()
    def program(self, g_target_us: Tensor, instances: int, generator: Generators) -> ProgrammedArray:
        g_target = _as_float(g_target_us)
        if not bool(torch.isfinite(g_target).all()) or bool((g_target < 0).any()):
            raise InputError(
                "target conductances must be finite and >= 0 uS; map weights with weights_to_conductances"
            )
        shape = (_check_instances(instances), *g_target.shape)
        # Draw order is fixed (programming noise, then drift exponents) so a seed names one chip population.
        # With one generator per instance, instance i draws its programming noise then its exponents.
        z_prog = randn_instances(shape, generator, g_target.dtype)
        z_nu = randn_instances(shape, generator, g_target.dtype)
        g_prog = (g_target + self.prog_sigma_us(g_target) * z_prog).clamp_(min=0.0)
        mu, sd = self.drift_nu_stats(g_target)
        nu = (mu + sd * z_nu).abs_().mul_(float(self.params.drift_scale))
        logger.debug("programmed %d instance(s) x %d device(s)", shape[0], g_target.numel())
        q_s = self.read_noise_q_s(g_prog)  # fixed by g_prog, so computed once, not per read
        return ProgrammedArray(g_target_us=g_target, g_prog_us=g_prog, nu=nu, device=self, aux={"q_s": q_s})

    @torch.no_grad()
    def read_programmed(self, programmed: ProgrammedArray, t_s: float, generator: Generators) -> Tensor:
        if programmed.device is not self or programmed.nu is None or "q_s" not in programmed.aux:
            raise InputError(
                "this ProgrammedArray was made by another device model; read it with programmed.read"
            )
        g_t = programmed.g_prog_us * self.drift_factor(programmed.nu, t_s)
        noise = randn_instances(tuple(g_t.shape), generator, g_t.dtype)
        # G >= 0 after drift, so |G(t)| is G(t) itself.
        noise.mul_(programmed.aux["q_s"]).mul_(g_t).mul_(self.read_noise_time_factor(t_s))
        return g_t.add_(noise).clamp_(min=0.0)
