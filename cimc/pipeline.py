"""Passes by name, pipelines as strings, and the context they run in.

A pass is a frozen dataclass registered under a name; its fields are its options. A pipeline is a string a
person can type and a manifest can record::

    canonicalize,map,quantize{percentile=99.9},schedule

Option names use dashes on the command line and underscores in Python; values are converted to the field's
type. Unknown passes and options are errors that name them. Everything a pass needs beyond its options
(the target, calibration data, the seed) comes in a typed :class:`CompileContext`, never in ``**kwargs``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir

from cimc.console import progress_bar
from cimc.errors import CimcError, InputError

__all__ = [
    "CimcPass",
    "CompileContext",
    "PASSES",
    "parse_pipeline",
    "register_pass",
    "run_pipeline",
]

logger = logging.getLogger(__name__)

PASSES: dict[str, type[CimcPass]] = {}


@dataclass
class CompileContext:
    """What passes need besides the model and their options."""

    target: Any  # cimc.targets.schema.Target
    calibration: Any = None  # cimc.data.Dataset used by quantize (None: quantize sets ranges from weights only)
    training: Any = None  # cimc.data.Dataset used by finetune
    validation: Any = None
    seed: int = 0
    progress: bool = True
    digital: tuple[str, ...] = ()  # analog layers the user keeps off the crossbar (--digital NAME)
    replicate: dict[str, int] = field(default_factory=dict)  # layer -> replicas (--replicate NAME=R)
    results: dict[str, Any] = field(default_factory=dict)  # what passes report (packing, cost, ...)


class CimcPass(ir.passes.InPlacePass):
    """Base class of cimc's passes: a dataclass whose fields are options, plus the compile context."""

    name: ClassVar[str] = ""
    ctx: CompileContext

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "ctx"}  # type: ignore[arg-type]

    def spec(self) -> str:
        opts = ",".join(f"{k.replace('_', '-')}={v}" for k, v in self.options().items())
        return f"{self.name}{{{opts}}}" if opts else self.name


def register_pass(name: str) -> Any:
    """Class decorator: register a pass dataclass under ``name`` for pipeline strings."""

    def register(cls: type[CimcPass]) -> type[CimcPass]:
        cls.name = name
        PASSES[name] = cls
        return cls

    return register


_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


def _convert(pass_name: str, option: str, raw: str, annotation: Any) -> Any:
    hint = annotation
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if origin is not None else [hint]
    text = raw.strip()
    if text.lower() in ("none", "null", "off") and type(None) in typing.get_args(hint):
        return None
    for kind in args:
        try:
            if kind is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            if kind in (int, float, str):
                return kind(text)
            if typing.get_origin(kind) is typing.Literal:
                if text in typing.get_args(kind):
                    return text
                raise ValueError(text)
        except ValueError:
            continue
    raise InputError(f"pass '{pass_name}': option '{option}' cannot be {raw!r} (expected {hint})")


def parse_pipeline(spec: str, ctx: CompileContext) -> list[CimcPass]:
    """Build the passes of a pipeline string, e.g. ``canonicalize,quantize{adc-bits=6},map,schedule``."""
    passes: list[CimcPass] = []
    pos = 0
    spec = spec.strip()
    while pos < len(spec):
        m = _ITEM.match(spec, pos)
        if not m or m.end() == pos:
            raise InputError(f"cannot parse pipeline {spec!r} at position {pos}; expected name or name{{opt=value,...}}")
        pos = m.end()
        name, raw_opts = m.group(1), m.group(2)
        if name not in PASSES:
            raise InputError(f"unknown pass '{name}' in pipeline; known passes: {', '.join(sorted(PASSES))}")
        cls = PASSES[name]
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "ctx"}  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in (raw_opts or "").split(","))):
            if "=" not in item:
                raise InputError(f"pass '{name}': option {item!r} needs a value (name=value)")
            key, value = (s.strip() for s in item.split("=", 1))
            attr = key.replace("-", "_")
            if attr not in fields:
                known = ", ".join(k.replace("_", "-") for k in fields) or "none"
                raise InputError(f"pass '{name}' has no option '{key}' (options: {known})")
            kwargs[attr] = _convert(name, key, value, hints[attr])
        passes.append(cls(ctx=ctx, **kwargs))  # type: ignore[call-arg]
    return passes


def _stderr_is_tty() -> bool:
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def run_pipeline(model: ir.Model, passes: list[CimcPass]) -> ir.Model:
    """Run passes in order; a failure says which passes had already run. With the context's ``progress``, a
    bar on stderr names the pass running (calibration and packing take a while on large models)."""
    import time

    done: list[str] = []
    show = bool(passes) and passes[0].ctx.progress
    bar = None
    if show:
        bar = progress_bar(total=len(passes), desc="compiling", unit="pass")
    try:
        for p in passes:
            started = time.perf_counter()
            if bar is not None:
                # Redraw now only on a terminal: in a log, a short compile prints nothing at all.
                bar.set_description(f"compiling: {p.name}", refresh=_stderr_is_tty())
            try:
                p(model)
            except CimcError:
                raise
            except (ir.passes.PreconditionError, ir.passes.PostconditionError) as exc:
                raise CimcError(
                    f"pass '{p.name}' failed its checks after {', '.join(done) or 'no passes'}: {exc}"
                ) from exc
            done.append(p.spec())
            logger.info("ran pass %s in %.1f s", p.spec(), time.perf_counter() - started)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    model.metadata_props["cimc.pipeline"] = ",".join(done)
    return model
