"""Noise-aware training of an :class:`~cimc.runtime.executor.Executor`: the hook, the attack, the loop.

The executor's analog hook is where the chip's non-idealities enter training, with the same code the
simulator uses:

* weight noise on each layer's crossbar matrix ``[G, K, N]``: additive Gaussian ``eta * max|W|`` (the
  IBM recipe's proxy) or one fresh instance of the target's PCM model (programming + drift + read noise,
  :meth:`DeviceModel.program_weights`) read at a time drawn log-uniformly in [1 s, ``t_train_s``], with the
  simulator's drift compensation (fixed probe, factor applied after the ADC); the noise is detached, so the
  gradient is straight-through;
* DAC/ADC quantisation per tile (:func:`cimc.runtime.analog.analog_mvm`) with straight-through rounding,
  at ranges calibrated on training data (recalibrated at the start of every epoch, as compile will);
* dropout on every analog layer's input (the baseline of Büchel et al.).

The adversarial regulariser (Büchel, Faber, Muir, ICLR 2022) attacks the analog weights inside a relative
box ``|theta* - theta| <= zeta |theta|`` with sign-gradient steps on KL(f(theta) || f(theta*)), then adds
``beta * KL`` to the loss with the gradient flowing through ``theta* = theta + |theta| * delta``.

Distillation (label-free): the float model is the teacher. Its outputs on the training inputs are computed once;
the loss is the distance of the chip-in-the-loop outputs to them, on every output, with a distance per output
kind (:class:`DistillSpec`): KL for softmax / log-softmax / logits outputs of a classifier, binary KL for sigmoid
outputs, mean squared error divided by the teacher's output variance for everything else (embeddings,
regressors). Labels, when present, may add a cross-entropy term.

All randomness comes from explicit ``torch.Generator`` s: same seed, same weights (for a fixed thread count).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from cimc.console import progress_bar
from cimc.runtime.analog import LayerPlan, analog_conv, analog_mvm, conv_weights, dac, probe_response
from cimc.runtime.devices import gdc_factor
from cimc.runtime.executor import AnalogStep, Executor

__all__ = [
    "OUTPUT_KINDS",
    "DistillSpec",
    "NoiseHook",
    "TrainData",
    "TrainSettings",
    "adversarial_kl",
    "attack_parameters",
    "chip_scores",
    "clip_weights",
    "compare_on_chip",
    "distill_loss",
    "model_outputs",
    "noisy_accuracy",
    "output_distance",
    "relative_noise_accuracy",
    "train_executor",
]

logger = logging.getLogger(__name__)

_ATTACK_INIT_REL = 1e-3  # epsilon of the attack's random start (Büchel et al.)
_T_MIN_S = 1.0  # earliest read time sampled for PCM noise in training


# ------------------------------------------------------------------------------------------ the hook
class NoiseHook:
    """The executor hook of training and of the cheap noisy validation.

    ``weight_noise``: None, ``"gaussian"`` or ``"pcm"``; ``plans``: quantisation plans per layer (None = float
    converters). ``instances`` > 1 (validation only) expects the batch to be instance-major, as the simulator's.
    """

    def __init__(self, *, weight_noise: str | None = None, eta: float = 0.0, device: Any = None,
                 t_train_s: float = 86400.0, plans: dict[str, LayerPlan] | None = None, dropout: float = 0.0,
                 generator: torch.Generator | None = None, output_noise: float = 0.0):
        self.weight_noise = weight_noise
        # The target's converters.output_noise: with PCM weight noise, each column sum gets the simulator's
        # per-conversion analog noise too (std = output_noise x x_max x the weight mapped to g_max).
        self.output_noise = float(output_noise)
        self.eta = eta
        self.device = device
        self.t_train_s = t_train_s
        self.plans = plans
        self.dropout = dropout
        self.quant_in_training = True  # False: converters only in validation (methods without 'qat')
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.training = False
        self.noise_on = True
        self.instances = 1
        self._t_s = t_train_s
        self._frozen: dict[str, Any] | None = None  # validation: one device draw per crossbar block, reused
        self._frozen_gdc: dict[str, torch.Tensor | None] = {}  # validation: GDC factor per use
        self._draws: dict[str, Any] = {}  # training: this forward pass's noise per crossbar block
        self._val_t_s = 86400.0
        self._val_gen: torch.Generator | None = None
        self._executor: Executor | None = None

    # -- state switches ------------------------------------------------------------------------------
    def new_batch(self) -> None:
        """Draw this batch's PCM read time (log-uniform in [1 s, t_train_s])."""
        if self.weight_noise == "pcm":
            u = float(torch.rand((), generator=self.generator))
            lo, hi = math.log(_T_MIN_S), math.log(max(self.t_train_s, _T_MIN_S))
            self._t_s = math.exp(lo + u * (hi - lo))

    @contextlib.contextmanager
    def clean(self) -> Iterator[None]:
        """Weight noise off (quantisation and dropout stay): for the adversarial term."""
        old, self.noise_on = self.noise_on, False
        try:
            yield
        finally:
            self.noise_on = old

    @contextlib.contextmanager
    def validation(self, instances: int, t_s: float, seed: int) -> Iterator[None]:
        """PCM instances read at ``t_s`` (drawn once per layer from ``seed``), instance-major batches."""
        saved = (self.training, self.instances, self._frozen, self._val_t_s, self._val_gen)
        self.training, self.instances, self._frozen, self._val_t_s = False, instances, {}, t_s
        self._frozen_gdc = {}
        self._val_gen = torch.Generator().manual_seed(seed)
        try:
            yield
        finally:
            self.training, self.instances, self._frozen, self._val_t_s, self._val_gen = saved

    # -- the weights a layer computes with -------------------------------------------------------------
    def _pcm_reads(self, matrix: torch.Tensor, t_s: float, instances: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``instances`` programmed copies of ``matrix`` read at ``t_s``: (the devices' error ``w_t - w``,
        detached, to add to the weights; the read at 0 s, None without GDC; the read at ``t_s``).

        Drift compensation (:meth:`_gdc`) is what the simulator does: the use's fixed probe read at 0 s and at
        ``t_s``, the ratio applied digitally *after* the ADC (so training sees the ADC range the drift loses).
        """
        w_ref = matrix.detach()
        programmed = self.device.program_weights(w_ref, instances, generator)
        w_t = programmed.read(t_s, generator).to(matrix.dtype)  # [I, G, K, N]
        error = w_t - w_ref
        if getattr(self.device, "gdc_mode", "none") == "none":
            return error, None, w_t
        return error, programmed.read(0.0, generator).to(matrix.dtype), w_t

    def _gdc(self, step: AnalogStep, w_0: torch.Tensor | None, w_t: torch.Tensor) -> torch.Tensor | None:
        """The use's drift-compensation factor from the reads at 0 s and t (its probe through its DAC)."""
        mode = getattr(self.device, "gdc_mode", "none")
        if mode == "none" or w_0 is None:
            return None
        plan = self.plans.get(step.name) if self.plans is not None else None
        if plan is None:
            ref, cur = w_0, w_t
        else:
            ref, cur = probe_response(plan, w_0), probe_response(plan, w_t)
        return gdc_factor(ref, cur, per_column=(mode == "column")).detach()

    def _weights(self, step: AnalogStep, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([I or 1, G, K, N] weights, GDC factor broadcasting over [I, M, G, N] or None)."""
        if self._frozen is not None:
            # One draw per crossbar block: the uses of a shared weight read the same devices (as in simulation);
            # drift compensation is per use.
            layer = step.layer or step.name
            if layer not in self._frozen:
                assert self._val_gen is not None and self.device is not None
                with torch.no_grad():
                    error, w_0, w_t = self._pcm_reads(matrix.detach(), self._val_t_s, self.instances, self._val_gen)
                    self._frozen[layer] = (matrix.detach().unsqueeze(0) + error, w_0, w_t)
            if step.name not in self._frozen_gdc:
                _, w_0, w_t = self._frozen[layer]
                with torch.no_grad():
                    self._frozen_gdc[step.name] = self._gdc(step, w_0, w_t)
            return self._frozen[layer][0], self._frozen_gdc[step.name]
        if not (self.training and self.noise_on) or self.weight_noise is None:
            return matrix.unsqueeze(0), None
        # One draw per crossbar block and forward pass: the uses of a shared weight see the same noise, as
        # they would read the same devices. The first analog step of the pass starts a new draw.
        if step.index == 0:
            self._draws = {}
        layer = step.layer or step.name
        if self.weight_noise == "gaussian":
            if layer not in self._draws:
                w_max = matrix.detach().abs().amax()
                self._draws[layer] = torch.randn(matrix.shape, generator=self.generator) * (self.eta * w_max)
            return (matrix + self._draws[layer]).unsqueeze(0), None
        if layer not in self._draws:
            self._draws[layer] = self._pcm_reads(matrix, self._t_s, 1, self.generator)
        error, w_0, w_t = self._draws[layer]
        return matrix.unsqueeze(0) + error, self._gdc(step, w_0, w_t)

    # -- the executor's three hooks ----------------------------------------------------------------------
    def attach(self, executor: Executor) -> None:
        """Route ``executor``'s analog layers through this hook (input, direct-convolution and MVM paths)."""
        self._executor = executor
        executor.hook, executor.input_hook, executor.direct_hook = self, self.layer_input, self.direct

    def _out_noise(self, matrix: torch.Tensor, plan: LayerPlan | None) -> torch.Tensor | None:
        """Std [G, N] of the per-conversion output noise for this layer now, or None (off, or no DAC range)."""
        if self.output_noise <= 0 or plan is None or plan.quant is None or plan.quant.dac_bits is None:
            return None
        # Validation always reads PCM devices (it stands in for the chip); training has the periphery's noise
        # only with the PCM model (the Gaussian proxy stands alone).
        if self._frozen is None and (self.weight_noise != "pcm" or not (self.training and self.noise_on)):
            return None
        w = matrix.detach().abs()
        per_column = bool(getattr(self.device, "per_column_default", False))
        w_max = w.amax(dim=-2) if per_column else w.amax().expand(w.shape[0], w.shape[-1])
        return self.output_noise * plan.quant.x_max * w_max

    def _noise_generator(self) -> torch.Generator:
        return self._val_gen if self._frozen is not None and self._val_gen is not None else self.generator

    def _plan(self, step: AnalogStep) -> LayerPlan | None:
        quantise = self.plans is not None and (self.quant_in_training or not self.training)
        return self.plans.get(step.name) if quantise and self.plans is not None else None

    def layer_input(self, step: AnalogStep, x: torch.Tensor) -> torch.Tensor:
        """Dropout (training), then the DAC: on the layer's input before it is unrolled, as the simulator."""
        if self.training and self.dropout > 0:
            keep = (torch.rand(x.shape, generator=self.generator) >= self.dropout).to(x.dtype)
            x = x * keep / (1.0 - self.dropout)
        plan = self._plan(step)
        return dac(plan, x, ste=True) if plan is not None else x

    def direct(self, step: AnalogStep, x: torch.Tensor) -> torch.Tensor | None:
        """Convolutions with each group in one tile: one grouped convolution over the instances."""
        plan = self._plan(step)
        if step.op_type != "Conv" or (plan is not None and not plan.whole_groups) or self._executor is None:
            return None
        weight = self._executor.weight(step)
        w, gdc = self._weights(step, step.matrix(weight))
        return analog_conv(plan, x, conv_weights(w, tuple(weight.shape[1:])), w.shape[0], w.shape[1], step.attrs,
                           gdc, ste=True, out_noise=self._out_noise(step.matrix(weight), plan),
                           generator=self._noise_generator())

    def __call__(self, step: AnalogStep, cols: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        b, m, g, k = cols.shape  # inputs already through dropout and the DAC (layer_input)
        w, gdc = self._weights(step, matrix)
        c = cols.reshape(self.instances, (b // self.instances) * m, g, k)
        plan = self._plan(step)
        if plan is not None:
            y = analog_mvm(plan, c, w, ste=True, out_noise=self._out_noise(matrix, plan),
                           generator=self._noise_generator())
        else:
            y = torch.einsum("imgk,igkn->imgn", c, w)
        if gdc is not None:
            y = y * gdc
        return y.reshape(b, m, g, -1)


# ------------------------------------------------------------------------------------------ adversarial
def _param_path(key: str) -> str:
    return f"params.{key}"


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities, mean over the batch."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def _args(x: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The executor's positional inputs: one tensor (a single-input model) or one per model input."""
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def attack_parameters(
    executor: Executor,
    keys: list[str],
    x: torch.Tensor | Sequence[torch.Tensor],
    p_log: torch.Tensor,
    zeta: float,
    steps: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Relative perturbations ``delta`` (|delta| <= zeta elementwise) that increase KL(p || f(theta + |theta| delta)).

    Starts at ``epsilon * N(0, 1)``, then ``steps`` sign-gradient steps of ``zeta / steps``, each projected
    back into the box. ``p_log`` (detached log-softmax of the unperturbed model's first output) is the reference.
    """
    theta = {k: executor.params[k].detach() for k in keys}
    delta = {k: (_ATTACK_INIT_REL * torch.randn(v.shape, generator=generator)).clamp(-zeta, zeta)
             for k, v in theta.items()}
    p_ref = p_log.detach()
    for _ in range(steps):
        for d in delta.values():
            d.requires_grad_(True)
        perturbed = {_param_path(k): theta[k] + theta[k].abs() * delta[k] for k in keys}
        q_log = F.log_softmax(functional_call(executor, perturbed, _args(x))[0], dim=-1)
        grads = torch.autograd.grad(_kl(p_ref, q_log), [delta[k] for k in keys])
        delta = {k: (delta[k].detach() + (zeta / steps) * g.sign()).clamp(-zeta, zeta) for k, g in zip(keys, grads)}
    return delta


def adversarial_kl(executor: Executor, keys: list[str], x: torch.Tensor | Sequence[torch.Tensor],
                   p_log: torch.Tensor, delta: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(f(theta) || f(theta*)) with theta* = theta + |theta| delta: gradient flows through theta and theta*."""
    perturbed = {_param_path(k): executor.params[k] + executor.params[k].abs() * delta[k].detach() for k in keys}
    q_log = F.log_softmax(functional_call(executor, perturbed, _args(x))[0], dim=-1)
    return _kl(p_log, q_log)


def clip_weights(executor: Executor, keys: list[str], alpha: float) -> None:
    """Clip each layer's weights to ±alpha·std of that layer (in place)."""
    with torch.no_grad():
        for k in keys:
            w = executor.params[k]
            bound = alpha * float(w.std())
            if bound > 0:
                w.clamp_(-bound, bound)


# ------------------------------------------------------------------------------------------ data and losses
OUTPUT_KINDS = ("logits", "probs", "logprobs", "sigmoid", "regression")
_CLASSIFIER_KINDS = ("logits", "probs", "logprobs")
_EPS = 1e-7  # floor of probabilities before a log (float32)


@dataclass
class TrainData:
    """Samples for training or validation: one array per model input (first axis = samples), integer class
    labels of the first output (or None) and the teacher's (the float model's) outputs on them, one array per
    model output (or None: no distillation)."""

    inputs: list[np.ndarray]
    labels: np.ndarray | None = None
    teacher: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def take(self, index: np.ndarray | slice) -> TrainData:
        """The samples at ``index`` (every input, the labels and the teacher's outputs alike)."""
        return TrainData([x[index] for x in self.inputs], None if self.labels is None else self.labels[index],
                         None if self.teacher is None else [t[index] for t in self.teacher])


@dataclass(frozen=True)
class DistillSpec:
    """What the loss compares, per model output.

    ``kinds``: one of :data:`OUTPUT_KINDS` per output — ``logits`` (a classifier's scores: KL between the
    softmaxes at ``temperature``, times T²), ``probs`` / ``logprobs`` (a softmax output: KL to the teacher's
    distribution), ``sigmoid`` (independent probabilities: binary KL per element), ``regression`` (an embedding
    or any other value: squared error divided by the teacher's variance ``variances[i]``, so 1 = no better than
    predicting the teacher's mean). ``distill_weight`` weighs the mean over outputs of these distances,
    ``ce_weight`` the cross-entropy of the first output on the labels (0: not used).
    """

    kinds: tuple[str, ...]
    variances: tuple[float, ...]
    distill_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0


def _flat_classes(y: torch.Tensor) -> torch.Tensor:
    """[N, ..., C] -> [N·..., C]: the class axis last, every other position a separate prediction."""
    return y.reshape(-1, y.shape[-1]) if y.dim() > 1 else y.reshape(-1, 1)


def _log_probs(y: torch.Tensor, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities over the last axis of an output of a classifier kind."""
    y = _flat_classes(y)
    if kind == "logits":
        return F.log_softmax(y / temperature, dim=-1)
    if kind == "logprobs":
        return y
    return y.clamp_min(_EPS).log()


def output_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str, variance: float = 1.0,
                    temperature: float = 1.0) -> torch.Tensor:
    """The distillation distance of one output (mean over samples; see :class:`DistillSpec`)."""
    if kind in _CLASSIFIER_KINDS:
        p_log = _log_probs(teacher, kind, temperature)
        kl = _kl(p_log, _log_probs(student, kind, temperature))
        return kl * temperature**2 if kind == "logits" else kl
    if kind == "sigmoid":
        p, q = teacher.clamp(_EPS, 1 - _EPS), student.clamp(_EPS, 1 - _EPS)
        return (p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())).mean()
    return (student - teacher).pow(2).mean() / max(variance, 1e-12)


def distill_loss(outputs: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor] | None,
                 labels: torch.Tensor | None, spec: DistillSpec) -> torch.Tensor:
    """``distill_weight`` x the mean distance over outputs + ``ce_weight`` x the cross-entropy on labels."""
    loss = outputs[0].new_zeros(())
    if spec.distill_weight > 0 and teacher is not None:
        parts = [output_distance(s, t, k, v, spec.temperature)
                 for s, t, k, v in zip(outputs, teacher, spec.kinds, spec.variances)]
        loss = loss + spec.distill_weight * torch.stack(parts).mean()
    if spec.ce_weight > 0 and labels is not None:
        loss = loss + spec.ce_weight * F.nll_loss(_log_probs(outputs[0], spec.kinds[0]), labels)
    return loss


# ------------------------------------------------------------------------------------------ evaluation
def _argmax_batches(executor: Executor, x: np.ndarray, instances: int, batch_size: int) -> np.ndarray:
    return model_outputs(executor, [x], instances, batch_size, first_only=True)[0].argmax(-1)


def model_outputs(executor: Executor, inputs: Sequence[np.ndarray], instances: int = 1, batch_size: int = 256,
                  *, first_only: bool = False) -> list[np.ndarray]:
    """The executor's outputs (``[instances, N, ...]`` each) on ``inputs`` (one array per model input), each batch
    repeated ``instances`` times, instance-major, as the hook's validation expects."""
    outs: list[list[np.ndarray]] = []
    n = int(inputs[0].shape[0])
    with torch.no_grad():
        for start in range(0, n, batch_size):
            xs = [torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))
                  for x in inputs]
            rep = [x.repeat(instances, *([1] * (x.dim() - 1))) for x in xs]
            ys = executor(*rep)
            ys = ys[:1] if first_only else ys
            if not outs:
                outs = [[] for _ in ys]
            for acc, y in zip(outs, ys):
                acc.append(y.reshape(instances, len(xs[0]), *y.shape[1:]).numpy())
    return [np.concatenate(o, axis=1) for o in outs]


def _agreement(student: np.ndarray, teacher: np.ndarray, kind: str, variance: float) -> np.ndarray:
    """Per instance: top-1 agreement with the teacher (classifier outputs of 2+ classes), else 1 - the squared
    error over the teacher's variance (R²: 1 = the teacher's outputs exactly)."""
    axes = tuple(range(1, student.ndim))
    if kind in _CLASSIFIER_KINDS and teacher.ndim > 1 and teacher.shape[-1] > 1:
        return (student.argmax(-1) == teacher.argmax(-1)[None]).mean(axis=tuple(range(1, student.ndim - 1)))
    return 1.0 - ((student - teacher[None]) ** 2).mean(axis=axes) / max(variance, 1e-12)


def chip_scores(executor: Executor, hook: NoiseHook, data: TrainData, spec: DistillSpec, *, metric: str,
                instances: int, t_s: float, seed: int, batch_size: int = 256) -> np.ndarray:
    """One score per PCM instance read at ``t_s`` (through ``hook``): ``metric`` ``"accuracy"`` (first output's
    argmax against the labels) or ``"agreement"`` (with the float teacher: mean over outputs of
    :func:`_agreement`)."""
    hook.attach(executor)
    per_run = max(1, batch_size // instances)
    with hook.validation(instances, t_s, seed):
        outs = model_outputs(executor, data.inputs, instances, per_run, first_only=metric == "accuracy")
    if metric == "accuracy":
        assert data.labels is not None
        return (outs[0].argmax(-1) == data.labels[None, :]).mean(axis=1)
    assert data.teacher is not None
    parts = [_agreement(s, t, k, v) for s, t, k, v in zip(outs, data.teacher, spec.kinds, spec.variances)]
    return np.mean(parts, axis=0)


def noisy_accuracy(executor: Executor, hook: NoiseHook, x: np.ndarray, y: np.ndarray, *, instances: int,
                   t_s: float, seed: int, batch_size: int = 256) -> np.ndarray:
    """Accuracy of ``instances`` PCM instances read at ``t_s`` (through ``hook``): one value per instance."""
    return chip_scores(executor, hook, TrainData([x], y), DistillSpec(("logits",), (1.0,)), metric="accuracy",
                       instances=instances, t_s=t_s, seed=seed, batch_size=batch_size)


def _relative_noise_hooks(executor: Executor, draws: int, zeta: float, generator: torch.Generator
                          ) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor | None]]:
    """(MVM hook, direct-convolution hook) computing with ``draws`` copies theta + |theta|·zeta·N(0,1) of each
    layer, drawn on first use."""
    noisy: dict[str, torch.Tensor] = {}
    kernels: dict[str, torch.Tensor] = {}

    def weights(step: AnalogStep, matrix: torch.Tensor) -> torch.Tensor:
        key = step.layer or step.name  # one draw per crossbar block: every use of a shared weight sees it
        if key not in noisy:
            z = torch.randn((draws, *matrix.shape), generator=generator)
            noisy[key] = matrix.detach() + matrix.detach().abs() * zeta * z
        return noisy[key]

    def hook(step: AnalogStep, cols: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        b, m, g, k = cols.shape
        c = cols.reshape(draws, (b // draws) * m, g, k)
        return torch.einsum("imgk,igkn->imgn", c, weights(step, matrix)).reshape(b, m, g, -1)

    def direct(step: AnalogStep, x: torch.Tensor) -> torch.Tensor | None:
        if step.op_type != "Conv":
            return None
        key = step.layer or step.name
        if key not in kernels:
            weight = executor.weight(step)
            kernels[key] = conv_weights(weights(step, step.matrix(weight)), tuple(weight.shape[1:]))
        w = noisy[key]
        return analog_conv(None, x, kernels[key], draws, w.shape[1], step.attrs)

    return hook, direct


def relative_noise_accuracy(executor: Executor, x: np.ndarray, y: np.ndarray, zeta: float, draws: int,
                            seed: int, chunk: int = 10, batch_size: int = 250) -> np.ndarray:
    """Accuracy under theta + |theta|·zeta·N(0,1) on every analog weight, float converters: one value per draw.

    Draws ride in the batch dimension, ``chunk`` at a time (the metric of Büchel et al.).
    """
    gen = torch.Generator().manual_seed(seed)
    accs: list[np.ndarray] = []
    saved = executor.hook, executor.input_hook, executor.direct_hook
    executor.input_hook = None
    for start in range(0, draws, chunk):
        n = min(chunk, draws - start)
        executor.hook, executor.direct_hook = _relative_noise_hooks(executor, n, zeta, gen)
        pred = _argmax_batches(executor, x, n, max(1, batch_size // n))
        accs.append((pred == y[None, :]).mean(axis=1))
    executor.hook, executor.input_hook, executor.direct_hook = saved
    return np.concatenate(accs)


# ------------------------------------------------------------------------------------------ the loop
@dataclass
class TrainSettings:
    """What the loop needs beyond the hook (see the finetune pass for meanings and defaults)."""

    epochs: int
    lr: float
    batch_size: int
    clip_alpha: float | None
    beta: float
    zeta: float
    attack_steps: int
    adversarial: bool
    val_instances: int
    val_t_s: float
    seed: int
    progress: bool = False
    weight_decay: float = 0.0
    select: str = "best"  # "best": the epoch with the best noisy validation (0 = the start); "last": the last
    metric: str = "accuracy"  # the noisy validation's score: "accuracy" (labels) or "agreement" (with the teacher)
    history: list[dict[str, Any]] = field(default_factory=list)


def train_executor(
    executor: Executor,
    hook: NoiseHook,
    train: TrainData,
    val: TrainData,
    settings: TrainSettings,
    spec: DistillSpec,
    recalibrate: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train ``executor`` in place; keeps the epoch (0 = the starting weights) with the best noisy validation.

    The loss is :func:`distill_loss` with ``spec`` (cross-entropy alone: ``DistillSpec(distill_weight=0,
    ce_weight=1)``). ``recalibrate`` (QAT or validation quantisation) is called before each epoch and before
    validation, so the converter ranges follow the weights. Returns ``{"history": [...], "best_epoch",
    "best_val_noisy", "train_time_s"}``.
    """
    gen = torch.Generator().manual_seed(settings.seed)
    keys = [s.weight_key for s in executor.analog_steps]
    x_train = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in train.inputs]
    y_train = None if train.labels is None else torch.from_numpy(np.asarray(train.labels, dtype=np.int64))
    t_train = None if train.teacher is None else [torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))
                                                   for t in train.teacher]
    n = len(train)
    steps_per_epoch = max(1, math.ceil(n / settings.batch_size))
    params = [p for p in executor.params.values() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    total_steps = max(1, settings.epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: 0.5 * (1 + math.cos(math.pi * i / total_steps)))
    bar = _progress(total_steps, settings.progress)
    last_val = [""]  # the latest noisy validation, kept on the bar while the next epoch trains

    def validate(epoch: int, loss: float, t0: float) -> float:
        if recalibrate is not None:
            recalibrate()
        scores = chip_scores(executor, hook, val, spec, metric=settings.metric, instances=settings.val_instances,
                             t_s=settings.val_t_s, seed=settings.seed + 7)
        entry = {"epoch": epoch, "loss": loss, "val_noisy": float(scores.mean()), "val_noisy_std": float(scores.std()),
                 "time_s": time.perf_counter() - t0}
        settings.history.append(entry)
        last_val[0] = f"{100 * entry['val_noisy']:.2f}% (epoch {epoch})"
        if bar is not None:
            bar.set_postfix_str(f"val_noisy={last_val[0]}")
        logger.info("finetune epoch %d: loss %.4f, noisy val %s %.4f", epoch, loss, settings.metric,
                    entry["val_noisy"])
        return entry["val_noisy"]

    started = time.perf_counter()
    best_acc = validate(0, float("nan"), started)
    best_epoch, best_state = 0, {k: v.detach().clone() for k, v in executor.params.items()}
    for epoch in range(1, settings.epochs + 1):
        if recalibrate is not None:
            recalibrate()
        hook.attach(executor)
        hook.training = True
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            # The attack bound grows linearly over the first half of training: a fine-tuned model starts far
            # from a flat minimum, and the full bound at step 0 gives a KL term that swamps the task loss.
            done = ((epoch - 1) * steps_per_epoch + i) / total_steps
            zeta_now = settings.zeta * min(1.0, 2.0 * done + 1.0 / total_steps)
            idx = order[i * settings.batch_size : (i + 1) * settings.batch_size]
            loss = _train_step(executor, hook, keys, [x[idx] for x in x_train],
                               None if y_train is None else y_train[idx],
                               None if t_train is None else [t[idx] for t in t_train], settings, spec, zeta_now, gen)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if settings.clip_alpha is not None:
                clip_weights(executor, keys, settings.clip_alpha)
            total += float(loss.detach()) * len(idx)
            if bar is not None:
                bar.update(1)
                if i % 10 == 0 or i == steps_per_epoch - 1:
                    seen = min((i + 1) * settings.batch_size, n)
                    bar.set_postfix_str(f"epoch {epoch}/{settings.epochs} loss={total / seen:.3f} "
                                        f"val_noisy={last_val[0]}", refresh=False)
        hook.training = False
        acc = validate(epoch, total / n, started)
        if acc > best_acc or settings.select == "last":
            best_acc, best_epoch = acc, epoch
            best_state = {k: v.detach().clone() for k, v in executor.params.items()}
    if bar is not None:
        bar.close()
    with torch.no_grad():
        for k, v in best_state.items():
            executor.params[k].copy_(v)
    executor.hook = executor.input_hook = executor.direct_hook = None
    return {"history": settings.history, "best_epoch": best_epoch, "best_val_noisy": best_acc,
            "train_time_s": time.perf_counter() - started}


def _train_step(executor: Executor, hook: NoiseHook, keys: list[str], xb: list[torch.Tensor],
                yb: torch.Tensor | None, tb: list[torch.Tensor] | None, settings: TrainSettings, spec: DistillSpec,
                zeta: float, gen: torch.Generator) -> torch.Tensor:
    hook.new_batch()
    outputs = executor(*xb)
    loss = distill_loss(outputs, tb, yb, spec)
    if not settings.adversarial or settings.beta <= 0:
        return loss
    with hook.clean():
        # With weight noise on, the reference f(theta) of the KL term is a separate noise-free forward.
        clean_logits = executor(*xb)[0] if hook.weight_noise is not None else outputs[0]
        p_log = F.log_softmax(clean_logits, dim=-1)
        delta = attack_parameters(executor, keys, xb, p_log, zeta, settings.attack_steps, gen)
        kl = adversarial_kl(executor, keys, xb, p_log, delta)
    return loss + settings.beta * kl


def compare_on_chip(executor: Executor, hook: NoiseHook, states: dict[str, dict[str, torch.Tensor]], val: TrainData,
                    spec: DistillSpec, *, metric: str, instances: int, times_s: Sequence[float], seed: int,
                    recalibrate: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Score each named set of weights on the same fresh PCM instances at each read time (common random numbers:
    the same devices' draws for every candidate). Returns, per name, ``{"score": mean over instances and times,
    "per_time": {t: (mean, std)}}``; the executor is left with the last state loaded."""
    results: dict[str, dict[str, Any]] = {}
    for name, state in states.items():
        with torch.no_grad():
            for k, v in state.items():
                executor.params[k].copy_(v)
        if recalibrate is not None:
            recalibrate()
        per_time = {}
        for t_s in times_s:
            scores = chip_scores(executor, hook, val, spec, metric=metric, instances=instances, t_s=t_s, seed=seed)
            per_time[f"{t_s:g}"] = (float(scores.mean()), float(scores.std()))
        results[name] = {"score": float(np.mean([m for m, _ in per_time.values()])), "per_time": per_time}
    executor.hook = executor.input_hook = executor.direct_hook = None
    return results


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    return progress_bar(total=total, unit="step", desc="fine-tuning")
