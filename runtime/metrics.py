"""End metrics for any model: task accuracy when there are labels, agreement with the float model otherwise.

A metric is accumulated batch by batch over Monte Carlo instances (outputs ``[instances, batch, ...]``) so a
large test set never has to sit in memory, then reduced to one number per instance:

==========  ====================================================================  =========================
metric      definition (per instance)                                             needs
==========  ====================================================================  =========================
accuracy    share of samples whose argmax over the output equals the label        integer labels ``y``
top5        share of samples whose label is among the 5 largest outputs           integer labels ``y``
cosine      mean over samples of cos(output, float output), each sample flattened the float model's outputs
mse         mean squared difference to the float outputs (output units²)          the float model's outputs
snr         10·log10(Σ float² / Σ (output − float)²), dB                          the float model's outputs
relerr      ‖output − float‖₂ / ‖float‖₂ over the whole data set                   the float model's outputs
==========  ====================================================================  =========================

Higher is better for accuracy, top5, cosine and snr; lower for mse and relerr.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from cimc.errors import DataError, InputError

__all__ = ["LABEL_METRICS", "METRICS", "MetricAccumulator", "check_labels", "check_metric", "default_metric",
           "format_score", "higher_is_better", "is_percent", "per_class_accuracy"]

logger = logging.getLogger(__name__)

from cimc.data import check_labels  # noqa: F401  (re-exported: one label check for every data path)
from cimc.vocabulary import LABEL_METRICS, METRICS  # noqa: E402  (the CLI reads them without torch)


def default_metric(y: np.ndarray | None) -> str:
    """accuracy with labels, cosine agreement with the float model without."""
    return "accuracy" if y is not None else "cosine"


def higher_is_better(metric: str) -> bool:
    return metric not in ("mse", "relerr")


def is_percent(metric: str) -> bool:
    """Metrics shown as a percentage."""
    return metric in LABEL_METRICS


def format_score(metric: str, value: float | None) -> str:
    """A metric value for a table: percent for accuracies, dB for snr, 4 significant digits otherwise."""
    if value is None or not math.isfinite(value):
        return "inf" if value is not None and value > 0 else "-"
    if is_percent(metric):
        return f"{100 * value:.2f} %"
    if metric == "snr":
        return f"{value:.1f} dB"
    return f"{value:.4g}"


def check_metric(metric: str, y: np.ndarray | None) -> None:
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if metric in LABEL_METRICS and y is None:
        raise DataError(f"--metric {metric} needs integer labels: the data file has no 'y'; "
                        "use --metric cosine (agreement with the float model) for unlabelled data")


@dataclass
class MetricAccumulator:
    """Per-instance sums for one metric (and per-class counts for accuracy), batch by batch."""

    metric: str
    instances: int
    classes: int = 0
    _num: np.ndarray = field(init=False)
    _den: np.ndarray = field(init=False)
    _class_correct: np.ndarray | None = field(init=False, default=None)
    _class_total: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._num = np.zeros(self.instances, dtype=np.float64)
        self._den = np.zeros(self.instances, dtype=np.float64)
        if self.metric in LABEL_METRICS and self.classes:
            self._class_correct = np.zeros((self.instances, self.classes), dtype=np.float64)
            self._class_total = np.zeros(self.classes, dtype=np.float64)

    def add(self, out: torch.Tensor, y: np.ndarray | None = None, reference: torch.Tensor | None = None) -> None:
        """``out`` [instances, batch, ...]; ``y`` [batch] labels; ``reference`` [batch, ...] float outputs."""
        i, b = out.shape[:2]
        flat = out.reshape(i, b, -1).double()
        if self.metric in LABEL_METRICS:
            assert y is not None
            labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
            if self.metric == "accuracy":
                hit = flat.argmax(-1) == labels[None]
            else:
                k = min(5, flat.shape[-1])
                hit = (flat.topk(k, dim=-1).indices == labels[None, :, None]).any(-1)
            self._num += hit.sum(1).numpy()
            self._den += b
            if self._class_correct is not None and self._class_total is not None:
                lab = labels.numpy()
                np.add.at(self._class_correct, (slice(None), lab), hit.numpy().astype(np.float64))
                np.add.at(self._class_total, lab, 1.0)
            return
        assert reference is not None
        ref = reference.reshape(1, b, -1).double()
        diff = flat - ref
        if self.metric == "cosine":
            cos = torch.nn.functional.cosine_similarity(flat, ref.expand_as(flat), dim=-1, eps=1e-12)
            self._num += cos.sum(1).numpy()
            self._den += b
        elif self.metric == "mse":
            self._num += diff.pow(2).sum((1, 2)).numpy()
            self._den += diff.shape[1] * diff.shape[2]
        else:  # snr, relerr: signal and error energy
            self._num += diff.pow(2).sum((1, 2)).numpy()
            self._den += float(ref.pow(2).sum())

    def values(self) -> np.ndarray:
        """One number per instance."""
        if self.metric == "snr":
            with np.errstate(divide="ignore"):
                return np.where(self._num > 0, 10 * np.log10(self._den / np.maximum(self._num, 1e-300)), math.inf)
        if self.metric == "relerr":
            return np.sqrt(self._num / np.maximum(self._den, 1e-300))
        return self._num / np.maximum(self._den, 1)

    def per_class(self) -> list[float | None] | None:
        """Accuracy per class, mean over instances (None for classes absent from the data)."""
        if self._class_correct is None or self._class_total is None:
            return None
        return per_class_accuracy(self._class_correct, self._class_total)

    def class_counts(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(correct predictions ``[instances, classes]``, samples per class ``[classes]``), or None for
        metrics without classes: what sharded runs keep per instance and merge."""
        if self._class_correct is None or self._class_total is None:
            return None
        return self._class_correct.copy(), self._class_total.copy()


def per_class_accuracy(correct: np.ndarray, total: np.ndarray) -> list[float | None]:
    """Accuracy per class, mean over instances, from correct predictions ``[instances, classes]`` and the
    samples per class ``[classes]`` (None for classes absent from the data)."""
    out: list[float | None] = []
    for c in range(len(total)):
        n = total[c]
        out.append(float(correct[:, c].mean() / n) if n else None)
    return out
