"""`cimc compile`: pipeline strings, mapping, schedule, artifacts, golden cost numbers, fit errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from cimc.artifact import CompiledModel
from cimc.compiler import compile_model
from cimc.errors import FitError, InputError
from cimc.pipeline import CompileContext, parse_pipeline
from cimc.targets import load_target
from tests.models import export_onnx, light_model_path, run_ort

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The AnalogNets-like KWS and VWW reference architectures with seeded random weights."""
    from examples import models
    out = tmp_path_factory.mktemp("ref")
    torch.manual_seed(0)
    paths = {}
    for name, net, shape in (("kws", models.kws_net(), models.KWS_INPUT_SHAPE),
                             ("vww", models.vww_net(), models.VWW_INPUT_SHAPE)):
        net.eval()
        paths[name] = export_onnx(net, torch.randn(1, *shape), out / f"{name}.onnx")
    return paths


def _tiles(compiled: CompiledModel) -> list[tuple[str, dict]]:
    return [(n.name, t) for n in compiled.analog_nodes() for t in json.loads(n.metadata_props["cimc.placement"])]


def test_kws_on_aon_cim_golden(reference_models: dict[str, Path], tmp_path: Path) -> None:
    c = compile_model(reference_models["kws"], "aon-cim", out_dir=tmp_path / "kws")
    r = json.loads((tmp_path / "kws" / "report.json").read_text())
    assert r["target"] == "aon-cim"
    assert len(c.analog_nodes()) == 8  # 7 conv + fc
    assert r["macs"] == 21_558_624
    assert r["utilization"] == pytest.approx(180_512 / 262_144, rel=1e-9)
    # Published KWS 8-bit point (8.58 TOPS/W; fitted with 6 and 4 bits), and the cost model's golden numbers.
    assert r["tops_per_w"] == pytest.approx(8.58, rel=0.05)
    assert r["cycles"] == pytest.approx(63_353, rel=1e-3)
    assert r["energy_per_inference_j"] == pytest.approx(5.0377e-6, rel=1e-3)  # was 5.0254e-6 before the KWS 8/6/4 fit
    assert set(r["energy_breakdown_j"]) >= {"dac", "array", "adc", "periphery", "digital", "sram"}
    for row in r["layers"]:
        if "placement" in row:
            assert row["mvms"] == row["matrix"]["mvms"] and row["cycles"] > 0
    for name in ("model.onnx", "report.json", "occupancy.png", "schedule.trace.json", "target.yaml", "manifest.json"):
        assert (tmp_path / "kws" / name).is_file()
    trace = json.loads((tmp_path / "kws" / "schedule.trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len([e for e in spans if e["tid"] == 1]) == 8  # tid 0: digital unit, tid 1 + i: array i
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {0: "digital unit", 1: "array 0"}
    assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-6 for a, b in zip(spans, spans[1:]))  # layer-serial


def test_no_overlap_and_full_coverage(reference_models: dict[str, Path]) -> None:
    for name in ("kws", "vww"):
        c = compile_model(reference_models[name], "aon-cim")
        occupied = np.zeros((1024, 256), dtype=np.int32)
        covered = {}
        for layer, t in _tiles(c):
            occupied[t["row0"] : t["row0"] + t["rows"], t["col0"] : t["col0"] + t["cols"]] += 1
            covered[layer] = covered.get(layer, 0) + t["rows"] * t["cols"]
        assert occupied.max() == 1, f"{name}: tiles overlap"
        for node in c.analog_nodes():
            m = json.loads(node.metadata_props["cimc.matrix"])
            assert covered[node.name] == m["rows"] * m["cols"] * m["groups"]


def test_compiled_onnx_is_valid_and_runs_in_onnxruntime(reference_models: dict[str, Path], tmp_path: Path) -> None:
    compile_model(reference_models["kws"], "aon-cim", out_dir=tmp_path / "kws")
    model = onnx.load(tmp_path / "kws" / "model.onnx")
    onnx.checker.check_model(model)
    props = {p.key for n in model.graph.node for p in n.metadata_props}
    assert {"cimc.placement", "cimc.matrix", "cimc.schedule"} <= props
    x = np.random.default_rng(0).standard_normal((1, 1, 49, 10)).astype(np.float32)
    (compiled_out,) = run_ort(tmp_path / "kws" / "model.onnx", {"x": x})
    (source_out,) = run_ort(reference_models["kws"], {"x": x})
    np.testing.assert_allclose(compiled_out, source_out, rtol=1e-4, atol=1e-5)


def test_reload_gives_same_report(reference_models: dict[str, Path], tmp_path: Path) -> None:
    c = compile_model(reference_models["vww"], "aon-cim", out_dir=tmp_path / "vww")
    again = CompiledModel.load(tmp_path / "vww")
    assert again.report()["tops_per_w"] == pytest.approx(c.report()["tops_per_w"])
    assert again.mapping == c.mapping


def test_hermes_pipelined(reference_models: dict[str, Path]) -> None:
    c = compile_model(reference_models["vww"], "hermes")
    r = c.report()
    assert r["execution"] == "pipelined" and r["arrays_used"] >= 10
    assert r["inferences_per_s"] > 1 / r["latency_s"]  # the pipeline overlaps inferences
    # The trace has one track per core, named after it, and every layer sits on the cores that hold it.
    trace = c.chrome_trace()
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] != 0]
    assert len({e["tid"] for e in spans}) == r["arrays_used"]
    assert all(names[e["tid"]] == f"core {e['args']['core']}" for e in spans)
    for node in c.analog_nodes():
        cores = {t["array"] for t in json.loads(node.metadata_props["cimc.placement"])}
        assert {e["args"]["core"] for e in spans if e["name"] == node.name} == cores


