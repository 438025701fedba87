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


# ------------------------------------------------------------------------------- normalisation
@_op("BatchNormalization")
def batch_norm(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, scale, bias, mean, var = inputs[:5]
    return [F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))]


@_op("InstanceNormalization")
def instance_norm(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, scale, bias = inputs
    return [F.instance_norm(x, weight=scale, bias=bias, eps=a.get("epsilon", 1e-5))]


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
    fill = torch.zeros(1, dtype=torch.float32) if value is None else torch.as_tensor(np.array(value))  # a copy: attribute tensors are read-only
    return [torch.full(_ints(inputs[0]) or [], fill.reshape(-1)[0].item(), dtype=fill.dtype)]


@_op("Constant")
def constant(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in a:
            return [torch.as_tensor(np.array(a[key]))]  # a copy: attribute arrays are read-only
    raise KeyError("Constant node without a supported value attribute")


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


# ============================================================================ wider digital coverage
# The ops below are what trained third-party models (OCR, detectors, audio front ends, classifiers) need
# beyond the ops above; each is checked against onnxruntime on single-node graphs in
# tests/test_ops_coverage.py, over its attribute variants.


def _str(a: dict[str, Any], key: str, default: str) -> str:
    v = a.get(key, default)
    return v.decode() if isinstance(v, bytes) else v


def _opt(inputs: list[Any], i: int) -> Any:
    """The i-th input, or None when it is omitted (absent, empty name, or an empty tensor)."""
    if len(inputs) <= i or inputs[i] is None:
        return None
    t = inputs[i]
    return None if isinstance(t, torch.Tensor) and t.numel() == 0 and t.dim() == 1 else t


# --------------------------------------------------------------------------- comparison and logic
OPS["GreaterOrEqual"] = _binary(torch.ge)
OPS["LessOrEqual"] = _binary(torch.le)
OPS["Xor"] = _binary(torch.logical_xor)
OPS["BitwiseAnd"] = _binary(torch.bitwise_and)
OPS["BitwiseOr"] = _binary(torch.bitwise_or)
OPS["BitwiseXor"] = _binary(torch.bitwise_xor)
OPS["BitwiseNot"] = _unary(torch.bitwise_not)
OPS["IsNaN"] = _unary(torch.isnan)


@_op("IsInf")
def is_inf(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    pos, neg = a.get("detect_positive", 1), a.get("detect_negative", 1)
    return [(torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))]


@_op("BitShift")
def bit_shift(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, y = inputs
    left = _str(a, "direction", "LEFT") == "LEFT"
    return [torch.bitwise_left_shift(x, y) if left else torch.bitwise_right_shift(x, y)]


@_op("Mod")
def mod(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, y = inputs
    # fmod=1: the sign of the dividend (C fmod); fmod=0 (integers only): the sign of the divisor.
    return [torch.fmod(x, y) if a.get("fmod", 0) else torch.remainder(x, y)]


# ------------------------------------------------------------------------------- elementwise math
OPS["Sign"] = _unary(torch.sign)
OPS["Round"] = _unary(torch.round)  # half to even, as ONNX specifies
OPS["Sin"] = _unary(torch.sin)
OPS["Cos"] = _unary(torch.cos)
OPS["Tan"] = _unary(torch.tan)
OPS["Asin"] = _unary(torch.asin)
OPS["Acos"] = _unary(torch.acos)
OPS["Atan"] = _unary(torch.atan)
OPS["Sinh"] = _unary(torch.sinh)
OPS["Cosh"] = _unary(torch.cosh)
OPS["Asinh"] = _unary(torch.asinh)
OPS["Acosh"] = _unary(torch.acosh)
OPS["Atanh"] = _unary(torch.atanh)
OPS["Softsign"] = _unary(F.softsign)
OPS["Mish"] = _unary(F.mish)


@_op("Gelu")
def gelu(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    return [F.gelu(inputs[0], approximate=_str(a, "approximate", "none"))]


@_op("Selu")
def selu(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    alpha, gamma = a.get("alpha", 1.67326319217681884765625), a.get("gamma", 1.05070102214813232421875)
    return [gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))]


@_op("Celu")
def celu(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    return [F.celu(inputs[0], alpha=a.get("alpha", 1.0))]


@_op("ThresholdedRelu")
def thresholded_relu(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    return [torch.where(x > a.get("alpha", 1.0), x, torch.zeros_like(x))]


@_op("Shrink")
def shrink(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    bias, lambd = a.get("bias", 0.0), a.get("lambd", 0.5)
    out = torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))
    return [out.to(x.dtype)]


@_op("CastLike")
def cast_like(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    return [inputs[0].to(inputs[1].dtype)]


@_op("Hardmax")
def hardmax(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    axis = _axis(a.get("axis", -1), x.dim())
    idx = _arg_extreme(x, axis, largest=True, last=False)
    return [torch.zeros_like(x).scatter_(axis, idx.unsqueeze(axis), 1.0)]


# ---------------------------------------------------------------------------------- reductions
OPS["ReduceL1"] = _reduce(lambda x, dim, keepdim: torch.sum(torch.abs(x), dim=dim, keepdim=keepdim))
OPS["ReduceSumSquare"] = _reduce(lambda x, dim, keepdim: torch.sum(x * x, dim=dim, keepdim=keepdim))
OPS["ReduceLogSum"] = _reduce(lambda x, dim, keepdim: torch.log(torch.sum(x, dim=dim, keepdim=keepdim)))
OPS["ReduceLogSumExp"] = _reduce(torch.logsumexp)


def _arg_extreme(x: torch.Tensor, axis: int, largest: bool, last: bool) -> torch.Tensor:
    """Index of the first (or last) maximum/minimum along ``axis`` (ties broken as ONNX specifies)."""
    if last:
        flipped = torch.flip(x, [axis])
        idx = torch.argmax(flipped, dim=axis) if largest else torch.argmin(flipped, dim=axis)
        return x.shape[axis] - 1 - idx
    # torch.argmax/argmin return the first occurrence on CPU
    return torch.argmax(x, dim=axis) if largest else torch.argmin(x, dim=axis)


def _arg(largest: bool) -> OpFn:
    def run(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
        x = inputs[0]
        axis = _axis(a.get("axis", 0), x.dim())
        idx = _arg_extreme(x, axis, largest, bool(a.get("select_last_index", 0)))
        return [idx.unsqueeze(axis) if a.get("keepdims", 1) else idx]

    return run


OPS["ArgMax"] = _arg(True)
OPS["ArgMin"] = _arg(False)


@_op("CumSum")
def cumsum(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    axis = _axis(int(inputs[1].reshape(-1)[0]), x.dim())
    reverse, exclusive = bool(a.get("reverse", 0)), bool(a.get("exclusive", 0))
    if reverse:
        x = torch.flip(x, [axis])
    y = torch.cumsum(x, dim=axis).to(x.dtype)
    if exclusive:  # shift by one along the axis, zero first
        y = torch.cat([torch.zeros_like(y.narrow(axis, 0, 1)), y.narrow(axis, 0, y.shape[axis] - 1)], dim=axis)
    return [torch.flip(y, [axis]) if reverse else y]


@_op("TopK")
def topk(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, k = inputs[0], int(inputs[1].reshape(-1)[0])
    axis = _axis(a.get("axis", -1), x.dim())
    largest = bool(a.get("largest", 1))
    # A stable sort keeps equal values in index order, which is the order ONNX asks for.
    values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
    return [values.narrow(axis, 0, k), indices.narrow(axis, 0, k)]


@_op("NonZero")
def nonzero(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    if x.dim() == 0:  # a scalar has no coordinates: [0, 1] if it is non-zero, else [0, 0]
        return [torch.zeros((0, int(bool(x))), dtype=torch.int64)]
    return [torch.nonzero(x).T.contiguous()]


# ------------------------------------------------------------------------------- normalisation
@_op("LayerNormalization")
def layer_norm_full(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, scale = inputs[0], inputs[1]
    bias = _opt(inputs, 2)
    axis = _axis(a.get("axis", -1), x.dim())
    eps = a.get("epsilon", 1e-5)
    dims = list(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(var + eps)
    y = (x - mean) * inv_std * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv_std]


@_op("GroupNormalization")
def group_norm(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, scale, bias = inputs
    groups = int(a["num_groups"])
    eps = a.get("epsilon", 1e-5)
    c = x.shape[1]
    y = F.group_norm(x, groups, eps=eps)
    # Opset 18 gives scale/bias per group, opset 21 per channel; a per-group vector is repeated over the
    # channels of its group.
    if scale.numel() == groups and groups != c:
        scale = scale.repeat_interleave(c // groups)
        bias = bias.repeat_interleave(c // groups)
    shape = [1, c] + [1] * (x.dim() - 2)
    return [y * scale.reshape(shape) + bias.reshape(shape)]


@_op("LpNormalization")
def lp_norm(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    p = int(a.get("p", 2))
    norm = torch.linalg.vector_norm(x, ord=p, dim=a.get("axis", -1), keepdim=True)
    return [x / norm]


# ---------------------------------------------------------------------------- gather and scatter
@_op("GatherElements")
def gather_elements(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, idx = inputs
    axis = _axis(a.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    return [torch.gather(x, axis, idx)]


@_op("GatherND")
def gather_nd(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, idx = inputs
    b = int(a.get("batch_dims", 0))
    idx = idx.long()
    k = idx.shape[-1]
    batch_shape = list(x.shape[:b])
    nb = math.prod(batch_shape)
    xs = x.reshape(nb, *x.shape[b:])
    ids = idx.reshape(nb, -1, k)  # [batch, lookups, k]
    dims = torch.tensor(x.shape[b : b + k])
    ids = torch.where(ids < 0, ids + dims, ids)
    out = torch.stack([xs[i][tuple(ids[i].T)] for i in range(nb)])  # [batch, lookups, *rest]
    return [out.reshape(*idx.shape[:-1], *x.shape[b + k :])]


def _scatter_reduce(out: torch.Tensor, index: tuple[torch.Tensor, ...], upd: torch.Tensor, how: str) -> None:
    if how == "none":
        out[index] = upd
    elif how == "add":
        out.index_put_(index, upd, accumulate=True)
    else:  # mul/max/min: applied one update at a time (duplicates combine, as onnxruntime does)
        fn = {"mul": torch.mul, "max": torch.maximum, "min": torch.minimum}[how]
        for j in range(upd.shape[0]):
            at = tuple(i[j] for i in index)
            out[at] = fn(out[at], upd[j])


@_op("ScatterND")
def scatter_nd(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, idx, upd = inputs
    out = x.clone()
    k = idx.shape[-1]
    ids = idx.long().reshape(-1, k)
    dims = torch.tensor(x.shape[:k])
    ids = torch.where(ids < 0, ids + dims, ids)
    _scatter_reduce(out, tuple(ids.T), upd.reshape(-1, *x.shape[k:]), _str(a, "reduction", "none"))
    return [out]


@_op("ScatterElements", "Scatter")
def scatter_elements(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, idx, upd = inputs
    axis = _axis(a.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    how = _str(a, "reduction", "none")
    if how == "none":
        return [torch.scatter(x, axis, idx, upd)]
    reduce = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[how]
    return [torch.scatter_reduce(x, axis, idx, upd, reduce=reduce, include_self=True)]


@_op("OneHot")
def one_hot(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    idx, depth_t, values = inputs
    depth = int(depth_t.reshape(-1)[0].item())
    idx = idx.to(torch.int64) if not idx.is_floating_point() else idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + depth, idx)
    valid = (idx >= 0) & (idx < depth)
    hot = F.one_hot(torch.where(valid, idx, torch.zeros_like(idx)), depth) * valid.unsqueeze(-1)
    off, on = values[0], values[1]
    out = torch.where(hot.bool(), on, off)
    axis = _axis(a.get("axis", -1), idx.dim() + 1)
    return [torch.movedim(out, -1, axis)]


@_op("Trilu")
def trilu(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    k = _opt(inputs, 1)
    k = 0 if k is None else int(k.reshape(-1)[0])
    return [torch.triu(x, k) if a.get("upper", 1) else torch.tril(x, k)]


@_op("EyeLike")
def eye_like(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    dtype = to_torch_dtype(a["dtype"]) if "dtype" in a else x.dtype
    n, m = x.shape
    k = int(a.get("k", 0))
    rows = torch.arange(n)
    cols = rows + k
    ok = (cols >= 0) & (cols < m)
    out = torch.zeros((n, m), dtype=dtype)
    out[rows[ok], cols[ok]] = 1
    return [out]


# ---------------------------------------------------------------------------------- rearranging
@_op("DepthToSpace")
def depth_to_space(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    bs = int(a["blocksize"])
    n, c, h, w = x.shape
    if _str(a, "mode", "DCR") == "DCR":
        y = x.reshape(n, bs, bs, c // bs**2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:  # CRD: the same as torch's pixel_shuffle
        y = x.reshape(n, c // bs**2, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // bs**2, h * bs, w * bs)]


@_op("SpaceToDepth")
def space_to_depth(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x = inputs[0]
    bs = int(a["blocksize"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * bs * bs, h // bs, w // bs)]


@_op("Einsum")
def einsum(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    return [torch.einsum(_str(a, "equation", ""), *inputs)]


@_op("Pad")
def pad_full(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    """Pad in every mode (constant, reflect, edge, wrap) on any axes; negative pads crop."""
    x = inputs[0]
    pads = a.get("pads") or _ints(inputs[1])
    value_t = _opt(inputs, 2)
    value = a.get("value", 0.0) if value_t is None else value_t.reshape(-1)[0].item()
    axes_t = _opt(inputs, 3)
    axes = _ints(axes_t) if axes_t is not None else list(range(x.dim()))
    mode = _str(a, "mode", "constant")
    out = x
    n_ax = len(axes)
    for i, ax in enumerate(axes):
        ax = _axis(ax, x.dim())
        begin, end = int(pads[i]), int(pads[i + n_ax])
        if begin == 0 and end == 0:
            continue
        n = out.shape[ax]
        pos = torch.arange(-begin, n + end)
        if mode == "constant":
            inside = (pos >= 0) & (pos < n)
            taken = torch.index_select(out, ax, pos.clamp(0, max(n - 1, 0)))
            shape = [1] * out.dim()
            shape[ax] = len(pos)
            fill = torch.full((), value, dtype=out.dtype)
            out = torch.where(inside.reshape(shape), taken, fill)
            continue
        if mode == "edge":
            src = pos.clamp(0, n - 1)
        elif mode == "wrap":
            src = torch.remainder(pos, n)
        elif mode == "reflect":
            period = 2 * (n - 1) if n > 1 else 1
            r = torch.remainder(pos, period)
            src = torch.where(r < n, r, period - r) if n > 1 else torch.zeros_like(pos)
        else:
            raise ValueError(f"Pad mode {mode!r} is not an ONNX mode")
        out = torch.index_select(out, ax, src)
    return [out]


@_op("Range")
def range_full(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    start, limit, delta = (t.reshape(-1)[0] for t in inputs)
    # ONNX: max(ceil((limit - start) / delta), 0) elements, computed in the input type
    n = max(int(math.ceil((limit.item() - start.item()) / delta.item())), 0)
    return [start + torch.arange(n, dtype=inputs[0].dtype) * delta]


# -------------------------------------------------------------------------------------- resize
_NEAREST = {
    "round_prefer_floor": lambda v: torch.where(v - torch.floor(v) == 0.5, torch.floor(v), torch.round(v)),
    "round_prefer_ceil": lambda v: torch.where(v - torch.floor(v) == 0.5, torch.ceil(v), torch.round(v)),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


def _source_coords(mode: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float]) -> torch.Tensor:
    """Coordinate in the input of each output position along one axis, per ONNX Resize.

    Computed in float32 with onnxruntime's order of operations: a coordinate that lands on .5 in exact
    arithmetic lands on either side of it in float32, and the nearest-pixel rounding then depends on it.
    """
    f = torch.float32
    x = torch.arange(out_len, dtype=f)
    s = torch.tensor(scale, dtype=f)
    n_in, n_out = torch.tensor(float(in_len), dtype=f), torch.tensor(float(out_len), dtype=f)
    if mode == "half_pixel":
        return (x + 0.5) / s - 0.5
    if mode == "half_pixel_symmetric":
        adjustment = n_out / (s * n_in)
        offset = n_in / 2 * (1 - adjustment)
        return offset + (x + 0.5) / s - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / s - 0.5 if out_len > 1 else torch.zeros_like(x)
    if mode == "align_corners":
        return x * (n_in - 1) / (n_out - 1) if out_len > 1 else torch.zeros_like(x)
    if mode == "asymmetric":
        return x / s
    if mode == "tf_crop_and_resize":
        start, end = (torch.tensor(v, dtype=f) for v in roi)
        if out_len > 1:
            return start * (n_in - 1) + x * (end - start) * (n_in - 1) / (n_out - 1)
        return torch.full_like(x, float(0.5 * (start + end) * (n_in - 1)))
    raise ValueError(f"Resize coordinate_transformation_mode {mode!r} is not an ONNX mode")


def _cubic_weights(t: torch.Tensor, a_coef: float) -> list[torch.Tensor]:
    """Keys' cubic convolution weights of the four neighbours at offsets -1, 0, 1, 2 (t = fraction)."""
    def near(d: torch.Tensor) -> torch.Tensor:  # |d| <= 1
        return ((a_coef + 2) * d - (a_coef + 3)) * d * d + 1

    def far(d: torch.Tensor) -> torch.Tensor:  # 1 < |d| < 2
        return ((a_coef * d - 5 * a_coef) * d + 8 * a_coef) * d - 4 * a_coef

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _resize_axis(x: torch.Tensor, ax: int, out_len: int, scale: float, a: dict[str, Any],
                 roi: tuple[float, float]) -> torch.Tensor:
    in_len = x.shape[ax]
    mode = _str(a, "mode", "nearest")
    ctm = _str(a, "coordinate_transformation_mode", "half_pixel")
    coords = _source_coords(ctm, out_len, in_len, scale, roi)
    shape = [1] * x.dim()
    shape[ax] = out_len
    outside = (coords < 0) | (coords > in_len - 1) if ctm == "tf_crop_and_resize" else None
    if mode == "nearest":
        idx = _NEAREST[_str(a, "nearest_mode", "round_prefer_floor")](coords).clamp(0, in_len - 1).long()
        y = torch.index_select(x, ax, idx)
    elif mode == "linear":
        c = coords.clamp(0, in_len - 1)
        lo = torch.floor(c).long().clamp(0, in_len - 1)
        hi = (lo + 1).clamp(max=in_len - 1)
        w_hi = (c - lo).to(x.dtype).reshape(shape)
        y = torch.index_select(x, ax, lo) * (1 - w_hi) + torch.index_select(x, ax, hi) * w_hi
    elif mode == "cubic":
        base = torch.floor(coords)
        weights = _cubic_weights(coords - base, float(a.get("cubic_coeff_a", -0.75)))
        taps = [(base + off).long() for off in (-1, 0, 1, 2)]
        if a.get("exclude_outside", 0):
            weights = [torch.where((t >= 0) & (t < in_len), w, torch.zeros_like(w)) for t, w in zip(taps, weights)]
            total = sum(weights)
            weights = [w / total for w in weights]
        y = sum(torch.index_select(x, ax, t.clamp(0, in_len - 1)) * w.to(x.dtype).reshape(shape)
                for t, w in zip(taps, weights))
    else:
        raise ValueError(f"Resize mode {mode!r} is not an ONNX mode")
    if outside is not None and bool(outside.any()):
        fill = torch.full((), float(a.get("extrapolation_value", 0.0)), dtype=y.dtype)
        y = torch.where(outside.reshape(shape), fill, y)
    return y


@_op("Resize", "Upsample")
def resize(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    """ONNX Resize (opset 11+; Upsample is the same with scales only): nearest / linear / cubic, every
    coordinate transformation and nearest-rounding mode, per axis (n-linear = linear along each axis)."""
    x = inputs[0]
    if a.get("antialias", 0):
        raise ValueError("Resize with antialias=1 is not implemented")
    if len(inputs) == 2:  # Upsample(X, scales), or Resize-10(X, scales)
        roi_t, scales_t, sizes_t = None, _opt(inputs, 1), None
    else:
        roi_t, scales_t, sizes_t = _opt(inputs, 1), _opt(inputs, 2), _opt(inputs, 3)
    if scales_t is None and "scales" in a:
        scales_t = torch.tensor(a["scales"])
    rank = x.dim()
    axes = [_axis(ax, rank) for ax in a.get("axes", range(rank))]
    if sizes_t is not None:
        sizes = _ints(sizes_t)
        scales = [float(np.float32(sizes[i]) / np.float32(x.shape[ax])) for i, ax in enumerate(axes)]
        policy = _str(a, "keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            s = pick(scales)
            scales = [s] * len(axes)
            # ONNX rounds half away from zero here
            sizes = [int(math.floor(s * x.shape[ax] + 0.5)) for ax in axes]
    else:
        scales = [float(v) for v in scales_t.reshape(-1).tolist()]
        sizes = [int(math.floor(x.shape[ax] * s)) for ax, s in zip(axes, scales)]
    roi = [float(v) for v in roi_t.reshape(-1).tolist()] if roi_t is not None else None
    out = x
    for i, ax in enumerate(axes):
        if sizes[i] == x.shape[ax] and scales[i] == 1.0:  # onnxruntime leaves such an axis as it is
            continue
        r = (roi[i], roi[i + len(axes)]) if roi is not None and len(roi) == 2 * len(axes) else (0.0, 1.0)
        out = _resize_axis(out, ax, sizes[i], scales[i], a, r)
    return [out]


# ------------------------------------------------------------------------------- ConvTranspose
def conv_transpose_pads(x_shape: Sequence[int], w_shape: Sequence[int], a: dict[str, Any]
                        ) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """(strides, dilations, pads [begin..., end...], output_padding, output spatial size) of a ConvTranspose."""
    spatial = len(x_shape) - 2
    kernel = list(a.get("kernel_shape") or w_shape[2:])
    strides = list(a.get("strides") or [1] * spatial)
    dilations = list(a.get("dilations") or [1] * spatial)
    out_pad = list(a.get("output_padding") or [0] * spatial)
    pads = list(a.get("pads") or [0] * (2 * spatial))
    auto_pad = _auto_pad(a)
    out_shape = a.get("output_shape")
    if out_shape is not None:
        out_shape = list(out_shape)[-spatial:]
    if out_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * spatial)
        for i in range(spatial):
            full = strides[i] * (x_shape[2 + i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1
            target = out_shape[i] if out_shape is not None else x_shape[2 + i] * strides[i]
            total = max(full - target, 0)
            if auto_pad == "SAME_UPPER":
                pads[i], pads[i + spatial] = total // 2, total - total // 2
            else:  # SAME_LOWER, or output_shape without auto_pad (onnxruntime's convention)
                pads[i], pads[i + spatial] = total - total // 2, total // 2
    sizes = [strides[i] * (x_shape[2 + i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1
             - pads[i] - pads[i + spatial] for i in range(spatial)]
    return strides, dilations, pads, out_pad, sizes


@_op("ConvTranspose")
def conv_transpose(inputs: list[Any], a: dict[str, Any]) -> list[torch.Tensor]:
    x, w = inputs[0], inputs[1]
    b = _opt(inputs, 2)
    spatial = x.dim() - 2
    strides, dilations, pads, out_pad, sizes = conv_transpose_pads(list(x.shape), list(w.shape), a)
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
    y = fn(x, w, None, stride=strides, padding=0, groups=a.get("group", 1), dilation=dilations)
    if any(out_pad):  # extra rows/columns at the end (they get only the bias)
        tail: list[int] = []
        for i in reversed(range(spatial)):
            tail += [0, out_pad[i]]
        y = F.pad(y, tail)
    index: list[Any] = [slice(None), slice(None)]
    for i in range(spatial):
        index.append(slice(pads[i], pads[i] + sizes[i]))
    y = y[tuple(index)]
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * spatial))
    return [y]


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
