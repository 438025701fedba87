"""The compiled model's durable metadata: one place that names each key and reads or writes its value.

Passes record their results as JSON strings in onnx-ir ``metadata_props`` (so a compiled ``model.onnx`` is still a
valid ONNX file). This module owns the key names as constants and, for the per-node keys read in many places,
one reader and one writer returning and taking frozen dataclasses:

=====================  ==============================================  ===========================
key                    value                                           written by
=====================  ==============================================  ===========================
``cimc.layer``         the crossbar block a use computes with (str)     ``map``
``cimc.matrix``        :class:`MatrixView` of the use                   ``map``
``cimc.placement``     the block's tiles, :class:`TilePlacement` each   ``map``
``cimc.quant``         converter ranges (``runtime.analog.QuantSpec``)  ``quantize``
``cimc.schedule``      :class:`ScheduleSlot` of the node                ``schedule``
=====================  ==============================================  ===========================

Model-level keys (``cimc.mapping``, ``cimc.schedule``, ``cimc.pipeline``, ``cimc.quantization`` …) are named
here too. A writer produces the same JSON bytes as the passes always have (field order included), so compiled
models stay byte-identical.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

__all__ = [
    "BATCH", "BATCH_AXES", "DIGITAL", "LAYER", "MAPPING", "MATRIX", "PIPELINE", "PLACEMENT", "QUANT", "QUANTIZATION",
    "SCHEDULE", "MatrixView", "ScheduleSlot", "TilePlacement", "read_layer", "read_matrix", "read_placement",
    "read_schedule", "write_matrix", "write_placement", "write_schedule",
]

# Per-node keys.
LAYER = "cimc.layer"
MATRIX = "cimc.matrix"
PLACEMENT = "cimc.placement"
QUANT = "cimc.quant"
SCHEDULE = "cimc.schedule"  # also a model-level key (the schedule's totals)
# Model-level keys.
MAPPING = "cimc.mapping"
PIPELINE = "cimc.pipeline"
QUANTIZATION = "cimc.quantization"
DIGITAL = "cimc.digital"
BATCH = "cimc.batch"
BATCH_AXES = "cimc.batch_axes"


class _HasMetadata(Protocol):
    """An onnx-ir node (or model): what the readers and writers touch."""

    @property
    def metadata_props(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class MatrixView:
    """A use's matrix view: ``rows`` (K) × ``cols`` (N) per group, and matrix-vector products per inference."""

    rows: int
    cols: int
    groups: int
    mvms: int


@dataclass(frozen=True)
class TilePlacement:
    """One tile of a block on an array: rows ``row0 .. row0+rows`` and columns ``col0 .. col0+cols`` of array
    ``array``, holding the block's matrix from (``src_row0``, ``src_col0``) on, for group ``group``."""

    group: int
    tile: int
    array: int
    row0: int
    col0: int
    rows: int
    cols: int
    src_row0: int
    src_col0: int


@dataclass(frozen=True)
class ScheduleSlot:
    """When a node runs in one inference, in clock cycles; analog nodes also name their block and cores."""

    step: int
    unit: str  # "array" or "digital"
    stage: int
    start_cycle: int
    end_cycle: int
    layer: str | None = None
    cores: tuple[int, ...] | None = None


_T = TypeVar("_T")


def _build(cls: type[_T], data: dict[str, Any]) -> _T:
    """``cls`` from a JSON object, ignoring keys a newer cimc may have added."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def _dump(value: Any, drop_none: bool = False) -> dict[str, Any]:
    data = dataclasses.asdict(value)
    return {k: v for k, v in data.items() if v is not None} if drop_none else data


def read_layer(node: _HasMetadata, default: str) -> str:
    """The crossbar block ``node`` computes with (``default``, usually the node's name, when unset)."""
    return node.metadata_props.get(LAYER) or default


def read_matrix(node: _HasMetadata) -> MatrixView | None:
    """The node's matrix view, or None for a node that was not mapped."""
    raw = node.metadata_props.get(MATRIX)
    return None if raw is None else _build(MatrixView, json.loads(raw))


def write_matrix(node: _HasMetadata, matrix: MatrixView) -> None:
    node.metadata_props[MATRIX] = json.dumps(_dump(matrix))


def read_placement(node: _HasMetadata) -> tuple[TilePlacement, ...]:
    """The tiles of the node's block (empty for a node that was not mapped)."""
    raw = node.metadata_props.get(PLACEMENT)
    return () if raw is None else tuple(_build(TilePlacement, t) for t in json.loads(raw))


def write_placement(node: _HasMetadata, tiles: tuple[TilePlacement, ...] | list[TilePlacement]) -> None:
    node.metadata_props[PLACEMENT] = json.dumps([_dump(t) for t in tiles])


def read_schedule(node: _HasMetadata) -> ScheduleSlot | None:
    """The node's slot in the schedule, or None for a node that was not scheduled."""
    raw = node.metadata_props.get(SCHEDULE)
    if raw is None:
        return None
    data = json.loads(raw)
    if data.get("cores") is not None:
        data["cores"] = tuple(data["cores"])
    return _build(ScheduleSlot, data)


def write_schedule(node: _HasMetadata, slot: ScheduleSlot) -> None:
    data = _dump(slot, drop_none=True)
    if "cores" in data:
        data["cores"] = list(data["cores"])
    node.metadata_props[SCHEDULE] = json.dumps(data)
