"""Output-path safety: no ``-o`` destroys an input or a folder cimc did not write (cimc.outputs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from cimc.outputs import TMP_PREFIX, clean_stale_temporaries
from tests.models import make_onnx_model


def _mlp(path: Path) -> Path:
    """y = relu(x W + b): one analog Gemm, compiles in a second on any target."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc"), helper.make_node("Relu", ["h"], ["y"], name="act")]
    model = make_onnx_model(nodes, [("x", [1, 8])], ["y"],
                            {"w": rng.normal(size=(8, 4)).astype(np.float32), "b": np.zeros(4, np.float32)})
    onnx.save(model, path)
    return path


def _calib(path: Path) -> Path:
    rng = np.random.default_rng(1)
    np.savez(path, x=rng.normal(size=(16, 8)).astype(np.float32), y=rng.integers(0, 4, 16))
    return path


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_compile_into_the_folder_holding_the_model_is_refused(tmp_path: Path, run_cli, monkeypatch) -> None:
    model = _mlp(tmp_path / "m.onnx")
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for out in (str(tmp_path), ".", tmp_path.parent):
        res = run_cli("compile", model, "-t", "ideal", "-o", out, "--force")
        assert res.code == 2, res.err
        assert "destroy it" in _one_line(res.err) or "current folder" in res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "notes.txt"]  # nothing written, nothing lost
    res = run_cli("compile", model, "-t", "ideal", "-o", model)
    assert res.code == 2 and "is the input" in _one_line(res.err)


def test_other_folders_are_refused_without_force_and_kept_with_it(tmp_path: Path, run_cli) -> None:
    model = _mlp(tmp_path / "m.onnx")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    res = run_cli("compile", model, "-t", "ideal", "-o", mine)
    assert res.code == 2 and "is not a cimc compiled-model folder" in _one_line(res.err)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    res = run_cli("compile", model, "-t", "ideal", "-o", mine, "--force")
    assert res.code == 0, res.err
    assert (mine / "thesis.tex").read_text() == "years of work" and (mine / "manifest.json").is_file()
    file_out = tmp_path / "file.txt"
    file_out.write_text("x")
    res = run_cli("compile", model, "-t", "ideal", "-o", file_out)
    assert res.code == 2 and "is an existing file" in _one_line(res.err)
    res = run_cli("compile", model, "-t", "ideal", "-o", tmp_path / "empty")  # new folder: fine
    assert res.code == 0, res.err


def test_recompiling_replaces_only_cimcs_files(tmp_path: Path, run_cli) -> None:
    model, calib = _mlp(tmp_path / "m.onnx"), _calib(tmp_path / "calib.npz")
    build = tmp_path / "build"
    assert run_cli("compile", model, "-t", "aon-cim", "--calib", calib, "-o", build, "-q").code == 0
    assert (build / "model.qdq.onnx").is_file()
    (build / "notes.txt").write_text("mine")
    res = run_cli("simulate", build, "--data", calib, "--drift", "1s", "--instances", "2", "-q")
    assert res.code == 0, res.err
    res = run_cli("compile", model, "-t", "aon-cim", "-o", build, "-q")  # no calibration: no QDQ twin this time
    assert res.code == 0, res.err
    assert (build / "notes.txt").read_text() == "mine"
    assert (build / "simulation" / "results.json").is_file()  # an earlier simulation stays
    assert not (build / "model.qdq.onnx").exists()  # a file of the old output that the new one lacks is gone
    manifest = json.loads((build / "manifest.json").read_text())
    assert "model.qdq.onnx" not in manifest["files"]
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*")) and not (build / ".cimc-partial").exists()


def test_export_and_simulate_never_write_over_their_input(tmp_path: Path, run_cli) -> None:
    model, data = _mlp(tmp_path / "m.onnx"), _calib(tmp_path / "d.npz")
    build = tmp_path / "build"
    assert run_cli("compile", model, "-t", "ideal", "-o", build, "-q").code == 0
    before = sorted(p.name for p in build.iterdir())
    res = run_cli("export", build, "-o", build, "--force")
    assert res.code == 2 and "is the input" in _one_line(res.err)
    res = run_cli("simulate", build, "--data", data, "-o", build, "--instances", "1", "--drift", "1s", "-q")
    assert res.code == 2 and "is the input" in _one_line(res.err)
    res = run_cli("export", build, "-o", tmp_path, "--force")  # the folder that contains the input
    assert res.code == 2 and "contains the input" in _one_line(res.err)
    assert sorted(p.name for p in build.iterdir()) == before
    other = tmp_path / "build2"
    assert run_cli("compile", model, "-t", "ideal", "-o", other, "-q").code == 0
    res = run_cli("export", build, "-o", other)
    assert res.code == 2 and "is a cimc compiled-model folder, not a mapping bundle" in _one_line(res.err)
    assert run_cli("export", build, "-o", tmp_path / "bundle").code == 0
    assert run_cli("export", build, "-o", tmp_path / "bundle").code == 0  # re-export over its own bundle
    res = run_cli("compile", model, "-t", "ideal", "-o", tmp_path / "bundle")
    assert res.code == 2 and "is a cimc mapping bundle" in _one_line(res.err)


