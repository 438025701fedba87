"""The chip kernel seam, batch-independent chip numbers for any shard split, and the single-channel convolution."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cimc
from cimc.data import Dataset
from cimc.errors import InputError
from cimc.runtime import analog
from cimc.runtime.executor import _conv2d
from cimc.runtime.simulator import merge_results
from cimc.targets import load_target
from tests.models import export_onnx, rel_l2, run_ort

INSTANCES = 5


class _ImageNet(torch.nn.Module):
    """A single-channel 3x3 convolution (the im2col path), a pooled 8-channel one (the direct path) and a Linear
    taller than the 64-row arrays below (split over row tiles: the unrolled path)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.c1(x)), 2)
        x = F.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Dataset, Path]:
    torch.manual_seed(0)
    net = _ImageNet().eval()
    path = export_onnx(net, torch.randn(1, 1, 16, 16), tmp_path_factory.mktemp("kernel") / "img.onnx",
                       dynamic_batch=True)
    x = torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
    ds = Dataset(x.numpy(), y.numpy().astype(np.int64), "img")
    target = load_target("aon-cim").with_overrides(**{"converters.output_noise": 0.05, "array.rows": 64})
    return cimc.compile(path, target, calibration=ds), ds, path


def _numbers(result: Any) -> dict[str, Any]:
    return {k: v for k, v in result.data.items() if k != "data"}


def _splits(draw_points: list[int]) -> list[tuple[int, int]]:
    cuts = sorted(set(draw_points))
    edges = [0, *cuts, INSTANCES]
    return list(itertools.pairwise(edges))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, INSTANCES - 1), max_size=INSTANCES - 1))
def test_any_shard_split_gives_the_same_bytes(noisy: tuple[Any, Dataset, Path], cuts: list[int]) -> None:
    """Each instance's numbers depend on nothing but (seed, index): any split of the chips into shards (here on a
    model with all three analog paths and output noise on) merges to the one-process result, bit for bit."""
    compiled, ds, _ = noisy
    kwargs = {"drift": "1h,30d", "instances": INSTANCES, "seed": 11, "batch_size": 16}
    whole = _numbers(_whole(compiled, ds, kwargs))
    shards = [cimc.simulate(compiled, ds, instance_range=r, **kwargs) for r in _splits(cuts)]
    assert _numbers(merge_results(compiled, shards)) == whole


_WHOLE: dict[int, Any] = {}


def _whole(compiled: Any, ds: Dataset, kwargs: dict[str, Any]) -> Any:
    if id(compiled) not in _WHOLE:
        _WHOLE[id(compiled)] = cimc.simulate(compiled, ds, **kwargs)
    return _WHOLE[id(compiled)]


class _Counting(analog.TorchKernel):
    name = "counting"

    def __init__(self) -> None:
        self.calls = {"mvm": 0, "conv": 0}

    def mvm(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls["mvm"] += 1
        return super().mvm(*args, **kwargs)

    def conv(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls["conv"] += 1
        return super().conv(*args, **kwargs)


def test_every_chip_computation_goes_through_the_kernel_seam(noisy: tuple[Any, Dataset, Path]) -> None:
    compiled, ds, _ = noisy
    assert analog.chip_kernel().name == "torch" and "torch" in analog.chip_kernels()
    kwargs = {"drift": "1h", "instances": 2, "seed": 1}
    reference = _numbers(cimc.simulate(compiled, ds, **kwargs))
    counting = _Counting()
    analog._KERNELS["counting"] = counting
    try:
        analog.set_chip_kernel("counting")
        assert _numbers(cimc.simulate(compiled, ds, **kwargs)) == reference  # same arithmetic, routed through it
        assert counting.calls["mvm"] > 0 and counting.calls["conv"] > 0
        before = dict(counting.calls)
        cimc.run(compiled, ds.x[:4], time="1h", instance=1)
        assert counting.calls["conv"] > before["conv"] and counting.calls["mvm"] > before["mvm"]
    finally:
        analog.set_chip_kernel("torch")
        del analog._KERNELS["counting"]
    with pytest.raises(InputError, match="unknown chip kernel 'nope'"):
        analog.set_chip_kernel("nope")


@pytest.mark.parametrize("stride,padding,batch", [(1, 1, 7), (2, 0, 3), (2, 4, 1)])
def test_single_channel_conv_matches_the_library_convolution(stride: int, padding: int, batch: int) -> None:
    """The im2col path for one input channel computes what ``F.conv2d`` computes."""
    g = torch.Generator().manual_seed(stride + padding + batch)
    x, w, b = torch.randn(batch, 1, 21, 13, generator=g), torch.randn(6, 1, 5, 3, generator=g), torch.randn(6, generator=g)
    y = _conv2d(x, w, b, [stride, stride], [padding, padding], [1, 1], 1)
    torch.testing.assert_close(y, F.conv2d(x, w, b, stride, padding), rtol=1e-5, atol=1e-5)


def test_single_channel_model_matches_onnxruntime(noisy: tuple[Any, Dataset, Path]) -> None:
    _, ds, path = noisy
    from cimc.runtime.executor import run_model

    model = cimc.load(path)
    ours = run_model(model, [ds.x])[0]
    ref = run_ort(path, {"x": ds.x})[0]
    assert rel_l2(ours, ref) < 1e-5
