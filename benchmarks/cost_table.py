"""Cost-model table: calibration point, predictions, and published figures side by side.

    python benchmarks/cost_table.py              # the table (markdown)
    python benchmarks/cost_table.py --calibrate  # the device read power that puts KWS 8-bit on 8.58 TOPS/W
    python benchmarks/cost_table.py --json out.json

Workloads are the AnalogNets-like reference models of the project (weight blocks K x N and MVMs per
inference). Only ``array_read.device_power_w`` of aon-cim is calibrated, on KWS at 8 bits; every other row
is a prediction from the same component parameters.
"""

from __future__ import annotations

import argparse
import json
import logging

from cimc.passes.packing import ArrayGeometry, Block, pack_blocks
from cimc.runtime.cost import (
    AnalogLayerWork,
    CostReport,
    DigitalOpWork,
    Workload,
    estimate_cost,
    tiles_from_placements,
)
from cimc.targets import Target, load_target

__all__ = ["calibrate_device_power", "kws_blocks", "main", "reference_workload", "vww_blocks"]

logger = logging.getLogger(__name__)

# (name, K, N, mvms per inference)
KWS_LAYERS = [("conv1", 40, 56, 120)] + [(f"conv{i}", 504, 56, 120) for i in range(2, 7)]
KWS_LAYERS += [("conv7", 504, 72, 120), ("fc", 72, 12, 1)]
VWW_LAYERS = [("conv1", 9, 24, 1024), ("conv2", 216, 48, 256), ("conv3", 432, 56, 256)]
VWW_LAYERS += [(f"conv{i}", 504, 56, m) for i, m in zip(range(4, 9), (64, 64, 16, 16, 16))]
VWW_LAYERS += [("conv9", 504, 88, 16), ("fc", 88, 2, 1)]

# Published efficiency (TOPS/W): AnalogNets arXiv 2111.06503 (8/4 bit) and IEEE Micro 42(6) 2022 (8/6/4).
PUBLISHED = {
    ("kws", 8): "8.58 / 8.55",
    ("kws", 6): "- / 26.55",
    ("kws", 4): "57.39 / 56.67",
    ("vww", 8): "4.37 / 4.34",
    ("vww", 6): "- / 12.64",
    ("vww", 4): "25.69 / 25.2",
}
KWS_8BIT_TOPS_PER_W = 8.58


def kws_blocks() -> list[Block]:
    return [Block(n, k, c) for n, k, c, _ in KWS_LAYERS]


def vww_blocks() -> list[Block]:
    return [Block(n, k, c) for n, k, c, _ in VWW_LAYERS]


def reference_workload(model: str, target: Target) -> Workload:
    """KWS or VWW packed on ``target``: convs with ReLU, global average pooling before the classifier."""
    layers_spec = KWS_LAYERS if model == "kws" else VWW_LAYERS
    packing = pack_blocks([Block(n, k, c) for n, k, c, _ in layers_spec], ArrayGeometry.from_target(target))
    layers: list[AnalogLayerWork | DigitalOpWork] = []
    for i, (name, k, n, mvms) in enumerate(layers_spec):
        if name == "fc":
            prev_n, prev_mvms = layers_spec[i - 1][2], layers_spec[i - 1][3]
            layers.append(
                DigitalOpWork(
                    "gap", "GlobalAveragePool", prev_n, prev_n * prev_mvms + prev_n, prev_n * prev_mvms
                )
            )
        layers.append(AnalogLayerWork(name, k, n, mvms, tiles_from_placements(packing.placements, name)))
        if name != "fc":  # BN folded into the weights and bias; ReLU on the digital unit
            layers.append(DigitalOpWork(f"{name}_relu", "Relu", n * mvms, n * mvms))
    return Workload(tuple(layers), name=model)


def hermes_peak_workload() -> Workload:
    """Every one of the 64 cores runs one full 256x256 MVM: HERMES's peak-throughput operating point."""
    return Workload(tuple(AnalogLayerWork(f"core{i}", 256, 256, 1, ()) for i in range(64)), name="peak")


def calibrate_device_power(target: Target, target_tops_per_w: float = KWS_8BIT_TOPS_PER_W) -> float:
    """Device read power giving ``target_tops_per_w`` on KWS: array energy is linear in it, so solve directly."""
    work = reference_workload("kws", target)
    base = estimate_cost(target.with_overrides(**{"array_read.device_power_w": 0.0}), work)
    unit = estimate_cost(target.with_overrides(**{"array_read.device_power_w": 1.0}), work)
    needed_j = base.ops / (target_tops_per_w * 1e12)
    return (needed_j - base.total_energy_j) / unit.energy_j["array"]


def _row(label: str, report: CostReport, published: str) -> str:
    e = report.energy_j
    total = report.total_energy_j
    shares = " / ".join(
        f"{100 * e[c] / total:.0f}" for c in ("dac", "array", "adc", "digital", "sram", "static")
    )
    return (
        f"| {label} | {report.cycles:,} | {report.latency_s * 1e3:.3f} | {total * 1e6:.3f} | "
        f"{report.inferences_per_s:,.0f} | {report.tops:.3f} | **{report.tops_per_w:.2f}** | {published} | {shares} |"
    )


def table() -> tuple[str, dict]:
    aon = load_target("aon-cim")
    hermes = load_target("hermes")
    lines = [
        (
            "| model @ target, DAC/ADC bits | cycles | latency ms | energy µJ | inf/s | TOPS | TOPS/W | published "
            "TOPS/W | % dac / array / adc / digital / sram / static |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    results: dict[str, dict] = {}
    for model in ("kws", "vww"):
        for bits in (8, 6, 4):
            target = aon.with_overrides(dac_bits=bits, adc_bits=bits)
            report = estimate_cost(target, reference_workload(model, target))
            tag = "calibrated" if (model, bits) == ("kws", 8) else "predicted"
            lines.append(
                _row(f"{model.upper()} @ aon-cim, {bits}/{bits} ({tag})", report, PUBLISHED[(model, bits)])
            )
            results[f"{model}-aon-cim-{bits}"] = report.to_dict()
    for name, work, published in (
        ("peak (64 × 256×256, 1 MVM each)", hermes_peak_workload(), "9.76 (one-phase, 63.1 TOPS)"),
        ("VWW", reference_workload("vww", hermes), "n/a"),
        ("KWS", reference_workload("kws", hermes), "n/a"),
    ):
        report = estimate_cost(hermes, work)
        lines.append(_row(f"{name} @ hermes, 8/8 (predicted)", report, published))
        results[f"{work.name}-hermes-8"] = report.to_dict()
    return "\n".join(lines), results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--calibrate", action="store_true", help="print the calibrated aon-cim device read power"
    )
    parser.add_argument("--json", help="also write every report as JSON to this file")
    args = parser.parse_args(argv)
    if args.calibrate:
        power_w = calibrate_device_power(load_target("aon-cim"))
        print(
            f"aon-cim array_read.device_power_w for KWS 8-bit = {KWS_8BIT_TOPS_PER_W} TOPS/W: {power_w:.4e} W"
        )
        return 0
    text, results = table()
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
