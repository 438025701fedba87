"""The one numeric engine: a torch executor over the onnx-ir graph.

* With no analog hook it runs every op natively (``F.conv2d``…) and matches onnxruntime on the original
  model (the golden reference; tests hold it to a relative L2 error of 1e-5).
* With an analog hook, every analog op (Conv, Gemm, MatMul with a constant weight) is lowered to its
  crossbar form: the input is unrolled into matrix-vector-product operands (``columns``: [batch, mvms,
  groups, K]), the hook computes the [batch, mvms, groups, N] results however the hardware would (DAC,
  noisy conductances, ADC per tile, drift compensation), and the executor adds the bias digitally and folds
  the results back into the op's output layout. Fine-tuning and simulation both run through here.

Monte Carlo instances ride in the batch dimension: digital ops do not care, and a hook that knows the
instance count reshapes ``[instances·batch, …]`` to ``[instances, batch·…]``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from cimc.errors import DataError, ModelError, UnsupportedOpError
from cimc.ir import analog_matrix, classify, constant_array, is_analog, layer_of, node_attrs, static_shape
from cimc.ops import OPS, _auto_pad, _conv_padding, _same_pads

__all__ = ["AnalogHook", "AnalogStep", "DirectHook", "Executor", "InputHook", "channels_last", "conv_nd", "run_model"]

logger = logging.getLogger(__name__)


@dataclass
class AnalogStep:
    """One analog op as the executor sees it (shapes fixed at build time)."""

    index: int  # position among the analog ops, in execution order
    name: str
    op_type: str
    rows: int  # K per group
    cols: int  # N per group
    groups: int
    weight_key: str
    bias_key: str | None
    alpha: float = 1.0  # Gemm's alpha, applied to the weight matrix
    bias_scale: float = 1.0  # Gemm's beta
    attrs: dict[str, Any] = field(default_factory=dict)
    weight_input: int = 1  # MatMul: 0 when the constant is the left operand
    layer: str = ""  # the crossbar block it reads (mapped models; several uses of one weight share one)

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The op's weight tensor as [groups, K, N] crossbar matrices (differentiable)."""
        if self.op_type == "Conv":
            per_group = weight.reshape(self.groups, weight.shape[0] // self.groups, -1)
            return per_group.transpose(1, 2) * self.alpha
        if self.op_type == "Gemm":
            mat = weight.transpose(0, 1) if self.attrs.get("transB", 0) else weight
            return (mat * self.alpha).unsqueeze(0)
        mat = weight if self.weight_input == 1 else weight.transpose(0, 1)
        return mat.unsqueeze(0)

    # -- lowering to matrix-vector products ------------------------------------------------------------
    def to_columns(self, x: torch.Tensor, weight_shape: Sequence[int]) -> tuple[torch.Tensor, Any]:
        """Unroll the op's input into MVM operands [batch, mvms, groups, K]; returns (columns, layout)."""
        if self.op_type == "Conv":
            spatial = x.dim() - 2
            if spatial == 1:
                x = x.unsqueeze(2)
            kernel = list(weight_shape[2:])
            if spatial == 1:
                kernel = [1] + kernel
            fake_w = torch.empty(1, 1, *kernel)
            attrs = dict(self.attrs)
            if spatial == 1:
                attrs = _lift_1d_attrs(attrs)
            x, strides, dilations = _conv_padding(x, fake_w, attrs)
            b = x.shape[0]
            out_h = (x.shape[2] - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1
            out_w = (x.shape[3] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
            if dilations == [1, 1]:
                # A strided view [B, C, out_h, out_w, kh, kw] and one copy: far faster than F.unfold on CPU.
                patches = x.unfold(2, kernel[0], strides[0]).unfold(3, kernel[1], strides[1])
                cols = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, out_h * out_w, self.groups, self.rows)
            else:
                cols = F.unfold(x, kernel, dilation=dilations, stride=strides)  # [B, C·kh·kw, L]
                cols = cols.reshape(b, self.groups, self.rows, out_h * out_w).permute(0, 3, 1, 2)
            return cols, ("conv", spatial, out_h, out_w)
        if self.op_type == "Gemm":
            if self.attrs.get("transA", 0):
                x = x.transpose(0, 1)
            return x.reshape(x.shape[0], 1, 1, self.rows), ("gemm",)
        if self.weight_input == 1:  # x @ W
            lead = x.shape[:-1]
            return x.reshape(-1, 1, 1, self.rows), ("matmul_right", lead)
        xt = x.transpose(-1, -2)  # W @ x: each column of x is an MVM
        lead = xt.shape[:-1]
        return xt.reshape(-1, 1, 1, self.rows), ("matmul_left", lead)

    def from_columns(self, y: torch.Tensor, layout: Any) -> torch.Tensor:
        """Fold [batch, mvms, groups, N] results back into the op's output layout."""
        kind = layout[0]
        if kind == "conv":
            _, spatial, out_h, out_w = layout
            b = y.shape[0]
            out = y.reshape(b, out_h * out_w, self.groups * self.cols).transpose(1, 2)
            out = out.reshape(b, self.groups * self.cols, out_h, out_w)
            return out.squeeze(2) if spatial == 1 else out
        if kind == "gemm":
            return y.reshape(y.shape[0], self.cols)
        if kind == "matmul_right":
            return y.reshape(*layout[1], self.cols)
        out = y.reshape(*layout[1], self.cols)
        return out.transpose(-1, -2)

    def add_bias(self, y: torch.Tensor, bias: torch.Tensor | None, fresh: bool = False) -> torch.Tensor:
        """``y`` plus the bias (digital). ``fresh``: ``y`` is a new tensor nothing else holds, so at inference the
        bias is added in place (the same numbers, one pass and no new buffer)."""
        if bias is None:
            return y
        b = bias.reshape(1, -1, *([1] * (y.dim() - 2))) if self.op_type == "Conv" else bias * self.bias_scale
        if fresh and not torch.is_grad_enabled():
            return y.add_(b)
        return y + b


def _lift_1d_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Express a 1-D convolution's attributes as a 2-D one with a height of 1."""
    out = dict(attrs)
    if attrs.get("strides"):
        out["strides"] = [1, *attrs["strides"]]
    if attrs.get("dilations"):
        out["dilations"] = [1, *attrs["dilations"]]
    if attrs.get("pads"):
        p = attrs["pads"]
        out["pads"] = [0, p[0], 0, p[1]]
    return out


# hook(step, columns [batch, mvms, groups, K], matrix [groups, K, N]) -> [batch, mvms, groups, N]
AnalogHook = Callable[[AnalogStep, torch.Tensor, torch.Tensor], torch.Tensor]
# input_hook(step, x) -> x: elementwise work on an analog op's input before it is unrolled (the DAC), done
# once per input element instead of once per MVM operand (a 3x3 conv would repeat it 9 times).
InputHook = Callable[[AnalogStep, torch.Tensor], torch.Tensor]
# direct_hook(step, x) -> y or None: computes a whole analog op without unrolling it (e.g. a grouped
# convolution over instances); None falls back to the unrolled path. The executor adds the bias (in place at
# inference: y must be a new tensor that nothing else holds).
DirectHook = Callable[[AnalogStep, torch.Tensor], "torch.Tensor | None"]


# Ops whose output is always a fresh tensor (never a view of, nor the same object as, an input): a later op
# may overwrite such an output in place once nothing else reads it.
_FRESH_OUTPUT_OPS = frozenset({
    "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Sum", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip",
    "HardSwish", "HardSigmoid", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat",
    "Softmax", "LRN", "Elu", "Exp", "Sqrt", "Neg", "Abs",
})
# In-place variants (op type -> torch method); which operand is overwritten is chosen at build time.
_INPLACE = {"Relu": "relu_", "Add": "add_", "Sum": "add_", "Mul": "mul_", "Sub": "sub_", "Sigmoid": "sigmoid_",
            "Tanh": "tanh_"}


@dataclass
class _Step:
    """One node, resolved at build time: input and output slots in the value table, a ready-to-call function.

    ``run(args)`` returns the node's outputs (a list). ``inplace`` is the operand the step may overwrite when
    no gradient is recorded (its last reader, a fresh tensor of the output's shape); ``free`` lists the slots
    whose last reader this step is (released afterwards, so large activations do not pile up).
    """

    fn: Callable[..., list[torch.Tensor]]
    node: ir.Node
    inputs: list[str | None]
    outputs: list[str]
    attrs: dict[str, Any]
    analog: AnalogStep | None
    in_slots: list[int | None] = field(default_factory=list)
    out_slots: list[int] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    run: Callable[[list[Any]], list[torch.Tensor]] | None = None
    inplace: int | None = None  # operand index that may be overwritten (inference only)
    inplace_after_analog: bool = False  # that operand comes from an analog op: only when no hook is set
    inplace_run: Callable[[list[Any]], list[torch.Tensor]] | None = None
    x_input: int = 0  # which input an analog step's activation is


def _batch_leading_reshape(node: ir.Node) -> bool:
    """True when a Reshape keeps the batch (dim 0) in front and its target has the compiled batch baked in.

    Shapes are fixed at import (batch 1 by default); shape arithmetic that follows the batch stays live
    (passes/canonicalize.py), but a model whose graph inputs had a fixed batch may hold constant targets with
    it: such a target's first entry follows the input's batch at run time. Not when the first entry differs
    from the compiled batch (a sequence-first ``[T, -1, E]``), nor for a target the canonicaliser marked as
    the model's own fixed batch (``cimc.fixed_batch``: onnxruntime refuses other batches there too).
    """
    x_shape = node.inputs[0].shape
    target = constant_array(node.inputs[1])
    if x_shape is None or target is None or target.ndim != 1 or len(target) == 0:
        return False
    if node.metadata_props.get("cimc.fixed_batch"):
        return False
    graph = node.graph
    first = graph.inputs[0].shape if graph is not None and graph.inputs else None
    compiled = first[0] if first is not None and len(first) and isinstance(first[0], int) else x_shape[0]
    batch = x_shape[0]
    return isinstance(batch, int) and int(target[0]) == batch == compiled


def _key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


_CL = torch.channels_last


def _symmetric(pads: Sequence[int], spatial: int) -> bool:
    return list(pads[:spatial]) == list(pads[spatial:])


def _explicit_pads(node: ir.Node, attrs: dict[str, Any], kernel: Sequence[int],
                   dilations: Sequence[int]) -> list[int] | None:
    """The ONNX pads [begin..., end...] of a Conv/pool, resolving auto_pad with the static input shape."""
    spatial = len(kernel)
    mode = _auto_pad(attrs)
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        shape = static_shape(node.inputs[0])
        if shape is None:
            return None
        strides = attrs.get("strides") or [1] * spatial
        return _same_pads(torch.empty(0, 0, *shape[2:]), kernel, strides, dilations, mode)
    if mode == "VALID":
        return [0] * (2 * spatial)
    return list(attrs.get("pads") or [0] * (2 * spatial))


def _torch_pads(pads: Sequence[int], spatial: int) -> list[int]:
    out: list[int] = []
    for i in reversed(range(spatial)):  # torch pads the last dimension first
        out += [pads[i], pads[i + spatial]]
    return out


def _conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, strides: Sequence[int], padding: Sequence[int],
            dilations: Sequence[int], group: int) -> torch.Tensor:
    """``F.conv2d`` on a channels-last input, except for single-channel inputs (a first layer on an image or a
    spectrogram): oneDNN has no fast kernel for one input channel (64 MNIST digits through a 1→16 3x3 layer
    took 37 ms, against 0.6 ms with im2col + GEMM, measured), so those run as ATen's im2col convolution. Its
    output is channels-first, as oneDNN's is for such inputs (the simulator's output noise is drawn in the
    output's memory order, so the layout is kept); :func:`channels_last` it before pooling."""
    if group == 1 and w.shape[1] == 1 and list(dilations) == [1, 1]:
        return torch.ops.aten._slow_conv2d_forward(x.contiguous(), w, list(w.shape[2:]), b, list(strides), list(padding))
    return F.conv2d(x.contiguous(memory_format=_CL), w, b, strides, padding, dilations, group)


def channels_last(y: torch.Tensor) -> torch.Tensor:
    """A 4-D activation in channels-last order (copied only if it is not): pooling and the next convolution run
    many times faster on it (a 2x2 max-pool of 64x16x28x28 took 29 ms channels-first, 0.6 ms channels-last)."""
    return y.contiguous(memory_format=_CL) if y.dim() == 4 else y


def conv_nd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, attrs: dict[str, Any]) -> torch.Tensor:
    """An ONNX Conv on tensors (attributes as :func:`cimc.ir.node_attrs` gives them), 2-D ones channels-last
    with symmetric padding passed to the convolution instead of a padded copy of the input."""
    spatial = x.dim() - 2
    if spatial != 2:
        return OPS["Conv"]([x, w, b], attrs)[0]
    kernel = list(w.shape[2:])
    strides = list(attrs.get("strides") or [1, 1])
    dilations = list(attrs.get("dilations") or [1, 1])
    mode = _auto_pad(attrs)
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(x, kernel, strides, dilations, mode)
    else:
        pads = [0] * 4 if mode == "VALID" else list(attrs.get("pads") or [0] * 4)
    if _symmetric(pads, 2):
        return _conv2d(x, w, b, strides, pads[:2], dilations, int(attrs.get("group", 1)))
    return _conv2d(F.pad(x.contiguous(memory_format=_CL), _torch_pads(pads, 2)), w, b, strides, [0, 0], dilations,
                   int(attrs.get("group", 1)))


