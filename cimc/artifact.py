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

from cimc import __version__
from cimc.errors import InputError
from cimc.frontend import _check_external_data
from cimc.optional import import_pandas as _pandas
from cimc.outputs import output_dir
from cimc.plots import plot_occupancy
from cimc.report import format_table, human, write_json_atomic, write_text_atomic
from cimc.runtime.cost import estimate_cost
from cimc.runtime.twin import build_qdq_twin
from cimc.runtime.workload import model_workload
from cimc.targets import load_target, target_yaml

__all__ = ["ARTIFACT_FORMAT", "CompiledModel", "load_compiled", "sha256_file"]

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
            "analog_tops_per_w": cost["tops_per_w"],
            "system_tops_per_w": cost["system_tops_per_w"],
            "system_ops_definition": cost["system_ops_definition"],
            "model_macs": cost["model_macs"],
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
            "arrays_available": mapping.get("arrays_available", self.target.array.count),
            "weights_placed": mapping.get("weights_placed"),
            "crossbar_layers": mapping.get("layers", len(self.analog_nodes())),
            "analog_uses": mapping.get("analog_nodes", len(self.analog_nodes())),
            "shared_weights": mapping.get("shared_weights", {}),
            "replication": mapping.get("replication", {}),
            "sram_peak_bytes": self.schedule.get("sram_peak_bytes"),
            "execution": self.cost.execution,
            "execution_requested": mapping.get("execution_requested", self.target.execution),
            "shared_cores": cost.get("shared_cores", {}),
            "execution_choices": mapping.get("choices", {}),
            "settings": cost["settings"],
            "layers": layers,
        }

    def to_pandas(self) -> Any:
        """One row per scheduled layer of report.json: name, op, kind, cycles, energy, placement (needs pandas)."""
        pd = _pandas()
        rows = []
        for row in self.report()["layers"]:
            rows.append({"name": row["name"], "op_type": row.get("op_type"), "kind": row.get("kind"),
                         "cycles": row.get("cycles"), "energy_j": row.get("total_energy_j"),
                         "mvms": row.get("mvms"), "tiles": len(row.get("placement", []))})
        return pd.DataFrame(rows)

    def plot(self, path: str | Path | None = None) -> Any:
        """The occupancy figure (a matplotlib Figure; also saved to ``path`` if given)."""
        return plot_occupancy(self, path)

    def summary_table(self) -> str:
        """Per-layer terminal table (analog layers and the digital ops between them) and the totals."""
        cost_by_name = {layer.name: layer for layer in self.cost.layers}
        rows = []
        seen_layers: set[str] = set()
        for node in self.model.graph:
            c = cost_by_name.get(node.name)
            if c is None:
                continue
            if "cimc.placement" in node.metadata_props:
                m = json.loads(node.metadata_props["cimc.matrix"])
                tiles = json.loads(node.metadata_props["cimc.placement"])
                arrays = sorted({t["array"] for t in tiles})
                layer = node.metadata_props.get("cimc.layer") or node.name
                if layer in seen_layers:  # a further use of a shared weight: same devices, placed once
                    where = f"= block {layer}"
                else:
                    seen_layers.add(layer)
                    where = (
                        f"r{tiles[0]['row0']}:{tiles[0]['row0'] + tiles[0]['rows']} c{tiles[0]['col0']}:{tiles[0]['col0'] + tiles[0]['cols']}"
                        if len(tiles) == 1
                        else f"{len(tiles)} tiles on {'array' if len(arrays) == 1 else 'arrays'} {_ranges(arrays)}"
                    )
                    if len(arrays) == 1 and (self.target.array.count or 0) > 1:
                        where = f"core {arrays[0]} " + where
                shape = f"{m['rows']}x{m['cols']}" + (f" x{m['groups']}g" if m["groups"] > 1 else "")
                rows.append([node.name, node.op_type, shape, where, m["mvms"], c.cycles, human(c.total_energy_j, "J")])
            elif c.total_energy_j > 0 and c.cycles > 0:
                rows.append([node.name, node.op_type, "", "digital", "", c.cycles, human(c.total_energy_j, "J")])
        table = format_table(["layer", "op", "K x N", "placement", "MVMs", "cycles", "energy"], rows, right=(4, 5, 6))
        r = self.report()
        e = r["energy_breakdown_j"]
        parts = ", ".join(f"{k} {100 * v / r['energy_per_inference_j']:.0f}%" for k, v in e.items() if v > 0)
        available = r["arrays_available"]
        of = f" of {available}" if available is not None else ""
        blocks = ""
        if r["shared_weights"]:
            blocks = f"; {r['crossbar_layers']} crossbar blocks for {r['analog_uses']} analog ops (shared weights placed once)"
        lines = [f"target {self.target.name} ({r['execution']}): {r['arrays_used']}{of} array(s) used, utilisation "
                 f"{100 * (r['utilization'] or 0):.1f} %, SRAM peak {human(r['sram_peak_bytes'] or 0, 'B')}{blocks}"]
        if r["shared_cores"] and r["execution"] == "pipelined":
            k, users = max(r["shared_cores"].items(), key=lambda kv: self.cost.core_busy_s.get(int(kv[0]), 0.0))
            lines.append(f"serialised: {len(r['shared_cores'])} core(s) run several ops in turn (busiest: core {k}, "
                         f"{len(users)} ops: {', '.join(users[:3])}{', ...' if len(users) > 3 else ''})")
        choices = r["execution_choices"]
        if len(choices) > 1:
            lines.append("execution choices: " + "; ".join(
                f"{mode}{' (chosen)' if mode == r['execution'] else ''}: {ch['arrays_used']} cores, latency "
                f"{human(ch['latency_s'], 's')}, {ch['inferences_per_s']:.4g} inferences/s"
                for mode, ch in sorted(choices.items())))
        digital_macs = r["model_macs"] - sum(
            c.model_macs for c in self.cost.layers if c.kind == "analog")
        moved = f", {digital_macs:,} of the model's MACs on the digital unit" if digital_macs else ""
        return (
            f"{table}\n\n" + "\n".join(lines) + "\n"
            f"per inference: energy {human(r['energy_per_inference_j'], 'J')} ({parts}), latency "
            f"{human(r['latency_s'], 's')}; {r['macs']:,} analog MACs{moved}\n"
            f"throughput {r['inferences_per_s']:.4g} inferences/s; system efficiency {r['system_tops_per_w']:.3g} "
            f"TOPS/W (the model's ops, analog and digital, over all energy); analog {r['tops_per_w']:.3g} TOPS/W "
            f"(ops = 2 x analog MACs, the figure papers quote)\n{self._notes()}"
        )

    def _notes(self) -> str:
        """What the compiled shapes and converters assume, said once."""
        shape = self.model.graph.inputs[0].shape if self.model.graph.inputs else None
        batch = shape[0] if shape is not None and len(shape) else 1
        calibrated = any("cimc.quant" in n.metadata_props for n in self.model.graph)
        digital = json.loads(self.model.metadata_props.get("cimc.digital", "[]"))
        notes = [f"batch dimension fixed at {batch} (model.onnx, model.qdq.onnx and the schedule)"]
        conv = self.target.converters
        if not calibrated:
            notes.append("converters NOT modelled: compiled without --calib, DAC/ADC are ideal")
        elif conv.dac_bits is None and conv.adc_bits is None:  # e.g. the ideal target: nothing to quantise
            notes.append("converters off on this target (dac_bits and adc_bits null): nothing is quantised, "
                         "model.qdq.onnx computes the float model")
        else:
            bits = ", ".join(f"{name} {b} bits" if b else f"{name} off" for name, b in
                             (("DAC", conv.dac_bits), ("ADC", conv.adc_bits)))
            notes.append(f"converters calibrated ({bits}; model.qdq.onnx is the quantised twin)")
        if digital:
            notes.append(f"kept digital: {', '.join(digital)}")
        replication = self.mapping.get("replication") or {}
        if replication:
            notes.append("replicated (copies averaged on the digital unit): "
                         + ", ".join(f"{name} x{r}" for name, r in replication.items()))
        return "; ".join(notes)

    # ------------------------------------------------------------------------------------ save/load
    def save(self, out_dir: str | Path, plots: bool = True, *, inputs: Any = (), force: bool = False) -> Path:
        """Write the directory atomically (built under a temporary name, moved into place).

        ``out_dir`` must be new, empty or an earlier compiled-model folder (``force=True`` also accepts
        another folder); it may not be or contain one of ``inputs`` (:mod:`cimc.outputs`). Only cimc's own
        files in it are replaced.
        """
        out = Path(out_dir)
        with output_dir(out, "compiled", inputs, force=force) as tmp:
            ir.save(self.model, tmp / "model.onnx")
            write_text_atomic(tmp / "target.yaml", target_yaml(self.target))
            write_json_atomic(tmp / "report.json", self.report())
            write_json_atomic(tmp / "schedule.trace.json", self.chrome_trace())
            files = ["model.onnx", "target.yaml", "report.json", "schedule.trace.json"]
            if any("cimc.quant" in n.metadata_props for n in self.model.graph):
                ir.save(build_qdq_twin(self.model), tmp / "model.qdq.onnx")
                files.append("model.qdq.onnx")
            if plots:
                plot_occupancy(self, tmp / "occupancy.png")
                files.append("occupancy.png")
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
        p = Path(path)
        folder = p.parent if p.suffix == ".onnx" else p
        manifest_path = folder / "manifest.json"
        if not p.exists():
            raise InputError(f"{p}: no such folder; give the compiled-model directory 'cimc compile MODEL.onnx -o DIR' "
                             "wrote")
        if not folder.is_dir() or not manifest_path.is_file():
            raise InputError(
                f"{p}: not a compiled-model directory (no manifest.json); run 'cimc compile MODEL.onnx -o DIR' first"
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise InputError(f"{manifest_path}: not valid JSON ({type(exc).__name__}); recompile the model") from None
        if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
            fmt = manifest.get("format") if isinstance(manifest, dict) else None
            raise InputError(f"{folder}: compiled with an unknown format {fmt!r}; recompile it")
        model = _load_compiled_onnx(folder / "model.onnx")
        target = load_target(folder / "target.yaml")
        cost = estimate_cost(target, model_workload(model))
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


def _load_compiled_onnx(path: Path) -> ir.Model:
    """The compiled folder's model.onnx; external data only from inside the folder, like any imported model."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise InputError(f"{path}: missing; the compiled-model folder is incomplete: recompile the model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeWarning) as exc:
        raise InputError(f"{path}: not a readable ONNX file ({type(exc).__name__}); recompile the model") from None
    _check_external_data(proto, path.parent)
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: its external data cannot be read ({type(exc).__name__}); recompile the model") from None
    return ir.from_proto(proto)


def _ranges(values: list[int]) -> str:
    if not values:
        return ""
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def load_compiled(path: str | Path | CompiledModel) -> CompiledModel:
    """A :class:`CompiledModel` from a directory (or the object itself)."""
    return path if isinstance(path, CompiledModel) else CompiledModel.load(path)
