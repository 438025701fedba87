"""Small torch models and helpers the tests share: ONNX export, onnxruntime reference runs, tiny graphs.

The builders cover the layer patterns cimc must import and run: BatchNorm after Conv, 1-D audio convs,
MatMul+Add MLPs, grouped and depthwise convs, residual adds, concat, padded pooling and the
``x.view(x.size(0), -1)`` flatten that torch exports as a Shape→Gather→Concat→Reshape chain.
Every builder is seeded, so a test sees the same weights on every run.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import TensorProto, helper, shape_inference
from torch import nn

__all__ = [
    "LIGHT_MODELS",
    "AudioNet1d",
    "CnnBn",
    "GroupedConcatNet",
    "MatMulMlp",
    "MobileNetV3Like",
    "export_onnx",
    "light_model_path",
    "shared_weight_model",
    "light_model_any_batch",
    "make_ir_model",
    "make_onnx_model",
    "randomize_initializers",
    "rel_l2",
    "run_ort",
    "strip_final_softmax",
]

# The real topologies shipped (with placeholder weights) inside onnx's wheel.
LIGHT_MODELS = (
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
)


def light_model_path(name: str) -> Path:
    """Path of ``onnx/backend/test/data/light/light_<name>.onnx`` in the installed onnx package."""
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


def light_model_any_batch(name: str, folder: str | os.PathLike[str]) -> Path:
    """A copy of a light model whose batch dimension is symbolic, written into ``folder``.

    The files fix the batch at 1, also inside Reshape targets (``[1, 2048]``) and the declared value infos; the
    copy sets the input and output batch to ``N``, a Reshape target's leading 1 to 0 (copy the input's batch)
    and drops the intermediate value infos, so the model runs, and imports, at any batch.
    """
    proto = onnx.load(str(light_model_path(name)))
    graph = proto.graph
    for value in [*graph.input, *graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "N"
    del graph.value_info[:]
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        target = node.input[1]
        if target in inits:
            arr = onnx.numpy_helper.to_array(inits[target]).copy()
            if arr.size and arr[0] == 1:
                arr[0] = 0
                inits[target].CopyFrom(onnx.numpy_helper.from_array(arr, target))
        elif target in consts:
            attr = next(a for a in consts[target].attribute if a.name == "value")
            arr = onnx.numpy_helper.to_array(attr.t).copy()
            if arr.size and arr[0] == 1:
                arr[0] = 0
                attr.t.CopyFrom(onnx.numpy_helper.from_array(arr))
    path = Path(folder) / f"light_{name}_any_batch.onnx"
    onnx.save(proto, str(path))
    return path


# ------------------------------------------------------------------------------------------ models
def _randomize_bn(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial running statistics, so folding it is visible in the numbers."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)


class CnnBn(nn.Module):
    """Conv+BN+ReLU stem, a residual block, padded max/avg pooling, view-flatten and a Linear head.

    Input [B, 3, 16, 16] → [B, 10].
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)  # 16 → 8
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool2 = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)  # 8 → 4
        self.fc = nn.Linear(8 * 4 * 4, 10)
        _randomize_bn(self, seed + 1)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.relu(self.bn1(self.conv1(x))))
        y = self.conv3(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(x + y)  # residual add
        x = self.pool2(x)
        return self.fc(x.view(x.size(0), -1))


class AudioNet1d(nn.Module):
    """A keyword-spotting-like 1-D conv net: Conv1d+BN+ReLU+pool, a strided and dilated conv, pooled head.

    Input [B, 10, 49] (MFCC channels × frames) → [B, 12].
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv1d(10, 16, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(16)
        self.pool1 = nn.MaxPool1d(2)  # 49 → 24
        self.conv2 = nn.Conv1d(16, 16, 3, stride=2, padding=1, groups=4)  # 24 → 12
        self.bn2 = nn.BatchNorm1d(16)
        self.conv3 = nn.Conv1d(16, 24, 3, dilation=2, padding=2)
        self.pool2 = nn.AvgPool1d(3, stride=2, padding=1)  # 12 → 6
        self.fc = nn.Linear(24 * 6, 12)
        _randomize_bn(self, seed + 1)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.pool2(torch.relu(self.conv3(x)))
        return self.fc(x.view(x.size(0), -1))


class MatMulMlp(nn.Module):
    """``x @ W + b`` layers written out, so torch exports MatMul+Add rather than Gemm. [B, 20] → [B, 6]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(20, 32, generator=g) / math.sqrt(20))
        self.b1 = nn.Parameter(torch.randn(32, generator=g) * 0.1)
        self.w2 = nn.Parameter(torch.randn(32, 6, generator=g) / math.sqrt(32))
        self.b2 = nn.Parameter(torch.randn(6, generator=g) * 0.1)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2