def _fast_conv(node: ir.Node, attrs: dict[str, Any]) -> Callable[[list[Any]], list[torch.Tensor]] | None:
    """Conv with everything but the tensors decided now: padding folded into the call when symmetric, 2-D
    activations in channels-last order (oneDNN's native layout: no reorder per call, and a depthwise or grouped
    convolution is one kernel call instead of one per group)."""
    w = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if w is None or len(w.shape) not in (3, 4):
        return None
    kernel = list(w.shape[2:])
    spatial = len(kernel)
    strides = list(attrs.get("strides") or [1] * spatial)
    dilations = list(attrs.get("dilations") or [1] * spatial)
    group = int(attrs.get("group", 1))
    pads = _explicit_pads(node, attrs, kernel, dilations)
    if pads is None:
        return None
    padding = pads[:spatial] if _symmetric(pads, spatial) else [0] * spatial
    pre_pad = None if _symmetric(pads, spatial) else _torch_pads(pads, spatial)
    if spatial == 2:
        def run2(args: list[Any]) -> list[torch.Tensor]:
            x = args[0].contiguous(memory_format=_CL)
            if pre_pad is not None:
                x = F.pad(x, pre_pad)
            return [channels_last(_conv2d(x, args[1], args[2] if len(args) > 2 else None, strides, padding, dilations,
                                          group))]

        return run2

    def run1(args: list[Any]) -> list[torch.Tensor]:
        x = args[0]
        if pre_pad is not None:
            x = F.pad(x, pre_pad)
        return [F.conv1d(x, args[1], args[2] if len(args) > 2 else None, strides, padding, dilations, group)]

    return run1


