"""Simulated inferences per second: cimc vs onnxruntime float32 (and aihwkit when importable), idle and loaded.

One run prints every configuration: 1 and 2 torch/onnxruntime threads, on the machine as it is ("idle")
and with a CPU-bound process started by this script on the last core ("loaded"); the loaded cimc run is
repeated with OpenMP's spinning wait policy (torch's default) to show what ``OMP_WAIT_POLICY=PASSIVE``
(set by ``import cimc``) buys. Each configuration runs in a fresh interpreter, because OpenMP reads its
wait policy once, when torch is imported.

Counting: the simulator's figure is inputs x chip instances (each instance is a full inference on a
different chip, PCM noise + 24 h drift + DAC/ADC on); onnxruntime runs the float model once per input;
aihwkit (C++ ``InferenceRPUConfig`` tile and ``TorchInferenceRPUConfig``) runs the equivalent torch module
converted with ``convert_to_analog``, programmed and drifted to 24 h, one chip, the same inputs.

    python benchmarks/simulate_speed.py [--model kws|mnist] [--instances 25] [--batch 64] [--no-load]
    python benchmarks/simulate_speed.py --demo-samples 300   # also time `cimc demo` idle vs loaded
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

logger = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[1]


def _best_of(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ------------------------------------------------------------------------------------------ worker
def _worker(args: argparse.Namespace) -> dict[str, float]:
    """Runs in a fresh interpreter: measures every engine at ``args.threads`` threads."""
    import cimc  # noqa: F401  (first: sets the OpenMP wait policy before torch loads, unless overridden)
    import numpy as np
    import onnxruntime as ort
    import torch

    from cimc import builtin
    from cimc.compiler import compile_model
    from cimc.data import Dataset, load_dataset
    from cimc.runtime.simulator import Chip, instance_selectors, run_outputs

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    model_path = builtin.kws_model() if args.model == "kws" else builtin.mnist_model()
    data = load_dataset(builtin.kws_test() if args.model == "kws" else builtin.mnist_test())
    x = np.ascontiguousarray(data.x[: args.batch], dtype=np.float32)
    out: dict[str, float] = {}

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
            sess.run(None, {name: x})

    run_ort()
    out["onnxruntime"] = len(x) / _best_of(run_ort, args.repeats)

    compiled = compile_model(model_path, "aon-cim", calibration=Dataset(data.x[:256], data.y[:256], "calib"))
    chip = Chip(compiled, args.instances, seed=0)
    state = chip.at(86400.0)
    selectors = instance_selectors(chip, state)  # what `simulate` runs: each instance over the batch

    def run_sim() -> None:
        for _ in run_outputs(chip.executor, x, args.instances, args.batch, per_instance=selectors):
            pass

    run_sim()
    out["cimc"] = len(x) * args.instances / _best_of(run_sim, args.repeats)
    if args.aihwkit:
        out.update(_aihwkit_speeds(args, x))
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
           "--instances", str(args.instances), "--batch", str(args.batch), "--repeats", str(args.repeats)]
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
    parser.add_argument("--model", choices=["kws", "mnist"], default="kws")
    parser.add_argument("--instances", type=int, default=25)
    parser.add_argument("--batch", type=int, default=64, help="inputs per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="(worker) threads")
    parser.add_argument("--no-load", action="store_true", help="skip the runs with a CPU-bound process")
    parser.add_argument("--no-aihwkit", action="store_true", help="skip aihwkit even when importable")
    parser.add_argument("--demo-samples", type=int, default=0, help="also time `cimc demo --samples N` idle/loaded")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--aihwkit", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    try:
        import importlib.util

        has_aihwkit = importlib.util.find_spec("aihwkit") is not None and not args.no_aihwkit
    except ImportError:
        has_aihwkit = False
    print(f"model {args.model}, batch {args.batch}, {args.instances} chip instances, {os.cpu_count()} cores "
          f"(affinity {len(os.sched_getaffinity(0))}), load average now {os.getloadavg()[0]:.1f}")
    print("| machine | threads | OMP_WAIT_POLICY | onnxruntime FP32 inf/s | cimc sim. inf/s | cimc / ort | "
          "aihwkit C++ inf/s | aihwkit torch inf/s | cimc / fastest aihwkit | onnxruntime / fastest aihwkit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    conditions = [("idle", False)] + ([] if args.no_load else [("loaded", True)])
    for label, loaded in conditions:
        runs = [(t, None, has_aihwkit) for t in (1, 2)] + ([(2, "ACTIVE", False)] if loaded else [])
        for threads, policy, with_aihwkit in runs:
            if loaded:
                with _Load():
                    r = _spawn(args, threads, policy, with_aihwkit)
            else:
                r = _spawn(args, threads, policy, with_aihwkit)
            hw = [r.get("aihwkit C++ tile"), r.get("aihwkit TorchInferenceRPUConfig")]
            fastest = max((v for v in hw if v), default=None)
            cells = [f"{v:,.0f}" if v else "-" for v in hw]
            ratio = f"{r['cimc'] / fastest:.1f}×" if fastest else "-"
            # The float model on onnxruntime against the same aihwkit: how far any simulation of it could get
            # without running faster than the float model itself.
            ceiling = f"{r['onnxruntime'] / fastest:.1f}×" if fastest else "-"
            print(f"| {label} | {threads} | {policy or 'PASSIVE (cimc)'} | {r['onnxruntime']:,.0f} | {r['cimc']:,.0f} | "
                  f"{r['cimc'] / r['onnxruntime']:.2f} | {cells[0]} | {cells[1]} | {ratio} | {ceiling} |", flush=True)
    if args.demo_samples:
        idle = _time_demo(args.demo_samples, 0)
        with _Load():
            loaded = _time_demo(args.demo_samples, 0)
        print(f"\ncimc demo --samples {args.demo_samples}: {idle:.0f} s idle, {loaded:.0f} s with the last core busy "
              f"({loaded / idle:.2f}x; goal <= 2x)")
    if not has_aihwkit:
        print("\naihwkit: not importable here; build it as in docs/fidelity.md to add its columns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
