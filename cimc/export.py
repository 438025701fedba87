"""Mapping export for hardware teams (``cimc export``) and its verifier (``cimc verify``).

A *mapping bundle* is a folder a chip team can program from without reading cimc's code
(format ``cimc-mapping`` 1.1, described field by field in ``docs/mapping-format.md``):

==================  ====================================================================================
``manifest.json``   format and versions, source model SHA-256, the resolved target, every analog layer
                    (source node, crossbar windows in weights and devices, G+/G- convention, µS per weight
                    unit, DAC/ADC range and bits, digital bias and post-processing, GDC reference), schedule
``array_<i>.npz``   conductance targets of crossbar ``i``: key ``g_us``, float32 µS, [rows, device cols],
                    0 where nothing is programmed; ``array_<i>.csv`` the same as text (with ``--csv``)
``biases.npz``      the biases the digital unit adds (key ``L<id>`` per layer, ``L<id>_u<j>`` for the
                    further users of a shared layer), float32, output units
``gdc.npz``         per layer the drift-compensation probe (``L<id>_probe``, [count, rows], input units)
``schema.json``     the JSON Schema the manifest validates against (:mod:`cimc.mapping_schema`)
==================  ====================================================================================

Conductances follow the device model's mapping (:func:`cimc.runtime.devices.weights_to_conductances`):
``G+ - G- = scale · w`` with ``scale = g_max / max|w|`` per layer or per output column; a positive weight sits
on G+ (device column ``2c`` of weight column ``c``), a negative one on G- (``2c + 1``), the other device at 0.

:func:`verify_bundle` re-imports a bundle: schema, crossbar overlaps, window sizes, conductance range, then it
rebuilds every layer's weights from the conductances and scales, runs the compiled model with them on ideal
devices and compares the outputs with the compiled model's (1e-6 relative).

A *layer* is a crossbar block: a weight tensor programmed once. When several nodes use it (an unrolled
recurrent layer, a weight-tied model) the layer is listed once, its ``users`` name every node with that
node's converters, bias and time slot; the layer-level ``dac``/``adc``/``bias``/``post_processing``/
``schedule`` repeat its first user's (format 1.0 readers keep working) and ``gdc`` is probed through the first
user's DAC.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from google.protobuf.message import DecodeError

from cimc.artifact import CompiledModel, sha256_file
from cimc.errors import FitError, InputError
from cimc.ir import analog_matrix, constant_array, node_attrs, static_shape, weight_to_matrix
from cimc.mapping_schema import MAPPING_FORMAT, MAPPING_FORMAT_VERSION, mapping_schema
from cimc.passes.replicate import REPLICA_KEY, REPLICATION_KEY
from cimc.report import write_json_atomic

__all__ = [
    "OUTPUT_RTOL",
    "VerifyReport",
    "export_mapping",
    "gdc_reference",
    "layer_matrix",
    "matrix_to_weight",
    "verify_bundle",
]

logger = logging.getLogger(__name__)

OUTPUT_RTOL = 1e-6  # verify: max |y_rebuilt - y_compiled| / max |y_compiled| allowed per model output
_WEIGHT_RTOL = 1e-6  # verify: |Δw| · scale allowed, as a fraction of g_max (float32 µS rounds at ~6e-8)
_GDC_RTOL = 1e-5  # verify: GDC reference recomputed from float32 conductances
_VERIFY_SAMPLES = 4  # random inputs when no --data is given
_VERIFY_SEED = 0

_CONVENTIONS = {
    "conductance_unit": "uS",
    "weight": "G+ - G- = scale.us_per_weight_unit * w; w > 0 on G+, w < 0 on G-, the other device at 0 uS",
    "windows": "half-open [start, stop); rows are word lines (inputs), columns bit lines (outputs)",
    "output": "y = alpha * sum over row tiles of (sum_i x_i * (G+ - G-)) / scale + beta * bias",
}


# --------------------------------------------------------------------------------------------------------
# Weight tensor <-> crossbar matrix
# --------------------------------------------------------------------------------------------------------


def _weight_value(node: ir.Node) -> tuple[ir.Value, str]:
    """The initializer holding the node's crossbar weight, and how the matrix is read from it."""
    if node.op_type == "Conv":
        return node.inputs[1], "conv"
    if node.op_type == "Gemm":
        return node.inputs[1], "gemm-transB" if node_attrs(node).get("transB", 0) else "gemm"
    idx = analog_matrix(node).weight_input
    return node.inputs[idx], "matmul-right" if idx == 1 else "matmul-left"


def layer_matrix(node: ir.Node) -> np.ndarray:
    """The analog node's weight as crossbar matrices [groups, K rows, N cols], float64, without Gemm alpha."""
    value, _ = _weight_value(node)
    return weight_to_matrix(node, np.asarray(constant_array(value), dtype=np.float64))


