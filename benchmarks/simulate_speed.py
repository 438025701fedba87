"""Simulated inferences per second as users wait for them: cimc vs onnxruntime float32 in the same run.

For each thread count (1 and 2) and machine condition (as it is, and with a CPU-bound process started by this
script on the last core), a fresh interpreter measures, in interleaved rounds (median of ``--repeats``):

* **onnxruntime FP32**: the float model over the same samples (batch ``--batch``);
* **cimc public**: the wall time of the public call ``cimc.simulate(compiled, data, drift="24h",
  instances=I, compare_gdc=False)`` — programming, the GDC probes, the float and quantised baselines and the
  Monte Carlo all included (compilation is not: it happens once per model);
* **cimc inner**: the Monte Carlo loop alone (programmed chip read at 24 h, every instance over every batch).

Counting: a simulated inference is one sample on one chip instance (PCM noise + 24 h drift + DAC/ADC + output
noise on), so cimc's figure is samples x instances / time; onnxruntime runs each sample once. Ratios compare
both sides measured in the same interpreter, round by round, so they hold under load; absolute rates do not.
Each configuration runs in a fresh interpreter because OpenMP reads its wait policy once, when torch loads.

Models: ``kws`` (the built-in KWS, 1,200 test clips), ``mnist-cnn`` (an MNIST-sized CNN: conv 1→16 3x3,
max-pool, conv 16→32 3x3, max-pool, Linear 1568→64 split over two tiles, Linear 64→10, seeded random weights,
1,000 test digits; about 19 k analog outputs per inference), ``mnist`` (the built-in 5-conv MNIST model).
aihwkit columns (its C++ tile and ``TorchInferenceRPUConfig``, one chip, ``--aihwkit-batch`` inputs) are
added when aihwkit is importable.

    python benchmarks/simulate_speed.py [--model kws|mnist-cnn|mnist] [--instances 10] [--samples N] [--no-load]
    python benchmarks/simulate_speed.py --demo-samples 300   # also time `cimc demo` idle vs loaded
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]

logger = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[1]
_DEFAULT_SAMPLES = {"kws": 1200, "mnist-cnn": 1000, "mnist": 1000}


def _best_of(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time (s) of each function over ``repeats`` rounds, the functions taking turns within a round (after
    one warm-up call each), so a change of load on a shared machine hits every side alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _mnist_cnn_onnx(folder: Path) -> Path:
    """The MNIST-sized CNN (seeded random weights) as ONNX with a free batch axis."""
    import torch
    from torch import nn

    sys.path.insert(0, str(_REPO))
    from tests.models import export_onnx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    return export_onnx(net, torch.randn(1, 1, 28, 28), folder / "mnist_cnn.onnx", dynamic_batch=True)


# ------------------------------------------------------------------------------------------ worker
def _worker(args: argparse.Namespace) -> dict[str, float]:
    """Runs in a fresh interpreter: measures every engine at ``args.threads`` threads."""
    import cimc  # noqa: I001  (first: sets the OpenMP wait policy before torch loads, unless overridden)
    import numpy as np
    import onnxruntime as ort
    import torch

    from cimc import builtin
    from cimc.compiler import compile_model
    from cimc.data import Dataset, load_dataset
    from cimc.runtime.simulator import Chip, instance_selectors, run_outputs

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    samples = args.samples or _DEFAULT_SAMPLES[args.model]
    data = load_dataset(builtin.kws_test() if args.model == "kws" else builtin.mnist_test())
    x = np.ascontiguousarray(data.x[:samples], dtype=np.float32)
    y = data.y[:samples]
    tmp = tempfile.TemporaryDirectory()
    model_path = {"kws": builtin.kws_model, "mnist": builtin.mnist_model}.get(args.model, lambda: None)()
    if model_path is None:
        model_path = _mnist_cnn_onnx(Path(tmp.name))
    out: dict[str, float] = {"samples": float(len(x)), "instances": float(args.instances)}

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    fixed_batch = sess.get_inputs()[0].shape[0] == 1

    def run_ort() -> None:
        if fixed_batch:
            for i in range(len(x)):
                sess.run(None, {name: x[i : i + 1]})
        else:
            for i in range(0, len(x), args.batch):
                sess.run(None, {name: x[i : i + args.batch]})

    compiled = compile_model(model_path, "aon-cim", calibration=Dataset(data.x[:256], data.y[:256], "calib"))
    test = Dataset(x, y, "test")

    def run_public() -> None:
        cimc.simulate(compiled, test, drift="24h", instances=args.instances, compare_gdc=False,
                      batch_size=args.batch)

    chip = Chip(compiled, args.instances, seed=0)
    state = chip.at(86400.0)
    selectors = instance_selectors(chip, state)  # what `simulate` runs: each instance over the batch

    def run_inner() -> None:
        for _ in run_outputs(chip.executor, x, args.instances, args.batch, per_instance=selectors):
            pass

    med = _interleaved_medians({"onnxruntime": run_ort, "public": run_public, "inner": run_inner}, args.repeats)
    out["onnxruntime"] = len(x) / med["onnxruntime"]
    out["cimc public"] = len(x) * args.instances / med["public"]
    out["cimc inner"] = len(x) * args.instances / med["inner"]
    if args.aihwkit and args.model != "mnist-cnn":
        out.update(_aihwkit_speeds(args, x[: args.aihwkit_batch]))
    tmp.cleanup()
    return out


def _aihwkit_speeds(args: argparse.Namespace, x: Any) -> dict[str, float]:
    try:
        from aihwkit.nn.conversion import convert_to_analog
        from aihwkit.simulator.configs import InferenceRPUConfig, TorchInferenceRPUConfig
    except ImportError:
        return {}
    import torch

    sys.path.insert(0, str(_REPO))
    from examples.models import kws_net, mnist_net

    xt = torch.from_numpy(x)
    out = {}
    for label, config in (("aihwkit C++ tile", InferenceRPUConfig), ("aihwkit TorchInferenceRPUConfig", TorchInferenceRPUConfig)):
        rpu = config()
        rpu.forward.inp_res = 1 / 254
        rpu.forward.out_res = 1 / 254
        torch.manual_seed(0)
        net = (kws_net() if args.model == "kws" else mnist_net()).eval()
        try:
            analog = convert_to_analog(net, rpu).eval()
            analog.program_analog_weights()
            analog.drift_analog_weights(86400.0)
        except RuntimeError as exc:  # e.g. an aihwkit without its C++ extension: only the torch tile runs
            logger.warning("%s unavailable: %s", label, exc)
            continue

        def run(analog: Any = analog) -> None:
            with torch.no_grad():
                analog(xt)

        run()
        out[label] = len(x) / _best_of(run, max(1, args.repeats // 2))
    return out


# ------------------------------------------------------------------------------------------ driver
def _spawn(args: argparse.Namespace, threads: int, policy: str | None, aihwkit: bool) -> dict[str, float]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--model", args.model,
           "--instances", str(args.instances), "--batch", str(args.batch), "--repeats", str(args.repeats),
           "--samples", str(args.samples), "--aihwkit-batch", str(args.aihwkit_batch)]
    if aihwkit:
        cmd.append("--aihwkit")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if res.returncode != 0:
        raise RuntimeError(f"worker failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


class _Load:
    """A CPU-bound process on the last core this process may use (started and stopped by us)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Load:
        core = max(os.sched_getaffinity(0))
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                     preexec_fn=lambda: os.sched_setaffinity(0, {core}))
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _time_demo(samples: int, threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(_REPO))
    env.pop("OMP_WAIT_POLICY", None)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cimc.cli", "demo", "-o", tmp, "--samples", str(samples), "-q",
                        "--threads", str(threads)], env=env, check=True, capture_output=True, timeout=3600)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(_DEFAULT_SAMPLES), default="kws")
    parser.add_argument("--instances", type=int, default=10, help="chip instances (default 10)")
    parser.add_argument("--samples", type=int, default=0, help="test samples (default: 1200 KWS, 1000 MNIST)")
    parser.add_argument("--batch", type=int, default=64, help="samples per pass, both sides")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--threads", default="1,2", help="thread counts to measure, e.g. 1,2")
    parser.add_argument("--no-load", action="store_true", help="skip the runs with a CPU-bound process")
    parser.add_argument("--spin", action="store_true", help="also the loaded 2-thread run with OMP_WAIT_POLICY=ACTIVE")
    parser.add_argument("--no-aihwkit", action="store_true", help="skip aihwkit even when importable")
    parser.add_argument("--aihwkit-batch", type=int, default=64, help="inputs aihwkit runs per measurement")
    parser.add_argument("--demo-samples", type=int, default=0, help="also time `cimc demo --samples N` idle/loaded")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--aihwkit", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.threads = int(args.threads)
        print(json.dumps(_worker(args)))
        return 0

    try:
        import importlib.util

        has_aihwkit = importlib.util.find_spec("aihwkit") is not None and not args.no_aihwkit
    except ImportError:
        has_aihwkit = False
    samples = args.samples or _DEFAULT_SAMPLES[args.model]
    print(f"model {args.model}, {samples} samples, {args.instances} chip instances, batch {args.batch}, median of "
          f"{args.repeats} interleaved rounds; {os.cpu_count()} cores (affinity {len(os.sched_getaffinity(0))}), "
          f"load average now {os.getloadavg()[0]:.1f}")
    print("| machine | threads | OMP_WAIT_POLICY | onnxruntime FP32 inf/s | cimc simulate() inf/s | **simulate() / ort** "
          "| cimc inner loop inf/s | inner / ort | aihwkit C++ inf/s | aihwkit torch inf/s | inner / fastest aihwkit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    conditions = [("as is", False)] + ([] if args.no_load else [("+1 busy core", True)])
    for label, loaded in conditions:
        runs = [(int(t), None, has_aihwkit) for t in args.threads.split(",")]
        runs += [(2, "ACTIVE", False)] if loaded and args.spin else []
        for threads, policy, with_aihwkit in runs:
            if loaded:
                with _Load():
                    r = _spawn(args, threads, policy, with_aihwkit)
            else:
                r = _spawn(args, threads, policy, with_aihwkit)
            hw = [r.get("aihwkit C++ tile"), r.get("aihwkit TorchInferenceRPUConfig")]
            fastest = max((v for v in hw if v), default=None)
            cells = [f"{v:,.0f}" if v else "-" for v in hw]
            ratio = f"{r['cimc inner'] / fastest:.1f}×" if fastest else "-"
            ort_rate = r["onnxruntime"]
            print(f"| {label} | {threads} | {policy or 'PASSIVE (cimc)'} | {ort_rate:,.0f} | {r['cimc public']:,.0f} | "
                  f"**{r['cimc public'] / ort_rate:.2f}** | {r['cimc inner']:,.0f} | {r['cimc inner'] / ort_rate:.2f} | "
                  f"{cells[0]} | {cells[1]} | {ratio} |", flush=True)
    if args.demo_samples:
        idle = _time_demo(args.demo_samples, 0)
        with _Load():
            loaded_s = _time_demo(args.demo_samples, 0)
        print(f"\ncimc demo --samples {args.demo_samples}: {idle:.0f} s idle, {loaded_s:.0f} s with the last core busy "
              f"({loaded_s / idle:.2f}x; goal <= 2x)")
    if not has_aihwkit:
        print("\naihwkit: not importable here; build it as in docs/fidelity.md to add its columns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
