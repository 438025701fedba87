"""JSON Schema of the mapping bundle's ``manifest.json`` (format ``cimc-mapping``, version 1.1).

The schema is built in Python (so it ships with the package without package data) and written as
``schema.json`` into every bundle, so a hardware team can validate a manifest with any JSON Schema tool
(draft 2020-12) without cimc. The resolved target embeds the target-file schema of :mod:`cimc.targets`.
Field meanings and units: ``docs/mapping-format.md``.
"""

from __future__ import annotations

from typing import Any

from cimc.targets import target_json_schema

__all__ = ["MAPPING_FORMAT", "MAPPING_FORMAT_VERSION", "mapping_schema"]

MAPPING_FORMAT = "cimc-mapping"
# 1.1: layers are crossbar blocks with a list of users (shared weights); 1.2: replicas (optional "replica" per
# layer, "replication" at the top)
MAPPING_FORMAT_VERSION = "1.2"

_NAT = {"type": "integer", "minimum": 0}
_POS = {"type": "integer", "minimum": 1}
_NUM = {"type": "number"}
_NONNEG = {"type": "number", "minimum": 0}
_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_FILE = {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"}  # a plain name inside the bundle, no folders
_BITS = {"type": ["integer", "null"], "minimum": 1, "maximum": 16}
_WINDOW = {"type": "array", "items": _NAT, "minItems": 2, "maxItems": 2, "description": "half-open [start, stop)"}
# A float per layer, or one float per output channel (group-major: channel = group * cols + column).
_PER_LAYER_OR_COLUMN = {"oneOf": [_NUM, {"type": "array", "items": _NUM, "minItems": 1}]}


def _obj(properties: dict[str, Any], optional: tuple[str, ...] = (), description: str = "") -> dict[str, Any]:
    """A closed object schema: every property required unless listed in ``optional``."""
    out: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": [k for k in properties if k not in optional],
        "additionalProperties": False,
    }
    if description:
        out["description"] = description
    return out


def _tile() -> dict[str, Any]:
    return _obj(
        {
            "group": _NAT,
            "tile": _NAT,
            "array": _NAT,
            "rows": _POS,
            "cols": _POS,
            "row_window": _WINDOW,
            "weight_col_window": _WINDOW,
            "device_col_window": _WINDOW,
            "matrix_row_window": _WINDOW,
            "matrix_col_window": _WINDOW,
        },
        description="One rectangle of a layer's matrix on one crossbar (all windows half-open)",
    )


def _layer() -> dict[str, Any]:
    scale = _obj(
        {
            "granularity": {"enum": ["layer", "column"]},
            "us_per_weight_unit": {
                "oneOf": [
                    {"type": "number", "exclusiveMinimum": 0},
                    {"type": "array", "minItems": 1, "items": {"type": "number", "exclusiveMinimum": 0}},
                ]
            },
            "g_max_us": {"type": "number", "exclusiveMinimum": 0},
        }
    )
    dac = _obj(
        {
            "bits": _BITS,
            "signed": {"type": ["boolean", "null"]},
            "x_max": {"type": ["number", "null"], "exclusiveMinimum": 0},
            "calibrated": {"type": "boolean"},
        }
    )
    adc = _obj(
        {
            "bits": _BITS,
            "granularity": {"enum": ["layer", "column"]},
            "y_max": {"type": ["array", "null"], "items": _PER_LAYER_OR_COLUMN},
            "calibrated": {"type": "boolean"},
        }
    )
    bias = _obj(
        {
            "present": {"type": "boolean"},
            "file": {"oneOf": [_FILE, {"type": "null"}]},
            "key": {"type": ["string", "null"]},
            "shape": {"type": ["array", "null"], "items": _NAT},
            "beta": _NUM,
        }
    )
    post = _obj(
        {"alpha": _NUM, "partial_sums": {"type": "boolean"}, "steps": {"type": "array", "items": {"type": "string"}}}
    )
    gdc = _obj(
        {
            "method": {"enum": ["layer", "column", "none"]},
            "probe": _obj(
                {
                    "file": _FILE,
                    "key": {"type": "string"},
                    "seed": {"type": "integer"},
                    "count": _POS,
                    "rows": _POS,
                    "x_max": {"type": "number", "exclusiveMinimum": 0},
                    "distribution": {"type": "string"},
                }
            ),
            "reference_granularity": {"enum": ["layer", "column"]},
            "reference_mean_abs_output": {"oneOf": [_NONNEG, {"type": "array", "items": _NONNEG, "minItems": 1}]},
        }
    )
    schedule = _obj({"step": _NAT, "stage": _NAT, "start_cycle": _NAT, "end_cycle": _NAT, "mvms": _POS})
    user = _obj(
        {
            "node": {"type": "string", "minLength": 1},
            "op_type": {"enum": ["Conv", "Gemm", "MatMul"]},
            "dac": dac,
            "adc": adc,
            "bias": bias,
            "post_processing": post,
            "schedule": schedule,
        },
        description="One node that computes with this layer's devices (its own converters, bias and time slot)",
    )
    return _obj(
        {
            "id": _NAT,
            "name": {"type": "string", "minLength": 1},
            "source_node": {"type": "string", "minLength": 1},
            "op_type": {"enum": ["Conv", "Gemm", "MatMul"]},
            "weight": _obj(
                {
                    "initializer": {"type": "string"},
                    "shape": {"type": "array", "items": _POS},
                    "layout": {"enum": ["conv", "gemm", "gemm-transB", "matmul-right", "matmul-left"]},
                }
            ),
            "matrix": _obj({"rows": _POS, "cols": _POS, "groups": _POS, "mvms": _POS}),
            "arrays": {"type": "array", "items": _NAT, "minItems": 1},
            "tiles": {"type": "array", "items": {"$ref": "#/$defs/mapping_tile"}, "minItems": 1},
            "scale": scale,
            "dac": dac,
            "adc": adc,
            "bias": bias,
            "post_processing": post,
            "gdc": gdc,
            "schedule": schedule,
            "users": {"type": "array", "items": user, "minItems": 1},
            "replica": _obj(
                {"of": {"type": "string", "minLength": 1}, "index": _NAT, "count": {"type": "integer", "minimum": 2}},
                description="This block is replica `index` (0-based) of `count` independently programmed copies of "
                "layer `of`; the digital unit adds the copies' outputs and multiplies by 1/count",
            ),
        },
        optional=("replica",),
    )


