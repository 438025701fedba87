"""Torch implementations of the ONNX ops cimc executes.

One table, :data:`OPS`, used by the executor (every forward pass) and by constant folding (so a folded
constant is computed by the same code that would have computed it at run time). Each entry takes the
node's inputs (``None`` for an omitted optional input) and its attributes as plain Python values, and
returns a list of outputs. Semantics follow the ONNX operator specification for opset 13 and newer
(older models are converted to opset 13 on import); where an attribute became an input in a later opset,
both forms are accepted.

Ops run in float32 for real-valued data; integer tensors (shapes, indices) stay int64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["OPS", "OpFn", "supported_ops", "to_torch_dtype"]

OpFn = Callable[[list[Any], dict[str, Any]], list[torch.Tensor]]
OPS: dict[str, OpFn] = {}


def _op(*names: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def supported_ops() -> list[str]:
    """Sorted op types the executor implements (the digital unit's repertoire plus the analog ops)."""
    return sorted(OPS)


_ONNX_TO_TORCH = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


def to_torch_dtype(onnx_dtype: int) -> torch.dtype:
    if onnx_dtype not in _ONNX_TO_TORCH:
        raise KeyError(f"ONNX data type {onnx_dtype} is not supported")
    return _ONNX_TO_TORCH[onnx_dtype]


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --------------------------------------------------------------------------------------------- analog
def _same_pads(x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
               auto_pad: str) -> list[int]:
    """ONNX SAME_UPPER / SAME_LOWER padding as [begin..., end...] so the output is ceil(size / stride)."""
    pads_begin, pads_end = [], []
    for i in range(x.dim() - 2):
        size = x.shape[2 + i]
        out = math.ceil(size / strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, big = total // 2, total - total // 2
        pads_begin.append(small if auto_pad == "SAME_UPPER" else big)
        pads_end.append(big if auto_pad == "SAME_UPPER" else small)
    return pads_begin + pads_end


def _auto_pad(a: dict[str, Any]) -> str:
    mode = a.get("auto_pad", "NOTSET")
    return mode.decode() if isinstance(mode, bytes) else mode


def _conv_padding(x: torch.Tensor, w: torch.Tensor, a: dict[str, Any]) -> tuple[torch.Tensor, list[int], list[int]]:
    """Apply ONNX padding (explicit or auto_pad) to x; returns (padded x, strides, dilations) for torch."""
    spatial = x.dim() - 2
    kernel = list(w.shape[2:])
    strides = a.get("strides") or [1] * spatial
    dilations = a.get("dilations") or [1] * spatial
    auto_pad = _auto_pad(a)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(x, kernel, strides, dilations, auto_pad)
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    else:
        pads = a.get("pads") or [0] * (2 * spatial)
    return _pad_spatial(x, pads, spatial), strides, dilations


def _pad_spatial(x: torch.Tensor, pads: Sequence[int], spatial: int, value: float = 0.0) -> torch.Tensor:
    if not any(pads):
        return x
    torch_pads: list[int] = []
    for i in reversed(range(spatial)):  # torch pads the last dimension first
        torch_pads += [pads[i], pads[i + spatial]]
    return F.pad(x, torch_pads, value=value)


@_op("Conv")
def conv(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    x, strides, dilations = _conv_padding(x, w, a)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    return [fn(x, w, b, stride=strides, dilation=dilations, groups=a.get("group", 1))]


@_op("Gemm")
def gemm(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, w = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if a.get("transA", 0):
        x = x.transpose(-1, -2)
    if a.get("transB", 0):
        w = w.transpose(-1, -2)
    y = torch.matmul(x, w)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return [y]


@_op("MatMul")
def matmul(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    return [torch.matmul(inputs[0], inputs[1])]


# ------------------------------------------------------------------------------------ elementwise
def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda inputs, a: [fn(inputs[0], inputs[1])]


OPS["Add"] = _binary(torch.add)
OPS["Sub"] = _binary(torch.sub)
OPS["Mul"] = _binary(torch.mul)
OPS["Pow"] = _binary(lambda x, y: torch.pow(x, y.to(x.dtype)) if x.is_floating_point() else torch.pow(x, y))
OPS["Equal"] = _binary(torch.eq)
OPS["Less"] = _binary(torch.lt)
OPS["Greater"] = _binary(torch.gt)
OPS["And"] = _binary(torch.logical_and)
OPS["Or"] = _binary(torch.logical_or)


@_op("Div")
def div(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, y = inputs
    if x.is_floating_point():
        return [x / y]
    return [torch.div(x, y, rounding_mode="trunc")]


def _nary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    def run(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
        out = inputs[0]
        for t in inputs[1:]:
            out = fn(out, t)
        return [out]

    return run


OPS["Sum"] = _nary(torch.add)
OPS["Max"] = _nary(torch.maximum)
OPS["Min"] = _nary(torch.minimum)
OPS["Mean"] = lambda inputs, a: [_nary(torch.add)(inputs, a)[0] / len(inputs)]


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda inputs, a: [fn(inputs[0])]


OPS["Relu"] = _unary(torch.relu)
OPS["Sigmoid"] = _unary(torch.sigmoid)
OPS["Tanh"] = _unary(torch.tanh)
OPS["Exp"] = _unary(torch.exp)
OPS["Log"] = _unary(torch.log)
OPS["Sqrt"] = _unary(torch.sqrt)
OPS["Abs"] = _unary(torch.abs)
OPS["Neg"] = _unary(torch.neg)
OPS["Reciprocal"] = _unary(torch.reciprocal)
OPS["Floor"] = _unary(torch.floor)
OPS["Ceil"] = _unary(torch.ceil)
OPS["Erf"] = _unary(torch.erf)
OPS["Not"] = _unary(torch.logical_not)
OPS["Softplus"] = _unary(F.softplus)
OPS["Identity"] = _unary(lambda x: x)


@_op("Dropout")
def dropout(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    # Inference semantics: the output is the input; the optional mask output is all true.
    x = inputs[0]
    return [x, torch.ones_like(x, dtype=torch.bool)]


@_op("LeakyRelu")
def leaky_relu(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    return [F.leaky_relu(inputs[0], a.get("alpha", 0.01))]


@_op("Elu")
def elu(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    return [F.elu(inputs[0], a.get("alpha", 1.0))]


@_op("HardSigmoid")
def hard_sigmoid(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    return [torch.clamp(inputs[0] * alpha + beta, 0.0, 1.0)]


@_op("HardSwish")
def hard_swish(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    return [x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)]


@_op("PRelu")
def prelu(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, slope = inputs
    return [torch.where(x >= 0, x, x * slope)]


@_op("Clip")
def clip(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    lo = inputs[1] if len(inputs) > 1 and inputs[1] is not None else a.get("min")
    hi = inputs[2] if len(inputs) > 2 and inputs[2] is not None else a.get("max")
    if isinstance(lo, torch.Tensor):
        lo = lo.item()
    if isinstance(hi, torch.Tensor):
        hi = hi.item()
    return [torch.clamp(x, lo, hi)]


@_op("Where")
def where(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    return [torch.where(inputs[0].bool(), inputs[1], inputs[2])]


@_op("Cast")
def cast(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    return [inputs[0].to(to_torch_dtype(a["to"]))]


# ------------------------------------------------------------------------------------ reductions
@_op("Softmax")
def softmax(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    return [F.softmax(inputs[0], dim=a.get("axis", -1))]


OPS["LogSoftmax"] = lambda inputs, a: [F.log_softmax(inputs[0], dim=a.get("axis", -1))]


def _reduce(fn: Callable[..., torch.Tensor]) -> OpFn:
    def run(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
        x = inputs[0]
        axes = a.get("axes")
        if axes is None and len(inputs) > 1 and inputs[1] is not None:
            axes = _ints(inputs[1])
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, dim=[_axis(ax, x.dim()) for ax in axes], keepdim=keep)]

    return run


OPS["ReduceMean"] = _reduce(torch.mean)
OPS["ReduceSum"] = _reduce(torch.sum)
OPS["ReduceMax"] = _reduce(torch.amax)
OPS["ReduceMin"] = _reduce(torch.amin)
OPS["ReduceProd"] = _reduce(lambda x, dim, keepdim: _prod(x, dim, keepdim))
OPS["ReduceL2"] = _reduce(lambda x, dim, keepdim: torch.sqrt(torch.sum(x * x, dim=dim, keepdim=keepdim)))


def _prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


@_op("ArgMax")
def argmax(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    return [torch.argmax(inputs[0], dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))]


# ------------------------------------------------------------------------------- normalisation
@_op("BatchNormalization")
def batch_norm(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, scale, bias, mean, var = inputs[:5]
    return [F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))]


@_op("InstanceNormalization")
def instance_norm(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, scale, bias = inputs
    return [F.instance_norm(x, weight=scale, bias=bias, eps=a.get("epsilon", 1e-5))]


@_op("LayerNormalization")
def layer_norm(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = _axis(a.get("axis", -1), x.dim())
    return [F.layer_norm(x, x.shape[axis:], scale, bias, eps=a.get("epsilon", 1e-5))]


@_op("LRN")
def lrn(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    # torch's local_response_norm divides alpha by size exactly as ONNX does.
    return [
        F.local_response_norm(
            inputs[0], a["size"], alpha=a.get("alpha", 1e-4), beta=a.get("beta", 0.75), k=a.get("bias", 1.0)
        )
    ]


# --------------------------------------------------------------------------------------- pooling
def _pool_args(x: torch.Tensor, a: dict[str, Any]) -> tuple[list[int], list[int], list[int], bool]:
    spatial = x.dim() - 2
    kernel = list(a["kernel_shape"])
    strides = a.get("strides") or [1] * spatial
    pads = a.get("pads") or [0] * (2 * spatial)
    auto_pad = _auto_pad(a)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(x, kernel, strides, [1] * spatial, auto_pad)
    return kernel, strides, pads, bool(a.get("ceil_mode", 0))


@_op("MaxPool")
def max_pool(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    kernel, strides, pads, ceil_mode = _pool_args(x, a)
    spatial = x.dim() - 2
    dilations = a.get("dilations") or [1] * spatial
    x = _pad_spatial(x, pads, spatial, value=-math.inf)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
    return [fn(x, kernel, strides, 0, dilations, ceil_mode=ceil_mode)]


@_op("AveragePool")
def avg_pool(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    kernel, strides, pads, ceil_mode = _pool_args(x, a)
    spatial = x.dim() - 2
    count_include_pad = bool(a.get("count_include_pad", 0))
    symmetric = pads[:spatial] == pads[spatial:] and all(p <= k // 2 for p, k in zip(pads, kernel * 2))
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    if symmetric and not ceil_mode:
        return [fn(x, kernel, strides, pads[:spatial], ceil_mode=False, count_include_pad=count_include_pad)]
    # Asymmetric padding: sum over the zero-padded input, divide by the number of real (or all) elements.
    padded = _pad_spatial(x, pads, spatial)
    summed = fn(padded, kernel, strides, 0, ceil_mode=ceil_mode, count_include_pad=True) * math.prod(kernel)
    if count_include_pad:
        return [summed / math.prod(kernel)]
    ones = _pad_spatial(torch.ones_like(x[:1, :1]), pads, spatial)
    counts = fn(ones, kernel, strides, 0, ceil_mode=ceil_mode, count_include_pad=True) * math.prod(kernel)
    return [summed / counts]


@_op("GlobalAveragePool")
def global_avg_pool(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


@_op("GlobalMaxPool")
def global_max_pool(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]


# --------------------------------------------------------------------------------- shape and data
@_op("Flatten")
def flatten(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    axis = _axis(a.get("axis", 1), x.dim())
    lead = math.prod(x.shape[:axis])
    return [x.reshape(lead, -1)]


@_op("Reshape")
def reshape(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, shape = inputs[0], _ints(inputs[1]) or []
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


@_op("Transpose")
def transpose(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    perm = a.get("perm") or list(reversed(range(x.dim())))
    return [x.permute(*perm)]


@_op("Concat")
def concat(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    # ONNX allows empty 1-D operands (e.g. from shape arithmetic); torch.cat rejects them beside N-D ones.
    tensors = [t for t in inputs if t is not None and not (t.dim() == 1 and t.numel() == 0)]
    return [torch.cat(tensors, dim=a["axis"])]


@_op("Squeeze")
def squeeze(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    axes = a.get("axes") or (_ints(inputs[1]) if len(inputs) > 1 else None)
    if axes is None:
        return [x.squeeze()]
    keep = [d for i, d in enumerate(x.shape) if i not in {_axis(ax, x.dim()) for ax in axes}]
    return [x.reshape(keep)]


@_op("Unsqueeze")
def unsqueeze(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    axes = a.get("axes") or _ints(inputs[1]) or []
    rank = x.dim() + len(axes)
    out = x
    for ax in sorted(_axis(ax, rank) for ax in axes):
        out = out.unsqueeze(ax)
    return [out]


@_op("Shape")
def shape(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    dims = list(inputs[0].shape)
    start, end = a.get("start", 0), a.get("end", len(dims))
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


@_op("Size")
def size(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    return [torch.tensor(inputs[0].numel(), dtype=torch.int64)]


@_op("Gather")
def gather(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, idx = inputs
    axis = _axis(a.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    out = torch.index_select(x, axis, idx.reshape(-1))
    return [out.reshape([*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]])]  # a list: may be [] (scalar)


@_op("Slice")
def slice_(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    flips = []
    for start, end, ax, step in zip(starts, ends, axes, steps):
        ax = _axis(ax, x.dim())
        n = x.shape[ax]
        if step > 0:
            start = max(0, min(n, start + n if start < 0 else start))
            end = max(0, min(n, end + n if end < 0 else end))
            index[ax] = slice(start, end, step)
        else:  # negative steps: torch slicing has none, so flip and slice forward
            start = max(-1, min(n - 1, start + n if start < 0 else start))
            end = max(-1, min(n - 1, end + n if end < 0 else end))
            flips.append(ax)
            index[ax] = slice(n - 1 - start, n - 1 - end, -step)
    if flips:
        x = torch.flip(x, flips)
    return [x[tuple(index)]]


@_op("Split")
def split(inputs: list[Any], a: dict[str, Any], n_outputs: int | None = None) -> list[torch.Tensor]:
    x = inputs[0]
    axis = _axis(a.get("axis", 0), x.dim())
    sizes = a.get("split") or (_ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None)
    if sizes is None:
        parts = a.get("num_outputs") or a["_num_outputs"]
        step = math.ceil(x.shape[axis] / parts)
        sizes = [min(step, x.shape[axis] - i * step) for i in range(parts)]
    return list(torch.split(x, sizes, dim=axis))


@_op("Pad")
def pad(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    pads = a.get("pads") or _ints(inputs[1])
    value = a.get("value", 0.0)
    if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel():
        value = inputs[2].item()
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(x.dim()))
    full = [0] * (2 * x.dim())
    for i, ax in enumerate(axes):
        ax = _axis(ax, x.dim())
        full[ax], full[ax + x.dim()] = pads[i], pads[i + len(axes)]
    mode = a.get("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    torch_pads: list[int] = []
    for ax in reversed(range(x.dim())):
        torch_pads += [full[ax], full[ax + x.dim()]]
    if mode == "constant":
        return [F.pad(x, torch_pads, value=value)]
    # reflect/edge pad only the trailing dimensions torch supports
    trimmed = torch_pads[: 2 * (x.dim() - 2)]
    return [F.pad(x, trimmed, mode={"reflect": "reflect", "edge": "replicate"}[mode])]


@_op("Expand")
def expand(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, shape_t = inputs
    target = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape_t)))
    return [x.expand(target)]


@_op("Tile")
def tile(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    return [inputs[0].repeat(*_ints(inputs[1]))]


@_op("ConstantOfShape")
def constant_of_shape(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    value = a.get("value")
    fill = torch.zeros(1, dtype=torch.float32) if value is None else torch.as_tensor(np.asarray(value))
    return [torch.full(_ints(inputs[0]) or [], fill.reshape(-1)[0].item(), dtype=fill.dtype)]


@_op("Constant")
def constant(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in a:
            return [torch.as_tensor(np.array(a[key]))]  # a copy: attribute arrays are read-only
    raise KeyError("Constant node without a supported value attribute")


@_op("Range")
def range_(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    start, limit, delta = (t.item() for t in inputs)
    return [torch.arange(start, limit, delta, dtype=inputs[0].dtype)]


def _per_axis(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A scale or zero point (scalar or 1-D along ``axis``) shaped to broadcast against ``x``."""
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[_axis(axis, x.dim())] = t.numel()
    return t.reshape(shape)


_INT_RANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int16: (-32768, 32767), torch.int32: (-(2**31), 2**31 - 1)}


@_op("QuantizeLinear")
def quantize_linear(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, scale = inputs[0], inputs[1]
    zp = inputs[2] if len(inputs) > 2 and inputs[2] is not None else torch.zeros((), dtype=torch.uint8)
    axis = a.get("axis", 1)
    lo, hi = _INT_RANGE[zp.dtype]
    q = torch.round(x / _per_axis(scale, x, axis)) + _per_axis(zp, x, axis).to(x.dtype)
    return [torch.clamp(q, lo, hi).to(zp.dtype)]


@_op("DequantizeLinear")
def dequantize_linear(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    q, scale = inputs[0], inputs[1]
    zp = inputs[2] if len(inputs) > 2 and inputs[2] is not None else torch.zeros((), dtype=q.dtype)
    axis = a.get("axis", 1)
    s = _per_axis(scale, q, axis)
    return [(q.to(torch.int32) - _per_axis(zp, q, axis).to(torch.int32)).to(s.dtype) * s]


# ------------------------------------------------------------------------------ dynamic quantisation
# (Kept together at the end of the table: the quantised-model import, passes/dequantize.py, rewrites the
# integer ops around it into float ones; this op stays and runs on the digital unit.)
@_op("DynamicQuantizeLinear")
def dynamic_quantize_linear(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    """uint8 quantisation with a range measured on the tensor itself (ONNX DynamicQuantizeLinear): the range
    always includes 0, scale = range / 255, zero point = round(−min / scale); rounding half to even.

    The range spans the whole tensor, batch included (as onnxruntime computes it)."""
    x = inputs[0].float()
    x_min = torch.clamp(x.min(), max=0.0) if x.numel() else torch.zeros(())
    x_max = torch.clamp(x.max(), min=0.0) if x.numel() else torch.zeros(())
    scale = (x_max - x_min) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero tensor: scale 1 (as onnxruntime)
    zp = torch.clamp(torch.round(-x_min / scale), 0, 255)
    y = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return [y.to(torch.uint8), scale.reshape(()), zp.to(torch.uint8).reshape(())]


OPS.setdefault("Round", lambda inputs, a: [torch.round(inputs[0])])  # half to even, as ONNX Round
