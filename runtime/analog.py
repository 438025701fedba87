"""What one analog layer computes on the chip: DAC → crossbar tiles → ADC per tile → digital sum → GDC.

Used three ways, with the same code:

* calibration (``quantize`` pass): ideal weights, ranges being measured;
* simulation: per-instance weights read from programmed, drifted PCM devices;
* fine-tuning: float or noisy weights with straight-through quantisers (``ste=True``).

Shapes: MVM operands ``cols`` are ``[instances, mvms, groups, K]``; weights ``[instances or 1, groups, K, N]``;
results ``[instances, mvms, groups, N]``.

Quantisers are uniform with a clipped full scale ``x_max``: unsigned (inputs that are never negative, e.g.
after ReLU) use levels 0 … 2^b − 1, signed ones −(2^(b−1) − 1) … 2^(b−1) − 1 (symmetric). Rounding is half to
even, as onnxruntime's QuantizeLinear does, so the QDQ digital twin computes the same numbers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeAlias

import onnx_ir as ir
import torch

__all__ = ["ChipKernel", "LayerPlan", "QuantSpec", "Tile", "TorchKernel", "analog_conv", "analog_mvm", "chip_kernel",
           "chip_kernels", "conv_weights", "fake_quant", "layer_plans", "levels", "onehot_response", "probe_response",
           "set_chip_kernel"]

logger = logging.getLogger(__name__)


def levels(bits: int, signed: bool) -> int:
    """Number of positive quantisation steps up to full scale."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def fake_quant(x: torch.Tensor, x_max: Any, bits: int | None, signed: bool, ste: bool = False) -> torch.Tensor:
    """Clip to the full scale and round to ``bits`` (None = no quantisation). ``x_max`` broadcasts over x.

    Division by the step (not multiplication by its inverse) so the result matches QuantizeLinear exactly.
    """
    if bits is None:
        return x
    n = levels(bits, signed)
    if isinstance(x_max, torch.Tensor) and x_max.numel() > 1:
        hi = x_max.to(x.dtype)
        lo = -hi if signed else torch.zeros_like(hi)
        step = hi / n
    else:
        hi_f = float(x_max)
        hi, lo, step = hi_f, (-hi_f if signed else 0.0), torch.tensor(hi_f / n, dtype=x.dtype)  # type: ignore[assignment]
    if ste or (torch.is_grad_enabled() and x.requires_grad):
        clipped = torch.clamp(x, lo, hi)
        q = torch.round(clipped / step) * step
        return clipped + (q - clipped).detach() if ste else q
    # Inference: divide, clip the codes, round (QuantizeLinear's order; the same codes as clipping x first,
    # since hi / step rounds to n), in place on the one fresh tensor and with scalar bounds: 4 passes.
    return x.div(step).clamp_(-n if signed else 0, n).round_().mul_(step)


@dataclass
class QuantSpec:
    """DAC and ADC settings of one analog layer (stored as the node's ``cimc.quant`` metadata)."""

    dac_bits: int | None
    dac_signed: bool
    x_max: float
    adc_bits: int | None
    adc_granularity: str  # "layer" | "column"
    y_max: list[Any]  # one entry per tile (placement order): float, or list of floats per tile column
    percentile: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_node(cls, node: ir.Node) -> QuantSpec | None:
        raw = node.metadata_props.get("cimc.quant")
        return cls(**json.loads(raw)) if raw else None


@dataclass(frozen=True)
class Tile:
    """A placed piece of a layer's matrix: group ``group``, rows ``r0:r1``, columns ``c0:c1``."""

    group: int
    r0: int
    r1: int
    c0: int
    c1: int


