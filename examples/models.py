"""AnalogNets-like CNNs for the built-in examples, and their ONNX export.

All three models are plain Conv -> BatchNorm -> ReLU stacks with regular (not depthwise) convolutions,
which map densely onto a crossbar, then global average pooling and one fully connected layer.

* :func:`kws_net`: keyword spotting, input ``[B, 1, 49, 10]`` MFCC, 12 classes, 180,932 parameters.
* :func:`vww_net`: visual-wake-words-like, input ``[B, 1, 64, 64]`` grey, 2 classes, 220,922 parameters.
* :func:`mnist_net`: MNIST, input ``[B, 1, 28, 28]`` in [0, 1], 10 classes, < 100 K parameters.

Parameter counts above are after BatchNorm folding (conv weights + one bias per output channel + fc), as
the crossbar holds them; in torch the models carry BatchNorm's scale and shift instead of the conv bias
(``count_parameters(model)`` = folded count + number of BatchNorm channels).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "KWS_INPUT_SHAPE",
    "MNIST_INPUT_SHAPE",
    "VWW_INPUT_SHAPE",
    "CimNet",
    "ConvBnRelu",
    "count_parameters",
    "export_onnx",
    "kws_net",
    "mnist_net",
    "vww_net",
]

logger = logging.getLogger(__name__)

KWS_INPUT_SHAPE = (1, 49, 10)
VWW_INPUT_SHAPE = (1, 64, 64)
MNIST_INPUT_SHAPE = (1, 28, 28)


class ConvBnRelu(nn.Sequential):
    """Conv2d (no bias: BatchNorm's shift replaces it) -> BatchNorm2d -> ReLU."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
    ):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class CimNet(nn.Module):
    """Conv blocks -> global average pool -> (dropout) -> fully connected classifier."""

    def __init__(self, blocks: list[ConvBnRelu], n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        c_last = blocks[-1][0].out_channels
        self.fc = nn.Linear(c_last, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.fc(self.dropout(x))


def kws_net(n_classes: int = 12, dropout: float = 0.0) -> CimNet:
    """Keyword spotting: conv1 (10x4, stride 2) -> 24x5 maps, six 3x3 convs, GAP, fc 72 -> 12."""
    blocks = [ConvBnRelu(1, 56, (10, 4), stride=(2, 2), padding=(4, 1))]
    blocks += [ConvBnRelu(56, 56) for _ in range(5)]
    blocks.append(ConvBnRelu(56, 72))
    return CimNet(blocks, n_classes, dropout)


def vww_net(n_classes: int = 2, dropout: float = 0.0) -> CimNet:
    """Visual wake words (grey 64x64): nine 3x3 convs down to 4x4 maps, GAP, fc 88 -> 2."""
    blocks = [
        ConvBnRelu(1, 24, stride=2),  # 32x32
        ConvBnRelu(24, 48, stride=2),  # 16x16
        ConvBnRelu(48, 56),
        ConvBnRelu(56, 56, stride=2),  # 8x8
        ConvBnRelu(56, 56),
        ConvBnRelu(56, 56, stride=2),  # 4x4
        ConvBnRelu(56, 56),
        ConvBnRelu(56, 56),
        ConvBnRelu(56, 88),
    ]
    return CimNet(blocks, n_classes, dropout)


def mnist_net(n_classes: int = 10, dropout: float = 0.0) -> CimNet:
    """MNIST: five 3x3 convs (28 -> 14 -> 7 maps), GAP, fc 64 -> 10."""
    blocks = [
        ConvBnRelu(1, 16),
        ConvBnRelu(16, 32, stride=2),  # 14x14
        ConvBnRelu(32, 48),
        ConvBnRelu(48, 64, stride=2),  # 7x7
        ConvBnRelu(64, 64),
    ]
    return CimNet(blocks, n_classes, dropout)


def count_parameters(model: nn.Module, folded: bool = False) -> int:
    """Trainable parameters (weights, biases, BatchNorm scale and shift).

    ``folded=True`` counts them as the compiler sees the model after folding BatchNorm into the
    preceding convolution: each BatchNorm's scale and shift become one bias per output channel.
    """
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if folded:
        total -= sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    return total


def _legacy_export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    # PRESERVE with the model in eval mode keeps BatchNormalization nodes (EVAL would fuse them into Conv,
    # and folding is the compiler's job); the TorchScript exporter writes opset 17 directly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
        )


def _inline_identities(path: Path) -> None:
    """Replace Identity nodes fed by an initializer with a copy of that initializer.

    The TorchScript exporter deduplicates equal initializers (e.g. untrained BatchNorm's running_var and
    weight, both ones) and reconnects them through Identity nodes; downstream passes want constants.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            array = numpy_helper.to_array(inits[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(array.copy(), name=node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    onnx.save(model, str(path))


def export_onnx(
    model: nn.Module, path: str | Path, input_shape: tuple[int, ...], check_batch: int = 4, seed: int = 0
) -> Path:
    """Export ``model`` (eval mode, BatchNorm kept) to ONNX opset 17 with a dynamic batch axis.

    ``input_shape`` excludes the batch axis. The file is checked with ``onnx.checker`` and run with
    onnxruntime on a random batch; its logits must match torch within a relative error of 1e-5.
    """
    import onnx
    import onnxruntime as ort

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    example = torch.randn((check_batch, *input_shape), generator=torch.Generator().manual_seed(seed))
    try:
        _legacy_export(model, example, out)
        _inline_identities(out)
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        with torch.no_grad():
            expected = model(example).numpy()
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": example.numpy()})[0]
    finally:
        model.train(was_training)
    rel_err = float(np.abs(got - expected).max() / (np.abs(expected).max() + 1e-12))
    if not rel_err < 1e-5:
        raise AssertionError(f"onnxruntime disagrees with torch on {out}: relative error {rel_err:.2e}")
    logger.info("exported %s (rel. error vs torch %.1e)", out, rel_err)
    return out
