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


def plot_occupancy(compiled: Any, path: str | os.PathLike[str]) -> None:
    """Which layer sits where: one panel per array (device rows × weight columns), a colour per layer."""
    mapping = compiled.mapping
    rows, cols = mapping["array_rows"], mapping["array_weight_cols"]
    n_arrays = min(mapping["arrays_used"], _MAX_ARRAYS_DRAWN)
    per_row = min(n_arrays, 8)
    grid_rows = math.ceil(n_arrays / per_row)
    scale = 6.0 if n_arrays == 1 else 1.6
    fig, axes = plt.subplots(grid_rows, per_row, figsize=(per_row * scale * cols / max(rows, cols) + 1.5,
                                                           grid_rows * scale * rows / max(rows, cols) + 0.8),
                             squeeze=False)
    cmap = plt.get_cmap("tab20")
    layers = compiled.analog_nodes()
    for ax in axes.flat:
        ax.set_xlim(0, cols)
        ax.set_ylim(rows, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_facecolor("#f2f2f2")
    for idx, node in enumerate(layers):
        colour = cmap(idx % 20)
        for t in json.loads(node.metadata_props["cimc.placement"]):
            if t["array"] >= n_arrays:
                continue
            ax = axes.flat[t["array"]]
            ax.add_patch(Rectangle((t["col0"], t["row0"]), t["cols"], t["rows"], facecolor=colour, edgecolor="black",
                                   linewidth=0.4))
            if n_arrays == 1 and t["rows"] * t["cols"] > rows * cols / 80:
                ax.text(t["col0"] + t["cols"] / 2, t["row0"] + t["rows"] / 2, node.name, ha="center", va="center",
                        fontsize=7, rotation=90 if t["rows"] > 2 * t["cols"] else 0)
    for i in range(n_arrays):
        axes.flat[i].set_title(f"array {i}", fontsize=7 if n_arrays > 1 else 10)
    for ax in list(axes.flat)[n_arrays:]:
        ax.set_visible(False)
    if n_arrays == 1:
        axes.flat[0].set_xlabel(f"weight columns (×{mapping['devices_per_weight']} devices)")
        axes.flat[0].set_ylabel("rows (word lines)")
    util = 100 * (mapping.get("utilization") or 0)
    more = f", first {n_arrays} of {mapping['arrays_used']} arrays shown" if mapping["arrays_used"] > n_arrays else ""
    fig.suptitle(f"{compiled.target.name}: {len(layers)} analog layers, utilisation {util:.1f} %{more}", fontsize=10)
    _save(fig, path)


def plot_drift(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Accuracy vs time after programming (log axis), mean ± 1 std band per series, float baseline."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, series in enumerate(results["series"]):
        times = [p["t_s"] for p in series["points"]]
        mean = [100 * p["mean"] for p in series["points"]]
        std = [100 * p["std"] for p in series["points"]]
        colour = plt.get_cmap("tab10")(i)
        ax.plot(times, mean, "o-", color=colour, label=series["label"])
        ax.fill_between(times, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=colour,
                        alpha=0.2)
    if results.get("float_accuracy") is not None:
        ax.axhline(100 * results["float_accuracy"], color="black", linestyle="--", linewidth=1, label="float model")
    if results.get("quantized_accuracy") is not None:
        ax.axhline(100 * results["quantized_accuracy"], color="grey", linestyle=":", linewidth=1,
                   label="quantised, ideal devices")
    ax.set_xscale("log")
    ax.set_xlabel("time after programming")
    ax.set_ylabel("accuracy (%)")
    ticks = [p["t_s"] for p in results["series"][0]["points"]]
    ax.set_xticks(ticks)
    ax.set_xticklabels([p["label"] for p in results["series"][0]["points"]])
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"{results.get('model', '')} on {results.get('target', '')}: {results.get('instances')} chip instances",
                 fontsize=10)
    _save(fig, path)


_CAUSE_COLOURS = {"dac": "#4477aa", "adc": "#66ccee", "programming": "#228833", "drift": "#ccbb44", "read": "#ee6677"}


def plot_diagnose(data: dict[str, Any], path: str | os.PathLike[str] | None = None) -> Any:
    """Per-layer SNR by cause (grouped horizontal bars, layers top to bottom in execution order, ``all``
    as a black diamond) beside the end-metric cost of running only that layer analog."""
    from cimc.diagnose import CAUSES, LOW_SNR_DB, _CAUSE_LABELS

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
    ax.set_xlabel("SNR of the layer's output vs float (dB, higher is better; hatched = no error)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    metric = data["metric"]
    pct = metric in ("accuracy", "top5")
    costs = [(100 if pct else 1) * l["cost"] for l in layers]
    ax2.barh(range(n), costs, color=["#bb5566" if c > 0 else "#999999" for c in costs], height=0.6)
    ax2.axvline(0, color="black", linewidth=0.8)
    ax2.set_xlabel(f"{metric} lost with only this layer analog" + (" (points)" if pct else ""))
    ax2.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"{data.get('model', '')} on {data.get('target', '')} at {data.get('time', '')}: where the "
                 f"signal is lost ({data.get('instances')} instances, {data.get('samples')} samples)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
