"""Sweep throughput with 1 and 2 workers, on the local process pool and on Ray, in one run.

    python benchmarks/sweep_scaling.py                      # KWS, 4 points, 4 chips, 64 test clips
    python benchmarks/sweep_scaling.py --points 8 --samples 200 --instances 10

Each configuration runs the same sweep (the built-in KWS model on aon-cim, ADC/DAC bits varied) into a fresh
folder, so nothing is resumed. Printed per configuration: wall time, points/s, simulated inferences/s (test
clips × chips × times × compensation modes, plus the two single-chip baseline passes, per point) and the
speed-up of 2 workers over 1. Ray is started once before the timed runs (its start-up is printed apart) and
skipped when it is not installed. Every configuration must give the same sweep.csv; the script checks it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cimc
import cimc.builtin as builtin

__all__ = ["main"]

BITS = [3, 4, 5, 6, 7, 8, 10, 12]


def run_config(label: str, out: Path, args: argparse.Namespace, **backend: object) -> tuple[float, str]:
    started = time.perf_counter()
    cimc.sweep(builtin.kws_model(), "aon-cim", vary={"converters.adc_bits": BITS[: args.points]},
               calib="kws-val", data="kws-test", drift=args.drift, instances=args.instances, samples=args.samples,
               pareto_time=args.drift.split(",")[-1], out_dir=out, **backend)
    elapsed = time.perf_counter() - started
    return elapsed, (out / "sweep.csv").read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=4, help=f"grid points (ADC bits from {BITS})")
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--drift", default="1s,24h")
    parser.add_argument("--no-ray", action="store_true", help="only the process pool")
    args = parser.parse_args()
    times = len(args.drift.split(","))
    inferences_per_point = args.samples * (2 + args.instances * times * 2)  # with and without GDC

    configs: list[tuple[str, dict[str, object]]] = [("process pool, 1 worker", {"workers": 1}),
                                                    ("process pool, 2 workers", {"workers": 2})]
    ray = None
    if not args.no_ray:
        try:
            import ray
        except ImportError:
            print("Ray not installed (pip install \"cimc[ray]\"): process pool only")
    if ray is not None:
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
        print(f"Ray start-up: {time.perf_counter() - t0:.1f} s (not counted below)")
        configs += [("Ray, 1 CPU", {"ray": "auto", "_cpus": 1}), ("Ray, 2 CPUs", {"ray": "auto", "_cpus": 2})]

    results = {}
    csvs = set()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, backend) in enumerate(configs):
            cpus = backend.pop("_cpus", None)
            if cpus == 1:  # one CPU of the 2-CPU Ray: a placeholder task holds the other one
                hold = ray.remote(num_cpus=1)(lambda: time.sleep(10**6)).remote()  # type: ignore[union-attr]
            elapsed, text = run_config(label, Path(tmp) / f"run{i}", args, **backend)
            if cpus == 1:
                ray.cancel(hold, force=True)  # type: ignore[union-attr]
            csvs.add(text)
            results[label] = elapsed
            print(f"{label:26s} {elapsed:7.1f} s  {args.points / elapsed:6.3f} points/s  "
                  f"{args.points * inferences_per_point / elapsed:8.1f} inferences/s", flush=True)
    if ray is not None:
        ray.shutdown()
    for one, two in (("process pool, 1 worker", "process pool, 2 workers"), ("Ray, 1 CPU", "Ray, 2 CPUs")):
        if one in results and two in results:
            print(f"speed-up with 2 workers ({one.split(',')[0]}): {results[one] / results[two]:.2f}x")
    print("same sweep.csv from every configuration:", "yes" if len(csvs) == 1 else "NO")


if __name__ == "__main__":
    main()
