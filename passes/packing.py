"""Crossbar packing: place weight blocks on the arrays of a target without overlap.

Pure algorithm, no IR. Sizes are in *weights*: a block of ``rows`` = K (inputs, C_in·kh·kw per group) by
``cols`` = N (outputs) occupies ``rows`` word lines and ``cols · devices_per_weight`` device columns.

1. Split: a block larger than one array becomes tiles of at most ``rows × weight_cols`` (row splits give
   partial sums that the digital unit adds; column splits are free).
2. Pack: tiles go into arrays with a MaxRects packer (free-rectangle list). Several orderings × scoring
   heuristics are tried and the first that fits is kept, so a result is deterministic.
   - one array (AON-CIM): everything must fit the one array; if no ordering fits, wide tiles are cut into
     column pieces (halves, quarters, ...) and packing is retried;
   - several arrays (cores): first-fit over cores in order, several small tiles may share a core.
3. Report: one :class:`Placement` per tile and utilisation (used / available devices) per array and total.

Tiles are never rotated: rows are inputs and columns are outputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cimc.errors import FitError

__all__ = [
    "ArrayGeometry",
    "Block",
    "Packing",
    "Placement",
    "Tile",
    "check_packing",
    "pack_blocks",
    "split_block",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    """A weight matrix to place: ``rows`` inputs (K) × ``cols`` outputs (N), in weights."""

    name: str
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.rows <= 0 or self.cols <= 0:
            raise ValueError(f"block '{self.name}' has non-positive size {self.rows}×{self.cols}")

    @property
    def weights(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class ArrayGeometry:
    """Arrays available for packing, in weights; ``count=None`` means as many arrays as needed."""

    rows: int
    weight_cols: int
    count: int | None = 1

    @classmethod
    def from_target(cls, target: Any) -> ArrayGeometry:
        """Geometry of a :class:`cimc.targets.schema.Target` (duck-typed: ``target.array``)."""
        array = target.array
        return cls(rows=array.rows, weight_cols=array.weight_cols, count=array.count)

    @property
    def weights_per_array(self) -> int:
        return self.rows * self.weight_cols


@dataclass(frozen=True)
class Tile:
    """A piece of a block: ``rows × cols`` starting at ``(src_row0, src_col0)`` of the block's matrix."""

    block: str
    tile_index: int
    rows: int
    cols: int
    src_row0: int
    src_col0: int


@dataclass(frozen=True)
class Placement:
    """A tile on an array: weight rows ``row0 .. row0+rows`` and weight columns ``col0 .. col0+cols``."""

    block: str
    tile_index: int
    array_index: int
    row0: int
    col0: int
    rows: int
    cols: int
    src_row0: int
    src_col0: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Packing:
    """Result of :func:`pack_blocks`: placements in block order, then tile order, and utilisation."""

    placements: list[Placement]
    geometry: ArrayGeometry
    arrays_used: int
    array_utilisation: list[float] = field(default_factory=list)

    @property
    def weights_placed(self) -> int:
        return sum(p.rows * p.cols for p in self.placements)

    @property
    def utilisation(self) -> float:
        """Used / available devices over all arrays of the target (arrays used, when unbounded)."""
        arrays = self.geometry.count if self.geometry.count is not None else max(self.arrays_used, 1)
        return self.weights_placed / (arrays * self.geometry.weights_per_array)

    def for_block(self, name: str) -> list[Placement]:
        return [p for p in self.placements if p.block == name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "geometry": asdict(self.geometry),
            "arrays_used": self.arrays_used,
            "utilisation": self.utilisation,
            "array_utilisation": list(self.array_utilisation),
            "placements": [p.to_dict() for p in self.placements],
        }


def split_block(block: Block, geometry: ArrayGeometry, max_cols: int | None = None) -> list[Tile]:
    """Cut a block into tiles no larger than one array (and no wider than ``max_cols``), row-major."""
    width = geometry.weight_cols if max_cols is None else min(max_cols, geometry.weight_cols)
    tiles: list[Tile] = []
    for src_row0 in range(0, block.rows, geometry.rows):
        for src_col0 in range(0, block.cols, width):
            rows = min(geometry.rows, block.rows - src_row0)
            cols = min(width, block.cols - src_col0)
            tiles.append(Tile(block.name, len(tiles), rows, cols, src_row0, src_col0))
    return tiles


# --- MaxRects bin -----------------------------------------------------------------------------------------

_Rect = tuple[int, int, int, int]  # (row0, col0, rows, cols)


