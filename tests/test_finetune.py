"""Noise-aware fine-tuning: the pass, the adversarial attack, clipping, determinism, errors and the CLI.

Everything runs on a tiny CNN over scikit-learn's 8x8 digits (a few hundred samples, one epoch), so the
whole file takes seconds.
"""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from models import export_onnx, run_ort
from torch import nn

import cimc
from cimc.data import Dataset, save_dataset
from cimc.errors import DataError, InputError
from cimc.ir import constant_array, is_analog
from cimc.passes.finetune import FinetunePass, finetune, parse_method, save_finetuned
from cimc.pipeline import CompileContext, parse_pipeline
from cimc.runtime.executor import Executor
from cimc.runtime.training import NoiseHook, _kl, adversarial_kl, attack_parameters, clip_weights
from cimc.targets import resolve_target

FAST = {"val_instances": 1, "val_samples": 100, "batch_size": 32, "keep": "tuned"}


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    return Dataset(x[:400], d.target[:400].astype(np.int64), "digits")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, digits: Dataset) -> Path:
    """TinyNet trained for a few quick epochs on the digits, exported to ONNX (BatchNorm kept)."""
    torch.manual_seed(0)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.from_numpy(digits.x), torch.from_numpy(digits.y)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    export_onnx(net, torch.zeros(1, 1, 8, 8), path)
    return path


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {n.inputs[1].name: np.array(constant_array(n.inputs[1])) for n in model.graph if is_analog(n)}


def test_pass_changes_weights_and_onnxruntime_runs(tiny_model: Path, digits: Dataset, tmp_path: Path) -> None:
    before = _weights(cimc.load(tiny_model))
    tuned, history = finetune(tiny_model, "aon-cim", digits, method="noise+qat+clip", epochs=1, select="last", **FAST)
    after = _weights(tuned)
    assert before.keys() == after.keys()
    assert all(not np.allclose(before[k], after[k]) for k in before)
    assert not any(n.op_type == "BatchNormalization" for n in tuned.graph)  # folded before training
    assert [h["epoch"] for h in history["history"]] == [0, 1]
    out = save_finetuned(tuned, tmp_path / "tuned.onnx")
    onnx.checker.check_model(onnx.load(out))
    name = tuned.graph.inputs[0].name  # the batch is fixed at 1 by the import
    logits = np.concatenate([run_ort(out, {name: digits.x[i : i + 1]})[0] for i in range(40)])
    assert logits.shape == (40, 10) and np.isfinite(logits).all()
    assert (logits.argmax(1) == digits.y[:40]).mean() > 0.5  # still a digit classifier


def test_best_epoch_keeps_the_input_when_nothing_improves(tiny_model: Path, digits: Dataset) -> None:
    # A learning rate this large wrecks the model in one epoch: selection must fall back to epoch 0.
    tuned, history = finetune(tiny_model, "aon-cim", digits, method="noise", epochs=1, lr=5.0, **FAST)
    assert history["best_epoch"] == 0
    before = _weights(cimc.load(tiny_model))
    after = _weights(tuned)
    assert all(np.allclose(before[k], after[k]) for k in before)


def test_adversarial_attack_stays_in_the_relative_bound_and_increases_kl(tiny_model: Path, digits: Dataset) -> None:
    executor = Executor(cimc.load(tiny_model), hook=NoiseHook())
    keys = [s.weight_key for s in executor.analog_steps]
    x = torch.from_numpy(digits.x[:64])
    p_log = F.log_softmax(executor(x)[0], dim=-1).detach()
    zeta = 0.1
    gen = torch.Generator().manual_seed(0)
    delta = attack_parameters(executor, keys, x, p_log, zeta, steps=5, generator=gen)
    for k in keys:
        theta = executor.params[k].detach()
        theta_star = theta + theta.abs() * delta[k]
        assert bool(((theta_star - theta).abs() <= zeta * theta.abs() + 1e-7).all())
    kl_attacked = float(adversarial_kl(executor, keys, x, p_log, delta).detach())
    random = {k: (torch.rand(executor.params[k].shape, generator=gen) * 2 - 1) * zeta for k in keys}
    kl_random = float(adversarial_kl(executor, keys, x, p_log, random).detach())
    assert kl_attacked > 2 * kl_random > 0


def test_adversarial_gradient_flows_through_theta_star(tiny_model: Path, digits: Dataset) -> None:
    executor = Executor(cimc.load(tiny_model), hook=NoiseHook())
    keys = [s.weight_key for s in executor.analog_steps]
    x = torch.from_numpy(digits.x[:32])
    p_log = F.log_softmax(executor(x)[0], dim=-1)
    delta = {k: torch.full_like(executor.params[k], 0.05) for k in keys}
    adversarial_kl(executor, keys, x, p_log, delta).backward()
    assert all(executor.params[k].grad is not None and executor.params[k].grad.abs().sum() > 0 for k in keys)
    assert float(_kl(p_log.detach(), p_log.detach())) == pytest.approx(0.0, abs=1e-7)