def test_file_outputs_refuse_their_inputs_and_wrong_suffixes(tmp_path: Path, run_cli) -> None:
    model, data = _mlp(tmp_path / "m.onnx"), _calib(tmp_path / "d.npz")
    build = tmp_path / "build"
    assert run_cli("compile", model, "-t", "ideal", "-o", build, "-q").code == 0
    x = tmp_path / "x.npy"
    np.save(x, np.ones((2, 8), np.float32))
    res = run_cli("run", build, "--input", x, "-o", x)
    assert res.code == 2 and "is the input" in _one_line(res.err)
    res = run_cli("run", build, "--input", x, "-o", build / "model.onnx")
    assert res.code == 2 and "write outputs to a .npy" in _one_line(res.err)
    res = run_cli("run", build, "--input", x, "-o", tmp_path / "y.npy")
    assert res.code == 0, res.err
    sha = (tmp_path / "m.onnx").read_bytes()
    res = run_cli("finetune", model, "-t", "ideal", "--data", data, "-o", model, "--epochs", "1")
    assert res.code == 2 and "is the input" in _one_line(res.err)
    assert (tmp_path / "m.onnx").read_bytes() == sha


def test_demo_refuses_a_foreign_folder(tmp_path: Path, run_cli) -> None:
    (tmp_path / "mine.txt").write_text("mine")
    res = run_cli("demo", "-o", tmp_path, "-q")
    assert res.code == 2 and "is not a cimc demo folder" in _one_line(res.err)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_cleaned_safely(tmp_path: Path, run_cli) -> None:
    dead = _dead_pid()
    old = time.time() - 3600
    stale = tmp_path / f"{TMP_PREFIX}build.{dead}.abc123"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    stale_file = tmp_path / f"{TMP_PREFIX}y.npy.{dead}.k2j3"
    stale_file.write_bytes(b"half")
    live = tmp_path / f"{TMP_PREFIX}build.{os.getppid()}.zzz"  # a running process's: not ours to remove
    live.mkdir()
    fresh = tmp_path / f"{TMP_PREFIX}build.{dead}.new1"  # made after this process started: left alone
    fresh.mkdir()
    foreign = tmp_path / ".build.abc123"  # not our prefix
    foreign.mkdir()
    for p in (stale, stale_file, live, foreign):
        os.utime(p, (old, old))
    removed = clean_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale, stale_file])
    assert live.exists() and fresh.exists() and foreign.exists()


def test_sigkill_during_compile_leaves_the_old_output_and_no_litter(tmp_path: Path) -> None:
    """Kill ``cimc compile`` while it writes; the next run cleans the temporary it left."""
    model = _mlp(tmp_path / "m.onnx")
    build = tmp_path / "build"
    script = Path(sys.executable).parent / "cimc"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "cimc.cli"]
    argv = [*command, "compile", str(model), "-t", "ideal", "-o", str(build), "-q"]
    assert subprocess.run(argv, capture_output=True, timeout=120).returncode == 0
    first = (build / "manifest.json").read_bytes()
    killed = False
    for _ in range(3):  # the write window is ~0.3 s (the occupancy plot); catch it
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if list(tmp_path.glob(f"{TMP_PREFIX}build.*")):
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.002)
        proc.wait()
        if killed:
            break
    assert killed, "never caught the compile while it wrote"
    assert list(tmp_path.glob(f"{TMP_PREFIX}build.*"))  # the killed run's litter ...
    assert json.loads((build / "manifest.json").read_bytes()) == json.loads(first)  # ... the old output intact
    assert subprocess.run(argv, capture_output=True, timeout=120).returncode == 0
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))  # ... cleaned by the next run


