"""The names of the fine-tuning methods and the default combination (no heavy imports: the command line's
``--help`` lists them without loading torch). :mod:`cimc.passes.finetune` implements them."""

from __future__ import annotations

__all__ = ["DEFAULT_METHOD", "METHODS"]

METHODS = ("none", "noise", "pcm", "clip", "qat", "adversarial", "dropout")
DEFAULT_METHOD = "pcm+qat"  # chosen by measurement: docs/finetuning.md
