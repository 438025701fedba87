"""Files shipped with cimc: trained example models and their test sets.

* ``kws.onnx``: AnalogNets-like keyword-spotting CNN (input ``[B, 1, 49, 10]`` normalised MFCC,
  12 classes: silence, unknown, yes, no, up, down, left, right, on, off, stop, go);
  ``kws_test.npz`` (voices unseen in training), ``kws_val.npz`` and a small ``kws_train.npz`` subset
  for fine-tuning demos. Made by ``examples/kws_dataset.py`` and ``examples/train_kws.py``.
* ``mnist.onnx``: small MNIST CNN (input ``[B, 1, 28, 28]`` in [0, 1], 10 classes) and
  ``mnist_test.npz`` (1,000 real MNIST digits). Made by ``examples/train_mnist.py``.

Accuracies and the commands that measure them: ``docs/examples.md``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cimc.errors import InputError

__all__ = [
    "DATASETS",
    "KWS_LABELS",
    "MODELS",
    "kws_model",
    "kws_test",
    "kws_train",
    "kws_val",
    "mnist_model",
    "mnist_test",
    "path",
]

# Class index -> label of the keyword-spotting model (the order of the Speech Commands v0.02 12-class task).
KWS_LABELS: tuple[str, ...] = (
    "silence",
    "unknown",
    "yes",
    "no",
    "up",
    "down",
    "left",
    "right",
    "on",
    "off",
    "stop",
    "go",
)

# Names accepted by cimc.data.load_dataset and by the CLI, mapped to shipped file names.
DATASETS: dict[str, str] = {
    "kws-test": "kws_test.npz",
    "kws-val": "kws_val.npz",
    "kws-train": "kws_train.npz",
    "mnist-test": "mnist_test.npz",
}
MODELS: dict[str, str] = {"kws": "kws.onnx", "mnist": "mnist.onnx"}


def path(name: str) -> Path:
    """Path of the shipped file ``name`` (e.g. ``"kws.onnx"``); InputError if cimc does not ship it."""
    # The package is installed as plain files (wheel or editable), so the traversable is a real path.
    candidate = Path(str(resources.files(__name__).joinpath(name)))
    if not candidate.is_file():
        shipped = sorted(p.name for p in candidate.parent.iterdir() if p.suffix in {".onnx", ".npz", ".json"})
        raise InputError(
            f"built-in file '{name}' is not shipped with this cimc install (shipped: {', '.join(shipped)}); "
            "reinstall cimc or give a file path"
        )
    return candidate


def kws_model() -> Path:
    """The trained keyword-spotting ONNX model."""
    return path(MODELS["kws"])


def kws_test() -> Path:
    """Keyword-spotting test set (voices unseen in training), ``x`` [N, 1, 49, 10]."""
    return path(DATASETS["kws-test"])


def kws_val() -> Path:
    """Keyword-spotting validation set (voices seen in neither training nor test)."""
    return path(DATASETS["kws-val"])


def kws_train() -> Path:
    """A small class-balanced subset of the keyword-spotting training set, for fine-tuning demos."""
    return path(DATASETS["kws-train"])


def mnist_model() -> Path:
    """The trained MNIST ONNX model."""
    return path(MODELS["mnist"])


def mnist_test() -> Path:
    """1,000 MNIST test digits, ``x`` [N, 1, 28, 28] in [0, 1]."""
    return path(DATASETS["mnist-test"])
