"""The compiled model: what ``cimc compile`` writes and every later command reads.

A compiled-model directory holds:

======================  ===============================================================================
``model.onnx``          the canonical model, still a valid ONNX file (Netron opens it, onnxruntime runs
                        it); placement, quantisation and schedule in ``metadata_props`` (keys ``cimc.*``)
``model.qdq.onnx``      with calibration: the quantised digital twin — DAC and per-tile ADC as standard
                        QuantizeLinear/DequantizeLinear pairs — that onnxruntime runs
``target.yaml``         the resolved target (every default filled in) it was compiled for
``report.json``         cost and mapping report (keys documented in ``docs/compile-report.md``)
``occupancy.png``       which layer sits where on the array(s)
``schedule.trace.json`` the schedule as Chrome trace events (open in Perfetto or chrome://tracing)
``manifest.json``       format version, cimc version, source model SHA-256, pipeline, file list
======================  ===============================================================================
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from cimc.errors import InputError
from cimc.report import atomic_dir, format_table, human, write_json_atomic, write_text_atomic

__all__ = ["ARTIFACT_FORMAT", "CompiledModel", "sha256_file"]

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = "cimc-compiled/1"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CompiledModel:
    """A model mapped and scheduled onto a target, with its cost estimate."""

    model: ir.Model
    target: Any  # cimc.targets.Target
    cost: Any  # cimc.runtime.cost.CostReport
    source: str = ""
    source_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------------- views
    @property
    def mapping(self) -> dict[str, Any]:
        return json.loads(self.model.metadata_props.get("cimc.mapping", "{}"))

    @property
    def schedule(self) -> dict[str, Any]:
        return json.loads(self.model.metadata_props.get("cimc.schedule", "{}"))

    @property
    def pipeline(self) -> str:
        return self.model.metadata_props.get("cimc.pipeline", "")

    def analog_nodes(self) -> list[ir.Node]:
        return [n for n in self.model.graph if "cimc.placement" in n.metadata_props]

    def report(self) -> dict[str, Any]:
        """The report.json content: headline numbers first, then per-layer rows."""
        cost = self.cost.to_dict()
        mapping = self.mapping
        layers = []
        by_name = {layer["name"]: layer for layer in cost["layers"]}
        for node in self.model.graph:
            row = dict(by_name.get(node.name, {"name": node.name}))
            row["op_type"] = node.op_type
            if "cimc.placement" in node.metadata_props:
                row["matrix"] = json.loads(node.metadata_props["cimc.matrix"])
                row["placement"] = json.loads(node.metadata_props["cimc.placement"])
            if "cimc.quant" in node.metadata_props:
                row["quantization"] = json.loads(node.metadata_props["cimc.quant"])
            if "cimc.schedule" in node.metadata_props:
                row["schedule"] = json.loads(node.metadata_props["cimc.schedule"])
            layers.append(row)
        return {
            "format": "cimc-report/1",
            "source": self.source,
            "source_sha256": self.source_sha256,
            "target": self.target.name,
            "pipeline": self.pipeline,
            "ops_definition": cost["ops_definition"],
            "tops_per_w": cost["tops_per_w"],
            "tops": cost["tops"],
            "energy_per_inference_j": cost["total_energy_j"],
            "energy_breakdown_j": cost["energy_j"],
            "latency_s": cost["latency_s"],
            "period_s": cost["period_s"],
            "inferences_per_s": cost["inferences_per_s"],
            "cycles": cost["cycles"],
            "macs": cost["macs"],
            "utilization": mapping.get("utilization"),
            "arrays_used": mapping.get("arrays_used"),
            "sram_peak_bytes": self.schedule.get("sram_peak_bytes"),
            "execution": self.target.execution,
            "settings": cost["settings"],
            "layers": layers,
        }

    def to_pandas(self) -> Any:
        """One row per scheduled layer of report.json: name, op, kind, cycles, energy, placement (needs pandas)."""
        from cimc.runtime.simulator import _pandas

        pd = _pandas()
        rows = []
        for row in self.report()["layers"]:
            rows.append({"name": row["name"], "op_type": row.get("op_type"), "kind": row.get("kind"),
                         "cycles": row.get("cycles"), "energy_j": row.get("total_energy_j"),
                         "mvms": row.get("mvms"), "tiles": len(row.get("placement", []))})
        return pd.DataFrame(rows)

    def plot(self, path: str | Path | None = None) -> Any:
        """The occupancy figure (a matplotlib Figure; also saved to ``path`` if given)."""
        from cimc.plots import plot_occupancy

        return plot_occupancy(self, path)

    def summary_table(self) -> str:
        """Per-layer terminal table (analog layers and the digital ops between them) and the totals."""
        cost_by_name = {layer.name: layer for layer in self.cost.layers}
        rows = []
        for node in self.model.graph:
            c = cost_by_name.get(node.name)
            if c is None:
                continue
            if "cimc.placement" in node.metadata_props:
                m = json.loads(node.metadata_props["cimc.matrix"])
                tiles = json.loads(node.metadata_props["cimc.placement"])
                arrays = sorted({t["array"] for t in tiles})
                where = (
                    f"r{tiles[0]['row0']}:{tiles[0]['row0'] + tiles[0]['rows']} c{tiles[0]['col0']}:{tiles[0]['col0'] + tiles[0]['cols']}"
                    if len(tiles) == 1
                    else f"{len(tiles)} tiles on {'array' if len(arrays) == 1 else 'arrays'} {_ranges(arrays)}"
                )
                shape = f"{m['rows']}x{m['cols']}" + (f" x{m['groups']}g" if m["groups"] > 1 else "")
                rows.append([node.name, node.op_type, shape, where, m["mvms"], c.cycles, human(c.total_energy_j, "J")])
            elif c.total_energy_j > 0 and c.cycles > 0:
                rows.append([node.name, node.op_type, "", "digital", "", c.cycles, human(c.total_energy_j, "J")])
        table = format_table(["layer", "op", "K x N", "placement", "MVMs", "cycles", "energy"], rows, right=(4, 5, 6))
        r = self.report()
        e = r["energy_breakdown_j"]
        parts = ", ".join(f"{k} {100 * v / r['energy_per_inference_j']:.0f}%" for k, v in e.items() if v > 0)
        return (
            f"{table}\n\n"
            f"target {self.target.name} ({r['execution']}): {r['arrays_used']} array(s), utilisation "
            f"{100 * (r['utilization'] or 0):.1f} %, SRAM peak {human(r['sram_peak_bytes'] or 0, 'B')}\n"
            f"per inference: {r['macs']:,} analog MACs, latency {human(r['latency_s'], 's')}, "
            f"energy {human(r['energy_per_inference_j'], 'J')} ({parts})\n"
            f"throughput {r['inferences_per_s']:.4g} inferences/s; efficiency {r['tops_per_w']:.3g} TOPS/W "
            f"(ops = 2 x analog MACs)\n{self._notes()}"
        )

    def _notes(self) -> str:
        """What the compiled shapes and converters assume, said once."""
        shape = self.model.graph.inputs[0].shape if self.model.graph.inputs else None
        batch = shape[0] if shape is not None and len(shape) else 1
        calibrated = any("cimc.quant" in n.metadata_props for n in self.model.graph)
        digital = json.loads(self.model.metadata_props.get("cimc.digital", "[]"))
        notes = [f"batch dimension fixed at {batch} (model.onnx, model.qdq.onnx and the schedule)"]
        notes.append("converters calibrated (model.qdq.onnx is the quantised twin)" if calibrated else
                     "converters NOT modelled: compiled without --calib, DAC/ADC are ideal")
        if digital:
            notes.append(f"kept digital: {', '.join(digital)}")
        return "; ".join(notes)

    # ------------------------------------------------------------------------------------ save/load
    def save(self, out_dir: str | Path, plots: bool = True) -> Path:
        """Write the directory atomically (built under a temporary name, renamed into place)."""
        from cimc.targets import target_yaml

        out = Path(out_dir)
        with atomic_dir(out) as tmp:
            ir.save(self.model, tmp / "model.onnx")
            write_text_atomic(tmp / "target.yaml", target_yaml(self.target))
            write_json_atomic(tmp / "report.json", self.report())
            write_json_atomic(tmp / "schedule.trace.json", self.chrome_trace())
            files = ["model.onnx", "target.yaml", "report.json", "schedule.trace.json"]
            if any("cimc.quant" in n.metadata_props for n in self.model.graph):
                from cimc.passes.quantize import build_qdq_twin

                ir.save(build_qdq_twin(self.model), tmp / "model.qdq.onnx")
                files.append("model.qdq.onnx")
            if plots:
                from cimc.plots import plot_occupancy

                plot_occupancy(self, tmp / "occupancy.png")
                files.append("occupancy.png")
            from cimc import __version__

            write_json_atomic(
                tmp / "manifest.json",
                {"format": ARTIFACT_FORMAT, "cimc_version": __version__, "source": self.source,
                 "source_sha256": self.source_sha256, "target": self.target.name, "pipeline": self.pipeline,
                 "files": files, **self.extra},
            )
        return out

    @classmethod
    def load(cls, path: str | Path) -> CompiledModel:
        """Read a compiled-model directory (or its model.onnx) back."""
        from cimc.passes.schedule import build_workload, execution_order
        from cimc.runtime.cost import estimate_cost
        from cimc.targets import load_target

        p = Path(path)
        folder = p.parent if p.suffix == ".onnx" else p
        manifest_path = folder / "manifest.json"
        if not folder.is_dir() or not manifest_path.is_file():
            raise InputError(
                f"{p}: not a compiled-model directory (no manifest.json); run 'cimc compile MODEL.onnx -o DIR' first"
            )
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != ARTIFACT_FORMAT:
            raise InputError(f"{folder}: compiled with an unknown format {manifest.get('format')!r}; recompile it")
        model = ir.load(folder / "model.onnx")
        target = load_target(folder / "target.yaml")
        cost = estimate_cost(target, build_workload(execution_order(model.graph)))
        extra = {k: v for k, v in manifest.items() if k not in
                 ("format", "cimc_version", "source", "source_sha256", "target", "pipeline", "files")}
        return cls(model, target, cost, manifest.get("source", ""), manifest.get("source_sha256", ""), extra)

    def chrome_trace(self) -> dict[str, Any]:
        """The schedule of one inference as Chrome trace events (µs): one track per array/core (an analog
        layer appears on every core that holds a tile of it, so a pipelined schedule shows core by core) and
        one for the digital unit."""
        clock = self.target.clock_hz
        unit = "core" if self.target.execution == "pipelined" or (self.target.array.count or 1) > 1 else "array"
        digital_tid = 0
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"{self.target.name} (one inference)"}},
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": digital_tid, "args": {"name": "digital unit"}},
            {"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": digital_tid, "args": {"sort_index": 1 << 20}},
        ]
        cores: set[int] = set()
        cost_by_name = {layer.name: layer for layer in self.cost.layers}
        for node in self.model.graph:
            slot = node.metadata_props.get("cimc.schedule")
            if not slot:
                continue
            s = json.loads(slot)
            c = cost_by_name.get(node.name)
            if s["end_cycle"] == s["start_cycle"]:
                continue
            base = {
                "name": node.name, "cat": node.op_type, "ph": "X", "pid": 0,
                "ts": s["start_cycle"] / clock * 1e6, "dur": (s["end_cycle"] - s["start_cycle"]) / clock * 1e6,
                "args": {"op": node.op_type, "cycles": s["end_cycle"] - s["start_cycle"], "stage": s["stage"],
                         "energy_j": c.total_energy_j if c else 0.0, "mvms": c.mvms if c else 0},
            }
            if s["unit"] == "array" and "cimc.placement" in node.metadata_props:
                arrays = sorted({t["array"] for t in json.loads(node.metadata_props["cimc.placement"])})
                for a in arrays:
                    cores.add(a)
                    events.append({**base, "tid": a + 1, "args": {**base["args"], unit: a}})
            else:
                events.append({**base, "tid": digital_tid})
        for a in sorted(cores):
            events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": a + 1, "args": {"name": f"{unit} {a}"}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": a + 1, "args": {"sort_index": a}})
        return {"traceEvents": events, "displayTimeUnit": "ns"}


def _ranges(values: list[int]) -> str:
    if not values:
        return ""
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))
