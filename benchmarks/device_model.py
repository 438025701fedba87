"""PCM device model: throughput on a KWS-sized layer set, and the drift plot of docs/device-model.md.

    python benchmarks/device_model.py                 # throughput, 25 instances
    python benchmarks/device_model.py --plot          # also writes docs/img/pcm-drift.png

Throughput counts devices (two per weight: G+ and G-) programmed and then read once at 24 h.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from cimc.targets import PcmIbmDevice
from cimc.runtime.devices import build_device

__all__ = ["KWS_LAYER_SHAPES", "measure_throughput", "plot_drift"]

T_24H_S = 86400.0
# Matrix views (K rows x N columns) of an AnalogNets-KWS-like CNN: 178,816 weights (the paper's ~179 K).
KWS_LAYER_SHAPES: dict[str, tuple[int, int]] = {
    "conv1": (40, 64),
    "conv2": (576, 64),
    "conv3": (576, 64),
    "conv4": (576, 64),
    "conv5": (576, 96),
    "fc1": (96, 96),
    "fc2": (96, 12),
}
DEFAULT_PLOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "pcm-drift.png"




def measure_throughput(instances: int, repeats: int, seed: int, per_instance: bool = False) -> dict[str, float]:
    """Best-of-``repeats`` wall time of program (all layers, one batch) + one 24 h read; ``per_instance``: one
    generator per instance (as the simulator draws), else one generator for the whole batch."""
    from cimc.runtime.simulator import instance_generators

    device = build_device(PcmIbmDevice())
    gen = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(shape, generator=gen) for name, shape in KWS_LAYER_SHAPES.items()}
    n_devices = 2 * sum(w.numel() for w in weights.values()) * instances
    best_program_s, best_read_s = float("inf"), float("inf")
    for _ in range(repeats):
        prog_gen = instance_generators(seed, range(instances), "program") if per_instance else gen
        read_gen = instance_generators(seed, range(instances), "read", T_24H_S) if per_instance else gen
        t_start = time.perf_counter()
        programmed = device.program_layers(weights, instances, prog_gen)
        t_programmed = time.perf_counter()
        programmed.read(T_24H_S, read_gen)
        t_read = time.perf_counter()
        best_program_s = min(best_program_s, t_programmed - t_start)
        best_read_s = min(best_read_s, t_read - t_programmed)
    return {
        "devices": float(n_devices),
        "program_s": best_program_s,
        "read_s": best_read_s,
        "devices_per_s": n_devices / (best_program_s + best_read_s),
    }


def plot_drift(path: Path, devices_per_level: int, seed: int) -> None:
    """Mean +- std of the read conductance vs time since programming, for a few target levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = build_device(PcmIbmDevice())
    gen = torch.Generator().manual_seed(seed)
    levels_us = torch.tensor([2.5, 6.25, 12.5, 18.75, 25.0])
    times_s = torch.logspace(0, 8, 33).tolist()  # 1 s .. ~3 years
    programmed = device.program(levels_us[:, None].expand(-1, devices_per_level), 1, gen)
    reads = torch.stack([programmed.read(t, gen)[0] for t in times_s])  # [T, levels, devices]
    mean, std = reads.mean(dim=-1), reads.std(dim=-1)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, level in enumerate(levels_us.tolist()):
        (line,) = ax.plot(times_s, mean[:, i], label=f"G_target = {level:g} µS")
        ax.fill_between(
            times_s, mean[:, i] - std[:, i], mean[:, i] + std[:, i], alpha=0.2, color=line.get_color()
        )
    for t_mark, name in ((3600.0, "1 h"), (T_24H_S, "24 h"), (3.15e7, "1 y")):
        ax.axvline(t_mark, color="grey", lw=0.6, ls=":")
        ax.text(t_mark, ax.get_ylim()[1] * 0.98, name, fontsize=8, ha="center", va="top")
    ax.set_xscale("log")
    ax.set_xlabel("time since programming t (s)")
    ax.set_ylabel("read conductance G (µS), mean ± std")
    ax.set_title(f"pcm-ibm: {devices_per_level} devices per level, no drift compensation", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--plot", nargs="?", const=DEFAULT_PLOT, type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for per_instance in (False, True):
        result = measure_throughput(args.instances, args.repeats, args.seed, per_instance)
        print(
            f"{'one generator per instance' if per_instance else 'one generator for the batch'}: "
            f"KWS-sized layer set ({int(result['devices']) // (2 * args.instances):,} weights) x {args.instances} "
            f"instances = {int(result['devices']):,} devices: program {result['program_s'] * 1e3:.0f} ms, "
            f"read at 24 h {result['read_s'] * 1e3:.0f} ms, "
            f"{result['devices_per_s'] / 1e6:.1f} M devices programmed+read per s "
            f"({torch.get_num_threads()} thread(s))"
        )
    if args.plot is not None:
        plot_drift(args.plot, devices_per_level=20_000, seed=args.seed)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
