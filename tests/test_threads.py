"""Torch threads from the cores a process is given, and OpenMP workers that sleep instead of spinning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from cimc.errors import InputError
from cimc.threads import available_cores, set_torch_threads


def test_threads_default_to_the_affinity_mask():
    try:
        assert set_torch_threads(0) == available_cores() == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == available_cores()
        assert set_torch_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_thread_count_is_a_clear_error(bad):
    with pytest.raises(InputError, match="--threads"):
        set_torch_threads(bad)


def _policy(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    code = "import os, cimc, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_import_sets_passive_openmp_before_torch_but_respects_the_user():
    assert _policy(None) == "PASSIVE"
    assert _policy("ACTIVE") == "ACTIVE"


def test_cli_rejects_a_bad_thread_count(tmp_path):
    res = subprocess.run(["cimc", "simulate", str(tmp_path), "--data", "kws-test", "--threads", "-2"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "--threads" in res.stderr and "Traceback" not in res.stderr
