"""Write random-weight AnalogNets-like KWS and VWW ONNX models (for cost modelling and mapping tests).

Usage: ``python examples/export_reference.py OUT_DIR [--seed 0]`` -> ``OUT_DIR/kws_ref.onnx``,
``OUT_DIR/vww_ref.onnx``. Weights are random (seeded) but BatchNorm statistics are non-trivial, so the
graphs look like trained ones to the compiler; accuracy is meaningless.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

# Sibling modules: imported as part of the `examples` package (tests), or from the script's folder,
# which Python puts first on sys.path when the file is run as a script.
if __package__:
    from . import models
else:
    import models

__all__ = ["export_reference", "main", "randomise_batchnorm"]


def randomise_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-default statistics and affine parameters (as after training)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
            module.weight.data.copy_(0.8 + 0.4 * torch.rand(c, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(c, generator=generator))


def export_reference(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Export ``kws_ref.onnx`` and ``vww_ref.onnx`` to ``out_dir``; returns their paths."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    out = Path(out_dir)
    paths = {}
    for name, build, shape in (
        ("kws", models.kws_net, models.KWS_INPUT_SHAPE),
        ("vww", models.vww_net, models.VWW_INPUT_SHAPE),
    ):
        model = build()
        with torch.no_grad():
            randomise_batchnorm(model, generator)
        paths[name] = models.export_onnx(model, out / f"{name}_ref.onnx", shape, seed=seed)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in export_reference(args.out_dir, args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
