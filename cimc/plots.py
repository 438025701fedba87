"""PNG figures: array occupancy (compile) and accuracy under drift (simulate)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from cimc.vocabulary import CAUSE_LABELS as _CAUSE_LABELS  # noqa: E402
from cimc.vocabulary import CAUSES, LOW_SNR_DB  # noqa: E402

__all__ = ["plot_diagnose", "plot_drift", "plot_occupancy"]

_MAX_ARRAYS_DRAWN = 64


def _save(fig: Any, path: str | os.PathLike[str] | None) -> Any:
    """Write ``fig`` atomically to ``path`` (PNG) and close it; with no path, return the figure."""
    if path is None:
        return fig
    p = Path(path)
    tmp = p.with_name(f".{p.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, p)


_HATCHES = ("", "///", "\\\\\\", "xxx", "...", "++", "oo")


def _layer_style(index: int) -> tuple[Any, str]:
    """A distinct (colour, hatch) for layer ``index``: tab20's 20 colours, then the same with hatches
    (140 combinations; beyond that the layer name is written in its tiles as well)."""
    cmap = plt.get_cmap("tab20")
    return cmap(index % 20), _HATCHES[(index // 20) % len(_HATCHES)]


def plot_occupancy(compiled: Any, path: str | os.PathLike[str] | None = None) -> Any:
    """Which layer sits where: one panel per array/core used (rows × weight columns, with coordinates),
    a distinct colour (and hatch) per layer, one legend entry per layer."""
    from matplotlib.patches import Patch

    mapping = compiled.mapping
    rows, cols = mapping["array_rows"], mapping["array_weight_cols"]
    layers = []  # one entry per crossbar block: the uses of a shared weight sit on the same devices
    seen: set[str] = set()
    for node in compiled.analog_nodes():
        block = node.metadata_props.get("cimc.layer") or node.name
        if block not in seen:
            seen.add(block)
            layers.append(node)
    placements = {n.name: json.loads(n.metadata_props["cimc.placement"]) for n in layers}
    used = sorted({t["array"] for tiles in placements.values() for t in tiles})
    shown = used[:_MAX_ARRAYS_DRAWN]
    unit = "core" if compiled.target.execution == "pipelined" or (compiled.target.array.count or 1) > 1 else "array"
    n_panels = max(1, len(shown))
    per_row = n_panels if n_panels <= 4 else 4 if n_panels <= 16 else 8
    grid_rows = math.ceil(n_panels / per_row)
    panel = 5.0 if n_panels == 1 else 3.0 if n_panels <= 16 else 2.2
    aspect = rows / max(cols, 1)
    legend_cols = 1 if len(layers) <= 24 else 2 if len(layers) <= 60 else 3
    fig_w = per_row * panel * min(1.0, 1 / aspect) + 2.5 + 2.2 * legend_cols
    fig_h = grid_rows * panel * min(1.0, aspect) + 1.2
    fig, axes = plt.subplots(grid_rows, per_row, figsize=(fig_w, fig_h), squeeze=False)
    panel_of = {a: i for i, a in enumerate(shown)}
    label_in_place = len(layers) > 20 * len(_HATCHES)
    for ax in axes.flat:
        ax.set_xlim(0, cols)
        ax.set_ylim(rows, 0)
        ax.set_facecolor("#f2f2f2")
        ax.tick_params(labelsize=7)
        ax.set_aspect("equal" if 0.25 < aspect < 4 else "auto")
    handles = []
    for idx, node in enumerate(layers):
        colour, hatch = _layer_style(idx)
        handles.append(Patch(facecolor=colour, hatch=hatch, edgecolor="black", linewidth=0.4,
                               label=node.metadata_props.get("cimc.layer") or node.name))
        for t in placements[node.name]:
            if t["array"] not in panel_of:
                continue
            ax = axes.flat[panel_of[t["array"]]]
            ax.add_patch(Rectangle((t["col0"], t["row0"]), t["cols"], t["rows"], facecolor=colour, hatch=hatch,
                                   edgecolor="black", linewidth=0.4))
            big = t["rows"] * t["cols"] > rows * cols / 40
            if (label_in_place or n_panels == 1) and big:
                ax.text(t["col0"] + t["cols"] / 2, t["row0"] + t["rows"] / 2, node.metadata_props.get("cimc.layer") or node.name, ha="center", va="center",
                        fontsize=6, rotation=90 if t["rows"] > 2 * t["cols"] else 0, clip_on=True)
    util = mapping.get("array_utilization") or []
    for a, i in panel_of.items():
        ax = axes.flat[i]
        u = f", {100 * util[a]:.0f} % used" if a < len(util) else ""
        ax.set_title(f"{unit} {a}{u}", fontsize=9)
        if i % per_row == 0:
            ax.set_ylabel("row (word line)", fontsize=8)
        if i // per_row == grid_rows - 1 or i + per_row >= n_panels:
            ax.set_xlabel(f"weight column (x{mapping['devices_per_weight']} devices)", fontsize=8)
    for ax in list(axes.flat)[n_panels:]:
        ax.set_visible(False)
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, ncol=legend_cols,
               title=f"{len(layers)} analog layers", title_fontsize=8, frameon=False)
    total = mapping["arrays_used"]
    more = f" (first {len(shown)} of {total} shown)" if total > len(shown) else ""
    fig.suptitle(f"{compiled.target.name}: {len(layers)} analog layers on {total} {unit}(s) of {rows}x{cols} weights, "
                 f"utilisation {100 * (mapping.get('utilization') or 0):.1f} %{more}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig_h))  # room for the title
    return _save(fig, path)


def plot_drift(results: dict[str, Any], path: str | os.PathLike[str] | None = None) -> Any:
    """The metric vs time after programming (log axis), mean ± 1 std band per series, the float model and
    the quantised twin as horizontal lines. Accuracies use a fixed span (float − 30 … float + 2 points,
    widened only to show every band) so a small drop looks small."""
    metric = results.get("metric", "accuracy")
    pct = results.get("percent", metric in ("accuracy", "top5"))  # detect@T is a share too
    scale = 100.0 if pct else 1.0
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    lows: list[float] = []
    highs: list[float] = []
    for i, series in enumerate(results["series"]):
        pts = [p for p in series["points"] if p["mean"] is not None]
        times = [p["t_s"] for p in pts]
        mean = [scale * p["mean"] for p in pts]
        std = [scale * (p["std"] or 0.0) for p in pts]
        colour = plt.get_cmap("tab10")(i)
        ax.plot(times, mean, "o-", color=colour, label=series["label"], zorder=3)
        ax.fill_between(times, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=colour,
                        alpha=0.2)
        lows += [m - s for m, s in zip(mean, std)]
        highs += [m + s for m, s in zip(mean, std)]
    float_score = results.get("float_score", results.get("float_accuracy"))
    quant = results.get("quantized_score", results.get("quantized_accuracy"))
    if float_score is not None:
        ax.axhline(scale * float_score, color="black", linestyle="--", linewidth=1.2, zorder=2,
                   label=f"float model ({scale * float_score:.2f}{' %' if pct else ''})")
    if quant is not None:
        ax.axhline(scale * quant, color="#777777", linestyle=":", linewidth=1.8, zorder=2,
                   label=f"quantised, ideal devices ({scale * quant:.{2 if pct else 4}f}{' %' if pct else ''})")
        lows.append(scale * quant)
        highs.append(scale * quant)
    if pct:
        ref = scale * (float_score if float_score is not None else max(highs or [100.0]))
        lo = min([ref - 30.0, *lows])
        hi = max([ref + 2.0, *highs])
        ax.set_ylim(max(0.0, lo), min(100.0, hi) if hi <= 100 else hi)
    elif metric == "cosine" and lows:
        ax.set_ylim(max(-1.0, min(lows) - 0.05), 1.005)
    ax.set_xscale("log")
    ax.set_xlabel("time after programming")
    unit = " (%)" if pct else " (dB)" if metric == "snr" else ""
    ax.set_ylabel(f"{metric}{unit}" + ("" if pct else " vs the float model"))
    ticks = [p["t_s"] for p in results["series"][0]["points"]]
    ax.set_xticks(ticks)
    ax.set_xticklabels([p["label"] for p in results["series"][0]["points"]])
    ax.minorticks_off()
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
    ax.set_title(f"{results.get('model', '')} on {results.get('target', '')}: {metric}, {results.get('instances')} chip "
                 f"instances x {results.get('samples')} samples", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


_CAUSE_COLOURS = {"dac": "#4477aa", "adc": "#66ccee", "output": "#aa3377", "programming": "#228833", "drift": "#ccbb44",
                  "read": "#ee6677"}


def plot_diagnose(data: dict[str, Any], path: str | os.PathLike[str] | None = None) -> Any:
    """Per-layer SNR by cause (grouped horizontal bars, layers top to bottom in execution order, ``all``
    as a black diamond) beside the end-metric cost of running only that layer analog."""
    layers = sorted(data["layers"], key=lambda l: l.get("order", 0))
    n = len(layers)
    finite = [v for l in layers for v in l["snr_db"].values() if v is not None]
    top = max([60.0, *finite]) + 5
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 1.6 + 0.42 * n * (1 + len(CAUSES) / 8)), sharey=True,
                                  gridspec_kw={"width_ratios": [3, 1]})
    height = 0.8 / len(CAUSES)
    for j, cause in enumerate(CAUSES):
        ys = [i - 0.4 + height * (j + 0.5) for i in range(n)]
        vals = [l["snr_db"][cause] for l in layers]
        shown = [top if v is None else max(v, 0.0) for v in vals]
        bars = ax.barh(ys, shown, height=height, color=_CAUSE_COLOURS[cause], label=_CAUSE_LABELS[cause])
        for bar, v in zip(bars, vals):
            if v is None:  # no error from this cause at all
                bar.set_hatch("//")
                bar.set_alpha(0.35)
    ax.scatter([top if l["snr_db"]["all"] is None else max(l["snr_db"]["all"], 0.0) for l in layers], range(n),
               marker="D", color="black", zorder=3, label="all together")
    ax.axvline(LOW_SNR_DB, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{l['name']}  ({l['shape']})" for l in layers], fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, top)
    ax.set_xlabel("SNR of the layer's output vs the float layer (dB, higher is better)\n"
                  "hatched bar at the right edge: no error from that cause; dashed line: 20 dB", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    metric = data["metric"]
    pct = data.get("percent", metric in ("accuracy", "top5"))
    costs = [(100 if pct else 1) * l["cost"] for l in layers]
    ax2.barh(range(n), costs, color=["#bb5566" if c > 0 else "#999999" for c in costs], height=0.6)
    ax2.axvline(0, color="black", linewidth=0.8)
    ax2.set_xlabel(f"{metric} lost, only this\nlayer analog" + (" (points)" if pct else ""), fontsize=9)
    ax2.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"{data.get('model', '')} on {data.get('target', '')} at {data.get('time', '')}: where the "
                 f"signal is lost ({data.get('instances')} instances, {data.get('samples')} samples)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
    return _save(fig, path)
