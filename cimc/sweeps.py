"""Design-space sweeps: accuracy over time against TOPS/W over a grid of target variations.

``cimc sweep MODEL.onnx --target aon-cim --vary converters.adc_bits,converters.dac_bits=4,6,8
--vary array.rows=512,1024 --calib kws-val --data kws-test -o OUT`` compiles (with calibration, optionally
noise-aware fine-tuning) and simulates the model once per point of the grid, each point being the base target
with some fields replaced (any target field, by its dotted path). Every field and every point's target is
validated against the target schema before anything runs.

Each point is one independent task for an execution backend (:mod:`cimc.parallel`): in-process by default,
``workers=N`` local processes, or Ray. A point's result is stored as ``OUT/points/<key>.json`` as soon as it
finishes, with ``key`` = sha256 of the model bytes, the resolved target and the run options; a rerun skips
the points already there, so a sweep that was killed finishes with the same table as one that was not.
Points that do not fit the target are recorded (``fits`` false) and so are points failing with a user error
(``status`` "error" and the one-line reason).

Outputs in OUT: ``sweep.csv`` and ``sweep.json`` (one row per point), ``pareto.png`` (accuracy at
``pareto_time`` vs TOPS/W, the Pareto front marked, each point labelled).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cimc.errors import CimcError, FitError, InputError, TargetError

__all__ = ["SweepResult", "SweepSpec", "color_allowed", "expand_grid", "load_grid_file", "pareto_front", "parse_vary",
           "plot_pareto", "point_label", "sweep"]

logger = logging.getLogger(__name__)

POINT_FORMAT = "cimc-sweep-point/1"
STAT_NAMES = ("mean", "std", "min")


# ------------------------------------------------------------------------------------------ the grid
def _parse_value(text: str) -> Any:
    """A YAML scalar: 8 → int, 0.5 → float, true → bool, null → None, layer → 'layer'."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, (dict, list)) else value


def parse_vary(text: str) -> tuple[tuple[str, ...], list[Any]]:
    """``FIELD=V1,V2`` → ((FIELD,), [V1, V2]); ``F1,F2=V1,V2`` varies F1 and F2 together (same value)."""
    if "=" not in text:
        raise InputError(f"--vary {text!r}: write FIELD=V1,V2,... e.g. --vary converters.adc_bits=4,6,8")
    fields_text, values_text = text.split("=", 1)
    fields = tuple(f.strip() for f in fields_text.split(",") if f.strip())
    values = [_parse_value(v.strip()) for v in values_text.split(",") if v.strip()]
    if not fields or not values:
        raise InputError(f"--vary {text!r}: needs a field and at least one value, e.g. --vary array.rows=512,1024")
    return fields, values


def load_grid_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a sweep YAML file: ``vary`` (field → values, a product; a key ``F1,F2`` varies both together),
    ``points`` (a list of field → value mappings, for grids that are not products) and ``fixed`` (field →
    value, applied to every point)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"sweep file '{p}' does not exist; give a YAML file with 'vary:' and/or 'points:'")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{p.name}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if not isinstance(data, dict) or not set(data) <= {"vary", "points", "fixed"} or not data:
        raise InputError(f"{p.name}: expected a mapping with 'vary', 'points' and/or 'fixed' at the top level")
    vary, points, fixed = data.get("vary") or {}, data.get("points") or [], data.get("fixed") or {}
    if not isinstance(vary, dict) or not all(isinstance(v, list) and v for v in vary.values()):
        raise InputError(f"{p.name}: 'vary' must map each field to a non-empty list of values")
    if not isinstance(points, list) or not all(isinstance(pt, dict) and pt for pt in points):
        raise InputError(f"{p.name}: 'points' must be a list of mappings field: value")
    if not isinstance(fixed, dict):
        raise InputError(f"{p.name}: 'fixed' must map fields to values")
    return {"vary": vary, "points": points, "fixed": fixed}


