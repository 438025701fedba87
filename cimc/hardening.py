"""``cimc harden``: make a compiled model meet a goal on the chip by trying mitigations on the simulator.

(The module is ``cimc.hardening``: ``cimc.harden`` is the API function.)

Starting from a compiled model, each round diagnoses the current model (:func:`cimc.diagnosis.diagnose`,
per-layer SNR by cause), builds every mitigation the diagnosis suggests (:mod:`cimc.mitigations`) and
measures it on ``instances`` simulated chips (fixed seed) at ``time``; the candidates are then applied one
at a time in the order of the gain they gave, each kept only if the metric, measured again with what was
kept before, improves by more than ``min_gain``. Rounds repeat until the goal is met, nothing helps or
``max_rounds`` is reached. With training data, noise-aware fine-tuning (:func:`cimc.api.finetune`) is the
last step, kept only if it helps too.

The result is a normal compiled model (``simulate`` and ``export`` accept it; its manifest records the
decisions under ``hardened``) and a record of every step: the metric at ``time``, the energy per inference
and the latency from the compiled model's cost model, so each step's price is visible.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time as _time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cimc.errors import DataError, FitError, InputError
from cimc.report import json_ready as _json_ready

__all__ = ["HardenResult", "harden", "parse_drop", "plot_harden"]

logger = logging.getLogger(__name__)


@dataclass
class HardenResult:
    """Every step tried (``data``, the harden.json content) and the hardened compiled model."""

    data: dict[str, Any]
    compiled: Any = None
    timings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        from cimc.report import format_table
        from cimc.runtime.metrics import format_score

        d = self.data
        metric = d["metric"]
        rows = []
        for s in d["steps"]:
            m = s["measurement"]
            status = "kept" if s["kept"] else ("skip" if (s.get("error") or "").startswith("skipped") else
                                               "n/a" if m is None else "-")
            rows.append([s["step"], s["round"], status, s["change"],
                         "-" if m is None else format_score(metric, m["value"]),
                         "-" if m is None else f"{m['energy_per_inference_j'] * 1e6:.4g}",
                         "-" if m is None else f"{m['latency_s'] * 1e3:.4g}"])
        head = format_table(["step", "round", "", "change", f"{metric} at {d['time']}", "energy uJ/inf",
                             "latency ms"], rows, right=(0, 1, 4, 5, 6))
        goal = "none (until nothing helps)" if d["goal"] is None else (
            f"{'>=' if d['higher_is_better'] else '<='} {format_score(metric, d['goal'])}")
        first, last = d["steps"][0]["measurement"], d["final"]
        lines = [
            (f"hardening {d['model']} on {d['target']}: {metric} at {d['time']} on {d['instances']} chips (seed "
             f"{d['seed']}, {d['samples']} samples); goal {goal}"),
            head,
            "",
            (f"{metric}: {format_score(metric, first['value'])} -> {format_score(metric, last['value'])}"
             + ("" if d["float_score"] is None else f" (float model {format_score(metric, d['float_score'])})")
             + f"; energy {first['energy_per_inference_j'] * 1e6:.4g} -> "
             f"{last['energy_per_inference_j'] * 1e6:.4g} uJ, latency {first['latency_s'] * 1e3:.4g} -> "
             f"{last['latency_s'] * 1e3:.4g} ms per inference"),
            f"stopped: {d['stopped']}",
            f"kept: {', '.join(d['kept']) or 'nothing'}",
        ]
        return "\n".join(lines)

    def plot(self, path: Any = None) -> Any:
        return plot_harden(self.data, path)


def parse_drop(drop: float | str | None) -> float | None:
    """``--drop``: the metric the chip may lose against the float model, "1%" = 0.01 (in metric units)."""
    if drop is None:
        return None
    text = str(drop).strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise InputError(f"--drop {drop!r} is not a number; write e.g. 1% or 0.01") from None
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"--drop {drop!r} must be zero or positive")
    return value


def _goal_value(metric: str, float_score: float | None, goal: float | None, drop: float | None) -> float | None:
    """The value to reach: ``goal`` itself, or the float model's value less ``drop``. Agreement metrics have
    a perfect float value: cosine 1, relerr 0, snr ∞; a drop D there means cosine >= 1 - D, relerr <= D,
    snr >= -20·log10(D) dB (a relative error of D)."""
    from cimc.runtime.metrics import higher_is_better

    if goal is not None and drop is not None:
        raise InputError("give --goal or --drop, not both")
    if goal is not None:
        return float(goal)
    if drop is None:
        return None
    if float_score is not None and math.isfinite(float_score):
        return float_score - drop if higher_is_better(metric) else float_score + drop
    if metric == "cosine":
        return 1.0 - drop
    if metric == "relerr":
        return drop
    if metric == "snr":
        if drop <= 0:
            raise InputError("--drop 0 on snr asks for an error-free chip; give a positive drop")
        return -20.0 * math.log10(drop)
    raise InputError(f"--drop needs a float model's value of {metric}; give --goal instead")


def _met(value: float, goal: float | None, higher: bool) -> bool:
    return goal is not None and (value >= goal if higher else value <= goal)


def harden(
    compiled: Any,
    data: Any,
    *,
    time: str | float = "24h",
    goal: float | None = None,
    drop: float | str | None = None,
    metric: str | Callable[..., float] | None = None,
    instances: int = 5,
    seed: int = 0,
    samples: int | None = None,
    batch_size: int = 64,
    calibration: Any = None,
    training: Any = None,
    validation: Any = None,
    finetune_method: str | None = None,
    max_rounds: int = 3,
    max_trials: int = 10,
    min_gain: float = 0.0,
    progress: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> HardenResult:
    """Harden a compiled model for ``time`` after programming (see the module docstring).

    ``goal``: the metric value to reach (metric units: 0.97 for 97 % accuracy); ``drop``: or the loss against
    the float model allowed ("1%" = 0.01); neither: improve until nothing helps. ``calibration``: data for the
    variants that map the model again (default: ``data``). ``training``/``validation``: with training data,
    fine-tuning (``finetune_method``, default the fine-tuner's) is the last step. With ``out_dir``: the
    hardened compiled model there, and ``harden/`` in it (harden.json, harden.png, harden.txt).
    """
    from cimc.artifact import load_compiled
    from cimc.data import as_dataset
    from cimc.mitigations import Decisions, measure
    from cimc.runtime.metrics import check_metric, default_metric, higher_is_better, metric_name, output_size
    from cimc.runtime.simulator import format_duration
    from cimc.vocabulary import parse_times

    started = _time.perf_counter()
    inputs = [compiled, data, calibration, training, validation]
    if out_dir is not None:
        from cimc.outputs import check_output_dir

        check_output_dir(out_dir, "compiled", inputs, force=force)
    if goal is not None and drop is not None:
        raise InputError("give --goal or --drop, not both")
    if instances < 1:
        raise InputError(f"--instances must be at least 1 (got {instances})")
    if max_rounds < 1:
        raise InputError(f"max_rounds must be at least 1 (got {max_rounds})")
    c = load_compiled(compiled)
    ds = as_dataset(data)
    x, y = (ds.x, ds.y) if samples is None else (ds.x[:samples], None if ds.y is None else ds.y[:samples])
    if len(x) == 0:
        raise DataError("no samples to harden on; give data with at least one sample")
    (t_s,) = parse_times(time if isinstance(time, str) else [time])
    metric_id = metric_name(metric) or default_metric(y, output_size(c.model))
    check_metric(metric_id, y)
    higher = higher_is_better(metric_id)
    drop_value = parse_drop(drop)
    calib = calibration if calibration is not None else ds
    calib = as_dataset(calib, "calibration")

    def evaluate(model: Any) -> Any:
        return measure(model, x, y, t_s, metric_id, instances, seed, batch_size)

    first = evaluate(c)
    goal_value = _goal_value(metric_id, first.float_score, goal, drop_value)
    steps: list[dict[str, Any]] = [_step(0, 0, "as compiled", "", first, True, None, kind="start")]
    state = _State(c, c, Decisions(), first)
    stopped = ""
    for round_no in range(1, max_rounds + 1):
        if _met(state.best.value, goal_value, higher):
            stopped = "goal met"
            break
        kept_before = len(state.kept)
        _round(state, round_no, steps, x, y, t_s, metric_id, instances, seed, batch_size, calib, max_trials,
               min_gain, higher, goal_value, evaluate, progress)
        if len(state.kept) == kept_before:
            stopped = "nothing more helps"
            break
    else:
        stopped = f"after {max_rounds} rounds"
    if _met(state.best.value, goal_value, higher):
        stopped = "goal met"
    if training is not None and not _met(state.best.value, goal_value, higher):
        _finetune_step(state, steps, training, validation, finetune_method, seed, calib, evaluate, higher, min_gain,
                       progress)
        stopped = ("goal met" if _met(state.best.value, goal_value, higher) else
                   f"{stopped}; fine-tuning was the last step")
    # The manifest says what harden decided, also when it kept nothing (the model as compiled is the answer).
    hardened = dataclasses.replace(state.compiled, extra={**state.compiled.extra, "hardened": state.decisions.to_dict()})
    result: dict[str, Any] = {
        "format": "cimc-harden/1",
        "model": c.source,
        "target": c.target.name,
        "data": ds.name,
        "samples": len(x),
        "metric": metric_id,
        "higher_is_better": higher,
        "time": format_duration(t_s),
        "t_s": t_s,
        "instances": instances,
        "seed": seed,
        "goal": goal_value,
        "float_score": first.float_score,
        "min_gain": min_gain,
        "steps": steps,
        "kept": [s["change"] for s in steps[1:] if s["kept"]],
        "decisions": state.decisions.to_dict(),
        "final": state.best.to_dict(),
        "goal_met": _met(state.best.value, goal_value, higher),
        "stopped": stopped,
        "calibration": calib.name,
    }
    result = _json_ready(result)
    out = HardenResult(result, hardened, {"format": "cimc-timings/1", "wall_time_s": _time.perf_counter() - started})
    if out_dir is not None:
        _write(out, out_dir, inputs, force)
    return out


@dataclass
class _State:
    """What harden holds between steps: the compiled model kept so far, its decisions and measurement."""

    root: Any  # the compiled model harden started from: decisions apply to it
    compiled: Any
    decisions: Any
    best: Any
    kept: list[str] = field(default_factory=list)
    source: Any = None  # fine-tuned weights (an ir.Model) once fine-tuning is kept


def _step(number: int, round_no: int, change: str, why: str, m: Any, kept: bool, gain: float | None,
          error: str | None = None, kind: str = "", layer: str = "") -> dict[str, Any]:
    return {"step": number, "round": round_no, "kind": kind, "layer": layer, "change": change, "why": why,
            "kept": kept, "gain": gain, "measurement": None if m is None else m.to_dict(), "error": error}


def _round(state: _State, round_no: int, steps: list[dict[str, Any]], x: np.ndarray, y: np.ndarray | None,
           t_s: float, metric: str, instances: int, seed: int, batch_size: int, calib: Any, max_trials: int,
           min_gain: float, higher: bool, goal: float | None, evaluate: Callable[[Any], Any],
           progress: bool) -> None:
    """One round: diagnose the current model, measure each suggested mitigation alone, then keep them one at
    a time in the order of their gain while each still helps on top of what was kept."""
    from cimc.data import Dataset
    from cimc.diagnosis import diagnose
    from cimc.mitigations import build, candidates_for, try_candidates
    from cimc.runtime.simulator import _progress

    base = state.compiled
    diag = diagnose(base, Dataset(x, y, "harden"), time=t_s, instances=instances, seed=seed, batch_size=batch_size,
                    metric=metric, try_advice=False)
    root = state.root
    start = state.decisions
    candidates = candidates_for(diag.data, state.decisions, root)[:max(0, max_trials)]
    logger.info("round %d: %d candidate(s) to try", round_no, len(candidates))
    bar = _progress(len(candidates), progress, desc=f"harden round {round_no}")
    try:
        trials = try_candidates(root, state.best, candidates, state.decisions, evaluate, calib, higher, seed,
                                (lambda: bar.update(1)) if bar is not None else None, source=state.source)
    finally:
        if bar is not None:
            bar.close()
    sign = 1.0 if higher else -1.0
    by_text = {c.text: c for c in candidates}
    for t in trials:
        number = len(steps)
        if t.get("gain") is None:
            steps.append(_step(number, round_no, t["text"], t["why"], None, False, None, t.get("error"),
                               t["kind"], t["layer"]))
            continue
        if t["gain"] <= min_gain:  # ranked by gain: the rest did not help alone either
            steps.append(_step(number, round_no, t["text"], t["why"], t["_measurement"], False, t["gain"],
                               kind=t["kind"], layer=t["layer"]))
            continue
        if _met(state.best.value, goal, higher):
            break
        changed = set(state.decisions.digital) | {n for n, _ in state.decisions.replicate}
        if t["layer"] and t["layer"] in changed and t["layer"] not in set(start.digital) | {n for n, _ in start.replicate}:
            steps.append(_step(number, round_no, t["text"], t["why"], None, False, None,
                               f"skipped: a step of this round already moved {t['layer']}", t["kind"], t["layer"]))
            continue
        if state.decisions == start:  # nothing kept yet this round: the trial was measured on these decisions
            variant, m, decisions = t["_compiled"], t["_measurement"], t["_decisions"]
        else:
            decisions = by_text[t["text"]].apply(state.decisions)
            try:
                variant = build(root, decisions, calib, source=state.source, seed=seed)
                m = evaluate(variant)
            except (InputError, FitError) as exc:  # refused, or no room for the copies
                steps.append(_step(number, round_no, t["text"], t["why"], None, False, None, str(exc), t["kind"],
                                   t["layer"]))
                continue
        gain = sign * (m.value - state.best.value)
        keep = gain > min_gain
        steps.append(_step(number, round_no, t["text"], t["why"], m, keep, gain, kind=t["kind"], layer=t["layer"]))
        if keep:
            state.compiled, state.decisions, state.best = variant, decisions, m
            state.kept.append(t["text"])
            logger.info("kept %s: %s", t["text"], m.value)


def _finetune_step(state: _State, steps: list[dict[str, Any]], training: Any, validation: Any, method: str | None,
                   seed: int, calib: Any, evaluate: Callable[[Any], Any], higher: bool, min_gain: float,
                   progress: bool) -> None:
    """Noise-aware fine-tuning of the float weights (the hook for label-free distillation: ``method``), then
    the kept decisions compiled again on the tuned weights; kept only if it helps."""
    from cimc.mitigations import _stripped_copy, build
    from cimc.passes.finetune import DEFAULT_METHOD, finetune

    root = state.root
    number = len(steps)
    change = f"fine-tune ({method or 'default method'})"
    try:
        tuned, _history = finetune(_stripped_copy(root.model), root.target, training, validation,
                                   method=method or DEFAULT_METHOD, seed=seed, progress=progress)
        variant = build(root, state.decisions, calib, source=tuned, seed=seed)
        m = evaluate(variant)
    except InputError as exc:
        steps.append(_step(number, 0, change, "training data given", None, False, None, str(exc), "finetune"))
        return
    gain = (1.0 if higher else -1.0) * (m.value - state.best.value)
    keep = gain > min_gain
    steps.append(_step(number, 0, change, "training data given", m, keep, gain, kind="finetune"))
    if keep:
        state.compiled, state.best, state.source = variant, m, tuned
        state.kept.append(change)


def _write(result: HardenResult, out_dir: str | os.PathLike[str], inputs: list[Any], force: bool) -> None:
    """The hardened compiled model in ``out_dir``; harden.json, harden.png and harden.txt in ``out_dir/harden``."""
    from pathlib import Path

    from cimc.outputs import output_dir
    from cimc.report import write_json_atomic, write_text_atomic

    result.compiled.save(out_dir, inputs=inputs, force=force)
    with output_dir(Path(out_dir) / "harden", "harden", inputs, force=force) as tmp:
        write_json_atomic(tmp / "harden.json", result.data)  # no wall time: same inputs, same bytes
        write_json_atomic(tmp / "timings.json", result.timings)
        write_text_atomic(tmp / "harden.txt", result.table() + "\n")
        plot_harden(result.data, tmp / "harden.png")


def plot_harden(data: dict[str, Any], path: Any = None) -> Any:
    """Each step's metric at the chosen time (kept steps filled, rejected ones hollow) above its energy per
    inference and latency: what each step buys and what it costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cimc.runtime.metrics import is_percent

    steps = [s for s in data["steps"] if s["measurement"] is not None]
    pct = is_percent(data["metric"])
    scale = 100.0 if pct else 1.0
    xs = np.arange(len(steps))
    values = [scale * (s["measurement"]["value"] if s["measurement"]["value"] is not None else np.nan) for s in steps]
    fig, (ax, ax_e) = plt.subplots(2, 1, figsize=(max(6.0, 0.7 * len(steps) + 3), 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [2, 1]})
    kept = [s["kept"] for s in steps]
    ax.plot(xs[kept], np.asarray(values)[kept], "-o", color="tab:blue", label="kept")
    rejected = [not k for k in kept]
    ax.plot(xs[rejected], np.asarray(values)[rejected], "o", mfc="none", color="tab:gray", label="tried, not kept")
    if data.get("float_score") is not None:
        ax.axhline(scale * data["float_score"], color="black", ls=":", lw=1, label="float model")
    if data.get("goal") is not None:
        ax.axhline(scale * data["goal"], color="tab:green", ls="--", lw=1, label="goal")
    ax.set_ylabel(f"{data['metric']}{' (%)' if pct else ''} at {data['time']}")
    ax.set_title(f"{data['model']} on {data['target']}: hardening ({data['instances']} chips, seed {data['seed']})",
                 fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    energy = [1e6 * s["measurement"]["energy_per_inference_j"] for s in steps]
    latency = [1e3 * s["measurement"]["latency_s"] for s in steps]
    ax_e.bar(xs - 0.2, energy, width=0.4, color="tab:orange", label="energy (uJ/inference)")
    ax_l = ax_e.twinx()
    ax_l.bar(xs + 0.2, latency, width=0.4, color="tab:purple", label="latency (ms)")
    ax_e.set_ylabel("energy, uJ", color="tab:orange", fontsize=9)
    ax_l.set_ylabel("latency, ms", color="tab:purple", fontsize=9)
    ax_e.set_xticks(xs)
    ax_e.set_xticklabels([_short(f"{s['step']}: {s['kind']} {s['layer']}".strip()) for s in steps], rotation=35,
                         ha="right", fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return fig


def _short(text: str, width: int = 34) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"

