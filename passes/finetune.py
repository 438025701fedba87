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
  7. ``distill``: label-free; the float model is the teacher and the loss is the distance of the chip-in-the-loop
     outputs to its outputs, on every output (:class:`cimc.runtime.training.DistillSpec`; ``output_kinds``).
     Data without labels imply it (and ``distill+pcm+qat`` is the default then).
  8. ``ce``: with ``distill``, add ``ce_weight`` x the cross-entropy on the labels. Without ``distill`` the loss
     is the cross-entropy alone (labels needed).
  ``none`` trains nothing (the validation still runs and is reported).

Epoch selection: after every epoch (and before the first) the model is validated on ``val_instances``
PCM instances read at ``val_time`` (default 24 h) with the target's converters calibrated, through the same
executor hook; the best epoch's weights are kept. The score is the accuracy when the validation data have
labels, else the agreement with the float model (``metric``). Validation data: ``ctx.validation``, else a
seeded 10 % split of the training data.

Keep the better (``keep=better``): the chosen epoch is then compared with the input model on
``verify_instances`` fresh PCM instances (not those that chose the epoch) at ``verify_times``; a fine-tuned
model that scores lower is not returned: the input model's weights are, and the record says so
(``kept: input``).

Precondition: BatchNormalization folded (run ``canonicalize`` first; ``cimc.load`` does). Result: the
model's weights and biases are replaced in place, ``metadata_props["cimc.finetune"]`` records the method,
options and validation history.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from cimc.data import reshape_hint
from cimc.errors import CimcError, DataError, InputError
from cimc.passes.finetune_methods import DEFAULT_METHOD, LABEL_FREE_METHOD, METHODS
from cimc.pipeline import CimcPass, CompileContext, register_pass
from cimc.vocabulary import parse_duration

__all__ = ["DEFAULT_METHOD", "LABEL_FREE_METHOD", "METHODS", "FinetunePass", "finetune", "output_kinds",
           "parse_method", "save_finetuned"]

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
    ce_weight: float = 0.5  # 'distill+ce': weight of the cross-entropy on the labels (distillation weighs 1)
    temperature: float = 1.0  # 'distill': softmax temperature on logits outputs
    output_kinds: str = "auto"  # 'distill': per output, '/'-separated: logits, probs, logprobs, sigmoid, regression
    metric: str = "auto"  # noisy validation score: accuracy (labels), agreement (with the float model) or auto
    keep: str = "better"  # 'better': the input model unless the fine-tuned one verifies better; 'tuned': always
    verify_instances: int = 8  # 'keep=better': fresh PCM instances of the final comparison
    verify_times: str = ""  # 'keep=better': read times, '/'- or ','-separated (e.g. 24h/1y); empty = val-time

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
            (self.ce_weight >= 0, "ce-weight", "a weight >= 0"),
            (self.temperature > 0, "temperature", "a temperature > 0"),
            (self.metric in ("auto", "accuracy", "agreement"), "metric", "auto, accuracy or agreement"),
            (self.keep in ("better", "tuned"), "keep", "'better' or 'tuned'"),
            (self.verify_instances >= 1, "verify-instances", "an integer >= 1"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise InputError(f"finetune option '{name}' = {getattr(self, name.replace('-', '_'))!r} is invalid; "
                                 f"give {expected}")
        _kinds_option(self.output_kinds)
        self.verify_times_s()

    def verify_times_s(self) -> list[float]:
        """The read times (s) of the keep-the-better comparison: ``verify_times``, else ``val_time``."""
        parts = [t for t in self.verify_times.replace("/", ",").split(",") if t.strip()]
        return [parse_duration(t) for t in parts] if parts else [max(self.val_time, 1.0)]

    def requires(self, model: ir.Model) -> None:
        folded = [n.name for n in model.graph if n.op_type == "BatchNormalization"]
        if folded:
            logger.info("finetune: BatchNormalization %s not folded; it stays digital and frozen", folded)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from cimc.passes.mapping import mark_digital

        mark_digital(model, self.ctx.digital)  # layers kept digital are trained as float layers
        train = self.ctx.training
        if train is None:
            raise DataError("the 'finetune' pass needs training data: add --finetune TRAIN.npz (arrays x, and y "
                            "if labelled)")
        result = finetune_model(model, self.ctx.target, train, self.ctx.validation, self, seed=self.ctx.seed,
                                progress=self.ctx.progress)
        self.ctx.results["finetune"] = result
        return ir.passes.PassResult(model, self.epochs > 0 and parse_method(self.method) != {"none"})


# ------------------------------------------------------------------------------------------ helpers
_KIND_NAMES = ("logits", "probs", "logprobs", "sigmoid", "regression")  # runtime.training.OUTPUT_KINDS, torch-free
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}