def expand_grid(varies: Sequence[tuple[tuple[str, ...], list[Any]]] = (),
                points: Sequence[Mapping[str, Any]] = (), fixed: Mapping[str, Any] | None = None
                ) -> list[dict[str, Any]]:
    """The points, in order: every explicit point (or one empty point) × the product of the varies."""
    axes = [[{f: v for f in fields} for v in values] for fields, values in varies]
    product = [dict(itertools.chain.from_iterable(c.items() for c in combo)) for combo in itertools.product(*axes)]
    bases = [dict(p) for p in points] or [{}]
    grid = [{**(fixed or {}), **base, **combo} for base in bases for combo in product]
    unique: list[dict[str, Any]] = []
    for point in grid:
        if point not in unique:
            unique.append(point)
    return unique


def _check_field(base: dict[str, Any], path: str) -> None:
    """The dotted path must name a field of the target schema (as resolved for the base target)."""
    node: Any = base
    walked = []
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(walked) or "the target"
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
            raise TargetError(f"--vary {path}: '{part}' is not a field of {where}; fields there: {known}")
        walked.append(part)
        node = node[part]
    if isinstance(node, dict):
        raise TargetError(f"--vary {path}: is a section, not a field; vary one of its fields, e.g. "
                          f"{path}.{next(iter(node), 'FIELD')}")


def _resolve_point(base: Any, point: Mapping[str, Any], label: str) -> Any:
    from pydantic import ValidationError

    from cimc.targets import Target

    data = base.model_dump(mode="python")
    for path, value in point.items():
        node = data
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    try:
        return Target.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise TargetError(f"sweep point {label}: {field}: {first['msg']}; change the values of --vary {field}") from None


def point_label(point: Mapping[str, Any]) -> str:
    """A short name for a point: last part of each field path = value (device.gdc=none → gdc=none)."""
    return " ".join(f"{path.split('.')[-1]}={_fmt_value(v)}" for path, v in point.items()) or "base"


def _fmt_value(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


# ------------------------------------------------------------------------------------------ a point
@dataclass
class SweepSpec:
    """Everything that defines a sweep's results except the grid (hashed into every point's key)."""

    drift: list[float]
    instances: int
    seed: int
    samples: int | None
    batch_size: int
    finetune: bool
    pareto_time_s: float


def _dataset_digest(ds: Any) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ds.x).tobytes())
    h.update(b"" if ds.y is None else np.ascontiguousarray(ds.y).tobytes())
    return h.hexdigest()


def _model_file(shared: dict[str, Any]) -> str:
    """The model bytes as a file in this worker (compile reads a path), written once per process."""
    path = Path(tempfile.gettempdir()) / f"cimc-sweep-{os.getpid()}-{shared['model_sha256'][:16]}.onnx"
    if not path.is_file():
        from cimc.report import write_bytes_atomic

        write_bytes_atomic(path, shared["model"])
        import atexit

        atexit.register(lambda: path.unlink(missing_ok=True))
    return str(path)


