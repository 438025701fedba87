"""Hardware targets: the schema, device-model registry, loader and the built-in presets (``*.yaml``).

``load_target("aon-cim")`` or ``load_target("path/to/my-chip.yaml")`` returns a frozen, validated
:class:`Target` that drives both the device noise model and the cost model.
"""

from __future__ import annotations

from .devices import DeviceParamsBase, IdealDevice, PcmIbmDevice, device_models, register_device
from .loader import (
    list_targets,
    load_target,
    preset_names,
    resolve_target,
    schema_json,
    target_json_schema,
    target_yaml,
)
from .schema import (
    ActivityDefaults,
    ArrayConfig,
    ArrayReadConfig,
    ConverterConfig,
    DigitalConfig,
    SramConfig,
    Target,
)

__all__ = [
    "ActivityDefaults",
    "ArrayConfig",
    "ArrayReadConfig",
    "ConverterConfig",
    "DeviceParamsBase",
    "DigitalConfig",
    "IdealDevice",
    "PcmIbmDevice",
    "SramConfig",
    "Target",
    "device_models",
    "list_targets",
    "load_target",
    "preset_names",
    "register_device",
    "resolve_target",
    "schema_json",
    "target_json_schema",
    "target_yaml",
]