class _MaxRectsBin:
    """One array as a list of maximal free rectangles (Jylänki's MaxRects, no rotation)."""

    def __init__(self, rows: int, cols: int):
        self.free: list[_Rect] = [(0, 0, rows, cols)]
        self.used_weights = 0

    def find(self, rows: int, cols: int, score: Callable[[_Rect, int, int], tuple]) -> _Rect | None:
        best: _Rect | None = None
        best_score: tuple | None = None
        for rect in self.free:
            if rect[2] >= rows and rect[3] >= cols:
                s = score(rect, rows, cols)
                if best_score is None or s < best_score:
                    best, best_score = rect, s
        return None if best is None else (best[0], best[1], rows, cols)

    def place(self, spot: _Rect) -> None:
        r0, c0, h, w = spot
        kept: list[_Rect] = []
        pieces: list[_Rect] = []
        for fr in self.free:
            fr0, fc0, fh, fw = fr
            if fr0 >= r0 + h or fr0 + fh <= r0 or fc0 >= c0 + w or fc0 + fw <= c0:
                kept.append(fr)
                continue
            # The parts of the free rectangle above, below, left and right of the placed tile.
            if fr0 < r0:
                pieces.append((fr0, fc0, r0 - fr0, fw))
            if fr0 + fh > r0 + h:
                pieces.append((r0 + h, fc0, fr0 + fh - (r0 + h), fw))
            if fc0 < c0:
                pieces.append((fr0, fc0, fh, c0 - fc0))
            if fc0 + fw > c0 + w:
                pieces.append((fr0, c0 + w, fh, fc0 + fw - (c0 + w)))
        self.free = _prune(kept, pieces)
        self.used_weights += h * w


def _contains(a: _Rect, b: _Rect) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and a[0] + a[2] >= b[0] + b[2] and a[1] + a[3] >= b[1] + b[3]


def _prune(kept: list[_Rect], pieces: list[_Rect]) -> list[_Rect]:
    # Kept rectangles were already maximal among themselves: only pairs involving a new piece can nest.
    fresh: list[_Rect] = []
    for i, p in enumerate(pieces):
        if any(_contains(q, p) for q in kept):
            continue
        if any(_contains(q, p) and (q != p or j < i) for j, q in enumerate(pieces) if j != i):
            continue
        fresh.append(p)
    kept = [k for k in kept if not any(_contains(p, k) for p in fresh)]
    return kept + fresh


def _score_short_side(rect: _Rect, rows: int, cols: int) -> tuple:
    left_r, left_c = rect[2] - rows, rect[3] - cols
    return (min(left_r, left_c), max(left_r, left_c), rect[0], rect[1])


def _score_area(rect: _Rect, rows: int, cols: int) -> tuple:
    left_r, left_c = rect[2] - rows, rect[3] - cols
    return (rect[2] * rect[3] - rows * cols, min(left_r, left_c), rect[0], rect[1])


def _score_bottom_left(rect: _Rect, rows: int, cols: int) -> tuple:
    return (rect[0] + rows, rect[1])


_HEURISTICS: dict[str, Callable[[_Rect, int, int], tuple]] = {
    "short-side": _score_short_side,
    "area": _score_area,
    "bottom-left": _score_bottom_left,
}

_ORDERINGS: dict[str, Callable[[Tile], tuple]] = {
    "rows": lambda t: (-t.rows, -t.cols),
    "area": lambda t: (-t.rows * t.cols, -t.rows),
    "cols": lambda t: (-t.cols, -t.rows),
    "max-side": lambda t: (-max(t.rows, t.cols), -t.rows * t.cols),
}


# --- packing ----------------------------------------------------------------------------------------------


