"""cimc's torch executor against onnxruntime on real convolutional networks, batch 1 and batch 32.

For each model the canonical model cimc imports (BatchNorm folded, shapes fixed at the batch) is saved back
to ONNX and run by onnxruntime (all graph optimisations on, its default); cimc's executor runs the same
model. Both sides get the same number of threads. Weights are seeded random values (the light models ship
without trained weights); the arithmetic does not depend on them.

Printed: throughput ratio executor ÷ onnxruntime (> 1: cimc faster) for the float executor ("float") and
for the chip path ("chip": the simulator's hooks — 8-bit DAC, PCM weights read 24 h after programming with
noise and drift compensation, per-tile 8-bit ADC — one chip instance, on an aon-cim-like target with as
many arrays as the model needs).

    python benchmarks/executor_speed.py [--threads 1] [--batches 1,32] [--models shufflenet,...] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cimc  # noqa: E402
from cimc import builtin  # noqa: E402
from cimc.compiler import compile_model  # noqa: E402
from cimc.data import Dataset  # noqa: E402
from cimc.runtime.executor import Executor  # noqa: E402
from cimc.runtime.simulator import Chip, use  # noqa: E402
from cimc.targets import load_target  # noqa: E402
from tests.models import MobileNetV3Like, export_onnx, light_model_any_batch, randomize_initializers  # noqa: E402

LIGHT = ["shufflenet", "squeezenet", "inception_v1", "inception_v2", "resnet50", "densenet121", "bvlc_alexnet",
         "zfnet512"]
MODELS = ["mobilenetv3", *LIGHT, "kws", "mnist"]


def _interleaved_best(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time of each function over ``repeats`` rounds, the functions taking turns within a round, so a
    load change on a shared machine hits every side alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator, oneDNN primitive caches
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def _source(name: str, folder: Path) -> Path:
    """An ONNX file of the model whose batch dimension can be set at import."""
    if name == "mobilenetv3":
        return export_onnx(MobileNetV3Like(), torch.randn(1, 3, 224, 224), folder / "mobilenetv3.onnx",
                           dynamic_batch=True)
    if name == "kws":
        return Path(builtin.kws_model())
    if name == "mnist":
        return Path(builtin.mnist_model())
    return light_model_any_batch(name, folder)


def _chip_target():  # type: ignore[no-untyped-def]
    """aon-cim's converters and devices, with as many arrays and as much SRAM as a model needs."""
    return load_target("aon-cim").with_overrides(**{"array.count": None, "sram.size_bytes": None})


def measure(name: str, batch: int, folder: Path, repeats: int, chip: bool) -> dict[str, float]:
    src = _source(name, folder)
    model = cimc.load(src, batch=batch)
    if name not in ("kws", "mnist"):
        randomize_initializers(model, seed=1)
    seen: set[str] = set()
    for i, node in enumerate(model.graph):  # the compiler needs unique node names; some files have none
        if not node.name or node.name in seen:
            node.name = f"{node.op_type.lower()}_{i}"
        seen.add(node.name)
    path = folder / f"{name}_b{batch}.onnx"
    ir.save(model, path, external_data=f"{name}_b{batch}.data")
    inp = model.graph.inputs[0]
    x = np.random.default_rng(0).standard_normal(tuple(inp.shape)).astype(np.float32)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    executor = Executor(model).eval()
    xt = torch.from_numpy(x)

    def run_float() -> None:
        with torch.inference_mode():
            executor(xt)

    fns: dict[str, Callable[[], object]] = {"ort": lambda: sess.run(None, {inp.name: x}), "float": run_float}
    if chip:
        calib = Dataset(np.random.default_rng(1).standard_normal((4, *x.shape[1:])).astype(np.float32), None, "c")
        compiled = compile_model(path, _chip_target(), calibration=calib, batch=batch)
        sim = Chip(compiled, 1, seed=0)
        state = sim.at(86400.0)
        use(sim, sim.hook(state), state=state)

        def run_chip() -> None:
            with torch.inference_mode():
                sim.executor(xt)

        fns["chip"] = run_chip
    best = _interleaved_best(fns, repeats)
    return {"ort_ms": best["ort"] * 1e3, **{k: best["ort"] / t for k, t in best.items() if k != "ort"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-chip", action="store_true", help="skip the chip path (compile + simulator hooks)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"executor ÷ onnxruntime throughput (> 1: cimc faster), {args.threads} thread(s), best of {args.repeats}")
    per_batch = ("ort b{} (ms)", "float b{}") if args.no_chip else ("ort b{} (ms)", "float b{}", "chip b{}")
    columns = [c.format(b) for b in batches for c in per_batch]
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            cells = []
            for b in batches:
                r = measure(name, b, Path(tmp), args.repeats, chip=not args.no_chip)
                cells += [f"{r['ort_ms']:.1f}", f"{r['float']:.2f}"] + ([] if args.no_chip else [f"{r['chip']:.2f}"])
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