def _kinds_option(text: str) -> list[str] | None:
    """``output_kinds``: None for ``auto``, else the list of kinds (one per model output)."""
    if text.strip().lower() in ("", "auto"):
        return None
    kinds = [k.strip().lower() for k in text.replace(",", "/").split("/")]
    bad = [k for k in kinds if k not in _KIND_NAMES]
    if bad:
        raise InputError(f"finetune option 'output-kinds' has unknown kind(s) {bad}; give one of "
                         f"{', '.join(_KIND_NAMES)} per model output, '/'-separated, or 'auto'")
    return kinds


def output_kinds(model: ir.Model, labelled: bool, given: str = "auto") -> list[str]:
    """The distillation distance of each model output (see :class:`cimc.runtime.training.DistillSpec`).

    ``auto``: an output made by Softmax is ``probs``, by LogSoftmax ``logprobs``, by Sigmoid ``sigmoid`` (looking
    through reshapes); the first output of a model with class labels is ``logits``; anything else
    ``regression`` (an embedding, a score, a state: matched in squared error relative to its variance).
    """
    outputs = list(model.graph.outputs)
    chosen = _kinds_option(given)
    if chosen is not None:
        if len(chosen) != len(outputs):
            raise InputError(f"finetune option 'output-kinds' names {len(chosen)} kind(s) but the model has "
                             f"{len(outputs)} output(s) ({', '.join(o.name for o in outputs)}); give one per output")
        return chosen
    kinds = []
    for index, value in enumerate(outputs):
        node = value.producer()
        while node is not None and node.op_type in _PASS_THROUGH and node.inputs and node.inputs[0] is not None:
            node = node.inputs[0].producer()
        op = node.op_type if node is not None else ""
        kind = {"Softmax": "probs", "LogSoftmax": "logprobs", "Sigmoid": "sigmoid"}.get(op)
        kinds.append(kind or ("logits" if labelled and index == 0 else "regression"))
    return kinds


def _static_dims(shape: Any) -> tuple[Any, ...] | None:
    return None if shape is None else tuple(d if isinstance(d, int) else None for d in tuple(shape)[1:])


def _model_inputs(model: ir.Model, data: Any, role: str) -> list[np.ndarray]:
    """The data's arrays in the order of the model's inputs: a dataset with named ``inputs`` (a mapping, one array
    per input name) or a single ``x`` for a single-input model. One-line DataError on a mismatch."""
    names = [v.name for v in model.graph.inputs]
    named = getattr(data, "inputs", None)
    if isinstance(named, Mapping) and named and len(names) == 1 and names[0] not in named and "x" in named:
        named = {names[0]: named["x"]}  # 'x' stands for the one input of a one-input model
    if isinstance(named, Mapping) and named:
        missing = [n for n in names if n not in named]
        if missing:
            raise DataError(f"{role} data '{data.name}' has no array for model input(s) {missing} (it has "
                            f"{sorted(named)}); give one array per input name")
        arrays = [np.asarray(named[n], dtype=np.float32) for n in names]
    elif len(names) == 1:
        arrays = [data.x]
    else:
        raise DataError(f"{role} data '{data.name}' has one array 'x' but the model takes {len(names)} inputs "
                        f"({', '.join(names)}); store one array per input name")
    for name, value, array in zip(names, model.graph.inputs, arrays):
        expected = _static_dims(value.shape)
        got = tuple(array.shape[1:])
        if expected is not None and (len(expected) != len(got) or any(e not in (None, g) for e, g in zip(expected, got))):
            shown = tuple("?" if e is None else e for e in expected)
            hint = reshape_hint(got, expected) if None not in expected else ""
            raise DataError(f"{role} inputs for '{name}' have shape {got} per sample but the model takes {shown}; "
                            f"pass data made for this model{hint}")
    if len({a.shape[0] for a in arrays}) != 1:
        raise DataError(f"{role} data '{data.name}' has different sample counts per input "
                        f"({[a.shape[0] for a in arrays]}); give the same number of samples for every input")
    return arrays


def _labels(model: ir.Model, data: Any, role: str) -> np.ndarray | None:
    """The data's class labels for the first output (None when unlabelled), checked against its class count."""
    y = getattr(data, "y", None)
    if y is None:
        return None
    from cimc.data import check_labels

    out_shape = model.graph.outputs[0].shape
    classes = out_shape[-1] if out_shape is not None and len(out_shape) and isinstance(out_shape[-1], int) else None
    return check_labels(y, classes, f"{role} data '{data.name}'")


