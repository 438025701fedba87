"""Models written by nobody for cimc, end to end, as a user would run them.

* a plain PyTorch MNIST-style CNN whose Linear 1568→64 is taller than AON-CIM's 1024 rows (row-split over
  tiles): compile with calibration, simulate 25 chips from 1 s to 1 y, fine-tune;
* an openWakeWord-style model: a mel front end as Conv1d over raw audio of dynamic length, a CNN embedding
  and Gemm heads, compiled with the audio length fixed on the command line, ``run`` = onnxruntime;
* a Silero-VAD-style model: Conv1d front end, LSTM with state inputs, an ``If`` on a sample-rate input,
  compiled with the sample rate frozen, ``run`` = onnxruntime on every output.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import cimc
from cimc.data import Dataset
from tests.models import rel_l2, run_ort


class MnistCnn(nn.Module):
    """conv 16 → conv 32 → Linear 1568→64 → Linear 64→10, BatchNorm, MaxPool (the shape users report)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.f1, self.f2 = nn.Linear(1568, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        return self.f2(torch.relu(self.f1(x.flatten(1))))


class WakeWordLike(nn.Module):
    """Raw audio → |STFT-like Conv1d| → mel (1x1 Conv1d) → log → CNN embedding → Gemm heads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stft = nn.Conv1d(1, 32, 64, stride=32, bias=False)
        self.mel = nn.Conv1d(32, 16, 1, bias=False)
        with torch.no_grad():
            self.mel.weight.abs_()  # a mel filterbank is non-negative (and the log stays defined)
        self.emb = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 16, 3, padding=1), nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d((1, 1)))
        self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        spec = torch.log(self.mel(self.stft(audio.unsqueeze(1)).abs()) + 1e-3)  # [B, 16, frames]
        return self.head(self.emb(spec.unsqueeze(1)).flatten(1))


def _export(module: nn.Module, args: tuple, path: Path, names: list[str], outputs: list[str],
            dynamic: dict[str, dict[int, str]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, path, input_names=names, output_names=outputs, dynamic_axes=dynamic,
                          opset_version=17, dynamo=False)
    return path


def test_cnn_with_a_layer_taller_than_the_array_simulates_and_finetunes(tmp_path: Path) -> None:
    path = _export(MnistCnn(), (torch.randn(1, 1, 28, 28),), tmp_path / "cnn.onnx", ["x"], ["logits"],
                   {"x": {0: "batch"}})
    rng = np.random.default_rng(0)
    data = Dataset(rng.random((24, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 24).astype(np.int64), "rand")
    compiled = cimc.compile(path, "aon-cim", calibration=data)
    fc1 = next(n for n in compiled.model.graph if n.op_type == "Gemm" and "1568" in n.metadata_props["cimc.matrix"])
    assert len(cimc.passes.mapping.placements_of(fc1)) > 1  # row-split over tiles
    result = cimc.simulate(compiled, data, drift="1s,1h,24h,30d,1y", instances=25)
    points = result.data["series"][0]["points"]
    assert [p["label"] for p in points] == ["1s", "1h", "1d", "30d", "1y"]
    assert all(len(p["per_instance"]) == 25 for p in points)
    tuned, history = cimc.finetune(path, "aon-cim", data, data, epochs=1, batch_size=8)
    assert history["history"] and history["method"] == "pcm+qat"


def test_wake_word_style_model_with_dynamic_audio_length(tmp_path: Path, run_cli) -> None:
    path = _export(WakeWordLike(), (torch.randn(1, 1600),), tmp_path / "ww.onnx", ["audio"], ["score"],
                   {"audio": {0: "batch", 1: "samples"}, "score": {0: "batch"}})
    res = run_cli("compile", path, "--target", "ideal", "-o", tmp_path / "b0", "-q")
    assert res.code == 2 and "--input-shape audio=1,samples" in res.err
    res = run_cli("compile", path, "--target", "ideal", "--input-shape", "audio=1,1600", "-o", tmp_path / "b", "-q")
    assert res.code == 0, res.err
    audio = np.random.default_rng(5).normal(0, 0.1, (4, 1600)).astype(np.float32)
    ours = cimc.run(tmp_path / "b", audio)
    ref = np.concatenate([run_ort(path, {"audio": audio[i : i + 1]})[0] for i in range(len(audio))])
    assert rel_l2(ours, ref) < 1e-5
    report = cimc.inspect(path, input_shapes={"audio": [1, 1600]})
    assert report.totals["analog_nodes"] == 6  # stft, mel, 2 convs, 2 Gemms


def _silero_like(path: Path) -> Path:
    """Conv1d front end and LSTM (state in, state out) inside both branches of an If on the sample rate."""
    torch.manual_seed(2)

    class Branch(nn.Module):
        def __init__(self, stride: int) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 16, 2 * stride, stride=stride)
            self.lstm = nn.LSTM(16, 16)
            self.out = nn.Conv1d(16, 1, 1)

        def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
            f = torch.relu(self.conv(x.unsqueeze(1))).mean(-1)  # [B, 16]
            y, (h2, c2) = self.lstm(f.unsqueeze(0), (h, c))
            return torch.sigmoid(self.out(y[0].unsqueeze(-1))).squeeze(-1), h2, c2

    def graph_of(branch: nn.Module, name: str) -> onnx.GraphProto:
        p = path.with_name(f"{name}.onnx")
        _export(branch, (torch.randn(1, 256), torch.zeros(1, 1, 16), torch.zeros(1, 1, 16)), p, ["x", "h", "c"],
                ["p", "hn", "cn"], {"x": {0: "batch"}, "h": {1: "batch"}, "c": {1: "batch"}})
        g = onnx.load(p).graph
        body = helper.make_graph(list(g.node), name, [], list(g.output), initializer=list(g.initializer))
        for node in body.node:  # the branch reads the outer graph's x, h, c; keep its own names unique
            node.name = f"{name}/{node.name}"
        return body

    then_b, else_b = graph_of(Branch(16), "sr16k"), graph_of(Branch(8), "sr8k")
    # Make every intermediate name unique across the two branches (ONNX scoping rule).
    for g, prefix in ((then_b, "a_"), (else_b, "b_")):
        rename = {}
        for node in g.node:
            for i, o in enumerate(node.output):
                if o not in ("p", "hn", "cn"):
                    rename[o] = prefix + o
                    node.output[i] = prefix + o
        for init in g.initializer:
            rename[init.name] = prefix + init.name
            init.name = prefix + init.name
        for node in g.node:
            for i, x in enumerate(node.input):
                node.input[i] = rename.get(x, x)
        for out in g.output:
            out.name = {"p": "p", "hn": "hn", "cn": "cn"}[out.name]
    for g, prefix in ((then_b, "a_"), (else_b, "b_")):
        for node in g.node:
            for i, o in enumerate(node.output):
                if o in ("p", "hn", "cn"):
                    node.output[i] = prefix + o
        for out in g.output:
            out.name = prefix + out.name
    nodes = [helper.make_node("Equal", ["sr", "k16"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["prob", "hn", "cn"], then_branch=then_b, else_branch=else_b)]
    graph = helper.make_graph(
        nodes, "silero_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "samples"]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, []),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "batch", 16]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, "batch", 16])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, "batch", 16]),
         helper.make_tensor_value_info("cn", TensorProto.FLOAT, [1, "batch", 16])],
        initializer=[numpy_helper.from_array(np.array(16000, np.int64), "k16")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("sr", [16000, 8000])
def test_silero_vad_style_model_runs_end_to_end(tmp_path: Path, run_cli, sr: int) -> None:
    path = _silero_like(tmp_path / "vad.onnx")
    out = tmp_path / "b"
    res = run_cli("compile", path, "--target", "ideal", "--input-shape", "x=1,256", "--input-value", f"sr={sr}",
                  "-o", out, "-q")
    assert res.code == 0, res.err
    rng = np.random.default_rng(6)
    feeds = {"x": rng.normal(0, 0.1, (1, 256)).astype(np.float32), "h": rng.normal(0, 0.5, (1, 1, 16)).astype(np.float32),
             "c": rng.normal(0, 0.5, (1, 1, 16)).astype(np.float32)}
    np.savez(tmp_path / "in.npz", **feeds)
    assert run_cli("run", out, "--input", tmp_path / "in.npz", "-o", tmp_path / "y.npz").code == 0
    ref = run_ort(path, {**feeds, "sr": np.array(sr, np.int64)})
    with np.load(tmp_path / "y.npz") as y:
        for name, expected in zip(("prob", "hn", "cn"), ref):
            assert rel_l2(y[name], expected) < 1e-5, name
    # On the chip: the LSTM's products are analog layers
    compiled = cimc.compile(path, "aon-cim", input_shapes={"x": [1, 256]}, input_values={"sr": sr})
    assert sum(1 for n in compiled.model.graph if "cimc.placement" in n.metadata_props) >= 3
    y_chip = cimc.run(compiled, feeds, time="24h", all_outputs=True)
    assert all(np.isfinite(v).all() for v in y_chip.values())
