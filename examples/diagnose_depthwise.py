"""Diagnose a depthwise-heavy model, follow the advice, measure the recovery.

Trains a small MobileNet-like network (depthwise-separable blocks) on scikit-learn's 8x8 digits for a few
epochs, exports it to ONNX, compiles it onto a target with calibration, runs ``cimc diagnose`` and then
compiles again with every layer the diagnosis says to keep digital (``--digital``) and simulates both.

    python examples/diagnose_depthwise.py --out depthwise-demo [--target aon-cim] [--time 24h]

Writes ``mobilenet_digits.onnx``, ``digits_{train,test}.npz``, the compiled folders and ``summary.json``
under ``--out``. Needs scikit-learn (``pip install cimc[examples]``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

import cimc
from cimc.data import save_dataset
from cimc.diagnosis import diagnose

__all__ = ["MobileNetDigits", "main"]

logger = logging.getLogger(__name__)


class MobileNetDigits(nn.Module):
    """Depthwise-separable CNN for [B, 1, 8, 8] digits: a stem, four dw(3x3)+pw(1x1) blocks, a classifier."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(),
                    nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            *block(width, width, 1), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 1),
            *block(2 * width, 4 * width, 2),
        )
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:450], order[450:]
    return x[train], y[train], x[test], y[test]


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 30, seed: int = 0) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="depthwise-demo")
    p.add_argument("--target", default="aon-cim")
    p.add_argument("--time", default="24h")
    p.add_argument("--instances", type=int, default=5)
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = _digits()
    save_dataset(out / "digits_train.npz", xtr, ytr)
    save_dataset(out / "digits_test.npz", xte, yte)
    model = MobileNetDigits()
    train(model, xtr, ytr, epochs=args.epochs)
    onnx_path = out / "mobilenet_digits.onnx"
    torch.onnx.export(model, torch.zeros(1, 1, 8, 8), onnx_path, opset_version=13, dynamo=False,
                      input_names=["x"], output_names=["logits"])
    calib = out / "digits_train.npz"
    before = cimc.compile(onnx_path, args.target, calibration=calib, out_dir=out / "before.cimc")
    diag = diagnose(before, out / "digits_test.npz", time=args.time, instances=args.instances,
                    out_dir=out / "before.cimc" / "diagnose")
    print(diag.table())
    digital = [a["layer"] for a in diag.data["advice"] if a["kind"] == "digital"]
    after = cimc.compile(onnx_path, args.target, calibration=calib, digital=digital, out_dir=out / "after.cimc")
    sims = {}
    for name, c in (("before", before), ("after", after)):
        r = cimc.simulate(c, out / "digits_test.npz", drift=args.time, instances=args.instances, compare_gdc=False)
        point = r.data["series"][0]["points"][0]
        sims[name] = {"float": r.data["float_accuracy"], "quantized": r.data["quantized_accuracy"],
                      "chip_mean": point["mean"], "chip_std": point["std"], "tops_per_w": c.cost.tops_per_w,
                      "analog_layers": len(c.analog_nodes())}
    summary = {"target": args.target, "time": args.time, "digital": digital, **sims}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
