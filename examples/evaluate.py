"""Top-1 accuracy of an ONNX classifier on an ``.npz`` dataset, measured with onnxruntime.

Usage: ``python examples/evaluate.py MODEL.onnx DATA.npz`` (DATA may be a built-in name like ``kws-test``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

__all__ = ["main", "onnx_accuracy"]


def onnx_accuracy(model_path: str | Path, data: str | Path, batch_size: int = 500) -> float:
    """Fraction of samples whose arg-max logit equals the label (onnxruntime, CPU)."""
    import onnxruntime as ort

    from cimc.data import batches, load_dataset
    from cimc.errors import DataError

    ds = load_dataset(data)
    if ds.y is None:
        raise DataError(f"dataset '{ds.name}' has no labels 'y'; accuracy needs them")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    correct = 0
    for xb, yb in batches(ds, batch_size):
        logits = session.run(None, {input_name: xb})[0]
        correct += int((np.argmax(logits, axis=1) == yb).sum())
    return correct / len(ds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("data", help=".npz dataset (x, y) or a built-in name such as kws-test")
    args = parser.parse_args(argv)
    from cimc.errors import CimcError

    try:
        acc = onnx_accuracy(args.model, args.data)
    except CimcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"accuracy {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
