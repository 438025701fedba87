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
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from cimc.errors import UnsupportedOpError
from cimc.ir import analog_matrix, classify, constant_array, is_analog, layer_of, node_attrs
from cimc.ops import OPS, _conv_padding

__all__ = ["AnalogHook", "AnalogStep", "DirectHook", "Executor", "InputHook", "run_model"]

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

    def add_bias(self, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is None:
            return y
        if self.op_type == "Conv":
            return y + bias.reshape(1, -1, *([1] * (y.dim() - 2)))
        return y + bias * self.bias_scale


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
# convolution over instances); None falls back to the unrolled path. The executor adds the bias.
DirectHook = Callable[[AnalogStep, torch.Tensor], "torch.Tensor | None"]


@dataclass
class _Step:
    fn: Callable[..., list[torch.Tensor]]
    node: ir.Node
    inputs: list[str | None]
    outputs: list[str]
    attrs: dict[str, Any]
    analog: AnalogStep | None


def _batch_leading_reshape(node: ir.Node) -> bool:
    """True when a Reshape keeps the batch (dim 0) in front and its target has the compiled batch baked in.

    Shapes are fixed at import (batch 1 by default) and folded into Reshape targets; the executor still runs
    any batch size, so such a target's first entry follows the input's batch at run time.
    """
    x_shape = node.inputs[0].shape
    target = constant_array(node.inputs[1])
    if x_shape is None or target is None or target.ndim != 1 or len(target) == 0:
        return False
    batch = x_shape[0]
    return isinstance(batch, int) and int(target[0]) == batch


def _key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


class Executor(torch.nn.Module):
    """Runs an onnx-ir model in torch, float32, batched.

    Analog weights and biases are ``nn.Parameter`` s (so fine-tuning can train them); other constants are
    buffers. ``hook`` — when set — computes every analog op's matrix-vector products.
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
            if name in param_names:
                self.params[key] = torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
            else:
                self.register_buffer(key, tensor, persistent=False)
        for node in graph:
            attrs = node_attrs(node)
            attrs["_num_outputs"] = len(node.outputs)
            if node.op_type == "Reshape":
                attrs["_batch_leading"] = _batch_leading_reshape(node)
            step = _Step(
                fn=OPS[node.op_type],
                node=node,
                inputs=[None if v is None else v.name for v in node.inputs],
                outputs=[v.name for v in node.outputs],
                attrs=attrs,
                analog=self._analog_step(node, attrs) if is_analog(node) else None,
            )
            if step.analog is not None:
                self.analog_steps.append(step.analog)
            self.steps.append(step)

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

    def _run_analog(self, step: _Step, x: torch.Tensor) -> torch.Tensor:
        a = step.analog
        assert a is not None and self.hook is not None
        weight = self.weight(a)
        if self.input_hook is not None:
            x = self.input_hook(a, x)
        if self.direct_hook is not None:
            y_direct = self.direct_hook(a, x)
            if y_direct is not None:
                return a.add_bias(y_direct, self.bias(a))
        cols, layout = a.to_columns(x, weight.shape)
        y = self.hook(a, cols, a.matrix(weight))
        return a.add_bias(a.from_columns(y, layout), self.bias(a))

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs))
        for name, key in self._const_keys.items():
            env[name] = self.params[key] if key in self.params else getattr(self, key)
        for step in self.steps:
            if step.analog is not None and self.hook is not None:
                outs = [self._run_analog(step, env[step.inputs[step.analog.weight_input ^ 1 if step.analog.op_type == "MatMul" else 0]])]
            else:
                args = [None if n is None or n == "" else env[n] for n in step.inputs]
                if step.attrs.get("_batch_leading") and args[0].shape[0] != int(args[1][0]):
                    args[1] = torch.cat([torch.tensor([args[0].shape[0]]), args[1][1:]])
                outs = step.fn(args, step.attrs)
            for name, value in zip(step.outputs, outs):
                if name:
                    env[name] = value
        return [env[n] for n in self.output_names]

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
