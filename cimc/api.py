"""The typed Python API; the command line is a thin layer over these functions.

>>> import cimc
>>> model = cimc.load("model.onnx")          # import + canonicalise (onnx-ir model)
>>> print(cimc.inspect(model).table())
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx_ir as ir

from cimc.frontend import load_model
from cimc.inspection import InspectReport, inspect_model

__all__ = ["load", "inspect"]

logger = logging.getLogger(__name__)

ModelLike = "str | os.PathLike[str] | ir.Model"


def load(path: str | os.PathLike[str], *, batch: int = 1, canonicalize: bool = True) -> ir.Model:
    """Import an ONNX file: validate, fix the batch size, infer shapes and (by default) canonicalise.

    Raises a :class:`cimc.errors.CimcError` subclass with a one-line message on any bad input, including
    every unsupported node at once.
    """
    from cimc.passes.canonicalize import canonicalize as run_canonicalize

    model = load_model(path, batch=batch)
    model.graph.meta["cimc.source"] = str(path)
    if canonicalize:
        run_canonicalize(model)
    return model


def inspect(model: str | os.PathLike[str] | ir.Model, *, batch: int = 1, canonicalize: bool = True) -> InspectReport:
    """Per-node report of a model: shapes, parameters, MACs, and whether it runs analog or digital."""
    name = ""
    if not isinstance(model, ir.Model):
        name = Path(model).name
        model = load(model, batch=batch, canonicalize=canonicalize)
    return inspect_model(model, name=name)
