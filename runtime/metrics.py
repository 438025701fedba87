"""End metrics as registered classes: task metrics with labels, agreement with the float model without.

A metric is an object (:class:`Metric`): its name, whether higher is better, whether it is shown as a
percentage, whether it needs labels, and how it accumulates batch by batch over Monte Carlo instances
(outputs ``[instances, batch, ...]``) so a large test set never has to sit in memory, then reduces to one
number per instance. Built-ins (:func:`get_metric` reads these names):

================  ==============================================================  ==========================
name              definition (per instance)                                       needs
================  ==============================================================  ==========================
accuracy          share of samples whose argmax over the output equals the label  integer labels ``y``
top5 (topK)       share of samples whose label is among the K largest outputs     integer labels ``y``
auc, auc[c]       ROC-AUC of a score (ties count one half)                        labels (positives below)
detect@T[c]       detection rate: share of positives whose score is >= T          labels (positives below)
cosine            mean over samples of cos(output, float output), flattened       the float model's outputs
mse               mean squared difference to the float outputs (output units²)    the float model's outputs
snr               10·log10(Σ float² / Σ (output − float)²), dB                    the float model's outputs
relerr            ‖output − float‖₂ / ‖float‖₂ over the whole data set             the float model's outputs
================  ==============================================================  ==========================

**Scores** (``auc``, ``detect@T``): the score is the model's first output, one value per sample (a
sigmoid detector, a VAD probability); positives are the samples labelled 1 (labels 0/1). With several
values per sample, name the score column in brackets: ``auc[3]`` / ``detect@0.5[3]`` score column 3 and
count the samples labelled 3 as positives (one class against the rest).

**User metrics**: any ``callable(outputs, labels_or_reference) -> float`` (Python: ``metric=fn``; command
line: ``--metric module:function``). ``outputs`` is one chip instance's first output ``[samples, ...]``; the
second argument is the integer labels when the data has them, otherwise the float model's outputs. The
function's optional attributes ``higher_is_better`` (default True), ``percent`` (default False) and
``needs_labels`` (default False) describe it. It is called once per chip instance on the whole data.

Shown as percentages: accuracy, topK, detect@T. Lower is better for mse and relerr.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cimc.errors import DataError, InputError

__all__ = [
    "LABEL_METRICS",
    "LOW_DIMENSIONAL",
    "METRICS",
    "Auc",
    "Detection",
    "FunctionMetric",
    "Metric",
    "MetricAccumulator",
    "SumMetric",
    "TopK",
    "check_labels",
    "check_metric",
    "check_yield_target",
    "chip_yield",
    "default_metric",
    "format_score",
    "get_metric",
    "higher_is_better",
    "is_percent",
    "metric_name",
    "needs_labels",
    "output_size",
    "per_class_accuracy",
    "register_metric",
    "roc_auc",
]

logger = logging.getLogger(__name__)

from cimc.data import check_labels
from cimc.vocabulary import LABEL_METRICS, METRICS

# An output with at most this many values per sample gets an error metric by default, not cosine: the cosine
# of one sigmoid output is always 1, and of two or three values nearly so.
LOW_DIMENSIONAL = 8


class Metric:
    """One metric: name and presentation, what it needs, and how it accumulates.

    Subclasses implement :meth:`start` (the per-run state for ``instances`` chips), :meth:`update` (one batch)
    and :meth:`values` (one number per instance)."""

    name: str = ""
    higher_is_better: bool = True
    percent: bool = False
    unit: str = ""  # shown after the number, e.g. "dB"
    needs_labels: bool = False  # True: labels y; False: the float model's outputs
    per_class: bool = False  # counts per class are kept (accuracy-like metrics)

    def check_labels(self, y: np.ndarray | None, classes: int) -> np.ndarray | None:
        """The labels as this metric needs them (raises a one-line DataError otherwise)."""
        return check_labels(y, classes) if self.needs_labels else y

    def start(self, instances: int) -> Any:
        raise NotImplementedError

    def update(self, state: Any, out: torch.Tensor, y: np.ndarray | None, reference: torch.Tensor | None) -> None:
        """``out`` [instances, batch, ...]; ``y`` [batch] labels; ``reference`` [batch, ...] float outputs."""
        raise NotImplementedError

    def values(self, state: Any) -> np.ndarray:
        raise NotImplementedError

    def hits(self, flat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample correctness ``[instances, batch]`` (``per_class`` metrics only)."""
        raise NotImplementedError


