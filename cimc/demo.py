"""``cimc demo``: the whole story on the built-in keyword-spotting model, no data to find, nothing to download.

1. inspect the trained KWS model (what maps onto the crossbar);
2. compile it onto ``aon-cim`` with DAC/ADC calibration on the shipped validation set;
3. print the mapping and cost summary (utilisation, latency, TOPS/W);
4. simulate the chip from 1 s to 1 year after programming over a handful of chip instances, with and without
   global drift compensation, on the shipped test set (voices never heard in training);
5. export the mapping for the hardware team and verify that it re-imports to the same model.

Everything lands in one output folder whose name is printed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(out_dir: str | Path = "cimc-demo", instances: int = 5, samples: int | None = None,
             target: str = "aon-cim", progress: bool = True, force: bool = False) -> Path:
    """Run the demo into ``out_dir`` (new, empty or an earlier demo folder; ``force`` for any other); returns it."""
    import cimc
    from cimc import builtin
    from cimc.data import load_dataset
    from cimc.outputs import check_output_dir
    from cimc.report import write_json_atomic

    n_clips = 1200 if samples is None else min(samples, 1200)
    # No duration promised up front: it depends on the machine and its load; the progress bars show the time left.
    _say(f"cimc demo: compile, then {instances} chip instances x {n_clips} clips x 10 reads (5 times, with and "
         "without drift compensation); shorten it with --instances 2 or --samples 300")
    started = time.perf_counter()
    out = Path(out_dir)
    check_output_dir(out, "demo", force=force)
    out.mkdir(parents=True, exist_ok=True)
    # The marker that lets the next 'cimc demo -o' recognise (and update) this folder.
    write_json_atomic(out / "manifest.json", {"format": "cimc-demo/1", "folders": ["build", "simulation", "mapping"]})
    model = builtin.kws_model()
    test = load_dataset(builtin.kws_test())
    calib = load_dataset(builtin.kws_val())

    _say("== 1. the model: AnalogNets-like keyword spotting (12 classes, 49x10 MFCC input) ==")
    report = cimc.inspect(model)
    t = report.totals
    _say(f"{t['nodes']} nodes after canonicalisation: {t['analog_nodes']} analog ({t['analog_ops']}), "
         f"{t['digital_nodes']} digital; {t['parameters']:,} parameters; {t['macs']:,} MACs per inference")

    _say(f"\n== 2. compile onto {target} (calibrating DAC/ADC ranges on {len(calib.x)} validation clips) ==")
    compiled = cimc.compile(model, target, calibration=calib, out_dir=out / "build", force=force)
    _say(compiled.summary_table())

    n = len(test.x) if samples is None else min(samples, len(test.x))
    _say(f"\n== 3. simulate the chip: program, then drift to 1s ... 1y; {instances} chip instances, {n} test clips ==")
    result = cimc.simulate(out / "build", test, drift="1s,1h,24h,30d,1y", instances=instances, samples=samples,
                           progress=progress, out_dir=out / "simulation", force=force)
    _say(result.table())

    _say("\n== 4. export the mapping for the hardware team, then verify it re-imports ==")
    try:
        from cimc.export import export_mapping, verify_bundle
    except ImportError:  # pragma: no cover - shipped with cimc
        _say("(export not available in this build)")
    else:
        bundle = export_mapping(out / "build", out / "mapping", force=force)
        check = verify_bundle(bundle, model=out / "build")
        _say(f"wrote {bundle}/ (manifest.json, schema.json, conductance targets per array in uS); "
             f"verify: {'OK' if check.ok else 'FAILED: ' + '; '.join(check.problems)}")

    _say(f"\ndone in {time.perf_counter() - started:.0f} s. Everything is in {out}/:")
    _say(f"  {out}/build/report.json, occupancy.png, schedule.trace.json (open in https://ui.perfetto.dev)")
    _say(f"  {out}/simulation/results.json, drift.png")
    _say(f"  {out}/mapping/ (for the hardware team; docs/mapping-format.md)")
    _say("Next: 'cimc finetune' makes the model robust to the chip's noise (docs/finetuning.md).")
    return out
