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

__all__ = ["plot_occupancy", "plot_drift"]

_MAX_ARRAYS_DRAWN = 64


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
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
    layers = []  # one entry per crossbar block: the uses of a shared weight sit on the same devices
    seen: set[str] = set()
    for node in compiled.analog_nodes():
        block = node.metadata_props.get("cimc.layer") or node.name
        if block not in seen:
            seen.add(block)
            layers.append(node)
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
                ax.text(t["col0"] + t["cols"] / 2, t["row0"] + t["rows"] / 2,
                        node.metadata_props.get("cimc.layer") or node.name, ha="center", va="center",
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
