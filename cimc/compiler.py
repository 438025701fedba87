"""``cimc.compile``: ONNX in, a mapped and scheduled :class:`~cimc.artifact.CompiledModel` out."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cimc.artifact import CompiledModel, sha256_file
from cimc.errors import InputError, ModelError
from cimc.frontend import load_model
from cimc.pipeline import CompileContext, parse_pipeline, run_pipeline
from cimc.targets import resolve_target

__all__ = ["compile_model", "default_pipeline", "resolve_target"]

logger = logging.getLogger(__name__)


def _register_passes() -> None:
    # Importing the pass modules registers them by name.
    import cimc.passes.canonicalize  # noqa: F401
    import cimc.passes.mapping  # noqa: F401
    import cimc.passes.schedule  # noqa: F401

    try:
        import cimc.passes.quantize  # noqa: F401
    except ImportError:  # pragma: no cover - present in every release
        pass
    try:
        import cimc.passes.finetune  # noqa: F401
    except ImportError:  # pragma: no cover
        pass


def default_pipeline(calibration: bool, finetune: bool) -> str:
    steps = ["canonicalize"]
    if finetune:
        steps.append("finetune")
    steps.append("map")
    if calibration:
        steps.append("quantize")  # after map: ADC ranges are per tile
    return ",".join(steps + ["schedule"])


def compile_model(
    model: str | os.PathLike[str],
    target: Any = "aon-cim",
    *,
    pipeline: str | None = None,
    calibration: Any = None,
    training: Any = None,
    validation: Any = None,
    dac_bits: int | None = None,
    adc_bits: int | None = None,
    arrays: int | None = None,
    batch: int = 1,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_values: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    digital: Sequence[str] = (),
    replicate: Mapping[str, int] | None = None,
    stream: str | Sequence[str] | None = None,
) -> CompiledModel:
    """Compile an ONNX model for a target.

    ``calibration``/``training``: a :class:`cimc.data.Dataset` or a path/builtin name of an ``.npz``; with
    calibration data the ``quantize`` pass sets DAC/ADC ranges, with training data ``finetune`` runs first.
    ``input_shapes``/``input_values`` fix dynamic input dimensions and freeze inputs to constants (see
    :func:`cimc.frontend.load_model`). ``pipeline`` overrides the pass list (e.g. ``"canonicalize,map,schedule"``). ``digital``: names of analog
    layers to keep off the crossbar (run in float, costed on the digital unit), e.g. a depthwise layer that
    ``cimc diagnose`` flags. ``replicate``: ``{layer: r}`` maps each named analog layer r times on independent
    devices and averages the r results on the digital unit (noise falls about √r; r× the crossbar space, MVMs
    and conversions; :mod:`cimc.passes.replicate`).
    ``stream`` (``"auto"`` or ``["OUT=IN", ...]``): the calibration data are sequences ``[S, C, ...]`` of a
    stateful model; the float model runs over them and every chunk is calibrated with its real state.
    ``arrays`` overrides the target's array/core count (same geometry; the report's ``arrays_used`` says how
    many were needed). When ``out_dir`` is given
    the compiled-model directory is written there atomically; it must be new, empty or an earlier compiled
    folder (``force=True`` accepts any other folder, keeping its files), and never an input (:mod:`cimc.outputs`).
    """
    from cimc.data import load_dataset

    _register_passes()
    path = Path(model)
    inputs = [model, calibration, training, validation]
    if out_dir is not None:  # refuse a destructive -o before minutes of work
        from cimc.outputs import check_output_dir

        check_output_dir(out_dir, "compiled", inputs, force=force)
    t = resolve_target(target, dac_bits, adc_bits, arrays)
    calib = load_dataset(calibration) if isinstance(calibration, (str, os.PathLike)) else calibration
    train = load_dataset(training) if isinstance(training, (str, os.PathLike)) else training
    val = load_dataset(validation) if isinstance(validation, (str, os.PathLike)) else validation
    ir_model = load_model(path, batch=batch, input_shapes=input_shapes, input_values=input_values)
    if calib is not None:  # bound now: a wrong file is refused before the passes run
        from cimc.data import bind

        calib = bind(calib, ir_model, stream=stream)  # a Feed bound already passes through, its inputs checked
    ctx = CompileContext(target=t, calibration=calib, training=train, validation=val, seed=seed, progress=progress,
                         digital=tuple(digital), replicate=dict(replicate or {}))
    spec = pipeline or default_pipeline(calib is not None, train is not None)
    passes = parse_pipeline(spec, ctx)
    names = [p.name for p in passes]
    if "schedule" not in names or "map" not in names:
        raise InputError(f"pipeline {spec!r} must include 'map' and 'schedule' to produce a compiled model")
    if "quantize" in names and calib is None:
        raise InputError("the 'quantize' pass needs calibration data: add --calib DATA.npz (arrays x, y)")
    if "finetune" in names and train is None:
        raise InputError("the 'finetune' pass needs training data: add --finetune TRAIN.npz (arrays x, y)")
    run_pipeline(ir_model, passes)
    if not any("cimc.placement" in n.metadata_props for n in ir_model.graph):
        if digital:
            raise InputError(
                f"{path.name}: every layer that could map onto the crossbars is kept digital ({len(tuple(digital))} "
                "named with --digital), so nothing runs on the chip's arrays; keep fewer layers digital, or run the "
                "model digitally without cimc"
            )
        raise ModelError(
            f"{path.name}: no layer maps onto the crossbars (no Conv, Gemm or MatMul with constant weights), so there "
            "is nothing to compile for a CIM chip; 'cimc inspect' shows how each node is classified"
        )
    compiled = CompiledModel(
        model=ir_model, target=t, cost=ctx.results["cost"], source=path.name, source_sha256=sha256_file(path),
        extra={"seed": seed},
    )
    if out_dir is not None:
        compiled.save(out_dir, inputs=inputs, force=force)
    return compiled
