"""Target-schema fuzzing: hostile target files through load, compile, simulate and export.

Hypothesis draws a preset to derive from (``base: aon-cim | hermes | ideal``) and one to four target fields,
each set to a boundary value of its own range (its bounds, just inside and just outside them, zero, negative,
huge, inf, NaN, a wrong type) or a value within it. Each target file then goes through ``load_target``; an
accepted one compiles a small CNN+MLP with calibration, simulates it (two chips, 1 s and 1 y), and exports the
mapping. Outcomes: ``refused`` (a one-line :class:`~cimc.errors.CimcError`), ``ok`` (every step ran and no
number in ``report.json``, ``results.json`` or the bundle manifest is NaN), and the failures ``traceback``
(any other exception), ``multiline`` (an error of more than one line) and ``nan``.

    nice -n 5 python benchmarks/fuzz_targets.py --examples 400 --seed 0

prints the counts ``docs/reliability.md`` records; ``tests/test_targets.py`` runs a bounded slice.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from onnx import helper, numpy_helper

__all__ = ["CASE_FIELDS", "TUPLE_FIELDS", "TargetCase", "main", "run_case", "target_overrides"]

logger = logging.getLogger(__name__)

PRESETS = ("aon-cim", "hermes", "ideal")
FAILURES = ("traceback", "multiline", "nan")


def _bounds(field_info: Any) -> tuple[float | None, float | None, bool]:
    """(low, high, is_int) from a pydantic field's constraints (ge/gt/le/lt)."""
    low = high = None
    for meta in field_info.metadata:
        for name in ("ge", "gt"):
            if getattr(meta, name, None) is not None:
                low = float(getattr(meta, name))
        for name in ("le", "lt"):
            if getattr(meta, name, None) is not None:
                high = float(getattr(meta, name))
    annotation = str(field_info.annotation)
    return low, high, "int" in annotation and "float" not in annotation


def _schema_fields() -> dict[str, tuple[float | None, float | None, bool]]:
    """Dotted path → (low, high, is_int) of every numeric field of a target, device (pcm-ibm) included."""
    from cimc.targets import PcmIbmDevice
    from cimc.targets.schema import _DEVICE_BOUNDS, Target

    fields: dict[str, tuple[float | None, float | None, bool]] = {}
    for name, info in Target.model_fields.items():
        annotation = info.annotation
        sub = getattr(annotation, "model_fields", None)
        if sub is not None:
            for child, child_info in sub.items():
                if any(t in str(child_info.annotation) for t in ("int", "float")):
                    fields[f"{name}.{child}"] = _bounds(child_info)
        elif any(t in str(annotation) for t in ("int", "float")):
            fields[name] = _bounds(info)
    for child, info in PcmIbmDevice.model_fields.items():
        if child in _DEVICE_BOUNDS and "tuple" not in str(info.annotation):
            low, high = _DEVICE_BOUNDS[child]
            fields[f"device.{child}"] = (low, high, False)
    return fields


def _tuple_fields() -> dict[str, tuple[float, float, int]]:
    """Dotted path → (low, high, length) of the device's coefficient and clip-range tuples."""
    from cimc.targets import PcmIbmDevice
    from cimc.targets.schema import _DEVICE_BOUNDS

    return {f"device.{name}": (*_DEVICE_BOUNDS[name], len(info.default)) for name, info in
            PcmIbmDevice.model_fields.items() if name in _DEVICE_BOUNDS and isinstance(info.default, tuple)}


TUPLE_FIELDS = _tuple_fields()


CASE_FIELDS = _schema_fields()


def _values(path: str) -> st.SearchStrategy[Any]:
    """Boundary and hostile values for one field, plus values inside its range."""
    if path in TUPLE_FIELDS:
        lo_t, hi_t, length = TUPLE_FIELDS[path]
        entry = st.one_of(st.sampled_from([lo_t, hi_t, 0.0, -1e308, math.nan, math.inf, hi_t * 2 + 1]),
                          st.floats(lo_t, hi_t, allow_nan=False))
        return st.one_of(st.lists(entry, min_size=length, max_size=length), st.lists(entry, max_size=length + 1))
    low, high, is_int = CASE_FIELDS[path]
    lo = low if low is not None else -1e6
    hi = high if high is not None else 1e6
    edges: list[Any] = [0, -1, 1, 2, lo, hi, 1e308, -1e308, math.inf, -math.inf, math.nan, "x", None, True]
    if is_int:
        edges += [int(lo), int(hi), int(hi) + 1, int(lo) - 1, 10**30]
        inside = st.integers(int(max(lo, -1e6)), int(min(hi, 1e6)))
    else:
        edges += [lo * (1 - 1e-9) if lo else -1e-300, hi * (1 + 1e-9) if hi else 1e-300, 5e-324, lo + 1e-300,
                  math.nextafter(hi, math.inf)]
        inside = st.floats(max(lo, -1e6), min(hi, 1e6), allow_nan=False, allow_infinity=False)
    return st.one_of(st.sampled_from(edges), inside)