@dataclass
class LayerPlan:
    """Everything the analog path needs about one layer, read from the compiled model's metadata."""

    name: str
    rows: int
    cols: int
    groups: int
    tiles: list[Tile]
    quant: QuantSpec | None
    layer: str = ""  # the crossbar block this use reads ("" = its own); converters (quant) are per use

    @property
    def whole_groups(self) -> bool:
        """True when each group sits in one tile (no row or column splits): one batched product suffices."""
        return len(self.tiles) == self.groups and all(
            t.r0 == 0 and t.r1 == self.rows and t.c0 == 0 and t.c1 == self.cols for t in self.tiles
        )

    def y_max_tensor(self, tile_index: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        assert self.quant is not None
        return torch.as_tensor(self.quant.y_max[tile_index], dtype=dtype)


def layer_plans(model: ir.Model) -> dict[str, LayerPlan]:
    """A plan per mapped analog node (a *use*), keyed by node name: the tiles of the crossbar block it reads
    (``plan.layer``; uses of one shared weight name the same block) in placement order, and this use's DAC/ADC
    settings if calibrated (the converters are configured per operation, so each use has its own ranges)."""
    plans = {}
    for node in model.graph:
        if "cimc.placement" not in node.metadata_props:
            continue
        m = json.loads(node.metadata_props["cimc.matrix"])
        tiles = [
            Tile(t["group"], t["src_row0"], t["src_row0"] + t["rows"], t["src_col0"], t["src_col0"] + t["cols"])
            for t in json.loads(node.metadata_props["cimc.placement"])
        ]
        plans[node.name] = LayerPlan(node.name, m["rows"], m["cols"], m["groups"], tiles, QuantSpec.from_node(node),
                                     node.metadata_props.get("cimc.layer") or node.name)
    return plans


def dac(plan: LayerPlan, cols: torch.Tensor, ste: bool = False) -> torch.Tensor:
    q = plan.quant
    if q is None:
        return cols
    return fake_quant(cols, q.x_max, q.dac_bits, q.dac_signed, ste)


Generators: TypeAlias = "torch.Generator | Sequence[torch.Generator] | None"
_DRAW_POOL: ThreadPoolExecutor | None = None


def _draw_pool() -> ThreadPoolExecutor:
    global _DRAW_POOL  # one lazily made worker for the whole process
    if _DRAW_POOL is None:
        _DRAW_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cimc-noise")
    return _DRAW_POOL


def _normal_like(y: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal draws with ``y``'s shape and memory layout, drawn into one flat buffer in memory order
    (torch's vectorised sampler only runs on contiguous memory, and the add then walks both in the same order).

    ``generator`` may be several streams: the buffer is then cut into as many equal parts, part j drawn from
    stream j — two parts are drawn at once on two threads when torch may use two, one after the other
    otherwise (the same numbers either way; torch's sampler is serial and is a large share of a simulation).
    """
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    dense = y.is_contiguous() or (y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last)) or (
        y.dim() == 5 and y.is_contiguous(memory_format=torch.channels_last_3d))
    flat = torch.empty(y.numel(), dtype=y.dtype)
    parts = flat.tensor_split(len(gens))
    if len(gens) > 1 and torch.get_num_threads() > 1 and flat.numel() >= 1 << 15:
        pending = [_draw_pool().submit(part.normal_, generator=g) for part, g in zip(parts[1:], gens[1:])]
        parts[0].normal_(generator=gens[0])
        for f in pending:
            f.result()
    else:
        for part, g in zip(parts, gens):
            part.normal_(generator=g)
    return flat.as_strided(y.shape, y.stride()) if dense else flat.reshape(y.shape)


def _add_output_noise(y: torch.Tensor, sigma: torch.Tensor | float | None, generator: Generators) -> torch.Tensor:
    """``y`` plus Gaussian noise of std ``sigma`` (broadcast over y), drawn fresh for every conversion."""
    if sigma is None or (not isinstance(sigma, torch.Tensor) and sigma == 0):
        return y
    z = _normal_like(y, generator)
    scale = sigma.to(y.dtype) if isinstance(sigma, torch.Tensor) else sigma
    if torch.is_grad_enabled() and y.requires_grad:
        return y + z * scale
    return y.addcmul_(z, scale) if isinstance(scale, torch.Tensor) else y.add_(z, alpha=scale)  # y is fresh


def _torch_mvm(
    plan: LayerPlan,
    cols: torch.Tensor,
    weights: torch.Tensor,
    *,
    adc: bool = True,
    ste: bool = False,
    out_noise: torch.Tensor | float | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """Crossbar products of DAC-quantised ``cols`` with ``weights``, each tile's partial sums through its ADC.

    ``cols`` [I, M, G, K] (already DAC-quantised, see :func:`dac`); ``weights`` [I or 1, G, K, N].
    Row-split tiles are converted separately and added digitally, as on the chip. ``out_noise``: std of the
    additive analog noise on every column sum before its ADC, in the layer's output units (a float, or a
    tensor broadcasting to ``[G, N]``), drawn from ``generator`` for each conversion; None = none.
    """
    q = plan.quant if adc else None
    if plan.whole_groups:
        y = _add_output_noise(torch.einsum("imgk,igkn->imgn", cols, weights), out_noise, generator)
        if q is None or q.adc_bits is None:
            return y
        y_max = torch.stack([plan.y_max_tensor(i, y.dtype).reshape(-1) for i in range(len(plan.tiles))])  # [G, 1|N]
        return fake_quant(y, y_max, q.adc_bits, True, ste)
    # cols and weights each carry either one entry or one per instance on their first axis and broadcast
    # against each other (a shared probe against every instance's weights; every instance's inputs against
    # one ideal matrix): the sum has the broadcast instance count.
    instances = max(cols.shape[0], weights.shape[0])
    out = torch.zeros(instances, cols.shape[1], plan.groups, plan.cols, dtype=torch.result_type(cols, weights))
    for i, t in enumerate(plan.tiles):
        part = torch.matmul(cols[:, :, t.group, t.r0 : t.r1], weights[:, t.group, t.r0 : t.r1, t.c0 : t.c1])
        if out_noise is not None:  # each tile's partial sums are separate conversions, each with its own noise
            sigma = out_noise[..., t.group, t.c0 : t.c1] if isinstance(out_noise, torch.Tensor) else out_noise
            part = _add_output_noise(part, sigma, generator)
        if q is not None and q.adc_bits is not None:
            part = fake_quant(part, plan.y_max_tensor(i, part.dtype), q.adc_bits, True, ste)
        out[:, :, t.group, t.c0 : t.c1] = out[:, :, t.group, t.c0 : t.c1] + part
    return out


def conv_weights(weights: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """Per-instance crossbar weights ``[I, G, K, N]`` as one ONNX Conv kernel ``[I·G·N, *kernel]`` (``kernel``: the
    layer weight's shape without its first dimension, ``(C/G, *spatial)``)."""
    i, g, _, n = weights.shape
    return weights.permute(0, 1, 3, 2).reshape(i * g * n, *kernel)


def _torch_conv(plan: LayerPlan | None, x: torch.Tensor, kernel: torch.Tensor, instances: int, groups: int,
                attrs: dict[str, Any], gdc: torch.Tensor | None = None, ste: bool = False,
                out_noise: torch.Tensor | float | None = None, generator: Generators = None) -> torch.Tensor:
    """A convolution whose groups each sit in one tile, for all instances at once: one grouped convolution
    (instance i's weights are group block i, ``kernel`` from :func:`conv_weights`), then the ADC per output
    channel and the GDC factor ``[I, 1, 1, 1|N]``. The same arithmetic as :func:`analog_mvm` on unrolled
    columns, without materialising them (``out_noise`` as there: a float or a tensor broadcasting to ``[G, N]``).
    ``x``: instance-major ``[I·B, C, *spatial]``, already through the DAC.
    """
    from cimc.runtime.executor import channels_last, conv_nd

    b = x.shape[0] // instances
    # Instance-major batch -> instances side by side in the channels (no copy for a single instance).
    xs = x if instances == 1 else x.reshape(instances, b, *x.shape[1:]).transpose(0, 1).reshape(b, -1, *x.shape[2:])
    y = conv_nd(xs, kernel, None, {**attrs, "group": instances * groups})  # [B, I·G·N, *spatial]
    spatial = y.shape[2:]
    ones = [1] * len(spatial)
    n = y.shape[1] // (instances * groups)
    if out_noise is not None:  # [G, N] -> the output's [1, I·G·N, 1…] channel layout
        sigma = out_noise
        if isinstance(out_noise, torch.Tensor):
            sigma = out_noise.expand(groups, n).reshape(1, groups * n).expand(instances, groups * n).reshape(1, -1, *ones)
        y = _add_output_noise(y, sigma, generator)
    q = plan.quant if plan is not None else None
    # Per-channel factors as [1, I·G·N, 1…] vectors: the output keeps its (channels-last) layout.
    if q is not None and q.adc_bits is not None:
        assert plan is not None
        y_max = torch.stack([plan.y_max_tensor(i, y.dtype).reshape(-1) for i in range(len(plan.tiles))])  # [G, 1|N]
        y_max = y_max.expand(groups, n).reshape(1, groups * n).expand(instances, groups * n)
        y = fake_quant(y, y_max.reshape(1, -1, *ones), q.adc_bits, True, ste)
    if gdc is not None:  # [I, 1, 1, 1|N]
        factor = gdc.reshape(instances, 1, -1).expand(instances, groups, n).reshape(1, -1, *ones)
        y = y * factor if torch.is_grad_enabled() and y.requires_grad else y.mul_(factor)
    if instances == 1:
        return channels_last(y)  # after the noise, which follows the convolution's own layout
    return y.reshape(b, instances, -1, *spatial).transpose(0, 1).reshape(instances * b, -1, *spatial)


# ------------------------------------------------------------------------------------------ the kernel seam
class ChipKernel(Protocol):
    """The analog arithmetic of one layer for a batch of chip instances: crossbar products, output noise, ADC
    and (for convolutions) drift compensation. Everything that computes a chip's numbers — ``simulate``,
    ``run``, ``diagnose``, fine-tuning's noisy forward and validation, calibration, sweep points — reaches it
    through :func:`analog_mvm` and :func:`analog_conv`; :func:`chip_kernel` is the one place that picks it.

    A kernel must keep each instance's numbers independent of how many instances share a call when the caller
    passes them one at a time (the simulator does, so that shards agree bit for bit), and draw its output
    noise only from the generators it is given.
    """

    name: str

    def mvm(self, plan: LayerPlan, cols: torch.Tensor, weights: torch.Tensor, *, adc: bool, ste: bool,
            out_noise: torch.Tensor | float | None, generator: Generators) -> torch.Tensor:
        """``cols`` [I, M, G, K] (through the DAC) times ``weights`` [I or 1, G, K, N] → [I, M, G, N]."""
        ...

    def conv(self, plan: LayerPlan | None, x: torch.Tensor, kernel: torch.Tensor, instances: int, groups: int,
             attrs: dict[str, Any], gdc: torch.Tensor | None, ste: bool, out_noise: torch.Tensor | float | None,
             generator: Generators) -> torch.Tensor:
        """A convolution whose groups each sit in one tile, for ``instances`` instance-major inputs."""
        ...


class TorchKernel:
    """The reference kernel: torch operations (oneDNN/MKL products, in-place converters, torch's sampler)."""

    name = "torch"

    def mvm(self, plan: LayerPlan, cols: torch.Tensor, weights: torch.Tensor, *, adc: bool, ste: bool,
            out_noise: torch.Tensor | float | None, generator: Generators) -> torch.Tensor:
        return _torch_mvm(plan, cols, weights, adc=adc, ste=ste, out_noise=out_noise, generator=generator)

    def conv(self, plan: LayerPlan | None, x: torch.Tensor, kernel: torch.Tensor, instances: int, groups: int,
             attrs: dict[str, Any], gdc: torch.Tensor | None, ste: bool, out_noise: torch.Tensor | float | None,
             generator: Generators) -> torch.Tensor:
        return _torch_conv(plan, x, kernel, instances, groups, attrs, gdc, ste, out_noise, generator)


_KERNELS: dict[str, ChipKernel] = {"torch": TorchKernel()}
_ACTIVE = ["torch"]


def chip_kernel() -> ChipKernel:
    """The kernel every chip computation uses (the one place it is chosen)."""
    return _KERNELS[_ACTIVE[0]]


def set_chip_kernel(name: str) -> None:
    """Use kernel ``name`` (one of :func:`chip_kernels`) for every chip computation from now on."""
    from cimc.errors import InputError

    if name not in _KERNELS:
        raise InputError(f"unknown chip kernel {name!r}; choose one of {', '.join(sorted(_KERNELS))}")
    _ACTIVE[0] = name


def chip_kernels() -> list[str]:
    """Names of the registered kernels."""
    return sorted(_KERNELS)


def analog_mvm(
    plan: LayerPlan,
    cols: torch.Tensor,
    weights: torch.Tensor,
    *,
    adc: bool = True,
    ste: bool = False,
    out_noise: torch.Tensor | float | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """Crossbar products of DAC-quantised ``cols`` with ``weights``, each tile's partial sums through its ADC,
    computed by the :func:`chip_kernel` (see :func:`_torch_mvm` for the arithmetic)."""
    return chip_kernel().mvm(plan, cols, weights, adc=adc, ste=ste, out_noise=out_noise, generator=generator)


def analog_conv(plan: LayerPlan | None, x: torch.Tensor, kernel: torch.Tensor, instances: int, groups: int,
                attrs: dict[str, Any], gdc: torch.Tensor | None = None, ste: bool = False,
                out_noise: torch.Tensor | float | None = None, generator: Generators = None) -> torch.Tensor:
    """A convolution whose groups each sit in one tile, for all instances at once, computed by the
    :func:`chip_kernel` (see :func:`_torch_conv` for the arithmetic)."""
    return chip_kernel().conv(plan, x, kernel, instances, groups, attrs, gdc, ste, out_noise, generator)


def probe_response(plan: LayerPlan, weights: torch.Tensor) -> torch.Tensor:
    """The layer's outputs ``[I, P, G, N]`` for its fixed drift-compensation probe (through the DAC, no ADC:
    a long average), computed with ``weights`` ``[I or 1, G, K, N]``. The one definition the simulator's GDC,
    training's GDC and the quantizer's drift estimate share."""
    from cimc.runtime.calibration import gdc_probe

    x_max = plan.quant.x_max if plan.quant is not None else 1.0
    probe = gdc_probe(plan.rows, x_max).reshape(1, -1, 1, plan.rows).expand(1, -1, plan.groups, plan.rows)
    return analog_mvm(plan, dac(plan, probe), weights, adc=False)


def onehot_response(plan: LayerPlan, weights: torch.Tensor, out_noise: torch.Tensor | float | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """aihwkit's drift-compensation readout (``GlobalDriftCompensation``), for comparison: outputs ``[I, K, G, N]``
    of one read of each row driven alone at input 1.0 in the layer's units, through the DAC, the output noise
    (``out_noise`` as in :func:`analog_mvm`, drawn from ``generator``) and the ADC of the row's own tile (aihwkit
    reads each tile's rows through that tile only; the other tiles of a row-split layer are not converted).
    ``weights`` ``[I or 1, G, K, N]``. A single, quantised read: for a layer whose DAC range is much wider than
    1.0, a few DAC steps landing on a few ADC steps (docs/fidelity.md)."""
    k = plan.rows
    eye = dac(plan, torch.eye(k, dtype=weights.dtype).reshape(1, k, 1, k).expand(1, k, plan.groups, k).clone())
    q = plan.quant
    out = torch.zeros(weights.shape[0], k, plan.groups, plan.cols, dtype=weights.dtype)
    for i, t in enumerate(plan.tiles):
        part = torch.matmul(eye[:, t.r0 : t.r1, t.group, t.r0 : t.r1], weights[:, t.group, t.r0 : t.r1, t.c0 : t.c1])
        if out_noise is not None:
            sigma = out_noise[..., t.group, t.c0 : t.c1] if isinstance(out_noise, torch.Tensor) else out_noise
            part = _add_output_noise(part, sigma, generator)
        if q is not None and q.adc_bits is not None:
            part = fake_quant(part, plan.y_max_tensor(i, part.dtype), q.adc_bits, True)
        out[:, t.r0 : t.r1, t.group, t.c0 : t.c1] = part
    return out
