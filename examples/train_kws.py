"""Train the AnalogNets-like keyword-spotting CNN on the espeak-ng dataset; export ONNX + shipped sets.

Usage: ``python examples/train_kws.py [--data build/kws] [--out-dir cimc/builtin] [--seed 0] [--epochs 15] [--threads 2]``

``--data`` holds ``kws_{train,val,test}.npz`` from ``examples/kws_dataset.py``; missing files are generated
there first (seed 0, needs espeak-ng). Writes to ``--out-dir``: ``kws.onnx`` (BatchNorm kept),
``kws_test.npz`` and ``kws_val.npz`` (float16), and ``kws_train.npz`` (a class-balanced subset of
``--ship-train`` samples per class, float16) for fine-tuning demos.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Sibling modules: imported as part of the `examples` package (tests), or from the script's folder,
# which Python puts first on sys.path when the file is run as a script.
if __package__:
    from . import kws_dataset, models, training
else:
    import kws_dataset
    import models
    import training

__all__ = ["balanced_subset", "main", "time_shift_augment"]

_DEFAULT_OUT = Path(__file__).resolve().parent.parent / "cimc" / "builtin"


def time_shift_augment(
    x: torch.Tensor, generator: torch.Generator, max_frames: int = 6, noise_std: float = 0.1
) -> torch.Tensor:
    """Per sample: circular shift along time by up to ``max_frames`` 20-ms frames, plus Gaussian noise.

    Features are normalised to unit variance per coefficient, so ``noise_std`` is relative to that.
    """
    n, _, frames, _ = x.shape
    shifts = torch.randint(-max_frames, max_frames + 1, (n, 1), generator=generator)
    index = (torch.arange(frames)[None, :] - shifts) % frames  # [n, frames]
    shifted = torch.gather(x, 2, index[:, None, :, None].expand_as(x))
    return shifted + noise_std * torch.randn(x.shape, generator=generator)


def balanced_subset(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` samples of every class, drawn without replacement."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


def _load_splits(data_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from cimc.data import load_dataset

    missing = [s for s in kws_dataset.SPLITS if not (data_dir / f"kws_{s}.npz").is_file()]
    if missing:
        print(f"generating {missing} in {data_dir} (seed 0)", flush=True)
        kws_dataset.generate(data_dir, seed=0, splits=tuple(missing))
    out = {}
    for split in kws_dataset.SPLITS:
        ds = load_dataset(data_dir / f"kws_{split}.npz")
        out[split] = (ds.x, ds.y)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train the example keyword-spotting CNN")
    parser.add_argument("--data", type=Path, default=Path("build") / "kws")
    parser.add_argument("--out-dir", type=Path, default=_DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--ship-train", type=int, default=100, help="training samples per class to ship")
    args = parser.parse_args(argv)

    from cimc.data import save_dataset

    t0 = time.perf_counter()
    try:
        splits = _load_splits(args.data)
    except kws_dataset.EspeakMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    generator = training.seed_everything(args.seed, threads=args.threads)
    model = models.kws_net(dropout=0.1)
    print(f"kws_net: {models.count_parameters(model, folded=True)} parameters (BatchNorm folded)")
    best = training.train(
        model,
        splits["train"],
        splits["val"],
        epochs=args.epochs,
        batch_size=128,
        lr=3e-3,
        weight_decay=1e-3,
        generator=generator,
        augment=time_shift_augment,
        label_smoothing=0.05,
    )
    test_acc = training.accuracy(model, *splits["test"])
    print(f"best epoch {best['epoch']} (val {best['val_acc']:.4f}): test accuracy {test_acc:.4f} (unseen voices)")

    out = args.out_dir
    models.export_onnx(model, out / "kws.onnx", models.KWS_INPUT_SHAPE)
    save_dataset(out / "kws_test.npz", *splits["test"], float16=True)
    save_dataset(out / "kws_val.npz", *splits["val"], float16=True)
    keep = balanced_subset(splits["train"][1], args.ship_train, seed=args.seed)
    save_dataset(out / "kws_train.npz", splits["train"][0][keep], splits["train"][1][keep], float16=True)
    print(f"wrote kws.onnx, kws_{{test,val,train}}.npz to {out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
