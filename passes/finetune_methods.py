"""The names of the fine-tuning methods and the default combination (no heavy imports: the command line's
``--help`` lists them without loading torch). :mod:`cimc.passes.finetune` implements them."""

from __future__ import annotations

__all__ = ["DEFAULT_METHOD", "LABEL_FREE_METHOD", "METHODS"]

METHODS = ("none", "noise", "pcm", "clip", "qat", "adversarial", "dropout", "distill", "ce")
DEFAULT_METHOD = "pcm+qat"  # chosen by measurement: docs/finetuning.md
LABEL_FREE_METHOD = "distill+pcm+qat"  # the default when the data have no labels
