"""Map analog ops onto the target's crossbars.

Each analog op (Conv, Gemm, MatMul with a constant weight) becomes one weight matrix per group — K rows
(C_in/groups · kh · kw inputs) × N columns (outputs per group) — and each matrix a block for the packer
(:mod:`cimc.passes.packing`): blocks larger than an array are split into tiles (row splits give partial sums
the digital unit adds; column splits are free), then every tile gets an array and a row/column window.
On pipelined (multi-core) targets each layer gets cores of its own, so that all stages compute at once.

Durable results (saved inside the compiled ONNX file):

* node ``metadata_props["cimc.matrix"]`` — ``{"rows", "cols", "groups", "mvms"}``;
* node ``metadata_props["cimc.placement"]`` — a list of tiles ``{"group", "tile", "array", "row0", "col0",
  "rows", "cols", "src_row0", "src_col0"}`` in weight units (device columns = weight columns ×
  devices per weight; the G+ device of weight column c is device column 2c, G− is 2c+1);
* model ``metadata_props["cimc.mapping"]`` — arrays used, utilisation (used devices / available devices).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace

import onnx_ir as ir

from cimc.ir import DIGITAL_KEY, analog_matrix, classify, is_analog
from cimc.errors import FitError, InputError, UnsupportedOpError
from cimc.passes.packing import ArrayGeometry, Block, Packing, Placement, pack_blocks
from cimc.pipeline import CimcPass, CompileContext, register_pass

__all__ = ["MapPass", "block_name", "placements_of"]

logger = logging.getLogger(__name__)


def block_name(node_name: str, group: int, groups: int) -> str:
    return node_name if groups == 1 else f"{node_name}#g{group}"


def placements_of(node: ir.Node) -> list[dict[str, int]]:
    """The tiles a mapped node occupies (empty when it was not mapped)."""
    raw = node.metadata_props.get("cimc.placement")
    return json.loads(raw) if raw else []


def _pack_per_layer(nodes: list[ir.Node], matrices: dict, geometry: ArrayGeometry) -> Packing:
    """Pipelined targets: every layer on cores of its own, so all layers can compute at once."""
    placements: list[Placement] = []
    utilisation: list[float] = []
    next_core = 0
    largest = ("", 0)
    for node in nodes:
        m = matrices[node.name]
        blocks = [Block(block_name(node.name, g, m.groups), m.rows, m.cols) for g in range(m.groups)]
        own = pack_blocks(blocks, ArrayGeometry(geometry.rows, geometry.weight_cols, None))
        placements += [replace(p, array_index=p.array_index + next_core) for p in own.placements]
        utilisation += list(own.array_utilisation)
        next_core += own.arrays_used
        largest = max(largest, (node.name, own.arrays_used), key=lambda item: item[1])
    if geometry.count is not None and next_core > geometry.count:
        needed = sum(p.rows * p.cols for p in placements)
        raise FitError(
            f"model does not fit: with every layer on cores of its own (pipelined execution) it needs {next_core} "
            f"cores of {geometry.rows}x{geometry.weight_cols} weights ({needed:,} weights) but the target has "
            f"{geometry.count} (largest layer '{largest[0]}' alone takes {largest[1]} cores); use a target with more cores, layer-serial execution, or fewer channels"
        )
    return Packing(placements, geometry, next_core, utilisation)


def mark_digital(model: ir.Model, names: tuple[str, ...] | list[str]) -> None:
    """Keep the named analog layers off the crossbar: they run in float on the digital unit (and are costed
    there). Names are the compiled model's layer names (as ``cimc inspect``/``diagnose`` show them)."""
    if not names:
        return
    by_name = {n.name: n for n in model.graph}
    analog = [n.name for n in model.graph if is_analog(n)]
    unknown = [name for name in names if name not in by_name]
    if unknown:
        shown = ", ".join(analog[:12]) + (" ..." if len(analog) > 12 else "")
        raise InputError(f"--digital {', '.join(unknown)}: no such layer; analog layers are: {shown}")
    not_analog = [name for name in names if name not in analog and not by_name[name].metadata_props.get(DIGITAL_KEY)]
    if not_analog:
        raise InputError(f"--digital {', '.join(not_analog)}: not an analog layer (it already runs digitally)")
    for name in names:
        by_name[name].metadata_props[DIGITAL_KEY] = "1"
    model.metadata_props[DIGITAL_KEY] = json.dumps(sorted(set(names)))
    logger.info("kept digital: %s", ", ".join(names))


@register_pass("map")
@dataclass
class MapPass(CimcPass):
    """Assign every analog op's weight tiles to a crossbar window (see the module docstring)."""

    ctx: CompileContext = field(repr=False)

    def requires(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type == "BatchNormalization" and any(
                p is not None and p.producer() is not None and is_analog(p.producer()) for p in node.inputs[:1]
            ):
                logger.info("BatchNormalization %s after an analog op was not folded", node.name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        unsupported = [(c.name, c.op_type, c.reason) for c in classify(model) if c.kind == "unsupported"]
        if unsupported:  # every offending node at once, before any work
            raise UnsupportedOpError(unsupported)
        mark_digital(model, self.ctx.digital)
        target = self.ctx.target
        geometry = ArrayGeometry.from_target(target)
        nodes = [n for n in model.graph if is_analog(n)]
        blocks: list[Block] = []
        matrices = {}
        for node in nodes:
            m = analog_matrix(node)
            matrices[node.name] = m
            blocks += [Block(block_name(node.name, g, m.groups), m.rows, m.cols) for g in range(m.groups)]
        if target.execution == "pipelined" and geometry.count != 1:
            packing = _pack_per_layer(nodes, matrices, geometry)
        else:
            packing = pack_blocks(blocks, geometry)
        for node in nodes:
            m = matrices[node.name]
            tiles = []
            for g in range(m.groups):
                for p in packing.for_block(block_name(node.name, g, m.groups)):
                    tiles.append(
                        {"group": g, "tile": p.tile_index, "array": p.array_index, "row0": p.row0, "col0": p.col0,
                         "rows": p.rows, "cols": p.cols, "src_row0": p.src_row0, "src_col0": p.src_col0}
                    )
            node.metadata_props["cimc.matrix"] = json.dumps(
                {"rows": m.rows, "cols": m.cols, "groups": m.groups, "mvms": m.mvms}
            )
            node.metadata_props["cimc.placement"] = json.dumps(tiles)
        summary = {
            "target": target.name,
            "arrays_used": packing.arrays_used,
            "array_rows": geometry.rows,
            "array_weight_cols": geometry.weight_cols,
            "devices_per_weight": target.array.devices_per_weight,
            "weights_placed": packing.weights_placed,
            "utilization": packing.utilisation,
            "array_utilization": list(packing.array_utilisation),
        }
        model.metadata_props["cimc.mapping"] = json.dumps(summary)
        self.ctx.results["packing"] = packing
        logger.info("mapped %d analog ops onto %d array(s), utilisation %.1f %%", len(nodes),
                    packing.arrays_used, 100 * packing.utilisation)
        return ir.passes.PassResult(model, True)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if is_analog(node) and not placements_of(node):
                raise ir.passes.PostconditionError(f"analog op {node.name!r} has no placement")