# ------------------------------------------------------------------------------------------ issue 22: -o files
def test_run_output_file_rules_and_marks(tmp_path: Path, run_cli) -> None:
    """``run -o``: a file the command reads or a file in its input folder is never replaced; a user's file only
    with --force; cimc's own output again without --force (it carries cimc's mark, invisible to numpy)."""
    from cimc.outputs import written_by_cimc

    model = _mlp(tmp_path / "m.onnx")
    build = tmp_path / "build"
    assert run_cli("compile", model, "-t", "ideal", "-o", build, "-q").code == 0
    test_set = tmp_path / "digits_test.npz"
    np.savez(test_set, x=np.ones((2, 8), np.float32), y=np.zeros(2, np.int64))
    before = test_set.read_bytes()
    res = run_cli("run", build, "--input", test_set, "-o", test_set, "--force")
    assert res.code == 2 and "is the input" in _one_line(res.err)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((2, 8), np.float32))
    other = tmp_path / "other.npz"  # the user's file, not an input
    np.savez(other, a=np.arange(3))
    mine = other.read_bytes()
    res = run_cli("run", build, "--input", x, "-o", other)
    assert res.code == 2 and "was not written by cimc" in _one_line(res.err) and "--force" in res.err
    assert other.read_bytes() == mine and test_set.read_bytes() == before
    (build / "notes.npy").write_bytes(x.read_bytes())
    res = run_cli("run", build, "--input", x, "-o", build / "notes.npy", "--force")  # inside the input folder
    assert res.code == 2 and "which this command reads" in _one_line(res.err)
    for out in (tmp_path / "y.npy", tmp_path / "y.npz"):
        assert run_cli("run", build, "--input", x, "-o", out).code == 0
        first = out.read_bytes()
        assert written_by_cimc(out)
        assert run_cli("run", build, "--input", x, "-o", out).code == 0, "a rerun needs no --force"
        assert out.read_bytes() == first  # deterministic, mark included
    assert np.load(tmp_path / "y.npy").shape == (2, 4) and list(np.load(tmp_path / "y.npz").files) == ["y"]
    assert run_cli("run", build, "--input", x, "-o", other, "--force").code == 0  # the user asked to replace it
    assert written_by_cimc(other) and list(np.load(other).files) == ["y"]
    assert not written_by_cimc(x) and not written_by_cimc(test_set) and not written_by_cimc(model)


def test_finetune_refuses_another_model_without_force(tmp_path: Path, run_cli) -> None:
    model, data = _mlp(tmp_path / "a.onnx"), _calib(tmp_path / "d.npz")
    b = _mlp(tmp_path / "b.onnx")  # the user's other model
    before = b.read_bytes()
    res = run_cli("finetune", model, "-t", "ideal", "--data", data, "-o", b, "--epochs", "1", "-q")
    assert res.code == 2 and "was not written by cimc" in _one_line(res.err)
    assert b.read_bytes() == before
    tuned = tmp_path / "tuned.onnx"
    assert run_cli("finetune", model, "-t", "ideal", "--data", data, "-o", tuned, "--epochs", "1", "-q").code == 0
    assert run_cli("finetune", model, "-t", "ideal", "--data", data, "-o", tuned, "--epochs", "1", "-q").code == 0
    assert run_cli("finetune", model, "-t", "ideal", "--data", data, "-o", b, "--epochs", "1", "-q",
                   "--force").code == 0
    assert b.read_bytes() != before


# ------------------------------------------------------------------------------------------ issue 22: sweep -o
def test_sweep_follows_the_output_rules(tmp_path: Path, run_cli, monkeypatch) -> None:
    model, calib = _mlp(tmp_path / "m.onnx"), _calib(tmp_path / "calib.npz")
    args = ["sweep", model, "-t", "aon-cim", "--vary", "converters.adc_bits=4", "--calib", calib, "--data", calib,
            "--instances", "1", "--drift", "1s,24h", "-q"]
    monkeypatch.chdir(tmp_path)
    res = run_cli(*args, "-o", ".", "--force")
    assert res.code == 2 and "contains the input" in _one_line(res.err)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    res = run_cli(*args, "-o", ".", "--force")
    assert res.code == 2 and "current folder" in _one_line(res.err)
    assert not any((tmp_path / "sub").iterdir())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    res = run_cli(*args, "-o", mine)
    assert res.code == 2 and "is not a cimc sweep folder" in _one_line(res.err)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    build = tmp_path / "build"
    assert run_cli("compile", model, "-t", "ideal", "-o", build, "-q").code == 0
    res = run_cli(*args, "-o", build, "--force")
    assert res.code == 2 and "is a cimc compiled-model folder, not a sweep folder" in _one_line(res.err)
    res = run_cli(*args, "-o", tmp_path / "sw")
    assert res.code == 0, res.err
    assert not (tmp_path / "sw" / ".cimc-partial").exists() and (tmp_path / "sw" / "sweep.csv").is_file()
    assert run_cli(*args, "-o", tmp_path / "sw").code == 0  # a rerun (resume) of its own folder
    assert run_cli(*args, "-o", mine, "--force").code == 0
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "sweep.json").is_file()
