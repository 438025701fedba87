"""Order the ops, size the activation SRAM, and lay the ops out in time with the cost model.

1. A networkx dependency graph of the ops; the execution order is its topological order, ties broken by the
   graph's own order (deterministic).
2. ``layer-serial`` (AON-CIM): ops run one after another; each analog use performs its MVMs on the array
   with only its block's rows and columns active; digital ops run on the digital unit. ``pipelined``
   (multi-core): each core is a stage; the uses placed on one core (small layers packed together, every use
   of a shared weight) run on it in turn, so the busiest core sets the period (``shared_cores`` lists where
   that happens). The execution mode is the one the ``map`` pass chose (``cimc.mapping["execution"]``).
3. Buffer liveness: a tensor lives from the step that produces it to the last step that reads it; the peak of
   live bytes (activations at the converters' precision) is the SRAM needed. More than the target's SRAM is a
   :class:`~cimc.errors.FitError` with the numbers.
4. The cost model (:mod:`cimc.runtime.cost`) gives each op's cycles; the schedule records each op's cycle
   window.

Durable results: node ``metadata_props["cimc.schedule"]`` = ``{"step", "unit", "stage", "start_cycle",
"end_cycle"}`` (analog uses also ``"layer"`` and ``"cores"``); model ``metadata_props["cimc.schedule"]`` = order,
SRAM peak, execution mode, latency / period / throughput, cores shared by several uses, and the costed
execution choices; the cost report goes to ``ctx.results["cost"]``.

Copies of a replicated layer (``--replicate``) are ops like any other; on a pipelined chip, copies on cores of
their own share one start cycle (they read the same input at once), as the cost model counts them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import onnx_ir as ir

from cimc.errors import FitError
from cimc.ir import is_analog, layer_of, placements_of
from cimc.pipeline import CimcPass, CompileContext, register_pass
from cimc.runtime.cost import estimate_cost
from cimc.runtime.workload import REPLICA_KEY, _numel, activation_bytes, build_workload, digital_ops, execution_order  # noqa: F401

__all__ = ["SchedulePass", "build_workload", "execution_order", "activation_bytes", "digital_ops"]

logger = logging.getLogger(__name__)


def _sram_peak_bytes(graph: ir.Graph, order: list[ir.Node], bytes_per_value: int) -> tuple[int, int]:
    """(peak live bytes, step at which it occurs) over the execution order."""
    step_of = {n.name: i for i, n in enumerate(order)}
    last = len(order)
    intervals: list[tuple[int, int, int]] = []
    for v in graph.inputs:
        users = [step_of[u.name] for u, _ in v.uses() if u.name in step_of]
        intervals.append((0, max(users, default=0), _numel(v) * bytes_per_value))
    for node in order:
        for v in node.outputs:
            users = [step_of[u.name] for u, _ in v.uses() if u.name in step_of]
            end = last if v.is_graph_output() else max(users, default=step_of[node.name])
            intervals.append((step_of[node.name], end, _numel(v) * bytes_per_value))
    live = [0] * (last + 1)
    for start, end, size in intervals:
        for s in range(start, end + 1):
            live[s] += size
    peak = max(live)
    return peak, live.index(peak)


def _concurrent_copies(order: list[ir.Node]) -> dict[str, str]:
    """Copies of a replicated layer (``cimc.replica``) whose cores are pairwise disjoint: node -> layer. On a
    pipelined chip they read the same input at once (the cost model counts the slowest copy)."""
    groups: dict[str, list[ir.Node]] = {}
    for node in order:
        replica = json.loads(node.metadata_props.get(REPLICA_KEY) or "{}")
        if "index" in replica and "cimc.placement" in node.metadata_props:
            groups.setdefault(replica["of"], []).append(node)
    out: dict[str, str] = {}
    for name, copies in groups.items():
        cores = [{t["array"] for t in placements_of(n)} for n in copies]
        if sum(len(c) for c in cores) == len(set().union(*cores)):
            out.update({n.name: name for n in copies})
    return out


@register_pass("schedule")
@dataclass
class SchedulePass(CimcPass):
    """Order ops, check the SRAM, and lay them out in time (see the module docstring)."""

    ctx: CompileContext = field(repr=False)

    def requires(self, model: ir.Model) -> None:
        for node in model.graph:
            if is_analog(node) and not placements_of(node):
                raise ir.passes.PreconditionError(f"analog op {node.name!r} is not mapped: run 'map' before 'schedule'")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        target = self.ctx.target
        graph = model.graph
        order = execution_order(graph)
        per_value = activation_bytes(target)
        peak, at_step = _sram_peak_bytes(graph, order, per_value)
        sram = target.sram.size_bytes
        if sram is not None and peak > sram:
            raise FitError(
                f"activations need {peak:,} bytes of SRAM at step {at_step} ({order[min(at_step, len(order) - 1)].name}) "
                f"but target '{target.name}' has {sram:,}; use a smaller input or fewer channels, or a target with more SRAM"
            )
        mapping = json.loads(model.metadata_props.get("cimc.mapping", "{}"))
        execution = mapping.get("execution") or target.execution
        cost = estimate_cost(target, build_workload(order, name=graph.name or "", execution=execution))
        stage = -1
        cycle = 0
        side_by_side = _concurrent_copies(order) if execution == "pipelined" else {}
        group_start: dict[str, int] = {}
        for step, (node, layer) in enumerate(zip(order, cost.layers)):
            analog = is_analog(node) and "cimc.placement" in node.metadata_props
            if analog:
                stage += 1
            start = cycle
            group = side_by_side.get(node.name)
            if group is not None:  # a copy of a replicated layer on cores of its own: starts with the first copy
                start = group_start.setdefault(group, cycle)
            window = {
                "step": step,
                "unit": "array" if analog else "digital",
                "stage": max(stage, 0),
                "start_cycle": start,
                "end_cycle": start + layer.cycles,
            }
            if analog:
                window["layer"] = layer_of(node)
                window["cores"] = sorted({t["array"] for t in placements_of(node)})
            node.metadata_props["cimc.schedule"] = json.dumps(window)
            cycle = max(cycle, start + layer.cycles)
        shared = {str(k): v for k, v in sorted(cost.shared_cores.items())}
        if execution == "pipelined" and shared:
            busiest = max(cost.core_busy_s, key=lambda k: cost.core_busy_s[k])
            logger.info("pipelined: %d core(s) run several uses in turn; the busiest, core %d (%s), sets the period "
                        "%.3g s", len(shared), busiest, ", ".join(cost.core_users[busiest][:4]),
                        cost.core_busy_s[busiest])
        model.metadata_props["cimc.schedule"] = json.dumps(
            {"execution": execution, "order": [n.name for n in order], "sram_peak_bytes": peak,
             "sram_bytes": sram, "bytes_per_activation": per_value, "cycles": cycle,
             "latency_s": cost.latency_s, "period_s": cost.period_s, "inferences_per_s": cost.inferences_per_s,
             "shared_cores": shared, "choices": mapping.get("choices", {})}
        )
        self.ctx.results["cost"] = cost
        self.ctx.results["order"] = order
        return ir.passes.PassResult(model, True)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if "cimc.schedule" not in node.metadata_props:
                raise ir.passes.PostconditionError(f"op {node.name!r} has no schedule slot")