def test_pipeline_spec_errors() -> None:
    ctx = CompileContext(target=load_target("ideal"))
    import cimc.compiler

    cimc.compiler._register_passes()
    assert [p.name for p in parse_pipeline("canonicalize,map,quantize{percentile=99.9},schedule", ctx)] == [
        "canonicalize", "map", "quantize", "schedule"]
    assert parse_pipeline("quantize{percentile=99.5}", ctx)[0].percentile == 99.5
    with pytest.raises(InputError, match="unknown pass 'mapp'"):
        parse_pipeline("canonicalize,mapp", ctx)
    with pytest.raises(InputError, match="pass 'quantize' has no option 'bits'"):
        parse_pipeline("quantize{bits=3}", ctx)
    with pytest.raises(InputError, match="option 'samples' cannot be 'many'"):
        parse_pipeline("quantize{samples=many}", ctx)


def test_too_big_fails_with_numbers(tmp_path: Path) -> None:
    # 2 layers: 600x300 + 600x300 weights = 360,000 > 262,144 weights on one aon-cim array.
    net = torch.nn.Sequential(torch.nn.Linear(600, 300), torch.nn.ReLU(), torch.nn.Linear(300, 600)).eval()
    path = export_onnx(net, torch.randn(1, 600), tmp_path / "big.onnx")
    with pytest.raises(FitError, match=r"360,000 weights.*262,144"):
        compile_model(path, "aon-cim")
    # A two-layer toy that does fit must compile: the packer fails only when truly too big.
    small = torch.nn.Sequential(torch.nn.Linear(600, 200), torch.nn.ReLU(), torch.nn.Linear(200, 200)).eval()
    ok = compile_model(export_onnx(small, torch.randn(1, 600), tmp_path / "small.onnx"), "aon-cim")
    assert ok.mapping["utilization"] == pytest.approx((600 * 200 + 200 * 200) / 262_144)


def test_light_resnet50_on_hermes_reports_fit_numbers() -> None:
    with pytest.raises(FitError) as info:
        compile_model(light_model_path("resnet50"), "hermes")
    message = str(info.value)
    assert "needs 25,502,912 weights but the target has 4,194,304 (64 array(s) of 256×256 weights" in message
    assert "it fits 390 cores of this size (401 for every layer on cores of its own" in message
    assert "--arrays 390" in message and "array.count" in message


