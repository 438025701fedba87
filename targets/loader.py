"""Load hardware targets: built-in presets (package data ``targets/*.yaml``) or a user's YAML file.

Every problem becomes a one-line :class:`cimc.errors.TargetError` that names the file, the field path and
the reason, e.g. ``aon-cim.yaml: converters.adc_bits: Input should be greater than or equal to 1``.
"""

from __future__ import annotations

import difflib
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cimc.errors import TargetError

from .schema import Target

__all__ = ["list_targets", "load_target", "preset_names", "preset_text", "schema_json", "target_json_schema", "target_yaml"]

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
    """A validated :class:`Target` from a preset name (``aon-cim``) or a path to a YAML file.

    A file may derive from a preset or another file with ``base: aon-cim`` and give only what differs: the
    two are merged key by key (nested sections too; a different ``device.model`` replaces the whole device
    section), then validated. A file's target is named after the file (its stem) unless it sets ``name``;
    it never takes the base's name.
    """
    data, label = _load_data(str(name_or_path), ())
    return _validate(data, label)


def _load_data(name_or_path: str, seen: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """The merged raw mapping of a target file or preset (``base:`` resolved), and its label for errors."""
    text, label = _read_source(name_or_path)
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
    is_file = _looks_like_path(name_or_path)
    if is_file and "name" not in data:
        data["name"] = Path(name_or_path).stem
    base = data.pop("base", None)
    if base is None:
        return data, label
    if not isinstance(base, str) or not base:
        raise TargetError(f"{label}: base: give a preset name or a YAML path, e.g. 'base: aon-cim'")
    if is_file and _looks_like_path(base) and not Path(base).is_absolute():
        base = str(Path(name_or_path).parent / base)  # relative to the deriving file
    key = str(Path(base).resolve()) if _looks_like_path(base) else base
    if key in seen:
        raise TargetError(f"{label}: base: '{base}' derives from itself; break the cycle")
    parent, _ = _load_data(base, (*seen, key))
    merged = _merge(parent, data)
    if "description" not in data:
        merged["description"] = f"{data['name']}: {parent.get('name', base)} with changes"
    return merged, label


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, recursively for nested mappings; a device of another model replaces
    the base's device section instead of mixing two parameter sets."""
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        if key == "device" and isinstance(value, dict) and isinstance(old, dict) and \
                value.get("model", old.get("model")) != old.get("model"):
            out[key] = value
        elif isinstance(value, dict) and isinstance(old, dict):
            out[key] = _merge(old, value)
        else:
            out[key] = value
    return out


def _looks_like_path(name_or_path: str) -> bool:
    path = Path(name_or_path)
    return path.suffix in {".yaml", ".yml"} or "/" in name_or_path or "\\" in name_or_path


def preset_text(name: str) -> str | None:
    """The shipped YAML text of a preset, comments (sources, assumptions) included; None if not a preset."""
    if name not in preset_names():
        return None
    return resources.files(_PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")


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
    if _looks_like_path(name_or_path):
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
        raise TargetError(f"{label}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem of a target validation as one line: the field path, the reason, and for an unknown
    field the valid ones (closest first)."""
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"]]
    msg = str(first["msg"]).removeprefix("Value error, ")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        where = ".".join(_public_path(loc[:-1])) or "the top level"
        msg = f"unknown field; {hint}valid fields at {where}: {', '.join(known)}"
    elif loc and loc[-1] in _FIELD_HINTS:
        msg = f"{msg}; {_FIELD_HINTS[loc[-1]]}"
    field = ".".join(_public_path(loc))
    return f"{field}: {msg}{more}" if field else f"{msg}{more}"


_FIELD_HINTS = {
    "dac_bits": "a converter has 2 to 16 bits, or 0 / null for no quantisation",
    "adc_bits": "a converter has 2 to 16 bits, or 0 / null for no quantisation",
}


def _public_path(loc: list[str]) -> list[str]:
    """The field path a user writes: without the device model's tag (``device.pcm-ibm.t0_s`` → ``device.t0_s``)."""
    from .devices import device_models

    return [part for i, part in enumerate(loc) if not (i == 1 and loc[0] == "device" and part in device_models())]


def _fields_at(loc: list[str]) -> list[str]:
    """Field names of the (nested) section at ``loc`` of a target, or [] if it is not a section."""
    from pydantic import BaseModel

    from .devices import device_class, device_models

    cls: Any = Target
    for i, part in enumerate(loc):
        if i == 0 and part == "device" and len(loc) > 1:  # the parameter class is chosen by the next part, the tag
            continue
        if i == 1 and loc[0] == "device" and part in device_models():
            cls = device_class(part)
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        cls = annotation
    names = list(getattr(cls, "model_fields", {}))
    return names + ["base"] if cls is Target else names


def schema_json() -> str:
    """The JSON Schema as indented text (``cimc targets --schema``)."""
    return json.dumps(target_json_schema(), indent=2)
