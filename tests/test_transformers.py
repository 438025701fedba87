"""Transformers as PyTorch's exporters write them: any batch, attention variants, the trained corpus files.

* The batch stays the batch: shape arithmetic that follows the batch (``Shape → Gather → Concat → Reshape`` in
  every attention block) is evaluated at run time, so a model compiled at batch 1 runs at batch 7 and under
  Monte Carlo instances; a model that really fixes its batch keeps the one-line refusal (and onnxruntime
  refuses it too).
* A property test over exporter × batch × attention variant: compile with calibration, ``run`` on ``ideal`` =
  onnxruntime at batch 1 and 7, simulate 2 chips.
* The trained transformers (``tests/data/transformers``, made by ``benchmarks/transformers.py --ship``) equal
  onnxruntime on ``ideal`` at batch 1 and 7; the digits ones compile with calibration and simulate on aon-cim.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper
from torch import nn

import cimc
from cimc.data import Dataset
from cimc.errors import CimcError, ModelError
from cimc.inspection import inspect_model
from tests.models import make_onnx_model, rel_l2, run_ort

DATA = Path(__file__).parent / "data" / "transformers"
SHIPPED = sorted(p for p in DATA.glob("*.onnx") if not p.name.startswith("hf_"))


# ------------------------------------------------------------------------------------------ model builders
class DecomposedLayerNorm(nn.Module):
    """LayerNorm written out (mean, variance, rsqrt): what older exporters and hand-written models produce."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(width))
        self.bias = nn.Parameter(0.1 * torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class Attention(nn.Module):
    """Multi-head self-attention written by hand: products as ``MatMul`` or ``Einsum``, the mask through ``Where``
    (a data-dependent key-padding mask, or causal), softmax on the key axis (-1) or, as some models do for
    their own reasons, on the query axis (-2)."""

    def __init__(self, width: int, heads: int, product: str, mask: str, softmax_axis: int, tokens: int):
        super().__init__()
        self.heads, self.product, self.mask, self.softmax_axis = heads, product, mask, softmax_axis
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.register_buffer("causal", torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), 1))
        self.register_buffer("not_first", torch.arange(tokens) > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape[0], x.shape[1], x.shape[2]
        d = e // self.heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d).transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        if self.product == "einsum":
            scores = torch.einsum("bhtd,bhsd->bhts", q, k)
        else:
            scores = q @ k.transpose(-1, -2)
        scores = scores / math.sqrt(d)
        if self.mask == "causal":
            scores = torch.where(self.causal, torch.tensor(-1e9), scores)
        elif self.mask == "padding":  # keys whose first feature is large are padding; token 0 never is
            pad = (x[:, :, 0] > 0.5) & self.not_first  # [B, T]
            scores = torch.where(pad[:, None, None, :].expand(b, self.heads, t, t), torch.tensor(-1e9), scores)
        weights = scores.softmax(self.softmax_axis)
        ctx = torch.einsum("bhts,bhsd->bhtd", weights, v) if self.product == "einsum" else weights @ v
        return self.out(ctx.transpose(1, 2).reshape(b, t, e))


class MhaAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch_first) with no mask, a causal ``attn_mask`` or a data-dependent
    ``key_padding_mask``."""

    def __init__(self, width: int, heads: int, mask: str, tokens: int):
        super().__init__()
        self.mask = mask
        self.mha = nn.MultiheadAttention(width, heads, batch_first=True)
        self.register_buffer("causal", torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), 1))
        self.register_buffer("not_first", torch.arange(tokens) > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask == "causal":
            return self.mha(x, x, x, attn_mask=self.causal, need_weights=False)[0]
        if self.mask == "padding":
            pad = (x[:, :, 0] > 0.5) & self.not_first
            return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        return self.mha(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """Tokens [B, T, F] → embedding → one pre-norm transformer block → mean over tokens → classes."""

    def __init__(self, *, tokens: int = 6, features: int = 5, width: int = 16, heads: int = 2, attention: str = "mha",
                 mask: str = "none", norm: str = "layernorm", gelu: str = "none", softmax_axis: int = -1):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.norm1 = nn.LayerNorm(width) if norm == "layernorm" else DecomposedLayerNorm(width)
        self.attn = (MhaAttention(width, heads, mask, tokens) if attention == "mha"
                     else Attention(width, heads, attention, mask, softmax_axis, tokens))
        self.norm2 = nn.LayerNorm(width) if norm == "layernorm" else DecomposedLayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(approximate=gelu), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(self.norm1(h))
        h = h + self.ff(self.norm2(h))
        return self.head(h.mean(1))


def export(model: nn.Module, sample: torch.Tensor, path: Path, exporter: str) -> Path:
    """The user's export: legacy with ``dynamic_axes`` on the batch, or dynamo with ``dynamic_shapes``."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(model, (sample,), dynamo=True, input_names=["x"], output_names=["y"],
                                        dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
            program.save(str(path))
        else:
            torch.onnx.export(model, (sample,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    return path


def _inputs(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def _assert_ideal_equals_ort(path: Path, x: np.ndarray) -> None:
    """cimc on ``ideal`` (compiled at batch 1) equals onnxruntime at batch 1 and at batch 7."""
    compiled = cimc.compile(path, "ideal")
    for batch in (1, 7):
        xb = x[:batch]
        (ref,) = run_ort(path, {"x": xb})[:1]
        got = cimc.run(compiled, xb, ideal=True)
        assert got.shape == ref.shape
        assert rel_l2(got, ref) <= 1e-5, (path.name, batch, rel_l2(got, ref))


def _chip_path(path: Path, x: np.ndarray, tmp: Path, target: str = "aon-cim") -> None:
    """Compile with calibration, run one chip at batch 7 (close to float), simulate 2 chips."""
    np.savez(tmp / "calib.npz", x=x[:32])
    compiled = cimc.compile(path, target, calibration=tmp / "calib.npz")
    (ref,) = run_ort(path, {"x": x[:7]})[:1]
    got = cimc.run(compiled, x[:7], time="1h")
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert rel_l2(got, ref) < 0.5
    result = cimc.simulate(compiled, Dataset(x=x[:24], y=None, name="block"), drift="1h", instances=2, batch_size=8)
    assert result is not None


# ------------------------------------------------------------------------------------------ the batch stays
@pytest.mark.parametrize("attention", ["mha", "matmul"])
def test_compiled_at_batch_1_runs_at_batch_7(tmp_path: Path, attention: str) -> None:
    torch.manual_seed(0)
    path = export(Block(attention=attention), torch.rand(2, 6, 5), tmp_path / "block.onnx", "legacy")
    x = _inputs(16, (6, 5))
    _assert_ideal_equals_ort(path, x)


def test_batch_shape_arithmetic_stays_live_and_flatten_folds(tmp_path: Path) -> None:
    """The attention's ``[T, B·H, D]`` reshape keeps a runtime Shape; the batch-free part is folded."""
    torch.manual_seed(0)
    path = export(Block(attention="mha"), torch.rand(2, 6, 5), tmp_path / "block.onnx", "legacy")
    model = cimc.load(path)
    ops = [n.op_type for n in model.graph]
    assert "Shape" in ops  # bsz · heads is computed at run time
    # Every Reshape target that is a constant holds at any batch: no entry equal to the compiled batch 1 in
    # front of a batch-carrying axis (the old folding baked [1, 6, 2, 8]-style targets).
    for node in model.graph:
        if node.op_type == "Reshape" and node.inputs[1].const_value is not None:
            target = node.inputs[1].const_value.numpy().tolist()
            assert not node.metadata_props.get("cimc.fixed_batch"), target


def test_model_that_fixes_its_batch_is_refused_like_onnxruntime(tmp_path: Path) -> None:
    """A constant Reshape to [1, 2, 4] in a model with a dynamic batch: onnxruntime fails at batch 3, and so does
    cimc, with its one-line message; the same model with -1 runs at any batch."""
    def model(first: int) -> Path:
        proto = make_onnx_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                                 helper.make_node("Reshape", ["h", "shape"], ["r"], name="fix"),
                                 helper.make_node("Relu", ["r"], ["y"], name="relu")],
                                [("x", ("N", 8))], [("y", (first if first > 0 else "N", 2, 4))],
                                {"w": np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32),
                                 "shape": np.array([first, 2, 4], dtype=np.int64)})
        path = tmp_path / f"fix{first}.onnx"
        onnx.save(proto, path)
        return path

    fixed, free = model(1), model(-1)
    x = _inputs(3, (8,))
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.Fail):
        run_ort(fixed, {"x": x})
    compiled = cimc.compile(fixed, "ideal")
    # cimc run falls back to the compiled batch, one sample at a time, as onnxruntime would have to be run.
    np.testing.assert_allclose(cimc.run(compiled, x, ideal=True),
                               np.concatenate([run_ort(fixed, {"x": x[i : i + 1]})[0] for i in range(3)]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match="fixes its first axis to 1") as info:
        cimc.simulate(compiled, Dataset(x=x, y=None, name="fixed"), drift="1s", instances=2)
    assert "\n" not in str(info.value)
    np.testing.assert_allclose(cimc.run(cimc.compile(free, "ideal"), x, ideal=True), run_ort(free, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)


def test_qdq_twin_at_the_compiled_batch(tmp_path: Path) -> None:
    """Compiled at batch 7, the quantised twin runs in onnxruntime at batch 7 and agrees with cimc's quantised run
    (ideal devices), and both are close to the float model."""
    torch.manual_seed(0)
    path = export(Block(attention="mha", mask="causal"), torch.rand(2, 6, 5), tmp_path / "block.onnx", "legacy")
    x = _inputs(40, (6, 5))
    np.savez(tmp_path / "calib.npz", x=x[:32])
    compiled = cimc.compile(path, "aon-cim", calibration=tmp_path / "calib.npz", batch=7, out_dir=tmp_path / "build")
    x7 = x[-7:]
    (twin,) = run_ort(tmp_path / "build" / "model.qdq.onnx", {"x": x7})[:1]
    ours = cimc.run(compiled, x7, ideal=True)
    (ref,) = run_ort(path, {"x": x7})[:1]
    assert twin.shape == ours.shape == ref.shape == (7, 3)
    assert rel_l2(ours, twin) < 0.05  # the same quantisation; accumulation order can move a value across a step
    assert rel_l2(twin, ref) < 0.2


def test_cli_compile_with_calibration_and_simulate(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    """The issue's failing commands, as a user types them, on a legacy-exported MHA block."""
    torch.manual_seed(0)
    path = export(Block(attention="mha", mask="padding"), torch.rand(2, 6, 5), tmp_path / "block.onnx", "legacy")
    x = _inputs(64, (6, 5))
    np.savez(tmp_path / "calib.npz", x=x[:32])
    np.savez(tmp_path / "test.npz", x=x, y=np.random.default_rng(0).integers(0, 3, 64))
    out = tmp_path / "build"
    r = run_cli("compile", path, "--target", "aon-cim", "--calib", tmp_path / "calib.npz", "-o", out, "--threads", "1")
    assert r.code == 0, r.err
    r = run_cli("simulate", out, "--data", tmp_path / "test.npz", "--drift", "1s,24h", "--instances", "2",
                "--threads", "1")
    assert r.code == 0, r.err


def test_inspect_says_which_products_are_analog_and_why(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = export(Block(attention="einsum"), torch.rand(2, 6, 5), tmp_path / "block.onnx", "legacy")
    report = inspect_model(cimc.load(path))
    kinds = {(r.op_type, r.kind, r.reason) for r in report.nodes}
    assert any(op in ("Gemm", "MatMul") and kind == "analog" for op, kind, _ in kinds)
    products = [(op, kind, why) for op, kind, why in kinds if op == "Einsum"]
    assert products and all(kind == "digital" and "activations" in why for _, kind, why in products)


# ------------------------------------------------------------------------------------------ property test
VARIANTS = st.fixed_dictionaries({
    "attention": st.sampled_from(["mha", "matmul", "einsum"]),
    "mask": st.sampled_from(["none", "causal", "padding"]),
    "heads": st.sampled_from([1, 2, 4]),
    "width": st.sampled_from([8, 16]),
    "norm": st.sampled_from(["layernorm", "decomposed"]),
    "gelu": st.sampled_from(["none", "tanh"]),
    "softmax_axis": st.sampled_from([-1, -2]),
})


def _property(variant: dict, exporter: str, tmp: Path) -> None:
    if variant["attention"] == "mha":
        variant = {**variant, "softmax_axis": -1}
    torch.manual_seed(0)
    path = export(Block(**variant), torch.rand(2, 6, 5), tmp / f"{exporter}.onnx", exporter)
    x = _inputs(32, (6, 5), seed=1)
    _assert_ideal_equals_ort(path, x)
    _chip_path(path, x, tmp)


@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(variant=VARIANTS)
def test_property_legacy_exporter(tmp_path: Path, variant: dict) -> None:
    _property(variant, "legacy", tmp_path)


@pytest.mark.slow
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(variant=VARIANTS, exporter=st.sampled_from(["legacy", "dynamo"]))
def test_property_both_exporters(tmp_path: Path, variant: dict, exporter: str) -> None:
    _property(variant, exporter, tmp_path)


# ------------------------------------------------------------------------------------------ trained corpus
def _data_for(path: Path) -> np.ndarray:
    """Inputs of the right shape for a shipped model (real data where it is cheap: sklearn's digits)."""
    name = path.stem.split("_")[0]
    if name == "digits":
        from examples.mnist_data import load_digits_8x8

        return load_digits_8x8()[0][:64, 0]
    shape = [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim[1:]]
    return _inputs(32, tuple(shape))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_trained_transformer_equals_onnxruntime_at_batch_1_and_7(path: Path) -> None:
    _assert_ideal_equals_ort(path, _data_for(path))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_trained_digits_transformer_compiles_with_calibration_and_simulates(tmp_path: Path, exporter: str) -> None:
    path = DATA / f"digits_{exporter}.onnx"
    if not path.is_file():
        pytest.skip("run benchmarks/transformers.py --ship tests/data/transformers")
    from examples.mnist_data import load_digits_8x8

    x, y = load_digits_8x8()
    x = x[:, 0]
    np.savez(tmp_path / "calib.npz", x=x[:64])
    compiled = cimc.compile(path, "aon-cim", calibration=tmp_path / "calib.npz")
    result = cimc.simulate(compiled, Dataset(x=x[-200:], y=y[-200:], name="digits"), drift="24h", instances=2, batch_size=100)
    (ref,) = run_ort(path, {"x": x[-200:]})[:1]
    float_acc = float((ref.argmax(1) == y[-200:]).mean())
    acc = result.data["series"][0]["points"][0]["mean"]
    assert float_acc > 0.9
    assert acc > 0.5 * float_acc  # the chip classifies (the table in docs/transformers.md has the numbers)


def test_hugging_face_encoder_any_batch_with_padding_mask() -> None:
    """A tiny random ``BertModel`` (``benchmarks/transformers.py --hf-encoder``, legacy exporter, batch dynamic):
    extended attention mask, Where/Expand mask logic, erf GELU; equal to onnxruntime at batch 1 and 7 with padded
    sequences, every weight product analog and the attention products digital."""
    path = DATA / "hf_tiny_bert.onnx"
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (7, 8)).astype(np.int64)
    mask = np.ones((7, 8), np.int64)
    mask[3:, 6:] = 0  # four padded sequences
    compiled = cimc.compile(path, "ideal")
    for batch in (1, 7):
        feeds = {"input_ids": ids[:batch], "attention_mask": mask[:batch]}
        (ref,) = run_ort(path, feeds)[:1]
        assert rel_l2(cimc.run(compiled, feeds, ideal=True), ref) <= 1e-5
    rows = inspect_model(cimc.load(path)).nodes
    matmuls = [r for r in rows if r.op_type in ("MatMul", "Gemm")]
    assert sum(r.kind == "analog" for r in matmuls) == 2 * 6  # Q, K, V, output, two feed-forward per layer
    assert sum(r.kind == "digital" for r in matmuls) == 2 * 2  # scores and context per layer


def test_errors_are_cimc_errors() -> None:
    assert issubclass(ModelError, CimcError)
