"""Per-instance random streams, sharded Monte Carlo and the execution backends (process pool, Ray)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cimc
from cimc.data import Dataset
from cimc.errors import InputError
from cimc.parallel import InProcessBackend, LocalBackend, get_backend, split_range
from cimc.runtime.simulator import Chip, merge_results
from cimc.targets import load_target
from tests.models import export_onnx


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    """A 2-layer MLP and 48 labelled samples (labels = the float model's own predictions)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 4)).eval()
    path = export_onnx(net, torch.randn(1, 16), tmp_path_factory.mktemp("tiny") / "mlp.onnx")
    x = torch.randn(48, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
    return path, Dataset(x.numpy(), y.numpy().astype(np.int64), "tiny")


@pytest.fixture(scope="module")
def compiled(tiny: tuple[Path, Dataset]) -> cimc.artifact.CompiledModel:
    path, ds = tiny
    return cimc.compile(path, "aon-cim", calibration=ds, dac_bits=4, adc_bits=4)


def _numbers(result: cimc.runtime.simulator.SimulationResult) -> dict[str, object]:
    return {k: v for k, v in result.data.items() if k not in ("wall_time_s", "data")}


def test_chip_instance_depends_only_on_seed_and_index(compiled) -> None:  # type: ignore[no-untyped-def]
    whole = Chip(compiled, 4, seed=7)
    alone = Chip(compiled, 1, seed=7, first_instance=2)
    pair = Chip(compiled, 2, seed=7, first_instance=2)
    for t in (1.0, 86400.0):
        w_whole, w_alone, w_pair = whole.at(t).weights, alone.at(t).weights, pair.at(t).weights
        for name in w_whole:
            assert torch.equal(w_whole[name][2:3], w_alone[name])
            assert torch.equal(w_whole[name][2:4], w_pair[name])
            assert not torch.equal(w_whole[name][0], w_whole[name][1])  # instances differ
    other_seed = Chip(compiled, 1, seed=8, first_instance=2).at(1.0).weights
    assert any(not torch.equal(other_seed[n], alone.at(1.0).weights[n]) for n in other_seed)


def test_instance_shards_merge_bit_for_bit(compiled, tiny) -> None:  # type: ignore[no-untyped-def]
    _, ds = tiny
    kwargs = dict(drift="1s,1y", instances=5, seed=3)
    whole = cimc.simulate(compiled, ds, **kwargs)
    shards = [cimc.simulate(compiled, ds, instance_range=r, **kwargs) for r in [(3, 5), (0, 1), (1, 3)]]
    assert shards[0].data["instances"] == 2 and shards[0].data["instance_range"] == [3, 5]
    assert len(shards[0].data["series"][0]["points"][0]["per_instance"]) == 2
    merged = merge_results(compiled, shards)
    assert _numbers(merged) == _numbers(whole)
    gaps = [shards[0], shards[1]]
    with pytest.raises(InputError, match="contiguously"):
        merge_results(compiled, gaps)
    with pytest.raises(InputError, match="instance range"):
        cimc.simulate(compiled, ds, instance_range=(4, 9), **kwargs)


def test_run_one_instance_matches_its_slice(compiled, tiny) -> None:  # type: ignore[no-untyped-def]
    _, ds = tiny
    out = cimc.run(compiled, ds.x[:8], time="24h", instance=3, seed=2)
    chip = Chip(compiled, 4, seed=2)
    state = chip.at(86400.0)
    cimc.runtime.simulator.use(chip, chip.hook(state), state=state)
    with torch.no_grad():
        full = chip.executor(torch.from_numpy(ds.x[:8]).repeat(4, 1))[0].reshape(4, 8, -1)
    assert np.array_equal(out, full[3].numpy())


def test_split_range_and_backend_choice() -> None:
    assert split_range(5, 2) == [(0, 3), (3, 5)]
    assert split_range(2, 8) == [(0, 1), (1, 2)]
    assert isinstance(get_backend(), InProcessBackend)
    assert isinstance(get_backend(workers=2), LocalBackend)
    with pytest.raises(InputError, match="not both"):
        get_backend(workers=2, ray="auto")
    with pytest.raises(InputError, match="--workers"):
        LocalBackend(0)


def test_simulate_workers_same_numbers(compiled, tiny, tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path, ds = tiny
    kwargs = dict(drift="1s,24h", instances=3, seed=1)
    one = cimc.simulate(compiled, ds, **kwargs)
    two = cimc.simulate(compiled, ds, workers=2, **kwargs)
    assert _numbers(two) == _numbers(one)
    assert _numbers(cimc.simulate(compiled, ds, workers=1, **kwargs)) == _numbers(one)  # 2 torch threads there
    # the command line, with a user error raised inside a worker coming back as the one-line error
    compiled.save(tmp_path / "build")
    res = run_cli("simulate", tmp_path / "build", "--data", tmp_path / "missing.npz", "--workers", "2", "-q")
    assert res.code == 2 and "missing.npz" in res.err and "Traceback" not in res.err


def test_simulate_on_ray(compiled, tiny, ray_session) -> None:  # type: ignore[no-untyped-def]
    _, ds = tiny
    kwargs = dict(drift="1s,24h", instances=3, seed=1)
    assert _numbers(cimc.simulate(compiled, ds, ray="auto", **kwargs)) == _numbers(cimc.simulate(compiled, ds, **kwargs))


def _die_once(marker: str, task: int) -> int:
    """Kills its own worker process the first time (a crashed Ray worker), succeeds when retried."""
    if task == 1 and not os.path.exists(marker):
        Path(marker).write_text("died once")
        os._exit(1)
    return task * 10


def test_ray_retries_a_dead_worker(ray_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ray import cloudpickle

    from cimc.parallel import RayBackend

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test file
    marker = str(tmp_path / "died")
    results = dict(RayBackend("auto").run(_die_once, [0, 1, 2], marker))
    assert results == {0: 0, 1: 10, 2: 20} and os.path.exists(marker)


def _exit_worker(shared: object, task: int) -> int:
    os._exit(3)


def test_dead_pool_worker_is_a_one_line_error() -> None:
    with pytest.raises(cimc.CimcError, match="worker process died"):
        list(LocalBackend(1).run(_exit_worker, [0]))


def test_program_with_one_generator_per_instance() -> None:
    from cimc.runtime.devices import build_device
    from cimc.runtime.simulator import instance_generators
    from cimc.targets import PcmIbmDevice

    device = build_device(PcmIbmDevice())
    w = {"a": torch.randn(6, 5, generator=torch.Generator().manual_seed(0))}
    three = device.program_layers(w, 3, instance_generators(1, range(3), "program"))
    last = device.program_layers(w, 1, instance_generators(1, [2], "program"))
    assert torch.equal(three.array.g_prog_us[2:], last.array.g_prog_us) and torch.equal(three.array.nu[2:], last.array.nu)
    read3 = three.read(60.0, instance_generators(1, range(3), "read", 60.0))["a"]
    read1 = last.read(60.0, instance_generators(1, [2], "read", 60.0))["a"]
    assert torch.equal(read3[2:], read1)
    with pytest.raises(InputError, match="one per instance"):
        device.program_layers(w, 2, instance_generators(1, range(3), "program"))


@pytest.mark.parametrize("metric", ["accuracy", "cosine", "snr"])
def test_shards_merge_bit_for_bit_with_output_noise_and_any_metric(tiny, metric: str) -> None:
    """Output noise comes from per-instance streams too; per-class counts and label-free metrics merge exactly."""
    path, ds = tiny
    target = load_target("aon-cim").with_overrides(**{"converters.output_noise": 0.05})
    noisy = cimc.compile(path, target, calibration=ds, dac_bits=4, adc_bits=4)
    data = ds if metric == "accuracy" else Dataset(ds.x, None, "unlabelled")
    kwargs = dict(drift="1s,1y", instances=4, seed=5, metric=metric)
    whole = cimc.simulate(noisy, data, **kwargs)
    assert whole.data["metric"] == metric
    shards = [cimc.simulate(noisy, data, instance_range=r, **kwargs) for r in [(2, 4), (0, 1), (1, 2)]]
    assert _numbers(merge_results(noisy, shards)) == _numbers(whole)
    point = whole.data["series"][0]["points"][0]
    if metric == "accuracy":
        assert len(point["per_class"]) == 4 and "per_class" in whole.data
    else:
        assert "relerr" in point and whole.data["float_score"] is None
    # the noise is real: without it the numbers change
    quiet = cimc.simulate(compiled_without_noise(path, ds), data, **kwargs)
    assert _numbers(quiet)["series"] != _numbers(whole)["series"]


def compiled_without_noise(path: Path, ds: Dataset) -> cimc.artifact.CompiledModel:
    target = load_target("aon-cim").with_overrides(**{"converters.output_noise": 0.0})
    return cimc.compile(path, target, calibration=ds, dac_bits=4, adc_bits=4)


def test_output_noise_draws_do_not_depend_on_threads() -> None:
    """Output noise is drawn from two streams per instance, two halves at once when torch has two threads:
    the numbers must be the same with one thread, and laid out like the conversions they perturb."""
    from cimc.runtime.analog import _normal_like

    y = torch.zeros(8, 64, 16, 16).contiguous(memory_format=torch.channels_last)  # above the threading threshold
    before = torch.get_num_threads()
    draws = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            draws.append(_normal_like(y, (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(draws[0], draws[1])
    z = draws[0]
    assert z.stride() == y.stride() and z.shape == y.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1)  # memory order: the two halves come from the two streams
    half = flat.numel() // 2
    assert not torch.equal(flat[:half], flat[half:])
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


def test_instances_side_by_side_same_numbers(compiled, tiny) -> None:  # type: ignore[no-untyped-def]
    """With two torch threads the simulator runs two instances at once (one thread each): the numbers are
    those of the one-thread run, and the thread count is given back."""
    _, ds = tiny
    kwargs = dict(drift="1s,24h", instances=3, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cimc.simulate(compiled, ds, **kwargs)
        torch.set_num_threads(2)
        two = cimc.simulate(compiled, ds, **kwargs)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert _numbers(one) == _numbers(two)
