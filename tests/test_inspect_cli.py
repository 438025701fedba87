"""``cimc inspect`` and the command line's error contract, in-process and through the installed ``cimc`` program."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import cimc
from cimc.cli import main
from cimc.errors import InputError
from tests.models import CnnBn, export_onnx, light_model_path

# ResNet-50 v1 at 224×224: 25.5 M parameters, 4.09 G multiply-accumulates per image.
RESNET50_PARAMS = (25.4e6, 25.7e6)
RESNET50_MACS = (4.0e9, 4.2e9)


def _summary_number(text: str, label: str) -> int:
    match = re.search(rf"^{label}: ([\d,]+)", text, flags=re.MULTILINE)
    assert match, f"no '{label}:' line in\n{text}"
    return int(match.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def resnet50_json() -> dict:
    """``cimc inspect --json`` of the light ResNet-50, run once for the module."""
    report = cimc.inspect(light_model_path("resnet50"))
    return json.loads(json.dumps(report.to_dict()))


def test_resnet50_table(run_cli) -> None:
    result = run_cli("inspect", light_model_path("resnet50"))
    assert result.code == 0 and result.err == ""
    assert re.search(r"\b54 analog \(53 Conv, 1 Gemm\)", result.out)
    assert "0 unsupported" in result.out
    params = _summary_number(result.out, "parameters")
    macs = _summary_number(result.out, "MACs per inference")
    assert RESNET50_PARAMS[0] < params < RESNET50_PARAMS[1]
    assert RESNET50_MACS[0] < macs < RESNET50_MACS[1]
    assert "25.5 M" in result.out and "4.09 G" in result.out
    conv_rows = [line for line in result.out.splitlines() if re.search(r"\sConv\s.*\sanalog$", line)]
    assert len(conv_rows) == 53


def test_resnet50_json(run_cli, resnet50_json: dict) -> None:
    result = run_cli("inspect", light_model_path("resnet50"), "--json")
    assert result.code == 0
    data = json.loads(result.out)  # stdout is nothing but the JSON document
    assert data["totals"] == resnet50_json["totals"]
    totals = data["totals"]
    assert totals["analog_ops"] == {"Conv": 53, "Gemm": 1}
    assert totals["unsupported_nodes"] == 0
    assert RESNET50_PARAMS[0] < totals["parameters"] < RESNET50_PARAMS[1]
    assert RESNET50_MACS[0] < totals["macs"] < RESNET50_MACS[1]
    assert totals["analog_macs"] == totals["macs"]  # every MAC of ResNet-50 is in a Conv or the Gemm
    assert list(data["inputs"].values()) == [[1, 3, 224, 224]]
    assert list(data["outputs"].values()) == [[1, 1000]]
    analog = [n for n in data["nodes"] if n["kind"] == "analog"]
    assert len(analog) == 54
    fc = next(n for n in analog if n["op_type"] == "Gemm")
    assert fc["matrix"] == {"rows": 2048, "cols": 1000, "groups": 1, "mvms": 1}
    stem = analog[0]
    assert stem["op_type"] == "Conv" and stem["matrix"] == {
        "rows": 3 * 7 * 7,
        "cols": 64,
        "groups": 1,
        "mvms": 112 * 112,
    }
    assert sum(n["macs"] for n in data["nodes"]) == totals["macs"]


def test_raw_keeps_batchnorm_and_canonical_folds_it(tmp_path: Path) -> None:
    path = export_onnx(CnnBn(), torch.randn(1, 3, 16, 16), tmp_path / "cnn.onnx")
    raw = cimc.inspect(path, canonicalize=False).to_dict()
    canonical = cimc.inspect(path).to_dict()
    assert "BatchNormalization" in {n["op_type"] for n in raw["nodes"]}
    assert "BatchNormalization" not in {n["op_type"] for n in canonical["nodes"]}
    assert canonical["totals"]["analog_ops"] == {"Conv": 3, "Gemm": 1}
    assert canonical["totals"]["analog_macs"] == raw["totals"]["analog_macs"]  # folding moves no MACs


def test_batch_option_fixes_the_input_and_counts_macs_per_sample(tmp_path: Path, run_cli) -> None:
    path = export_onnx(CnnBn(), torch.randn(1, 3, 16, 16), tmp_path / "cnn.onnx", dynamic_batch=True)
    one = json.loads(run_cli("inspect", path, "--json").out)
    four = json.loads(run_cli("inspect", path, "--json", "--batch", "4").out)
    assert list(one["inputs"].values()) == [[1, 3, 16, 16]]
    assert list(four["inputs"].values()) == [[4, 3, 16, 16]]
    assert four["totals"]["analog_macs"] == one["totals"]["analog_macs"] > 0  # "per inference" = per sample
    gemm = next(n for n in four["nodes"] if n["op_type"] == "Gemm")
    assert gemm["input_shapes"] == [[4, 128]] and gemm["matrix"]["mvms"] == 1


def test_debug_reraises_the_error_in_process(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        main(["--debug", "inspect", str(tmp_path / "missing.onnx")])


def test_no_command_prints_help(run_cli) -> None:
    result = run_cli()
    assert result.code == 0 and "inspect" in result.out


# ------------------------------------------------------------------------------------------ real processes
def test_cimc_program_error_is_one_line_with_exit_2(tmp_path: Path, run_cimc_process) -> None:
    result = run_cimc_process("inspect", tmp_path / "missing.onnx")
    assert result.code == 2
    assert result.out == ""
    assert result.err.count("\n") == 1 and result.err.startswith("cimc inspect: error: ")
    assert "missing.onnx" in result.err and "no such file" in result.err


def test_cimc_program_debug_shows_traceback(tmp_path: Path, run_cimc_process) -> None:
    folder = tmp_path / "a_folder.onnx"
    folder.mkdir()
    result = run_cimc_process("--debug", "inspect", folder)
    assert result.code != 0
    assert "Traceback (most recent call last)" in result.err
    assert "InputError" in result.err and "is a folder" in result.err


def test_shared_weights_counted_once_macs_per_use(tmp_path: Path, run_cli) -> None:
    import onnx

    from tests.models import shared_weight_model

    onnx.save(shared_weight_model("gemm-chain"), tmp_path / "chain.onnx")
    result = run_cli("inspect", tmp_path / "chain.onnx")
    assert result.code == 0, result.err
    # 256 weights + 5 biases of 16, each stored once; the weight is read by 5 Gemm nodes, each computing.
    assert _summary_number(result.out, "parameters") == 256 + 5 * 16
    assert "analog weights: 256 unique, 1,280 counted per use (1 weight tensor(s) read by several nodes" in result.out
    assert _summary_number(result.out, "MACs per inference") == 5 * 256
    totals = json.loads(run_cli("inspect", tmp_path / "chain.onnx", "--json").out)["totals"]
    assert totals["parameters_per_use"] == 5 * 256 + 5 * 16 and totals["shared_weights"] == {"W": 5}