class GroupedConcatNet(nn.Module):
    """Grouped, depthwise, strided and dilated convs; padded pools on signed data; concat. [B, 8, 12, 12] → [B, 5]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 8, 1)
        self.branch = nn.Conv2d(16, 8, 3, stride=2, padding=2, dilation=2)
        self.fc = nn.Linear(16, 5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.grouped(x))
        a = nn.functional.avg_pool2d(self.pointwise(torch.relu(self.depthwise(x))), 3, 1, 1)  # pads count
        b = nn.functional.max_pool2d(self.branch(x), 3, 1, 1)  # signed input: the padding must be -inf
        x = torch.cat([a, b], dim=1)
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        s = torch.nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(s))))
        return x * s


class _InvertedResidual(nn.Module):
    """MobileNetV3's block: 1×1 expand, depthwise k×k, optional squeeze-excite, 1×1 project (+ residual)."""

    def __init__(self, c_in: int, expand: int, c_out: int, kernel: int, stride: int, se: bool, hswish: bool):
        super().__init__()
        act: type[nn.Module] = nn.Hardswish if hswish else nn.ReLU
        layers: list[nn.Module] = []
        if expand != c_in:
            layers += [nn.Conv2d(c_in, expand, 1, bias=False), nn.BatchNorm2d(expand), act()]
        layers += [
            nn.Conv2d(expand, expand, kernel, stride, kernel // 2, groups=expand, bias=False),
            nn.BatchNorm2d(expand),
            act(),
        ]
        if se:
            layers.append(_SqueezeExcite(expand, max(8, expand // 4)))
        layers += [nn.Conv2d(expand, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV3Like(nn.Module):
    """MobileNetV3-Small's layer table (Howard et al. 2019, table 2): hardswish, depthwise convs, SE blocks."""

    # (kernel, expansion, out channels, squeeze-excite, hardswish, stride)
    BLOCKS = [
        (3, 16, 16, True, False, 2),
        (3, 72, 24, False, False, 2),
        (3, 88, 24, False, False, 1),
        (5, 96, 40, True, True, 2),
        (5, 240, 40, True, True, 1),
        (5, 240, 40, True, True, 1),
        (5, 120, 48, True, True, 1),
        (5, 144, 48, True, True, 1),
        (5, 288, 96, True, True, 2),
        (5, 576, 96, True, True, 1),
        (5, 576, 96, True, True, 1),
    ]

    def __init__(self, classes: int = 1000, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()]
        c = 16
        for k, e, out, se, hs, s in self.BLOCKS:
            layers.append(_InvertedResidual(c, e, out, k, s, se, hs))
            c = out
        layers += [nn.Conv2d(c, 576, 1, bias=False), nn.BatchNorm2d(576), nn.Hardswish()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Linear(1024, classes))
        _randomize_bn(self, seed)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.head(x.flatten(1))


# ------------------------------------------------------------------------------------------ export
def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    opset: int = 13,
    dynamic_batch: bool = False,
) -> Path:
    """Export with torch's TorchScript-based exporter, keeping BatchNorm nodes (not fused by the exporter).

    The input is named ``x`` and the output ``y``; with ``dynamic_batch`` the first input axis is symbolic.
    """
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            opset_version=opset,
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,  # eval-mode BN stays a node: cimc must fold it
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None,
        )
    return path


# ------------------------------------------------------------------------------------------ tiny graphs
def make_onnx_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    outputs: Sequence[str | tuple[str, Sequence[int | str]] | tuple[str, Sequence[int | str], int]],
    initializers: dict[str, np.ndarray] | None = None,
    *,
    opset: int = 13,
    extra_opsets: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """A float32 ONNX model from node protos.

    An output given by name alone gets its type from (lenient) shape inference; give ``(name, shape)`` or
    ``(name, shape, elem_type)`` where inference cannot know it (custom ops).
    """
    declared = [o if isinstance(o, tuple) else (o, None) for o in outputs]
    graph = helper.make_graph(
        list(nodes),
        "test_graph",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs],
        [helper.make_tensor_value_info(o[0], o[2] if len(o) > 2 else TensorProto.FLOAT, o[1]) for o in declared],
        [onnx.numpy_helper.from_array(np.asarray(v), name=k) for k, v in (initializers or {}).items()],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    inferred = shape_inference.infer_shapes(model)  # fills the outputs' shapes; intermediate value_info too
    del inferred.graph.value_info[:]  # keep the file as a user would export it: cimc must infer the rest
    return inferred


def make_ir_model(*args: object, **kwargs: object) -> ir.Model:
    """Like :func:`make_onnx_model`, shape-inferred and converted to onnx-ir (no canonicalisation)."""
    proto = make_onnx_model(*args, **kwargs)  # type: ignore[arg-type]
    return ir.from_proto(shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True))


# ------------------------------------------------------------------------------------------ references
def run_ort(path: str | os.PathLike[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model file with onnxruntime's CPU provider, all graph optimisations off (the plain reference)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def rel_l2(actual: np.ndarray | torch.Tensor, expected: np.ndarray | torch.Tensor) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂ (in float64)."""
    a = np.asarray(actual.detach() if isinstance(actual, torch.Tensor) else actual, dtype=np.float64)
    e = np.asarray(expected.detach() if isinstance(expected, torch.Tensor) else expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def strip_final_softmax(model: ir.Model) -> bool:
    """Make the graph output the logits: a Softmax that produces a graph output is bypassed.

    A trailing Reshape/Flatten after the Softmax (SqueezeNet) is dropped with it. Returns True if changed.
    """
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph = model.graph
    for i, out in enumerate(list(graph.outputs)):
        node = out.producer()
        while node is not None and node.op_type in ("Reshape", "Flatten") and node.inputs[0].producer() is not None:
            node = node.inputs[0].producer()
        if node is None or node.op_type != "Softmax":
            continue
        logits = node.inputs[0]
        graph.outputs[i] = logits
        RemoveUnusedNodesPass()(model)
        return True
    return False


def randomize_initializers(model: ir.Model, seed: int) -> int:
    """Replace every float initializer with seeded random values of the same shape; returns how many.

    Conv/Gemm/MatMul weights are He-scaled (std √(2/fan-in)) so activations keep their size through a deep
    ReLU net; BN scales and variances (and Mul constants, BN written out) are positive; everything else
    (biases, means, Add constants) is small and centred.
    """
    rng = np.random.default_rng(seed)
    count = 0
    for name in sorted(model.graph.initializers):
        value = model.graph.initializers[name]
        if value.const_value is None or not value.const_value.dtype.is_floating_point():
            continue
        shape = tuple(value.const_value.shape.numpy())
        arr = _random_like(value, shape, rng)
        value.const_value = ir.tensor(arr, name=name)
        count += 1
    return count


def _random_like(value: ir.Value, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    uses = [(node.op_type, idx, node) for node, idx in value.uses()]
    op, idx, node = uses[0] if uses else ("", -1, None)
    normal = rng.standard_normal(shape, dtype=np.float32)  # float32 throughout: VGG-19 has 144 M weights
    if op == "Conv" and idx == 1:
        return normal * np.float32(math.sqrt(2.0 / max(1, math.prod(shape[1:]))))
    if op in ("Gemm", "MatMul") and len(shape) == 2 and idx in (0, 1):
        trans_b = node is not None and op == "Gemm" and node.attributes.get_int("transB", 0)
        fan_in = shape[1] if trans_b else shape[0]
        return normal * np.float32(math.sqrt(2.0 / max(1, fan_in)))
    if (op == "BatchNormalization" and idx in (1, 4)) or op in ("Mul", "Div"):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return normal * np.float32(0.1)


# ------------------------------------------------------------------------------------------ shared weights
def shared_weight_model(kind: str, n: int = 16, seed: int = 0) -> onnx.ModelProto:
    """Graphs whose nodes share weight initializers, batch 1, input ``x`` [1, n], output ``y``.

    * ``"two-matmul"``: ``y = relu(x @ W) @ W`` — two MatMuls, one initializer;
    * ``"gemm-chain"``: five ``h = tanh(Gemm(h, W, b_i, transB=1))`` steps (an unrolled recurrent layer: one
      weight, a bias per step);
    * ``"mixed"``: ``W`` read by ``Gemm transB=1`` twice (one block), by a ``MatMul`` (the transposed view: a
      block of its own) and by a ``Gemm`` with ``alpha=2`` (scaled view: a block of its own); ``W`` is not
      symmetric, so no two different views coincide.
    """
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    inits: dict[str, np.ndarray] = {"W": w}
    nodes = []
    if kind == "two-matmul":
        nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm0"),
                 helper.make_node("Relu", ["a"], ["r"], name="relu"),
                 helper.make_node("MatMul", ["r", "W"], ["y"], name="mm1")]
    elif kind == "gemm-chain":
        h = "x"
        for i in range(5):
            inits[f"b{i}"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
            nodes += [helper.make_node("Gemm", [h, "W", f"b{i}"], [f"g{i}"], name=f"step{i}", transB=1),
                      helper.make_node("Tanh", [f"g{i}"], ["y" if i == 4 else f"h{i}"], name=f"tanh{i}")]
            h = f"h{i}"
    elif kind == "mixed":
        nodes = [helper.make_node("Gemm", ["x", "W"], ["a"], name="gemm_t0", transB=1),
                 helper.make_node("Tanh", ["a"], ["a1"], name="t0"),
                 helper.make_node("Gemm", ["a1", "W"], ["b"], name="gemm_t1", transB=1),
                 helper.make_node("Tanh", ["b"], ["b1"], name="t1"),
                 helper.make_node("MatMul", ["b1", "W"], ["c"], name="matmul"),
                 helper.make_node("Tanh", ["c"], ["c1"], name="t2"),
                 helper.make_node("Gemm", ["c1", "W"], ["y"], name="gemm_alpha", transB=1, alpha=2.0)]
    else:
        raise ValueError(kind)
    return make_onnx_model(nodes, [("x", [1, n])], ["y"], inits)