def _array() -> dict[str, Any]:
    return _obj(
        {
            "index": _NAT,
            "file": {"type": "string", "pattern": r"^array_[0-9]+\.npz$"},
            "key": {"type": "string"},
            "csv": {"oneOf": [{"type": "string", "pattern": r"^array_[0-9]+\.csv$"}, {"type": "null"}]},
            "rows": _POS,
            "device_cols": _POS,
            "programmed_devices": _NAT,
            "layers": {"type": "array", "items": {"type": "string"}},
        }
    )


def _schedule() -> dict[str, Any]:
    step = _obj(
        {
            "step": _NAT,
            "node": {"type": "string"},
            "op_type": {"type": "string"},
            "unit": {"enum": ["array", "digital"]},
            "stage": _NAT,
            "start_cycle": _NAT,
            "end_cycle": _NAT,
            "layer_id": {"type": ["integer", "null"], "minimum": 0},
        }
    )
    return _obj(
        {
            "execution": {"enum": ["layer-serial", "pipelined"]},
            "clock_hz": {"type": "number"},
            "cycles": _NAT,
            "sram_peak_bytes": {"type": ["integer", "null"]},
            "order": {"type": "array", "items": {"type": "string"}},
            "steps": {"type": "array", "items": step},
            "shared_cores": {
                "type": "object",
                "additionalProperties": {"type": "array", "items": {"type": "string"}},
                "description": "pipelined: core index -> the analog nodes that take turns on it (several per core)",
            },
        },
        optional=("shared_cores",),
    )


def mapping_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that every ``manifest.json`` of format version 1 validates against."""
    target = target_json_schema()
    defs = dict(target.pop("$defs", {}))
    target.pop("$schema", None)
    defs.update(
        {
            "Target": target,
            "mapping_tile": _tile(),
            "mapping_layer": _layer(),
            "mapping_array": _array(),
            "mapping_schedule": _schedule(),
        }
    )
    conventions = _obj(
        {
            "conductance_unit": {"const": "uS"},
            "devices_per_weight": {"enum": [1, 2]},
            "device_columns": {"type": "string"},
            "weight": {"type": "string"},
            "windows": {"type": "string"},
            "output": {"type": "string"},
        }
    )
    source = _obj(
        {
            "model": {"type": "string"},
            "model_sha256": {"oneOf": [_SHA, {"type": "null"}]},
            "compiled_dir": {"type": ["string", "null"]},
            "compiled_model_sha256": {"oneOf": [_SHA, {"type": "null"}]},
            "pipeline": {"type": "string"},
        },
        optional=("compiled_dir",),  # written by cimc <= 0.2.0 only: a path means nothing once a bundle is shipped
    )
    root = _obj(
        {
            "format": {"const": MAPPING_FORMAT},
            "format_version": {"type": "string", "pattern": r"^1\.[0-9]+$"},
            "cimc_version": {"type": "string"},
            "source": source,
            "target": {"$ref": "#/$defs/Target"},
            "conventions": conventions,
            "files": _obj({"biases": _FILE, "gdc": _FILE, "schema": _FILE}),
            "arrays": {"type": "array", "items": {"$ref": "#/$defs/mapping_array"}},
            "layers": {"type": "array", "items": {"$ref": "#/$defs/mapping_layer"}, "minItems": 1},
            "schedule": {"$ref": "#/$defs/mapping_schedule"},
            "replication": {
                "type": "object",
                "additionalProperties": {"type": "integer", "minimum": 2},
                "description": "replicated layer -> number of independently programmed copies (blocks with 'replica')",
            },
        },
        optional=("replication",),
    )
    root.update(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"{MAPPING_FORMAT} {MAPPING_FORMAT_VERSION} manifest",
            "description": "Analog CIM mapping bundle: conductance targets, windows, scales, converters, schedule",
            "$defs": defs,
        }
    )
    return root
