"""``cimc inspect``: what a model contains and what of it maps onto the crossbar."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx_ir as ir

from cimc.ir import RECURRENT_OPS, analog_matrix, classify, static_shape, weight_value
from cimc.console import format_table, human

__all__ = ["InspectReport", "NodeRow", "inspect_model"]


@dataclass
class NodeRow:
    name: str
    op_type: str
    input_shapes: list[list[int] | None]
    output_shapes: list[list[int] | None]
    parameters: int
    macs: int
    kind: str  # analog | digital | unsupported
    reason: str
    matrix: dict[str, int] | None = None  # analog: rows, cols, groups, mvms
    tensors: list[str] = field(default_factory=list)  # float initializers it reads (counted once in the totals)
    weight: str | None = None  # analog: the weight tensor on the crossbar (shared when several nodes name it)


@dataclass
class InspectReport:
    model: str
    opset: int | None
    inputs: dict[str, list[int] | None]
    outputs: dict[str, list[int] | None]
    nodes: list[NodeRow] = field(default_factory=list)
    tensor_sizes: dict[str, int] = field(default_factory=dict)  # float initializer -> elements

    @property
    def totals(self) -> dict[str, Any]:
        """Counts over the model. Parameters and analog weights are *unique* (a tensor several nodes read is
        counted once: it is stored, and programmed, once); the ``_per_use`` variants count it at every node
        that reads it. MACs are per use (every use computes)."""
        by_kind: dict[str, int] = {}
        for n in self.nodes:
            by_kind[n.kind] = by_kind.get(n.kind, 0) + 1
        analog_ops: dict[str, int] = {}
        for n in self.nodes:
            if n.kind == "analog":
                analog_ops[n.op_type] = analog_ops.get(n.op_type, 0) + 1
        return {
            "nodes": len(self.nodes),
            "analog_nodes": by_kind.get("analog", 0),
            "digital_nodes": by_kind.get("digital", 0),
            "unsupported_nodes": by_kind.get("unsupported", 0),
            "analog_ops": analog_ops,
            "parameters": sum(self.tensor_sizes[t] for t in {t for n in self.nodes for t in n.tensors}),
            "parameters_per_use": sum(n.parameters for n in self.nodes),
            "analog_weights": sum(self.tensor_sizes.get(w, 0) for w in {n.weight for n in self.nodes if n.weight}),
            "analog_weights_per_use": sum(
                n.matrix["rows"] * n.matrix["cols"] * n.matrix["groups"] for n in self.nodes if n.matrix
            ),
            "shared_weights": {w: c for w, c in self._weight_uses().items() if c > 1},
            "macs": sum(n.macs for n in self.nodes),
            "analog_macs": sum(n.macs for n in self.nodes if n.kind == "analog"),
        }

    def _weight_uses(self) -> dict[str, int]:
        uses: dict[str, int] = {}
        for n in self.nodes:
            if n.weight:
                uses[n.weight] = uses.get(n.weight, 0) + 1
        return uses

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "opset": self.opset,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "nodes": [asdict(n) for n in self.nodes],
            "totals": self.totals,
        }

    def table(self) -> str:
        def shapes(s: list[list[int] | None]) -> str:
            return " ".join("x".join(map(str, d)) if d is not None else "?" for d in s)

        def runs_on(n: NodeRow) -> str:
            if n.kind == "unsupported":
                return f"UNSUPPORTED: {n.reason}"
            if n.op_type in RECURRENT_OPS and n.kind == "digital":  # as imported, before expansion
                return "expanded: analog MatMuls + digital gates"
            return n.kind

        rows = [
            [n.name, n.op_type, shapes(n.input_shapes[:1]), shapes(n.output_shapes), human(n.parameters) if n.parameters else "",
             human(n.macs) if n.macs else "", str(n.matrix["mvms"] * n.matrix["groups"]) if n.matrix else "",
             runs_on(n)]
            for n in self.nodes
        ]
        t = self.totals
        headers = ["node", "op", "input", "output", "params", "MACs", "MVMs", "runs on"]
        body = format_table(headers, rows, right=(4, 5, 6))
        ops = ", ".join(f"{v} {k}" for k, v in sorted(t["analog_ops"].items()))
        summary = (
            f"\n{t['nodes']} nodes: {t['analog_nodes']} analog ({ops or 'none'}), {t['digital_nodes']} digital, "
            f"{t['unsupported_nodes']} unsupported\n"
            f"parameters: {t['parameters']:,} ({human(t['parameters'])}); analog weights: {t['analog_weights']:,}"
            + (
                f" unique, {t['analog_weights_per_use']:,} counted per use ({len(t['shared_weights'])} weight "
                f"tensor(s) read by several nodes, placed on the crossbar once per distinct orientation)"
                if t["shared_weights"] else ""
            ) + "\n"
            f"MACs per inference: {t['macs']:,} ({human(t['macs'])}), of which analog {t['analog_macs']:,}"
        )
        return body + summary


def _shape(v: ir.Value | None) -> list[int] | None:
    s = static_shape(v)
    return list(s) if s is not None else None


def inspect_model(model: ir.Model, name: str = "", *, canonical: bool = True) -> InspectReport:
    """Per-node shapes, parameters, MACs and placement class of a model.

    ``canonical=False`` for a graph as imported (``inspect --raw``): recurrent layers that canonicalisation
    expands are reported as supported, with what they become.
    """
    graph = model.graph
    opset = model.opset_imports.get("", None)
    report = InspectReport(
        model=name or graph.name or "model",
        opset=opset,
        inputs={v.name: _shape(v) for v in graph.inputs},
        outputs={v.name: _shape(v) for v in graph.outputs},
    )
    classes = {c.name: c for c in classify(model, canonical=canonical)}
    for node in graph:
        cls = classes[node.name or f"<{node.op_type}>"]
        tensors = [
            v for v in node.inputs if v is not None and v.const_value is not None
            and v.is_initializer() and v.const_value.dtype.is_floating_point()
        ]
        params = sum(math.prod(v.const_value.shape) for v in tensors)  # type: ignore[union-attr]
        for v in tensors:
            report.tensor_sizes[v.name or ""] = math.prod(v.const_value.shape)  # type: ignore[union-attr]
        macs, matrix, weight = 0, None, None
        if cls.kind == "analog":
            w = weight_value(node)
            weight = w.name
            if weight is not None and weight not in report.tensor_sizes:  # a folded constant, not an initializer
                report.tensor_sizes[weight] = math.prod(w.const_value.shape)  # type: ignore[union-attr]
            m = analog_matrix(node)
            macs = m.macs
            matrix = {"rows": m.rows, "cols": m.cols, "groups": m.groups, "mvms": m.mvms}
        elif node.op_type in ("MatMul", "Gemm", "Conv"):
            out = static_shape(node.outputs[0])
            a = static_shape(node.inputs[0])
            if out is not None and a is not None:
                macs = math.prod(out) * a[-1]
        report.nodes.append(
            NodeRow(
                name=cls.name,
                op_type=node.op_type,
                input_shapes=[_shape(v) for v in node.inputs if v is not None and not v.is_initializer()],
                output_shapes=[_shape(v) for v in node.outputs],
                parameters=int(params),
                macs=int(macs),
                kind=cls.kind,
                reason=cls.reason,
                matrix=matrix,
                tensors=[v.name or "" for v in tensors],
                weight=weight,
            )
        )
    return report