def test_same_seed_same_weights_other_seed_other_weights(tiny_model: Path, digits: Dataset) -> None:
    runs = [finetune(tiny_model, "aon-cim", digits, method="pcm+qat", epochs=1, seed=s, select="last", **FAST)[0]
            for s in (3, 3, 4)]
    w = [_weights(m) for m in runs]
    assert all(np.array_equal(w[0][k], w[1][k]) for k in w[0])
    assert any(not np.array_equal(w[0][k], w[2][k]) for k in w[0])


def test_clip_bounds_weights(tiny_model: Path, digits: Dataset) -> None:
    executor = Executor(cimc.load(tiny_model))
    keys = [s.weight_key for s in executor.analog_steps]
    bounds = {k: 1.5 * float(executor.params[k].detach().std()) for k in keys}
    assert any(float(executor.params[k].detach().abs().max()) > bounds[k] for k in keys)  # work to do
    clip_weights(executor, keys, 1.5)
    assert all(float(executor.params[k].detach().abs().max()) <= bounds[k] + 1e-6 for k in keys)
    tuned, _ = finetune(tiny_model, "aon-cim", digits, method="clip", clip_alpha=1.5, epochs=1, select="last", **FAST)
    ratios = [np.abs(w).max() / w.std() for w in _weights(tuned).values()]
    original = [np.abs(w).max() / w.std() for w in _weights(cimc.load(tiny_model)).values()]
    assert max(ratios) < max(original) and max(ratios) < 3.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "noise+magic"}, "unknown fine-tuning method"),
        ({"method": "noise+pcm"}, "choose one of them"),
        ({"epochs": -1}, "'epochs'"),
        ({"zeta": 2.0}, "'zeta'"),
        ({"dropout": 1.0}, "'dropout'"),
        ({"select": "worst"}, "'select'"),
        ({"learning_rate": 0.1}, "has no option"),
    ],
)
def test_bad_options_give_one_line_errors(tiny_model: Path, digits: Dataset, kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        finetune(tiny_model, "aon-cim", digits, **{"epochs": 1, **kwargs})
    assert "\n" not in str(info.value)


def test_bad_data_and_pipeline_options(tiny_model: Path, digits: Dataset) -> None:
    wrong = Dataset(np.zeros((10, 1, 9, 9), np.float32), np.zeros(10, np.int64), "wrong")
    with pytest.raises(DataError, match="per sample"):
        finetune(tiny_model, "aon-cim", wrong, epochs=1)
    with pytest.raises(DataError, match="method 'ce' needs labels"):
        finetune(tiny_model, "aon-cim", Dataset(digits.x, None, "unlabelled"), method="pcm+ce", epochs=1)
    ctx = CompileContext(target=resolve_target("aon-cim"))
    with pytest.raises(InputError, match="has no option 'bogus'"):
        parse_pipeline("finetune{bogus=1}", ctx)
    with pytest.raises(InputError, match="method"):
        parse_pipeline("finetune{method=sgd}", ctx)
    assert parse_method("qat + PCM") == frozenset({"qat", "pcm"})
    assert isinstance(parse_pipeline("finetune{epochs=2,method=noise+qat}", ctx)[0], FinetunePass)


def test_compile_runs_the_finetune_pass(tiny_model: Path, digits: Dataset) -> None:
    compiled = cimc.compile(
        tiny_model, "aon-cim", training=digits, calibration=digits,
        pipeline="canonicalize,finetune{epochs=1,method=noise,val-instances=1,val-samples=50,select=last},"
        "map,quantize,schedule",
    )
    assert "cimc.finetune" in compiled.model.metadata_props
    assert "finetune{" in compiled.model.metadata_props["cimc.pipeline"]


def test_cli_writes_the_output_atomically(tiny_model: Path, digits: Dataset, tmp_path: Path, run_cli) -> None:
    data = save_dataset(tmp_path / "train.npz", digits.x, digits.y)
    out = tmp_path / "out" / "tuned.onnx"
    out.parent.mkdir()
    out.write_bytes(b"previous")
    refused = run_cli("finetune", tiny_model, "--data", data, "--epochs", "1", "-o", out, "-q")
    assert refused.code == 2 and "not written by cimc" in refused.err  # a file cimc did not write needs --force
    bad = run_cli("finetune", tiny_model, "--data", data, "--method", "bogus", "-o", out, "-q", "--force")
    assert bad.code == 2 and bad.err.count("\n") == 1 and "unknown fine-tuning method" in bad.err
    assert out.read_bytes() == b"previous"  # a failed run leaves the old file alone
    mine = run_cli("finetune", tiny_model, "--data", data, "--epochs", "1", "--method", "noise", "-o", out, "-q")
    assert mine.code == 2 and "was not written by cimc" in mine.err  # not cimc's file: replaced only with --force
    ok = run_cli("finetune", tiny_model, "--data", data, "--epochs", "1", "--method", "noise", "-o", out, "-q",
                 "--force")
    assert ok.code == 0, ok.err
    assert sorted(p.name for p in out.parent.iterdir()) == ["tuned.onnx"]  # no temporary left behind
    onnx.checker.check_model(onnx.load(out))
    compiled = cimc.compile(out, "aon-cim")
    assert compiled.model.graph.inputs[0].shape[1:] == (1, 8, 8)
    not_onnx = run_cli("finetune", tiny_model, "--data", data, "-o", tmp_path / "x.txt", "-q")
    assert not_onnx.code == 2 and ".onnx" in not_onnx.err



def test_direct_convolution_path_equals_the_unrolled_one(tiny_model: Path, digits: Dataset) -> None:
    """Validation and training run convolutions as one grouped convolution over the PCM instances; that path
    must compute what the unrolled crossbar path computes (same draws, DAC, per-tile ADC, GDC)."""
    from cimc.runtime.analog import layer_plans
    from cimc.runtime.devices import build_device

    compiled = cimc.compile(tiny_model, "aon-cim", calibration=digits, dac_bits=4, adc_bits=4)
    executor = Executor(compiled.model)
    hook = NoiseHook(weight_noise="pcm", device=build_device(compiled.target.device), plans=layer_plans(compiled.model))
    x = torch.from_numpy(digits.x[:16]).repeat(3, 1, 1, 1)  # 3 instances, instance-major
    with torch.no_grad(), hook.validation(3, 86400.0, seed=5):
        hook.attach(executor)
        direct = executor(x)[0]
        executor.direct_hook = None
        unrolled = executor(x)[0]
    assert torch.allclose(direct, unrolled, rtol=1e-4, atol=1e-4 * float(unrolled.abs().max()))
    assert not torch.allclose(direct[:16], direct[16:32])  # the instances differ


def test_arrays_override_lets_qat_map_a_model_too_big_for_the_target(tiny_model: Path, digits: Dataset,
                                                                       tmp_path: Path, run_cli) -> None:
    from cimc.targets import load_target, target_yaml

    # One 64x16-weight array: the 128x10 classifier splits into two 64-row tiles that, with the conv, do not fit.
    small = load_target("aon-cim").with_overrides(**{"name": "tiny-array", "array.rows": 64, "array.cols": 32})
    yaml_path = tmp_path / "tiny-array.yaml"
    yaml_path.write_text(target_yaml(small))
    with pytest.raises(InputError, match=r"method 'qat' needs the model mapped.*--arrays 3"):
        finetune(tiny_model, small, digits, method="qat", epochs=1, **FAST)
    model, history = finetune(tiny_model, small, digits, method="qat", epochs=1, arrays=3, **FAST)
    assert history["history"]
    data = save_dataset(tmp_path / "train.npz", digits.x, digits.y)
    res = run_cli("finetune", tiny_model, "--target", yaml_path, "--arrays", "3", "--data", data, "--epochs", "1",
                  "--method", "qat", "-o", tmp_path / "tuned.onnx", "-q")
    assert res.code == 0, res.err


@pytest.mark.parametrize("noise", ["gaussian", "pcm"])
def test_training_noise_is_drawn_once_per_crossbar_block(tmp_path: Path, noise: str) -> None:
    """An unrolled recurrent layer (5 Gemm uses of one weight) reads one set of devices: within a forward pass
    every use sees the same noisy weights; the next pass draws again."""
    from cimc.compiler import compile_model
    from cimc.runtime.devices import build_device
    from models import shared_weight_model

    onnx.save(shared_weight_model("gemm-chain"), tmp_path / "chain.onnx")
    compiled = compile_model(tmp_path / "chain.onnx", "aon-cim")
    executor = Executor(compiled.model)
    hook = NoiseHook(weight_noise=noise, eta=0.1, device=build_device(compiled.target.device),
                     generator=torch.Generator().manual_seed(0))
    hook.attach(executor)
    hook.training = True
    steps = executor.analog_steps
    assert {s.layer for s in steps} == {"W"} and [s.index for s in steps] == list(range(5))
    passes = []
    for _ in range(2):
        passes.append([hook._weights(s, s.matrix(executor.weight(s)))[0].detach() for s in steps])
    for drawn in passes:
        assert all(torch.equal(w, drawn[0]) for w in drawn)
        assert not torch.equal(drawn[0][0], steps[0].matrix(executor.weight(steps[0])).detach())
    assert not torch.equal(passes[0][0], passes[1][0])


def test_two_identical_runs_write_identical_bytes(tiny_model: Path, digits: Dataset, tmp_path: Path, run_cli) -> None:
    """The model records what was done (method, history) but not how long it took."""
    data = save_dataset(tmp_path / "train.npz", digits.x[:200], digits.y[:200])
    outs = []
    for name in ("a.onnx", "b.onnx"):
        res = run_cli("finetune", tiny_model, "--data", data, "--epochs", "1", "--method", "noise", "-o",
                      tmp_path / name, "-q", "--batch-size", "64")
        assert res.code == 0, res.err
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    record = json.loads(onnx.load(tmp_path / "a.onnx").metadata_props[0].value)
    assert "train_time_s" not in record and all("time_s" not in e for e in record["history"])