@dataclass
class _Sums:
    num: np.ndarray
    den: np.ndarray


class SumMetric(Metric):
    """A metric that is a ratio of per-instance sums (numerator, denominator) over the batches."""

    def start(self, instances: int) -> _Sums:
        return _Sums(np.zeros(instances, dtype=np.float64), np.zeros(instances, dtype=np.float64))

    def values(self, state: _Sums) -> np.ndarray:
        return state.num / np.maximum(state.den, 1)


class Accuracy(SumMetric):
    name, percent, needs_labels, per_class = "accuracy", True, True, True

    def hits(self, flat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return flat.argmax(-1) == labels[None]

    def update(self, state: _Sums, out: torch.Tensor, y: np.ndarray | None, reference: torch.Tensor | None) -> None:
        hit = self.hits(_flat(out), _labels(y))
        state.num += hit.sum(1).numpy()
        state.den += hit.shape[1]


class TopK(Accuracy):
    """Share of samples whose label is among the ``k`` largest outputs (``top5``: k = 5)."""

    def __init__(self, k: int = 5):
        self.k = k
        self.name = f"top{k}"

    def hits(self, flat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        k = min(self.k, flat.shape[-1])
        return (flat.topk(k, dim=-1).indices == labels[None, :, None]).any(-1)


class Cosine(SumMetric):
    name = "cosine"

    def update(self, state: _Sums, out: torch.Tensor, y: np.ndarray | None, reference: torch.Tensor | None) -> None:
        flat, ref = _flat(out), _ref(reference, out)
        cos = torch.nn.functional.cosine_similarity(flat, ref.expand_as(flat), dim=-1, eps=1e-12)
        state.num += cos.sum(1).numpy()
        state.den += flat.shape[1]


class Mse(SumMetric):
    name, higher_is_better = "mse", False

    def update(self, state: _Sums, out: torch.Tensor, y: np.ndarray | None, reference: torch.Tensor | None) -> None:
        diff = _flat(out) - _ref(reference, out)
        state.num += diff.pow(2).sum((1, 2)).numpy()
        state.den += diff.shape[1] * diff.shape[2]


class _ErrorEnergy(SumMetric):
    """Error energy Σ (output − float)² over signal energy Σ float² (snr and relerr)."""

    def update(self, state: _Sums, out: torch.Tensor, y: np.ndarray | None, reference: torch.Tensor | None) -> None:
        ref = _ref(reference, out)
        state.num += (_flat(out) - ref).pow(2).sum((1, 2)).numpy()
        state.den += float(ref.pow(2).sum())


class Snr(_ErrorEnergy):
    name, unit = "snr", "dB"

    def values(self, state: _Sums) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.where(state.num > 0, 10 * np.log10(state.den / np.maximum(state.num, 1e-300)), math.inf)


class RelErr(_ErrorEnergy):
    name, higher_is_better = "relerr", False

    def values(self, state: _Sums) -> np.ndarray:
        return np.sqrt(state.num / np.maximum(state.den, 1e-300))


class _Score(Metric):
    """A metric of one score per sample (``column`` of the first output) against binary positives."""

    needs_labels = True

    def __init__(self, column: int | None):
        self.column = column

    def _suffix(self) -> str:
        return "" if self.column is None else f"[{self.column}]"

    def check_labels(self, y: np.ndarray | None, classes: int) -> np.ndarray | None:
        if y is None:
            raise DataError(f"--metric {self.name} needs labels: the data file has no 'y'")
        if self.column is None and classes != 1:
            raise InputError(f"--metric {self.name}: the output has {classes} values per sample; name the score "
                             f"column, e.g. {self.name}[{classes - 1}] (positives: samples labelled with that column)")
        if self.column is not None and not 0 <= self.column < classes:
            raise InputError(f"--metric {self.name}: score column {self.column} is outside the output's "
                             f"{classes} values per sample")
        y = check_labels(y, max(classes, 2))
        assert y is not None
        if self.column is None and not np.isin(y, (0, 1)).all():
            raise DataError(f"--metric {self.name} on a one-value output needs labels 0 (negative) and 1 (positive)")
        return y

    def scores(self, out: torch.Tensor, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``[instances, batch]`` and positives ``[batch]`` (bool)."""
        flat = _flat(out)
        col = 0 if self.column is None else self.column
        positive = np.asarray(y) == (1 if self.column is None else self.column)
        return flat[..., col].numpy(), positive


class Auc(_Score):
    """ROC-AUC of the score: the chance that a positive scores above a negative (ties count 1/2)."""

    def __init__(self, column: int | None = None):
        super().__init__(column)
        self.name = "auc" + self._suffix()

    def start(self, instances: int) -> list[Any]:
        return [[] for _ in range(instances)] + [[]]  # per instance the scores, last the positives

    def update(self, state: list[Any], out: torch.Tensor, y: np.ndarray | None,
               reference: torch.Tensor | None) -> None:
        scores, positive = self.scores(out, y)
        for i in range(scores.shape[0]):
            state[i].append(scores[i])
        state[-1].append(positive)

    def values(self, state: list[Any]) -> np.ndarray:
        positive = np.concatenate(state[-1]) if state[-1] else np.zeros(0, dtype=bool)
        return np.array([roc_auc(np.concatenate(s), positive) if s else math.nan for s in state[:-1]])


class Detection(_Score, SumMetric):
    """Detection rate at a threshold: the share of positives whose score is at least ``threshold``."""

    percent = True

    def __init__(self, threshold: float, column: int | None = None):
        super().__init__(column)
        self.threshold = threshold
        self.name = f"detect@{threshold:g}" + self._suffix()

    def update(self, state: _Sums, out: torch.Tensor, y: np.ndarray | None, reference: torch.Tensor | None) -> None:
        scores, positive = self.scores(out, y)
        state.num += ((scores >= self.threshold) & positive[None]).sum(1)
        state.den += positive.sum()


class FunctionMetric(Metric):
    """A user's ``fn(outputs [samples, ...], labels or float outputs) -> float``, once per chip instance."""

    def __init__(self, fn: Callable[..., float], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "metric")
        self.higher_is_better = bool(getattr(fn, "higher_is_better", True))
        self.percent = bool(getattr(fn, "percent", False))
        self.needs_labels = bool(getattr(fn, "needs_labels", False))

    def check_labels(self, y: np.ndarray | None, classes: int) -> np.ndarray | None:
        if self.needs_labels and y is None:
            raise DataError(f"--metric {self.name} needs labels: the data file has no 'y'")
        return y

    def start(self, instances: int) -> dict[str, list[Any]]:
        return {"out": [[] for _ in range(instances)], "second": []}

    def update(self, state: dict[str, list[Any]], out: torch.Tensor, y: np.ndarray | None,
               reference: torch.Tensor | None) -> None:
        for i in range(out.shape[0]):
            state["out"][i].append(out[i].detach().numpy())
        state["second"].append(np.asarray(y) if y is not None else reference.detach().numpy())  # type: ignore[union-attr]

    def values(self, state: dict[str, list[Any]]) -> np.ndarray:
        second = np.concatenate(state["second"]) if state["second"] else None
        out = []
        for parts in state["out"]:
            try:
                v = float(self.fn(np.concatenate(parts), second))
            except Exception as exc:  # noqa: BLE001 - a user's function: say whose it is, in one line
                raise InputError(f"metric {self.name} failed: {type(exc).__name__}: {exc}") from None
            out.append(v)
        return np.asarray(out, dtype=np.float64)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC (Mann-Whitney): the share of (positive, negative) pairs the score orders correctly, ties 1/2.
    NaN when the data has no positive or no negative."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    ranks = mean_rank[inverse.reshape(-1)]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ------------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, Callable[[], Metric]] = {}
_USER: dict[str, Metric] = {}  # metrics made from callables in this process, by name


def register_metric(name: str, factory: Callable[[], Metric]) -> None:
    """Make ``name`` a metric name (``factory()`` builds the metric object)."""
    _REGISTRY[name] = factory


for _cls in (Accuracy, Cosine, Mse, Snr, RelErr):
    register_metric(_cls.name, _cls)
register_metric("top5", lambda: TopK(5))
register_metric("auc", Auc)

_TOPK = re.compile(r"top([1-9][0-9]*)")
_AUC = re.compile(r"auc\[([0-9]+)\]")
_DETECT = re.compile(r"detect@([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?:\[([0-9]+)\])?")
_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def get_metric(spec: str | Metric | Callable[..., float]) -> Metric:
    """The metric object for a name (see the module docstring), a ``module:function``, a :class:`Metric`, or
    a callable (registered under its name for this process)."""
    if isinstance(spec, Metric):
        return spec
    if callable(spec):
        m = FunctionMetric(spec)
        _USER[m.name] = m
        return m
    name = str(spec).strip()
    if name in _REGISTRY:
        return _REGISTRY[name]()
    if name in _USER:
        return _USER[name]
    if (m_top := _TOPK.fullmatch(name)) is not None:
        return TopK(int(m_top.group(1)))
    if (m_auc := _AUC.fullmatch(name)) is not None:
        return Auc(int(m_auc.group(1)))
    if (m_det := _DETECT.fullmatch(name)) is not None:
        return Detection(float(m_det.group(1)), None if m_det.group(2) is None else int(m_det.group(2)))
    if _FUNCTION.fullmatch(name):
        return _import_metric(name)
    raise InputError(f"unknown metric {name!r}; use one of {', '.join(METRICS)}, topK, auc, auc[COLUMN], "
                     "detect@THRESHOLD[COLUMN] or module:function")


def _import_metric(name: str) -> Metric:
    module_name, attr = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"--metric {name}: cannot import module {module_name!r} ({exc}); put it on PYTHONPATH") \
            from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise InputError(f"--metric {name}: module {module_name!r} has no {attr!r}")
    if isinstance(fn, type) and issubclass(fn, Metric):
        fn = fn()
    if isinstance(fn, Metric):
        fn.name = fn.name or name
        return fn
    if not callable(fn):
        raise InputError(f"--metric {name}: {attr!r} is not a function")
    m = FunctionMetric(fn, name)
    _USER[name] = m
    return m


def metric_name(spec: str | Metric | Callable[..., float] | None) -> str | None:
    """The name a metric travels under (results, shards); a callable is registered under it."""
    if spec is None:
        return None
    m = get_metric(spec)
    if isinstance(spec, Metric) and m.name not in _REGISTRY:
        _USER[m.name] = m
    return m.name


def default_metric(y: np.ndarray | None, out_values: int | None = None) -> str:
    """The metric that fits the output: with labels, accuracy (AUC for a one-value output); without,
    cosine agreement with the float model, or the SNR against it for outputs of at most
    :data:`LOW_DIMENSIONAL` values per sample (cosine cannot see their errors)."""
    if y is not None:
        return "auc" if out_values == 1 else "accuracy"
    if out_values is not None and out_values <= LOW_DIMENSIONAL:
        return "snr"
    return "cosine"


def output_size(model: Any) -> int | None:
    """Values per sample of the model's first output (None when its shape is not static)."""
    shape = model.graph.outputs[0].shape if model.graph.outputs else None
    if shape is None or len(shape) == 0:
        return None
    dims = list(shape)[1:]
    if not all(isinstance(d, int) for d in dims):
        return None
    return int(np.prod(dims)) if dims else 1


def higher_is_better(metric: str | Metric) -> bool:
    return get_metric(metric).higher_is_better


def is_percent(metric: str | Metric) -> bool:
    """Metrics shown as a percentage."""
    return get_metric(metric).percent


def needs_labels(metric: str | Metric) -> bool:
    return get_metric(metric).needs_labels


def format_score(metric: str | Metric, value: float | None) -> str:
    """A metric value for a table: percent for accuracies, dB for snr, 4 significant digits otherwise."""
    if value is None or not math.isfinite(value):
        return "inf" if value is not None and value > 0 else "-"
    m = get_metric(metric)
    if m.percent:
        return f"{100 * value:.2f} %"
    if m.unit == "dB":
        return f"{value:.1f} dB"
    return f"{value:.4g}" + (f" {m.unit}" if m.unit else "")


def check_metric(metric: str | Metric | Callable[..., float], y: np.ndarray | None) -> None:
    """Unknown metric → InputError; a metric that needs labels on unlabelled data → DataError."""
    m = get_metric(metric)
    if m.needs_labels and y is None:
        kind = "integer labels" if m.per_class else "labels"
        raise DataError(f"--metric {m.name} needs {kind}: the data file has no 'y'; "
                        "use --metric cosine (agreement with the float model) for unlabelled data")


def check_yield_target(metric: str | Metric, target: float | str | None) -> float | None:
    """The yield target in the metric's own units: a number, or ``"90%"`` for percentage metrics."""
    if target is None:
        return None
    m = get_metric(metric)
    text = str(target).strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise InputError(f"--yield-target {target!r} is not a number; write e.g. 0.9 or 90%") from None
    if not math.isfinite(value):
        raise InputError(f"--yield-target {target!r} must be finite")
    if m.percent and not text.endswith("%") and not 0 <= value <= 1:
        raise InputError(f"--yield-target {target}: {m.name} is a share; write {value / 100:g} or {value:g}%")
    return value


def chip_yield(values: Any, target: float, higher: bool) -> float:
    """The share of chip instances whose metric meets ``target`` (>= when higher is better, else <=)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan
    ok = v >= target if higher else v <= target
    return float(ok.mean())


@dataclass
class MetricAccumulator:
    """Per-instance state for one metric (and per-class counts for accuracy-like metrics), batch by batch."""

    metric: str | Metric
    instances: int
    classes: int = 0
    _metric: Metric = field(init=False)
    _state: Any = field(init=False)
    _class_correct: np.ndarray | None = field(init=False, default=None)
    _class_total: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._metric = get_metric(self.metric)
        self._state = self._metric.start(self.instances)
        if self._metric.per_class and self.classes:
            self._class_correct = np.zeros((self.instances, self.classes), dtype=np.float64)
            self._class_total = np.zeros(self.classes, dtype=np.float64)

    def add(self, out: torch.Tensor, y: np.ndarray | None = None, reference: torch.Tensor | None = None) -> None:
        """``out`` [instances, batch, ...]; ``y`` [batch] labels; ``reference`` [batch, ...] float outputs."""
        m = self._metric
        if m.needs_labels and y is None:
            raise DataError(f"metric {m.name} needs labels")
        if not m.needs_labels and reference is None and not isinstance(m, FunctionMetric):
            raise DataError(f"metric {m.name} needs the float model's outputs")
        m.update(self._state, out, y, reference)
        if self._class_correct is not None and self._class_total is not None:
            hit = m.hits(_flat(out), _labels(y))
            lab = np.asarray(y, dtype=np.int64)
            np.add.at(self._class_correct, (slice(None), lab), hit.numpy().astype(np.float64))
            np.add.at(self._class_total, lab, 1.0)

    def values(self) -> np.ndarray:
        """One number per instance."""
        return self._metric.values(self._state)

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


def _flat(out: torch.Tensor) -> torch.Tensor:
    i, b = out.shape[:2]
    return out.reshape(i, b, -1).double()


def _ref(reference: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    assert reference is not None
    return reference.reshape(1, out.shape[1], -1).double()


def _labels(y: np.ndarray | None) -> torch.Tensor:
    assert y is not None
    return torch.from_numpy(np.asarray(y, dtype=np.int64))


def per_class_accuracy(correct: np.ndarray, total: np.ndarray) -> list[float | None]:
    """Accuracy per class, mean over instances, from correct predictions ``[instances, classes]`` and the
    samples per class ``[classes]`` (None for classes absent from the data)."""
    out: list[float | None] = []
    for c in range(len(total)):
        n = total[c]
        out.append(float(correct[:, c].mean() / n) if n else None)
    return out