def _fast_pool(node: ir.Node, attrs: dict[str, Any]) -> Callable[[list[Any]], list[torch.Tensor]] | None:
    """MaxPool / AveragePool with torch's own (symmetric) padding, decided now."""
    kernel = list(attrs.get("kernel_shape") or [])
    spatial = len(kernel)
    if spatial != 2 or len(node.outputs) > 1:
        return None
    strides = list(attrs.get("strides") or [1] * spatial)
    dilations = list(attrs.get("dilations") or [1] * spatial)
    pads = _explicit_pads(node, attrs, kernel, dilations)
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    if pads is None or not _symmetric(pads, spatial) or any(p > k // 2 for p, k in zip(pads, kernel)) or ceil_mode:
        return None
    padding = pads[:spatial]
    if node.op_type == "MaxPool":
        return lambda args: [F.max_pool2d(args[0], kernel, strides, padding, dilations)]
    if dilations != [1, 1]:
        return None
    include = bool(attrs.get("count_include_pad", 0))
    return lambda args: [F.avg_pool2d(args[0], kernel, strides, padding, count_include_pad=include)]


def _fast_gemm(node: ir.Node, attrs: dict[str, Any]) -> Callable[[list[Any]], list[torch.Tensor]] | None:
    """Gemm as ``F.linear`` (one addmm) when it is a plain fully connected layer."""
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is not None and (c.shape is None or len(c.shape) > 1):
        return None
    if attrs.get("transB", 0):
        return lambda args: [F.linear(args[0], args[1], args[2] if len(args) > 2 else None)]
    return lambda args: [torch.addmm(args[2], args[0], args[1]) if len(args) > 2 and args[2] is not None
                         else torch.mm(args[0], args[1])]


def _fast_reshape(node: ir.Node, attrs: dict[str, Any]) -> Callable[[list[Any]], list[torch.Tensor]] | None:
    """Reshape to a constant target: the target list is built once; a baked-in batch follows the input's."""
    target = constant_array(node.inputs[1])
    if target is None or target.ndim != 1:
        return None
    shape = [int(v) for v in target]
    allowzero = bool(attrs.get("allowzero", 0))
    zeros = [] if allowzero else [i for i, s in enumerate(shape) if s == 0]
    batch_leading = _batch_leading_reshape(node)

    def run(args: list[Any]) -> list[torch.Tensor]:
        x = args[0]
        if not zeros and not batch_leading:
            return [x.reshape(shape)]
        dims = list(shape)
        for i in zeros:
            dims[i] = x.shape[i]
        if batch_leading:
            dims[0] = x.shape[0]
        return [x.reshape(dims)]

    return run


def _fast_flatten(node: ir.Node, attrs: dict[str, Any]) -> Callable[[list[Any]], list[torch.Tensor]] | None:
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if rank is None:
        return None
    axis = attrs.get("axis", 1)
    axis = axis + rank if axis < 0 else axis
    if axis == 1:
        return lambda args: [args[0].reshape(args[0].shape[0], -1)]
    return None


def _fast_concat(node: ir.Node, attrs: dict[str, Any]) -> Callable[[list[Any]], list[torch.Tensor]] | None:
    if any(v is None or v.shape is None or len(v.shape) == 1 for v in node.inputs):
        return None  # empty 1-D operands need the generic op's filtering
    axis = attrs["axis"]
    return lambda args: [torch.cat(args, axis)]


def _is_hard_swish_sigmoid(attrs: dict[str, Any]) -> bool:
    """HardSigmoid with α = 1/6 and β = ½ (torch's hardsigmoid), to float32 precision."""
    return abs(float(attrs.get("alpha", 0.2)) - 1 / 6) < 1e-6 and float(attrs.get("beta", 0.5)) == 0.5


def _fast_hard_sigmoid(node: ir.Node, attrs: dict[str, Any]) -> Callable[[list[Any]], list[torch.Tensor]] | None:
    return (lambda args: [F.hardsigmoid(args[0])]) if _is_hard_swish_sigmoid(attrs) else None


_FAST = {
    "Conv": _fast_conv,
    "MaxPool": _fast_pool,
    "AveragePool": _fast_pool,
    "Gemm": _fast_gemm,
    "Reshape": _fast_reshape,
    "Flatten": _fast_flatten,
    "Concat": _fast_concat,
    "Relu": lambda node, attrs: lambda args: [torch.relu(args[0])],
    "Add": lambda node, attrs: lambda args: [torch.add(args[0], args[1])],
    "Mul": lambda node, attrs: lambda args: [torch.mul(args[0], args[1])],
    "Sum": lambda node, attrs: (lambda args: [torch.add(args[0], args[1])]) if len(node.inputs) == 2 else None,
    "HardSigmoid": _fast_hard_sigmoid,
    "HardSwish": lambda node, attrs: lambda args: [F.hardswish(args[0])],
    "GlobalAveragePool": lambda node, attrs: (
        (lambda args: [F.adaptive_avg_pool2d(args[0], 1)]) if node.inputs[0].shape is not None
        and len(node.inputs[0].shape) == 4 else None
    ),
}


def _generic(fn: Callable[..., list[torch.Tensor]], attrs: dict[str, Any]) -> Callable[[list[Any]], list[torch.Tensor]]:
    return lambda args: fn(args, attrs)


def _fresh(node: ir.Node) -> bool:
    """True when the node's output is always a newly allocated tensor."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in _FRESH_OUTPUT_OPS:
        return False
    return node.op_type != "Sum" or len(node.inputs) >= 2


def _same_static_shape(a: ir.Value | None, b: ir.Value) -> bool:
    sa, sb = static_shape(a), static_shape(b)
    return sa is not None and sa == sb and a is not None and a.dtype == b.dtype


class Executor(torch.nn.Module):
    """Runs an onnx-ir model in torch, float32, batched.

    Analog weights and biases are ``nn.Parameter`` s (so fine-tuning can train them); other constants are
    buffers. ``hook`` — when set — computes every analog op's matrix-vector products.

    Everything that does not depend on the tensors is decided once, here: each node's input and output slots
    in a flat value table (no name lookups per op), its attributes parsed into a ready-to-call function
    (padding, Reshape targets), which values die after which step, and which ops may write into a dying
    input (only when no gradient is being recorded). 2-D convolutions run channels-last.
    """

    def __init__(self, model: ir.Model, hook: AnalogHook | None = None, input_hook: InputHook | None = None):
        super().__init__()
        unsupported = [(c.name, c.op_type, c.reason) for c in classify(model) if c.kind == "unsupported"]
        if unsupported:
            raise UnsupportedOpError(unsupported)
        self.model = model
        self.hook = hook
        self.input_hook = input_hook
        self.direct_hook: DirectHook | None = None
        graph = model.graph
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        self.params = torch.nn.ParameterDict()
        self._const_keys: dict[str, str] = {}
        self.steps: list[_Step] = []
        self.analog_steps: list[AnalogStep] = []
        param_names = self._analog_param_names(graph)
        conv2d_weights = {n.inputs[1].name for n in graph if n.op_type == "Conv" and n.domain in ("", "ai.onnx")
                          and len(n.inputs) > 1 and n.inputs[1] is not None and len(n.inputs[1].shape or ()) == 4}
        for name, value in graph.initializers.items():
            arr = constant_array(value)
            if arr is None:
                continue
            tensor = torch.from_numpy(np.array(arr))
            if tensor.is_floating_point():
                tensor = tensor.float()
            key = _key(name)
            while key in self._const_keys.values() or hasattr(self, key):  # e.g. a tensor named 'half' or 'eval'
                key += "_"
            self._const_keys[name] = key
            if name in conv2d_weights:
                # oneDNN's layout for channels-last activations: converted once here, not on every call.
                tensor = tensor.contiguous(memory_format=_CL)
            if name in param_names:
                self.params[key] = torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
            else:
                self.register_buffer(key, tensor, persistent=False)
        self._build_plan(graph)

    # -- build -----------------------------------------------------------------------------------------
    def _build_plan(self, graph: ir.Graph) -> None:
        slots: dict[str, int] = {}

        def slot(name: str) -> int:
            if name not in slots:
                slots[name] = len(slots)
            return slots[name]

        self._input_slots = [slot(n) for n in self.input_names]
        self._const_slots = [(slot(name), key, key in self.params) for name, key in self._const_keys.items()]
        producers: dict[str, _Step] = {}
        for node in graph:
            attrs = node_attrs(node)
            attrs["_num_outputs"] = len(node.outputs)
            if node.op_type == "Reshape":
                attrs["_batch_leading"] = _batch_leading_reshape(node)
            analog = self._analog_step(node, attrs) if is_analog(node) else None
            fast = _FAST.get(node.op_type)
            run = fast(node, attrs) if fast is not None and node.domain in ("", "ai.onnx") else None
            step = _Step(
                fn=OPS[node.op_type],
                node=node,
                inputs=[None if v is None else v.name for v in node.inputs],
                outputs=[v.name for v in node.outputs],
                attrs=attrs,
                analog=analog,
                in_slots=[None if v is None or v.name == "" else slot(v.name) for v in node.inputs],
                out_slots=[slot(v.name) if v.name else -1 for v in node.outputs],
                run=run or _generic(OPS[node.op_type], attrs),
            )
            if analog is not None:
                step.x_input = analog.weight_input ^ 1 if analog.op_type == "MatMul" else 0
                self.analog_steps.append(analog)
            self.steps.append(step)
            for v in node.outputs:
                producers[v.name] = step
        self._fuse_hard_swish()
        self._num_slots = len(slots)
        self._output_slots = [slots[n] for n in self.output_names]
        # Liveness: the last step that reads each slot; graph outputs and inputs are never released.
        keep = set(self._output_slots) | set(self._input_slots)
        last: dict[int, int] = {}
        for i, step in enumerate(self.steps):
            for s in step.in_slots:
                if s is not None:
                    last[s] = i
        for s, i in last.items():
            if s not in keep and s not in {c[0] for c in self._const_slots}:
                self.steps[i].free.append(s)
        # In-place candidates: a fresh operand of the output's shape and dtype, read by this step only (once).
        for i, step in enumerate(self.steps):
            method = _INPLACE.get(step.node.op_type)
            if method is None or step.node.domain not in ("", "ai.onnx") or len(step.node.outputs) != 1:
                continue
            if step.node.op_type == "Sum" and len(step.node.inputs) != 2:
                continue
            out = step.node.outputs[0]
            order = [0] if step.node.op_type in ("Relu", "Sigmoid", "Tanh", "Sub") else [0, 1]
            for idx in order:
                v = step.node.inputs[idx]
                src = producers.get(v.name) if v is not None else None
                if src is None or not _fresh(src.node) or step.in_slots[idx] not in step.free:
                    continue
                # One reader only: then no other value can be a view of (or the same tensor as) this one.
                if len(v.uses()) != 1 or not _same_static_shape(v, out):
                    continue
                step.inplace = idx
                step.inplace_after_analog = src.analog is not None
                step.inplace_run = self._inplace_fn(method, idx)
                break

    def _fuse_hard_swish(self) -> None:
        """``Mul(x, HardSigmoid(x))`` with HardSigmoid's default-hardswish constants (α = 1/6, β = ½) — how
        exporters write hardswish before opset 14 — runs as one ``F.hardswish`` (one pass over x, not four)."""
        drop: set[int] = set()
        for step in self.steps:
            node = step.node
            if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            for xi in (0, 1):
                x, hs = node.inputs[xi], node.inputs[1 - xi]
                producer = hs.producer() if hs is not None else None
                if producer is None or producer.op_type != "HardSigmoid" or producer.inputs[0] is not x:
                    continue
                if len(hs.uses()) != 1 or hs.is_graph_output() or not _is_hard_swish_sigmoid(node_attrs(producer)):
                    continue
                drop.add(id(producer))
                step.run = lambda args, xi=xi: [F.hardswish(args[xi])]
                step.in_slots[1 - xi] = None  # the HardSigmoid's output is never computed
                break
        self.steps = [s for s in self.steps if id(s.node) not in drop]

    @staticmethod
    def _inplace_fn(method: str, idx: int) -> Callable[[list[Any]], list[torch.Tensor]]:
        if method in ("relu_", "sigmoid_", "tanh_"):
            return lambda args: [getattr(args[0], method)()]
        other = 1 - idx
        return lambda args: [getattr(args[idx], method)(args[other])]

    @staticmethod
    def _analog_param_names(graph: ir.Graph) -> set[str]:
        names: set[str] = set()
        for node in graph:
            if is_analog(node):
                names.update(v.name for v in node.inputs[1:] if v is not None and v.const_value is not None)
                if node.op_type == "MatMul":
                    names.update(v.name for v in node.inputs if v is not None and v.const_value is not None)
        return names

    def _analog_step(self, node: ir.Node, attrs: dict[str, Any]) -> AnalogStep:
        m = analog_matrix(node)
        bias_value = node.inputs[2] if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 else None
        bias_key = self._const_keys.get(bias_value.name) if bias_value is not None else None
        weight_value = node.inputs[m.weight_input if node.op_type == "MatMul" else 1]
        return AnalogStep(
            index=len(self.analog_steps),
            name=m.node,
            op_type=node.op_type,
            rows=m.rows,
            cols=m.cols,
            groups=m.groups,
            weight_key=self._const_keys[weight_value.name],
            bias_key=bias_key,
            alpha=float(attrs.get("alpha", 1.0)),
            bias_scale=float(attrs.get("beta", 1.0)),
            attrs=attrs,
            weight_input=m.weight_input,
            layer=layer_of(node),
        )

    # -- access ----------------------------------------------------------------------------------------
    def const(self, name_or_key: str) -> torch.Tensor:
        """A constant (parameter or buffer) by its ONNX name or its module key."""
        key = self._const_keys.get(name_or_key, name_or_key)
        if key in self.params:
            return self.params[key]
        return getattr(self, key)

    def weight(self, step: AnalogStep) -> torch.Tensor:
        return self.params[step.weight_key]

    def bias(self, step: AnalogStep) -> torch.Tensor | None:
        if step.bias_key is None:
            return None
        return self.const(step.bias_key)

    # -- run -------------------------------------------------------------------------------------------
    def _run_analog(self, step: _Step, x: torch.Tensor) -> torch.Tensor:
        a = step.analog
        assert a is not None and self.hook is not None
        weight = self.weight(a)
        if self.input_hook is not None:
            x = self.input_hook(a, x)
        if self.direct_hook is not None:
            y_direct = self.direct_hook(a, x)
            if y_direct is not None:  # a direct hook returns a new tensor (DirectHook's contract)
                return a.add_bias(y_direct, self.bias(a), fresh=True)
        cols, layout = a.to_columns(x, weight.shape)
        y = self.hook(a, cols, a.matrix(weight))
        return a.add_bias(a.from_columns(y, layout), self.bias(a))

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if len(inputs) != len(self._input_slots):
            self._input_count_error(len(inputs))
        vals: list[Any] = [None] * self._num_slots
        for s, x in zip(self._input_slots, inputs):
            vals[s] = x
        params, buffers = self.params._parameters, self._buffers
        for s, key, is_param in self._const_slots:
            vals[s] = params[key] if is_param else buffers[key]
        hooked = self.hook is not None
        # Writing into a dying operand is safe only when autograd does not need it.
        inplace_ok = not torch.is_grad_enabled()
        for step in self.steps:
            args = [None if s is None else vals[s] for s in step.in_slots]
            try:
                if hooked and step.analog is not None:
                    outs = [self._run_analog(step, args[step.x_input])]
                elif inplace_ok and step.inplace_run is not None and not (hooked and step.inplace_after_analog):
                    outs = step.inplace_run(args)
                else:
                    outs = step.run(args)  # type: ignore[misc]
            except (RuntimeError, IndexError, ValueError) as exc:
                self._batch_error(step, inputs, exc)
                raise
            for s, value in zip(step.out_slots, outs):
                if s >= 0:
                    vals[s] = value
            for s in step.free:
                vals[s] = None
        return [vals[s].contiguous() if isinstance(vals[s], torch.Tensor) else vals[s] for s in self._output_slots]

    def _input_count_error(self, given: int) -> None:
        """Calibration, simulation, diagnosis and fine-tuning feed one array of samples; a model with more
        inputs needs the others fixed at compile time (or ``cimc run``, which takes one array per input)."""
        names = self.input_names
        if given < len(names):
            rest = ", ".join(f"--input-value {n}=VALUE|FILE.npy" for n in names[given:])
            raise DataError(
                f"the model has {len(names)} inputs ({', '.join(names)}) but this command feeds its data to "
                f"'{names[0]}' only: freeze the others when compiling ({rest}; e.g. a zero initial state), or run "
                "one chip on every input with 'cimc run DIR --input X.npz' (one array per input name)"
            )
        raise DataError(f"the model has {len(names)} input(s) ({', '.join(names)}) but {given} were given")

    def _batch_error(self, step: _Step, inputs: Sequence[torch.Tensor], exc: Exception) -> None:
        """An op that fails only because the batch differs from the compiled one is the model's doing.

        cimc runs many samples (and Monte Carlo instances) in the first axis; a model that pins that axis
        (an Expand, Tile or Reshape to a constant leading size) cannot be batched. Say so in one line.
        """
        shape = self.model.graph.inputs[0].shape if self.model.graph.inputs else None
        compiled = shape[0] if shape is not None and len(shape) and isinstance(shape[0], int) else None
        got = inputs[0].shape[0] if inputs and inputs[0].dim() else None
        if compiled is None or got is None or got == compiled or "alloc" in str(exc).lower():
            return
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(
            f"node '{step.node.name}' ({step.node.op_type}) fails on a batch of {got} ({first}): the model fixes "
            f"its first axis to {compiled}, so cimc cannot run several samples or chip instances at once; re-export "
            "it with the batch as the first axis throughout"
        ) from exc

    def write_back(self) -> None:
        """Copy the (trained) parameters back into the onnx-ir model's initializers."""
        for name, value in self.model.graph.initializers.items():
            key = self._const_keys.get(name)
            if key in self.params:
                arr = self.params[key].detach().cpu().numpy().astype(np.float32)
                value.const_value = ir.tensor(arr, name=name)


def run_model(model: ir.Model, inputs: Sequence[np.ndarray], batch_size: int = 256) -> list[np.ndarray]:
    """Run the model on numpy inputs (first axis = samples) in batches, with ideal devices."""
    executor = Executor(model).eval()
    n = inputs[0].shape[0]
    chunks: list[list[np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = [torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])) for x in inputs]
            chunks.append([o.numpy() for o in executor(*batch)])
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]