def pack_blocks(blocks: Sequence[Block], geometry: ArrayGeometry) -> Packing:
    """Split and place ``blocks`` on ``geometry``; raise :class:`FitError` with the numbers if they do not fit."""
    _check_unique(blocks)
    needed = sum(b.weights for b in blocks)
    if geometry.count is not None and needed > geometry.count * geometry.weights_per_array:
        raise _fit_error(blocks, geometry, needed, "not enough weights")
    width = geometry.weight_cols
    while True:
        tiles = [t for b in blocks for t in split_block(b, geometry, max_cols=width)]
        result = _try_orderings(tiles, geometry)
        if result is not None:
            return _finish(result, tiles, geometry, blocks)
        if width <= 16 or geometry.count is None:
            break
        # No ordering fits: cut wide tiles into column pieces, which packs around fragmentation.
        width = max(1, width // 2)
        logger.debug("packing retried with column pieces of at most %d weights", width)
    raise _fit_error(blocks, geometry, needed, "fragmentation")


def _try_orderings(tiles: list[Tile], geometry: ArrayGeometry) -> list[tuple[Tile, int, _Rect]] | None:
    for order in _ORDERINGS.values():
        ordered = sorted(tiles, key=order)
        for score in _HEURISTICS.values():
            result = _pack_ordered(ordered, geometry, score)
            if result is not None:
                return result
    return None


def _pack_ordered(
    tiles: Iterable[Tile], geometry: ArrayGeometry, score: Callable[[_Rect, int, int], tuple]
) -> list[tuple[Tile, int, _Rect]] | None:
    bins: list[_MaxRectsBin] = []
    out: list[tuple[Tile, int, _Rect]] = []
    for tile in tiles:
        spot, index = None, -1
        for index, bin_ in enumerate(bins):
            spot = bin_.find(tile.rows, tile.cols, score)
            if spot is not None:
                break
        if spot is None:
            if geometry.count is not None and len(bins) >= geometry.count:
                return None
            bins.append(_MaxRectsBin(geometry.rows, geometry.weight_cols))
            index = len(bins) - 1
            spot = bins[index].find(tile.rows, tile.cols, score)
            assert spot is not None  # a tile is never larger than an array (split_block)
        bins[index].place(spot)
        out.append((tile, index, spot))
    return out


def _finish(
    result: list[tuple[Tile, int, _Rect]], tiles: list[Tile], geometry: ArrayGeometry, blocks: Sequence[Block]
) -> Packing:
    order = {t: i for i, t in enumerate(tiles)}
    result.sort(key=lambda item: order[item[0]])
    placements = [
        Placement(t.block, t.tile_index, a, r[0], r[1], t.rows, t.cols, t.src_row0, t.src_col0)
        for t, a, r in result
    ]
    arrays_used = 1 + max((p.array_index for p in placements), default=-1)
    n_arrays = geometry.count if geometry.count is not None else arrays_used
    used = [0] * n_arrays
    for p in placements:
        used[p.array_index] += p.rows * p.cols
    packing = Packing(placements, geometry, arrays_used, [u / geometry.weights_per_array for u in used])
    logger.info(
        "packed %d blocks as %d tiles on %d array(s), utilisation %.1f %%",
        len(blocks),
        len(placements),
        arrays_used,
        100 * packing.utilisation,
    )
    return packing


def _check_unique(blocks: Sequence[Block]) -> None:
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate block names {dup}: each block needs a unique name")


def _fit_error(blocks: Sequence[Block], geometry: ArrayGeometry, needed: int, why: str) -> FitError:
    count = geometry.count or 0
    available = count * geometry.weights_per_array
    largest = max(blocks, key=lambda b: b.weights)
    min_arrays = math.ceil(needed / geometry.weights_per_array)
    reason = (
        f"needs {needed:,} weights but the target has {available:,}"
        if why == "not enough weights"
        else f"needs {needed:,} of {available:,} weights ({100 * needed / available:.1f} %) but the blocks "
        "cannot be packed without overlap"
    )
    return FitError(
        f"model does not fit: {reason} ({count} array(s) of {geometry.rows}×{geometry.weight_cols} weights, "
        f"at least {min_arrays} array(s) needed); largest layer '{largest.name}' is {largest.rows}×{largest.cols} "
        f"({largest.weights:,} weights)"
    )


def check_packing(packing: Packing, blocks: Sequence[Block]) -> None:
    """Raise ``AssertionError`` unless tiles do not overlap and cover every weight of every block once.

    Vectorised with numpy occupancy grids; meant for tests and debug builds.
    """
    import numpy as np

    geometry = packing.geometry
    grids = np.zeros((max(packing.arrays_used, 1), geometry.rows, geometry.weight_cols), dtype=np.int32)
    for p in packing.placements:
        assert p.row0 >= 0 and p.col0 >= 0, p
        assert p.row0 + p.rows <= geometry.rows and p.col0 + p.cols <= geometry.weight_cols, p
        grids[p.array_index, p.row0 : p.row0 + p.rows, p.col0 : p.col0 + p.cols] += 1
    assert grids.max(initial=0) <= 1, "tiles overlap"
    for block in blocks:
        cover = np.zeros((block.rows, block.cols), dtype=np.int32)
        for p in packing.for_block(block.name):
            cover[p.src_row0 : p.src_row0 + p.rows, p.src_col0 : p.src_col0 + p.cols] += 1
        assert (cover == 1).all(), f"block '{block.name}' not covered exactly once"
