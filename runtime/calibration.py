"""Fixed probe inputs for global drift compensation (GDC).

On the chip, GDC feeds a fixed calibration input to each layer right after programming and again at read
time, and rescales the layer's outputs digitally by the ratio of mean |output|. The probe must be the same
bits every time (it is stored with the mapping), so it is generated from a fixed seed: ``count`` vectors of
``rows`` inputs, uniform in [0, x_max) (non-negative, as post-ReLU activations are).
"""

from __future__ import annotations

import torch

__all__ = ["GDC_PROBE_COUNT", "GDC_PROBE_SEED", "gdc_probe"]

GDC_PROBE_COUNT = 32
GDC_PROBE_SEED = 1234


def gdc_probe(rows: int, x_max: float = 1.0, count: int = GDC_PROBE_COUNT, seed: int = GDC_PROBE_SEED) -> torch.Tensor:
    """The GDC probe: [count, rows] float32, uniform in [0, x_max), identical for identical arguments."""
    gen = torch.Generator().manual_seed(seed + rows)
    return torch.rand(count, rows, generator=gen) * x_max