def test_cli_compile(reference_models: dict[str, Path], tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    res = run_cli("compile", reference_models["kws"], "--target", "aon-cim", "-o", tmp_path / "out")
    assert res.code == 0, res.err
    assert "TOPS/W" in res.out and "utilisation 68.9 %" in res.out
    assert "converters NOT modelled" in res.out and "not modelled" in res.err  # no --calib: said plainly
    assert "batch dimension fixed at 1" in res.out
    res = run_cli("compile", reference_models["kws"], "-o", tmp_path / "out2", "--json")
    doc = json.loads(res.out)  # exactly one JSON document on stdout
    assert res.code == 0 and doc["target"] == "aon-cim" and doc["target_given"] == "aon-cim"
    assert "model.onnx" in doc["files"] and doc["output"] == str(tmp_path / "out2")
    res = run_cli("compile", reference_models["kws"], "-o", tmp_path / "out3", "-q", "--batch", "1")
    assert res.code == 0 and res.out == "" and res.err == ""
    res = run_cli("compile", reference_models["kws"], "--target", "no-such-chip", "-o", tmp_path / "bad")
    assert res.code == 2 and "unknown target 'no-such-chip'" in res.err
    assert not (tmp_path / "bad").exists()  # nothing half-written
    res = run_cli("compile", reference_models["kws"], "--pipeline", "canonicalize,map,quantize,schedule")
    assert res.code == 2 and "needs calibration data" in res.err


def test_unsupported_ops_listed_at_once(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    from onnx import helper

    from tests.models import make_onnx_model

    w = np.ones((4, 4), np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
             helper.make_node("Mystery", ["a"], ["b"], name="odd_1", domain="my.ops"),
             helper.make_node("Mystery", ["b"], ["y"], name="odd_2", domain="my.ops")]
    model = make_onnx_model(nodes, [("x", [1, 4])], [("y", [1, 4])], {"w": w}, extra_opsets={"my.ops": 1})
    onnx.save(model, tmp_path / "odd.onnx")
    res = run_cli("compile", tmp_path / "odd.onnx", "-o", tmp_path / "out")
    assert res.code == 2 and "2 unsupported node(s)" in res.err and "'odd_1'" in res.err and "'odd_2'" in res.err
    assert len(res.err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ shared weights
def _save_shared(kind: str, tmp_path: Path) -> Path:
    from tests.models import shared_weight_model

    path = tmp_path / f"{kind}.onnx"
    onnx.save(shared_weight_model(kind), path)
    return path


@pytest.mark.parametrize(("kind", "uses"), [("two-matmul", 2), ("gemm-chain", 5)])
def test_shared_weight_is_one_block(kind: str, uses: int, tmp_path: Path) -> None:
    import cimc

    path = _save_shared(kind, tmp_path)
    compiled = compile_model(path, "aon-cim")
    m = compiled.mapping
    assert (m["layers"], m["analog_nodes"]) == (1, uses)
    assert m["weights_placed"] == 16 * 16  # counted once, not once per use
    assert m["utilization"] == pytest.approx(256 / (1024 * 256))
    assert m["shared_weights"] == {"W": [n.name for n in compiled.analog_nodes()]}
    placements = {n.metadata_props["cimc.placement"] for n in compiled.analog_nodes()}
    assert len(placements) == 1 and {n.metadata_props["cimc.layer"] for n in compiled.analog_nodes()} == {"W"}
    # The schedule and the cost count one MVM set per use.
    analog = [c for c in compiled.cost.layers if c.kind == "analog"]
    assert len(analog) == uses and all(c.mvms == 1 for c in analog) and compiled.cost.macs == uses * 256
    report = compiled.report()
    assert report["crossbar_layers"] == 1 and report["analog_uses"] == uses
    assert "1 crossbar blocks for" in compiled.summary_table()
    # inspect: parameters unique, MACs per use.
    totals = cimc.inspect(path).totals
    assert totals["analog_weights"] == 256 and totals["analog_weights_per_use"] == uses * 256
    assert totals["analog_macs"] == uses * 256 and totals["shared_weights"] == {"W": uses}


@pytest.mark.parametrize("kind", ["two-matmul", "gemm-chain", "mixed"])
def test_shared_weight_runs_like_onnxruntime(kind: str, tmp_path: Path) -> None:
    import cimc

    path = _save_shared(kind, tmp_path)
    compiled = compile_model(path, "ideal", out_dir=tmp_path / "out")
    x = np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)
    expected = np.concatenate([run_ort(path, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    got = cimc.run(tmp_path / "out", x)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert CompiledModel.load(tmp_path / "out").mapping["layers"] == compiled.mapping["layers"]


def test_mixed_orientations_are_placed_separately(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="cimc.passes.mapping"):
        compiled = compile_model(_save_shared("mixed", tmp_path), "aon-cim")
    layer = {n.name: n.metadata_props["cimc.layer"] for n in compiled.analog_nodes()}
    # Gemm transB twice: one block; MatMul (transposed view) and alpha=2 (scaled view): one block each.
    assert layer == {"gemm_t0": "W", "gemm_t1": "W", "matmul": "matmul", "gemm_alpha": "gemm_alpha"}
    assert compiled.mapping["weights_placed"] == 3 * 256
    assert "3 different crossbar matrices" in caplog.text and "placed 3 times" in caplog.text


def test_compiled_folder_without_layer_keys_still_loads(tmp_path: Path) -> None:
    """Folders written before crossbar blocks could be shared have no cimc.layer: every node is its own block."""
    import cimc

    path = _save_shared("two-matmul", tmp_path)
    compile_model(path, "ideal", out_dir=tmp_path / "out")
    model = ir.load(tmp_path / "out" / "model.onnx")
    for node in model.graph:
        node.metadata_props.pop("cimc.layer", None)
    ir.save(model, tmp_path / "out" / "model.onnx")
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    expected = np.concatenate([run_ort(path, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    got = cimc.run(tmp_path / "out", x, instances=2)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


# ------------------------------------------------------------------------------------------ multi-core placement
def _mlp(widths: list[int], tmp_path: Path, name: str = "mlp") -> Path:
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    torch.manual_seed(0)
    net = torch.nn.Sequential(*layers[:-1]).eval()
    return export_onnx(net, torch.randn(1, widths[0]), tmp_path / f"{name}.onnx")


def _tiny_cores(count: int, execution: str) -> object:
    """hermes with 64x64-weight cores: small enough that a few small layers fill it."""
    return load_target("hermes").with_overrides(
        **{"array.rows": 64, "array.cols": 128, "array.count": count, "execution": execution, "sram.size_bytes": None}
    )


def test_pipelined_shares_cores_when_one_layer_per_core_does_not_fit(tmp_path: Path) -> None:
    # Six 32x32 layers (a quarter core each) on 3 cores: one per core needs 6.
    path = _mlp([32] * 7, tmp_path)
    compiled = compile_model(path, _tiny_cores(3, "pipelined"))
    m, s, cost = compiled.mapping, compiled.schedule, compiled.cost
    assert m["execution"] == "pipelined" and m["arrays_used"] <= 3
    assert s["shared_cores"] and all(len(users) > 1 for users in s["shared_cores"].values())
    # Uses that share a core run in turn: the period is the busiest core's summed time.
    busy = {}
    for layer in cost.layers:
        if layer.kind == "analog":
            node = next(n for n in compiled.analog_nodes() if n.name == layer.name)
            for core in {t["array"] for t in json.loads(node.metadata_props["cimc.placement"])}:
                busy[core] = busy.get(core, 0.0) + layer.latency_s
    assert cost.period_s == pytest.approx(max(max(busy.values()), max(
        (c.latency_s for c in cost.layers if c.kind == "digital"), default=0.0)))
    assert cost.period_s < cost.latency_s
    table = compiled.summary_table()
    assert "serialised:" in table and "execution choices:" in table
    assert set(m["choices"]) == {"pipelined", "layer-serial"}
    # With enough cores every layer keeps cores of its own.
    roomy = compile_model(path, _tiny_cores(8, "pipelined"))
    assert roomy.mapping["shared_cores"] == {} and roomy.mapping["arrays_used"] == 6
    assert roomy.cost.period_s <= compiled.cost.period_s


def test_auto_execution_picks_the_faster_choice(tmp_path: Path) -> None:
    path = _mlp([32] * 7, tmp_path)
    compiled = compile_model(path, _tiny_cores(8, "auto"))
    choices = compiled.mapping["choices"]
    best = max(choices, key=lambda k: choices[k]["inferences_per_s"])
    assert compiled.mapping["execution"] == best == "pipelined"
    assert compiled.report()["execution"] == "pipelined" and compiled.mapping["execution_requested"] == "auto"
    assert compiled.cost.inferences_per_s == pytest.approx(choices["pipelined"]["inferences_per_s"])
    # One core: nothing to pipeline, auto is layer-serial.
    single = compile_model(path, _tiny_cores(1, "auto").with_overrides(**{"array.rows": 256, "array.cols": 512}))
    assert single.mapping["execution"] == "layer-serial" and single.cost.period_s == single.cost.latency_s


def test_target_execution_field_is_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        load_target("hermes").with_overrides(execution="sometimes")
    assert load_target("hermes").with_overrides(execution="auto").execution == "auto"


def test_shufflenet_compiles_on_hermes() -> None:
    compiled = compile_model(light_model_path("shufflenet"), "hermes")
    m = compiled.mapping
    assert m["execution"] == "pipelined" and m["arrays_used"] <= 64
    assert m["shared_cores"]  # one layer per core would need more than 64
    assert compiled.cost.period_s < compiled.cost.latency_s


# ------------------------------------------------------------------------------------------ --arrays
def test_too_big_for_aon_cim_names_arrays_override_then_compiles_with_it(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path = _mlp([600, 300, 600], tmp_path, "big")  # 360,600 weights > 262,144 on one array
    with pytest.raises(FitError) as info:
        compile_model(path, "aon-cim")
    message = str(info.value)
    assert "it fits 2 arrays of this size: compile with --arrays 2 (API arrays=2)" in message
    assert "array.count" in message
    compiled = compile_model(path, "aon-cim", arrays=2)
    assert compiled.mapping["arrays_used"] == 2 and compiled.mapping["arrays_available"] == 2
    assert compiled.mapping["execution"] == "layer-serial" and compiled.report()["arrays_used"] == 2
    assert compiled.cost.period_s == pytest.approx(compiled.cost.latency_s)
    res = run_cli("compile", path, "--target", "aon-cim", "-o", tmp_path / "no")
    assert res.code == 2 and "--arrays 2" in res.err and len(res.err.strip().splitlines()) == 1
    res = run_cli("compile", path, "--target", "aon-cim", "--arrays", "2", "-o", tmp_path / "yes")
    assert res.code == 0, res.err
    assert "2 of 2 array(s) used" in res.out
    assert json.loads((tmp_path / "yes" / "report.json").read_text())["arrays_used"] == 2
    res = run_cli("compile", path, "--target", "aon-cim", "--arrays", "0", "-o", tmp_path / "zero")
    assert res.code == 2 and "--arrays must be" in res.err


def test_too_big_for_hermes_names_arrays_override_then_compiles_with_it(tmp_path: Path) -> None:
    path = _mlp([2048, 2100], tmp_path, "wide")  # 4,300,800 weights > 64 cores x 65,536
    with pytest.raises(FitError) as info:
        compile_model(path, "hermes")
    message = str(info.value)
    assert "4,300,800 weights but the target has 4,194,304" in message
    assert "it fits 66 cores of this size (66 for every layer on cores of its own" in message
    assert "--arrays 66" in message
    compiled = compile_model(path, "hermes", arrays=66)
    assert compiled.mapping["arrays_used"] == 66 and compiled.report()["arrays_available"] == 66


def test_runtime_imports_nothing_from_passes() -> None:
    """House rule: runtime/ is below passes/ (passes may use the executor and the cost model, not the reverse)."""
    import ast

    offenders = []
    for path in sorted((ROOT / "runtime").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("cimc.passes")]
    assert offenders == []


def test_pipelined_falls_back_to_dense_packing_when_no_small_layer_can_share(tmp_path: Path) -> None:
    # Three 80x80 layers on 64x64-weight cores: each needs 3 cores of its own (9 in all) and none is small
    # enough to share a whole core with another; packed densely, their 19,200 weights fit 5 cores.
    path = _mlp([80, 80, 80, 80], tmp_path, "wide3")
    compiled = compile_model(path, _tiny_cores(5, "pipelined"))
    assert compiled.mapping["execution"] == "pipelined" and compiled.mapping["arrays_used"] <= 5
    assert compiled.schedule["shared_cores"]  # some core holds tiles of two layers: they take turns
    with pytest.raises(FitError, match=r"it fits 5 cores of this size \(9 for every layer on cores of its own"):
        compile_model(path, _tiny_cores(4, "pipelined"))


def test_every_layer_digital_is_refused_in_one_line_with_calibration(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    """Keeping every mappable layer digital leaves nothing for the arrays: one line that says so (it used to fail
    inside the quantize pass with 'run map before quantize'), and nothing written."""
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).eval()
    path = export_onnx(net, torch.randn(1, 6), tmp_path / "mlp.onnx")
    names = [n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("Gemm", "MatMul")]
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32))
    args = [a for n in names for a in ("--digital", n)]
    res = run_cli("compile", path, "--target", "aon-cim", "--calib", tmp_path / "calib.npz", *args, "-o", tmp_path / "out")
    assert res.code != 0 and "Traceback" not in res.err
    assert "every layer that could map onto the crossbars is kept digital" in res.err
    assert len(res.err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    res = run_cli("compile", path, "--target", "aon-cim", "--calib", tmp_path / "calib.npz", *args[:2], "-o", tmp_path / "ok")
    assert res.code == 0, res.err