@st.composite
def target_overrides(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A preset and a few field → value overrides (dotted paths)."""
    base = draw(st.sampled_from(PRESETS))
    paths = draw(st.lists(st.sampled_from(sorted([*CASE_FIELDS, *TUPLE_FIELDS])), min_size=1, max_size=4,
                          unique=True))
    return base, {p: draw(_values(p)) for p in paths}


def _nested(overrides: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in overrides.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _model(path: Path) -> None:
    """Conv → ReLU → Flatten → Gemm: two analog layers, a digital op between them; [N, 1, 6, 6] → [N, 4]."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "b1": rng.normal(size=4).astype(np.float32),
             "w2": rng.normal(size=(64, 4)).astype(np.float32) / 8, "b2": np.zeros(4, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", pads=[0, 0, 0, 0]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 6, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _nans(value: Any, where: str = "") -> list[str]:
    """Paths of NaN numbers in a JSON-like document (json.loads turns NaN into float('nan'))."""
    if isinstance(value, float):
        return [where] if math.isnan(value) else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nans(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _nans(v, f"{where}[{i}]")]
    return []


@dataclass
class TargetCase:
    base: str
    overrides: dict[str, Any]
    outcome: str = ""
    detail: str = ""


def run_case(work: Path, base: str, overrides: dict[str, Any]) -> TargetCase:
    """One target file through load → compile (with calibration) → simulate → export."""
    import cimc
    from cimc.errors import CimcError
    from cimc.export import export_mapping
    from cimc.targets import load_target

    case = TargetCase(base, overrides)
    model = work / "m.onnx"
    if not model.is_file():
        _model(model)
        rng = np.random.default_rng(1)
        x = rng.normal(size=(16, 1, 6, 6)).astype(np.float32)
        np.savez(work / "d.npz", x=x, y=rng.integers(0, 4, 16))
    target_file = work / "chip.yaml"
    target_file.write_text(yaml.safe_dump({"base": base, **_nested(overrides)}), encoding="utf-8")
    for old in ("build", "sim", "bundle"):
        shutil.rmtree(work / old, ignore_errors=True)
    try:
        load_target(str(target_file))
        compiled = cimc.compile(str(model), str(target_file), calibration=str(work / "d.npz"), out_dir=work / "build")
        cimc.simulate(compiled, str(work / "d.npz"), drift="1s,1y", instances=2, out_dir=work / "sim")
        export_mapping(work / "build", work / "bundle")
    except CimcError as exc:
        text = str(exc)
        case.outcome, case.detail = ("multiline" if "\n" in text.strip() else "refused"), text.splitlines()[0][:200]
        return case
    except Exception as exc:  # noqa: BLE001 - what the fuzz is looking for
        case.outcome = "traceback"
        case.detail = f"{type(exc).__name__}: {exc}"[:300] + " | " + traceback.format_exc().splitlines()[-3][:200]
        return case
    docs = {name: json.loads((work / name).read_text()) for name in
            ("build/report.json", "sim/results.json", "bundle/manifest.json")}
    nans = [f"{name}{p}" for name, doc in docs.items() for p in _nans(doc)]
    case.outcome, case.detail = ("nan", ", ".join(nans[:5])) if nans else ("ok", "")
    return case


def run_fuzz(examples: int, seed: int, progress: bool = True) -> list[TargetCase]:
    """``examples`` hypothesis-drawn target files (derandomised by ``seed``) through :func:`run_case`."""
    cases: list[TargetCase] = []
    with tempfile.TemporaryDirectory(prefix="cimc-target-fuzz-") as tmp:
        work = Path(tmp)

        @hypothesis_seed(seed)
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.generate])
        @given(target_overrides())
        def one(drawn: tuple[str, dict[str, Any]]) -> None:
            case = run_case(work, *drawn)
            cases.append(case)
            if progress and (case.outcome in FAILURES or len(cases) % 25 == 0):
                print(f"[{len(cases)}] {case.base} {case.overrides}: {case.outcome} {case.detail}", file=sys.stderr)

        one()
    return cases


def summarize(cases: list[TargetCase]) -> str:
    counts = Counter(c.outcome for c in cases)
    fields = Counter(p for c in cases for p in c.overrides)
    lines = [f"{len(cases)} target files, {len(fields)} fields drawn: "
             + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("ok", "refused", *FAILURES))]
    for c in cases:
        if c.outcome in FAILURES:
            lines.append(f"  {c.outcome}: base {c.base} {c.overrides}: {c.detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=400, help="target files to try (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("cimc").setLevel(logging.ERROR)
    started = time.monotonic()
    cases = run_fuzz(args.examples, args.seed)
    print(summarize(cases))
    print(f"{time.monotonic() - started:.0f} s")
    return 1 if any(c.outcome in FAILURES for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
