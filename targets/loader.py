"""Load hardware targets: built-in presets (package data ``targets/*.yaml``) or a user's YAML file.

Every problem becomes a one-line :class:`cimc.errors.TargetError` that names the file, the field path and
the reason, e.g. ``aon-cim.yaml: converters.adc_bits: Input should be greater than or equal to 1``.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cimc.errors import TargetError

from .schema import Target

__all__ = ["list_targets", "load_target", "preset_names", "schema_json", "target_json_schema", "target_yaml"]

logger = logging.getLogger(__name__)

_PRESET_PACKAGE = "cimc.targets"


def preset_names() -> list[str]:
    """Names of the built-in presets (file stems of the shipped YAML files), sorted."""
    files = resources.files(_PRESET_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def resolve_target(target: Any, dac_bits: int | None = None, adc_bits: int | None = None,
                   arrays: int | None = None) -> Target:
    """A Target from a preset name, a YAML path or a Target, with optional converter overrides.

    ``arrays`` replaces the target's array (core) count, keeping their geometry: how the model would run on
    a larger chip of the same kind (target field ``array.count``).
    """
    if arrays is not None and (isinstance(arrays, bool) or not isinstance(arrays, int) or arrays < 1):
        raise TargetError(f"--arrays must be a whole number of arrays, at least 1 (got {arrays!r})")
    t = target if isinstance(target, Target) else load_target(str(target))
    overrides: dict[str, Any] = {k: v for k, v in (("dac_bits", dac_bits), ("adc_bits", adc_bits)) if v is not None}
    if arrays is not None:
        overrides["array.count"] = arrays
        logger.info("target %s: %d array(s) of %dx%d weights instead of %s", t.name, arrays, t.array.rows,
                    t.array.weight_cols, t.array.count if t.array.count is not None else "unbounded")
    return t.with_overrides(**overrides) if overrides else t


def load_target(name_or_path: str | Path) -> Target:
    """A validated :class:`Target` from a preset name (``aon-cim``) or a path to a YAML file."""
    text, label = _read_source(str(name_or_path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TargetError(
            f"{label}:{where} not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax"
        ) from None
    if not isinstance(data, dict):
        raise TargetError(
            f"{label}: expected a mapping of target fields at the top level, got {type(data).__name__}"
        )
    return _validate(data, label)


def list_targets() -> list[tuple[str, str]]:
    """(name, description) of every built-in preset."""
    return [(name, load_target(name).description) for name in preset_names()]


def target_yaml(target: Target) -> str:
    """The resolved target as YAML, every default filled in (what the compiler actually used)."""
    data = target.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def target_json_schema() -> dict[str, Any]:
    """JSON Schema of target files (for editors and hardware teams)."""
    schema = Target.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema.setdefault("title", "cimc target")
    return schema


def _read_source(name_or_path: str) -> tuple[str, str]:
    path = Path(name_or_path)
    looks_like_path = path.suffix in {".yaml", ".yml"} or "/" in name_or_path or "\\" in name_or_path
    if looks_like_path:
        if not path.is_file():
            raise TargetError(
                f"target file '{name_or_path}' does not exist; give a YAML path or a preset name"
            )
        return path.read_text(encoding="utf-8"), path.name
    if name_or_path not in preset_names():
        known = ", ".join(preset_names())
        raise TargetError(
            f"unknown target '{name_or_path}'; known presets: {known} (or give a path to a YAML file)"
        )
    text = resources.files(_PRESET_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
    return text, f"{name_or_path}.yaml"


def _validate(data: dict[str, Any], label: str) -> Target:
    try:
        return Target.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise TargetError(f"{label}: {field}: {first['msg']}{more}") from None


def schema_json() -> str:
    """The JSON Schema as indented text (``cimc targets --schema``)."""
    return json.dumps(target_json_schema(), indent=2)
