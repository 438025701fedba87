"""Cost of the chip in the training loop: one noise-aware fine-tuning step against a plain PyTorch step.

Peer: the same network as an ``nn.Module`` (``examples/models.py``, the definition the built-in model was
trained from), float, one Adam step on the same batch. cimc: one ``pcm+qat`` step through the executor —
a fresh PCM instance of every layer (programming noise, drift and read noise at a sampled time, probe-based
drift compensation), DAC and per-tile ADC with straight-through rounding, then Adam. The ratio is what
putting the chip in the loop costs per step.

    python benchmarks/finetune_speed.py [--model kws|mnist] [--batch 64] [--threads 1] [--steps 20] [--unrolled]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cimc import builtin
from cimc.compiler import compile_model
from cimc.data import load_dataset
from cimc.runtime.analog import layer_plans
from cimc.runtime.devices import build_device
from cimc.runtime.executor import Executor
from cimc.runtime.training import NoiseHook

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples import models


def _timed_steps(step, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds per step after two warm-up steps."""
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["kws", "mnist"], default="kws")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bits", type=int, default=4, help="DAC/ADC bits in the loop")
    parser.add_argument("--unrolled", action="store_true",
                        help="cimc without its grouped-convolution path (every convolution unrolled to MVMs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)

    path = builtin.kws_model() if args.model == "kws" else builtin.mnist_model()
    data = load_dataset("kws-val" if args.model == "kws" else builtin.mnist_test())
    x = torch.from_numpy(data.x[: args.batch]).float()
    y = torch.from_numpy(data.y[: args.batch]).long()

    net = models.kws_net() if args.model == "kws" else models.mnist_net()
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def torch_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    compiled = compile_model(path, "aon-cim", calibration=data, dac_bits=args.bits, adc_bits=args.bits)
    executor = Executor(compiled.model)
    hook = NoiseHook(weight_noise="pcm", device=build_device(compiled.target.device), t_train_s=31557600.0,
                     plans=layer_plans(compiled.model), generator=torch.Generator().manual_seed(0))
    hook.attach(executor)
    if args.unrolled:
        executor.direct_hook = None
    hook.training = True
    params = [p for p in executor.params.values() if p.requires_grad]
    cimc_opt = torch.optim.Adam(params, lr=1e-3)

    def cimc_step() -> None:
        hook.new_batch()
        cimc_opt.zero_grad(set_to_none=True)
        F.cross_entropy(executor(x)[0], y).backward()
        cimc_opt.step()

    t_torch = _timed_steps(torch_step, args.steps)
    t_cimc = _timed_steps(cimc_step, args.steps)
    print(f"model {args.model}, batch {args.batch}, {args.threads} torch thread(s), {args.bits}-bit converters"
          + (", unrolled convolutions" if args.unrolled else ""))
    print(f"plain PyTorch float step (peer): {1e3 * t_torch:8.1f} ms")
    print(f"cimc pcm+qat step              : {1e3 * t_cimc:8.1f} ms")
    print(f"ratio cimc / peer              : {t_cimc / t_torch:8.2f}x")


if __name__ == "__main__":
    main()
