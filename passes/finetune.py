"""Noise-aware fine-tuning: retrain a model with the chip's non-idealities in the loop.

Methods (``method``, combined with ``+``, e.g. ``pcm+qat``):
  1. ``noise``: additive Gaussian weight noise ``eta * max|W|`` per layer in every forward pass.
  2. ``pcm``: weight noise drawn from the target's own device model (programming + drift + read noise, drift
     compensation) at a read time sampled log-uniformly in [1 s, ``t_train``].
  3. ``clip``: each layer's weights clipped to ±``clip_alpha``·std after every optimiser step.
  4. ``qat``: the target's DAC and ADC (per tile, as mapped) in the loop with straight-through rounding;
     ranges calibrated on training data like the ``quantize`` pass, recalibrated every epoch.
  5. ``adversarial``: the adversarial parameter-noise regulariser (Büchel et al. 2022): ``beta`` · KL between
     the model and its worst case in the relative box ``zeta``·|theta|, found in ``attack_steps`` steps.
  6. ``dropout``: dropout (``dropout``) on every analog layer's input; a baseline.
  ``none`` trains nothing (the validation still runs and is reported).

Epoch selection: after every epoch (and before the first) the model is validated on ``val_instances``
PCM instances read at ``val_time`` (default 24 h) with the target's converters calibrated, through the same
executor hook; the best epoch's weights are kept. Validation data: ``ctx.validation``, else a seeded 10 %
split of the training data.

Precondition: BatchNormalization folded (run ``canonicalize`` first; ``cimc.load`` does). Result: the
model's weights and biases are replaced in place, ``metadata_props["cimc.finetune"]`` records the method,
options and validation history.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from cimc.data import reshape_hint
from cimc.errors import CimcError, DataError, InputError
from cimc.passes.finetune_methods import DEFAULT_METHOD, METHODS
from cimc.pipeline import CimcPass, CompileContext, register_pass

__all__ = ["DEFAULT_METHOD", "METHODS", "FinetunePass", "finetune", "parse_method", "save_finetuned"]

logger = logging.getLogger(__name__)

_VAL_FRACTION = 0.1
_VAL_LIMIT = 1000  # validation samples used per epoch (a cheap proxy; the simulator is the real metric)
_CALIB_SAMPLES = 256


def parse_method(method: str) -> frozenset[str]:
    """``"noise+qat"`` → {"noise", "qat"}; one-line InputError on unknown or conflicting parts."""
    parts = [p.strip() for p in str(method).lower().split("+") if p.strip()]
    unknown = [p for p in parts if p not in METHODS]
    if not parts or unknown:
        raise InputError(f"unknown fine-tuning method {unknown or method!r}; combine {', '.join(METHODS)} with '+', "
                         "e.g. 'pcm+qat'")
    chosen = frozenset(parts)
    if {"noise", "pcm"} <= chosen:
        raise InputError("methods 'noise' and 'pcm' both inject weight noise; choose one of them")
    if "none" in chosen and len(chosen) > 1:
        raise InputError(f"method 'none' cannot be combined with others (got {method!r})")
    return chosen


@register_pass("finetune")
@dataclass
class FinetunePass(CimcPass):
    """Noise-aware fine-tuning of the analog layers' weights (see the module docstring)."""

    ctx: CompileContext = field(repr=False)
    method: str = DEFAULT_METHOD
    epochs: int = 8
    lr: float = 1e-3
    batch_size: int = 64
    eta: float = 0.1  # 'noise': relative to the layer's max|W| (IBM recipe: 0.075-0.11)
    t_train: float = 31557600.0  # 'pcm': latest read time sampled (1 y), seconds
    clip_alpha: float = 2.0  # 'clip': ±alpha·std
    beta: float = 0.25  # 'adversarial': weight of the KL term
    zeta: float = 0.03  # 'adversarial': relative attack bound (0.1 wrecks a converged model: docs)
    attack_steps: int = 3  # 'adversarial': sign-gradient steps
    dropout: float = 0.3  # 'dropout': drop probability
    percentile: float = 99.99  # 'qat' and validation: converter ranges, as the quantize pass
    val_instances: int = 4
    val_time: float = 86400.0  # validation read time, seconds
    val_samples: int = _VAL_LIMIT
    select: str = "best"  # 'best' noisy-validation epoch (0 = keep the input model) or 'last'

    def __post_init__(self) -> None:
        parse_method(self.method)
        checks = [
            (self.epochs >= 0, "epochs", "an integer >= 0"),
            (self.lr > 0, "lr", "a learning rate > 0"),
            (self.batch_size >= 1, "batch-size", "an integer >= 1"),
            (self.eta >= 0, "eta", "a relative noise level >= 0"),
            (self.t_train >= 1, "t-train", "a time >= 1 s"),
            (self.clip_alpha > 0, "clip-alpha", "a multiple of the std > 0"),
            (self.beta >= 0, "beta", "a KL weight >= 0"),
            (0 < self.zeta < 1, "zeta", "a relative bound in (0, 1)"),
            (self.attack_steps >= 1, "attack-steps", "an integer >= 1"),
            (0 <= self.dropout < 1, "dropout", "a probability in [0, 1)"),
            (0 < self.percentile <= 100, "percentile", "a percentile in (0, 100]"),
            (self.val_instances >= 1, "val-instances", "an integer >= 1"),
            (self.val_time >= 0, "val-time", "a time >= 0 s"),
            (self.val_samples >= 1, "val-samples", "an integer >= 1"),
            (self.select in ("best", "last"), "select", "'best' or 'last'"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise InputError(f"finetune option '{name}' = {getattr(self, name.replace('-', '_'))!r} is invalid; "
                                 f"give {expected}")

    def requires(self, model: ir.Model) -> None:
        folded = [n.name for n in model.graph if n.op_type == "BatchNormalization"]
        if folded:
            logger.info("finetune: BatchNormalization %s not folded; it stays digital and frozen", folded)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from cimc.passes.mapping import mark_digital

        mark_digital(model, self.ctx.digital)  # layers kept digital are trained as float layers
        train = self.ctx.training
        if train is None:
            raise DataError("the 'finetune' pass needs training data: add --finetune TRAIN.npz (arrays x, y)")
        result = finetune_model(model, self.ctx.target, train, self.ctx.validation, self, seed=self.ctx.seed,
                                progress=self.ctx.progress)
        self.ctx.results["finetune"] = result
        return ir.passes.PassResult(model, self.epochs > 0 and parse_method(self.method) != {"none"})


# ------------------------------------------------------------------------------------------ helpers
def _check_data(model: ir.Model, data: Any, role: str) -> None:
    if data.y is None:
        raise DataError(f"{role} data '{data.name}' has no labels 'y'; fine-tuning needs integer class labels")
    expected = tuple(model.graph.inputs[0].shape)[1:]
    if tuple(data.x.shape[1:]) != expected:
        raise DataError(f"{role} inputs have shape {tuple(data.x.shape[1:])} per sample but the model takes "
                        f"{expected}; pass data made for this model{reshape_hint(tuple(data.x.shape[1:]), expected)}")
    from cimc.data import check_labels

    out_shape = model.graph.outputs[0].shape
    classes = out_shape[-1] if out_shape is not None and len(out_shape) and isinstance(out_shape[-1], int) else None
    check_labels(data.y, classes, f"{role} data '{data.name}'")


def _split(train: Any, val: Any, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, validation) arrays: the given validation set, else a seeded 10 % hold-out of the training set."""
    if val is not None:
        return (train.x, train.y), (val.x, val.y)
    order = np.random.default_rng(seed).permutation(len(train.y))
    n_val = max(1, round(_VAL_FRACTION * len(order)))
    if len(order) - n_val < 1:
        raise DataError(f"training data '{train.name}' has {len(order)} sample(s); give more or pass --val")
    v, t = order[:n_val], order[n_val:]
    return (train.x[t], train.y[t]), (train.x[v], train.y[v])


def _mapped_copy(model: ir.Model, target: Any) -> tuple[ir.Model, str | None]:
    """A copy of ``model`` with tiles placed (what the converters see per tile), and why it could not be
    mapped (None when it was)."""
    from cimc.passes.mapping import MapPass

    work = ir.from_proto(ir.to_proto(model))
    try:
        MapPass(ctx=CompileContext(target=target))(work)
    except CimcError as exc:
        logger.warning("finetune: model cannot be mapped on %s (%s); training with float converters",
                       getattr(target, "name", target), exc)
        return work, str(exc)
    return work, None


def finetune_model(model: ir.Model, target: Any, train: Any, val: Any, options: FinetunePass, *, seed: int = 0,
                   progress: bool = False) -> dict[str, Any]:
    """Fine-tune ``model`` in place with ``options``; returns the history (see :func:`train_executor`)."""
    import torch

    from cimc.passes.quantize import calibrate
    from cimc.runtime.analog import layer_plans
    from cimc.runtime.devices import build_device
    from cimc.runtime.executor import Executor
    from cimc.runtime.training import NoiseHook, TrainSettings, train_executor

    methods = parse_method(options.method)
    _check_data(model, train, "training")
    if val is not None:
        _check_data(model, val, "validation")
    train_xy, val_xy = _split(train, val, seed)
    val_xy = (val_xy[0][: options.val_samples], val_xy[1][: options.val_samples])
    work, unmapped = _mapped_copy(model, target)
    mapped = unmapped is None
    if "qat" in methods and not mapped:
        raise InputError(f"method 'qat' needs the model mapped on target '{target.name}', which failed ({unmapped}); "
                         "drop 'qat' or use a target the model fits")
    plans = layer_plans(work) if mapped else None
    executor = Executor(work)
    device = build_device(target.device)
    noise = "gaussian" if "noise" in methods else "pcm" if "pcm" in methods else None
    hook = NoiseHook(weight_noise=noise, eta=options.eta, device=device, t_train_s=options.t_train, plans=None,
                     dropout=options.dropout if "dropout" in methods else 0.0,
                     generator=torch.Generator().manual_seed(seed + 1),
                     output_noise=getattr(target.converters, "output_noise", 0.0))
    calib_x = train_xy[0][:_CALIB_SAMPLES]

    def recalibrate() -> None:
        """Converter ranges for the current weights (the quantize pass's own calibration)."""
        if plans is None:
            return
        executor.write_back()
        specs = calibrate(work, calib_x, target, options.percentile)
        for name, plan in plans.items():
            plan.quant = specs.get(name)
        # QAT trains through the converters; otherwise they only shape the validation proxy.
        hook.plans = plans

    settings = TrainSettings(
        epochs=0 if methods == {"none"} else options.epochs, lr=options.lr, batch_size=options.batch_size,
        clip_alpha=options.clip_alpha if "clip" in methods else None, beta=options.beta, zeta=options.zeta,
        attack_steps=options.attack_steps, adversarial="adversarial" in methods,
        val_instances=options.val_instances, val_t_s=options.val_time, seed=seed, progress=progress,
        select=options.select,
    )
    hook.quant_in_training = "qat" in methods
    result = train_executor(executor, hook, train_xy, val_xy, settings, recalibrate)
    executor.write_back()
    for name, value in model.graph.initializers.items():  # the trained weights, back into the caller's model
        if name in work.graph.initializers and work.graph.initializers[name].const_value is not None:
            trained = work.graph.initializers[name].const_value
            value.const_value = ir.tensor(trained.numpy(), name=name)
    record = {"method": "+".join(sorted(methods)), "options": options.options(), "seed": seed,
              "best_epoch": result["best_epoch"], "best_val_noisy": result["best_val_noisy"],
              "train_time_s": round(result["train_time_s"], 2), "validation": f"{options.val_instances} PCM instances "
              f"at {options.val_time:g} s, {len(val_xy[1])} samples", "history": result["history"]}
    # The model records what was done, not how long it took: same inputs and seed, same bytes.
    stored = {k: v for k, v in record.items() if k != "train_time_s"}
    stored["history"] = [{k: v for k, v in entry.items() if k != "time_s"} for entry in record["history"]]
    model.metadata_props["cimc.finetune"] = json.dumps(stored)
    return record



# ------------------------------------------------------------------------------------------ API
def _option_names() -> list[str]:
    return [f.name for f in fields(FinetunePass) if f.name != "ctx"]


def finetune(
    model: str | os.PathLike[str] | ir.Model,
    target: Any = "aon-cim",
    train: Any = None,
    val: Any = None,
    *,
    method: str = DEFAULT_METHOD,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = False,
    dac_bits: int | None = None,
    adc_bits: int | None = None,
    input_shapes: dict[str, Any] | None = None,
    input_values: dict[str, Any] | None = None,
    arrays: int | None = None,
    **options: Any,
) -> tuple[ir.Model, dict[str, Any]]:
    """Fine-tune a model for a target; returns ``(fine-tuned onnx-ir model, history)``.

    ``model``: an ONNX path (imported and canonicalised: BatchNorm folded) or an onnx-ir model (copied, not
    changed). ``train``/``val``: :class:`cimc.data.Dataset` s or ``.npz`` paths / builtin names.
    ``options``: any :class:`FinetunePass` option (``lr``, ``eta``, ``zeta``, ``beta``, ...).
    ``dac_bits``/``adc_bits`` override the target's converters (what QAT and validation use); ``arrays``
    its array/core count (a model too large for the preset).
    """
    from cimc.data import load_dataset
    from cimc.frontend import load_model
    from cimc.passes.canonicalize import canonicalize
    from cimc.targets import resolve_target

    if train is None:
        raise DataError("fine-tuning needs training data: pass train= a .npz path or a Dataset (arrays x, y)")
    unknown = sorted(set(options) - set(_option_names()))
    if unknown:
        raise InputError(f"finetune has no option(s) {unknown}; options: {', '.join(_option_names())}")
    if isinstance(model, ir.Model):
        work = ir.from_proto(ir.to_proto(model))
    else:
        work = canonicalize(load_model(model, input_shapes=input_shapes, input_values=input_values))
    ds_train = load_dataset(train) if isinstance(train, (str, os.PathLike)) else train
    ds_val = load_dataset(val) if isinstance(val, (str, os.PathLike)) else val
    t = resolve_target(target, dac_bits, adc_bits, arrays)
    ctx = CompileContext(target=t, training=ds_train, validation=ds_val, seed=seed, progress=progress)
    if epochs is not None:
        options["epochs"] = epochs
    FinetunePass(ctx=ctx, method=method, **options)(work)
    return work, ctx.results["finetune"]


def save_finetuned(model: ir.Model, path: str | os.PathLike[str], inputs: Any = (), *, force: bool = False) -> Path:
    """Write the fine-tuned model as a plain ONNX file, atomically (temporary file, then rename).

    ``path`` must end in ``.onnx`` and may not be one of ``inputs`` (the source model, the data); an existing file
    cimc did not write is replaced only with ``force`` (:func:`cimc.outputs.check_output_file`).
    """
    from cimc.frontend import save_model

    from cimc.outputs import check_output_file

    out = check_output_file(path, ".onnx", inputs, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    return out
