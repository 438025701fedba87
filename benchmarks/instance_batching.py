"""Chip instances one at a time or batched: the products of a simulation layer computed both ways, timed.

The simulator runs every chip instance's crossbar products on their own (one convolution or one matrix
product per instance) so that an instance's numbers cannot depend on how many instances share a pass — the
property that makes sharded Monte Carlo (``--workers``, ``--ray``, ``instance_range``) identical bit for bit.
The alternative is one batched call over all instances: a grouped convolution (instances side by side in
the channels) or a batched matrix product. This script times both on layer shapes of the built-in models
and the corpus (CPU time of one thread, best of ``--repeats``, so the figure holds on a loaded machine) and
checks whether the batched call happens to give the same bits here. Ratio > 1: batching is faster.

    python benchmarks/instance_batching.py [--instances 10] [--repeats 10]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["main"]

logger = logging.getLogger(__name__)

# (label, batch, in channels, height, width, out channels): 3x3 convolutions, padding 1
CONVS = [("KWS conv 56→56 (25x5)", 64, 56, 25, 5, 56), ("MNIST-sized conv 16→32 (14x14)", 64, 16, 14, 14, 32),
         ("MobileNet-like conv 64→64 (28x28)", 32, 64, 28, 28, 64)]
# (label, rows M, K, N): unrolled products
GEMMS = [("KWS-like unrolled layer", 64 * 125, 504, 56), ("Linear 1568→64, batch 64", 64, 1568, 64)]


def _cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    """Best CPU time of ``fn`` in ms (process time: other jobs on the machine do not count)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best * 1e3


def _conv_row(label: str, b: int, c: int, h: int, w: int, o: int, instances: int, repeats: int) -> str:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(instances, b, c, h, w, generator=gen)
    ws = [torch.randn(o, c, 3, 3, generator=gen) for _ in range(instances)]
    xs = [x[i].contiguous(memory_format=torch.channels_last) for i in range(instances)]
    xg = x.transpose(0, 1).reshape(b, instances * c, h, w).contiguous(memory_format=torch.channels_last)
    wg = torch.cat(ws)
    one = _cpu_ms(lambda: [F.conv2d(xs[i], ws[i], None, 1, 1) for i in range(instances)], repeats)
    batched = _cpu_ms(lambda: F.conv2d(xg, wg, None, 1, 1, 1, instances), repeats)
    yg = F.conv2d(xg, wg, None, 1, 1, 1, instances).reshape(b, instances, o, h, w)
    same = all(torch.equal(yg[:, i], F.conv2d(xs[i], ws[i], None, 1, 1)) for i in range(instances))
    return f"| {label} | grouped convolution | {one:.1f} | {batched:.1f} | {one / batched:.2f} | {same} |"


def _gemm_row(label: str, m: int, k: int, n: int, instances: int, repeats: int) -> str:
    gen = torch.Generator().manual_seed(1)
    a, w = torch.randn(instances, m, k, generator=gen), torch.randn(instances, k, n, generator=gen)
    one = _cpu_ms(lambda: [a[i] @ w[i] for i in range(instances)], repeats)
    batched = _cpu_ms(lambda: torch.bmm(a, w), repeats)
    same = torch.equal(torch.bmm(a, w), torch.stack([a[i] @ w[i] for i in range(instances)]))
    return f"| {label} | batched matrix product | {one:.1f} | {batched:.1f} | {one / batched:.2f} | {same} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{args.instances} chip instances, 1 thread, CPU ms (best of {args.repeats})")
    print("| layer | batched as | one instance at a time (ms) | batched (ms) | batched speed-up | same bits here |")
    print("|---|---|---|---|---|---|")
    for row in CONVS:
        print(_conv_row(*row, args.instances, args.repeats), flush=True)
    for row in GEMMS:
        print(_gemm_row(*row, args.instances, args.repeats), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
