"""Mapping export (``cimc export``) and its verifier (``cimc verify``).

Two compiled models are made once per module: the KWS-like CNN of ``examples/models.py`` on ``aon-cim`` (one
1024x512 crossbar, per-layer scale) and a small CNN + MLP on ``hermes`` with per-column scale (its 2048x300
layer is split into row and column tiles over several cores). Each corruption test copies a good bundle,
breaks one thing, and checks ``verify`` names it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cimc.errors import CimcError
from cimc.export import export_mapping, layer_matrix, matrix_to_weight, verify_bundle
from cimc.ir import weight_to_matrix
from cimc.mapping_schema import MAPPING_FORMAT, mapping_schema

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class _HermesNet(nn.Module):
    """Grouped conv, then a 2048 -> 300 layer: more rows and columns than one 256x256-weight core."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(8 * 16 * 16, 300)
        self.fc2 = nn.Linear(300, 10, bias=False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _compile(onnx_path: Path, target, out_dir: Path) -> Path:
    from cimc.compiler import compile_model

    compile_model(onnx_path, target, out_dir=out_dir)
    return out_dir


@pytest.fixture(scope="module")
def kws_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from examples import models

    tmp = tmp_path_factory.mktemp("kws")
    torch.manual_seed(0)
    net = models.kws_net().eval()
    path = models.export_onnx(net, tmp / "kws.onnx", models.KWS_INPUT_SHAPE)
    return _compile(path, "aon-cim", tmp / "build")


@pytest.fixture(scope="module")
def hermes_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cimc.targets import load_target
    from tests.models import export_onnx

    tmp = tmp_path_factory.mktemp("hermes")
    path = export_onnx(_HermesNet(), torch.zeros(1, 4, 16, 16), tmp / "net.onnx")
    target = load_target("hermes").with_overrides(**{"device.weight_scale": "column"})
    return _compile(path, target, tmp / "build")


@pytest.fixture(scope="module")
def kws_bundle(kws_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_mapping(kws_build, kws_build.parent / "bundle", csv=True)  # beside it: verify finds it by hash


@pytest.fixture(scope="module")
def hermes_bundle(hermes_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_mapping(hermes_build, hermes_build.parent / "bundle")


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _copy(bundle: Path, tmp_path: Path) -> Path:
    """A copy of the bundle, with its compiled model beside it (where verify looks for it by hash)."""
    (tmp_path / "build").symlink_to(bundle.parent / "build", target_is_directory=True)
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def _rewrite(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------------------ good bundles
def test_kws_on_aon_cim_exports_and_verifies(kws_bundle: Path, kws_build: Path):
    report = verify_bundle(kws_bundle)
    assert report.ok, report.problems
    manifest = _manifest(kws_bundle)
    assert manifest["format"] == MAPPING_FORMAT and manifest["target"]["name"] == "aon-cim"
    assert report.layers_checked == len(manifest["layers"]) == 8
    assert report.output_rel_err is not None and report.output_rel_err <= 1e-6
    with np.load(kws_bundle / "array_0.npz") as npz:
        g_us = npz["g_us"]
    assert g_us.dtype == np.float32 and g_us.shape == (1024, 512)
    assert g_us.max() == pytest.approx(25.0)  # each layer's largest |w| sits at g_max
    csv = np.loadtxt(kws_bundle / "array_0.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(csv[:, 1:], g_us, rtol=1e-7)
    assert (csv[:, 0] == np.arange(1024)).all()


def test_devices_hold_the_documented_conductances(kws_bundle: Path, kws_build: Path):
    """Weight (g, r, c) of a layer: G+ at device column 2(col0 + c - src_col0), G- beside it, in µS."""
    from cimc.artifact import CompiledModel

    compiled = CompiledModel.load(kws_build)
    node = next(n for n in compiled.analog_nodes() if n.name == "node_Conv_1")
    w = layer_matrix(node)[0]
    layer = next(lay for lay in _manifest(kws_bundle)["layers"] if lay["name"] == node.name)
    tile = layer["tiles"][0]
    scale = layer["scale"]["us_per_weight_unit"]
    assert scale == pytest.approx(25.0 / np.abs(w).max())
    with np.load(kws_bundle / "array_0.npz") as npz:
        g_us = npz["g_us"].astype(np.float64)
    (r0, r1), (d0, d1) = tile["row_window"], tile["device_col_window"]
    block = g_us[r0:r1, d0:d1]
    np.testing.assert_allclose(block[:, 0::2], np.clip(w, 0, None) * scale, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(block[:, 1::2], np.clip(-w, 0, None) * scale, rtol=1e-6, atol=1e-6)


def test_hermes_per_column_multi_core_exports_and_verifies(hermes_bundle: Path, run_cli):
    manifest = _manifest(hermes_bundle)
    fc1 = next(lay for lay in manifest["layers"] if lay["matrix"]["rows"] == 2048)
    assert fc1["scale"]["granularity"] == "column" and len(fc1["scale"]["us_per_weight_unit"]) == 300
    assert len(fc1["tiles"]) >= 16 and len(fc1["arrays"]) > 1 and fc1["post_processing"]["partial_sums"]
    conv = manifest["layers"][0]
    assert conv["matrix"]["groups"] == 2 and len(conv["scale"]["us_per_weight_unit"]) == 8
    assert len(manifest["arrays"]) > 1 and manifest["schedule"]["execution"] == "pipelined"
    result = run_cli("verify", hermes_bundle)
    assert result.code == 0, result.out + result.err
    assert "OK" in result.out


def test_verify_with_data_file_and_explicit_model(hermes_bundle: Path, hermes_build: Path, tmp_path: Path):
    x = np.random.default_rng(1).uniform(0, 1, (3, 4, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    report = verify_bundle(hermes_bundle, model=hermes_build / "model.onnx", data=tmp_path / "x.npz")
    assert report.ok, report.problems


def test_schema_is_written_and_matches_the_manifest(kws_bundle: Path):
    import jsonschema

    schema = json.loads((kws_bundle / "schema.json").read_text())
    assert schema == mapping_schema()
    jsonschema.Draft202012Validator(schema).validate(_manifest(kws_bundle))


def test_calibrated_converter_ranges_are_exported(kws_build: Path, tmp_path: Path):
    """With ``cimc.quant`` on a node (compiled with --calib), DAC/ADC ranges land in the layer entry."""
    from cimc.artifact import CompiledModel

    compiled = CompiledModel.load(kws_build)
    node = compiled.analog_nodes()[0]
    tiles = json.loads(node.metadata_props["cimc.placement"])
    quant = {
        "dac_bits": 6,
        "dac_signed": False,
        "x_max": 3.5,
        "adc_bits": 6,
        "adc_granularity": "column",
        "y_max": [[1.5] * t["cols"] for t in tiles],
        "percentile": 99.9,
    }
    node.metadata_props["cimc.quant"] = json.dumps(quant)
    bundle = export_mapping(compiled, tmp_path / "bundle")
    layer = _manifest(bundle)["layers"][0]
    assert layer["dac"] == {"bits": 6, "signed": False, "x_max": 3.5, "calibrated": True}
    assert layer["adc"]["y_max"] == quant["y_max"] and layer["adc"]["granularity"] == "column"
    assert layer["gdc"]["probe"]["x_max"] == 3.5
    with np.load(bundle / "gdc.npz") as npz:
        probe = npz["L0_probe"]
    assert len(np.unique(probe)) <= 2**6 and probe.max() <= 3.5  # the probe is what a 6-bit DAC can apply
    assert verify_bundle(bundle, model=compiled).ok


@pytest.mark.parametrize("op", ["conv-grouped", "gemm-transB", "matmul-left"])
def test_matrix_to_weight_inverts_weight_to_matrix(op: str):
    from tests.models import make_ir_model

    rng = np.random.default_rng(0)
    if op == "conv-grouped":
        w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
        model = make_ir_model([_node("Conv", ["x", "w"], group=3)], [("x", [1, 6, 5, 5])], ["y"], {"w": w})
        layout = "conv"
    elif op == "gemm-transB":
        w = rng.standard_normal((4, 7)).astype(np.float32)
        model = make_ir_model([_node("Gemm", ["x", "w"], transB=1)], [("x", [1, 7])], ["y"], {"w": w})
        layout = "gemm-transB"
    else:
        w = rng.standard_normal((4, 7)).astype(np.float32)
        model = make_ir_model([_node("MatMul", ["w", "x"])], [("x", [7, 2])], ["y"], {"w": w})
        layout = "matmul-left"
    node = next(iter(model.graph))
    matrix = weight_to_matrix(node, w)
    np.testing.assert_array_equal(matrix_to_weight(layout, matrix, w.shape), w)


def _node(op: str, inputs: list[str], **attrs):
    from onnx import helper

    return helper.make_node(op, inputs, ["y"], name="n", **attrs)


# ------------------------------------------------------------------------------------------ corrupted bundles
def test_changed_conductance_is_reported_by_layer(kws_bundle: Path, tmp_path: Path, run_cli):
    bundle = _copy(kws_bundle, tmp_path)
    layer = _manifest(bundle)["layers"][2]
    tile = layer["tiles"][0]
    with np.load(bundle / "array_0.npz") as npz:
        g_us = npz["g_us"].copy()
    row, dev = tile["row_window"][0] + 3, tile["device_col_window"][0] + 4
    g_us[row, dev] += 1.0  # one device 1 µS off
    np.savez(bundle / "array_0.npz", g_us=g_us)
    report = verify_bundle(bundle)
    assert not report.ok
    assert any(f"layer '{layer['name']}'" in p and f"row {row}" in p for p in report.problems), report.problems
    result = run_cli("verify", bundle)
    assert result.code == 1 and layer["name"] in result.out


def test_missing_layer_is_reported(kws_bundle: Path, tmp_path: Path):
    bundle = _copy(kws_bundle, tmp_path)
    manifest = _manifest(bundle)
    dropped = manifest["layers"].pop(3)
    _rewrite(bundle, manifest)
    problems = verify_bundle(bundle).problems
    assert any(f"layer '{dropped['name']}'" in p and "missing from the manifest" in p for p in problems), problems


def test_overlapping_windows_are_reported(kws_bundle: Path, tmp_path: Path):
    bundle = _copy(kws_bundle, tmp_path)
    manifest = _manifest(bundle)
    first, last = manifest["layers"][0], manifest["layers"][-1]  # last: the small 72x12 fc layer
    tile = last["tiles"][0]
    r0, c0 = first["tiles"][0]["row_window"][0], first["tiles"][0]["weight_col_window"][0]
    tile["row_window"] = [r0, r0 + tile["rows"]]
    tile["weight_col_window"] = [c0, c0 + tile["cols"]]
    tile["device_col_window"] = [2 * c0, 2 * (c0 + tile["cols"])]
    _rewrite(bundle, manifest)
    problems = verify_bundle(bundle).problems
    assert any(f"layer '{last['name']}'" in p and f"overlaps '{first['name']}'" in p for p in problems), problems


def test_window_that_does_not_match_the_matrix_is_reported(kws_bundle: Path, tmp_path: Path):
    bundle = _copy(kws_bundle, tmp_path)
    manifest = _manifest(bundle)
    layer = manifest["layers"][1]
    tile = layer["tiles"][0]
    tile["rows"] -= 1
    tile["row_window"][1] -= 1
    tile["matrix_row_window"][1] -= 1
    _rewrite(bundle, manifest)
    problems = verify_bundle(bundle).problems
    assert any(f"layer '{layer['name']}'" in p and "exactly once" in p for p in problems), problems


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        (("layers", 0, "scale", "us_per_weight_unit"), -1.0, "layers/0/scale/us_per_weight_unit"),
        (("format",), "something-else", "format"),
        (("layers", 1, "tiles", 0, "row_window"), [5], "layers/1/tiles/0/row_window"),
    ],
)
def test_manifest_breaking_the_schema_is_reported_by_field(kws_bundle, tmp_path, field, value, named, run_cli):
    bundle = _copy(kws_bundle, tmp_path)
    manifest = _manifest(bundle)
    node = manifest
    for key in field[:-1]:
        node = node[key]
    node[field[-1]] = value
    _rewrite(bundle, manifest)
    problems = verify_bundle(bundle).problems
    assert problems and all(p.startswith("manifest: ") for p in problems)
    assert any(p.startswith(f"manifest: {named}:") for p in problems), problems
    assert run_cli("verify", bundle).code == 1


def test_unreadable_bundle_is_a_user_error(tmp_path: Path, run_cli):
    with pytest.raises(CimcError):
        verify_bundle(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    result = run_cli("verify", tmp_path / "bad")
    assert result.code == 2 and "manifest.json" in result.err


def test_export_cli_writes_bundle_atomically(kws_build: Path, tmp_path: Path, run_cli):
    out = tmp_path / "b"
    result = run_cli("export", kws_build, "-o", out)
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == [
        "array_0.npz",
        "biases.npz",
        "gdc.npz",
        "manifest.json",
        "schema.json",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


# ------------------------------------------------------------------------------------------ shared weights
@pytest.fixture(scope="module")
def shared_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The 'mixed' graph on aon-cim with calibration: W shared by two Gemm transB uses (one layer, two users),
    a MatMul and an alpha=2 Gemm reading W in other orientations (layers of their own)."""
    import onnx

    from cimc.compiler import compile_model
    from cimc.data import Dataset
    from tests.models import shared_weight_model

    tmp = tmp_path_factory.mktemp("shared")
    onnx.save(shared_weight_model("mixed"), tmp / "mixed.onnx")
    x = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    compile_model(tmp / "mixed.onnx", "aon-cim", calibration=Dataset(x, None, "calib"), out_dir=tmp / "build")
    return tmp / "build", export_mapping(tmp / "build", tmp / "bundle")


def test_shared_weight_exported_once_with_every_user(shared_bundle: tuple[Path, Path]):
    build, bundle = shared_bundle
    report = verify_bundle(bundle)
    assert report.ok, report.problems
    manifest = _manifest(bundle)
    assert manifest["format_version"] == "1.2"
    layers = {lay["name"]: lay for lay in manifest["layers"]}
    assert sorted(layers) == ["W", "gemm_alpha", "matmul"] and report.layers_checked == 3
    shared = layers["W"]
    assert [u["node"] for u in shared["users"]] == ["gemm_t0", "gemm_t1"] and shared["source_node"] == "gemm_t0"
    assert [u["bias"]["key"] for u in shared["users"]] == [None, None]  # no bias in this graph
    assert shared["users"][0]["dac"] == shared["dac"] and shared["users"][1]["dac"]["calibrated"]
    assert manifest["schedule"]["shared_cores"] == {}  # aon-cim is layer-serial
    steps = {s["node"]: s["layer_id"] for s in manifest["schedule"]["steps"] if s["unit"] == "array"}
    assert steps["gemm_t0"] == steps["gemm_t1"] == shared["id"] != steps["matmul"]
    # The devices are programmed once: the array holds 3 blocks of 16x16 weights, not 4.
    with np.load(bundle / "array_0.npz") as npz:
        assert np.count_nonzero(npz["g_us"]) <= 3 * 16 * 16 < 4 * 16 * 16


def test_verify_names_a_user_missing_from_a_shared_layer(shared_bundle: tuple[Path, Path], tmp_path: Path):
    build, bundle = shared_bundle
    copy = _copy(bundle, tmp_path)
    manifest = _manifest(copy)
    shared = next(lay for lay in manifest["layers"] if lay["name"] == "W")
    shared["users"] = shared["users"][:1]
    _rewrite(copy, manifest)
    report = verify_bundle(copy, model=build)
    assert any("'gemm_t1'" in p and "missing from the manifest" in p for p in report.problems), report.problems
    manifest["layers"][0]["users"].append({**manifest["layers"][0]["users"][0], "node": "no_such_node"})
    _rewrite(copy, manifest)
    assert any("user 'no_such_node' is not an analog node" in p for p in verify_bundle(copy, model=build).problems)


def test_bias_of_each_user_is_exported(tmp_path: Path):
    import onnx

    from cimc.compiler import compile_model
    from tests.models import shared_weight_model

    onnx.save(shared_weight_model("gemm-chain"), tmp_path / "chain.onnx")
    compile_model(tmp_path / "chain.onnx", "hermes", out_dir=tmp_path / "build")
    bundle = export_mapping(tmp_path / "build", tmp_path / "bundle")
    manifest = _manifest(bundle)
    (layer,) = manifest["layers"]
    assert [u["bias"]["key"] for u in layer["users"]] == ["L0", "L0_u1", "L0_u2", "L0_u3", "L0_u4"]
    # hermes is pipelined: the five uses take turns on the block's one core.
    assert manifest["schedule"]["shared_cores"] == {str(layer["arrays"][0]): [f"step{i}" for i in range(5)]}
    with np.load(bundle / "biases.npz") as npz:
        assert sorted(npz.files) == ["L0", "L0_u1", "L0_u2", "L0_u3", "L0_u4"]
        assert not np.array_equal(npz["L0"], npz["L0_u1"])
    report = verify_bundle(bundle)
    assert report.ok, report.problems
    with np.load(bundle / "biases.npz") as npz:
        biases = dict(npz)
    biases["L0_u3"] = biases["L0_u3"] + 1
    np.savez(bundle / "biases.npz", **biases)
    assert any("user 'step3'" in p and "bias" in p for p in verify_bundle(bundle).problems)


def test_same_export_twice_gives_the_same_bytes(kws_build: Path, tmp_path: Path, run_cli):
    """No path, time or random name in a bundle: the compiled model is recorded by its hash."""
    for name in ("a", "b"):
        assert run_cli("export", kws_build, "-o", tmp_path / name, "--csv").code == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    # The bundle names the compiled model by its hash, not by where it lay (issue 22) ...
    assert "compiled_dir" not in manifest["source"] and len(manifest["source"]["compiled_model_sha256"]) == 64
    res = run_cli("verify", tmp_path / "a")  # ... so verify needs to be told where it is, or find it by hash
    assert res.code == 2 and "pass it with --model" in res.err and res.err.count("\n") == 1
    assert run_cli("verify", tmp_path / "a", "--model", kws_build).code == 0


def test_verify_does_not_follow_paths_out_of_the_bundle(kws_bundle: Path, tmp_path: Path, run_cli):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(kws_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["biases"] = "/etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    res = run_cli("verify", copy)
    assert res.code == 1 and "manifest: files/biases" in res.out