def _train_val(model: ir.Model, train: Any, val: Any, seed: int) -> tuple[Any, Any]:
    """(training, validation) :class:`TrainData`: the given validation set, else a seeded 10 % hold-out."""
    from cimc.runtime.training import TrainData

    data = TrainData(_model_inputs(model, train, "training"), _labels(model, train, "training"))
    if val is not None:
        return data, TrainData(_model_inputs(model, val, "validation"), _labels(model, val, "validation"))
    order = np.random.default_rng(seed).permutation(len(data))
    n_val = max(1, round(_VAL_FRACTION * len(order)))
    if len(order) - n_val < 1:
        raise DataError(f"training data '{train.name}' has {len(order)} sample(s); give more or pass --val")
    return data.take(order[n_val:]), data.take(order[:n_val])


def _calibration_data(model: ir.Model, inputs: list[np.ndarray]) -> Any:
    """What the quantize pass's calibration takes for these inputs: the array of a one-input model; for several
    inputs the data bound by name (:func:`cimc.data.bind`, where this version has it), else None."""
    if len(inputs) == 1:
        return inputs[0]
    import cimc.data

    bind = getattr(cimc.data, "bind", None)
    if bind is None:
        return None
    return bind({v.name: x for v, x in zip(model.graph.inputs, inputs)}, model)


def _resolve_methods(options: FinetunePass, labelled: bool) -> frozenset[str]:
    """The method set for these data: unlabelled data imply ``distill`` (and cannot take ``ce``)."""
    methods = parse_method(options.method)
    if labelled or methods == {"none"}:
        return methods
    if "ce" in methods:
        raise DataError("method 'ce' needs labels 'y' in the training and validation data; drop 'ce' to distil "
                        "from the float model alone")
    if "distill" not in methods:
        logger.info("finetune: the data have no labels; distilling from the float model (method %s)",
                    "+".join(sorted(methods | {"distill"})))
    return methods | {"distill"}


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
    """Fine-tune ``model`` in place with ``options``; returns the record (history, chosen epoch, what was kept)."""
    import torch

    from cimc.passes.quantize import calibrate
    from cimc.runtime.analog import layer_plans
    from cimc.runtime.devices import build_device
    from cimc.runtime.executor import Executor
    from cimc.runtime.training import (
        DistillSpec,
        NoiseHook,
        TrainSettings,
        compare_on_chip,
        model_outputs,
        train_executor,
    )

    train_data, val_data = _train_val(model, train, val, seed)
    methods = _resolve_methods(options, train_data.labels is not None)
    val_data = val_data.take(slice(0, options.val_samples))
    metric = options.metric if options.metric != "auto" else "accuracy" if val_data.labels is not None else "agreement"
    if metric == "accuracy" and val_data.labels is None:
        raise DataError("metric 'accuracy' needs labels 'y' in the validation data; use metric=agreement")
    if "distill" not in methods and methods != {"none"} and train_data.labels is None:
        raise DataError(f"training data '{train.name}' has no labels 'y'")  # unreachable: unlabelled implies distill
    work, unmapped = _mapped_copy(model, target)
    mapped = unmapped is None
    if "qat" in methods and not mapped:
        raise InputError(f"method 'qat' needs the model mapped on target '{target.name}', which failed ({unmapped}); "
                         "drop 'qat' or use a target the model fits")
    plans = layer_plans(work) if mapped else None
    executor = Executor(work)
    kinds = output_kinds(work, train_data.labels is not None, options.output_kinds)
    # The teacher: the float model itself, run once on every training and validation input before training.
    train_data.teacher = model_outputs(executor, train_data.inputs)
    train_data.teacher = [t[0] for t in train_data.teacher]
    val_data.teacher = [t[0] for t in model_outputs(executor, val_data.inputs)]
    variances = tuple(float(np.var(t)) if k == "regression" else 1.0 for t, k in zip(train_data.teacher, kinds))
    distill = "distill" in methods
    spec = DistillSpec(tuple(kinds), variances, distill_weight=1.0 if distill else 0.0,
                       ce_weight=(options.ce_weight if "ce" in methods else 0.0) if distill else 1.0,
                       temperature=options.temperature)
    device = build_device(target.device)
    noise = "gaussian" if "noise" in methods else "pcm" if "pcm" in methods else None
    hook = NoiseHook(weight_noise=noise, eta=options.eta, device=device, t_train_s=options.t_train, plans=None,
                     dropout=options.dropout if "dropout" in methods else 0.0,
                     generator=torch.Generator().manual_seed(seed + 1),
                     output_noise=getattr(target.converters, "output_noise", 0.0))
    calib_x = _calibration_data(work, [x[:_CALIB_SAMPLES] for x in train_data.inputs])
    if calib_x is None:
        if "qat" in methods:
            raise InputError(f"method 'qat' on a model with {len(train_data.inputs)} inputs needs the calibration of "
                             "named inputs, which this version lacks; drop 'qat' (e.g. method distill+pcm)")
        plans = None  # the noisy validation then runs with float converters

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
        select=options.select, metric=metric,
    )
    hook.quant_in_training = "qat" in methods
    start = {k: v.detach().clone() for k, v in executor.params.items()}
    result = train_executor(executor, hook, train_data, val_data, settings, spec, recalibrate)
    kept, verification = "fine-tuned" if result["best_epoch"] > 0 else "input", None
    if result["best_epoch"] > 0 and options.keep == "better":
        tuned = {k: v.detach().clone() for k, v in executor.params.items()}
        times = options.verify_times_s()
        verification = compare_on_chip(executor, hook, {"input": start, "fine-tuned": tuned}, val_data, spec,
                                       metric=metric, instances=options.verify_instances, times_s=times,
                                       seed=seed + 11, recalibrate=recalibrate)
        if verification["fine-tuned"]["score"] < verification["input"]["score"]:
            kept = "input"
            logger.warning("fine-tuning made the model worse on %d fresh noisy chips at %s (%s %.2f %% -> %.2f %%); "
                           "keeping the input model's weights", options.verify_instances,
                           ", ".join(f"{t:g} s" for t in times), metric, 100 * verification["input"]["score"],
                           100 * verification["fine-tuned"]["score"])
            with torch.no_grad():
                for k, v in start.items():
                    executor.params[k].copy_(v)
        else:
            with torch.no_grad():
                for k, v in tuned.items():
                    executor.params[k].copy_(v)
    elif result["best_epoch"] == 0 and settings.epochs > 0:
        logger.warning("fine-tuning: no epoch beat the input model on the noisy validation (%s); keeping the input "
                       "model's weights", metric)
    executor.write_back()
    for name, value in model.graph.initializers.items():  # the kept weights, back into the caller's model
        if name in work.graph.initializers and work.graph.initializers[name].const_value is not None:
            trained = work.graph.initializers[name].const_value
            value.const_value = ir.tensor(trained.numpy(), name=name)
    record = {"method": "+".join(sorted(methods)), "options": options.options(), "seed": seed, "metric": metric,
              "output_kinds": kinds, "best_epoch": result["best_epoch"], "best_val_noisy": result["best_val_noisy"],
              "kept": kept, "verification": _verification_record(verification, options),
              "train_time_s": round(result["train_time_s"], 2), "validation": f"{options.val_instances} PCM instances "
              f"at {options.val_time:g} s, {len(val_data)} samples", "history": result["history"]}
    # The model records what was done, not how long it took: same inputs and seed, same bytes.
    stored = {k: v for k, v in record.items() if k != "train_time_s"}
    stored["history"] = [{k: v for k, v in entry.items() if k != "time_s"} for entry in record["history"]]
    model.metadata_props["cimc.finetune"] = json.dumps(stored)
    return record