def matrix_to_weight(layout: str, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`cimc.ir.weight_to_matrix`: [groups, K, N] back to the ONNX weight tensor."""
    if layout == "conv":
        return np.ascontiguousarray(matrix.transpose(0, 2, 1)).reshape(shape)
    mat = matrix[0]
    return np.ascontiguousarray(mat.T if layout in ("gemm-transB", "matmul-left") else mat).reshape(shape)


# --------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------


def _load_compiled(compiled_or_dir: Any) -> tuple[CompiledModel, str | None, str | None]:
    """(compiled model, its directory, SHA-256 of its model.onnx) from a CompiledModel or a path."""
    if isinstance(compiled_or_dir, CompiledModel):
        return compiled_or_dir, None, None
    path = Path(compiled_or_dir)
    folder = path.parent if path.suffix == ".onnx" else path
    compiled = CompiledModel.load(folder)
    return compiled, str(folder.resolve()), sha256_file(folder / "model.onnx")


def _meta(node: ir.Node, key: str) -> Any:
    raw = node.metadata_props.get(key)
    return json.loads(raw) if raw else None


def _scale(matrix: np.ndarray, g_max_us: float, per_column: bool) -> np.ndarray:
    """µS per weight unit: shape [1, 1, 1] (per layer, over all groups) or [groups, 1, N] (per column)."""
    from cimc.runtime.devices import weights_to_conductances

    w = torch.from_numpy(matrix)  # float64 stays float64 there
    if per_column:
        _, _, scale = weights_to_conductances(w, g_max_us, per_column=True)
    else:
        _, _, scale = weights_to_conductances(w.reshape(1, -1, w.shape[-1]), g_max_us, per_column=False)
    return scale.numpy()


def _tile_entry(tile: dict[str, int], dpw: int) -> dict[str, Any]:
    r0, c0, sr0, sc0 = tile["row0"], tile["col0"], tile["src_row0"], tile["src_col0"]
    rows, cols = tile["rows"], tile["cols"]
    return {
        "group": tile["group"],
        "tile": tile["tile"],
        "array": tile["array"],
        "rows": rows,
        "cols": cols,
        "row_window": [r0, r0 + rows],
        "weight_col_window": [c0, c0 + cols],
        "device_col_window": [c0 * dpw, (c0 + cols) * dpw],
        "matrix_row_window": [sr0, sr0 + rows],
        "matrix_col_window": [sc0, sc0 + cols],
    }


def _probe(rows: int, x_max: float) -> tuple[np.ndarray, dict[str, Any]]:
    from cimc.runtime.calibration import GDC_PROBE_COUNT, GDC_PROBE_SEED, gdc_probe

    probe = gdc_probe(rows, x_max).numpy()
    info = {
        "seed": GDC_PROBE_SEED,
        "count": GDC_PROBE_COUNT,
        "rows": rows,
        "x_max": x_max,
        "distribution": "uniform [0, x_max): torch.rand(count, rows, generator=torch.Generator()"
        ".manual_seed(seed + rows)) * x_max",
    }
    return probe, info


def gdc_reference(probe: np.ndarray, matrix: np.ndarray, per_column: bool) -> float | list[float]:
    """Mean |probe @ W| on ideal devices: one float, or one per output channel (group-major)."""
    out = np.abs(np.einsum("pk,gkn->pgn", probe.astype(np.float64), matrix))
    if per_column:
        return [float(v) for v in out.mean(axis=0).reshape(-1)]
    return float(out.mean())


def _converters(compiled: CompiledModel, node: ir.Node) -> tuple[dict[str, Any], dict[str, Any]]:
    conv = compiled.target.converters
    quant = _meta(node, "cimc.quant") or {}
    calibrated = bool(quant)
    dac = {
        "bits": quant.get("dac_bits", conv.dac_bits) if calibrated else conv.dac_bits,
        "signed": quant.get("dac_signed"),
        "x_max": quant.get("x_max"),
        "calibrated": calibrated,
    }
    adc = {
        "bits": quant.get("adc_bits", conv.adc_bits) if calibrated else conv.adc_bits,
        "granularity": quant.get("adc_granularity", conv.adc_gain),
        "y_max": quant.get("y_max"),
        "calibrated": calibrated,
    }
    return dac, adc


def _bias(node: ir.Node, key: str) -> tuple[dict[str, Any], np.ndarray | None]:
    attrs = node_attrs(node)
    beta = float(attrs.get("beta", 1.0)) if node.op_type == "Gemm" else 1.0
    value = node.inputs[2] if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 else None
    arr = constant_array(value)
    if arr is None:
        return {"present": False, "file": None, "key": None, "shape": None, "beta": beta}, None
    arr = np.asarray(arr, dtype=np.float32)
    return {"present": True, "file": "biases.npz", "key": key, "shape": list(arr.shape), "beta": beta}, arr


def _post_processing(node: ir.Node, tiles: list[dict[str, Any]], bias: dict[str, Any]) -> dict[str, Any]:
    alpha = float(node_attrs(node).get("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
    row_splits = any(t["matrix_row_window"][0] > 0 for t in tiles)
    steps = []
    if row_splits:
        steps.append("add the ADC outputs of the row tiles that share a group and matrix columns (partial sums)")
    steps.append("divide by scale.us_per_weight_unit (per layer or per output channel) to get output units")
    if alpha != 1.0:
        steps.append(f"multiply by alpha = {alpha:g}")
    if bias["present"]:
        steps.append(f"add beta * bias (biases.npz['{bias['key']}'], beta = {bias['beta']:g})")
    steps.append("continue with the digital ops that follow in schedule.steps")
    return {"alpha": alpha, "partial_sums": row_splits, "steps": steps}


@dataclass
class _Exported:
    """What one layer contributes to the bundle besides its manifest entry."""

    entry: dict[str, Any]
    g_pos_us: np.ndarray  # [G, K, N]
    g_neg_us: np.ndarray
    biases: dict[str, np.ndarray]  # biases.npz key -> values, one per user that has a bias
    probe: np.ndarray


def _user_entry(compiled: CompiledModel, node: ir.Node, bias_key: str, tiles: list[dict[str, Any]]
                ) -> tuple[dict[str, Any], np.ndarray | None]:
    """One node that computes with a layer's devices: its converters, bias, post-processing and time slot."""
    dac, adc = _converters(compiled, node)
    bias, bias_values = _bias(node, bias_key)
    slot = _meta(node, "cimc.schedule") or {}
    entry = {
        "node": node.name,
        "op_type": node.op_type,
        "dac": dac,
        "adc": adc,
        "bias": bias,
        "post_processing": _post_processing(node, tiles, bias),
        "schedule": {
            "step": slot.get("step", 0),
            "stage": slot.get("stage", 0),
            "start_cycle": slot.get("start_cycle", 0),
            "end_cycle": slot.get("end_cycle", 0),
            "mvms": _meta(node, "cimc.matrix")["mvms"],
        },
    }
    return entry, bias_values


def _export_layer(compiled: CompiledModel, users: list[ir.Node], layer_id: int) -> _Exported:
    node = users[0]
    target = compiled.target
    dpw = target.array.devices_per_weight
    g_max_us = float(target.device.g_max_us)
    per_column = getattr(target.device, "weight_scale", "layer") == "column"
    gdc_method = getattr(target.device, "gdc", "none")
    m = _meta(node, "cimc.matrix")
    value, layout = _weight_value(node)
    matrix = layer_matrix(node)
    scale = _scale(matrix, g_max_us, per_column)
    g = matrix * scale
    if dpw == 1 and (matrix < 0).any():
        raise FitError(
            f"layer '{node.name}' has negative weights but target '{target.name}' has one device per "
            "weight; use a target with devices_per_weight: 2 (differential pairs)"
        )
    tiles = [_tile_entry(t, dpw) for t in _meta(node, "cimc.placement")]
    user_entries, biases = [], {}
    for j, user in enumerate(users):
        key = f"L{layer_id}" if j == 0 else f"L{layer_id}_u{j}"
        entry_u, values = _user_entry(compiled, user, key, tiles)
        user_entries.append(entry_u)
        if values is not None:
            biases[key] = values
    first = user_entries[0]
    dac, adc, bias = first["dac"], first["adc"], first["bias"]
    probe, probe_info = _probe(m["rows"], float(dac["x_max"] or 1.0))
    if dac["calibrated"]:  # the chip's DAC quantises the probe: store exactly what it can apply
        from cimc.runtime.analog import dac as dac_quantise
        from cimc.runtime.analog import layer_plans

        probe = dac_quantise(layer_plans(compiled.model)[node.name], torch.from_numpy(probe)).numpy()
        probe_info["distribution"] += ", then quantised to the layer's DAC levels"
    probe_info.update({"file": "gdc.npz", "key": f"L{layer_id}_probe"})
    ref_per_column = gdc_method == "column"
    entry = {
        "id": layer_id,
        "name": node.metadata_props.get("cimc.layer") or node.name,
        "source_node": node.name,
        "op_type": node.op_type,
        "weight": {"initializer": value.name, "shape": list(constant_array(value).shape), "layout": layout},
        "matrix": {k: m[k] for k in ("rows", "cols", "groups", "mvms")},
        "arrays": sorted({t["array"] for t in tiles}),
        "tiles": tiles,
        "scale": {
            "granularity": "column" if per_column else "layer",
            "us_per_weight_unit": [float(v) for v in scale.reshape(-1)] if per_column else float(scale.item()),
            "g_max_us": g_max_us,
        },
        "dac": dac,
        "adc": adc,
        "bias": bias,
        "post_processing": first["post_processing"],
        "gdc": {
            "method": gdc_method,
            "probe": probe_info,
            "reference_granularity": "column" if ref_per_column else "layer",
            "reference_mean_abs_output": gdc_reference(probe, matrix, ref_per_column),
        },
        "schedule": first["schedule"],
        "users": user_entries,
    }
    if node.metadata_props.get(REPLICA_KEY):  # one of r independently programmed copies of a layer
        replica = json.loads(node.metadata_props[REPLICA_KEY])
        entry["replica"] = {"of": replica["of"], "index": replica["index"], "count": replica["count"]}
    return _Exported(entry, np.clip(g, 0, None), np.clip(-g, 0, None), biases, probe)


def _fill_arrays(compiled: CompiledModel, layers: list[_Exported]) -> dict[int, np.ndarray]:
    """Conductance targets per used crossbar, float32 µS [rows, device cols]."""
    a = compiled.target.array
    dpw = a.devices_per_weight
    arrays: dict[int, np.ndarray] = {}
    for layer in layers:
        for t in layer.entry["tiles"]:
            arr = arrays.setdefault(t["array"], np.zeros((a.rows, a.cols), dtype=np.float32))
            (r0, r1), (d0, d1) = t["row_window"], t["device_col_window"]
            (sr0, sr1), (sc0, sc1) = t["matrix_row_window"], t["matrix_col_window"]
            gp = layer.g_pos_us[t["group"], sr0:sr1, sc0:sc1]
            if dpw == 2:
                arr[r0:r1, d0:d1:2] = gp
                arr[r0:r1, d0 + 1 : d1 : 2] = layer.g_neg_us[t["group"], sr0:sr1, sc0:sc1]
            else:
                arr[r0:r1, d0:d1] = gp
    return dict(sorted(arrays.items()))


def _write_csv(path: Path, g_us: np.ndarray, dpw: int) -> None:
    """Dense text copy of one crossbar in µS: a row per word line, a column per device.

    The header names the devices: ``w<c>+`` / ``w<c>-`` are the G+ / G- devices of weight column ``c``.
    """
    cols = g_us.shape[1]
    if dpw == 2:
        names = [f"w{c // 2}{'+' if c % 2 == 0 else '-'}" for c in range(cols)]
    else:
        names = [f"w{c}" for c in range(cols)]
    table = np.column_stack([np.arange(g_us.shape[0]), g_us]).astype(np.float64)
    fmt = ["%d"] + ["%.9g"] * cols
    np.savetxt(path, table, fmt=fmt, delimiter=",", header="row," + ",".join(names), comments="")


def _schedule_section(compiled: CompiledModel, layer_ids: dict[str, int]) -> dict[str, Any]:
    sched = compiled.schedule
    steps = []
    for node in compiled.model.graph:
        slot = _meta(node, "cimc.schedule")
        if slot is None:
            continue
        steps.append(
            {
                "step": slot["step"],
                "node": node.name,
                "op_type": node.op_type,
                "unit": slot["unit"],
                "stage": slot["stage"],
                "start_cycle": slot["start_cycle"],
                "end_cycle": slot["end_cycle"],
                "layer_id": layer_ids.get(node.name),
            }
        )
    steps.sort(key=lambda s: s["step"])
    return {
        "execution": sched.get("execution", compiled.target.execution),
        "clock_hz": compiled.target.clock_hz,
        "cycles": int(sched.get("cycles", steps[-1]["end_cycle"] if steps else 0)),
        "sram_peak_bytes": sched.get("sram_peak_bytes"),
        "order": sched.get("order", [s["node"] for s in steps]),
        "steps": steps,
        "shared_cores": sched.get("shared_cores", {}),
    }


def _ordered_layers(compiled: CompiledModel) -> list[list[ir.Node]]:
    """Analog nodes grouped by the crossbar block they read, blocks in order of their first use."""
    nodes = sorted(compiled.analog_nodes(), key=lambda n: (_meta(n, "cimc.schedule") or {}).get("step", 0))
    groups: dict[str, list[ir.Node]] = {}
    for node in nodes:
        groups.setdefault(node.metadata_props.get("cimc.layer") or node.name, []).append(node)
    return list(groups.values())


def export_mapping(compiled_or_dir: Any, out_dir: str | Path, csv: bool = False, *, force: bool = False) -> Path:
    """Write the mapping bundle of a compiled model (a :class:`CompiledModel` or its directory) to ``out_dir``.

    The folder is built under a temporary name and moved into place. ``out_dir`` must be new, empty or an
    earlier bundle (``force=True`` accepts another folder, keeping its files) and never the compiled
    folder itself (:mod:`cimc.outputs`). Returns ``out_dir``.
    """
    from cimc import __version__
    from cimc.outputs import check_output_dir, output_dir

    inputs = [] if isinstance(compiled_or_dir, CompiledModel) else [compiled_or_dir]
    check_output_dir(out_dir, "bundle", inputs, force=force)
    compiled, _, model_sha = _load_compiled(compiled_or_dir)
    nodes = _ordered_layers(compiled)
    if not nodes:
        raise InputError(
            "the compiled model has no analog layers, so there is nothing to program; "
            "compile a model with Conv, Gemm or MatMul layers"
        )
    uncalibrated = [users[0].name for users in nodes if "cimc.quant" not in users[0].metadata_props]
    if uncalibrated:
        logger.warning("the DAC/ADC ranges of %d layer(s) are not calibrated (compiled without --calib): the bundle "
                       "has no converter full scales for them; recompile with --calib DATA.npz before programming a "
                       "chip", len(uncalibrated))
    layers = [_export_layer(compiled, users, i) for i, users in enumerate(nodes)]
    arrays = _fill_arrays(compiled, layers)
    dpw = compiled.target.array.devices_per_weight
    out = Path(out_dir)
    with output_dir(out, "bundle", inputs, force=force) as tmp:
        array_entries = []
        for index, g_us in arrays.items():
            np.savez(tmp / f"array_{index}.npz", g_us=g_us)
            csv_name = None
            if csv:
                csv_name = f"array_{index}.csv"
                _write_csv(tmp / csv_name, g_us, dpw)
            names = [lay.entry["name"] for lay in layers if index in lay.entry["arrays"]]
            array_entries.append(
                {
                    "index": index,
                    "file": f"array_{index}.npz",
                    "key": "g_us",
                    "csv": csv_name,
                    "rows": int(g_us.shape[0]),
                    "device_cols": int(g_us.shape[1]),
                    "programmed_devices": int(np.count_nonzero(g_us)),
                    "layers": names,
                }
            )
        np.savez(tmp / "biases.npz", **{k: v for lay in layers for k, v in lay.biases.items()})
        np.savez(tmp / "gdc.npz", **{lay.entry["gdc"]["probe"]["key"]: lay.probe for lay in layers})
        schema = mapping_schema()
        write_json_atomic(tmp / "schema.json", schema)
        manifest = {
            "format": MAPPING_FORMAT,
            "format_version": MAPPING_FORMAT_VERSION,
            "cimc_version": __version__,
            "source": {
                "model": compiled.source,
                "model_sha256": compiled.source_sha256 or None,
                # What identifies the compiled model, not where it lay: verify finds it by this hash.
                "compiled_model_sha256": model_sha,
                "pipeline": compiled.pipeline,
            },
            "target": compiled.target.model_dump(mode="json"),
            "conventions": {
                **_CONVENTIONS,
                "devices_per_weight": dpw,
                "device_columns": (
                    "weight column c of an array is device column 2c (G+) and 2c+1 (G-)"
                    if dpw == 2
                    else "weight column c of an array is device column c (one device, weights >= 0)"
                ),
            },
            "files": {"biases": "biases.npz", "gdc": "gdc.npz", "schema": "schema.json"},
            "arrays": array_entries,
            "layers": [lay.entry for lay in layers],
            "schedule": _schedule_section(
                compiled, {u["node"]: lay.entry["id"] for lay in layers for u in lay.entry["users"]}
            ),
        }
        replication = json.loads(compiled.model.metadata_props.get(REPLICATION_KEY, "{}"))
        if replication:
            manifest["replication"] = replication
        write_json_atomic(tmp / "manifest.json", manifest)
    logger.info("exported %d layer(s) on %d crossbar(s) to %s", len(layers), len(arrays), out)
    return out


# --------------------------------------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_bundle`: ``ok`` only when ``problems`` is empty."""

    bundle: str
    problems: list[str] = field(default_factory=list)
    layers_checked: int = 0
    output_rel_err: float | None = None  # worst over model outputs, None when the model was not run

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            err = f", outputs within {self.output_rel_err:.2g} relative" if self.output_rel_err is not None else ""
            return f"{self.bundle}: OK ({self.layers_checked} layer(s) rebuilt from conductances{err})"
        return "\n".join(self.problems)


def _read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / "manifest.json"
    if not bundle.is_dir() or not path.is_file():
        raise InputError(
            f"{bundle}: not a mapping bundle (no manifest.json); create one with 'cimc export DIR -o BUNDLE'"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); re-export the bundle") from None


def _schema_problems(manifest: dict[str, Any], bundle: Path) -> list[str]:
    import jsonschema

    schema = mapping_schema()
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(map(str, err.absolute_path)) or "(top level)"
        message = err.message if len(err.message) < 200 else err.message[:200] + "..."
        problems.append(f"manifest: {where}: {message}")
    bundled = bundle / "schema.json"
    try:
        if json.loads(bundled.read_text(encoding="utf-8")) != schema:
            problems.append("schema.json: differs from cimc's schema for this format version; re-export the bundle")
    except (OSError, json.JSONDecodeError):
        problems.append("schema.json: missing or not valid JSON; re-export the bundle")
    return problems


def _load_arrays(manifest: dict[str, Any], bundle: Path, problems: list[str]) -> dict[int, np.ndarray]:
    geometry = manifest["target"]["array"]
    g_max_us = float(manifest["target"]["device"]["g_max_us"])
    arrays: dict[int, np.ndarray] = {}
    for entry in manifest["arrays"]:
        i, path = entry["index"], bundle / entry["file"]
        try:
            with np.load(path) as npz:
                g_us = np.asarray(npz[entry["key"]])
        except (OSError, KeyError, ValueError) as exc:
            problems.append(f"array {i}: cannot read {entry['file']}[{entry['key']!r}] ({exc})")
            continue
        expected = (geometry["rows"], geometry["cols"])
        if g_us.shape != expected or g_us.shape != (entry["rows"], entry["device_cols"]):
            problems.append(
                f"array {i}: {entry['file']} has shape {list(g_us.shape)}, the target's crossbar is "
                f"{list(expected)} (rows, device cols)"
            )
            continue
        bad = ~np.isfinite(g_us) | (g_us < 0) | (g_us > g_max_us * (1 + 1e-6))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            problems.append(
                f"array {i}: {int(bad.sum())} conductance(s) outside [0, g_max = {g_max_us:g}] uS, "
                f"first at row {r}, device column {c} ({g_us[r, c]!r} uS)"
            )
        arrays[i] = g_us.astype(np.float64)
    return arrays


def _check_windows(manifest: dict[str, Any], arrays: dict[int, np.ndarray], problems: list[str]) -> set[str]:
    """Window geometry, coverage of each matrix, overlaps between layers; returns the layers that failed."""
    geometry = manifest["target"]["array"]
    rows, dpw = geometry["rows"], geometry["devices_per_weight"]
    weight_cols = geometry["cols"] // dpw
    count = geometry.get("count")
    owners = {i: np.full((rows, weight_cols), -1, dtype=np.int64) for i in arrays}
    names = {layer["id"]: layer["name"] for layer in manifest["layers"]}
    failed: set[str] = set()
    for layer in manifest["layers"]:
        name, m = layer["name"], layer["matrix"]
        cover = np.zeros((m["groups"], m["rows"], m["cols"]), dtype=np.int64)
        for t in layer["tiles"]:
            where = f"layer '{name}' tile {t['tile']} (group {t['group']})"
            msg = _tile_geometry_problem(t, m, rows, weight_cols, dpw, count)
            if msg:
                problems.append(f"{where}: {msg}")
                failed.add(name)
                continue
            (sr0, sr1), (sc0, sc1) = t["matrix_row_window"], t["matrix_col_window"]
            cover[t["group"], sr0:sr1, sc0:sc1] += 1
            if t["array"] not in owners:
                problems.append(f"{where}: array {t['array']} is not in the bundle's arrays list")
                failed.add(name)
                continue
            (r0, r1), (c0, c1) = t["row_window"], t["weight_col_window"]
            window = owners[t["array"]][r0:r1, c0:c1]
            others = sorted({int(o) for o in np.unique(window) if o >= 0})
            if others:
                who = ", ".join(f"'{names.get(o, o)}'" for o in others)
                problems.append(
                    f"{where}: overlaps {who} on array {t['array']} within rows {r0}:{r1}, weight columns {c0}:{c1}"
                )
                failed.add(name)
            window[window < 0] = layer["id"]
        if cover.size and (cover.min() != 1 or cover.max() != 1):
            missing, twice = int((cover == 0).sum()), int((cover > 1).sum())
            problems.append(
                f"layer '{name}': tiles do not cover its {m['groups']}x{m['rows']}x{m['cols']} matrix "
                f"exactly once ({missing} weight(s) missing, {twice} placed more than once)"
            )
            failed.add(name)
    for i, g_us in arrays.items():
        used = np.repeat(owners[i] >= 0, dpw, axis=1)
        stray = (g_us != 0) & ~used
        if stray.any():
            r, c = np.argwhere(stray)[0]
            problems.append(
                f"array {i}: {int(stray.sum())} device(s) programmed outside every layer's window, "
                f"first at row {r}, device column {c}"
            )
    return failed


def _tile_geometry_problem(
    t: dict[str, Any], m: dict[str, int], rows: int, weight_cols: int, dpw: int, count: int | None
) -> str:
    (r0, r1), (c0, c1), (d0, d1) = t["row_window"], t["weight_col_window"], t["device_col_window"]
    (sr0, sr1), (sc0, sc1) = t["matrix_row_window"], t["matrix_col_window"]
    if count is not None and t["array"] >= count:
        return f"array {t['array']} does not exist (the target has {count})"
    if r1 - r0 != t["rows"] or sr1 - sr0 != t["rows"]:
        return f"row_window {t['row_window']} / matrix_row_window {t['matrix_row_window']} do not span rows={t['rows']}"
    if c1 - c0 != t["cols"] or sc1 - sc0 != t["cols"]:
        return (
            f"weight_col_window {t['weight_col_window']} / matrix_col_window {t['matrix_col_window']} "
            f"do not span cols={t['cols']}"
        )
    if (d0, d1) != (c0 * dpw, c1 * dpw):
        return f"device_col_window {t['device_col_window']} is not {dpw} x weight_col_window {t['weight_col_window']}"
    if r1 > rows or c1 > weight_cols:
        return f"window rows {r0}:{r1}, weight columns {c0}:{c1} exceed the {rows}x{weight_cols}-weight crossbar"
    if t["group"] >= m["groups"] or sr1 > m["rows"] or sc1 > m["cols"]:
        return (
            f"matrix window rows {sr0}:{sr1}, columns {sc0}:{sc1} (group {t['group']}) exceed the layer's "
            f"{m['groups']}x{m['rows']}x{m['cols']} matrix"
        )
    return ""


def _scale_array(layer: dict[str, Any]) -> np.ndarray | None:
    """The layer's scale broadcastable to [G, K, N], or None if its length does not fit the matrix."""
    m, s = layer["matrix"], layer["scale"]["us_per_weight_unit"]
    if layer["scale"]["granularity"] == "layer":
        return np.asarray(s, dtype=np.float64).reshape(1, 1, 1) if not isinstance(s, list) else None
    if not isinstance(s, list) or len(s) != m["groups"] * m["cols"]:
        return None
    return np.asarray(s, dtype=np.float64).reshape(m["groups"], 1, m["cols"])


def _rebuild(layer: dict[str, Any], arrays: dict[int, np.ndarray], dpw: int) -> np.ndarray:
    """The layer's [G, K, N] weights read back from the exported conductances (float64)."""
    m = layer["matrix"]
    g_us = np.zeros((m["groups"], m["rows"], m["cols"]))
    for t in layer["tiles"]:
        (r0, r1), (d0, d1) = t["row_window"], t["device_col_window"]
        (sr0, sr1), (sc0, sc1) = t["matrix_row_window"], t["matrix_col_window"]
        block = arrays[t["array"]][r0:r1, d0:d1].reshape(t["rows"], t["cols"], dpw)
        g_us[t["group"], sr0:sr1, sc0:sc1] = block[..., 0] - (block[..., 1] if dpw == 2 else 0.0)
    return g_us / _scale_array(layer)


def _check_gdc(layer: dict[str, Any], matrix: np.ndarray, bundle: Path, problems: list[str]) -> None:
    gdc = layer["gdc"]
    probe_info = gdc["probe"]
    name = layer["name"]
    try:
        with np.load(bundle / probe_info["file"]) as npz:
            probe = np.asarray(npz[probe_info["key"]], dtype=np.float64)
    except (OSError, KeyError, ValueError):
        problems.append(f"layer '{name}': gdc.probe: {probe_info['file']}[{probe_info['key']!r}] is missing")
        return
    if probe.shape != (probe_info["count"], layer["matrix"]["rows"]):
        problems.append(
            f"layer '{name}': gdc.probe has shape {list(probe.shape)}, expected "
            f"[{probe_info['count']}, {layer['matrix']['rows']}]"
        )
        return
    ref = np.asarray(gdc_reference(probe, matrix, gdc["reference_granularity"] == "column"))
    recorded = np.asarray(gdc["reference_mean_abs_output"], dtype=np.float64)
    if ref.shape != recorded.shape or not np.allclose(recorded, ref, rtol=_GDC_RTOL, atol=1e-12):
        problems.append(
            f"layer '{name}': gdc.reference_mean_abs_output does not match the probe run on the exported conductances"
        )


def _bundle_checks(manifest: dict[str, Any], bundle: Path, report: VerifyReport) -> dict[str, np.ndarray]:
    """Everything that needs only the bundle; returns the rebuilt [G, K, N] matrix of each sound layer."""
    problems = report.problems
    arrays = _load_arrays(manifest, bundle, problems)
    ids = [layer["id"] for layer in manifest["layers"]]
    names = [layer["name"] for layer in manifest["layers"]]
    for label, values in (("id", ids), ("name", names)):
        dupes = sorted({str(v) for v in values if values.count(v) > 1})
        if dupes:
            problems.append(f"manifest: layers: duplicate layer {label}(s) {', '.join(dupes)}")
    failed = _check_windows(manifest, arrays, problems)
    dpw = manifest["target"]["array"]["devices_per_weight"]
    rebuilt: dict[str, np.ndarray] = {}
    for layer in manifest["layers"]:
        name = layer["name"]
        if name in failed or any(t["array"] not in arrays for t in layer["tiles"]):
            continue
        if _scale_array(layer) is None:
            m = layer["matrix"]
            problems.append(
                f"layer '{name}': scale.us_per_weight_unit must be one number (granularity layer) or "
                f"{m['groups'] * m['cols']} numbers (granularity column)"
            )
            continue
        rebuilt[name] = _rebuild(layer, arrays, dpw)
        _check_gdc(layer, rebuilt[name], bundle, problems)
    return rebuilt


def _resolve_model(manifest: dict[str, Any], model: Any, bundle: Path) -> tuple[ir.Model, Path | None]:
    if isinstance(model, CompiledModel):
        return ir.from_proto(ir.to_proto(model.model)), None
    if model is None:
        sha = manifest["source"].get("compiled_model_sha256")
        where = _find_compiled(sha, bundle) if sha else None
        if where is None:
            hint = f" (its model.onnx has SHA-256 {sha[:12]}...)" if sha else ""
            raise InputError(f"no compiled model beside the bundle or in the current folder is the one it was "
                             f"exported from{hint}; pass it with --model DIR|MODEL.onnx")
        model = where
    path = Path(model)
    onnx_path = path / "model.onnx" if path.is_dir() else path
    if not onnx_path.is_file():
        raise InputError(f"{path}: no compiled model there; pass a compiled-model directory or its model.onnx")
    try:
        return ir.load(onnx_path), onnx_path
    except (DecodeError, OSError, ValueError) as exc:
        raise InputError(f"{onnx_path}: cannot read it as ONNX ({exc}); pass the compiled model.onnx") from None


# How many compiled-model folders verify hashes when it looks for the one a bundle names.
_MAX_CANDIDATES = 64


def _find_compiled(sha: str, bundle: Path) -> Path | None:
    """The compiled-model folder whose model.onnx has SHA-256 ``sha``, looked for among the bundle's sibling
    folders and the current folder's sub-folders (where ``cimc compile -o`` and ``cimc export -o`` put them)."""
    seen: set[Path] = set()
    for parent in (bundle.resolve().parent, Path.cwd()):
        try:
            folders = sorted(p for p in parent.iterdir() if p.is_dir())
        except OSError:
            continue
        for folder in folders:
            if len(seen) >= _MAX_CANDIDATES:
                return None
            onnx_path = folder / "model.onnx"
            if folder in seen or not (folder / "manifest.json").is_file() or not onnx_path.is_file():
                continue
            seen.add(folder)
            if sha256_file(onnx_path) == sha:
                logger.info("verifying against %s (SHA-256 of model.onnx matches the bundle's)", folder)
                return folder
    return None


def _model_inputs(model: ir.Model, data: Any) -> list[np.ndarray]:
    if data is not None:
        from cimc.data import load_dataset

        if len(model.graph.inputs) != 1:
            raise InputError("--data gives one input array but the model has several inputs; omit --data")
        return [load_dataset(data).x]
    rng = np.random.default_rng(_VERIFY_SEED)
    inputs = []
    for value in model.graph.inputs:
        shape = static_shape(value)
        if shape is None:
            raise InputError(f"input '{value.name}' has no fixed shape; give inputs with --data X.npz")
        inputs.append(rng.standard_normal((_VERIFY_SAMPLES, *shape[1:])).astype(np.float32))
    return inputs


def _weight_location(layer: dict[str, Any], g: int, r: int, c: int) -> str:
    for t in layer["tiles"]:
        (sr0, sr1), (sc0, sc1) = t["matrix_row_window"], t["matrix_col_window"]
        if t["group"] == g and sr0 <= r < sr1 and sc0 <= c < sc1:
            dpw = (t["device_col_window"][1] - t["device_col_window"][0]) // t["cols"]
            row, dev = t["row_window"][0] + r - sr0, t["device_col_window"][0] + (c - sc0) * dpw
            devices = f"device columns {dev}/{dev + 1}" if dpw == 2 else f"device column {dev}"
            return f"array {t['array']} row {row}, {devices}"
    return "no tile"


def _compare_layer(layer: dict[str, Any], node: ir.Node, rebuilt: np.ndarray, problems: list[str]) -> str:
    """Manifest vs compiled node: 'ok', 'weights' (sizes agree, weights do not) or 'shape' (sizes differ)."""
    name = layer["name"]
    m = _meta(node, "cimc.matrix")
    if any(layer["matrix"][k] != m[k] for k in ("rows", "cols", "groups")):
        problems.append(f"layer '{name}': matrix {layer['matrix']} differs from the compiled model's {m}")
        return "shape"
    placed = [
        (t["array"], t["row0"], t["col0"], t["rows"], t["cols"], t["group"], t["src_row0"], t["src_col0"])
        for t in _meta(node, "cimc.placement")
    ]
    exported = [
        (
            t["array"],
            t["row_window"][0],
            t["weight_col_window"][0],
            t["rows"],
            t["cols"],
            t["group"],
            t["matrix_row_window"][0],
            t["matrix_col_window"][0],
        )
        for t in layer["tiles"]
    ]
    if sorted(placed) != sorted(exported):
        problems.append(f"layer '{name}': tiles differ from the compiled model's placement")
    original = layer_matrix(node)
    scale = _scale_array(layer)
    err_us = np.abs(rebuilt - original) * scale
    g_max_us = layer["scale"]["g_max_us"]
    if err_us.max() > _WEIGHT_RTOL * g_max_us:
        g, r, c = np.unravel_index(int(err_us.argmax()), err_us.shape)
        problems.append(
            f"layer '{name}': {int((err_us > _WEIGHT_RTOL * g_max_us).sum())} weight(s) rebuilt from the conductances "
            f"differ from the compiled model; worst at group {g}, matrix row {r}, column {c} "
            f"({_weight_location(layer, g, r, c)}): {rebuilt[g, r, c]:.6g} vs {original[g, r, c]:.6g} "
            f"({err_us[g, r, c]:.3g} uS off)"
        )
        return "weights"
    return "ok"


def _check_bias(where: str, info: dict[str, Any], node: ir.Node, bundle: Path, problems: list[str]) -> None:
    _, expected = _bias(node, str(info.get("key")))
    if expected is None:
        if info["present"]:
            problems.append(f"{where}: bias.present is true but the compiled node has no bias")
        return
    try:
        with np.load(bundle / (info["file"] or "biases.npz")) as npz:
            got = np.asarray(npz[info["key"]])
    except (OSError, KeyError, ValueError, TypeError):
        problems.append(f"{where}: bias: values missing from the bundle")
        return
    if got.shape != expected.shape or not np.array_equal(got, expected, equal_nan=True):
        problems.append(f"{where}: bias: values differ from the compiled model's")


def _check_users(layer: dict[str, Any], nodes: dict[str, ir.Node], bundle: Path, problems: list[str]) -> list[ir.Node]:
    """Each listed user must be an analog node of the compiled model that reads this layer's tiles, with the
    bias the bundle holds for it; returns the users found (first = the layer's source node)."""
    found = []
    name = layer["name"]
    tiles = None
    for user in layer["users"]:
        node = nodes.get(user["node"])
        if node is None:
            problems.append(f"layer '{name}': user '{user['node']}' is not an analog node of the compiled model")
            continue
        if (node.metadata_props.get("cimc.layer") or node.name) != name:
            problems.append(f"layer '{name}': user '{user['node']}' reads crossbar block "
                            f"'{node.metadata_props.get('cimc.layer') or node.name}' in the compiled model")
        placement = _meta(node, "cimc.placement")
        if tiles is not None and placement != tiles:
            problems.append(f"layer '{name}': user '{user['node']}' has other tiles than the layer's first user")
        tiles = placement if tiles is None else tiles
        _check_bias(f"layer '{name}' user '{user['node']}'", user["bias"], node, bundle, problems)
        found.append(node)
    return found


def _run_and_compare(
    model: ir.Model,
    onnx_path: Path | None,
    manifest: dict[str, Any],
    rebuilt: dict[str, np.ndarray],
    data: Any,
    report: VerifyReport,
) -> None:
    from cimc.runtime.executor import run_model

    copy = ir.load(onnx_path) if onnx_path is not None else ir.from_proto(ir.to_proto(model))
    by_name = {n.name: n for n in copy.graph}
    for layer in manifest["layers"]:
        node = by_name.get(layer["source_node"])
        if node is None or layer["name"] not in rebuilt:
            continue
        value, layout = _weight_value(node)
        shape = tuple(constant_array(value).shape)
        weight = matrix_to_weight(layout, rebuilt[layer["name"]], shape).astype(np.float32)
        value.const_value = ir.tensor(weight, name=value.name)
    inputs = _model_inputs(model, data)
    reference = run_model(model, inputs)
    got = run_model(copy, inputs)
    worst = 0.0
    for value, ref, out in zip(model.graph.outputs, reference, got):
        scale = max(float(np.abs(ref).max()), np.finfo(np.float32).tiny)
        rel = float(np.abs(out.astype(np.float64) - ref).max()) / scale
        worst = max(worst, rel)
        if rel > OUTPUT_RTOL:
            report.problems.append(
                f"output '{value.name}': rebuilt model differs from the compiled model by "
                f"{rel:.3g} relative (> {OUTPUT_RTOL:g})"
            )
    report.output_rel_err = worst


def verify_bundle(bundle_dir: str | Path, model: Any = None, data: Any = None) -> VerifyReport:
    """Re-import a mapping bundle and check it reproduces the compiled model (see the module docstring).

    ``model``: the compiled-model directory, its ``model.onnx`` or a :class:`CompiledModel` (default: the
    directory recorded in the manifest). ``data``: an ``.npz`` with inputs ``x`` (default: seeded random
    inputs of the model's input shape). Unreadable input raises :class:`~cimc.errors.InputError`; every
    disagreement is one line in ``report.problems`` naming the layer, array or manifest field.
    """
    bundle = Path(bundle_dir)
    manifest = _read_manifest(bundle)
    report = VerifyReport(str(bundle))
    report.problems += _schema_problems(manifest, bundle)
    if any(p.startswith("manifest:") for p in report.problems):
        return report  # the rest reads fields the schema guarantees
    rebuilt = _bundle_checks(manifest, bundle, report)
    ir_model, onnx_path = _resolve_model(manifest, model, bundle)
    recorded_sha = manifest["source"].get("compiled_model_sha256")
    if onnx_path is not None and recorded_sha and sha256_file(onnx_path) != recorded_sha:
        report.problems.append(
            f"model: {onnx_path} is not the compiled model this bundle was exported from "
            "(SHA-256 differs); pass the right one with --model"
        )
    nodes = {n.name: n for n in ir_model.graph if "cimc.placement" in n.metadata_props}
    listed = {user["node"] for layer in manifest["layers"] for user in layer["users"]}
    for name in nodes:
        if name not in listed:
            report.problems.append(f"layer '{name}': analog layer of the compiled model is missing from the manifest")
    usable: dict[str, np.ndarray] = {}  # rebuilt weights that fit their node (written into the model copy)
    for layer in manifest["layers"]:
        name = layer["name"]
        users = _check_users(layer, nodes, bundle, report.problems)
        node = nodes.get(layer["source_node"])
        if node is None or not users or users[0] is not node:
            report.problems.append(f"layer '{name}': source_node '{layer['source_node']}' is not its first user "
                                   "or not an analog layer of the compiled model")
            continue
        if name not in rebuilt:
            continue
        status = _compare_layer(layer, node, rebuilt[name], report.problems)
        report.layers_checked += status == "ok"
        if status != "shape":
            usable[name] = rebuilt[name]
    _run_and_compare(ir_model, onnx_path, manifest, usable, data, report)
    return report