def _run_point(shared: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """Compile and simulate one point; a record (never raises for the user's errors)."""
    import time

    from cimc.compiler import compile_model
    from cimc.runtime.simulator import simulate
    from cimc.targets import Target

    started = time.perf_counter()
    record: dict[str, Any] = {"format": POINT_FORMAT, "key": task["key"], "point": task["point"],
                              "label": task["label"], "fits": True, "status": "ok", "reason": ""}
    spec = shared["spec"]
    try:
        target = Target.model_validate(task["target"])
        compiled = compile_model(_model_file(shared), target, calibration=shared["calib"],
                                 training=shared.get("train"), seed=spec["seed"])
        compiled.source = shared["model_name"]
        data = shared["data"]
        result = simulate(compiled, data.x, data.y, spec["drift"], instances=spec["instances"], seed=spec["seed"],
                          batch_size=spec["batch_size"])
        d = result.data
        report = compiled.report()
        record["simulation"] = {"float_accuracy": d["float_accuracy"], "quantized_accuracy": d["quantized_accuracy"],
                                "series": [{"gdc": s["gdc"], "points": [{k: p[k] for k in ("label", "t_s", *STAT_NAMES,
                                                                                            "per_instance")}
                                                                       for p in s["points"]]} for s in d["series"]],
                                "cost": d["cost"]["measured"]}
        record["utilization"] = report["utilization"]
        record["arrays_used"] = report["arrays_used"]
    except FitError as exc:
        record.update(fits=False, status="does not fit", reason=str(exc).splitlines()[0])
    except CimcError as exc:
        record.update(status="error", reason=str(exc).splitlines()[0])
    record["wall_time_s"] = time.perf_counter() - started
    return record


# ------------------------------------------------------------------------------------------ rows
def _row(record: dict[str, Any], fields: Sequence[str], times: Sequence[float], pareto_time_s: float
         ) -> dict[str, Any]:
    from cimc.runtime.simulator import format_duration

    row: dict[str, Any] = {"point": record["index"], "label": record["label"]}
    for f in fields:
        row[f] = record["point"].get(f)
    row.update(status=record["status"], fits=record["fits"], reason=record["reason"])
    sim = record.get("simulation")
    by_mode = {s["gdc"] != "none": s for s in sim["series"]} if sim else {}
    row["float_accuracy"] = sim["float_accuracy"] if sim else None
    row["quantized_accuracy"] = sim["quantized_accuracy"] if sim else None
    for t in times:
        label = format_duration(t)
        for mode, name in ((True, "gdc"), (False, "nogdc")):
            series = by_mode.get(mode)
            p = next((q for q in series["points"] if q["t_s"] == t), None) if series else None
            for stat in STAT_NAMES:
                row[f"acc_{label}_{name}_{stat}"] = p[stat] if p else None
    configured = by_mode.get(True) or by_mode.get(False)
    p = next((q for q in configured["points"] if q["t_s"] == pareto_time_s), None) if configured else None
    row["accuracy"] = p["mean"] if p else None  # at the Pareto time, with the point's own compensation setting
    cost = sim["cost"] if sim else {}
    row["tops_per_w"] = cost.get("tops_per_w")
    row["latency_s"] = cost.get("latency_s")
    row["energy_per_inference_j"] = cost.get("energy_per_inference_j")
    row["utilization"] = record.get("utilization")
    row["arrays_used"] = record.get("arrays_used")
    row["front"] = False
    row["key"] = record["key"]
    return row


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which (accuracy, TOPS/W) pairs no other pair beats in both (higher is better in both)."""
    flags = []
    for i, (a, e) in enumerate(points):
        dominated = any(a2 >= a and e2 >= e and (a2 > a or e2 > e) for j, (a2, e2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


class SweepResult(list):  # type: ignore[type-arg]
    """The rows of a sweep (a list of dicts, grid order); ``to_pandas()`` gives a DataFrame."""

    fields: list[str]
    pareto_time: str

    def to_pandas(self) -> Any:
        try:
            import pandas as pd
        except ImportError:
            raise InputError("to_pandas needs pandas: pip install pandas (the rows are plain dicts otherwise)") from None
        return pd.DataFrame(list(self))

    def table(self, color: bool = False) -> str:
        """Terminal table; the Pareto front is marked '*' (and bold with ``color``)."""
        from cimc.report import format_table

        def pct(v: Any) -> str:
            return "" if v is None else f"{100 * v:.2f}"

        headers = ["", "#", *self.fields, "fits", f"acc@{self.pareto_time} %", "std %", "TOPS/W", "latency ms",
                   "energy uJ", "util %"]
        rows = []
        for r in self:
            std = r.get(f"acc_{self.pareto_time}_gdc_std")
            if std is None:
                std = r.get(f"acc_{self.pareto_time}_nogdc_std")
            status = "yes" if r["status"] == "ok" else ("no" if not r["fits"] else "error")
            rows.append(["*" if r["front"] else "", r["point"], *[_fmt_value(r[f]) for f in self.fields], status,
                         pct(r["accuracy"]), pct(std),
                         "" if r["tops_per_w"] is None else f"{r['tops_per_w']:.3g}",
                         "" if r["latency_s"] is None else f"{1e3 * r['latency_s']:.3g}",
                         "" if r["energy_per_inference_j"] is None else f"{1e6 * r['energy_per_inference_j']:.3g}",
                         "" if r["utilization"] is None else f"{100 * r['utilization']:.1f}"])
        text = format_table(headers, rows, right=tuple(range(len(headers) - 6, len(headers))))
        lines = text.splitlines()
        if color:
            lines = [f"\033[1m{line}\033[0m" if line.startswith("*") else line for line in lines]
        failed = [f"  #{r['point']} {r['label']}: {r['reason']}" for r in self if r["status"] != "ok"]
        note = f"\n* Pareto front: no other point has both higher accuracy at {self.pareto_time} and higher TOPS/W"
        return "\n".join(lines) + note + ("\nnot run:\n" + "\n".join(failed) if failed else "")


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def plot_pareto(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], pareto_time: str, title: str) -> None:
    """Accuracy at ``pareto_time`` vs TOPS/W, one labelled marker per point that ran, the front joined."""
    from cimc.plots import _save, plt

    from matplotlib.ticker import ScalarFormatter

    ok = [r for r in rows if r["accuracy"] is not None and r["tops_per_w"] is not None]
    fig, ax = plt.subplots(figsize=(8.0, 5.2))
    # Points with the same numbers share one marker and one label: "#0,#6" and the values they have in common.
    groups: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault((r["tops_per_w"], r["accuracy"]), []).append(r)
    for (tops, acc), members in groups.items():
        front = any(r["front"] for r in members)
        ax.scatter(tops, 100 * acc, s=60 if front else 30, c="tab:red" if front else "tab:blue", zorder=3,
                   edgecolors="black" if front else "none")
        common = [part for part in members[0]["label"].split(" ") if all(part in r["label"].split(" ") for r in members)]
        ax.annotate(f"{','.join('#' + str(r['point']) for r in members)} {' '.join(common)}", (tops, 100 * acc),
                    fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = sorted((r for r in ok if r["front"]), key=lambda r: r["tops_per_w"])
    if front:
        ax.plot([r["tops_per_w"] for r in front], [100 * r["accuracy"] for r in front], "--", color="tab:red",
                zorder=2, label="Pareto front")
        ax.legend(loc="best")
    tops = [r["tops_per_w"] for r in ok]
    if tops and max(tops) > 4 * min(tops):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("TOPS/W (counted on the data)")
    ax.set_ylabel(f"accuracy at {pareto_time} after programming (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    _save(fig, path)


# ------------------------------------------------------------------------------------------ the sweep
def sweep(
    model: str | os.PathLike[str],
    target: Any = "aon-cim",
    *,
    vary: Mapping[str, Sequence[Any]] | Sequence[str] = (),
    grid: str | os.PathLike[str] | None = None,
    calib: Any = None,
    data: Any = None,
    drift: str | Sequence[float] = "1s,24h,1y",
    instances: int = 10,
    seed: int = 0,
    samples: int | None = None,
    batch_size: int = 64,
    finetune: Any = None,
    pareto_time: str = "24h",
    out_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    ray: str | None = None,
    progress: bool = False,
    force: bool = False,
) -> SweepResult:
    """Compile and simulate ``model`` at every point of a grid of target variations.

    ``vary``: ``{"converters.adc_bits": [4, 8], ...}`` or CLI-style strings ``["array.rows=512,1024",
    "converters.adc_bits,converters.dac_bits=4,6,8"]`` (fields joined by ',' take the same value); ``grid``: a
    sweep YAML file (see :func:`load_grid_file`). ``calib`` and ``data`` (datasets or names) are required;
    ``finetune``: training data for noise-aware fine-tuning at each point. With ``out_dir``, points are stored
    as they finish and a rerun resumes; ``sweep.csv``, ``sweep.json`` and ``pareto.png`` are written there.
    ``out_dir`` follows the ``-o`` rules of :mod:`cimc.outputs` (not an input or a folder holding one, not the
    current folder; an existing folder must be a sweep's, or ``force``).
    ``workers``/``ray`` choose the execution backend (:func:`cimc.parallel.get_backend`).
    Returns the rows (a list of dicts; ``.to_pandas()``; ``.table()``).
    """
    from cimc.compiler import resolve_target
    from cimc.data import Dataset, load_dataset
    from cimc.parallel import get_backend
    from cimc.report import write_json_atomic, write_text_atomic
    from cimc.runtime.simulator import format_duration, parse_duration
    from cimc.targets import target_yaml

    # -- everything is checked before anything runs -----------------------------------------------------
    model_path = Path(model)
    if not model_path.is_file():
        raise InputError(f"model '{model_path}' does not exist; give the path of an .onnx file")
    if calib is None or data is None:
        raise InputError("a sweep needs --calib DATA (converter ranges) and --data DATA (accuracy)")
    if isinstance(instances, bool) or int(instances) != instances or instances < 1:
        raise InputError(f"--instances {instances!r} is invalid; give a whole number of chips >= 1")
    if samples is not None and samples < 1:
        raise InputError(f"--samples {samples} is invalid; give a number of samples >= 1")
    base = resolve_target(target)
    varies = [parse_vary(v) for v in vary] if not isinstance(vary, Mapping) else \
        [((f,), list(vs)) for f, vs in vary.items()]
    for fields, values in varies:
        if not values:
            raise InputError(f"--vary {','.join(fields)}: give at least one value")
    spec_file = load_grid_file(grid) if grid is not None else {"vary": {}, "points": [], "fixed": {}}
    varies += [(tuple(x.strip() for x in f.split(",")), list(vs)) for f, vs in spec_file["vary"].items()]
    points = expand_grid(varies, spec_file["points"], spec_file["fixed"])
    if not varies and not spec_file["points"] and not spec_file["fixed"]:
        raise InputError("nothing to sweep: give --vary FIELD=V1,V2 (or a --grid file)")
    base_data = base.model_dump(mode="python")
    fields: list[str] = []
    for point in points:
        for f in point:
            if f not in fields:
                _check_field(base_data, f)
                fields.append(f)
    targets = [_resolve_point(base, p, f"#{i} ({point_label(p)})") for i, p in enumerate(points)]
    times = [parse_duration(t) for t in drift.split(",")] if isinstance(drift, str) else [float(t) for t in drift]
    pareto_s = parse_duration(pareto_time)
    if pareto_s not in times:
        raise InputError(f"--pareto-time {pareto_time} is not one of the --drift times "
                         f"({', '.join(format_duration(t) for t in times)}); add it to --drift")
    calib_ds = calib if isinstance(calib, Dataset) else load_dataset(calib)
    data_ds = data if isinstance(data, Dataset) else load_dataset(data)
    if data_ds.y is None:
        raise InputError(f"--data {data_ds.name}: has no labels 'y'; accuracy needs integer class labels")
    if samples is not None:
        data_ds = Dataset(data_ds.x[:samples], data_ds.y[:samples], data_ds.name)
    train_ds = None if finetune is None else finetune if isinstance(finetune, Dataset) else load_dataset(finetune)
    spec = SweepSpec(drift=times, instances=int(instances), seed=int(seed), samples=len(data_ds),
                     batch_size=int(batch_size), finetune=train_ds is not None, pareto_time_s=pareto_s)

    model_bytes = model_path.read_bytes()
    model_sha = hashlib.sha256(model_bytes).hexdigest()
    options = {"spec": {k: v for k, v in vars(spec).items() if k != "pareto_time_s"},
               "calib": _dataset_digest(calib_ds), "data": _dataset_digest(data_ds),
               "finetune": None if train_ds is None else _dataset_digest(train_ds)}
    tasks = []
    for i, (point, t) in enumerate(zip(points, targets)):
        key = hashlib.sha256(json.dumps({"model": model_sha, "target": target_yaml(t), "options": options},
                                        sort_keys=True).encode()).hexdigest()
        tasks.append({"index": i, "key": key, "point": point, "label": point_label(point),
                      "target": t.model_dump(mode="json")})

    # -- resume: points already stored are not run again ------------------------------------------------
    out = None
    records: dict[int, dict[str, Any]] = {}
    if out_dir is not None:
        from cimc.outputs import open_incremental_dir

        out = open_incremental_dir(out_dir, "sweep", [model, calib, data, finetune, grid], force=force)
        (out / "points").mkdir(parents=True, exist_ok=True)
        for task in tasks:
            stored = _load_point(out / "points" / f"{task['key']}.json", task["key"])
            if stored is not None:
                records[task["index"]] = stored
    todo = [t for t in tasks if t["index"] not in records]
    if records:
        logger.info("resuming: %d of %d point(s) already done", len(records), len(tasks))

    shared = {"model": model_bytes, "model_sha256": model_sha, "model_name": model_path.name, "calib": calib_ds,
              "data": data_ds, "train": train_ds, "spec": vars(spec)}
    bar = _points_bar(len(tasks), len(records), progress)
    try:
        with get_backend(workers, ray) as backend:
            if todo:
                logger.info("running %d point(s) on %s", len(todo), backend.describe())
            for i, record in backend.run(_run_point, todo, shared):
                task = todo[i]
                record = json.loads(json.dumps(record))  # the same types as a point read back on resume
                records[task["index"]] = record
                if out is not None:
                    write_json_atomic(out / "points" / f"{task['key']}.json", record)
                if bar is not None:
                    bar.set_postfix_str(f"#{task['index']} {task['label']}: {record['status']}", refresh=False)
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    rows = SweepResult(_row({**records[t["index"]], "index": t["index"]}, fields, times, pareto_s) for t in tasks)
    rows.fields, rows.pareto_time = fields, format_duration(pareto_s)
    measured = [(i, r) for i, r in enumerate(rows) if r["accuracy"] is not None and r["tops_per_w"] is not None]
    for (i, _), flag in zip(measured, pareto_front([(r["accuracy"], r["tops_per_w"]) for _, r in measured])):
        rows[i]["front"] = flag
    if out is not None:
        write_text_atomic(out / "sweep.csv", _csv_text(rows))
        write_json_atomic(out / "sweep.json", {
            "format": "cimc-sweep/1", "model": model_path.name, "model_sha256": model_sha, "target": base.name,
            "fields": fields, "drift": [format_duration(t) for t in times], "pareto_time": rows.pareto_time,
            "instances": spec.instances, "seed": spec.seed, "samples": spec.samples, "finetune": spec.finetune,
            "data": data_ds.name, "calib": calib_ds.name, "rows": list(rows)})
        plot_pareto(rows, out / "pareto.png", rows.pareto_time,
                    f"{model_path.name} on {base.name}: {spec.instances} chips, {spec.samples} samples of {data_ds.name}")
        from cimc.outputs import close_incremental_dir

        close_incremental_dir(out)
    return rows


def _load_point(path: Path, key: str) -> dict[str, Any] | None:
    """A stored point if it is complete and belongs to this key (a torn or foreign file is redone)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != POINT_FORMAT or record.get("key") != key:
        return None
    return record


def _points_bar(total: int, done: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from cimc.report import progress_bar

    return progress_bar(total, "sweep", unit="point", initial=done)  # redraws only on a terminal


def color_allowed(stream: Any = None) -> bool:
    """Bold text only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    stream = stream or sys.stdout
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()