def _verification_record(verification: dict[str, Any] | None, options: FinetunePass) -> dict[str, Any] | None:
    """What the keep-the-better comparison measured, for the record (None when it did not run)."""
    if verification is None:
        return None
    return {"instances": options.verify_instances, "times_s": options.verify_times_s(),
            **{name: {"score": round(r["score"], 6), "per_time": {t: [round(m, 6), round(sd, 6)]
                                                                  for t, (m, sd) in r["per_time"].items()}}
               for name, r in verification.items()}}


# ------------------------------------------------------------------------------------------ API
def _option_names() -> list[str]:
    return [f.name for f in fields(FinetunePass) if f.name != "ctx"]


def finetune(
    model: str | os.PathLike[str] | ir.Model,
    target: Any = "aon-cim",
    train: Any = None,
    val: Any = None,
    *,
    method: str | None = None,
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
    changed). ``train``/``val``: :class:`cimc.data.Dataset` s or ``.npz`` paths / builtin names; without labels
    the float model is the teacher (``method`` default: ``pcm+qat``, plus ``distill`` for unlabelled data).
    ``options``: any :class:`FinetunePass` option (``lr``, ``eta``, ``zeta``, ``beta``, ...).
    ``dac_bits``/``adc_bits`` override the target's converters (what QAT and validation use); ``arrays``
    its array/core count (a model too large for the preset).
    """
    from cimc.data import load_dataset
    from cimc.frontend import load_model
    from cimc.passes.canonicalize import canonicalize
    from cimc.targets import resolve_target

    if train is None:
        raise DataError("fine-tuning needs training data: pass train= a .npz path or a Dataset (array x; y optional)")
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
    FinetunePass(ctx=ctx, method=method or DEFAULT_METHOD, **options)(work)
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
